"""Distances and similarities: constants, naive references, jit/vmap, gradients, errors."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from siamjax import distances as D

RNG = np.random.default_rng(0)

NAIVE = {
    "l1": lambda a, b: np.abs(a - b).sum(-1),
    "squared_euclidean": lambda a, b: ((a - b) ** 2).sum(-1),
    "euclidean": lambda a, b: np.sqrt(((a - b) ** 2).sum(-1)),
    "cosine_similarity": lambda a, b: (a * b).sum(-1)
    / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)),
    "cosine_distance": lambda a, b: 1 - (a * b).sum(-1)
    / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)),
}
FUNCS = {name: getattr(D, name) for name in NAIVE}


def test_hand_computed_constants():
  a, b = jnp.array([1.0, 2.0, 2.0]), jnp.array([0.0, 0.0, 0.0])
  assert float(D.l1(a, b)) == 5.0
  assert float(D.squared_euclidean(a, b)) == 9.0
  assert float(D.euclidean(a, b)) == 3.0
  assert float(D.cosine_similarity(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))) == 0.0
  assert float(D.cosine_similarity(jnp.array([3.0, 4.0]), jnp.array([6.0, 8.0]))) == pytest.approx(1.0)
  np.testing.assert_allclose(D.inverse_distance_similarity(jnp.array([0.0, 1.0, 4.0])),
                             [1.0, 0.5, 0.2])
  np.testing.assert_allclose(D.exp_similarity(jnp.array([0.0, 1.0])), [1.0, np.exp(-1.0)])


@pytest.mark.parametrize("name", sorted(NAIVE))
@pytest.mark.parametrize("jit", [False, True])
def test_matches_naive_reference(name, jit):
  a = RNG.normal(size=(7, 5)).astype(np.float32)
  b = RNG.normal(size=(7, 5)).astype(np.float32)
  f = jax.jit(FUNCS[name]) if jit else FUNCS[name]
  out = f(jnp.asarray(a), jnp.asarray(b))
  assert out.shape == (7,)
  np.testing.assert_allclose(out, NAIVE[name](a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_broadcasting_and_vmap_agree(name):
  a = jnp.asarray(RNG.normal(size=(4, 3, 6)), jnp.float32)
  b = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
  f = FUNCS[name]
  broadcast = f(a, b[None])
  vmapped = jax.vmap(f, in_axes=(0, None))(a, b)
  assert broadcast.shape == vmapped.shape == (4, 3)
  np.testing.assert_allclose(broadcast, vmapped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_check_grads(name):
  with jax.enable_x64(True):
    a = jnp.asarray(RNG.normal(size=(3, 4)))
    b = jnp.asarray(RNG.normal(size=(3, 4)))
    check_grads(FUNCS[name], (a, b), order=2, modes=("fwd", "rev"), eps=1e-4)


@pytest.mark.parametrize("name", ["l1", "squared_euclidean", "euclidean", "cosine_distance"])
def test_finite_gradient_at_identical_inputs(name):
  x = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
  grad = jax.grad(lambda a: jnp.sum(FUNCS[name](a, x)))(x)
  assert np.all(np.isfinite(grad))
  second = jax.jacfwd(jax.grad(lambda a: jnp.sum(FUNCS[name](a, x))))(x)
  assert np.all(np.isfinite(second))


def test_euclidean_gradient_is_zero_subgradient_at_zero_distance():
  x = jnp.ones((3,))
  ga, gb = jax.grad(D.euclidean, argnums=(0, 1))(x, x)
  np.testing.assert_array_equal(ga, 0.0)
  np.testing.assert_array_equal(gb, 0.0)
  assert float(D.euclidean(x, x)) == 0.0


def test_zero_vector_cosine_is_finite():
  z = jnp.zeros((4,))
  assert float(D.cosine_similarity(z, jnp.ones(4))) == 0.0
  assert np.all(np.isfinite(jax.grad(lambda a: D.cosine_similarity(a, jnp.ones(4)))(z)))


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_pairwise_distances_match_broadcast(distance):
  x = jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)
  y = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)
  ref = {"euclidean": D.euclidean, "squared_euclidean": D.squared_euclidean,
         "cosine": D.cosine_distance}[distance](x[:, None, :], y[None, :, :])
  out = D.pairwise_distances(x, y, distance=distance)
  assert out.shape == (6, 5)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_pairwise_distances_self_is_zero_with_finite_grads():
  x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  d = D.pairwise_distances(x, x)
  np.testing.assert_allclose(jnp.diag(d), 0.0, atol=1e-3)
  g = jax.grad(lambda x: jnp.sum(D.pairwise_distances(x, x)))(x)
  assert np.all(np.isfinite(g))


def test_no_retrace_on_second_call():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(a, b):
    return D.euclidean(a, b)

  a = jnp.ones((3, 4))
  f(a, a)
  f(a + 1, a)  # same shapes: must not trace again


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (3, 4), elements=st.floats(-100, 100, width=32)),
       hnp.arrays(np.float32, (3, 4), elements=st.floats(-100, 100, width=32)))
def test_euclidean_metric_properties(a, b):
  dab = np.asarray(D.euclidean(a, b))
  dba = np.asarray(D.euclidean(b, a))
  np.testing.assert_array_equal(dab, dba)
  assert np.all(dab >= 0)
  assert np.all(np.asarray(D.euclidean(a, a)) == 0)
  # Triangle inequality through the origin.
  z = np.zeros_like(a)
  assert np.all(dab <= np.asarray(D.euclidean(a, z)) + np.asarray(D.euclidean(z, b)) + 1e-3)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_bad_input_raises_value_error_naming_argument(name):
  f = FUNCS[name]
  good = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"\ba\b.*floating"):
    f(jnp.ones((2, 3), jnp.int32), good)
  with pytest.raises(ValueError, match=r"\bb\b.*floating"):
    f(good, jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="same embedding size"):
    f(good, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\ba\b must have rank"):
    f(jnp.float32(1.0), good)
  with pytest.raises(ValueError, match="do not broadcast"):
    f(jnp.ones((2, 3)), jnp.ones((5, 3)))


def test_pairwise_bad_input():
  with pytest.raises(ValueError, match="distance must be"):
    D.pairwise_distances(jnp.ones((2, 3)), jnp.ones((2, 3)), distance="manhattan")
  with pytest.raises(ValueError, match=r"\bx\b must have rank 2"):
    D.pairwise_distances(jnp.ones((3,)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"\bd\b must have a floating"):
    D.exp_similarity(jnp.ones(3, jnp.int32))


# -------------------------------------------------------------------------------------
# Numerics: half precision, a large shared offset
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype):
  # norms near 1e4: ||x||^2 alone overflows float16 (max 65504), the distance does not
  x = jnp.asarray(RNG.uniform(-1e4, 1e4, size=(6, 4)), dtype)
  y = jnp.asarray(RNG.uniform(-1e4, 1e4, size=(5, 4)), dtype)
  x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
  for distance in ("euclidean", "cosine"):
    out = D.pairwise_distances(x, y, distance=distance)
    assert out.dtype == dtype
    want = D.pairwise_distances(x32, y32, distance=distance).astype(dtype)
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=1e-2,
                               atol=1e-3)
    assert np.all(np.isfinite(out.astype(np.float32)))
  for fn in (D.euclidean, D.cosine_similarity, D.cosine_distance, D.l1):
    out = fn(x[:5], y)
    assert out.dtype == dtype and np.all(np.isfinite(out.astype(np.float32)))
    np.testing.assert_allclose(out.astype(np.float32),
                               fn(x32[:5], y32).astype(dtype).astype(np.float32), rtol=1e-2)


def test_gram_distances_are_accurate_with_a_large_shared_offset():
  # 1e3 u + N(0, 1): ||x||^2 ~ 1e6 and the Gram expansion used to lose 0.35 in float32
  u = RNG.normal(size=16)
  x = 1e3 * u / np.linalg.norm(u) + RNG.normal(size=(32, 16))
  y = x[:7] + RNG.normal(size=(7, 16))
  direct = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))  # float64, the direct formula
  out = D.pairwise_distances(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(out, direct, atol=1e-3)
  sq = D.pairwise_distances(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                            distance="squared_euclidean")
  np.testing.assert_allclose(sq, direct**2, rtol=1e-4, atol=1e-3)
  g = jax.grad(lambda a: jnp.sum(D.pairwise_distances(a, jnp.asarray(y, jnp.float32))))(
      jnp.asarray(x, jnp.float32))
  g_direct = ((x[:, None] - y[None]) / direct[..., None]).sum(1)
  np.testing.assert_allclose(g, g_direct, atol=1e-3)


def test_nan_embeddings_give_nan_distances_not_zero():
  """safe_sqrt used to send NaN to 0: a NaN embedding then sat at distance 0 from all."""
  x = jnp.array([[jnp.nan, 1.0], [0.0, 1.0]])
  y = jnp.array([[0.0, 0.0]])
  assert np.isnan(D.euclidean(x[0], y[0]))
  np.testing.assert_array_equal(np.isnan(D.pairwise_distances(x, y)), [[True], [False]])
  assert np.isnan(D.safe_sqrt(jnp.nan)) and float(D.safe_sqrt(0.0)) == 0.0
  assert float(jax.grad(D.safe_sqrt)(0.0)) == 0.0
