"""Pair and triplet losses: constants, naive references, optax equality, jit/vmap, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from siamjax import distances as D
from siamjax import losses as L

RNG = np.random.default_rng(42)


def _emb(b=12, d=5, dtype=np.float32):
  return jnp.asarray(RNG.normal(size=(b, d)).astype(dtype))


def _labels(b=12, classes=4):
  return jnp.asarray(np.arange(b) % classes, jnp.int32)


def test_contrastive_hand_computed():
  d = jnp.array([0.0, 2.0, 0.25, 1.5, 3.0])
  y = jnp.array([1, 1, 0, 0, 1])
  # 1/2 y d^2 + 1/2 (1 - y) max(1 - d, 0)^2
  np.testing.assert_allclose(L.contrastive_loss(d, y), [0.0, 2.0, 0.28125, 0.0, 4.5])
  np.testing.assert_allclose(L.contrastive_loss(d, y, margin=2.0), [0.0, 2.0, 1.53125, 0.125, 4.5])


def _naive_contrastive(d, y, margin):
  return np.array([0.5 * di**2 if yi == 1 else 0.5 * max(margin - di, 0.0) ** 2
                   for di, yi in zip(d, y)])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("label_dtype", [np.int32, np.bool_, np.float32])
def test_contrastive_matches_naive(jit, label_dtype):
  d = np.abs(RNG.normal(size=50)).astype(np.float32)
  y = RNG.integers(0, 2, size=50)
  f = jax.jit(functools.partial(L.contrastive_loss, margin=1.3)) if jit else functools.partial(
      L.contrastive_loss, margin=1.3)
  out = f(jnp.asarray(d), jnp.asarray(y.astype(label_dtype)))
  assert out.shape == (50,)
  np.testing.assert_allclose(out, _naive_contrastive(d, y, 1.3), rtol=1e-6)


def test_contrastive_opposite_label_convention_is_one_minus():
  d = jnp.array([0.3, 0.9])
  paper_y = jnp.array([0, 1])  # Hadsell et al.'s notation: Y = 0 for similar
  np.testing.assert_allclose(L.contrastive_loss(d, 1 - paper_y),
                             [0.5 * 0.09, 0.5 * 0.01], rtol=1e-6)


def test_contrastive_vmap_consistency():
  d = jnp.abs(jnp.asarray(RNG.normal(size=(3, 8)), jnp.float32))
  y = jnp.asarray(RNG.integers(0, 2, size=(3, 8)))
  vm = jax.vmap(L.contrastive_loss)(d, y)
  rows = jnp.stack([L.contrastive_loss(d[i], y[i]) for i in range(3)])
  np.testing.assert_allclose(vm, rows, rtol=1e-6)


def test_contrastive_grads_and_zero_distance():
  with jax.enable_x64(True):
    d = jnp.asarray(np.abs(RNG.normal(size=10)) + 0.05)
    y = jnp.asarray(RNG.integers(0, 2, size=10))
    check_grads(lambda d: L.contrastive_loss(d, y, margin=2.5), (d,), order=2, eps=1e-5)
  # Through the Euclidean distance of identical embeddings: finite, zero gradients.
  h = _emb(4, 3)
  g = jax.grad(lambda h1: jnp.mean(L.contrastive_loss(D.euclidean(h1, h), jnp.ones(4))))(h)
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda h1: jnp.mean(L.contrastive_loss(D.euclidean(h1, h), jnp.zeros(4))))(h)
  assert np.all(np.isfinite(g))


def test_pair_bce_matches_optax_and_is_stable():
  x = jnp.asarray(np.concatenate([RNG.normal(size=20) * 5, [1e4, -1e4, 0.0, 88.0, -88.0]]),
                  jnp.float32)
  y = jnp.asarray(RNG.integers(0, 2, size=25))
  out = L.pair_bce_loss(x, y)
  np.testing.assert_allclose(out, optax.sigmoid_binary_cross_entropy(x, y.astype(jnp.float32)),
                             rtol=1e-6, atol=1e-6)
  extremes = L.pair_bce_loss(jnp.array([1e4, -1e4, 1e4, -1e4]), jnp.array([1, 1, 0, 0]))
  np.testing.assert_allclose(extremes, [0.0, 1e4, 1e4, 0.0])
  g = jax.grad(lambda x: jnp.sum(L.pair_bce_loss(x, jnp.array([1, 0, 1, 0]))))(
      jnp.array([1e4, 1e4, -1e4, -1e4]))
  np.testing.assert_allclose(g, [0.0, 1.0, -1.0, 0.0])
  with jax.enable_x64(True):
    check_grads(lambda x: L.pair_bce_loss(x, y), (jnp.asarray(RNG.normal(size=25)),), order=2)


def test_pair_bce_jit_and_vmap():
  x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
  y = jnp.asarray(RNG.integers(0, 2, size=(4, 6)))
  np.testing.assert_allclose(jax.jit(jax.vmap(L.pair_bce_loss))(x, y),
                             jnp.stack([L.pair_bce_loss(x[i], y[i]) for i in range(4)]), rtol=1e-6)


def test_triplet_margin_matches_optax_and_naive():
  a, p, n = _emb(16, 8), _emb(16, 8), _emb(16, 8)
  out = L.triplet_margin_loss(a, p, n, margin=0.7)
  np.testing.assert_allclose(out, optax.losses.triplet_margin_loss(a, p, n, margin=0.7, eps=0.0),
                             rtol=1e-5, atol=1e-6)
  na = np.asarray
  naive = np.maximum(np.linalg.norm(na(a) - na(p), axis=1) - np.linalg.norm(na(a) - na(n), axis=1)
                     + 0.7, 0)
  np.testing.assert_allclose(out, naive, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(L.triplet_margin_loss)(a, p, n), L.triplet_margin_loss(a, p, n))
  with jax.enable_x64(True):
    a64, p64, n64 = (jnp.asarray(np.asarray(v), jnp.float64) * 3 for v in (a, p, n))
    check_grads(lambda a, p, n: L.triplet_margin_loss(a, p, n, margin=10.0), (a64, p64, n64),
                order=1, eps=1e-5)
  g = jax.grad(lambda a: jnp.sum(L.triplet_margin_loss(a, a, n)))(a)  # anchor == positive
  assert np.all(np.isfinite(g))


def test_triplet_vmap_consistency():
  a, p, n = (jnp.asarray(RNG.normal(size=(3, 5, 4)), jnp.float32) for _ in range(3))
  vm = jax.vmap(L.triplet_margin_loss)(a, p, n)
  np.testing.assert_allclose(vm, jnp.stack([L.triplet_margin_loss(a[i], p[i], n[i])
                                            for i in range(3)]), rtol=1e-6)


@pytest.mark.parametrize("fn", [L.contrastive_loss, L.pair_bce_loss])
def test_pair_loss_bad_input(fn):
  x = jnp.array([0.5, 0.2])
  first = "distance" if fn is L.contrastive_loss else "logits"
  with pytest.raises(ValueError, match="similar must hold only 0 and 1"):
    fn(x, jnp.array([1, 2]))
  with pytest.raises(ValueError, match="similar must hold only 0 and 1"):
    fn(x, jnp.array([-1.0, 0.0]))
  with pytest.raises(ValueError, match=f"{first} and similar must have the same shape"):
    fn(x, jnp.array([1, 0, 1]))
  with pytest.raises(ValueError, match=f"{first} must have rank 1"):
    fn(x[None], jnp.array([[1, 0]]))
  with pytest.raises(ValueError, match=f"{first} must have a floating dtype"):
    fn(jnp.array([1, 2]), jnp.array([1, 0]))
  with pytest.raises(ValueError, match=f"{first} is empty"):
    fn(jnp.zeros((0,)), jnp.zeros((0,), jnp.int32))
  with pytest.raises(ValueError, match="similar must have rank 1"):
    fn(x, jnp.float32(1.0))


def test_contrastive_bad_margin():
  with pytest.raises(ValueError, match="margin"):
    L.contrastive_loss(jnp.array([0.5]), jnp.array([1]), margin=-1.0)


def test_triplet_bad_input():
  a = jnp.ones((3, 4))
  with pytest.raises(ValueError, match="anchor and negative must have the same shape"):
    L.triplet_margin_loss(a, a, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="positive must have a floating dtype"):
    L.triplet_margin_loss(a, jnp.ones((3, 4), jnp.int32), a)
  with pytest.raises(ValueError, match="anchor must have rank 2"):
    L.triplet_margin_loss(jnp.ones(4), jnp.ones(4), jnp.ones(4))
  with pytest.raises(ValueError, match="anchor is empty"):
    L.triplet_margin_loss(jnp.ones((0, 4)), jnp.ones((0, 4)), jnp.ones((0, 4)))


@pytest.mark.parametrize("name,fn", [("euclidean", D.euclidean),
                                     ("squared_euclidean", D.squared_euclidean),
                                     ("cosine", D.cosine_distance)])
def test_triplet_margin_loss_takes_distance_names(name, fn):
  a, p, n = _emb(5, 3), _emb(5, 3), _emb(5, 3)  # "cosine" used to raise TypeError
  np.testing.assert_allclose(L.triplet_margin_loss(a, p, n, distance=name),
                             L.triplet_margin_loss(a, p, n, distance=fn), rtol=1e-6)
  with pytest.raises(ValueError, match="distance must be"):
    L.triplet_margin_loss(a, p, n, distance="manhattan")


def test_triplet_margin_loss_is_finite_in_float16_up_to_1e4():
  a, p, n = (jnp.asarray(RNG.uniform(-1e4, 1e4, size=(6, 4)), jnp.float16) for _ in range(3))
  for distance in ("euclidean", "cosine"):
    out = L.triplet_margin_loss(a, p, n, distance=distance)
    assert np.all(np.isfinite(out.astype(np.float32)))
    def total(x, distance=distance):
      return jnp.sum(L.triplet_margin_loss(x, p, n, distance=distance))
    g = jax.grad(total)(a)
    assert np.all(np.isfinite(g.astype(np.float32)))
