"""Convolution in the Fourier domain, written as matrix products (fast Koch training on CPUs).

A 'valid', stride-1 2-D convolution ``y = x (*) w`` (cross-correlation, as in
``lax.conv_general_dilated`` and ``flax.linen.Conv``) equals, pointwise per frequency,
``Y = X . conj(W)`` once ``x`` and ``w`` are taken to the discrete Fourier domain of
``x``'s own size: a circular correlation of size ``H x W`` wraps only into the outputs
that a 'valid' convolution drops. :func:`dft_conv2d` computes it with four small real
DFT matrices (a real DFT along the width, a complex one along the height, and their
inverses restricted to the ``Ho x Wo`` valid outputs) and one product per frequency,
``[B, 2C] @ [2C, 2O]`` (complex numbers as real/imaginary blocks). Everything is an
``einsum``, so JAX differentiates it (the weight and input gradients are again
frequency-wise products) and XLA runs it on its matrix-multiplication kernels.

Why: the Koch et al. (2015) network spends 78% of its 1.82 GFLOP per image in conv2
(7x7, 64 -> 128 channels on 48x48 inputs). A direct convolution costs
``2 * Ho * Wo * kh * kw * C * O`` FLOPs; this one costs about
``2 * H * (W // 2 + 1) * 4 * C * O`` for the products plus ``O(H * W * (H + W))`` per
channel for the transforms (:func:`dft_conv2d_flops`): 0.20 GFLOP instead of 1.42 for
conv2, so a CPU that is already at its matmul peak on direct convolutions trains the
whole network about twice as fast (``benchmarks/``). Results equal the direct
convolution to float32 rounding (relative error about 1e-6), not bit for bit. On GPUs
cuDNN's convolutions are faster, so :class:`siamjax.encoders.Koch` uses this only on the
CPU, and only in float32 (``conv="auto"``).

>>> import jax, jax.numpy as jnp
>>> x = jax.random.normal(jax.random.key(0), (2, 12, 10, 3))
>>> w = jax.random.normal(jax.random.key(1), (3, 4, 3, 5))
>>> y = dft_conv2d(x, w)
>>> y.shape
(2, 10, 7, 5)
>>> ref = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
>>> bool(jnp.allclose(y, ref, atol=1e-4))
True
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from siamjax import _checks, cpu_kernels

__all__ = ["dft_conv2d", "conv_general_dilated", "dft_conv2d_flops", "direct_conv2d_flops"]


@functools.lru_cache(maxsize=64)
def _dft_matrices(h: int, w: int, kh: int, kw: int) -> tuple[np.ndarray, ...]:
  """Real matrices of the forward and inverse transforms (float64, cached per shape).

  Index ``r``/``s``/``t``/``u`` = 0 for the real part, 1 for the imaginary part.
  """
  kf = w // 2 + 1  # rfft bins along the width
  ho, wo = h - kh + 1, w - kw + 1
  theta = 2 * np.pi * np.outer(np.arange(w), np.arange(kf)) / w  # [W, Kf]
  phi = 2 * np.pi * np.outer(np.arange(h), np.arange(h)) / h  # [H, H]
  cos, sin = np.cos(phi), np.sin(phi)

  def rotate(c, s):  # complex multiply by exp(-i phi) acting on stacked (re, im)
    m = np.zeros((c.shape[0], 2, c.shape[1], 2))
    m[:, 0, :, 0], m[:, 1, :, 0], m[:, 0, :, 1], m[:, 1, :, 1] = c, s, -s, c
    return m

  # x: real DFT along W, then complex DFT (exp(-i.)) along H.
  fwd_w = np.stack([np.cos(theta), -np.sin(theta)], -1)  # [W, Kf, r]
  fwd_h = rotate(cos, sin)  # [H, r, H', s]
  # w: the conjugate spectrum (exp(+i.)), only its kh x kw nonzero rows.
  ker_w = np.stack([np.cos(theta[:kw]), np.sin(theta[:kw])], -1)  # [kw, Kf, r]
  ker_h = rotate(cos[:kh], -sin[:kh])  # [kh, r, H', s]
  # y: inverse (exp(+i.)) along H, then the real inverse along W, valid outputs only.
  inv_h = rotate(cos[:, :ho], -sin[:, :ho])  # [H', t, Ho, u]
  weight = np.full(kf, 2.0)
  weight[0] = 1.0
  if w % 2 == 0:
    weight[-1] = 1.0
  tj = 2 * np.pi * np.outer(np.arange(kf), np.arange(wo)) / w  # [Kf, Wo]
  inv_w = np.stack([weight[:, None] * np.cos(tj), -weight[:, None] * np.sin(tj)], 1) / (h * w)
  return fwd_w, fwd_h, ker_w, ker_h, inv_h, inv_w  # inv_w: [Kf, u, Wo]


def dft_conv2d(x: jax.Array, w: jax.Array, *, precision=None,
               products: str = "auto", transforms: str = "float32") -> jax.Array:
  """'Valid', stride-1 2-D convolution (cross-correlation) computed in the Fourier domain.

  Equal, up to floating-point rounding, to
  ``lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO",
  "NHWC"))``. Differentiable in both arguments (reverse and forward mode), jit- and
  vmap-compatible.

  Args:
    x: ``[B, H, W, C]`` floating inputs.
    w: ``[kh, kw, C, O]`` kernel with ``kh <= H``, ``kw <= W``.
    precision: passed to every ``einsum``; ``None`` means ``lax.Precision.HIGHEST``
      (float32 matrix products also on accelerators whose default is lower).
    products: ``"auto"`` (default): the frequency-wise products in the inputs' dtype,
      on oneDNN for bf16 inputs where :func:`siamjax.cpu_kernels.matmul_route` is
      ``"onednn-bf16"``; ``"bf16"``: always as bf16 x bf16 -> float32 products
      (:func:`siamjax.cpu_kernels.bf16_matmul`), the transforms staying in float32
      unless ``transforms="bf16"``.
    transforms: ``"float32"`` (default): the four DFT transforms of ``x`` and of the
      output as float32 ``einsum``s when the products are bf16 (else in the inputs'
      dtype); ``"bf16"`` (only with ``products="bf16"``): each as one bf16 x bf16 ->
      float32 product of a DFT matrix with the whole batch
      (:func:`siamjax.cpu_kernels.bf16_transform`, oneDNN on the ``"onednn-bf16"``
      route), which rounds each transform's input to bf16. ``x`` is centred per image
      and channel first (its mean's convolution is added back exactly), so that the
      large mean of post-ReLU inputs does not set the rounding error of every output.
      Relative output error about 5e-3 (rms, against 2.3e-3 with float32 transforms);
      Koch's conv2 trains faster this way on CPUs with bf16 matrix units
      (``benchmarks/results/cpu-amd-epyc-2core-profile.md``).

  Returns:
    ``[B, H - kh + 1, W - kw + 1, O]`` in the promoted dtype of ``x`` and ``w``.

  Raises:
    ValueError: non-floating inputs, wrong ranks, mismatched channels or a kernel larger
      than the input.
  """
  x, w = _checks.floating("x", x), _checks.floating("w", w)
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"x must be [B, H, W, C] and w [kh, kw, C, O], got shapes {x.shape} "
                     f"and {w.shape}")
  b, h, wd, c = x.shape
  kh, kw, c_w, o = w.shape
  if c_w != c:
    raise ValueError(f"w has {c_w} input channels but x has {c} (x {x.shape}, w {w.shape})")
  if kh > h or kw > wd or min(kh, kw) < 1:
    raise ValueError(f"kernel {kh}x{kw} must fit the {h}x{wd} input")
  if products not in ("auto", "bf16"):
    raise ValueError(f"products must be 'auto' or 'bf16', got {products!r}")
  if transforms not in ("float32", "bf16"):
    raise ValueError(f"transforms must be 'float32' or 'bf16', got {transforms!r}")
  if transforms == "bf16" and products != "bf16":
    raise ValueError("transforms='bf16' needs products='bf16'")
  dtype = jnp.promote_types(x.dtype, w.dtype)
  onednn = products == "bf16" or _onednn_products(dtype)
  out_dtype = dtype
  if onednn:  # transforms in float32 (XLA would upcast them anyway), products in bf16
    dtype = jnp.float32
  x, w = x.astype(dtype), w.astype(dtype)
  prec = lax.Precision.HIGHEST if precision is None else precision
  mats = _dft_matrices(h, wd, kh, kw)
  fwd_w, fwd_h, ker_w, ker_h, inv_h, inv_w = (jnp.asarray(m, dtype) for m in mats)
  kf = wd // 2 + 1
  ein = functools.partial(jnp.einsum, precision=prec)
  # Conjugate spectrum of w as the real block matrix [[re, im], [-im, re]] per frequency.
  w_f = ein("abco,bkr->akrco", w, ker_w)
  w_f = ein("akrco,args->gksco", w_f, ker_h)  # [H', Kf, s, C, O]
  re, im = w_f[:, :, 0], w_f[:, :, 1]
  blocks = jnp.stack([jnp.stack([re, im], 3), jnp.stack([-im, re], 3)], 2)  # [H',Kf,s,C,t,O]
  if transforms == "bf16":
    # Centred per image and channel: post-ReLU inputs have a large mean, whose bf16
    # rounding in the transforms would spread over every output; a constant input's
    # 'valid' convolution is that constant times the kernel's spatial sum, added exactly.
    mean = jnp.mean(x, (1, 2), keepdims=True)
    y = _bf16_transforms(x - mean, blocks.reshape(h * kf, 2 * c, 2 * o), mats, kh, kw)
    y = y + ein("bijc,co->bijo", mean, jnp.sum(w, (0, 1)))
    return y.astype(out_dtype)
  # Spectrum of x, laid out [H', Kf, B, (re|im) x C] for the frequency-wise products.
  x_f = ein("bhwc,wkr->bhkrc", x, fwd_w)
  x_f = ein("bhkrc,hrgs->gkbsc", x_f, fwd_h).reshape(h, kf, b, 2 * c)
  if onednn:  # bf16 x bf16 -> float32 on AVX512-BF16 / AMX
    y_f = cpu_kernels.bf16_matmul(x_f.reshape(h * kf, b, 2 * c),
                                  blocks.reshape(h * kf, 2 * c, 2 * o))
  else:
    y_f = ein("gkbx,gkxy->gkby", x_f, blocks.reshape(h, kf, 2 * c, 2 * o))
  y_f = y_f.reshape(h, kf, b, 2, o)
  y = ein("gkbto,gtiu->bikuo", y_f, inv_h)
  return ein("bikuo,kuj->bijo", y, inv_w).astype(out_dtype)


def _bf16_transforms(x, blocks, mats, kh: int, kw: int) -> jax.Array:
  """:func:`dft_conv2d` with every transform one bf16 product ``M @ X[g]`` over the batch.

  The layouts are chosen so that each transform contracts the middle axis of a
  ``[G, K, N]`` array with a constant ``[M, K]`` DFT matrix (rows reordered to match):
  no transposes but the two around the frequency-wise products.
  """
  b, h, wd, c = x.shape
  o = blocks.shape[-1] // 2
  kf, ho, wo = wd // 2 + 1, h - kh + 1, wd - kw + 1
  fwd_w, fwd_h, _, _, inv_h, inv_w = mats
  f32 = functools.partial(np.asarray, dtype=np.float32)
  fw = f32(fwd_w.transpose(2, 1, 0).reshape(2 * kf, wd))  # rows (r, k)
  fh = f32(fwd_h.transpose(2, 3, 0, 1).reshape(2 * h, 2 * h))  # rows (g, s), cols (h, r)
  ih = f32(inv_h.transpose(2, 3, 0, 1).reshape(2 * ho, 2 * h))  # rows (i, u), cols (g, t)
  iw = f32(inv_w.transpose(2, 1, 0).reshape(wo, 2 * kf))  # columns (u, k)
  # Every intermediate result is read as bf16 by the next product: written as bf16.
  mm = functools.partial(cpu_kernels.bf16_transform, out_dtype=jnp.bfloat16)
  x_f = mm(fw, x.reshape(b * h, wd, c))  # [B, H, r, Kf, C]
  x_f = mm(fh, x_f.reshape(b, 2 * h, kf * c))  # [B, H', s, Kf, C]
  x_f = x_f.reshape(b, h, 2, kf, c).transpose(1, 3, 0, 2, 4).reshape(h * kf, b, 2 * c)
  y_f = cpu_kernels.bf16_matmul(x_f, blocks, out_dtype=jnp.bfloat16)  # [H' Kf, B, t O]
  y_f = y_f.reshape(h, kf, b, 2, o).transpose(2, 0, 3, 1, 4).reshape(b, 2 * h, kf * o)
  y = mm(ih, y_f)  # [B, Ho, u, Kf, O]
  y = cpu_kernels.bf16_transform(iw, y.reshape(b * ho, 2 * kf, o))  # [B Ho, Wo, O] float32
  return y.reshape(b, ho, wo, o)


def _onednn_products(dtype) -> bool:
  """Whether the frequency-wise products of a ``dtype`` convolution go to oneDNN."""
  return jnp.dtype(dtype) == jnp.bfloat16 and cpu_kernels.matmul_route() == "onednn-bf16"


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *,
                         products: str = "auto", transforms: str = "float32") -> jax.Array:
  """:func:`dft_conv2d` behind ``lax.conv_general_dilated``'s signature.

  For ``flax.linen.Conv(..., conv_general_dilated=siamjax.fourier.conv_general_dilated)``:
  the layer keeps its parameters (``kernel``, ``bias``) and initialisers and computes its
  convolution in the Fourier domain. Only what :func:`dft_conv2d` computes is accepted:
  2-D, NHWC inputs with HWIO kernels, unit strides and dilations, 'VALID' (or all-zero)
  padding and one feature group.
  ``products`` and ``transforms`` go to :func:`dft_conv2d` (bind them with
  ``functools.partial``).

  Raises:
    ValueError: any other configuration, naming the offending argument.
  """
  if tuple(window_strides) != (1, 1):
    raise ValueError(f"window_strides must be (1, 1), got {tuple(window_strides)}")
  if not (padding == "VALID" or (not isinstance(padding, str)
                                 and all(tuple(p) == (0, 0) for p in padding))):
    raise ValueError(f"padding must be 'VALID', got {padding!r}")
  for name, d in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
    if d is not None and any(int(v) != 1 for v in d):
      raise ValueError(f"{name} must be 1, got {tuple(d)}")
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError("feature_group_count and batch_group_count must be 1, got "
                     f"{feature_group_count} and {batch_group_count}")
  nhwc = ("NHWC", "HWIO", "NHWC")
  if dimension_numbers is None:
    raise ValueError(f"dimension_numbers must be given as {nhwc}; lax's default (NCHW) "
                     "layout is not supported")
  shapes = (jnp.shape(lhs), jnp.shape(rhs))
  if lax.conv_dimension_numbers(*shapes, dimension_numbers) != lax.conv_dimension_numbers(
      *shapes, nhwc):
    raise ValueError(f"dimension_numbers must be {nhwc}, got {dimension_numbers}")
  y = dft_conv2d(lhs, rhs, precision=precision, products=products, transforms=transforms)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


def direct_conv2d_flops(h: int, w: int, kh: int, kw: int, c: int, o: int) -> int:
  """FLOPs (2 x multiply-adds) of one image through a direct 'valid' convolution.

  >>> direct_conv2d_flops(48, 48, 7, 7, 64, 128)  # Koch conv2
  1416167424
  """
  return 2 * (h - kh + 1) * (w - kw + 1) * kh * kw * c * o


def dft_conv2d_flops(h: int, w: int, kh: int, kw: int, c: int, o: int) -> int:
  """FLOPs per image of :func:`dft_conv2d` (products and the image-side transforms).

  The kernel's transform is done once per call, not per image, and is left out.

  >>> dft_conv2d_flops(48, 48, 7, 7, 64, 128)  # Koch conv2: 7x fewer than direct
  197068800
  """
  kf = w // 2 + 1
  ho, wo = h - kh + 1, w - kw + 1
  forward = c * (2 * h * w * 2 * kf + 2 * kf * (2 * h) * (2 * h))
  products = 2 * h * kf * (2 * c) * (2 * o)
  inverse = o * (2 * kf * (2 * h) * (2 * ho) + 2 * ho * (2 * kf) * wo)
  return forward + products + inverse
