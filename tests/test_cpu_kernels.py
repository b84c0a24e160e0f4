"""siamjax.cpu_kernels: the optional oneDNN bf16 route and its XLA fallback."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import cpu_kernels, fourier
from siamjax.encoders import Koch

ROUTE = cpu_kernels.matmul_route()
onednn = pytest.mark.skipif(ROUTE != "onednn-bf16", reason="oneDNN kernel not built here")


def _operands(g=3, m=5, k=7, n=4):
  ka, kb = jax.random.split(jax.random.key(0))
  return jax.random.normal(ka, (g, m, k)), jax.random.normal(kb, (g, k, n))


def _bf16_ref(a, b):
  """The naive reference: operands rounded to bf16, product in float64."""
  a64 = np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  b64 = np.asarray(b.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  return np.einsum("gmk,gkn->gmn", a64, b64)


def test_route_is_known():
  assert ROUTE in ("onednn-bf16", "xla")


def test_bf16_matmul_matches_rounded_reference():
  a, b = _operands()
  out = jax.jit(cpu_kernels.bf16_matmul)(a, b)
  assert out.dtype == jnp.float32 and out.shape == (3, 5, 4)
  # bf16 inputs, float32 accumulation: only float32 rounding beyond the input rounding
  np.testing.assert_allclose(out, _bf16_ref(a, b), rtol=1e-5, atol=1e-5)


def test_bf16_matmul_grads_match_float32_grads():
  a, b = _operands(g=2, m=6, k=9, n=5)
  w = jax.random.normal(jax.random.key(2), (2, 6, 5))

  def loss(f):
    return lambda a, b: jnp.sum(w * f(a, b))

  ga, gb = jax.grad(loss(cpu_kernels.bf16_matmul), (0, 1))(a, b)
  ra, rb = jax.grad(loss(lambda a, b: jnp.einsum("gmk,gkn->gmn", a, b)), (0, 1))(a, b)
  assert ga.dtype == a.dtype and gb.dtype == b.dtype
  for got, ref in ((ga, ra), (gb, rb)):  # bf16 tolerance: 2^-8 relative per operand
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("shapes", [((3, 5, 7), (2, 7, 4)), ((5, 7), (7, 4)),
                                    ((3, 5, 7), (3, 6, 4))])
def test_bf16_matmul_rejects_bad_shapes(shapes):
  with pytest.raises(ValueError, match="a and b"):
    cpu_kernels.bf16_matmul(jnp.ones(shapes[0]), jnp.ones(shapes[1]))


def test_dense_dot_general_matches_dot():
  x = jax.random.normal(jax.random.key(0), (2, 3, 16), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (16, 8), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  out = cpu_kernels.dense_dot_general(x, k, dims)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 8)
  ref = jax.lax.dot_general(x.astype(jnp.float32), k.astype(jnp.float32), dims)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)
  # float32 operands: rounded to bf16, result float32; other contractions: lax.dot_general
  x32, k32 = x.astype(jnp.float32), k.astype(jnp.float32)
  out32 = cpu_kernels.dense_dot_general(x32, k32, dims)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, ref, rtol=1e-5, atol=1e-5)  # x, k already bf16 values
  bdims = (((2,), (1,)), ((0,), (0,)))
  y = jnp.ones((2, 16, 8))
  np.testing.assert_array_equal(cpu_kernels.dense_dot_general(x32, y, bdims),
                                jax.lax.dot_general(x32, y, bdims))


def test_dft_conv2d_bf16_products_match_float32():
  x = jax.random.uniform(jax.random.key(0), (2, 14, 12, 8))
  w = 0.1 * jax.random.normal(jax.random.key(1), (4, 3, 8, 6))
  ref = fourier.dft_conv2d(x, w)
  out = fourier.dft_conv2d(x, w, products="bf16")
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-2 * float(jnp.abs(ref).max()))
  with pytest.raises(ValueError, match="products"):
    fourier.dft_conv2d(x, w, products="fp8")


def test_dft_conv2d_bf16_matches_float32():
  x = jax.random.uniform(jax.random.key(0), (2, 14, 12, 8))
  w = 0.1 * jax.random.normal(jax.random.key(1), (4, 3, 8, 6))
  ref = fourier.dft_conv2d(x, w)
  out = fourier.dft_conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0, atol=3e-2 * scale)


@onednn
def test_onednn_route_runs_the_custom_call():
  a, b = _operands()
  hlo = jax.jit(cpu_kernels.bf16_matmul).lower(a, b).as_text()
  assert "siamjax_onednn_matmul_bf16" in hlo
  assert Koch(dtype=jnp.bfloat16).route() == "dft+onednn-bf16"


def test_koch_bf16_route_and_float32_agreement():
  net = Koch(dtype=jnp.bfloat16)
  assert net.route() == ("dft+onednn-bf16" if ROUTE == "onednn-bf16" else "direct")
  x = jax.random.uniform(jax.random.key(0), (2, 105, 105, 1))
  params = Koch().init(jax.random.key(1), x)
  ref = Koch().apply(params, x)
  err = jnp.abs(net.apply(params, x).astype(jnp.float32) - ref)
  direct = jnp.abs(Koch(dtype=jnp.bfloat16, conv="direct").apply(params, x) - ref)
  # bf16 tolerance: the sigmoid outputs of bf16 towers differ from float32 by ~1e-3 on
  # average (measured 1.3e-3 direct, 1.5e-3 dft; the largest 0.023 / 0.035)
  assert float(err.mean()) < 1.5 * float(direct.mean()) + 1e-4
  assert float(err.max()) < 5e-2


def test_disabled_route_is_xla():
  code = ("import jax.numpy as jnp; from siamjax import cpu_kernels; "
          "from siamjax.encoders import Koch; "
          "print(cpu_kernels.matmul_route(), Koch(dtype=jnp.bfloat16).route())")
  env = dict(os.environ, SIAMJAX_ONEDNN="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["xla", "direct"]


def test_build_without_onednn_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="oneDNN headers"):
    cpu_kernels.build(str(tmp_path))
