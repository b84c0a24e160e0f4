"""The in-batch losses' engine: argument checks, masks and the chunked Gram block.

Every in-batch loss checks its embeddings, labels, masks and reference set here, and
runs its per-anchor reduction through :func:`map_anchor_chunks` (or, for the losses that
mine two partners per anchor, :func:`mined_distances`). The helpers without a leading
underscore are shared by the loss families of this package and private to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances


def in_batch_inputs(embeddings, labels) -> tuple[jax.Array, jax.Array]:
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[B, D]")
  _checks.nonempty("embeddings", emb)
  labels = _checks.class_labels("labels", labels, emb.shape[0])
  return emb, labels


_NEEDS = ("both", "positive", "any")


def valid_anchors(
    labels: jax.Array,
    *,
    need: str = "both",
    valid: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """``[B]`` bool mask of the anchors that carry a loss.

  Which anchors carry a loss depends on the loss (each loss's docstring names its
  ``need``; the module docstring has the table):

  * ``need="both"`` (default): at least one positive and one negative partner
    (the triplet losses, :func:`ntxent_loss`, :func:`circle_loss`);
  * ``need="positive"``: at least one positive (:func:`in_batch_softmax_loss`);
  * ``need="any"``: at least one partner of either kind
    (:func:`all_pairs_contrastive_loss`, :func:`multi_similarity_loss`,
    :func:`lifted_structure_loss`).

  Args:
    labels: ``[B]`` integer class ids.
    need: ``"both"``, ``"positive"`` or ``"any"``, as above.
    valid: optional ``[B]`` bool; False rows are neither anchors nor partners.
    ref_labels: optional ``[R]`` labels of a reference set: partners then come from it
      and no anchor is excluded from its own partners (pass what the loss got).
    ref_valid: optional ``[R]`` bool mask of the reference rows.
    ref_exclude: optional ``[B]`` integer: for each anchor, one reference row that is
      not its partner (e.g. its own copy), ``-1`` for none (requires ``ref_labels``;
      pass what the loss got).

  Returns:
    ``[B]`` bool: True where the loss is defined for the anchor, so that
    ``jnp.sum(loss) / jnp.maximum(jnp.sum(valid_anchors(labels, need=...)), 1)`` is the
    mean over those anchors.

  References:
    See :func:`batch_hard_triplet_loss`.

  >>> import jax.numpy as jnp
  >>> valid_anchors(jnp.array([0, 0, 1])).tolist()
  [True, True, False]
  >>> valid_anchors(jnp.array([0, 0, 1]), need="any").tolist()
  [True, True, True]
  """
  if need not in _NEEDS:
    raise ValueError(f"need must be 'both', 'positive' or 'any', got {need!r}")
  same, partner = same_and_partner(labels, valid, ref_labels, ref_valid, ref_exclude)
  has_pos = jnp.any(same & partner, axis=1)
  has_neg = jnp.any(~same & partner, axis=1)
  if need == "both":
    return has_pos & has_neg
  if need == "positive":
    return has_pos
  return has_pos | has_neg


def _reference(emb, ref_embeddings, ref_labels, ref_valid):
  """Checks the reference-set keywords; returns ``None`` or ``(ref [R, D], labels, valid)``."""
  if ref_embeddings is None:
    if ref_labels is not None or ref_valid is not None:
      raise ValueError("ref_labels/ref_valid were given without ref_embeddings")
    return None
  ref = _checks.floating("ref_embeddings", ref_embeddings)
  _checks.rank("ref_embeddings", ref, 2, "[R, D]")
  _checks.nonempty("ref_embeddings", ref)
  if ref.shape[1] != emb.shape[1]:
    raise ValueError(
        f"ref_embeddings must have the embeddings' size D = {emb.shape[1]}, got {ref.shape}")
  if ref_labels is None:
    raise ValueError("ref_labels is required with ref_embeddings ([R] class ids)")
  ref_labels = _checks.class_labels("ref_labels", ref_labels, ref.shape[0])
  return ref, ref_labels, _checks.row_mask("ref_valid", ref_valid, ref.shape[0])


def _ref_exclude(ref_exclude, b: int, r: int):
  """Checks ``ref_exclude`` (``[b]`` rows of ``[-1, r)``; range checked when concrete)."""
  if ref_exclude is None:
    return None
  excl = _checks.as_array("ref_exclude", ref_exclude)
  if not jnp.issubdtype(excl.dtype, jnp.integer):
    raise ValueError(f"ref_exclude must be integer reference rows, got dtype {excl.dtype}")
  _checks.rank("ref_exclude", excl, 1, "[B] reference rows, one per row of embeddings")
  if excl.shape[0] != b:
    raise ValueError(f"ref_exclude has {excl.shape[0]} entries but there are {b} rows of "
                     f"embeddings (it is aligned with embeddings, not with anchor_indices)")
  if _checks.is_concrete(excl):
    e = np.asarray(excl)
    bad = e[(e < -1) | (e >= r)]
    if bad.size:
      raise ValueError(f"ref_exclude must be reference rows in [0, {r}) or -1 for none, "
                       f"found {bad[:5].tolist()}")
  return excl


def compute_dtype(*arrays) -> jnp.dtype:
  """float32 for half-precision inputs (the losses are computed and returned in it)."""
  dtype = jnp.result_type(*arrays)
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


# The keyword arguments every in-batch loss shares, documented once (see in_batch_doc).
_IN_BATCH_ARGS = """\
    chunk_size: anchors processed at once (memory ``O(chunk_size * B)`` beyond
      :data:`FULL_BLOCK_BYTES`; see the module docstring).
    anchor_indices: optional ``[A]`` integer rows of ``embeddings`` to use as anchors
      (all ``B`` by default); the result is then ``[A]``. Rows outside ``[0, B)`` raise
      ``ValueError`` when concrete; under ``jit`` they cannot be checked (JAX clamps an
      out-of-range gather), so check traced indices yourself. Every row still serves as a
      positive/negative. This is how :mod:`siamjax.parallel` gives each device its own
      anchors against the all-gathered global batch.
    valid: optional ``[B]`` bool; rows that are False (padding) are neither anchors nor
      partners, and their loss and gradient are 0 (their values must be finite).
    ref_embeddings: optional ``[R, D]`` reference set: anchors come from ``embeddings``,
      partners from it (pytorch-metric-learning's ``ref_emb``). Nothing is then
      excluded: a copy of an anchor inside it is a positive at distance 0.
    ref_labels: ``[R]`` integer labels of ``ref_embeddings`` (required with it).
    ref_valid: optional ``[R]`` bool mask of the reference rows.
    ref_exclude: optional ``[B]`` integer: for each row of ``embeddings`` (also with
      ``anchor_indices``), one reference row that is not its partner (e.g. its own copy
      in a memory), ``-1`` for none; requires ``ref_embeddings``.
"""


# batch-all and semi-hard mining's max_positives (see in_batch_doc)
_MAX_POSITIVES_ARG = """\
    max_positives: optional static int ``P``: every anchor has at most ``P`` positive
      partners (``K - 1`` for P x K batches). The loss then does ``O(P * B)`` direct work
      per anchor instead of sorting its negatives, several times faster for small ``P``;
      values and gradients are the same. With concrete labels (and masks) an anchor with
      more positives raises ``ValueError``; under ``jit`` it cannot be checked, and such an
      anchor's loss is NaN, so the violation shows instead of a silently wrong value.
      ``None`` (the default) chooses by itself, with the same values and gradients: the
      direct work with :data:`POSITIVE_SLOTS` slots when no anchor has more positives,
      else the sort. With concrete labels the choice is made once when tracing; under
      ``jit`` each chunk of anchors chooses with ``lax.switch`` on its largest positive
      count, which compiles every branch (several times the compile time, and slower
      than the one branch it picks; under ``vmap`` over the labels every branch runs).
      Pass ``max_positives`` to compile one.
"""


def log1p_sum_exp(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """``log(1 + sum_mask exp(x))`` along ``axis``, stable, with finite gradients.

  0 where the mask is empty. ``log1p`` keeps it exact when every term is tiny.
  """
  x_m = jnp.where(mask, x, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.maximum(jnp.max(x_m, axis=axis, keepdims=True), 0.0))
  total_minus_one = jnp.expm1(-top) + jnp.sum(jnp.exp(x_m - top), axis=axis, keepdims=True)
  return jnp.squeeze(top + jnp.log1p(total_minus_one), axis)


def in_batch_doc(fn):
  """Writes :data:`_IN_BATCH_ARGS` into ``fn``'s docstring at its ``{in_batch_args}`` line
  (and :data:`_MAX_POSITIVES_ARG` at a ``{max_positives_arg}`` line)."""
  if fn.__doc__ is not None:  # None under python -OO
    if "    {in_batch_args}\n" not in fn.__doc__:
      raise AssertionError(f"{fn.__name__}'s docstring has no {{in_batch_args}} line")
    fn.__doc__ = fn.__doc__.replace("    {in_batch_args}\n", _IN_BATCH_ARGS).replace(
        "    {max_positives_arg}\n", _MAX_POSITIVES_ARG)
  return fn


FULL_BLOCK_BYTES = 64 * 2**20
"""Budget of the in-batch losses' one-piece Gram block, in bytes (read when tracing).

When the ``[A, R]`` block of anchor-partner products (in the compute dtype) fits it, it is
formed by one matrix product and kept for the backward pass, whose gradient product is one
more (two with a reference set or ``anchor_indices``); the per-anchor work still runs in
chunks of ``chunk_size`` rows of it. Beyond it, each chunk forms its own rows and forms them
again in the backward pass (four products in all), so memory stays ``O(chunk_size * R)``.
The default admits ``B = 4096`` in float32 (64 MiB); set it to 0 to always chunk.
"""


def zero_padding(x: jax.Array, given, valid_N: jax.Array) -> jax.Array:
  """``x`` with the rows that a given ``valid`` mask marks False set to 0 (private).

  Such rows take part in nothing, so NaN or inf padding then changes no value or gradient
  (a NaN times the zero weight of a masked row would still be NaN).
  """
  return x if given is None else jnp.where(valid_N[:, None], x, jnp.zeros((), x.dtype))


def map_anchor_chunks(reduce, distance: str, emb: jax.Array, labels: jax.Array,
                       chunk_size: int, anchor_indices=None, valid=None,
                       ref_embeddings=None, ref_labels=None, ref_valid=None,
                       ref_exclude=None, fill=0.0) -> jax.Array:
  """Applies ``reduce(dist_CxR, pos_CxR, neg_CxR) -> [C, ...]`` to chunks of anchors.

  The partners are the batch itself (each anchor excluded from its own partners) or,
  with ``ref_embeddings``, the reference set (nothing excluded). ``pos``/``neg`` mark the
  positive/negative partners of each anchor; rows with ``valid``/``ref_valid`` False are
  no one's partner, ``ref_exclude[i]`` (a reference row, or -1) is not row ``i``'s
  partner, and an anchor whose ``valid`` is False has no partner at all and gets ``fill``.
  The distances come from Gram products against the partners: one ``[A, R]`` product
  kept for the backward pass when it fits :data:`FULL_BLOCK_BYTES` (or when there is one
  chunk), else one ``[C, R]`` product per chunk. Each chunk's body is rematerialised in
  the backward pass, so the saved residuals are the chunks' inputs only and the
  per-anchor temporaries stay ``O(C R)``. Half-precision inputs are computed in float32
  and the result is float32.
  """
  if distance not in ("euclidean", "squared_euclidean", "cosine"):
    raise ValueError(
        f"distance must be 'euclidean', 'squared_euclidean' or 'cosine', got {distance!r}")
  b = emb.shape[0]
  valid_B = _checks.row_mask("valid", valid, b)
  ref = _reference(emb, ref_embeddings, ref_labels, ref_valid)
  if ref_exclude is not None and ref is None:
    raise ValueError("ref_exclude was given without ref_embeddings")
  exclude_B = None if ref is None else _ref_exclude(ref_exclude, b, ref[0].shape[0])
  rows_A = _checks.anchor_rows(anchor_indices, b)
  dtype = compute_dtype(emb, *(() if ref is None else (ref[0],)))
  emb = zero_padding(emb.astype(dtype), valid, valid_B)
  if ref is None:
    partners_R, labels_R, valid_R = emb, labels, valid_B
  else:
    partners_R = zero_padding(ref[0].astype(dtype), ref_valid, ref[2])
    labels_R, valid_R = ref[1], ref[2]
  if distance != "cosine":  # translation-invariant: centre once (as pairwise_distances does)
    # on the valid partners (padding may be far off); ref_exclude does not change it: the
    # mean only conditions the Gram products, it is no partner of anyone
    w_R = valid_R[:, None].astype(dtype)
    mean = jnp.sum(w_R * partners_R, axis=0, keepdims=True) / jnp.maximum(jnp.sum(w_R), 1.0)
    mean = jax.lax.stop_gradient(mean)
    emb = emb - mean  # one centred copy of the batch, [B, D], the only extra memory
    partners_R = emb if ref is None else partners_R - mean
  idx_B = jnp.arange(b)
  idx_R = jnp.arange(partners_R.shape[0])

  x_BxD, sq_B = _distances.gram_rows(emb, distance)
  p_RxD, sq_R = (x_BxD, sq_B) if ref is None else _distances.gram_rows(partners_R, distance)

  def body(rows_C, gram_CxR):
    sq_C = None if sq_B is None else sq_B[rows_C]
    dist_CxR = _distances.from_gram(gram_CxR, sq_C, sq_R, distance)
    same_CxR = labels[rows_C][:, None] == labels_R[None, :]
    partner_CxR = valid_B[rows_C][:, None] & valid_R[None, :]
    if ref is None:
      partner_CxR = partner_CxR & (rows_C[:, None] != idx_B[None, :])
    elif exclude_B is not None:
      partner_CxR = partner_CxR & (exclude_B[rows_C][:, None] != idx_R[None, :])
    out = reduce(dist_CxR, same_CxR & partner_CxR, ~same_CxR & partner_CxR)
    keep = valid_B[rows_C].reshape((-1,) + (1,) * (out.ndim - 1))
    return jnp.where(keep, out, jnp.asarray(fill, out.dtype))

  def gram(rows_C):
    return jnp.matmul(x_BxD[rows_C], p_RxD.T, precision=jax.lax.Precision.HIGHEST)

  chunk_size = _checks.positive_int("chunk_size", chunk_size)
  a, r = rows_A.shape[0], p_RxD.shape[0]
  c = min(chunk_size, a)
  n_chunks = -(-a // c)
  pad = n_chunks * c - a
  rows_NxC = jnp.pad(rows_A, (0, pad)).reshape(n_chunks, c)  # padded rows: sliced off
  if n_chunks == 1 or a * r * jnp.dtype(dtype).itemsize <= FULL_BLOCK_BYTES:
    # One [A, R] Gram product kept for the backward pass (whose gradient is two more);
    # the chunks only recompute their elementwise work from their rows of it. (A custom
    # rule computing the batch's own gradient as one product (G' + G'^T) E is slower on
    # XLA:CPU: transposing a [4096, 4096] block costs more than the product it saves.)
    gram_AxR = gram(slice(None) if anchor_indices is None else rows_A)
    if n_chunks == 1:
      return body(rows_A, gram_AxR)
    gram_NxCxR = jnp.pad(gram_AxR, ((0, pad), (0, 0))).reshape(n_chunks, c, r)
    out = jax.lax.map(jax.checkpoint(lambda args: body(*args)), (rows_NxC, gram_NxCxR))
  else:  # each chunk forms its own Gram rows, again in the backward pass: O(C R) memory
    out = jax.lax.map(jax.checkpoint(lambda rows_C: body(rows_C, gram(rows_C))), rows_NxC)
  return out.reshape((n_chunks * c,) + out.shape[2:])[:a]


def first_row_index(mask_CxR, x_CxR, kind: str) -> jax.Array:
  """Each row's first column holding its masked max (or min), int32 ``[C]`` (private).

  Two plain reductions instead of ``argmax``'s variadic one: inside the chunked loss
  reductions XLA:CPU runs these faster (``benchmarks/losses_per_sec.py`` times the
  losses). A row with nothing masked gets ``R``.
  """
  fill = -jnp.inf if kind == "max" else jnp.inf
  x_CxR = jnp.where(mask_CxR, x_CxR, fill)
  best_C = (jnp.max if kind == "max" else jnp.min)(x_CxR, axis=1, keepdims=True)
  r = x_CxR.shape[1]
  cols_R = jnp.arange(r, dtype=jnp.int32)
  return jnp.min(jnp.where(mask_CxR & (x_CxR == best_C), cols_R, r), axis=1)


def mined_distances(select, distance: str, emb: jax.Array, labels: jax.Array,
                     chunk_size: int, anchor_indices=None, valid=None, ref_embeddings=None,
                     ref_labels=None, ref_valid=None, ref_exclude=None):
  """Distances from each anchor to the K partners that ``select`` mines (private).

  ``select(dist_CxR, pos_CxR, neg_CxR) -> [C, K]`` integer partner rows (``-1`` for none,
  ``R`` for a partner it could not place, e.g. a NaN distance: its distance is NaN) runs as
  a :func:`map_anchor_chunks` reduction on ``stop_gradient`` inputs, so its Gram product is
  formed once and never differentiated. The chosen distances are then formed directly
  from the gathered rows (as :func:`siamjax.distances.euclidean` would), so the gradient
  costs ``O(A K D)`` instead of two more ``[B, D] x [D, B]`` products. Where
  distances tie, ``select`` decides which partner gets the gradient.

  Returns:
    ``([A, K] distances, [A, K] found)``: the compute dtype (float32 for half inputs);
    distances are 0 where ``found`` is False.
  """
  sg = jax.lax.stop_gradient
  if ref_embeddings is not None:
    ref_embeddings = _checks.as_array("ref_embeddings", ref_embeddings)
  idx_AxK = map_anchor_chunks(
      select, distance, sg(emb), labels, chunk_size, anchor_indices, valid,
      None if ref_embeddings is None else sg(ref_embeddings), ref_labels, ref_valid,
      ref_exclude, fill=-1)
  dtype = compute_dtype(emb, *(() if ref_embeddings is None else (ref_embeddings,)))
  emb = zero_padding(emb.astype(dtype), valid, _checks.row_mask("valid", valid, emb.shape[0]))
  anchors_AxD = emb
  if anchor_indices is not None:
    anchors_AxD = anchors_AxD[_checks.anchor_rows(anchor_indices, emb.shape[0])]
  partners_R = emb if ref_embeddings is None else zero_padding(
      ref_embeddings.astype(dtype), ref_valid,
      _checks.row_mask("ref_valid", ref_valid, ref_embeddings.shape[0]))
  r = partners_R.shape[0]
  found_AxK = idx_AxK >= 0
  # select found a partner but none at its extreme distance: that one is NaN
  nan_AxK = idx_AxK >= r

  @jax.checkpoint  # saves no [A, D] gather: the backward pass gathers again
  def partner_distance(anchors_AxD, partners_RxD, idx_A):
    chosen_AxD = partners_RxD[idx_A]
    if distance == "cosine":
      x_AxD, _ = _distances.gram_rows(anchors_AxD, distance)
      p_AxD, _ = _distances.gram_rows(chosen_AxD, distance)
      return 1.0 - jnp.sum(x_AxD * p_AxD, axis=-1)
    sq_A = jnp.sum(jnp.square(anchors_AxD - chosen_AxD), axis=-1)
    return _distances.safe_sqrt(sq_A) if distance == "euclidean" else sq_A

  dist_AxK = jnp.stack([partner_distance(anchors_AxD, partners_R, jnp.clip(idx_A, 0, r - 1))
                        for idx_A in idx_AxK.T], axis=1)
  dist_AxK = jnp.where(nan_AxK, jnp.nan, dist_AxK)
  return jnp.where(found_AxK, dist_AxK, 0.0), found_AxK


def same_and_partner(labels, valid=None, ref_labels=None, ref_valid=None, ref_exclude=None):
  """``[B, R]`` same-label and partner masks of each row against its partners (checked)."""
  labels = _checks.as_array("labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  _checks.rank("labels", labels, 1, "[batch] class ids")
  b = labels.shape[0]
  valid_B = _checks.row_mask("valid", valid, b)
  if ref_labels is None:
    if ref_valid is not None or ref_exclude is not None:
      raise ValueError("ref_valid/ref_exclude were given without ref_labels")
    ref_L, ref_valid_R = labels, valid_B
    not_self = ~jnp.eye(b, dtype=bool)
  else:
    ref_L = _checks.as_array("ref_labels", ref_labels)
    if not jnp.issubdtype(ref_L.dtype, jnp.integer):
      raise ValueError(f"ref_labels must be integer class ids, got dtype {ref_L.dtype}")
    _checks.rank("ref_labels", ref_L, 1, "[R] class ids")
    ref_valid_R = _checks.row_mask("ref_valid", ref_valid, ref_L.shape[0])
    exclude_B = _ref_exclude(ref_exclude, b, ref_L.shape[0])
    not_self = True if exclude_B is None else (
        exclude_B[:, None] != jnp.arange(ref_L.shape[0])[None, :])
  partner = not_self & valid_B[:, None] & ref_valid_R[None, :]
  return labels[:, None] == ref_L[None, :], partner


def positive_counts(labels, *, valid=None, ref_labels=None, ref_valid=None, ref_exclude=None):
  """``[B]`` number of positive partners of each row (as :func:`valid_anchors` counts)."""
  same, partner = same_and_partner(labels, valid, ref_labels, ref_valid, ref_exclude)
  return jnp.sum(same & partner, axis=1)
