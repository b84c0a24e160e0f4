"""Proxy and margin-softmax losses against naive references and pytorch-metric-learning."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from siamjax import losses as L

SEEDS = [0, 1, 2]


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _naive_cross_entropy(logits, y):
  m = logits.max()
  return math.log(np.exp(logits - m).sum()) + m - logits[y]


def naive_proxy_nca(x, y, p, scale):
  xu, pu = _unit(x), _unit(p)
  out = []
  for i in range(len(x)):
    logits = np.array([-scale * np.sum((xu[i] - pu[c]) ** 2) for c in range(len(p))])
    out.append(_naive_cross_entropy(logits, y[i]))
  return np.array(out)


def naive_proxy_anchor(x, y, p, margin, alpha):
  cos = _unit(x) @ _unit(p).T
  pos_total, neg_total, with_pos = 0.0, 0.0, 0
  for c in range(len(p)):
    members = y == c
    if members.any():
      with_pos += 1
      pos_total += math.log1p(np.exp(-alpha * (cos[members, c] - margin)).sum())
    if (~members).any():
      neg_total += math.log1p(np.exp(alpha * (cos[~members, c] + margin)).sum())
  return (pos_total / with_pos if with_pos else 0.0) + neg_total / len(p)


def naive_arcface(x, y, w, margin, scale):
  cos = _unit(x) @ _unit(w).T
  out = []
  for i in range(len(x)):
    logits = cos[i].copy()
    theta = math.acos(min(max(cos[i, y[i]], -1.0), 1.0))
    logits[y[i]] = (math.cos(theta + margin) if theta <= math.pi - margin
                    else math.cos(theta) - margin * math.sin(margin))
    out.append(_naive_cross_entropy(scale * logits, y[i]))
  return np.array(out)


def naive_cosface(x, y, w, margin, scale):
  cos = _unit(x) @ _unit(w).T
  out = []
  for i in range(len(x)):
    logits = cos[i].copy()
    logits[y[i]] -= margin
    out.append(_naive_cross_entropy(scale * logits, y[i]))
  return np.array(out)


# name -> (siamjax fn returning the scalar PML reports, naive scalar, hyper-parameters)
CASES = {
    "proxy_nca": (lambda e, y, w: jnp.mean(L.proxy_nca_loss(e, y, w, scale=3.0)),
                  lambda e, y, w: naive_proxy_nca(e, y, w, 3.0).mean()),
    "proxy_anchor": (lambda e, y, w: L.proxy_anchor_loss(e, y, w, margin=0.1, alpha=32.0),
                     lambda e, y, w: naive_proxy_anchor(e, y, w, 0.1, 32.0)),
    "arcface": (lambda e, y, w: jnp.mean(L.arcface_loss(e, y, w, margin=0.5, scale=64.0)),
                lambda e, y, w: naive_arcface(e, y, w, 0.5, 64.0).mean()),
    "cosface": (lambda e, y, w: jnp.mean(L.cosface_loss(e, y, w, margin=0.35, scale=64.0)),
                lambda e, y, w: naive_cosface(e, y, w, 0.35, 64.0).mean()),
}
PER_ANCHOR = {"proxy_nca": lambda e, y, w, **k: L.proxy_nca_loss(e, y, w, scale=3.0, **k),
              "arcface": lambda e, y, w, **k: L.arcface_loss(e, y, w, **k),
              "cosface": lambda e, y, w, **k: L.cosface_loss(e, y, w, **k)}


def _problem(seed, b=13, d=5, c=7):
  """Irregular label counts: some classes have several samples, some one, some none."""
  rng = np.random.default_rng(seed)
  weights = np.array([6, 3, 2, 1, 1, 0.5, 0.0])[:c]
  labels = rng.choice(c, size=b, p=weights / weights.sum())
  labels[0] = c - 2  # at least one singleton-ish rare class
  return rng.normal(size=(b, d)), labels.astype(np.int32), rng.normal(size=(c, d))


def _pml_loss(name, c, d, torch_dtype):
  losses = pytest.importorskip("pytorch_metric_learning.losses")
  if name == "proxy_nca":
    return losses.ProxyNCALoss(c, d, softmax_scale=3.0).to(torch_dtype), "proxies"
  if name == "proxy_anchor":
    return losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32).to(torch_dtype), "proxies"
  if name == "arcface":
    return losses.ArcFaceLoss(c, d, margin=math.degrees(0.5), scale=64).to(torch_dtype), "W"
  return losses.CosFaceLoss(c, d, margin=0.35, scale=64).to(torch_dtype), "W"


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_naive_reference_float64(name, seed):
  x, y, w = _problem(seed)
  fn, naive = CASES[name]
  with jax.enable_x64(True):
    got = float(fn(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
  np.testing.assert_allclose(got, naive(x, y, w), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_value_and_gradients_match_pytorch_metric_learning(name, seed, dtype):
  torch = pytest.importorskip("torch")
  x, y, w = _problem(seed)
  torch_dtype = torch.float64 if dtype == "float64" else torch.float32
  pml, attr = _pml_loss(name, w.shape[0], w.shape[1], torch_dtype)
  with torch.no_grad():  # PML initialises its own W; use the same values as siamjax
    getattr(pml, attr).copy_(torch.from_numpy(w if attr == "proxies" else w.T))
  xt = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
  ref = pml(xt, torch.from_numpy(y).long())
  ref.backward()
  ref_gw = getattr(pml, attr).grad.numpy()
  ref_gw = ref_gw if attr == "proxies" else ref_gw.T

  fn = CASES[name][0]
  with jax.enable_x64(dtype == "float64"):
    value, (ge, gw) = jax.jit(jax.value_and_grad(fn, argnums=(0, 2)))(
        jnp.asarray(x, dtype), jnp.asarray(y), jnp.asarray(w, dtype))
    assert value.dtype == jnp.dtype(dtype)
  rtol, atol = (1e-11, 1e-12) if dtype == "float64" else (2e-5, 2e-6)
  np.testing.assert_allclose(float(value), ref.item(), rtol=rtol)
  np.testing.assert_allclose(ge, xt.grad.numpy(), rtol=rtol * 10, atol=atol * 10)
  np.testing.assert_allclose(gw, ref_gw, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_check_grads_jit_and_vmap(name):
  fn = CASES[name][0]
  x, y, w = _problem(4, b=6, d=3, c=4)
  with jax.enable_x64(True):
    args = (jnp.asarray(x), jnp.asarray(w))
    f = lambda e, p: fn(e, jnp.asarray(y), p)  # noqa: E731
    check_grads(f, args, order=1, modes=("rev",))
    np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-12)
    # vmap over independent problems equals one call per problem
    xs = jnp.stack([args[0], 2.0 * args[0][::-1]]); ws = jnp.stack([args[1], -args[1]])
    np.testing.assert_allclose(jax.vmap(f)(xs, ws), [f(xs[0], ws[0]), f(xs[1], ws[1])],
                               rtol=1e-12)


@pytest.mark.parametrize("name", PER_ANCHOR)
def test_per_anchor_shape_and_valid_mask_drops_rows(name):
  x, y, w = _problem(5)
  fn = PER_ANCHOR[name]
  keep = np.arange(len(x)) % 3 != 1
  y_padded = np.where(keep, y, 99)  # padding rows may carry any label, even out of range
  full = fn(jnp.asarray(x), jnp.asarray(y_padded), jnp.asarray(w), valid=jnp.asarray(keep))
  assert full.shape == (len(x),)
  np.testing.assert_array_equal(np.asarray(full)[~keep], 0.0)
  sub = fn(jnp.asarray(x[keep]), jnp.asarray(y[keep]), jnp.asarray(w))
  # another batch shape may sum in another order: float32 rounding, a few ulps
  np.testing.assert_allclose(np.asarray(full)[keep], sub, rtol=1e-5)


def test_proxy_anchor_valid_mask_equals_the_subset():
  x, y, w = _problem(6)
  keep = np.arange(len(x)) % 4 != 0
  got = L.proxy_anchor_loss(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w),
                            valid=jnp.asarray(keep))
  np.testing.assert_allclose(got, naive_proxy_anchor(x[keep], y[keep], w, 0.1, 32.0),
                             rtol=1e-5)
  none = L.proxy_anchor_loss(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w),
                             valid=jnp.zeros(len(x), bool))
  assert float(none) == 0.0


def test_arcface_fallback_branch_and_finite_gradient_at_zero_angle():
  m, s = 0.5, 10.0
  w = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])
  # row 0: opposite its class weight (theta > pi - m, the fallback);
  # row 1: exactly on its class weight (theta = 0, where d acos/dx is infinite)
  x = np.array([[-1.0, 0.05], [0.0, 3.0]])
  y = np.array([0, 1], np.int32)
  with jax.enable_x64(True):
    got = L.arcface_loss(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), margin=m, scale=s)
    np.testing.assert_allclose(got, naive_arcface(x, y, w, m, s), rtol=1e-12)
    ge, gw = jax.jit(jax.grad(lambda e, p: jnp.sum(L.arcface_loss(
        e, jnp.asarray(y), p, margin=m, scale=s)), argnums=(0, 1)))(
        jnp.asarray(x), jnp.asarray(w))
  assert np.all(np.isfinite(ge)) and np.all(np.isfinite(gw))


@pytest.mark.parametrize("name", CASES)
def test_float16_large_embeddings_are_finite(name):
  fn = CASES[name][0]
  x, y, w = _problem(7)
  x16 = jnp.asarray(1e4 * _unit(x), jnp.float16)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 2)))(x16, jnp.asarray(y),
                                                        jnp.asarray(w, jnp.float16))
  assert value.dtype == jnp.float32 and np.isfinite(float(value))  # computed in float32
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  x, y, w = (jnp.asarray(a) for a in _problem(8))
  with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 7\)"):
    L.proxy_nca_loss(x, y.at[0].set(7), w)
  with pytest.raises(ValueError, match="labels must be class ids"):
    L.arcface_loss(x, y.at[0].set(-1), w)
  with pytest.raises(ValueError, match="proxies must be"):
    L.proxy_anchor_loss(x, y, w[:, :3])
  with pytest.raises(ValueError, match="weights must have rank 2"):
    L.cosface_loss(x, y, w[0])
  with pytest.raises(ValueError, match="valid must be a bool mask"):
    L.proxy_nca_loss(x, y, w, valid=jnp.ones(len(y)))
  with pytest.raises(ValueError, match="valid has 3 entries"):
    L.proxy_nca_loss(x, y, w, valid=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="margin is in radians"):
    L.arcface_loss(x, y, w, margin=180.0)
  with pytest.raises(ValueError, match="scale must be"):
    L.cosface_loss(x, y, w, scale=0.0)
  with pytest.raises(ValueError, match="labels must be integer"):
    L.proxy_nca_loss(x, y.astype(jnp.float32), w)


def test_out_of_range_label_under_jit_is_nan_not_clamped():
  x, y, w = (jnp.asarray(a) for a in _problem(9))
  bad = y.at[2].set(7)
  per_anchor = jax.jit(L.cosface_loss)(x, bad, w)
  assert np.isnan(per_anchor[2]) and np.all(np.isfinite(np.delete(np.asarray(per_anchor), 2)))
  assert np.isnan(jax.jit(L.proxy_anchor_loss)(x, bad, w))
