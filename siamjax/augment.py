"""Image transforms on the device: Koch et al.'s random affine distortions and resizing.

* :func:`sample_affine` / :func:`affine_warp` / :func:`augment`: random affine
  distortions, warped with ``jax.scipy.ndimage.map_coordinates`` (bilinear).
* :func:`resize_images`: antialiased downsampling of uint8 images.
* :func:`translations`: every small integer shift of a batch (test-time augmentation).

All are pure functions of a ``jax.random`` key and arrays, so a jitted train step fuses
them with sampling and encoding (:mod:`siamjax.train`).

References:
  G. Koch, R. Zemel, R. Salakhutdinov, "Siamese Neural Networks for One-shot Image
  Recognition", ICML DL Workshop 2015, section 4.3 (affine distortions).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["AffineParams", "sample_affine", "affine_warp", "augment", "resize_images",
           "translations"]


class AffineParams(NamedTuple):
  """Per-image affine distortion ``[B]`` each: angle (degrees), shears, scales, shifts (px)."""

  theta: jax.Array
  shear_x: jax.Array
  shear_y: jax.Array
  scale_x: jax.Array
  scale_y: jax.Array
  shift_x: jax.Array
  shift_y: jax.Array


def sample_affine(key: jax.Array, batch: int, *, rotation: float = 10.0, shear: float = 0.3,
                  scale: tuple[float, float] = (0.8, 1.2), translation: float = 2.0,
                  prob: float = 0.5) -> AffineParams:
  """Koch et al.'s random affine distortion parameters.

  Each component (rotation in ``[-rotation, rotation]`` degrees, shears in
  ``[-shear, shear]``, scales in ``scale``, translations in ``[-translation,
  translation]`` pixels) is drawn uniformly and applied independently with probability
  ``prob`` (identity otherwise).

  Returns:
    :class:`AffineParams` of ``[batch]`` float32 arrays.
  """
  keys = jax.random.split(key, 14)

  def comp(i, lo, hi, identity):
    v = jax.random.uniform(keys[2 * i], (batch,), jnp.float32, lo, hi)
    on = jax.random.bernoulli(keys[2 * i + 1], prob, (batch,))
    return jnp.where(on, v, identity)

  return AffineParams(
      comp(0, -rotation, rotation, 0.0), comp(1, -shear, shear, 0.0),
      comp(2, -shear, shear, 0.0), comp(3, scale[0], scale[1], 1.0),
      comp(4, scale[0], scale[1], 1.0), comp(5, -translation, translation, 0.0),
      comp(6, -translation, translation, 0.0))


def affine_warp(images: jax.Array, params: AffineParams) -> jax.Array:
  """Applies ``params`` to ``[B, H, W]`` float images about their centre (bilinear, 0 fill).

  The forward map is ``p' = R(theta) Sh(shear) S(scale) (p - c) + c + t``; each output
  pixel samples the input at the inverse image of its coordinates.

  >>> import jax.numpy as jnp
  >>> x = jnp.zeros((1, 5, 5)).at[0, 2, 2].set(1.0)
  >>> p = AffineParams(*([jnp.zeros(1)] * 3 + [jnp.ones(1)] * 2 + [jnp.ones(1), jnp.zeros(1)]))
  >>> [int(v) for v in jnp.argwhere(affine_warp(x, p)[0] > 0.5)[0]]  # shifted right by 1
  [2, 3]
  """
  h, w = images.shape[-2:]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")

  def one(img, p):
    t = jnp.deg2rad(p.theta)
    rot = jnp.array([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])
    sh = jnp.array([[1.0, p.shear_x], [p.shear_y, 1.0]])
    sc = jnp.diag(jnp.stack([p.scale_x, p.scale_y]))
    inv = jnp.linalg.inv(rot @ sh @ sc)  # acts on (x, y)
    ox, oy = xs - cx - p.shift_x, ys - cy - p.shift_y
    src_x = inv[0, 0] * ox + inv[0, 1] * oy + cx
    src_y = inv[1, 0] * ox + inv[1, 1] * oy + cy
    return jax.scipy.ndimage.map_coordinates(img, [src_y, src_x], order=1, mode="constant",
                                             cval=0.0)

  return jax.vmap(one)(images, params)


def augment(key: jax.Array, images: jax.Array, **affine_kwargs) -> jax.Array:
  """Random Koch distortions of ``[B, H, W]`` float images (see :func:`sample_affine`)."""
  return affine_warp(images, sample_affine(key, images.shape[0], **affine_kwargs))


def resize_images(images: jax.Array, size: int) -> jax.Array:
  """Area-like (antialiased linear) downsampling of ``[..., H, W]`` uint8 images to ``size``.

  >>> import jax.numpy as jnp
  >>> resize_images(jnp.full((2, 105, 105), 255, jnp.uint8), 28).shape
  (2, 28, 28)
  """
  lead = images.shape[:-2]
  x = images.reshape((-1,) + images.shape[-2:]).astype(jnp.float32)
  x = jax.image.resize(x, (x.shape[0], size, size), method="linear", antialias=True)
  x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
  return x.reshape(lead + (size, size))


def translations(images: jax.Array, max_shift: int) -> jax.Array:
  """Every shift of ``[B, H, W, ...]`` images by ``-max_shift .. max_shift`` pixels per axis.

  Content moves ``dy`` rows down and ``dx`` columns right; what enters is 0 (background).
  Returns ``[(2 max_shift + 1) ** 2, B, H, W, ...]``, ordered ``(dy, dx)`` row-major from
  ``(-max_shift, -max_shift)``; copy ``(2 max_shift + 1) ** 2 // 2`` is the input.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(1, 10).reshape(1, 3, 3)
  >>> t = translations(x, 1)
  >>> t.shape, bool((t[4] == x).all())
  ((9, 1, 3, 3), True)
  >>> t[7, 0].tolist()  # dy = 1, dx = 0: one row down
  [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
  """
  if max_shift < 0 or max_shift >= min(images.shape[1:3]):
    raise ValueError(f"max_shift must be in [0, {min(images.shape[1:3])}) for images "
                     f"{images.shape}, got {max_shift}")
  s = max_shift
  h, w = images.shape[1:3]
  pad = [(0, 0), (s, s), (s, s)] + [(0, 0)] * (images.ndim - 3)
  padded = jnp.pad(images, pad)
  return jnp.stack([padded[:, s - dy:s - dy + h, s - dx:s - dx + w]
                    for dy in range(-s, s + 1) for dx in range(-s, s + 1)])
