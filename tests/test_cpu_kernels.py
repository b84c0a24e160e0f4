"""siamjax.cpu_kernels: the optional oneDNN bf16 route and its XLA fallback."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import cpu_kernels, fourier, machine
from siamjax.cpu_kernels import _library
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


def test_bf16_results_are_the_float32_results_rounded_once():
  a, b = _operands(g=2, m=6, k=9, n=5)
  out = jax.jit(lambda a, b: cpu_kernels.bf16_matmul(a, b, out_dtype=jnp.bfloat16))(a, b)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, cpu_kernels.bf16_matmul(a, b).astype(jnp.bfloat16))
  t = cpu_kernels.bf16_transform(a[0], b, out_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(t, cpu_kernels.bf16_transform(a[0], b).astype(jnp.bfloat16))
  # gradients come in the operands' dtypes, bf16 ones rounded once from the float32 sums
  ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(3), (2, 6, 5))
  ga, gb = jax.grad(lambda a, b: jnp.sum(ct * cpu_kernels.bf16_matmul(
      a, b, out_dtype=jnp.bfloat16)), (0, 1))(ab, bb)
  ra, rb = jax.grad(lambda a, b: jnp.sum(ct * cpu_kernels.bf16_matmul(a, b)), (0, 1))(
      ab.astype(jnp.float32), bb.astype(jnp.float32))
  assert ga.dtype == gb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(ga, ra.astype(jnp.bfloat16))
  np.testing.assert_array_equal(gb, rb.astype(jnp.bfloat16))
  gt = jax.grad(lambda b: jnp.sum(ct * cpu_kernels.bf16_transform(a[0], b)))(bb)
  assert gt.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="out_dtype"):
    cpu_kernels.bf16_matmul(a, b, out_dtype=jnp.float16)


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


@pytest.mark.slow
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


def _conv_ref(x, w):
  """The naive reference: operands rounded to bf16, 'valid' correlation in float64."""
  x64 = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  w64 = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  kh, kw = w64.shape[:2]
  ho, wo = x64.shape[1] - kh + 1, x64.shape[2] - kw + 1
  out = np.zeros((x64.shape[0], ho, wo, w64.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,co->bhwo", x64[:, i:i + ho, j:j + wo], w64[i, j])
  return out


@pytest.mark.parametrize("c", [1, 3])
def test_bf16_conv2d_matches_rounded_reference(c):
  x = jax.random.normal(jax.random.key(0), (2, 11, 9, c))
  w = jax.random.normal(jax.random.key(1), (4, 3, c, 5))
  out = jax.jit(cpu_kernels.bf16_conv2d)(x, w)
  assert out.dtype == jnp.float32 and out.shape == (2, 8, 7, 5)
  ref = _conv_ref(x, w)
  # float32 sums rounded once to bf16: within half a bf16 ulp (2^-9 relative) of the sum
  np.testing.assert_allclose(out, ref, rtol=2 ** -8, atol=1e-4)
  assert float(np.abs(out - ref).max()) > 0  # the output is rounded to bf16


@pytest.mark.slow
@pytest.mark.parametrize("c", [1, 2])  # 1: the widened one-channel primitive
def test_bf16_conv2d_grads_match_float32_grads(c):
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, c))
  w = jax.random.normal(jax.random.key(1), (5, 4, c, 6))
  ct = jax.random.normal(jax.random.key(2), (2, 8, 7, 6))
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  got = jax.jit(jax.grad(lambda x, w: jnp.sum(ct * cpu_kernels.bf16_conv2d(x, w)), (0, 1)))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(ct * conv(x, w)), (0, 1))(x, w)
  for g, r in zip(got, ref):  # bf16 tolerance: 2^-8 relative per operand
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-2 * float(jnp.abs(r).max()))


def test_bf16_conv2d_rejects_bad_shapes():
  with pytest.raises(ValueError, match="x and w"):
    cpu_kernels.bf16_conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)))
  with pytest.raises(ValueError, match="x and w"):
    cpu_kernels.bf16_conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((5, 3, 1, 2)))


def _unfused_block(x, w, b):
  y = jax.nn.relu(cpu_kernels.bf16_conv2d(x, w) + b[None, None, None])
  n, h, wd, o = y.shape
  return y.reshape(n, h // 2, 2, wd // 2, 2, o).max(axis=(2, 4))


@pytest.mark.parametrize("n,c", [(1, 1), (9, 1), (3, 2)])  # 9: two chunks and a short one
def test_bf16_conv_relu_pool_equals_the_unfused_block(n, c):
  x = jax.random.normal(jax.random.key(0), (n, 13, 10, c))
  w = jax.random.normal(jax.random.key(1), (4, 3, c, 5))
  b = jax.random.normal(jax.random.key(2), (5,))
  out = jax.jit(cpu_kernels.bf16_conv_relu_pool)(x, w, b)
  assert out.dtype == jnp.float32 and out.shape == (n, 5, 4, 5)
  conv = _conv_ref(x, w)  # naive float64 reference
  # bias and ReLU commute with the max: the unfused block's numbers, up to one bf16 ulp
  # of the convolution (a chunk's float32 sums may be accumulated in another order)
  np.testing.assert_allclose(out, jax.jit(_unfused_block)(x, w, b), rtol=0,
                             atol=2 ** -7 * float(np.abs(conv).max()))
  ref = np.maximum(conv + np.asarray(b, np.float64), 0).reshape(n, 5, 2, 4, 2, 5).max((2, 4))
  # the convolution is rounded to bf16 (half an ulp: 2^-8 relative) before the bias
  np.testing.assert_allclose(out, ref, rtol=0, atol=2 ** -8 * float(np.abs(conv).max()))


# One channel: the convolution formed again (9: two chunks and a short one); two: kept.
@pytest.mark.parametrize("n,c", [(9, 1), (3, 2)])
def test_bf16_conv_relu_pool_grads_are_the_unfused_blocks(n, c):
  # Inputs on a coarse grid, so that pooled blocks have exactly tied maxima.
  x = jnp.round(jax.random.uniform(jax.random.key(0), (n, 13, 10, c)) * 2) / 2
  w = jnp.round(jax.random.normal(jax.random.key(1), (4, 3, c, 5)) * 2) / 4
  b = jnp.array([-0.5, 0.0, 0.25, 0.5, 1.0])
  ct = jax.random.normal(jax.random.key(3), (n, 5, 4, 5))
  y = _unfused_block(x, w, b)
  full = jax.nn.relu(cpu_kernels.bf16_conv2d(x, w) + b[None, None, None])
  ties = (full.reshape(n, 5, 2, 4, 2, 5) == y[:, :, None, :, None]).sum((2, 4))
  assert int(((ties > 1) & (y > 0)).sum()) > 0  # the test covers split gradients
  f = lambda x, w, b: jnp.sum(ct * cpu_kernels.bf16_conv_relu_pool(x, w, b))  # noqa: E731
  r = lambda x, w, b: jnp.sum(ct * _unfused_block(x, w, b))  # noqa: E731
  got = jax.jit(jax.grad(f, (0, 1, 2)))(x, w, b)
  ref = jax.jit(jax.grad(r, (0, 1, 2)))(x, w, b)
  for g, rr in zip(got, ref):  # the same sums, in float32, in another order
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, rr, rtol=1e-5, atol=1e-5 * float(jnp.abs(rr).max()))
  assert float(jnp.abs(got[1]).max()) > 0


def test_bf16_conv_relu_pool_rejects_bad_shapes():
  x, w = jnp.ones((1, 13, 10, 1)), jnp.ones((4, 3, 1, 5))
  with pytest.raises(ValueError, match="even"):
    cpu_kernels.bf16_conv_relu_pool(jnp.ones((1, 12, 10, 1)), w, jnp.zeros(5))
  with pytest.raises(ValueError, match="b must"):
    cpu_kernels.bf16_conv_relu_pool(x, w, jnp.zeros(4))
  with pytest.raises(ValueError, match="x and w"):
    cpu_kernels.bf16_conv_relu_pool(x, jnp.ones((4, 3, 2, 5)), jnp.zeros(5))


@onednn
def test_bf16_conv_relu_pool_is_fused_both_ways():
  x = jax.random.normal(jax.random.key(0), (2, 13, 10, 1))
  w = jax.random.normal(jax.random.key(1), (4, 3, 1, 5))
  b = jnp.zeros(5)
  fwd = jax.jit(cpu_kernels.bf16_conv_relu_pool).lower(x, w, b).as_text()
  assert "siamjax_onednn_conv_relu_pool_bf16" in fwd
  assert "siamjax_onednn_conv_bf16" not in fwd
  grad = jax.jit(jax.value_and_grad(
      lambda w: jnp.sum(cpu_kernels.bf16_conv_relu_pool(x, w, b) ** 2)))
  hlo = grad.lower(w).compile().as_text()
  assert "siamjax_onednn_conv_relu_pool_bf16" in hlo
  assert "siamjax_onednn_conv_relu_pool_bwd_bf16" in hlo
  # the unfused layer, there for the input gradient, is removed when that is unused
  assert "siamjax_onednn_conv_bf16" not in hlo and " convolution(" not in hlo


@onednn
def test_dense_rounds_float32_weights_inside_the_call_only_when_not_differentiated():
  x = jax.random.normal(jax.random.key(0), (3, 20))
  w = jax.random.normal(jax.random.key(1), (20, 300))  # two column blocks, a short one
  dims = (((1,), (0,)), ((), ()))
  dense = jax.jit(lambda x, w: cpu_kernels.dense_dot_general(x, w, dims))
  assert "siamjax_onednn_dense_f32_weights_bf16" in dense.lower(x, w).as_text()
  np.testing.assert_allclose(dense(x, w), cpu_kernels.bf16_matmul(x[None], w[None])[0],
                             rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(cpu_kernels.dense_dot_general(x, w, dims))))
  hlo = grad.lower(w).as_text()
  assert "siamjax_onednn_dense_f32_weights_bf16" not in hlo
  assert "siamjax_onednn_matmul_bf16" in hlo


@pytest.mark.slow
def test_koch_bf16_parameters_are_the_float32_nets():
  x = jnp.zeros((1, 105, 105, 1))
  got = jax.jit(Koch(dtype=jnp.bfloat16).init)(jax.random.key(1), x)
  ref = jax.jit(Koch().init)(jax.random.key(1), x)
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(g, r)


def test_conv_general_dilated_routes_only_valid_unit_stride_convs():
  x = jax.random.normal(jax.random.key(0), (1, 9, 9, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  out = cpu_kernels.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)
  np.testing.assert_allclose(out, _conv_ref(x, w), rtol=2 ** -8, atol=1e-4)
  strided = cpu_kernels.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=dn)
  np.testing.assert_array_equal(strided, jax.lax.conv_general_dilated(
      x, w, (2, 2), "VALID", dimension_numbers=dn))


def test_bf16_transform_matches_reference_and_has_no_matrix_gradient():
  a = jax.random.normal(jax.random.key(0), (6, 7))
  b = jax.random.normal(jax.random.key(1), (3, 7, 4))
  out = jax.jit(cpu_kernels.bf16_transform)(a, b)
  np.testing.assert_allclose(out, _bf16_ref(jnp.broadcast_to(a, (3, 6, 7)), b),
                             rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(2), (3, 6, 4))
  ga, gb = jax.grad(lambda a, b: jnp.sum(ct * cpu_kernels.bf16_transform(a, b)), (0, 1))(a, b)
  np.testing.assert_array_equal(ga, 0.0)
  rb = jnp.einsum("mk,gmn->gkn", a, ct)
  np.testing.assert_allclose(gb, rb, rtol=0, atol=2e-2 * float(jnp.abs(rb).max()))
  with pytest.raises(ValueError, match="a and b"):
    cpu_kernels.bf16_transform(jnp.ones((6, 5)), b)


@pytest.mark.slow
@pytest.mark.parametrize("shape,mean", [((2, 14, 12, 8, 4, 3, 6), 0.0),
                                        ((3, 9, 9, 4, 4, 4, 5), 0.0),
                                        ((2, 14, 12, 8, 4, 3, 6), 20.0)])
def test_dft_conv2d_bf16_transforms_error_bound(shape, mean):
  b, h, wd, c, kh, kw, o = shape
  # mean=20: a large positive mean (post-ReLU inputs), which the centring takes out
  x = mean + jax.random.normal(jax.random.key(0), (b, h, wd, c))
  w = jax.random.normal(jax.random.key(1), (kh, kw, c, o))
  ct = jax.random.normal(jax.random.key(2), (b, h - kh + 1, wd - kw + 1, o))
  f = lambda tr: lambda x, w: fourier.dft_conv2d(  # noqa: E731
      x, w, products="bf16", transforms=tr)
  ref = fourier.dft_conv2d(x, w)
  out = jax.jit(f("bf16"))(x, w)
  assert out.dtype == jnp.float32 and out.shape == ref.shape

  def rel(a, r):  # rms error relative to the rms of the reference
    return float(jnp.sqrt(jnp.mean((a - r) ** 2) / jnp.mean(r ** 2)))

  # Measured 4.6e-3 .. 5.4e-3 on Koch's conv2 .. conv4 (2.3e-3 with float32 transforms):
  # five bf16 roundings (two transforms in, the product, two out) of ~2^-9 each.
  assert rel(out, ref) < 1.2e-2
  assert rel(out, ref) > 1e-4  # it did round: the bf16 path ran
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(ct * f("bf16")(x, w)), (0, 1)))(x, w)
  refs = jax.grad(lambda x, w: jnp.sum(ct * fourier.dft_conv2d(x, w)), (0, 1))(x, w)
  for g, r in zip(grads, refs):
    assert rel(g, r) < 1.2e-2


def test_dft_conv2d_transforms_argument_checks():
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match="transforms"):
    fourier.dft_conv2d(x, w, transforms="fp8")
  with pytest.raises(ValueError, match="transforms"):
    fourier.dft_conv2d(x, w, transforms="bf16")


@onednn
def test_onednn_conv_custom_calls_and_unused_input_gradient_is_dropped():
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, 1))
  w = jax.random.normal(jax.random.key(1), (5, 4, 1, 6))
  ct = jnp.ones((2, 8, 7, 6))
  fwd = jax.jit(cpu_kernels.bf16_conv2d).lower(x, w).as_text()
  assert "siamjax_onednn_conv_bf16" in fwd
  wgrad = jax.jit(lambda x, w: jax.vjp(lambda w: cpu_kernels.bf16_conv2d(x, w), w)[1](ct))
  hlo = wgrad.lower(x, w).compile().as_text()
  assert "siamjax_onednn_conv_bwd_weights_bf16" in hlo
  assert " convolution(" not in hlo  # XLA's input-gradient convolution was removed
  x2 = jax.random.normal(jax.random.key(2), (2, 12, 10, 3))
  w2 = jax.random.normal(jax.random.key(3), (5, 4, 3, 6))
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(ct * cpu_kernels.bf16_conv2d(x, w)), (0, 1)))
  hlo = both.lower(x2, w2).compile().as_text()
  assert "siamjax_onednn_conv_bwd_data_bf16" in hlo  # the input gradient on oneDNN too
  assert " convolution(" not in hlo
  wgrad = jax.jit(lambda x, w: jax.vjp(lambda w: cpu_kernels.bf16_conv2d(x, w), w)[1](ct))
  assert "siamjax_onednn_conv_bwd_data_bf16" not in wgrad.lower(x2, w2).compile().as_text()


@onednn
def test_onednn_route_runs_the_custom_call():
  a, b = _operands()
  hlo = jax.jit(cpu_kernels.bf16_matmul).lower(a, b).as_text()
  assert "siamjax_onednn_matmul_bf16" in hlo
  amx = cpu_kernels.onednn_amx()  # oneDNN's direct convolutions on AMX
  assert not amx or "amx_bf16" in machine.cpu_isa()  # AMX where the CPU has it
  assert Koch(dtype=jnp.bfloat16).route() == ("direct" if amx else "dft") + "+onednn-bf16"
  assert Koch(dtype=jnp.bfloat16, conv="dft").route() == "dft+onednn-bf16"


@pytest.mark.slow
def test_koch_bf16_route_and_float32_agreement():
  net = Koch(dtype=jnp.bfloat16)
  assert net.route() == (net.conv_impl() + "+onednn-bf16" if ROUTE == "onednn-bf16"
                         else "direct")
  x = jax.random.uniform(jax.random.key(0), (2, 105, 105, 1))
  params = jax.jit(Koch().init)(jax.random.key(1), x)
  ref = jax.jit(Koch().apply)(params, x)
  err = jnp.abs(jax.jit(net.apply)(params, x).astype(jnp.float32) - ref)
  direct = jnp.abs(jax.jit(Koch(dtype=jnp.bfloat16, conv="direct").apply)(params, x) - ref)
  # bf16 tolerance: the sigmoid outputs of bf16 towers differ from float32 by ~1e-3 on
  # average (measured 1.3e-3 direct, 1.5e-3 dft; the largest 0.023 / 0.035)
  assert float(err.mean()) < 1.5 * float(direct.mean()) + 1e-4
  assert float(err.max()) < 5e-2


_GRAD_ERRORS = """
import json, sys
import jax, jax.numpy as jnp
from siamjax.encoders import Koch
x = jax.random.uniform(jax.random.key(0), (2, 105, 105, 1))
params = jax.jit(Koch().init)(jax.random.key(1), x)
ct = jax.random.normal(jax.random.key(2), (2, 4096))
grads = lambda net: jax.jit(jax.grad(
    lambda p: jnp.sum(ct * net.apply(p, x).astype(jnp.float32))))(params)
ref = grads(Koch())
out = {}
for conv in sys.argv[1:]:
  got = grads(Koch(dtype=jnp.bfloat16, conv=conv))
  out[conv] = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
               for (k, g), r in zip(jax.tree_util.tree_leaves_with_path(got),
                                    jax.tree.leaves(ref))}
print(json.dumps(out))
"""


def _grad_errors(convs, onednn_off: bool) -> dict:
  """Per layer: the norm of a bf16 tower's gradient error over the float32 gradient's."""
  env = {**os.environ, "SIAMJAX_ONEDNN": "0"} if onednn_off else dict(os.environ)
  done = subprocess.run([sys.executable, "-c", _GRAD_ERRORS, *convs], env=env, text=True,
                        capture_output=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@onednn
def test_koch_bf16_route_gradients_match_float32():
  # The yardstick: XLA's direct bf16 tower (the route off), in its own process.
  xla = _grad_errors(["direct"], onednn_off=True)["direct"]
  got = _grad_errors(["direct", "dft"], onednn_off=False)
  for conv, errors in got.items():
    assert errors.keys() == xla.keys()
    for layer, err in errors.items():  # bf16 towers: 1e-2 to 3e-2, conv1's kernel 0.2-0.3
      assert err < max(3 * xla[layer], 2e-2), (conv, layer, err, xla[layer])


def test_disabled_route_is_xla():
  code = ("import jax.numpy as jnp; from siamjax import cpu_kernels; "
          "from siamjax.encoders import Koch; "
          "print(cpu_kernels.matmul_route(), Koch(dtype=jnp.bfloat16).route())")
  env = dict(os.environ, SIAMJAX_ONEDNN="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["xla", "direct"]


def test_command_line_route_runs_one_copy_of_the_module():
  """``python -m siamjax.cpu_kernels`` runs the package's ``__main__``: no second copy of
  the module (runpy's RuntimeWarning, an error here) and the same route as an import."""
  env = dict(os.environ, SIAMJAX_ONEDNN="0")
  out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                        "siamjax.cpu_kernels", "route"], env=env, capture_output=True,
                       text=True, check=True)
  lines = out.stdout.splitlines()
  assert lines == ["xla", "why not oneDNN: SIAMJAX_ONEDNN=0"] and "Warning" not in out.stderr


def test_route_info_says_what_runs_and_why():
  info = cpu_kernels.route_info()
  assert info["route"] == ROUTE and info["backend"] == jax.default_backend()
  if ROUTE == "onednn-bf16":
    assert info["library"] and os.path.exists(info["library"]) and info["reason"] is None
  else:
    assert info["library"] is None and info["reason"]


def test_no_compiler_falls_back_in_one_line(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("SIAMJAX_ONEDNN", raising=False)
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++
  monkeypatch.setattr(_library, "_state", {})
  monkeypatch.setattr(_library, "_cpu_has_bf16", lambda: True)
  monkeypatch.setattr(_library, "_onednn_prefix", lambda prefix=None: str(tmp_path))
  monkeypatch.setattr(_library, "_libdnnl", lambda prefix: (str(tmp_path), "libdnnl.so.3"))
  assert _library._load() is None and cpu_kernels.matmul_route() == "xla"
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "bf16 runs on XLA" in err[0] and "C++ compiler" in err[0]
  assert cpu_kernels.route_info()["reason"] == "no C++ compiler was found to build its kernel"
  cpu_kernels.matmul_route()
  assert capsys.readouterr().err == ""  # once per process


def test_onednn_is_a_dependency_of_the_plain_install_on_x86_64_linux():
  import tomllib

  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"),
            "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  marker = "platform_system == 'Linux' and platform_machine == 'x86_64'"
  for name in ("onednn-cpu-gomp", "onednn-devel-cpu-gomp"):
    assert any(d.startswith(name) and d.endswith(marker) for d in deps), name


def test_build_without_onednn_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="oneDNN headers"):
    cpu_kernels.build(str(tmp_path))


def _fake_onednn(root, name):
  prefix = root / name
  (prefix / "include" / "oneapi" / "dnnl").mkdir(parents=True)
  (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").write_text("")
  (prefix / "lib").mkdir()
  (prefix / "lib" / "libdnnl.so.3").write_text("")
  return str(prefix)


class _FakeLib:  # what ctypes.CDLL returns, for the cache tests: the handler symbols
  SiamjaxOnednnMatmulBf16 = SiamjaxOnednnConvBf16 = SiamjaxOnednnConvBwdWeightsBf16 = 0
  SiamjaxOnednnMatmulBf16Out = SiamjaxOnednnConvReluPoolBf16 = 0
  SiamjaxOnednnDenseF32WeightsBf16 = SiamjaxOnednnConvBwdDataBf16 = 0
  SiamjaxOnednnConvReluPoolBwdBf16 = SiamjaxPoolReluBiasBf16 = SiamjaxPoolReluBiasBwdBf16 = 0


def test_each_onednn_gets_its_own_cached_library(monkeypatch, tmp_path):
  # The library records its oneDNN folder as run path: two virtual environments sharing
  # ~/.cache/siamjax must not overwrite each other's build (one did, in CI).
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path / "cache"))
  a, b = _fake_onednn(tmp_path, "a"), _fake_onednn(tmp_path, "b")
  pa, pb = cpu_kernels.library_path(a), cpu_kernels.library_path(b)
  assert pa != pb and os.path.dirname(pa) == str(tmp_path / "cache")
  assert cpu_kernels.library_path(a) == pa  # stable


def test_a_cached_library_that_no_longer_loads_is_rebuilt(monkeypatch, tmp_path):
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("SIAMJAX_ONEDNN", raising=False)
  monkeypatch.setattr(_library, "_state", {})
  monkeypatch.setattr(_library, "_cpu_has_bf16", lambda: True)
  broken = tmp_path / f"libsiamjax_onednn-{_library._source_tag()}-deadbeef.so"
  broken.write_text("its oneDNN was deleted")
  monkeypatch.setattr(_library, "library_path", lambda onednn=None: str(broken))

  built, registered = [], []

  def fake_cdll(path):
    if path == str(broken) and not built:
      raise OSError("libdnnl.so.3: cannot open shared object file")
    return _FakeLib()

  monkeypatch.setattr(_library.ctypes, "CDLL", fake_cdll)
  monkeypatch.setattr(_library, "build", lambda onednn=None: built.append(onednn) or str(broken))
  monkeypatch.setattr(jax.ffi, "pycapsule", lambda f: f)
  monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *a, **k: registered.append(a[0]))
  assert isinstance(_library._load(), _FakeLib)
  assert built == [None] and len(registered) == 10


def test_a_missing_library_is_built_on_first_use(monkeypatch, tmp_path):
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("SIAMJAX_ONEDNN", raising=False)
  monkeypatch.setattr(_library, "_state", {})
  monkeypatch.setattr(_library, "_cpu_has_bf16", lambda: True)
  monkeypatch.setattr(_library, "library_path", lambda onednn=None: str(tmp_path / "x.so"))

  built = []
  monkeypatch.setattr(_library.ctypes, "CDLL", lambda path: _FakeLib())
  monkeypatch.setattr(_library, "build", lambda onednn=None: built.append(onednn) or "b.so")
  monkeypatch.setattr(jax.ffi, "pycapsule", lambda f: f)
  monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *a, **k: None)
  assert isinstance(_library._load(), _FakeLib) and built == [None]


def test_an_unloadable_library_without_onednn_falls_back_and_says_why(monkeypatch, tmp_path):
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("SIAMJAX_ONEDNN", raising=False)
  monkeypatch.setattr(_library, "_state", {})
  monkeypatch.setattr(_library, "_cpu_has_bf16", lambda: True)
  (tmp_path / f"libsiamjax_onednn-{_library._source_tag()}-deadbeef.so").write_text("x")

  def no_onednn(prefix=None):
    raise FileNotFoundError("oneDNN headers not found")

  monkeypatch.setattr(_library, "_onednn_prefix", no_onednn)
  assert _library._load() is None
  assert "oneDNN headers not found" in _library._state["error"]
  assert _library._state["error"].count(";") >= 1  # the load error too
