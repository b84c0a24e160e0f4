"""Pair and triplet losses: given pairs, given triplets, and every pair of a batch.

:func:`contrastive_loss` and :func:`pair_bce_loss` take one value per pair ``[P]`` and
its 0/1 label; :func:`triplet_margin_loss` takes anchor, positive and negative
embeddings; :func:`all_pairs_contrastive_loss` forms every pair of a labelled batch on the
device (through the chunked engine of :mod:`siamjax.losses._chunked`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from siamjax import _checks
from siamjax import distances as _distances
from siamjax.losses._chunked import in_batch_doc, in_batch_inputs, map_anchor_chunks


def _pair_inputs(name: str, values, similar) -> tuple[jax.Array, jax.Array]:
  values = _checks.floating(name, values)
  _checks.rank(name, values, 1, "[P], one value per pair")
  _checks.nonempty(name, values)
  similar = _checks.as_array("similar", similar)
  _checks.rank("similar", similar, 1, "[P] 0/1 labels")
  _checks.same_shape(name, values, "similar", similar)
  return values, _checks.binary_labels("similar", similar, like=values)


def contrastive_loss(distance: jax.Array, similar: jax.Array, *, margin: float = 1.0) -> jax.Array:
  """Contrastive loss of Hadsell, Chopra & LeCun (2006), per pair.

  ``L = 1/2 y d^2 + 1/2 (1 - y) max(margin - d, 0)^2`` with ``y = 1`` for a same-class
  pair. Same-class pairs are pulled together; different-class pairs are pushed apart
  until they are ``margin`` away.

  Args:
    distance: ``[P]`` non-negative distances between the two embeddings of each pair,
      e.g. ``siamjax.distances.euclidean(h1, h2)``.
    similar: ``[P]`` labels, 1 (or True) for a same-class pair, 0 otherwise. For data
      labelled the other way round (``Y = 0`` for similar, as in the paper's own
      notation), pass ``1 - Y``.
    margin: radius beyond which different-class pairs cost nothing.

  Returns:
    ``[P]`` per-pair losses (see the module docstring for reduction).

  References:
    R. Hadsell, S. Chopra, Y. LeCun, "Dimensionality Reduction by Learning an
    Invariant Mapping", CVPR 2006, eq. (4) (written there with ``Y = 1 - similar``).

  >>> import jax.numpy as jnp
  >>> contrastive_loss(jnp.array([0.5, 0.5, 2.0]), jnp.array([1, 0, 0])).tolist()
  [0.125, 0.125, 0.0]
  """
  distance, y = _pair_inputs("distance", distance, similar)
  _checks.positive_scalar("margin", margin, allow_zero=True)
  push = jnp.maximum(margin - distance, 0.0)
  return 0.5 * y * jnp.square(distance) + 0.5 * (1.0 - y) * jnp.square(push)


def pair_bce_loss(logits: jax.Array, similar: jax.Array) -> jax.Array:
  """Sigmoid binary cross-entropy on pair logits (the Koch et al. 2015 head).

  Computed as ``max(x, 0) - x y + log1p(exp(-|x|))``, which is exact and finite for any
  finite logit (``|x|`` up to 1e4 and beyond) and equals
  ``optax.sigmoid_binary_cross_entropy``.

  Args:
    logits: ``[P]`` pre-sigmoid scores, e.g. ``siamjax.models.koch_siamese().apply(...)``.
    similar: ``[P]`` labels, 1 for a same-class pair, 0 otherwise.

  Returns:
    ``[P]`` per-pair losses.

  References:
    G. Koch, R. Zemel, R. Salakhutdinov, "Siamese Neural Networks for One-shot Image
    Recognition", ICML Deep Learning Workshop 2015, eq. (2).

  >>> import jax.numpy as jnp
  >>> [round(v, 4) for v in pair_bce_loss(jnp.array([0.0, 1e4, -1e4]), jnp.array([1, 1, 1])).tolist()]
  [0.6931, 0.0, 10000.0]
  """
  x, y = _pair_inputs("logits", logits, similar)
  return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def triplet_margin_loss(
    anchor: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    margin: float = 1.0,
    distance="euclidean",
) -> jax.Array:
  """Triplet margin loss ``max(d(a, p) - d(a, n) + margin, 0)``, per triplet.

  Args:
    anchor: ``[P, D]`` anchor embeddings.
    positive: ``[P, D]`` embeddings of the anchor's class.
    negative: ``[P, D]`` embeddings of another class.
    margin: the gap by which negatives must be farther than positives.
    distance: ``"euclidean"`` (default; finite gradients at zero distance, unlike
      ``optax.losses.triplet_margin_loss`` which adds ``eps`` inside the norm instead),
      ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``), the names the in-batch
      losses take, or a function ``(a, b) -> [P]`` such as
      ``siamjax.distances.euclidean``.

  Returns:
    ``[P]`` per-triplet losses.

  References:
    F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet", CVPR 2015;
    V. Balntas et al., "Learning local feature descriptors with triplets", BMVC 2016.

  >>> import jax.numpy as jnp
  >>> a = jnp.zeros((1, 2)); p = jnp.array([[0.0, 1.0]]); n = jnp.array([[0.0, 1.5]])
  >>> triplet_margin_loss(a, p, n).tolist()
  [0.5]
  """
  names = ("anchor", "positive", "negative")
  arrays = [_checks.floating(n, v) for n, v in zip(names, (anchor, positive, negative))]
  for n, v in zip(names, arrays):
    _checks.rank(n, v, 2, "[P, D] embeddings")
    _checks.nonempty(n, v)
  _checks.same_shape("anchor", arrays[0], "positive", arrays[1])
  _checks.same_shape("anchor", arrays[0], "negative", arrays[2])
  _checks.positive_scalar("margin", margin, allow_zero=True)
  a, p, n = arrays
  distance = _pair_distance(distance)
  return jnp.maximum(distance(a, p) - distance(a, n) + margin, 0.0)


_PAIR_DISTANCES = {"euclidean": _distances.euclidean,
                   "squared_euclidean": _distances.squared_euclidean,
                   "cosine": _distances.cosine_distance}


def _pair_distance(distance):
  """A distance name (as the in-batch losses take) or a callable, as a callable."""
  if isinstance(distance, str):
    if distance not in _PAIR_DISTANCES:
      raise ValueError("distance must be 'euclidean', 'squared_euclidean', 'cosine' or a "
                       f"function (a, b) -> [P], got {distance!r}")
    return _PAIR_DISTANCES[distance]
  if not callable(distance):
    raise ValueError(f"distance must be a name or a function (a, b) -> [P], got {distance!r}")
  return distance


@in_batch_doc
def all_pairs_contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """Contrastive loss over every pair in the batch, averaged per anchor.

  Each anchor's value is the mean of :func:`contrastive_loss` over its ``B - 1`` pairs
  with the other embeddings (same label = similar).

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    margin: contrastive margin.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses (0 for an anchor without partners; an anchor with only
    positives or only negatives still pays: ``valid_anchors(labels, need="any")``).
    Each pair's term is half the square of PML's ``ContrastiveLoss(pos_margin=0,
    neg_margin=margin)`` term.

  References:
    R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006.

  >>> import jax.numpy as jnp
  >>> all_pairs_contrastive_loss(jnp.array([[0.0], [0.5], [3.0]]), jnp.array([0, 0, 1])).tolist()
  [0.0625, 0.0625, 0.0]
  """
  emb, labels = in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def reduce(dist, pos, neg):
    y = pos.astype(dist.dtype)
    not_self = pos | neg
    per_pair = 0.5 * y * jnp.square(dist) + 0.5 * (1 - y) * jnp.square(
        jnp.maximum(margin - dist, 0.0))
    n = jnp.sum(not_self, axis=1)
    return jnp.sum(jnp.where(not_self, per_pair, 0.0), axis=1) / jnp.maximum(n, 1)

  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)
