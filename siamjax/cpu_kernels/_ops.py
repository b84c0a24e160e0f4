"""The oneDNN kernel's operations: bf16 products and convolutions with their own VJPs,
and the adapters that put them behind ``lax``'s signatures (see :mod:`siamjax.cpu_kernels`).

Each runs on oneDNN when :func:`~siamjax.cpu_kernels._library.matmul_route` is
``"onednn-bf16"`` and as the same XLA computation otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from siamjax.cpu_kernels._library import (CONV_BWD_DATA_TARGET, CONV_BWD_WEIGHTS_TARGET,
                                          CONV_RELU_POOL_BWD_TARGET, CONV_RELU_POOL_TARGET,
                                          POOL_RELU_BIAS_BWD_TARGET, POOL_RELU_BIAS_TARGET,
                                          CONV_TARGET, DENSE_TARGET, MATMUL_BF16_OUT_TARGET,
                                          MATMUL_TARGET, matmul_route)


def _ffi_matmul(a, b, trans_a: bool, trans_b: bool, out_dtype):
  g = max(a.shape[0], b.shape[0])
  m = a.shape[2] if trans_a else a.shape[1]
  n = b.shape[1] if trans_b else b.shape[2]
  bf16_out = jnp.dtype(out_dtype) == jnp.bfloat16
  out = jax.ShapeDtypeStruct((g, m, n), jnp.bfloat16 if bf16_out else jnp.float32)
  c = jax.ffi.ffi_call(MATMUL_BF16_OUT_TARGET if bf16_out else MATMUL_TARGET, out)(
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), trans_a=trans_a, trans_b=trans_b)
  return c.astype(out_dtype)


def _xla_matmul(a, b, trans_a: bool, trans_b: bool, out_dtype):
  eq = ("gkm" if trans_a else "gmk") + "," + ("gnk" if trans_b else "gkn") + "->gmn"
  return jnp.einsum(eq, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _mm(a, b, trans_a=False, trans_b=False, out_dtype=jnp.float32):
  """The product in float32 sums, returned as ``out_dtype`` (bf16: rounded once)."""
  impl = _ffi_matmul if matmul_route() == "onednn-bf16" else _xla_matmul
  return impl(a, b, trans_a, trans_b, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(a, b, out_dtype):
  return _mm(a, b, out_dtype=out_dtype)


def _fwd(a, b, out_dtype):
  return _mm(a, b, out_dtype=out_dtype), (a, b)


def _bwd(out_dtype, res, dc):
  a, b = res
  dc = dc.astype(jnp.bfloat16)
  da = _mm(dc, b, trans_b=True, out_dtype=a.dtype)  # [G, M, N] x [G, K, N]^T
  db = _mm(a, dc, trans_a=True, out_dtype=b.dtype)  # [G, M, K]^T x [G, M, N]
  return da, db


_bf16_matmul.defvjp(_fwd, _bwd)


def bf16_matmul(a: jax.Array, b: jax.Array, *, out_dtype=jnp.float32) -> jax.Array:
  """Batched ``a @ b`` with bf16 inputs and float32 accumulation and result.

  Both operands are rounded to bf16; the product, and the two products of its
  gradient, run on oneDNN when :func:`matmul_route` is ``"onednn-bf16"`` and as an XLA
  ``dot`` (``preferred_element_type=float32``) otherwise. Gradients are returned in the
  operands' dtypes (written in that dtype by the product itself).

  Args:
    a: ``[G, M, K]`` floating.
    b: ``[G, K, N]`` floating (same ``G``).
    out_dtype: the result's dtype: float32, or bf16 (the float32 sums rounded once, by
      oneDNN on its route: half the bytes written, for a result that is read as bf16
      next anyway).

  Returns:
    ``[G, M, N]`` in ``out_dtype``.

  Raises:
    ValueError: ranks or shapes that do not match.

  >>> import jax.numpy as jnp
  >>> bf16_matmul(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))).shape
  (2, 3, 5)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
    raise ValueError(f"a and b must be [G, M, K] and [G, K, N], got {a.shape} and {b.shape}")
  if not (jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
    raise ValueError(f"a and b must be floating, got {a.dtype} and {b.dtype}")
  return _bf16_matmul(a, b, _out_dtype(out_dtype))


def _out_dtype(out_dtype):
  dtype = jnp.dtype(out_dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
  return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_transform(a, b, out_dtype):
  return _mm(a, b, out_dtype=out_dtype)


def _transform_fwd(a, b, out_dtype):
  return _mm(a, b, out_dtype=out_dtype), (a, jnp.zeros((0,), b.dtype))  # b's dtype only


def _transform_bwd(out_dtype, res, dc):
  # ``a`` is a constant (a DFT matrix): its zero cotangent is dropped by XLA.
  a, b_dtype = res
  return jnp.zeros_like(a), _mm(a, dc.astype(jnp.bfloat16), trans_a=True,
                                out_dtype=b_dtype.dtype)


_bf16_transform.defvjp(_transform_fwd, _transform_bwd)


def bf16_transform(a: jax.Array, b: jax.Array, *, out_dtype=jnp.float32) -> jax.Array:
  """``a @ b[g]`` for every ``g``: one constant matrix applied to a batch, in bf16.

  As :func:`bf16_matmul` with ``a`` broadcast over the batch (one oneDNN product with a
  broadcast operand), but ``a`` is treated as a constant: its gradient is zero and only
  ``b``'s gradient product ``a^T @ dc`` is computed. Used by :mod:`siamjax.fourier` for
  the DFT transforms.

  Args:
    a: ``[M, K]`` floating (a constant such as a DFT matrix).
    b: ``[G, K, N]`` floating.
    out_dtype: float32 or bf16, as in :func:`bf16_matmul`.

  Returns:
    ``[G, M, N]`` in ``out_dtype``.

  Raises:
    ValueError: ranks or shapes that do not match.

  >>> import jax.numpy as jnp
  >>> bf16_transform(jnp.eye(3), jnp.ones((2, 3, 4))).shape
  (2, 3, 4)
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or b.ndim != 3 or a.shape[1] != b.shape[1]:
    raise ValueError(f"a and b must be [M, K] and [G, K, N], got {a.shape} and {b.shape}")
  if not (jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
    raise ValueError(f"a and b must be floating, got {a.dtype} and {b.dtype}")
  return _bf16_transform(lax.stop_gradient(a)[None], b, _out_dtype(out_dtype))


_NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w):
  return lax.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1),
                                  "VALID", dimension_numbers=_NHWC,
                                  preferred_element_type=jnp.float32)


def _xla_conv_rounded(x, w):  # the oneDNN route's forward: float32 sums rounded to bf16
  return _xla_conv(x, w).astype(jnp.bfloat16).astype(jnp.float32)


def _onednn_conv(x, w):  # bf16 [N, Ho, Wo, O]
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, wd - kw + 1, o), jnp.bfloat16)
  return jax.ffi.ffi_call(CONV_TARGET, out)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _conv(x, w):
  if matmul_route() != "onednn-bf16":
    return _xla_conv_rounded(x, w)
  return _onednn_conv(x, w).astype(jnp.float32)  # fuses into the consumer: stored as bf16


@jax.custom_vjp
def _bf16_conv2d(x, w):
  return _conv(x, w)


def _conv_fwd(x, w):
  return _conv(x, w), (x, w)


def _conv_bwd(res, dy):
  x, w = res
  return _conv_grads(x, w, dy)


def _conv_grads(x, w, dy):
  """The convolution's input and weight gradients from ``dy`` rounded to bf16."""
  xb = x.astype(jnp.bfloat16)
  if matmul_route() == "onednn-bf16":
    out = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    dw = jax.ffi.ffi_call(CONV_BWD_WEIGHTS_TARGET, out)(xb, dy.astype(jnp.bfloat16))
  else:
    dw = jax.vjp(lambda w: _xla_conv(xb, w), w.astype(jnp.bfloat16))[1](dy)[0]
  # The input gradient is removed by XLA's dead-code elimination when nothing uses it,
  # e.g. for a first layer whose input is the data (one channel: always XLA's).
  if matmul_route() == "onednn-bf16" and x.shape[3] > 1:
    dx = jax.ffi.ffi_call(CONV_BWD_DATA_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16))(
        w.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
  else:
    dx = jax.vjp(lambda x: _xla_conv(x, w.astype(jnp.bfloat16)), xb)[1](dy)[0]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_bf16_conv2d.defvjp(_conv_fwd, _conv_bwd)


def _check_valid_conv(x, w) -> None:
  """``x [B, H, W, C]`` and ``w [kh, kw, C, O]`` with the kernel fitting the input."""
  if x.ndim != 4 or w.ndim != 4 or w.shape[2] != x.shape[3] or w.shape[0] > x.shape[1] \
      or w.shape[1] > x.shape[2]:
    raise ValueError(f"x and w must be [B, H, W, C] and [kh, kw, C, O] with the kernel "
                     f"fitting the input, got {x.shape} and {w.shape}")


def bf16_conv2d(x: jax.Array, w: jax.Array) -> jax.Array:
  """'Valid', stride-1 2-D convolution (cross-correlation) in bf16 with float32 accumulation.

  ``lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO",
  "NHWC"))`` of ``x`` and ``w`` rounded to bf16, accumulated in float32 and rounded to
  bf16 once (as PyTorch's bf16 autocast convolutions), returned as float32 (the convert
  fuses into the consumer, so the stored output is bf16: half the memory traffic). The
  forward and the weight gradient run as oneDNN bf16 convolutions when
  :func:`matmul_route` is ``"onednn-bf16"`` (a one-channel input, such as a first layer
  on grey images, with each window's ``kw`` columns as ``kw`` channels: oneDNN's faster
  convolution kernel then applies), as XLA convolutions with
  ``preferred_element_type=float32`` otherwise. The weight gradient is accumulated in
  float32 from the bf16-rounded output gradient; the input gradient is XLA's (and is not
  computed when unused). Gradients are returned in the operands' dtypes.

  Args:
    x: ``[B, H, W, C]`` floating.
    w: ``[kh, kw, C, O]`` floating, ``kh <= H``, ``kw <= W``.

  Returns:
    ``[B, H - kh + 1, W - kw + 1, O]`` float32.

  Raises:
    ValueError: ranks or shapes that do not match.

  >>> import jax.numpy as jnp
  >>> bf16_conv2d(jnp.ones((2, 5, 6, 1)), jnp.ones((3, 3, 1, 4))).shape
  (2, 3, 4, 4)
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  _check_valid_conv(x, w)
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(w.dtype, jnp.floating)):
    raise ValueError(f"x and w must be floating, got {x.dtype} and {w.dtype}")
  return _bf16_conv2d(x, w)


def _conv_relu_pool_xla(x, w, b):  # what the training route computes
  from siamjax._pooling import max_pool2 as _max_pool2  # the encoders' pooling

  return _max_pool2(jax.nn.relu(bf16_conv2d(x, w) + b.astype(jnp.float32)[None, None, None]))


@jax.custom_vjp
def _conv_relu_pool(x, w, b):
  if matmul_route() != "onednn-bf16":
    return _conv_relu_pool_xla(x, w, b)
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  out = jax.ShapeDtypeStruct((n, (h - kh + 1) // 2, (wd - kw + 1) // 2, o), jnp.float32)
  return jax.ffi.ffi_call(CONV_RELU_POOL_TARGET, out)(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.float32))


def _conv_relu_pool_fwd(x, w, b):
  if matmul_route() != "onednn-bf16":
    return jax.vjp(_conv_relu_pool_xla, x, w, b)
  if x.shape[3] == 1:  # a first layer: its gradient forms the (cheap) convolution again
    return _conv_relu_pool(x, w, b), (x, w, b, None)
  conv = _onednn_conv(x, w)  # kept (bf16) for the gradient
  y = jax.ffi.ffi_call(POOL_RELU_BIAS_TARGET, jax.ShapeDtypeStruct(
      (x.shape[0], conv.shape[1] // 2, conv.shape[2] // 2, w.shape[3]), jnp.float32))(
          conv, b.astype(jnp.float32))
  return y, (x, w, b, conv)


def _conv_relu_pool_bwd(res, dy):
  if not isinstance(res, tuple):  # the unfused route's pullback
    return res(dy)
  x, w, b, conv = res
  dy = dy.astype(jnp.float32)
  if conv is not None:
    dconv, db = jax.ffi.ffi_call(POOL_RELU_BIAS_BWD_TARGET, (
        jax.ShapeDtypeStruct(conv.shape, jnp.bfloat16),
        jax.ShapeDtypeStruct(b.shape, jnp.float32)))(conv, b.astype(jnp.float32), dy)
    dx, dw = _conv_grads(x, w, dconv)
    return dx, dw, db.astype(b.dtype)
  out = (jax.ShapeDtypeStruct(w.shape, jnp.float32), jax.ShapeDtypeStruct(b.shape, jnp.float32))
  dw, db = jax.ffi.ffi_call(CONV_RELU_POOL_BWD_TARGET, out)(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.float32), dy)
  # The input gradient, through the unfused layer, is removed by XLA's dead-code
  # elimination when nothing uses it (a first layer whose input is the data).
  dx = jax.vjp(_conv_relu_pool_xla, x, w, b)[1](dy)[0]
  return dx, dw.astype(w.dtype), db.astype(b.dtype)


_conv_relu_pool.defvjp(_conv_relu_pool_fwd, _conv_relu_pool_bwd)


def bf16_conv_relu_pool(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """``max_pool_2x2(relu(bf16_conv2d(x, w) + b))``: a convolutional block, fused on oneDNN.

  A block of a convolutional tower: :func:`bf16_conv2d` (bf16 operands, float32 sums
  rounded once to bf16), a per-channel bias in float32, ReLU and 2x2 max-pooling with
  stride 2. Where :func:`matmul_route` is ``"onednn-bf16"``:

  - Not differentiated (inference): one FFI call convolves a few images at a time into a
    cache-sized bf16 buffer and pools from there, so the full-size convolution output
    (``[B, Ho, Wo, O]``) never goes to memory.
  - Differentiated (``jax.grad``, ``jax.vjp``; reverse mode only), with one input channel
    (a first layer on grey images): the same forward call, and a gradient call that forms
    the convolution again a few images at a time, sends each pooled gradient to its 2x2
    block's maximum (split evenly between exact ties; none where that maximum is not
    positive) and feeds that bf16 gradient to oneDNN's weight gradient, so again no
    full-size tensor goes to memory. With several channels the bf16 convolution output
    is kept for the gradient instead, which forms the block's gradient in one pass and
    runs oneDNN's weight and input gradients on it. The input gradient of a one-channel
    input is the unfused computation's, computed only when used.

  The result is the unfused computation's (the bias is per channel and ReLU monotone, so
  both commute with the max), up to one bf16 rounding of the convolution where a chunk's
  float32 sums are accumulated in another order than the whole batch's; the gradients
  are the unfused computation's up to the order of float32 sums. Elsewhere the unfused
  computation runs.

  Args:
    x: ``[B, H, W, C]`` floating.
    w: ``[kh, kw, C, O]`` floating, ``H - kh + 1`` and ``W - kw + 1`` even.
    b: ``[O]`` floating.

  Returns:
    ``[B, (H - kh + 1) / 2, (W - kw + 1) / 2, O]`` float32.

  Raises:
    ValueError: ranks or shapes that do not match.

  >>> import jax.numpy as jnp
  >>> bf16_conv_relu_pool(jnp.ones((2, 6, 7, 1)), jnp.ones((3, 4, 1, 5)),
  ...                     jnp.zeros(5)).shape
  (2, 2, 2, 5)
  """
  x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
  _check_valid_conv(x, w)
  if (x.shape[1] - w.shape[0] + 1) % 2 or (x.shape[2] - w.shape[1] + 1) % 2:
    raise ValueError(f"x and w: the convolution's output must have an even height and "
                     f"width for 2x2 pooling, got x {x.shape} and w {w.shape}")
  if b.shape != (w.shape[3],):
    raise ValueError(f"b must be [O] = [{w.shape[3]}], got {b.shape}")
  for name, v in (("x", x), ("w", w), ("b", b)):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating, got {v.dtype}")
  return _conv_relu_pool(x, w, b)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """:func:`bf16_conv2d` behind ``lax.conv_general_dilated``'s signature.

  For ``flax.linen.Conv(..., conv_general_dilated=...)``. The configurations
  :func:`bf16_conv2d` computes (2-D NHWC / HWIO, unit strides and dilations, 'VALID'
  padding, one group) go to it; any other call goes to ``lax.conv_general_dilated``
  unchanged. The result is in the operands' promoted dtype (or
  ``preferred_element_type``).
  """
  nhwc = dimension_numbers is not None and lax.conv_dimension_numbers(
      jnp.shape(lhs), jnp.shape(rhs), dimension_numbers) == lax.conv_dimension_numbers(
          jnp.shape(lhs), jnp.shape(rhs), _NHWC)
  valid = padding == "VALID" or (not isinstance(padding, str)
                                 and all(tuple(p) == (0, 0) for p in padding))
  ones = all(d is None or all(int(v) == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  if not (nhwc and valid and ones and tuple(window_strides) == (1, 1)
          and feature_group_count == 1 and batch_group_count == 1
          and jnp.issubdtype(dtype, jnp.floating)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  return bf16_conv2d(lhs, rhs).astype(preferred_element_type or dtype)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """``lax.dot_general`` for ``flax.linen.Dense(dot_general=...)`` as a bf16 product.

  Dense's contraction (``lhs [..., K] x rhs [K, N]``) of floating operands runs through
  :func:`bf16_matmul` (operands rounded to bf16, float32 accumulation) whatever their
  dtype; any other call goes to ``lax.dot_general`` unchanged. Not differentiated (in
  inference) on the oneDNN route, float32 weights are rounded to bf16 inside the call,
  a block of columns at a time, instead of as a separate bf16 copy (the same products, to
  float32 rounding). The result is in the operands' promoted dtype (or
  ``preferred_element_type``), as ``lax.dot_general``'s.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  dense = (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
           and rhs.ndim == 2)
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  if not dense or not jnp.issubdtype(dtype, jnp.floating):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  batch = lhs.shape[:-1]
  out = _dense(lhs.reshape(int(np.prod(batch)), lhs.shape[-1]), rhs)
  return out.reshape(*batch, rhs.shape[1]).astype(preferred_element_type or dtype)


@jax.custom_vjp
def _dense(x, w):
  """``bf16_matmul`` of ``[M, K] x [K, N]``; float32 ``w`` rounded inside oneDNN's call."""
  if matmul_route() != "onednn-bf16" or w.dtype != jnp.float32:
    return _bf16_matmul(x[None], w[None], jnp.dtype(jnp.float32))[0]
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(DENSE_TARGET, out)(x.astype(jnp.bfloat16), w)


def _dense_fwd(x, w):  # differentiated: bf16_matmul's VJP
  y, pullback = jax.vjp(lambda x, w: _bf16_matmul(x[None], w[None], jnp.dtype(jnp.float32))[0],
                        x, w)
  return y, pullback


_dense.defvjp(_dense_fwd, lambda pullback, dy: pullback(dy))
