"""Triplet mining over a batch: batch-all, batch-hard and semi-hard.

Batch-all and semi-hard mining answer each anchor's positives either directly, in a
fixed number of slots (:data:`POSITIVE_SLOTS`), or by sorting the anchor's negative
distances once and searching them; batch-hard picks two partners per anchor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax.losses._chunked import (
    first_row_index,
    in_batch_doc,
    in_batch_inputs,
    map_anchor_chunks,
    mined_distances,
    positive_counts,
)


def _order_keys(x):
  """Integer keys ordered as the floats ``x`` are (``-0.0`` and ``0.0`` share one).

  An integer sort is several times faster than a float one on XLA:CPU (its comparator is
  a plain ``<``, not the float total order), and searching integer keys gives the same
  counts as comparing the floats.
  """
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  int_t = jnp.int64 if x.dtype.itemsize == 8 else jnp.int32
  bits = jax.lax.bitcast_convert_type(x, int_t)
  return jnp.where(bits < 0, bits ^ jnp.iinfo(int_t).max, bits)


def _from_order_keys(keys, dtype):
  """The floats whose :func:`_order_keys` are ``keys``."""
  bits = jnp.where(keys < 0, keys ^ jnp.iinfo(keys.dtype).max, keys)
  return jax.lax.bitcast_convert_type(bits, dtype)


def _rowwise_searchsorted(sorted_CxB, query_CxQ, side):
  return jax.vmap(lambda s, q: jnp.searchsorted(s, q, side=side))(sorted_CxB, query_CxQ)


def _sorted_negatives(dist_CxB, neg_CxB):
  """Each row's negative distances as sorted :func:`_order_keys`, without a gradient.

  Non-negatives sort to the end (the largest key). Returns ``(sorted keys [C, B], keys of
  all the distances [C, B], rank [C, B], n_neg [C])``, where ``rank`` is, for every
  negative, the first sorted position holding its value (tied negatives share it). Only
  integers come out: the losses take their gradient through masked sums over the
  distances, so neither the sort nor its permutation is differentiated.
  """
  keys = _order_keys(jax.lax.stop_gradient(dist_CxB))
  sentinel = jnp.iinfo(keys.dtype).max
  keys_sorted = jax.lax.sort(jnp.where(neg_CxB, keys, sentinel), dimension=1)
  rank = _rowwise_searchsorted(keys_sorted, keys, "left")
  return keys_sorted, keys, rank, jnp.sum(neg_CxB, axis=1)


def _row_histogram(index_CxB, weight_CxB, n_bins: int):
  """``out[c, j]`` = sum of ``weight[c, i]`` over the ``i`` with ``index[c, i] == j``."""
  rows = jnp.arange(index_CxB.shape[0])[:, None]
  out = jnp.zeros((index_CxB.shape[0], n_bins), weight_CxB.dtype)
  return out.at[rows, index_CxB].add(weight_CxB, mode="drop")


def _max_positives(max_positives, labels, anchor_indices, valid, ref_labels, ref_valid,
                   ref_exclude):
  """Checks ``max_positives``; with concrete labels and masks, that no anchor has more."""
  if max_positives is None:
    return None
  max_positives = _checks.positive_int("max_positives", max_positives)
  most = _most_positives(labels, anchor_indices, valid, ref_labels, ref_valid, ref_exclude)
  if most is not None and most > max_positives:
    raise ValueError(f"max_positives={max_positives} but an anchor has {most} "
                     "positive partners; raise max_positives or leave it None")
  return max_positives


def _most_positives(labels, anchor_indices, valid, ref_labels, ref_valid, ref_exclude):
  """The largest positive count of any anchor (0 for none), or None when it is traced."""
  args = (labels, anchor_indices, valid, ref_labels, ref_valid, ref_exclude)
  if not all(x is None or _checks.is_concrete(x) for x in args):
    return None
  if ref_labels is None and (ref_valid is not None or ref_exclude is not None):
    return None  # a mistake that map_anchor_chunks' checks name
  kw = dict(valid=valid, ref_labels=ref_labels, ref_valid=ref_valid, ref_exclude=ref_exclude)
  with jax.ensure_compile_time_eval():  # concrete inside jit too (labels closed over)
    n_pos = np.asarray(positive_counts(labels, **kw))
    if anchor_indices is not None:
      n_pos = n_pos[np.asarray(_checks.anchor_rows(anchor_indices, n_pos.shape[0]))]
  return int(n_pos.max()) if n_pos.size else 0


POSITIVE_SLOTS = (4, 16)
"""Slot counts the mining losses choose from when ``max_positives`` is None.

Batch-all and semi-hard mining do ``O(P * B)`` direct work per anchor with ``P`` slots for
its positives, or sort its negatives when it has more than the largest; the direct work
costs less than the sort for few positives, and four slots less than sixteen
(``benchmarks/losses_per_sec.py`` times them).
"""


def _mining_reduce(reduce_direct, reduce_sorted, max_positives, labels, anchor_indices,
                   valid, ref_labels, ref_valid, ref_exclude):
  """The per-chunk reduction of a mining loss (private).

  ``reduce_direct(dist, pos, neg, slots)`` with an explicit (checked) ``max_positives``;
  otherwise the smallest of :data:`POSITIVE_SLOTS` that holds every anchor's positives,
  chosen on the host when the labels and masks are concrete and per chunk with
  ``lax.switch`` when they are traced, or ``reduce_sorted`` when none does.
  """
  if max_positives is not None:
    slots = _max_positives(max_positives, labels, anchor_indices, valid, ref_labels,
                           ref_valid, ref_exclude)
    return lambda dist, pos, neg: reduce_direct(dist, pos, neg, slots)
  branches = [(lambda dist, pos, neg, s=s: reduce_direct(dist, pos, neg, s))
              for s in POSITIVE_SLOTS] + [reduce_sorted]
  most = _most_positives(labels, anchor_indices, valid, ref_labels, ref_valid, ref_exclude)
  if most is not None:
    return branches[int(np.searchsorted(POSITIVE_SLOTS, most))]

  def with_row_gradient(branch, dist, pos, neg):
    # Each anchor's loss depends on its own row of dist only, so one VJP with unit
    # cotangents gives every row's gradient: the switch then runs on constants and is
    # never differentiated (a differentiated switch keeps every branch's residuals).
    out_C, vjp = jax.vjp(lambda d: branch(d, pos, neg), dist)
    return out_C, vjp(jnp.ones_like(out_C))[0]

  def reduce(dist, pos, neg):
    index = jnp.searchsorted(jnp.asarray(POSITIVE_SLOTS), jnp.max(jnp.sum(pos, axis=1)))
    d_sg = jax.lax.stop_gradient(dist)
    out_C, slope_CxR = jax.lax.switch(
        index, [functools.partial(with_row_gradient, b) for b in branches], d_sg, pos, neg)
    return out_C + jnp.sum(slope_CxR * (dist - d_sg), axis=1)
  return reduce


def _positives_by_slot(dist_CxR, pos_CxR, max_positives: int):
  """Each anchor's positive distances in ``max_positives`` slots (partner order).

  Returns ``(d_CxP, ok_CxP, too_many_C)``: slot ``p`` holds the distance of the anchor's
  ``p``-th positive (``ok`` False and 0 when it has fewer); ``too_many`` marks anchors with
  more positives than slots. Masked sums, no gather, so the gradient flows to ``dist``.
  """
  rank_CxR = jnp.cumsum(pos_CxR, axis=1) - 1
  slots = [pos_CxR & (rank_CxR == p) for p in range(max_positives)]
  d_CxP = jnp.stack([jnp.sum(jnp.where(m, dist_CxR, 0.0), axis=1) for m in slots], axis=1)
  ok_CxP = jnp.stack([jnp.any(m, axis=1) for m in slots], axis=1)
  return d_CxP, ok_CxP, jnp.sum(pos_CxR, axis=1) > max_positives


@in_batch_doc
def batch_all_triplet_loss(
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
    max_positives: int | None = None,
) -> jax.Array:
  """Batch-all triplet loss: every valid (anchor, positive, negative) in the batch.

  For each anchor ``a``, the mean of ``max(d(a, p) - d(a, n) + margin, 0)`` over all its
  positives ``p != a`` and negatives ``n``. The ``O(B^3)`` triplets are never built: with
  few positives (see ``max_positives``) each one is compared with every negative directly;
  otherwise each anchor's negative distances are sorted once (as integer keys) and binary
  searches count,
  for every positive, its active negatives (``d(a, n) < d(a, p) + margin``) and, for every
  negative, the positives it is active for; the loss is the sum of the distances weighted
  by these counts, which gives the same value and gradient.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    margin: triplet margin.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    {in_batch_args}
    {max_positives_arg}

  Returns:
    ``[B]`` per-anchor mean over that anchor's triplets (0 for anchors without any;
    ``valid_anchors(labels)``): the per-anchor mean of pytorch-metric-learning's
    ``TripletMarginLoss(margin, distance=LpDistance(normalize_embeddings=False))``
    triplet losses (``CosineSimilarity()`` for ``"cosine"``), with ``ref_emb`` too.

  References:
    A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv:1703.07737, 2017 (batch all, batch hard).

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.5], [1.0], [3.0]]); labels = jnp.array([0, 0, 1, 1])
  >>> batch_all_triplet_loss(emb, labels).tolist()
  [0.25, 0.5, 2.25, 0.25]
  """
  emb, labels = in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def reduce_direct(dist, pos, neg, slots):
    d_p, ok_p, too_many = _positives_by_slot(dist, pos, slots)
    total = sum(jnp.sum(jnp.where(neg & ok_p[:, p:p + 1],
                                  jnp.maximum(d_p[:, p:p + 1] + margin - dist, 0.0), 0.0),
                        axis=1) for p in range(slots))
    n_triplets = jnp.sum(ok_p, axis=1) * jnp.sum(neg, axis=1)
    out = jnp.where(n_triplets > 0, total / jnp.maximum(n_triplets, 1), 0.0)
    return jnp.where(too_many, jnp.nan, out)

  def reduce_sorted(dist, pos, neg):
    # sum over (p, n) of max(t_p - d_n, 0), t_p = d_p + margin, is
    # sum_p k_p t_p - sum_n w_n d_n with the integer counts k_p = #{n: d_n < t_p} and
    # w_n = #{p: t_p > d_n}, which are also the gradient's coefficients.
    keys_sorted, _, rank, n_neg = _sorted_negatives(dist, neg)
    threshold = dist + margin  # [C, B]: one query per candidate positive
    k = _rowwise_searchsorted(keys_sorted, _order_keys(jax.lax.stop_gradient(threshold)),
                              "left")
    k = jnp.where(pos, jnp.minimum(k, n_neg[:, None]), 0)
    n_pos = jnp.sum(pos, axis=1)
    hist = _row_histogram(k, pos.astype(jnp.int32), dist.shape[1] + 1)
    n_above = n_pos[:, None] - jnp.cumsum(hist, axis=1)  # [C, B + 1]: #{p: k_p > r}
    w = jnp.where(neg, jnp.take_along_axis(n_above, rank, axis=1), 0)
    total = (jnp.sum(jnp.where(pos, k.astype(dist.dtype) * threshold, 0.0), axis=1)
             - jnp.sum(jnp.where(neg, w.astype(dist.dtype) * dist, 0.0), axis=1))
    n_triplets = n_pos * n_neg
    return jnp.where(n_triplets > 0, total / jnp.maximum(n_triplets, 1), 0.0)

  reduce = _mining_reduce(reduce_direct, reduce_sorted, max_positives, labels,
                          anchor_indices, valid, ref_labels, ref_valid, ref_exclude)
  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@in_batch_doc
def batch_hard_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
    soft: bool = False,
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """Batch-hard triplet loss: each anchor's farthest positive against its closest negative.

  ``max(max_p d(a, p) - min_n d(a, n) + margin, 0)``, or with ``soft=True`` the soft
  margin ``log1p(exp(max_p d(a, p) - min_n d(a, n)))`` of Hermans et al.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    margin: triplet margin (ignored when ``soft``).
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    soft: use the soft-plus margin instead of the hinge.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses (0 for anchors without a positive or a negative;
    ``valid_anchors(labels)``), equal to PML's ``BatchHardMiner`` followed by
    ``TripletMarginLoss(margin)`` (``smooth_loss=True, margin=0`` for ``soft``), with
    ``ref_emb`` too. The two partners are mined on undifferentiated distances and their
    distances formed again directly, so the gradient reaches the two chosen rows only
    (the first of tied ones, as PML's ``max``/``min`` do) and costs no Gram product: loss
    and gradient cost one ``[B, D] x [D, B]`` product.

  References:
    A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv:1703.07737, 2017.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.5], [1.0], [3.0]]); labels = jnp.array([0, 0, 1, 1])
  >>> batch_hard_triplet_loss(emb, labels).tolist()
  [0.5, 1.0, 2.5, 0.5]
  """
  emb, labels = in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def select(dist, pos, neg):  # [C, 2]: the farthest positive, the closest negative
    found = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    far_p = first_row_index(pos, dist, "max")
    near_n = first_row_index(neg, dist, "min")
    return jnp.where(found[:, None], jnp.stack([far_p, near_n], axis=1), -1)

  dist_Ax2, found_Ax2 = mined_distances(select, distance, emb, labels, chunk_size,
                                         anchor_indices, valid, ref_embeddings, ref_labels,
                                         ref_valid, ref_exclude)
  found = found_Ax2[:, 0]
  gap = jnp.where(found, dist_Ax2[:, 0] - dist_Ax2[:, 1], 0.0)
  loss = jax.nn.softplus(gap) if soft else jnp.maximum(gap + margin, 0.0)
  return jnp.where(found, loss, 0.0)


@in_batch_doc
def semi_hard_triplet_loss(
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
    max_positives: int | None = None,
) -> jax.Array:
  """Semi-hard triplet loss (FaceNet's online mining).

  For every (anchor, positive) pair the negative is the closest one that is still
  farther than the positive (``d(a, n) > d(a, p)``); when there is none, the farthest
  negative is used (the rule of ``tfa.losses.TripletSemiHardLoss``). Each anchor's value
  is the mean of ``max(d(a, p) - d(a, n) + margin, 0)`` over its positives.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    margin: triplet margin.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    {in_batch_args}
    {max_positives_arg}

  Returns:
    ``[B]`` per-anchor losses (0 for anchors without a positive or a negative;
    ``valid_anchors(labels)``). pytorch-metric-learning has no equivalent (its
    ``TripletMarginMiner("semihard")`` keeps every semi-hard triplet).

  References:
    F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face
    Recognition and Clustering", CVPR 2015, section 3.2.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.5], [1.0], [3.0]]); labels = jnp.array([0, 0, 1, 1])
  >>> semi_hard_triplet_loss(emb, labels).tolist()
  [0.5, 0.0, 2.0, 0.5]
  """
  emb, labels = in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def reduce_direct(dist, pos, neg, slots):
    d_p, ok_p, too_many = _positives_by_slot(dist, pos, slots)
    valid = ok_p & jnp.any(neg, axis=1, keepdims=True)
    farthest = jnp.max(jnp.where(neg, dist, -jnp.inf), axis=1)  # when none is semi-hard
    total = 0.0
    for p in range(slots):
      farther = neg & (dist > jax.lax.stop_gradient(d_p[:, p:p + 1]))
      semi = jnp.min(jnp.where(farther, dist, jnp.inf), axis=1)
      chosen = jnp.where(jnp.any(farther, axis=1), semi, farthest)
      gap = jnp.where(valid[:, p], d_p[:, p] - jnp.where(valid[:, p], chosen, 0.0) + margin,
                      0.0)
      total = total + jnp.where(valid[:, p], jnp.maximum(gap, 0.0), 0.0)
    n_pairs = jnp.sum(valid, axis=1)
    out = jnp.where(n_pairs > 0, total / jnp.maximum(n_pairs, 1), 0.0)
    return jnp.where(too_many, jnp.nan, out)

  def reduce_sorted(dist, pos, neg):
    keys_sorted, keys, rank, n_neg = _sorted_negatives(dist, neg)
    b = dist.shape[1]
    right = _rowwise_searchsorted(keys_sorted, keys, "right")
    k = right  # first negative farther than d(a, p)
    last = jnp.take_along_axis(keys_sorted, jnp.maximum(n_neg - 1, 0)[:, None], axis=1)
    farthest = _rowwise_searchsorted(keys_sorted, last, "left")  # first of its ties
    k = jnp.where(k < n_neg[:, None], k, farthest)  # no semi-hard negative: the farthest
    chosen = _from_order_keys(jnp.take_along_axis(keys_sorted, k, axis=1), dist.dtype)
    valid = pos & (n_neg > 0)[:, None]
    margin_gap = jax.lax.stop_gradient(dist) - chosen + margin
    # d max(x, 0) / dx as JAX has it (1/2 at 0); the chosen negative gets minus that,
    # split evenly among negatives tied with it (as a min over them would).
    slope = jnp.where(valid, jnp.where(margin_gap > 0, 1.0, jnp.where(margin_gap == 0, 0.5,
                                                                      0.0)), 0.0)
    slope = slope.astype(dist.dtype)
    pull = _row_histogram(jnp.where(valid, k, b), slope, b + 1)  # [C, B + 1] by rank
    n_tied = right - rank  # for each negative, the negatives of its value
    pull_n = jnp.where(neg, jnp.take_along_axis(pull, rank, axis=1)
                       / jnp.maximum(n_tied, 1).astype(dist.dtype), 0.0)
    per_pair = jnp.where(valid, jnp.maximum(margin_gap, 0.0), 0.0)
    d_sg = jax.lax.stop_gradient(dist)
    total = (jnp.sum(per_pair + slope * (dist - d_sg), axis=1)
             - jnp.sum(pull_n * (dist - d_sg), axis=1))
    n_pairs = jnp.sum(valid, axis=1)
    return jnp.where(n_pairs > 0, total / jnp.maximum(n_pairs, 1), 0.0)

  reduce = _mining_reduce(reduce_direct, reduce_sorted, max_positives, labels,
                          anchor_indices, valid, ref_labels, ref_valid, ref_exclude)
  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)
