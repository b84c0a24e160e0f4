"""Pair-weighting losses over a batch: multi-similarity, circle and lifted structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax.losses._chunked import (in_batch_doc, in_batch_inputs, log1p_sum_exp,
                                     map_anchor_chunks)


def _finite_scalar(name: str, value) -> None:
  """Checks a hyper-parameter that may be any finite number (skipped for tracers)."""
  if _checks.is_concrete(value) and not np.isfinite(float(np.asarray(value))):
    raise ValueError(f"{name} must be finite, got {value}")


def _masked_logsumexp(x_CxR, mask_CxR):
  """``logsumexp`` of each row's masked entries; 0 for a row with none (PML's convention)."""
  any_C = jnp.any(mask_CxR, axis=1)
  x_m = jnp.where(mask_CxR, x_CxR, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.where(any_C, jnp.max(x_m, axis=1), 0.0))
  total = jnp.sum(jnp.exp(x_m - top[:, None]), axis=1)
  return jnp.where(any_C, top + jnp.log(jnp.where(any_C, total, 1.0)), 0.0)


@in_batch_doc
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
  emb, labels = in_batch_inputs(embeddings, labels)
  for name, v in (("alpha", alpha), ("beta", beta)):
    _checks.positive_scalar(name, v)
  _finite_scalar("base", base)
  sign = -1.0 if distance == "cosine" else 1.0  # PML: similarities count the other way

  def reduce(dist, pos, neg):
    v = 1.0 - dist if distance == "cosine" else dist
    pos_term = log1p_sum_exp(alpha * sign * (v - base), pos, axis=1) / alpha
    neg_term = log1p_sum_exp(beta * sign * (base - v), neg, axis=1) / beta
    return pos_term + neg_term

  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@in_batch_doc
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
  emb, labels = in_batch_inputs(embeddings, labels)
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

  return map_anchor_chunks(reduce, "cosine", emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@in_batch_doc
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
  emb, labels = in_batch_inputs(embeddings, labels)
  _finite_scalar("pos_margin", pos_margin)
  _finite_scalar("neg_margin", neg_margin)

  def reduce(dist, pos, neg):
    z = _masked_logsumexp(dist - pos_margin, pos) + _masked_logsumexp(neg_margin - dist, neg)
    return jnp.maximum(z, 0.0)

  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)
