"""On-device sampling of pairs and in-batch groups, and Koch's affine distortions.

Everything here is a pure function of a ``jax.random`` key and arrays that already live
on the device, so a jitted train step can fuse sampling, augmentation, encoding and the
update. Images are stored ``[C, D, H, W]`` (characters x drawers) as uint8.

* :func:`sample_pairs`: ``B`` pairs, the first half same-character (two distinct drawers),
  the rest different characters (from the same alphabet with ``within_alphabet=True``).
* :func:`sample_groups`: ``n_chars`` characters x ``n_per_char`` drawers for in-batch
  losses, the characters drawn ``chars_per_alphabet`` at a time from distinct alphabets
  so that negatives share an alphabet, as in Lake's test.
* :func:`sample_affine` / :func:`affine_warp` / :func:`augment`: Koch et al.'s random
  affine distortions, warped with ``jax.scipy.ndimage.map_coordinates`` (bilinear).

References:
  G. Koch, R. Zemel, R. Salakhutdinov, "Siamese Neural Networks for One-shot Image
  Recognition", ICML DL Workshop 2015, section 4.3 (affine distortions).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AlphabetTable", "alphabet_table", "sample_pairs", "sample_groups", "AffineParams",
    "sample_affine", "affine_warp", "augment", "resize_images",
]


class AlphabetTable(NamedTuple):
  """Characters of each alphabet: ``table [A, M]`` (padded with 0) and ``counts [A]``."""

  table: jax.Array
  counts: jax.Array


def alphabet_table(alphabet_ids, *, min_size: int = 1, name: str = "alphabet_ids"
                   ) -> AlphabetTable:
  """Builds an :class:`AlphabetTable` from ``[C]`` per-character alphabet ids (host side).

  Args:
    alphabet_ids: ``[C]`` integer alphabet id of each character.
    min_size: every alphabet must have at least this many characters.
    name: argument name used in errors.

  Returns:
    :class:`AlphabetTable` of device arrays; alphabets are numbered by sorted id.

  >>> alphabet_table([0, 1, 1, 0, 1]).table.tolist()
  [[0, 3, 0], [1, 2, 4]]
  """
  ids = np.asarray(alphabet_ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must be a non-empty [C] integer array, got {ids.dtype} {ids.shape}")
  groups = [np.flatnonzero(ids == a) for a in np.unique(ids)]
  small = min(len(g) for g in groups)
  if small < min_size:
    raise ValueError(f"{name}: an alphabet has {small} characters but {min_size} are needed")
  width = max(len(g) for g in groups)
  table = np.zeros((len(groups), width), np.int32)
  for i, g in enumerate(groups):
    table[i, :len(g)] = g
  return AlphabetTable(jnp.asarray(table), jnp.asarray([len(g) for g in groups], jnp.int32))


def _distinct(key, n_rows: int, pool: int, k: int, valid=None) -> jax.Array:
  """``[n_rows, k]`` distinct indices in ``[0, pool)`` (only ``< valid[row]`` if given)."""
  u = jax.random.uniform(key, (n_rows, pool))
  if valid is not None:
    u = jnp.where(jnp.arange(pool)[None, :] < valid[:, None], u, 2.0)
  return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)


def _drawer_ids(images, drawers):
  return jnp.asarray(np.arange(images.shape[1]) if drawers is None else np.asarray(drawers),
                     jnp.int32)


def sample_pairs(key: jax.Array, images: jax.Array, batch: int, *, drawers=None,
                 alphabets: AlphabetTable | None = None, within_alphabet: bool = False):
  """Draws ``batch`` image pairs, half of them same-character.

  Args:
    key: a ``jax.random`` key.
    images: ``[C, D, H, W]`` images (characters x drawers).
    batch: number of pairs ``B`` (even).
    drawers: drawer indices to draw from (e.g. Koch's 12 training drawers); default all.
    alphabets: needed when ``within_alphabet``.
    within_alphabet: draw each negative pair's two characters from one alphabet.

  Returns:
    ``(x1 [B, H, W], x2 [B, H, W], similar [B] float32)``: rows ``< B/2`` are positives
    (same character, distinct drawers), the rest negatives (distinct characters).
  """
  if batch < 2 or batch % 2:
    raise ValueError(f"batch must be even and >= 2, got {batch}")
  if within_alphabet and alphabets is None:
    raise ValueError("alphabets must be given when within_alphabet=True")
  half = batch // 2
  d_ids = _drawer_ids(images, drawers)
  k_pos, k_neg, k_draw = jax.random.split(key, 3)
  pos_c = jax.random.randint(k_pos, (half,), 0, images.shape[0])
  if within_alphabet:
    k_a, k_c = jax.random.split(k_neg)
    alph = jax.random.randint(k_a, (half,), 0, alphabets.table.shape[0])
    two = _distinct(k_c, half, alphabets.table.shape[1], 2, alphabets.counts[alph])
    neg = jnp.take_along_axis(alphabets.table[alph], two, axis=1)
    neg_c1, neg_c2 = neg[:, 0], neg[:, 1]
  else:
    k1, k2 = jax.random.split(k_neg)
    neg_c1 = jax.random.randint(k1, (half,), 0, images.shape[0])
    neg_c2 = (neg_c1 + jax.random.randint(k2, (half,), 1, images.shape[0])) % images.shape[0]
  draw = d_ids[_distinct(k_draw, batch, d_ids.shape[0], 2)]
  c1 = jnp.concatenate([pos_c, neg_c1])
  c2 = jnp.concatenate([pos_c, neg_c2])
  similar = jnp.concatenate([jnp.ones((half,), jnp.float32), jnp.zeros((half,), jnp.float32)])
  return images[c1, draw[:, 0]], images[c2, draw[:, 1]], similar


def sample_groups(key: jax.Array, images: jax.Array, n_chars: int, n_per_char: int, *,
                  drawers=None, alphabets: AlphabetTable | None = None,
                  chars_per_alphabet: int | None = None):
  """Draws ``n_chars`` distinct characters x ``n_per_char`` distinct drawers.

  Args:
    key: a ``jax.random`` key.
    images: ``[C, D, H, W]`` images.
    n_chars: characters per batch.
    n_per_char: drawers per character (2 gives one positive per anchor).
    drawers: drawer indices to draw from; default all.
    alphabets, chars_per_alphabet: when given, the characters come
      ``chars_per_alphabet`` at a time from ``n_chars / chars_per_alphabet`` distinct
      alphabets (every alphabet needs that many characters).

  Returns:
    ``(x [n_chars * n_per_char, H, W], labels [n_chars * n_per_char] int32)``, ordered
    character-major; labels are the character indices.
  """
  d_ids = _drawer_ids(images, drawers)
  if not 1 <= n_per_char <= d_ids.shape[0]:
    raise ValueError(f"n_per_char must be in [1, {d_ids.shape[0]}], got {n_per_char}")
  k_c, k_d = jax.random.split(key)
  if chars_per_alphabet is None:
    if n_chars > images.shape[0]:
      raise ValueError(f"n_chars={n_chars} exceeds the {images.shape[0]} characters")
    chars = _distinct(k_c, 1, images.shape[0], n_chars)[0]
  else:
    if alphabets is None:
      raise ValueError("alphabets must be given with chars_per_alphabet")
    if n_chars % chars_per_alphabet:
      raise ValueError(f"n_chars={n_chars} must be a multiple of "
                       f"chars_per_alphabet={chars_per_alphabet}")
    n_alph = n_chars // chars_per_alphabet
    if n_alph > alphabets.table.shape[0]:
      raise ValueError(f"n_chars / chars_per_alphabet = {n_alph} exceeds the "
                       f"{alphabets.table.shape[0]} alphabets")
    k_a, k_w = jax.random.split(k_c)
    alph = _distinct(k_a, 1, alphabets.table.shape[0], n_alph)[0]
    pick = _distinct(k_w, n_alph, alphabets.table.shape[1], chars_per_alphabet,
                     alphabets.counts[alph])
    chars = jnp.take_along_axis(alphabets.table[alph], pick, axis=1).reshape(-1)
  draw = d_ids[_distinct(k_d, n_chars, d_ids.shape[0], n_per_char)]
  x = images[chars[:, None], draw]
  labels = jnp.broadcast_to(chars[:, None], (n_chars, n_per_char))
  return x.reshape((-1,) + images.shape[2:]), labels.reshape(-1)


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
