"""Encoders and Siamese models: parameter counts, paper init, Siamese properties, dtypes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import encoders, losses, models

KEY = jax.random.key(0)
RNG = np.random.default_rng(7)


def _count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def _images(b, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((b, 105, 105, 1)), jnp.float32)


@pytest.fixture(scope="module")
def koch_params():
  x = jnp.zeros((1, 105, 105, 1))
  return jax.jit(models.koch_siamese().init)(KEY, x, x)  # one program, not one per op


def test_koch_parameter_counts_without_allocating():
  x = jax.ShapeDtypeStruct((1, 105, 105, 1), jnp.float32)
  tower = jax.eval_shape(encoders.Koch().init, KEY, x)
  assert _count(tower) == 38_947_648
  siamese = jax.eval_shape(models.koch_siamese().init, KEY, x, x)
  assert _count(siamese) == 38_951_745
  pseudo = jax.eval_shape(models.koch_siamese(shared=False).init, KEY, x, x)
  assert _count(pseudo) == 2 * 38_947_648 + 4097
  assert set(pseudo["params"]) == {"tower1", "tower2", "head"}
  shapes = jax.tree.map(lambda p: p.shape, siamese["params"])
  assert shapes["encoder"]["conv1"]["kernel"] == (10, 10, 1, 64)
  assert shapes["encoder"]["conv2"]["kernel"] == (7, 7, 64, 128)
  assert shapes["encoder"]["conv3"]["kernel"] == (4, 4, 128, 128)
  assert shapes["encoder"]["conv4"]["kernel"] == (4, 4, 128, 256)
  assert shapes["encoder"]["dense"]["kernel"] == (9216, 4096)
  assert shapes["head"]["kernel"] == (4096, 1)


def test_koch_paper_initialisation(koch_params):
  p = koch_params["params"]
  for name in ("conv1", "conv2", "conv3", "conv4"):
    w = np.asarray(p["encoder"][name]["kernel"])
    assert abs(w.mean()) < 2e-3 and w.std() == pytest.approx(1e-2, rel=0.1), name
    b = np.asarray(p["encoder"][name]["bias"])
    assert b.mean() == pytest.approx(0.5, abs=5e-3) and b.std() < 2e-2, name
  w = np.asarray(p["encoder"]["dense"]["kernel"])
  assert w.std() == pytest.approx(0.2, rel=0.01)
  assert np.asarray(p["encoder"]["dense"]["bias"]).mean() == pytest.approx(0.5, abs=2e-3)
  assert np.asarray(p["head"]["kernel"]).std() == pytest.approx(0.2, rel=0.1)


@pytest.mark.slow
def test_koch_forward_is_symmetric_and_equivariant(koch_params):
  net = models.koch_siamese()
  x1, x2 = _images(3, 1), _images(3, 2)
  apply = jax.jit(net.apply)
  s12 = apply(koch_params, x1, x2)
  s21 = apply(koch_params, x2, x1)
  assert s12.shape == (3,) and s12.dtype == jnp.float32
  np.testing.assert_allclose(s12, s21, rtol=1e-5, atol=1e-5)
  perm = jnp.array([2, 0, 1])
  np.testing.assert_allclose(apply(koch_params, x1[perm], x2[perm]), s12[perm], rtol=1e-5,
                             atol=1e-5)
  # The tower output is a sigmoid.
  h = net.apply(koch_params, x1, method=net.embed)
  assert h.shape == (3, 4096) and float(h.min()) >= 0 and float(h.max()) <= 1
  # Scoring embeddings with the head equals the full forward (encode once, score many).
  h2 = net.apply(koch_params, x2, method=net.embed)
  np.testing.assert_allclose(net.apply(koch_params, h, h2, method=net.head), s12, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_koch_bf16_compute_keeps_float32_params(koch_params):
  net16 = models.koch_siamese(dtype=jnp.bfloat16)
  x1, x2 = _images(2, 3), _images(2, 4)
  params16 = jax.eval_shape(net16.init, KEY, x1, x2)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  out16 = jax.jit(net16.apply)(koch_params, x1, x2)
  assert out16.dtype == jnp.float32
  h16 = jax.jit(lambda p, x: net16.apply(p, x, method=net16.embed))(koch_params, x1)
  assert h16.dtype == jnp.bfloat16
  out32 = jax.jit(models.koch_siamese().apply)(koch_params, x1, x2)
  # bf16 keeps ~3 significant digits; logits are sums over 4096 weighted differences.
  np.testing.assert_allclose(out16, out32, rtol=0.05, atol=0.5)


def _mlp_net(shared=True):
  return models.SiameseNet(encoder=encoders.MLP(), shared=shared)


def test_shared_gradient_is_sum_of_both_branches():
  """d/dtheta L(f(theta, x1), f(theta, x2)) = dL/dtheta1 + dL/dtheta2 at theta1 = theta2."""
  net = _mlp_net()
  x1 = jnp.asarray(RNG.normal(size=(6, 28, 28)), jnp.float32)
  x2 = jnp.asarray(RNG.normal(size=(6, 28, 28)), jnp.float32)
  y = jnp.array([1, 0, 1, 0, 1, 1])
  params = net.init(KEY, x1, x2)

  def shared_loss(p):
    return jnp.mean(losses.pair_bce_loss(net.apply(p, x1, x2), y))

  def split_loss(tower_a, tower_b, head):
    pa = {"params": {"encoder": tower_a, "head": head}}
    pb = {"params": {"encoder": tower_b, "head": head}}
    h1 = net.apply(pa, x1, method=net.embed)
    h2 = net.apply(pb, x2, method=net.embed)
    return jnp.mean(losses.pair_bce_loss(net.apply(pa, h1, h2, method=net.head), y))

  g = jax.grad(shared_loss)(params)["params"]
  tower = params["params"]["encoder"]
  ga, gb = jax.grad(split_loss, argnums=(0, 1))(tower, tower, params["params"]["head"])
  summed = jax.tree.map(jnp.add, ga, gb)
  chex.assert_trees_all_close(g["encoder"], summed, rtol=1e-5, atol=1e-7)
  # Each branch alone contributes something different from the total.
  assert not np.allclose(ga["dense1"]["kernel"], g["encoder"]["dense1"]["kernel"])


def test_koch_shared_gradient_is_finite_and_one_tree(koch_params):
  net = models.koch_siamese()
  x1, x2 = _images(1, 5), _images(1, 6)

  def loss(p):
    return jnp.mean(losses.pair_bce_loss(net.apply(p, x1, x2), jnp.array([1])))

  g = jax.jit(jax.grad(loss))(koch_params)
  assert set(g["params"]) == {"encoder", "head"}
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_pseudo_siamese_is_not_symmetric_but_has_the_same_api():
  net = _mlp_net(shared=False)
  x1 = jnp.asarray(RNG.normal(size=(4, 10)), jnp.float32)
  x2 = jnp.asarray(RNG.normal(size=(4, 10)), jnp.float32)
  params = net.init(KEY, x1, x2)
  assert set(params["params"]) == {"tower1", "tower2", "head"}
  s12, s21 = net.apply(params, x1, x2), net.apply(params, x2, x1)
  assert s12.shape == (4,)
  assert not np.allclose(s12, s21)
  shared = _mlp_net()
  sp = shared.init(KEY, x1, x2)
  np.testing.assert_allclose(shared.apply(sp, x1, x2), shared.apply(sp, x2, x1), rtol=1e-6)


def test_no_retrace_on_second_call():
  net = _mlp_net()
  x = jnp.ones((4, 12))
  params = net.init(KEY, x, x)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def score(p, a, b):
    return net.apply(p, a, b)

  score(params, x, x)
  score(params, x + 1.0, x * 2.0)


def test_dropout_needs_rng_only_in_training():
  net = _mlp_net()
  x = jnp.ones((4, 12))
  params = net.init(KEY, x, x)
  det = net.apply(params, x, x * 0.5)
  np.testing.assert_allclose(det, net.apply(params, x, x * 0.5))
  a = net.apply(params, x, x * 0.5, train=True, rngs={"dropout": jax.random.key(1)})
  b = net.apply(params, x, x * 0.5, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)


@pytest.mark.slow
def test_other_encoders_shapes():
  cnn = encoders.SmallCNN()
  imgs = jnp.ones((2, 40, 40, 3))
  p = cnn.init(KEY, imgs)
  assert cnn.apply(p, imgs).shape == (2, 512)
  assert _count(p) == (3 * 3 * 3 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (
      9 * 64 * 64 + 64) + (7 * 7 * 64 * 512 + 512)
  text = encoders.TextCNN(vocab_size=50)
  tokens = jnp.asarray(RNG.integers(1, 50, size=(3, 32)), jnp.int32)
  tp = text.init(KEY, tokens)
  out = text.apply(tp, tokens)
  assert out.shape == (3, 16) and float(out.min()) > 0 and float(out.max()) < 1
  for pooling in ("max", "mean"):
    enc = encoders.TextCNN(vocab_size=50, pooling=pooling)
    pp = enc.init(KEY, tokens)
    assert enc.apply(pp, tokens).shape == (3, 16)
    assert enc.apply(pp, tokens[:, :20]).shape == (3, 16)  # any length


def test_bad_input_raises_value_error_naming_argument():
  net = models.koch_siamese()
  # The checks look at shapes and dtypes only, so abstract parameters and abstract
  # evaluation raise them exactly as a call would, without drawing 38.9M parameters.
  x = jax.ShapeDtypeStruct((1, 105, 105, 1), jnp.float32)
  params = jax.eval_shape(net.init, KEY, x, x)

  def apply(*args, **kwargs):
    return jax.eval_shape(functools.partial(net.apply, **kwargs), params, *args)

  with pytest.raises(ValueError, match="x1 and x2 must have the same shape"):
    apply(_images(2), _images(3))
  with pytest.raises(ValueError, match=r"x must be \[B, 105, 105, 1\]"):
    apply(jnp.ones((2, 28, 28, 1)), jnp.ones((2, 28, 28, 1)))
  with pytest.raises(ValueError, match="x must have a floating dtype"):
    apply(jnp.ones((2, 105, 105, 1), jnp.uint8), jnp.ones((2, 105, 105, 1), jnp.uint8))
  with pytest.raises(ValueError, match="x1 is empty"):
    apply(jnp.ones((0, 105, 105, 1)), jnp.ones((0, 105, 105, 1)))
  with pytest.raises(ValueError, match="tower must be 1 or 2"):
    apply(_images(1), tower=3, method=net.embed)
  with pytest.raises(ValueError, match="tokens must be integer"):
    encoders.TextCNN(vocab_size=5).init(KEY, jnp.ones((2, 20)))
  with pytest.raises(ValueError, match="pooling must be"):
    encoders.TextCNN(vocab_size=5, pooling="sum").init(KEY, jnp.ones((2, 20), jnp.int32))
  with pytest.raises(ValueError, match=r"x must have rank 4"):
    encoders.SmallCNN().init(KEY, jnp.ones((2, 8)))
