"""Retrieval metrics on the device: precision@1, recall@k, R-precision, MAP@R, MRR.

Every query is ranked against a reference set (or, with ``reference=None``, against the
other queries) by a distance of :mod:`siamjax.distances`; a reference item is *relevant*
to a query when it has the query's label. With ``R`` the number of relevant items of a
query and ``rank(j)`` the 1-based position of item ``j`` in the query's ranking:

* ``precision_at_1``: the nearest item is relevant;
* ``recall_at_{k}``: at least one relevant item is among the ``k`` nearest (the usual
  "recall@k" of image retrieval, Jegou et al. 2011; not the fraction of relevant items);
* ``r_precision``: the fraction of relevant items among the ``R`` nearest;
* ``map_at_r``: ``1/R sum_{i <= R, item i relevant} precision@i`` (Musgrave et al. 2020);
* ``mrr``: ``1 / rank`` of the nearest relevant item, over the whole ranking (never
  truncated at ``k``).

Each metric is the mean over queries (``avg_of_avgs=False`` in pytorch-metric-learning's
terms). Queries with no relevant item (a label absent from the reference set, or the
only member of its class in self-retrieval) are left out of every mean and counted in
``n_lone_queries``, as pytorch-metric-learning's ``AccuracyCalculator`` does.

References:
  K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020
  (R-precision and MAP@R); H. Jegou, M. Douze, C. Schmid, "Product Quantization for
  Nearest Neighbor Search", TPAMI 2011 (recall@k); pytorch-metric-learning's
  ``utils/accuracy_calculator.py``, the reference these functions are tested against.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances

__all__ = ["retrieval_metrics", "recall_at_1"]

_DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _embeddings(name: str, x) -> jax.Array:
  x = _checks.floating(name, x)
  _checks.rank(name, x, 2, "[N, D] embeddings")
  _checks.nonempty(name, x)
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"{name} must be finite (found NaN or inf)")
  return x


def _ks(k, n_candidates: int) -> tuple[int, ...]:
  ks = (k,) if isinstance(k, numbers.Integral) else k
  try:
    ks = tuple(ks)
  except TypeError:
    raise ValueError(f"k must be an int or a sequence of ints, got {k!r}") from None
  for v in ks:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      raise ValueError(f"k must hold ints, got {v!r} in {k!r}")
    if v < 1:
      raise ValueError(f"k must be >= 1, got {int(v)}")
    if v > n_candidates:
      raise ValueError(f"k={int(v)} exceeds the {n_candidates} reference items each query "
                       "is ranked against")
  return tuple(sorted({int(v) for v in ks}))


@functools.partial(jax.jit, static_argnames=("self_retrieval", "top", "distance", "chunk"))
def _query_stats(q_QxD, ql_Q, r_NxD, rl_N, n_rel_Q, *, self_retrieval: bool, top: int,
                 distance: str, chunk: int):
  """Per query: the rank of the nearest relevant item, the hits among the ``R`` nearest
  and the sum of precision@i over those hits (MAP@R's numerator).

  One ``lax.map`` step per chunk of ``chunk`` queries: their ``[chunk, N]`` distances to
  every reference item, a ``top_k`` of the ``top`` (= the largest ``R``) nearest, and
  ``O(chunk * N)`` reductions for the rank of the nearest relevant item.
  """
  n = r_NxD.shape[0]
  n_q = q_QxD.shape[0]
  n_chunks = -(-n_q // chunk)
  pad = n_chunks * chunk - n_q
  idx_N = jnp.arange(n)
  q_KxCxD = jnp.pad(q_QxD, ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
  ql_KxC = jnp.pad(ql_Q, (0, pad)).reshape(n_chunks, chunk)
  qi_KxC = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)  # padded rows: > every i
  nr_KxC = jnp.pad(n_rel_Q, (0, pad)).reshape(n_chunks, chunk)
  # both sides were centred once in retrieval_metrics: no per-chunk centring or casts
  r_NxD, sq_N = _distances.gram_rows(r_NxD, distance)

  def body(args):
    q_CxD, ql_C, qi_C, nr_C = args
    q_CxD, sq_C = _distances.gram_rows(q_CxD, distance)
    d_CxN = _distances.from_gram(
        jnp.matmul(q_CxD, r_NxD.T, precision=jax.lax.Precision.HIGHEST), sq_C, sq_N, distance)
    d_CxN = jnp.where(d_CxN == 0, 0.0, d_CxN)  # one zero: -0.0 would rank apart in top_k
    rel_CxN = ql_C[:, None] == rl_N[None, :]
    if self_retrieval:  # the query itself is no candidate: last in every ranking
      is_self_CxN = qi_C[:, None] == idx_N[None, :]
      rel_CxN = rel_CxN & ~is_self_CxN
      d_CxN = jnp.where(is_self_CxN, jnp.inf, d_CxN)
    # Rank of the nearest relevant item (ties: lower reference index first).
    d_best_C = jnp.min(jnp.where(rel_CxN, d_CxN, jnp.inf), axis=1)
    at_best_CxN = rel_CxN & (d_CxN == d_best_C[:, None])
    i_best_C = jnp.min(jnp.where(at_best_CxN, idx_N[None, :], n), axis=1)
    before_CxN = (d_CxN < d_best_C[:, None]) | (
        (d_CxN == d_best_C[:, None]) & (idx_N[None, :] < i_best_C[:, None]))
    first_C = jnp.sum(before_CxN, axis=1, dtype=jnp.int32) + 1
    # The `top` nearest (lax.top_k puts the lower index first among equal values).
    _, nearest_CxT = jax.lax.top_k(-d_CxN, top)
    hit_CxT = jnp.take_along_axis(rel_CxN, nearest_CxT, axis=1)
    hit_CxT = hit_CxT & (jnp.arange(top)[None, :] < nr_C[:, None])  # only the R nearest
    hits_C = jnp.sum(hit_CxT, axis=1, dtype=jnp.int32)
    rank_T = jnp.arange(1, top + 1, dtype=d_CxN.dtype)
    precision_CxT = jnp.cumsum(hit_CxT, axis=1) / rank_T[None, :]
    ap_C = jnp.sum(jnp.where(hit_CxT, precision_CxT, 0.0), axis=1)
    return first_C, hits_C, ap_C

  out = jax.lax.map(body, (q_KxCxD, ql_KxC, qi_KxC, nr_KxC))
  return tuple(o.reshape(-1)[:n_q] for o in out)


def retrieval_metrics(
    query: jax.Array,
    query_labels: jax.Array,
    reference: jax.Array | None = None,
    reference_labels: jax.Array | None = None,
    *,
    k=(1, 5, 10),
    distance: str = "euclidean",
    chunk_size: int = 1024,
) -> dict:
  """Precision@1, recall@k, R-precision, MAP@R and MRR of ranking ``reference`` for ``query``.

  The distances, rankings and per-query counts are computed on the device in one jitted
  call, ``chunk_size`` queries at a time, so no ``[Q, N]`` matrix is ever built; only
  the per-query counts (``3 Q`` numbers) come back to the host, where the means are
  taken in float64. Not jittable itself: the number of nearest items it keeps is the
  largest ``R``, a static shape read from the labels.

  Memory: per chunk, the ``[chunk_size, N]`` distances and masks and ``lax.top_k`` of
  the ``R`` nearest (``R`` up to the largest class, rounded up to a power of two; XLA may
  compute it through a sort of the ``[chunk_size, N]`` block), so temporaries grow as
  ``chunk_size * N`` and never with ``Q``: the compiled call's temporaries measure
  19 bytes per ``chunk_size * N`` entry on the CPU in float32 (0.46 GiB for
  ``N = 100,000``, ``chunk_size = 256``, whether ``R`` is 16 or 1,024). For 1M x 1M
  pass ``chunk_size=256`` (about 4.5 GiB besides the embeddings; the default 1024 needs
  about 18 GiB). Time is ``O(Q N D)`` for the distances plus the ``top_k``, which
  dominates on a CPU and grows with ``R`` (a full sort of each row, the alternative,
  is slower than a ``top_k`` of ``R`` up to a few thousand).

  Ties: items at equal distance rank by their index in the reference set (lower first),
  the order of a stable sort (and of ``lax.top_k``); pytorch-metric-learning's
  ``torch.topk`` leaves the order of ties unspecified, so with exactly equal distances
  (duplicate embeddings) the two can differ.

  Args:
    query: ``[Q, D]`` floating embeddings (float16/bfloat16 are computed in float32).
    query_labels: ``[Q]`` integer labels.
    reference: ``[N, D]`` embeddings to rank, or ``None`` to rank the queries against
      each other (each query is left out of its own ranking, by position, so a duplicate
      of a query elsewhere in the set is still a candidate). With a reference set nothing
      is left out: a copy of the query in it is a relevant item at distance 0.
    reference_labels: ``[N]`` integer labels; given exactly when ``reference`` is.
    k: an int or ints ``>= 1`` for ``recall_at_{k}``, at most the number of items each
      query is ranked against (``N``, or ``Q - 1`` in self-retrieval).
    distance: ``"euclidean"``, ``"squared_euclidean"`` (the same rankings) or
      ``"cosine"`` (``1 - cos``), from :func:`siamjax.distances.pairwise_distances`;
      Euclidean distances are computed on embeddings centred by the reference mean, so
      a large shared offset costs no precision.
    chunk_size: queries per step (memory above).

  Returns:
    ``{"precision_at_1", "recall_at_{k}" for each k (ascending), "r_precision",
    "map_at_r", "mrr"}`` as Python floats (means over the queries that have a relevant
    item; NaN when none has) and ``"n_lone_queries"``, the int count of the others.

  Equal to pytorch-metric-learning's ``AccuracyCalculator(avg_of_avgs=False)`` with an
  exact k-NN of the same distance over all items (``k=None``): ``precision_at_1``,
  ``r_precision``, ``mean_average_precision_at_r``, ``mean_reciprocal_rank``; its
  ``get_accuracy(query, query_labels)`` is ``reference=None`` here
  (``tests/test_retrieval.py``).

  References:
    K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.1], [1.0], [1.2], [5.0], [9.5]])
  >>> m = retrieval_metrics(emb, jnp.array([0, 0, 1, 0, 1, 2]), k=(1, 2))
  >>> m["precision_at_1"], m["recall_at_2"], m["n_lone_queries"]
  (0.4, 0.8, 1)
  >>> [round(m[key], 4) for key in ("r_precision", "map_at_r", "mrr")]
  [0.3, 0.25, 0.65]
  """
  q = _embeddings("query", query)
  ql = _checks.class_labels("query_labels", query_labels, q.shape[0])
  self_retrieval = reference is None
  if self_retrieval != (reference_labels is None):
    raise ValueError("reference and reference_labels go together: pass both or neither")
  if self_retrieval:
    r, rl = q, ql
  else:
    r = _embeddings("reference", reference)
    rl = _checks.class_labels("reference_labels", reference_labels, r.shape[0])
    if r.shape[1] != q.shape[1]:
      raise ValueError(f"query and reference must have the same embedding size D, got "
                       f"{q.shape} and {r.shape}")
  if distance not in _DISTANCES:
    raise ValueError(
        f"distance must be 'euclidean', 'squared_euclidean' or 'cosine', got {distance!r}")
  chunk_size = _checks.positive_int("chunk_size", chunk_size)
  n_candidates = r.shape[0] - int(self_retrieval)
  ks = _ks(k, n_candidates)

  dtype = jnp.promote_types(q.dtype, jnp.float32)
  dtype = jnp.promote_types(dtype, r.dtype)
  q, r = q.astype(dtype), r.astype(dtype)
  if distance != "cosine":  # translation-invariant: centring keeps the Gram form exact
    centre = jnp.mean(r, axis=0, keepdims=True)
    q, r = q - centre, r - centre
  if self_retrieval:
    r = q
  rl_sorted = jnp.sort(rl)
  n_rel = (jnp.searchsorted(rl_sorted, ql, side="right")
           - jnp.searchsorted(rl_sorted, ql, side="left") - int(self_retrieval))
  n_rel_np = np.asarray(n_rel)
  keep = n_rel_np > 0
  n_lone = int(np.sum(~keep))
  if not keep.any():
    nan = float("nan")
    return {"precision_at_1": nan, **{f"recall_at_{v}": nan for v in ks}, "r_precision": nan,
            "map_at_r": nan, "mrr": nan, "n_lone_queries": n_lone}
  # The largest R, rounded up to a power of two so that similar label sets share a compile.
  top = min(1 << (int(n_rel_np.max()) - 1).bit_length(), r.shape[0])
  first, hits, ap = _query_stats(q, ql, r, rl, n_rel, self_retrieval=self_retrieval,
                                 top=top, distance=distance,
                                 chunk=int(min(chunk_size, q.shape[0])))
  out = {}
  first = np.asarray(first)[keep].astype(np.float64)
  n_rel_kept = n_rel_np[keep].astype(np.float64)
  out["precision_at_1"] = float(np.mean(first == 1))
  for v in ks:
    out[f"recall_at_{v}"] = float(np.mean(first <= v))
  out["r_precision"] = float(np.mean(np.asarray(hits)[keep] / n_rel_kept))
  out["map_at_r"] = float(np.mean(np.asarray(ap, dtype=np.float64)[keep] / n_rel_kept))
  out["mrr"] = float(np.mean(1.0 / first))
  out["n_lone_queries"] = n_lone
  return out


def recall_at_1(embeddings: jax.Array, labels: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
  """Fraction of embeddings whose nearest other embedding (Euclidean) has the same label.

  Over **all** ``N`` embeddings: one whose label no other embedding has counts as a miss.
  :func:`retrieval_metrics` (same neighbours, same tie rule: the lower
  index first) leaves such lone queries out instead, so its ``precision_at_1`` equals
  ``recall_at_1 * N / (N - n_lone_queries)``; use it for the other retrieval metrics.

  Args:
    embeddings: ``[N, D]`` floating embeddings, ``N >= 2``.
    labels: ``[N]`` integer labels.
    chunk_size: rows per distance block (memory ``O(chunk_size * N)``).

  Returns:
    A float32 scalar in ``[0, 1]``.

  >>> import jax.numpy as jnp
  >>> float(recall_at_1(jnp.array([[0.0], [0.1], [1.0], [5.0]]), jnp.array([0, 0, 1, 1])))
  0.75
  """
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[N, D]")
  if emb.shape[0] < 2:
    raise ValueError(f"embeddings must be [N, D] with N >= 2, got shape {emb.shape}")
  labels = _checks.class_labels("labels", labels, emb.shape[0])
  chunk_size = _checks.positive_int("chunk_size", chunk_size)
  emb = emb.astype(jnp.promote_types(emb.dtype, jnp.float32))
  emb = emb - jnp.mean(emb, axis=0, keepdims=True)  # as retrieval_metrics: exact Gram form
  n = emb.shape[0]
  first, _, _ = _query_stats(
      emb, labels, emb, labels, jnp.ones(n, jnp.int32), self_retrieval=True, top=1,
      distance="squared_euclidean", chunk=min(chunk_size, n))
  return jnp.mean((first == 1).astype(jnp.float32))
