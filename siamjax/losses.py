"""Losses for Siamese networks and metric learning.

Reduction rule (the same for every function here): **a loss returns one value per
example and never reduces.** The example is

* the pair for pair losses (:func:`contrastive_loss`, :func:`pair_bce_loss`): ``[P]``;
* the triplet for :func:`triplet_margin_loss`: ``[P]``;
* the anchor for in-batch losses, which take embeddings ``[B, D]`` with integer labels
  ``[B]`` and form every pair or triplet on the device: ``[B]``, each anchor's *mean* over
  its own pairs/triplets (or its element loss, for the losses defined per anchor). An
  anchor without the partners its loss needs (for example the only member of its class)
  gets 0; :func:`valid_anchors` returns the mask of anchors that carry a loss. The
  exceptions, documented on each: :func:`multi_similarity_loss` and
  :func:`lifted_structure_loss` keep each anchor's positive and negative terms apart, so
  an anchor with only positives or only negatives still pays; so do
  :func:`all_pairs_contrastive_loss` (a mean over every pair) and
  :func:`in_batch_softmax_loss` (an anchor with two positives and no negative).

Reduce with ``jnp.mean(loss)``; on unbalanced batches
``jnp.sum(loss) / jnp.maximum(jnp.sum(valid_anchors(labels, need=NEED)), 1)`` averages
over the anchors that carry a loss, with ``NEED`` the loss's:

* ``"both"`` (a positive and a negative): :func:`batch_all_triplet_loss`,
  :func:`batch_hard_triplet_loss`, :func:`semi_hard_triplet_loss`, :func:`ntxent_loss`,
  :func:`circle_loss`;
* ``"positive"``: :func:`in_batch_softmax_loss`;
* ``"any"`` (any partner): :func:`all_pairs_contrastive_loss`,
  :func:`multi_similarity_loss`, :func:`lifted_structure_loss`

(pass ``valid``/``ref_labels``/``ref_valid`` to :func:`valid_anchors` as to the loss).
With the usual P x K batches (P classes, K samples each) every anchor has the same
number of pairs, so the mean over anchors equals the mean over all pairs/triplets.

Masks and reference sets: every in-batch loss takes ``valid`` (``[B]`` bool; False rows,
such as padding, are neither anchors nor partners and get 0) and a reference set
``ref_embeddings [R, D]``, ``ref_labels [R]``, ``ref_valid [R]``: anchors then come from
``embeddings`` and partners from the reference set, with pytorch-metric-learning's
``ref_emb`` semantics (nothing is excluded, so a copy of an anchor in the reference set
is a positive at distance 0). ``ref_exclude [B]`` (integer, with a reference set only)
names for each row of ``embeddings`` one reference row that is not its partner, ``-1``
for none; it is indexed like ``embeddings`` (with ``anchor_indices``, anchor ``k`` drops
``ref_exclude[anchor_indices[k]]``). A cross-batch memory is such a reference set, and
:func:`siamjax.memory.cross_batch_loss` drops each anchor's own copy this way.

Precision: float16/bfloat16 embeddings are computed in float32 and the in-batch losses
return float32 (a mixed-precision step wants its loss in float32; a squared distance of
embeddings near 1e4 does not fit in float16). The Euclidean distances are centred on the
partners' mean first, so a large offset shared by the embeddings costs no accuracy.

Label convention: ``similar = 1`` (or ``True``) marks a same-class pair, ``0`` a
different-class pair (as in the Keras ``mnist_siamese.py`` example and most libraries).
Hadsell, Chopra & LeCun (2006) write their loss with the opposite label, ``Y = 0`` for
similar pairs, and so do some tutorials (keras.io's "Image similarity estimation using a
Siamese Network with a contrastive loss"); convert with ``similar = 1 - Y``.

Memory and speed: in-batch losses never materialise ``[B, B, D]`` differences or
``[B, B, B]`` triplets; batch-all and semi-hard mining do ``O(P B)`` direct work per
anchor for its ``P`` positives (``max_positives=P``, or chosen from
:data:`POSITIVE_SLOTS`), and for anchors with more positives sort their negative distances
once and answer every positive with a binary search, ``O(B^2 log B)`` time besides the
``O(B^2 D)`` matmul FLOPs of the distances. When the
``[A, R]`` block of anchor-partner products fits :data:`FULL_BLOCK_BYTES` (64 MiB: up to
``B = 4096`` in float32), it is formed by one matrix product and kept for the backward
pass (loss and gradient cost three ``[B, D] x [D, B]``-sized products); the per-anchor work
runs on ``chunk_size`` rows of it at a time and is recomputed in the backward pass, which
keeps the other temporaries ``O(chunk_size * B)``. At ``B = 4096``, ``D = 512`` this
compiles to 0.14--0.21 GiB of temporaries for loss and gradient. Larger blocks are
processed in chunks of ``chunk_size`` anchors that form their own rows of the block, again
in the backward pass (four products), so memory stays ``O(chunk_size * B)`` besides the
embeddings: ``B = 4096`` with ``D = 4096`` and ``FULL_BLOCK_BYTES = 0`` compiles to
0.20--0.25 GiB of temporaries, 0.19--0.25 GiB with the default (``tests/test_losses.py``
checks the compiled memory). Batch-hard mining is cheaper still: its two partners are
chosen on undifferentiated distances and their distances formed again from the gathered
rows, so loss and gradient cost one product on either path (0.09 GiB of temporaries at
``B = 4096``, ``D = 512``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances

__all__ = [
    "contrastive_loss",
    "pair_bce_loss",
    "triplet_margin_loss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "semi_hard_triplet_loss",
    "all_pairs_contrastive_loss",
    "multi_similarity_loss",
    "circle_loss",
    "lifted_structure_loss",
    "ntxent_loss",
    "in_batch_softmax_loss",
    "valid_anchors",
    "proxy_nca_loss", "proxy_anchor_loss", "arcface_loss", "cosface_loss",
]

# ---------------------------------------------------------------------------------
# Pair and triplet losses
# ---------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------
# In-batch losses
# ---------------------------------------------------------------------------------


def _in_batch_inputs(embeddings, labels) -> tuple[jax.Array, jax.Array]:
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
  same, partner = _same_and_partner(labels, valid, ref_labels, ref_valid, ref_exclude)
  has_pos = jnp.any(same & partner, axis=1)
  has_neg = jnp.any(~same & partner, axis=1)
  if need == "both":
    return has_pos & has_neg
  if need == "positive":
    return has_pos
  return has_pos | has_neg


def _mask(name: str, mask, n: int) -> jax.Array:
  """Checks an optional ``[n]`` bool row mask; all True when ``None``."""
  if mask is None:
    return jnp.ones((n,), dtype=bool)
  mask = _checks.as_array(name, mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a bool mask, got dtype {mask.dtype}")
  _checks.rank(name, mask, 1, f"[{n}] bool, one per row")
  if mask.shape[0] != n:
    raise ValueError(f"{name} has {mask.shape[0]} entries but there are {n} rows")
  return mask


def _anchor_rows(anchor_indices, b: int) -> jax.Array:
  """Checks ``anchor_indices`` (``[A]`` rows of ``[0, b)``; range checked when concrete)."""
  if anchor_indices is None:
    return jnp.arange(b)
  rows_A = _checks.as_array("anchor_indices", anchor_indices)
  if not jnp.issubdtype(rows_A.dtype, jnp.integer):
    raise ValueError(f"anchor_indices must be integer rows, got dtype {rows_A.dtype}")
  _checks.rank("anchor_indices", rows_A, 1, "[A] rows of embeddings")
  _checks.nonempty("anchor_indices", rows_A)
  if _checks._is_concrete(rows_A):
    r = np.asarray(rows_A)
    bad = r[(r < 0) | (r >= b)]
    if bad.size:
      raise ValueError(
          f"anchor_indices must be rows in [0, {b}) of embeddings, found {bad[:5].tolist()}")
  return rows_A


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
  return ref, ref_labels, _mask("ref_valid", ref_valid, ref.shape[0])


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
  if _checks._is_concrete(excl):
    e = np.asarray(excl)
    bad = e[(e < -1) | (e >= r)]
    if bad.size:
      raise ValueError(f"ref_exclude must be reference rows in [0, {r}) or -1 for none, "
                       f"found {bad[:5].tolist()}")
  return excl


def _compute_dtype(*arrays) -> jnp.dtype:
  """float32 for half-precision inputs (the losses are computed and returned in it)."""
  dtype = jnp.result_type(*arrays)
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


# The keyword arguments every in-batch loss shares, documented once (see _in_batch_doc).
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


# batch-all and semi-hard mining's max_positives (see _in_batch_doc)
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
      count, which compiles every branch (2-3x the compile time, and 10-30% slower at
      ``B = 4096`` than the one branch it picks; under ``vmap`` over the labels every
      branch runs). Pass ``max_positives`` to compile one.
"""


def _in_batch_doc(fn):
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


def _zero_padding(x: jax.Array, given, valid_N: jax.Array) -> jax.Array:
  """``x`` with the rows that a given ``valid`` mask marks False set to 0 (private).

  Such rows take part in nothing, so NaN or inf padding then changes no value or gradient
  (a NaN times the zero weight of a masked row would still be NaN).
  """
  return x if given is None else jnp.where(valid_N[:, None], x, jnp.zeros((), x.dtype))


def _map_anchor_chunks(reduce, distance: str, emb: jax.Array, labels: jax.Array,
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
  valid_B = _mask("valid", valid, b)
  ref = _reference(emb, ref_embeddings, ref_labels, ref_valid)
  if ref_exclude is not None and ref is None:
    raise ValueError("ref_exclude was given without ref_embeddings")
  exclude_B = None if ref is None else _ref_exclude(ref_exclude, b, ref[0].shape[0])
  rows_A = _anchor_rows(anchor_indices, b)
  dtype = _compute_dtype(emb, *(() if ref is None else (ref[0],)))
  emb = _zero_padding(emb.astype(dtype), valid, valid_B)
  if ref is None:
    partners_R, labels_R, valid_R = emb, labels, valid_B
  else:
    partners_R = _zero_padding(ref[0].astype(dtype), ref_valid, ref[2])
    labels_R, valid_R = ref[1], ref[2]
  if distance != "cosine":  # translation-invariant: centre once (see distances._pairwise)
    # on the valid partners (padding may be far off); ref_exclude does not change it: the
    # mean only conditions the Gram products, it is no partner of anyone
    w_R = valid_R[:, None].astype(dtype)
    mean = jnp.sum(w_R * partners_R, axis=0, keepdims=True) / jnp.maximum(jnp.sum(w_R), 1.0)
    mean = jax.lax.stop_gradient(mean)
    emb = emb - mean  # one centred copy of the batch, [B, D], the only extra memory
    partners_R = emb if ref is None else partners_R - mean
  idx_B = jnp.arange(b)
  idx_R = jnp.arange(partners_R.shape[0])

  x_BxD, sq_B = _distances._gram_rows(emb, distance)
  p_RxD, sq_R = (x_BxD, sq_B) if ref is None else _distances._gram_rows(partners_R, distance)

  def body(rows_C, gram_CxR):
    sq_C = None if sq_B is None else sq_B[rows_C]
    dist_CxR = _distances._from_gram(gram_CxR, sq_C, sq_R, distance)
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


def _first_row_index(mask_CxR, x_CxR, kind: str) -> jax.Array:
  """Each row's first column holding its masked max (or min), int32 ``[C]`` (private).

  Two plain reductions instead of ``argmax``'s variadic one: inside the chunked loss
  reductions XLA:CPU runs these faster (batch-hard loss and gradient at ``B = 4096``,
  ``D = 512``: 85 ms against 140 ms with ``argmax``). A row with nothing masked gets ``R``.
  """
  fill = -jnp.inf if kind == "max" else jnp.inf
  x_CxR = jnp.where(mask_CxR, x_CxR, fill)
  best_C = (jnp.max if kind == "max" else jnp.min)(x_CxR, axis=1, keepdims=True)
  r = x_CxR.shape[1]
  cols_R = jnp.arange(r, dtype=jnp.int32)
  return jnp.min(jnp.where(mask_CxR & (x_CxR == best_C), cols_R, r), axis=1)


def _mined_distances(select, distance: str, emb: jax.Array, labels: jax.Array,
                     chunk_size: int, anchor_indices=None, valid=None, ref_embeddings=None,
                     ref_labels=None, ref_valid=None, ref_exclude=None):
  """Distances from each anchor to the K partners that ``select`` mines (private).

  ``select(dist_CxR, pos_CxR, neg_CxR) -> [C, K]`` integer partner rows (``-1`` for none,
  ``R`` for a partner it could not place, e.g. a NaN distance: its distance is NaN) runs as a :func:`_map_anchor_chunks` reduction on ``stop_gradient`` inputs, so its Gram
  product is formed once and never differentiated. The chosen distances are then formed
  directly from the gathered rows (as :func:`siamjax.distances.euclidean` would), so the
  gradient costs ``O(A K D)`` instead of two more ``[B, D] x [D, B]`` products. Where
  distances tie, ``select`` decides which partner gets the gradient.

  Returns:
    ``([A, K] distances, [A, K] found)``: the compute dtype (float32 for half inputs);
    distances are 0 where ``found`` is False.
  """
  sg = jax.lax.stop_gradient
  if ref_embeddings is not None:
    ref_embeddings = _checks.as_array("ref_embeddings", ref_embeddings)
  idx_AxK = _map_anchor_chunks(
      select, distance, sg(emb), labels, chunk_size, anchor_indices, valid,
      None if ref_embeddings is None else sg(ref_embeddings), ref_labels, ref_valid,
      ref_exclude, fill=-1)
  dtype = _compute_dtype(emb, *(() if ref_embeddings is None else (ref_embeddings,)))
  emb = _zero_padding(emb.astype(dtype), valid, _mask("valid", valid, emb.shape[0]))
  anchors_AxD = emb
  if anchor_indices is not None:
    anchors_AxD = anchors_AxD[_anchor_rows(anchor_indices, emb.shape[0])]
  partners_R = emb if ref_embeddings is None else _zero_padding(
      ref_embeddings.astype(dtype), ref_valid,
      _mask("ref_valid", ref_valid, ref_embeddings.shape[0]))
  r = partners_R.shape[0]
  found_AxK = idx_AxK >= 0
  # select found a partner but none at its extreme distance: that one is NaN
  nan_AxK = idx_AxK >= r

  @jax.checkpoint  # saves no [A, D] gather: the backward pass gathers again
  def partner_distance(anchors_AxD, partners_RxD, idx_A):
    chosen_AxD = partners_RxD[idx_A]
    if distance == "cosine":
      x_AxD, _ = _distances._gram_rows(anchors_AxD, distance)
      p_AxD, _ = _distances._gram_rows(chosen_AxD, distance)
      return 1.0 - jnp.sum(x_AxD * p_AxD, axis=-1)
    sq_A = jnp.sum(jnp.square(anchors_AxD - chosen_AxD), axis=-1)
    return _distances.safe_sqrt(sq_A) if distance == "euclidean" else sq_A

  dist_AxK = jnp.stack([partner_distance(anchors_AxD, partners_R, jnp.clip(idx_A, 0, r - 1))
                        for idx_A in idx_AxK.T], axis=1)
  dist_AxK = jnp.where(nan_AxK, jnp.nan, dist_AxK)
  return jnp.where(found_AxK, dist_AxK, 0.0), found_AxK


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
  if not all(x is None or _checks._is_concrete(x) for x in args):
    return None
  if ref_labels is None and (ref_valid is not None or ref_exclude is not None):
    return None  # a mistake that _map_anchor_chunks' checks name
  kw = dict(valid=valid, ref_labels=ref_labels, ref_valid=ref_valid, ref_exclude=ref_exclude)
  with jax.ensure_compile_time_eval():  # concrete inside jit too (labels closed over)
    n_pos = np.asarray(_positive_counts(labels, **kw))
    if anchor_indices is not None:
      n_pos = n_pos[np.asarray(_anchor_rows(anchor_indices, n_pos.shape[0]))]
  return int(n_pos.max()) if n_pos.size else 0


POSITIVE_SLOTS = (4, 16)
"""Slot counts the mining losses choose from when ``max_positives`` is None.

Batch-all and semi-hard mining do ``O(P * B)`` direct work per anchor with ``P`` slots for
its positives, or sort its negatives when it has more than the largest. At ``B = 4096``,
``D = 512`` (batch-all's loss and gradient, one run on a 2-core AMD EPYC) 4 slots take
0.29 s, 16 take 0.59 s and the sort 1.83 s.
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


def _same_and_partner(labels, valid=None, ref_labels=None, ref_valid=None, ref_exclude=None):
  """``[B, R]`` same-label and partner masks of each row against its partners (checked)."""
  labels = _checks.as_array("labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  _checks.rank("labels", labels, 1, "[batch] class ids")
  b = labels.shape[0]
  valid_B = _mask("valid", valid, b)
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
    ref_valid_R = _mask("ref_valid", ref_valid, ref_L.shape[0])
    exclude_B = _ref_exclude(ref_exclude, b, ref_L.shape[0])
    not_self = True if exclude_B is None else (
        exclude_B[:, None] != jnp.arange(ref_L.shape[0])[None, :])
  partner = not_self & valid_B[:, None] & ref_valid_R[None, :]
  return labels[:, None] == ref_L[None, :], partner


def _positive_counts(labels, *, valid=None, ref_labels=None, ref_valid=None, ref_exclude=None):
  """``[B]`` number of positive partners of each row (as :func:`valid_anchors` counts)."""
  same, partner = _same_and_partner(labels, valid, ref_labels, ref_valid, ref_exclude)
  return jnp.sum(same & partner, axis=1)


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


@_in_batch_doc
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
  emb, labels = _in_batch_inputs(embeddings, labels)
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
  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
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
  emb, labels = _in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def select(dist, pos, neg):  # [C, 2]: the farthest positive, the closest negative
    found = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    far_p = _first_row_index(pos, dist, "max")
    near_n = _first_row_index(neg, dist, "min")
    return jnp.where(found[:, None], jnp.stack([far_p, near_n], axis=1), -1)

  dist_Ax2, found_Ax2 = _mined_distances(select, distance, emb, labels, chunk_size,
                                         anchor_indices, valid, ref_embeddings, ref_labels,
                                         ref_valid, ref_exclude)
  found = found_Ax2[:, 0]
  gap = jnp.where(found, dist_Ax2[:, 0] - dist_Ax2[:, 1], 0.0)
  loss = jax.nn.softplus(gap) if soft else jnp.maximum(gap + margin, 0.0)
  return jnp.where(found, loss, 0.0)


@_in_batch_doc
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
  emb, labels = _in_batch_inputs(embeddings, labels)
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
  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
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
  emb, labels = _in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("margin", margin, allow_zero=True)

  def reduce(dist, pos, neg):
    y = pos.astype(dist.dtype)
    not_self = pos | neg
    per_pair = 0.5 * y * jnp.square(dist) + 0.5 * (1 - y) * jnp.square(
        jnp.maximum(margin - dist, 0.0))
    n = jnp.sum(not_self, axis=1)
    return jnp.sum(jnp.where(not_self, per_pair, 0.0), axis=1) / jnp.maximum(n, 1)

  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


def _finite_scalar(name: str, value) -> None:
  """Checks a hyper-parameter that may be any finite number (skipped for tracers)."""
  if _checks._is_concrete(value) and not np.isfinite(float(np.asarray(value))):
    raise ValueError(f"{name} must be finite, got {value}")


def _log1p_sum_exp(x_CxR, mask_CxR):
  """``log(1 + sum_mask exp(x))`` per row, stable, with finite gradients (0 on empty rows)."""
  x_m = jnp.where(mask_CxR, x_CxR, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.maximum(jnp.max(x_m, axis=1), 0.0))
  total_minus_one = jnp.expm1(-top) + jnp.sum(jnp.exp(x_m - top[:, None]), axis=1)
  return top + jnp.log1p(total_minus_one)  # log1p: exact when every term is tiny


def _masked_logsumexp(x_CxR, mask_CxR):
  """``logsumexp`` of each row's masked entries; 0 for a row with none (PML's convention)."""
  any_C = jnp.any(mask_CxR, axis=1)
  x_m = jnp.where(mask_CxR, x_CxR, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.where(any_C, jnp.max(x_m, axis=1), 0.0))
  total = jnp.sum(jnp.exp(x_m - top[:, None]), axis=1)
  return jnp.where(any_C, top + jnp.log(jnp.where(any_C, total, 1.0)), 0.0)


@_in_batch_doc
def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    distance: str = "cosine",
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """Multi-similarity loss (Wang et al. 2019), per anchor.

  With cosine similarities ``s`` (the default), anchor ``a`` costs

  ``1/alpha log(1 + sum_p exp(-alpha (s_ap - base))) +
  1/beta log(1 + sum_n exp(beta (s_an - base)))``

  over its positives ``p`` and negatives ``n`` (no pair mining: combine it with your
  own, as pytorch-metric-learning separates ``MultiSimilarityMiner``). With a distance
  ``d`` (``"euclidean"``, ``"squared_euclidean"``) the signs flip as in PML:
  ``exp(alpha (d_ap - base))`` and ``exp(beta (base - d_an))``.

  Exception to the module's "0 for an anchor without pairs" rule: each term is kept on
  its own, so an anchor without positives still pays its negative term and one without
  negatives its positive term (PML's element loss); only an anchor with no partner at
  all gets 0. Anchors carrying a loss: ``valid_anchors(labels, need="any")``.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    alpha: scale of the positive term.
    beta: scale of the negative term.
    base: the similarity (or distance) around which pairs are weighed.
    distance: ``"cosine"`` (default: similarity ``1 - d``), ``"euclidean"`` or
      ``"squared_euclidean"``.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses; ``jnp.mean`` of it equals
    ``pytorch_metric_learning.losses.MultiSimilarityLoss(alpha, beta, base)``.

  References:
    X. Wang, X. Han, W. Huang, D. Dong, M. R. Scott, "Multi-Similarity Loss with General
    Pair Weighting for Deep Metric Learning", CVPR 2019, eq. (12) without its mining.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  >>> [round(v, 4) for v in multi_similarity_loss(emb, jnp.array([0, 0, 1])).tolist()]
  [0.1566, 0.1566, 0.0]
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  for name, v in (("alpha", alpha), ("beta", beta)):
    _checks.positive_scalar(name, v)
  _finite_scalar("base", base)
  sign = -1.0 if distance == "cosine" else 1.0  # PML: similarities count the other way

  def reduce(dist, pos, neg):
    v = 1.0 - dist if distance == "cosine" else dist
    pos_term = _log1p_sum_exp(alpha * sign * (v - base), pos) / alpha
    neg_term = _log1p_sum_exp(beta * sign * (base - v), neg) / beta
    return pos_term + neg_term

  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
def circle_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.4,
    gamma: float = 80.0,
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """Circle loss (Sun et al. 2020) on cosine similarities, per anchor.

  ``softplus(logsumexp_p(-gamma a_p (s_ap - (1 - m))) + logsumexp_n(gamma a_n (s_an - m)))``
  with the weights ``a_p = relu(1 + m - s_ap)`` and ``a_n = relu(s_an + m)`` held
  constant in the gradient (``stop_gradient``), as in the paper and PML. An anchor without
  a positive or a negative gets 0 (``valid_anchors(labels)``). The loss is defined on
  cosine similarity only, so there is no ``distance`` argument.

  Args:
    embeddings: ``[B, D]`` floating embeddings (normalised inside).
    labels: ``[B]`` integer class ids.
    margin: the relaxation ``m``.
    gamma: the scale.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses, equal to the element losses of
    ``pytorch_metric_learning.losses.CircleLoss(m=margin, gamma=gamma)`` (whose default
    reducer then averages over the nonzero ones).

  References:
    Y. Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
    CVPR 2020, eq. (6).

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
  >>> loss = circle_loss(emb, jnp.array([0, 0, 1, 1]))
  >>> bool(jnp.all(loss < 1e-3))
  True
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  _finite_scalar("margin", margin)
  _checks.positive_scalar("gamma", gamma)

  def reduce(dist, pos, neg):
    s = 1.0 - dist
    s_const = jax.lax.stop_gradient(s)
    logit_p = -gamma * jnp.maximum(1.0 + margin - s_const, 0.0) * (s - (1.0 - margin))
    logit_n = gamma * jnp.maximum(s_const + margin, 0.0) * (s - margin)
    z = _masked_logsumexp(logit_p, pos) + _masked_logsumexp(logit_n, neg)
    both = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    return jnp.where(both, jax.nn.softplus(jnp.where(both, z, 0.0)), 0.0)

  return _map_anchor_chunks(reduce, "cosine", emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
def lifted_structure_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "euclidean",
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """Generalized lifted structure loss (Hermans et al. 2017), per anchor.

  ``relu(logsumexp_p(d_ap - pos_margin) + logsumexp_n(neg_margin - d_an))``, an empty
  logsumexp counting as 0. With ``distance="cosine"`` the margins apply to
  ``d = 1 - cos``.

  Exception to the module's "0 for an anchor without pairs" rule: an anchor without
  positives still pays its negative term and one without negatives its positive term
  (PML's element loss); only an anchor with no partner at all gets 0. Anchors carrying a
  loss: ``valid_anchors(labels, need="any")``.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    pos_margin: positives closer than this cost less.
    neg_margin: negatives farther than this cost less.
    distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"``.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses, equal to the element losses of
    ``pytorch_metric_learning.losses.GeneralizedLiftedStructureLoss(neg_margin,
    pos_margin, distance=LpDistance(normalize_embeddings=False))`` (whose default
    reducer is the mean).

  References:
    A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv:1703.07737, 2017, section 2 (generalizing H. O. Song et
    al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016).

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.5], [3.0]])
  >>> [round(v, 4) for v in lifted_structure_loss(emb, jnp.array([0, 0, 1])).tolist()]
  [0.0, 0.0, 0.0]
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  _finite_scalar("pos_margin", pos_margin)
  _finite_scalar("neg_margin", neg_margin)

  def reduce(dist, pos, neg):
    z = _masked_logsumexp(dist - pos_margin, pos) + _masked_logsumexp(neg_margin - dist, neg)
    return jnp.maximum(z, 0.0)

  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
def ntxent_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """NT-Xent (normalised temperature-scaled cross-entropy), per anchor.

  With cosine similarities ``s`` scaled by ``1 / temperature``, each positive pair
  ``(a, p)`` costs ``-log(exp(s_ap) / (exp(s_ap) + sum_n exp(s_an)))`` over the anchor's
  negatives ``n``; an anchor's value is the mean over its positives. When every anchor
  has the same number of positives, ``jnp.mean`` of the result equals
  ``optax.losses.ntxent``.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    temperature: softmax temperature.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses (0 for anchors without a positive; an anchor without
    negatives gets exactly 0 too: ``valid_anchors(labels)``), the per-anchor mean of
    PML's ``NTXentLoss(temperature)`` positive-pair losses, with ``ref_emb`` too.

  References:
    T. Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), ICML 2020.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  >>> [round(v, 4) for v in ntxent_loss(emb, jnp.array([0, 0, 1, 1]), temperature=1.0).tolist()]
  [0.5514, 0.5514, 0.5514, 0.5514]
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("temperature", temperature)

  def reduce(dist, pos, neg):
    logits = (1.0 - dist) / temperature  # cosine similarity / temperature
    not_self = pos | neg
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(not_self, logits, -jnp.inf), axis=1))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)[:, None]
    neg_sum = jnp.sum(jnp.where(neg, jnp.exp(logits - shift), 0.0), axis=1, keepdims=True)
    per_pair = -(logits - shift) + jnp.log(jnp.exp(logits - shift) + neg_sum)
    n_pos = jnp.sum(pos, axis=1)
    total = jnp.sum(jnp.where(pos, per_pair, 0.0), axis=1)
    # Without negatives every term is log(exp(l)) - l = 0: exactly 0, not its rounding.
    has_both = (n_pos > 0) & jnp.any(neg, axis=1)
    return jnp.where(has_both, total / jnp.maximum(n_pos, 1), 0.0)

  return _map_anchor_chunks(reduce, "cosine", emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@_in_batch_doc
def in_batch_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    distance: str = "squared_euclidean",
    chunk_size: int = 256,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    ref_embeddings: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    ref_valid: jax.Array | None = None,
    ref_exclude: jax.Array | None = None,
) -> jax.Array:
  """In-batch softmax over negative distances (n-pair / one-shot prototypical loss), per anchor.

  Anchor ``i`` costs ``-mean_p log softmax_j(-d(e_i, e_j) / temperature)[p]`` where the
  softmax runs over every other embedding ``j != i`` of the batch and ``p`` over the
  anchor's positives. With two samples per class this is the n-pair loss; it is the loss
  of the Omniglot ``quick`` preset (:mod:`siamjax.recipes.omniglot_koch`; its result is
  in the README's results table and ``experiments/results/omniglot_koch_quick.json``).
  Per anchor it equals the element losses of pytorch-metric-learning's
  ``SupConLoss(temperature, distance=LpDistance(normalize_embeddings=False, power=2))``
  (``CosineSimilarity()`` for ``"cosine"``). An anchor with positives but no negatives
  still carries a loss when it has two positives or more (the softmax then runs over its
  positives): its anchors are ``valid_anchors(labels, need="positive")``.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids.
    temperature: divides the negative distances before the softmax.
    distance: ``"squared_euclidean"`` (default), ``"euclidean"`` or ``"cosine"``.
    {in_batch_args}

  Returns:
    ``[B]`` per-anchor losses (0 for anchors without a positive).

  References:
    K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
    NeurIPS 2016; J. Snell, K. Swersky, R. Zemel, "Prototypical Networks for Few-shot
    Learning", NeurIPS 2017.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[0.0], [0.0], [10.0], [10.0]])
  >>> [round(v, 4) for v in in_batch_softmax_loss(emb, jnp.array([0, 0, 1, 1])).tolist()]
  [0.0, 0.0, 0.0, 0.0]
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("temperature", temperature)

  def reduce(dist, pos, neg):
    partner = pos | neg
    has_partner = jnp.any(partner, axis=1, keepdims=True)  # else a finite dummy row
    logits = jnp.where(partner, -dist / temperature, jnp.where(has_partner, -jnp.inf, 0.0))
    log_p = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    n_pos = jnp.sum(pos, axis=1)
    total = jnp.sum(jnp.where(pos, log_p, 0.0), axis=1)
    return jnp.where(n_pos > 0, -total / jnp.maximum(n_pos, 1), 0.0)

  return _map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


# ---------------------------------------------------------------------------------
# Proxy and margin-softmax losses
# ---------------------------------------------------------------------------------
#
# These losses compare each embedding with a matrix of class vectors ``[C, D]`` (proxies
# or classifier weights) that the caller owns and trains with the encoder, instead of
# with the other embeddings of the batch: no P x K batches are needed and the cost is
# one ``[B, C]`` matrix product. Labels must be class ids in ``[0, C)``: outside ``jit``
# anything else raises ``ValueError``; under ``jit`` (where values are unknown) an
# out-of-range label gives NaN for its anchor instead of a silently clamped index.
# float16/bfloat16 inputs are computed and returned in float32, as everywhere here.


def _proxy_inputs(embeddings, labels, class_name: str, classes, valid):
  """Checks ``[B, D]`` embeddings, ``[B]`` labels, ``[C, D]`` classes and the valid mask.

  Returns ``(emb, classes, labels, valid, in_range)`` with ``emb`` and ``classes`` in
  their common dtype (float32 for half-precision inputs, as the in-batch losses).
  """
  emb, labels = _in_batch_inputs(embeddings, labels)
  classes = _checks.floating(class_name, classes)
  _checks.rank(class_name, classes, 2, "[C, D], one row per class")
  _checks.nonempty(class_name, classes)
  if classes.shape[1] != emb.shape[1]:
    raise ValueError(f"{class_name} must be [C, D] with the embeddings' D = {emb.shape[1]}, "
                     f"got shape {classes.shape}")
  n_classes = classes.shape[0]
  valid = _mask("valid", valid, emb.shape[0])
  if _checks._is_concrete(labels) and _checks._is_concrete(valid):
    bad = np.asarray(labels)[np.asarray(valid)]
    bad = bad[(bad < 0) | (bad >= n_classes)]
    if bad.size:
      raise ValueError(f"labels must be class ids in [0, {n_classes}) (one row of "
                       f"{class_name} per class), found {sorted(set(bad.tolist()))[:5]}")
  in_range = (labels >= 0) & (labels < n_classes)
  dtype = _compute_dtype(emb, classes)
  return emb.astype(dtype), classes.astype(dtype), labels, valid, in_range


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of ``x`` divided by ``max(||x||, 1e-12)`` (``torch.nn.functional.normalize``)."""
  norm = _distances.safe_sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def _cosine_to_classes(emb: jax.Array, classes: jax.Array) -> jax.Array:
  """``[B, C]`` cosine similarities between the rows of ``emb`` and of ``classes``."""
  return jnp.matmul(_l2_normalize(emb), _l2_normalize(classes).T,
                    precision=jax.lax.Precision.HIGHEST)


def _softmax_cross_entropy(logits, labels, valid, in_range):
  """Per-row ``logsumexp(logits) - logits[label]``: 0 where not valid, NaN out of range."""
  n_classes = logits.shape[1]
  target = jnp.take_along_axis(logits, jnp.clip(labels, 0, n_classes - 1)[:, None], axis=1)
  loss = jax.nn.logsumexp(logits, axis=1) - target[:, 0]
  loss = jnp.where(in_range, loss, jnp.nan)
  return jnp.where(valid, loss, 0.0)


def _target_mask(labels, n_classes):
  return labels[:, None] == jnp.arange(n_classes)[None, :]


def proxy_nca_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    scale: float = 1.0,
    valid: jax.Array | None = None,
) -> jax.Array:
  """ProxyNCA: each embedding against one learned proxy per class, per anchor.

  Embeddings and proxies are L2-normalised; anchor ``i`` costs
  ``-log softmax_c(-scale * ||x_i - p_c||^2)[y_i]`` with the softmax over all ``C``
  proxies (its own included). On unit vectors ``-||x - p||^2 = 2 cos(x, p) - 2``, so this
  is the softmax cross-entropy of the logits ``2 * scale * cos(x_i, p_c)``, which is how
  it is computed (exactly, with no underflow of the positive's probability).

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids in ``[0, C)``.
    proxies: ``[C, D]`` class proxies, a parameter trained with the encoder (any
      initialisation, e.g. ``jax.random.normal``; their norm does not matter).
    scale: multiplies the negative squared distances (PML's ``softmax_scale``); larger
      values sharpen the softmax.
    valid: optional ``[B]`` bool mask; rows that are False get 0 (e.g. padding).

  Returns:
    ``[B]`` per-anchor losses. ``jnp.mean`` of it equals pytorch-metric-learning's
    ``ProxyNCALoss(num_classes=C, embedding_size=D, softmax_scale=scale)`` whose
    ``proxies`` hold the same values; with ``valid``, average as
    ``jnp.sum(loss) / jnp.maximum(jnp.sum(valid), 1)``.

  References:
    Y. Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies",
    ICCV 2017.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [0.0, 2.0]]); proxies = jnp.eye(2)
  >>> [round(v, 4) for v in proxy_nca_loss(emb, jnp.array([0, 1]), proxies).tolist()]
  [0.1269, 0.1269]
  """
  emb, proxies, labels, valid, in_range = _proxy_inputs(
      embeddings, labels, "proxies", proxies, valid)
  _checks.positive_scalar("scale", scale)
  logits = 2.0 * scale * _cosine_to_classes(emb, proxies)
  return _softmax_cross_entropy(logits, labels, valid, in_range)


def _masked_log1p_sum_exp(x, mask, axis):
  """``log(1 + sum_{mask} exp(x))`` along ``axis``, stable; 0 where the mask is empty."""
  x = jnp.where(mask, x, -jnp.inf)
  shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0))
  total = jnp.exp(-shift) + jnp.sum(jnp.where(mask, jnp.exp(x - shift), 0.0), axis=axis,
                                    keepdims=True)
  return jnp.squeeze(jnp.log(total) + shift, axis)


def proxy_anchor_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    proxies: jax.Array,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    valid: jax.Array | None = None,
) -> jax.Array:
  """Proxy-Anchor loss, a scalar: the loss is defined over proxies, not over anchors.

  With ``s_ic`` the cosine similarity of embedding ``i`` and proxy ``c``, ``P_c`` the
  batch's embeddings of class ``c`` and ``N_c`` the others,

  ``L = 1/|C+| sum_{c in C+} log(1 + sum_{i in P_c} exp(-alpha (s_ic - margin)))
  + 1/C sum_c log(1 + sum_{i in N_c} exp(alpha (s_ic + margin)))``

  where ``C+`` is the set of proxies with at least one sample in the batch. Each proxy
  pulls its class and pushes everything else with a weight that grows with the
  violation, so there is no per-anchor decomposition and, unlike the rest of this
  module, the function returns the reduced value.

  Args:
    embeddings: ``[B, D]`` floating embeddings.
    labels: ``[B]`` integer class ids in ``[0, C)``.
    proxies: ``[C, D]`` class proxies, a parameter trained with the encoder (the paper
      initialises them with Kaiming-normal and trains them with a 100x learning rate).
    margin: the cosine margin ``delta``.
    alpha: the scale of the log-sum-exp.
    valid: optional ``[B]`` bool mask; rows that are False take no part (padding).

  Returns:
    a scalar; equal to pytorch-metric-learning's ``ProxyAnchorLoss(num_classes=C,
    embedding_size=D, margin=margin, alpha=alpha)`` whose ``proxies`` hold the same
    values (PML's reducer divides the positive terms by ``|C+|`` and the negative terms
    by ``C`` as above). 0 for a batch without valid rows.

  References:
    S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020, eq. (4).

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [0.0, 1.0]]); proxies = jnp.eye(2)
  >>> round(float(proxy_anchor_loss(emb, jnp.array([0, 1]), proxies)), 4)
  3.24
  """
  emb, proxies, labels, valid, in_range = _proxy_inputs(
      embeddings, labels, "proxies", proxies, valid)
  _checks.positive_scalar("margin", margin, allow_zero=True)
  _checks.positive_scalar("alpha", alpha)
  n_classes = proxies.shape[0]
  cos = _cosine_to_classes(emb, proxies)
  target = _target_mask(labels, n_classes)
  pos = target & valid[:, None]
  neg = ~target & valid[:, None]
  pos_term = _masked_log1p_sum_exp(alpha * (margin - cos), pos, axis=0)  # [C]
  neg_term = _masked_log1p_sum_exp(alpha * (cos + margin), neg, axis=0)  # [C]
  n_with_pos = jnp.sum(jnp.any(pos, axis=0))
  loss = (jnp.where(n_with_pos > 0, jnp.sum(pos_term) / jnp.maximum(n_with_pos, 1), 0.0)
          + jnp.sum(neg_term) / n_classes)
  return jnp.where(jnp.all(in_range | ~valid), loss, jnp.nan)


def arcface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    valid: jax.Array | None = None,
) -> jax.Array:
  """ArcFace (additive angular margin) softmax loss, per anchor.

  With ``theta`` the angle between embedding ``i`` and its class's weight row, the
  target logit is ``scale * cos(theta + margin)`` and every other logit
  ``scale * cos(theta_c)``; the loss is the softmax cross-entropy. Where
  ``theta > pi - margin`` (so that ``cos(theta + m)`` would stop decreasing) the target
  logit is ``scale * (cos(theta) - margin * sin(margin))`` instead, pytorch-metric-
  learning's fallback. ``cos(theta + m)`` is computed as ``cos t cos m - sin t sin m``
  with ``sin t = sqrt(1 - cos^2 t)``, whose gradient is finite also at ``theta = 0``.

  Args:
    embeddings: ``[B, D]`` floating embeddings (L2-normalised inside).
    labels: ``[B]`` integer class ids in ``[0, C)``.
    weights: ``[C, D]`` class weights (normalised inside), a parameter trained with the
      encoder. pytorch-metric-learning stores the transpose, ``W`` of shape ``[D, C]``.
    margin: the additive angular margin in **radians** (0.5 rad = 28.6 degrees;
      pytorch-metric-learning's ``ArcFaceLoss`` takes degrees).
    scale: the logit scale ``s``.
    valid: optional ``[B]`` bool mask; rows that are False get 0.

  Returns:
    ``[B]`` per-anchor losses; ``jnp.mean`` of it equals pytorch-metric-learning's
    ``ArcFaceLoss(num_classes=C, embedding_size=D, margin=np.degrees(margin),
    scale=scale)`` with ``W = weights.T``.

  References:
    J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for
    Deep Face Recognition", CVPR 2019.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [0.0, 1.0]]); w = jnp.eye(2)
  >>> [round(v, 4) for v in arcface_loss(emb, jnp.array([0, 1]), w, scale=4.0).tolist()]
  [0.0294, 0.0294]
  """
  emb, weights, labels, valid, in_range = _proxy_inputs(
      embeddings, labels, "weights", weights, valid)
  _checks.positive_scalar("margin", margin, allow_zero=True)
  _checks.positive_scalar("scale", scale)
  if _checks._is_concrete(margin) and float(margin) >= jnp.pi:
    raise ValueError(f"margin is in radians and must be < pi, got {float(margin)}")
  cos = _cosine_to_classes(emb, weights)
  target = _target_mask(labels, weights.shape[0])
  c = jnp.clip(cos, -1.0, 1.0)
  sin = _distances.safe_sqrt(jnp.maximum(1.0 - jnp.square(c), 0.0))
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  with_margin = jnp.where(c >= -cos_m, c * cos_m - sin * sin_m, c - margin * sin_m)
  logits = scale * jnp.where(target, with_margin, cos)
  return _softmax_cross_entropy(logits, labels, valid, in_range)


def cosface_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    valid: jax.Array | None = None,
) -> jax.Array:
  """CosFace (large margin cosine) softmax loss, per anchor.

  The target logit is ``scale * (cos(theta_y) - margin)`` and every other logit
  ``scale * cos(theta_c)``, with ``theta`` the angle between the embedding and a class's
  weight row; the loss is the softmax cross-entropy.

  Args:
    embeddings: ``[B, D]`` floating embeddings (L2-normalised inside).
    labels: ``[B]`` integer class ids in ``[0, C)``.
    weights: ``[C, D]`` class weights (normalised inside), a parameter trained with the
      encoder. pytorch-metric-learning stores the transpose, ``W`` of shape ``[D, C]``.
    margin: the cosine margin ``m``.
    scale: the logit scale ``s``.
    valid: optional ``[B]`` bool mask; rows that are False get 0.

  Returns:
    ``[B]`` per-anchor losses; ``jnp.mean`` of it equals pytorch-metric-learning's
    ``CosFaceLoss(num_classes=C, embedding_size=D, margin=margin, scale=scale)`` with
    ``W = weights.T``.

  References:
    H. Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
    CVPR 2018.

  >>> import jax.numpy as jnp
  >>> emb = jnp.array([[1.0, 0.0], [0.0, 1.0]]); w = jnp.eye(2)
  >>> [round(v, 4) for v in cosface_loss(emb, jnp.array([0, 1]), w, scale=4.0).tolist()]
  [0.0716, 0.0716]
  """
  emb, weights, labels, valid, in_range = _proxy_inputs(
      embeddings, labels, "weights", weights, valid)
  _checks.positive_scalar("margin", margin, allow_zero=True)
  _checks.positive_scalar("scale", scale)
  cos = _cosine_to_classes(emb, weights)
  target = _target_mask(labels, weights.shape[0])
  logits = scale * jnp.where(target, cos - margin, cos)
  return _softmax_cross_entropy(logits, labels, valid, in_range)
