"""siamjax.fourier: the DFT convolution equals lax's direct one (values and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from siamjax import _pooling, encoders, fourier, models

DN = ("NHWC", "HWIO", "NHWC")


def direct(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def naive(x, w):
  """Loops over kernel taps: the definition of a valid cross-correlation."""
  kh, kw = w.shape[:2]
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for a in range(kh):
    for b in range(kw):
      out += np.einsum("bijc,co->bijo", x[:, a:a + ho, b:b + wo, :], w[a, b])
  return out


SHAPES = [  # (B, H, W, C, kh, kw, O)
    (2, 12, 10, 3, 3, 4, 5),  # rectangular, even width
    (1, 9, 9, 4, 4, 4, 2),  # odd sizes (Koch conv4's 9x9)
    (3, 7, 11, 1, 7, 2, 3),  # one input channel, kernel as tall as the input
    (2, 5, 6, 2, 5, 6, 4),  # 1x1 output
    (1, 6, 5, 2, 1, 1, 3),  # 1x1 kernel
]


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_naive_and_lax_float64(shape):
  b, h, w, c, kh, kw, o = shape
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, h, w, c))
  k = rng.normal(size=(kh, kw, c, o))
  with jax.enable_x64():
    y = np.asarray(fourier.dft_conv2d(jnp.asarray(x), jnp.asarray(k)))
    ref = np.asarray(direct(jnp.asarray(x), jnp.asarray(k)))
  assert y.dtype == np.float64
  np.testing.assert_allclose(y, naive(x, k), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


def test_float32_koch_conv2_shape_matches_lax():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(kx, (4, 48, 48, 64))
  w = 1e-2 * jax.random.normal(kw, (7, 7, 64, 128))
  y, ref = jax.jit(fourier.dft_conv2d)(x, w), direct(x, w)
  assert y.shape == ref.shape == (4, 42, 42, 128) and y.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(ref)))
  assert float(jnp.max(jnp.abs(y - ref))) < 1e-5 * scale


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradients_check_grads_and_equal_lax(shape):
  b, h, w, c, kh, kw, o = shape
  with jax.enable_x64():
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (b, h, w, c), jnp.float64)
    k = jax.random.normal(kk, (kh, kw, c, o), jnp.float64)
    check_grads(fourier.dft_conv2d, (x, k), order=1, modes=("fwd", "rev"))

    def loss(f):
      return lambda x, k: jnp.sum(jnp.sin(f(x, k)))

    g = jax.grad(loss(fourier.dft_conv2d), (0, 1))(x, k)
    g_ref = jax.grad(loss(direct), (0, 1))(x, k)
    for a, r in zip(g, g_ref):
      np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_jit_vmap_consistent():
  x = jax.random.normal(jax.random.key(2), (3, 2, 8, 8, 2))
  w = jax.random.normal(jax.random.key(3), (3, 3, 2, 4))
  batched = jax.vmap(lambda xi: fourier.dft_conv2d(xi, w))(x)
  looped = jnp.stack([jax.jit(fourier.dft_conv2d)(xi, w) for xi in x])
  np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


def test_flax_conv_drop_in_keeps_parameters_and_values():
  x = jax.random.normal(jax.random.key(4), (2, 10, 10, 3))
  plain = nn.Conv(6, (3, 3), padding="VALID")
  dft = nn.Conv(6, (3, 3), padding="VALID", conv_general_dilated=fourier.conv_general_dilated)
  params = plain.init(jax.random.key(5), x)
  assert jax.tree.structure(params) == jax.tree.structure(dft.init(jax.random.key(5), x))
  np.testing.assert_allclose(dft.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"window_strides": (2, 2)}, "window_strides"),
    ({"padding": "SAME"}, "padding"),
    ({"padding": ((1, 1), (0, 0))}, "padding"),
    ({"rhs_dilation": (2, 1)}, "rhs_dilation"),
    ({"lhs_dilation": (1, 2)}, "lhs_dilation"),
    ({"feature_group_count": 2}, "feature_group_count"),
    ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "dimension_numbers"),
    ({"dimension_numbers": None}, "dimension_numbers"),
])
def test_conv_general_dilated_rejects_what_it_cannot_compute(kwargs, match):
  args = {"window_strides": (1, 1), "padding": "VALID", "dimension_numbers": DN}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fourier.conv_general_dilated(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2)), **args)


@pytest.mark.parametrize("x_shape, w_shape, match", [
    ((1, 6, 6, 2), (3, 3, 3, 2), "input channels"),
    ((1, 4, 6, 2), (5, 3, 2, 2), "must fit"),
    ((6, 6, 2), (3, 3, 2, 2), r"\[B, H, W, C\]"),
])
def test_dft_conv2d_bad_shapes(x_shape, w_shape, match):
  with pytest.raises(ValueError, match=match):
    fourier.dft_conv2d(jnp.ones(x_shape), jnp.ones(w_shape))


def test_dft_conv2d_rejects_integers():
  with pytest.raises(ValueError, match="floating"):
    fourier.dft_conv2d(jnp.ones((1, 4, 4, 1), jnp.int32), jnp.ones((2, 2, 1, 1)))


def test_flop_counts_koch_layers():
  assert fourier.direct_conv2d_flops(48, 48, 7, 7, 64, 128) == 2 * 42 * 42 * 49 * 64 * 128
  assert fourier.dft_conv2d_flops(48, 48, 7, 7, 64, 128) * 7 < fourier.direct_conv2d_flops(
      48, 48, 7, 7, 64, 128)


# ------------------------------------------------------------------- the Koch network


def test_max_pool2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.key(6), (2, 8, 6, 3))
  np.testing.assert_array_equal(_pooling.max_pool2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_koch_conv_auto_resolves_by_backend_and_dtype():
  assert jax.default_backend() == "cpu"
  assert encoders.Koch().conv_impl() == "dft"
  # bf16: the DFT path only where its products run on the oneDNN bf16 kernel, and not on
  # CPUs with AMX, where oneDNN's direct convolutions are faster.
  from siamjax import cpu_kernels
  onednn = cpu_kernels.matmul_route() == "onednn-bf16"
  bf16 = "dft" if onednn and not cpu_kernels.onednn_amx() else "direct"
  assert encoders.Koch(dtype=jnp.bfloat16).conv_impl() == bf16
  assert encoders.Koch(conv="direct").conv_impl() == "direct"
  with pytest.raises(ValueError, match="conv must be"):
    encoders.Koch(conv="fft").conv_impl()


@pytest.mark.slow
def test_koch_siamese_dft_equals_direct_values_and_gradients():
  key = jax.random.key(7)
  x1 = jax.random.uniform(jax.random.fold_in(key, 1), (2, 105, 105, 1))
  x2 = jax.random.uniform(jax.random.fold_in(key, 2), (2, 105, 105, 1))
  y = jnp.array([1.0, 0.0])
  nets = {c: models.koch_siamese(conv=c) for c in ("direct", "dft")}
  params = jax.jit(nets["direct"].init)(key, x1, x2)
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(nets["dft"].init, key, x1, x2))

  def loss(net, p):
    logits = net.apply(p, x1, x2)
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits), logits

  out = {c: jax.jit(jax.value_and_grad(lambda p, n=n: loss(n, p), has_aux=True))(params)
         for c, n in nets.items()}
  (_, logits_d), g_d = out["direct"]
  (_, logits_f), g_f = out["dft"]
  np.testing.assert_allclose(logits_f, logits_d, rtol=1e-4, atol=1e-4)
  for a, r in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_d)):
    # float32 sums in the Fourier domain against direct ones: below 1e-3 of max |g| with
    # AVX-512, up to 9.4e-3 (a convolution kernel's gradient) seen on an AVX2 CPU
    scale = float(jnp.max(jnp.abs(r))) + 1e-12
    assert float(jnp.max(jnp.abs(a - r))) <= 2e-2 * scale
