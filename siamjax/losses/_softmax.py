"""Softmax losses over a batch: NT-Xent and the in-batch softmax (multiple negatives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from siamjax import _checks
from siamjax.losses._chunked import in_batch_doc, in_batch_inputs, map_anchor_chunks


@in_batch_doc
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
  emb, labels = in_batch_inputs(embeddings, labels)
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

  return map_anchor_chunks(reduce, "cosine", emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)


@in_batch_doc
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
  emb, labels = in_batch_inputs(embeddings, labels)
  _checks.positive_scalar("temperature", temperature)

  def reduce(dist, pos, neg):
    partner = pos | neg
    has_partner = jnp.any(partner, axis=1, keepdims=True)  # else a finite dummy row
    logits = jnp.where(partner, -dist / temperature, jnp.where(has_partner, -jnp.inf, 0.0))
    log_p = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    n_pos = jnp.sum(pos, axis=1)
    total = jnp.sum(jnp.where(pos, log_p, 0.0), axis=1)
    return jnp.where(n_pos > 0, -total / jnp.maximum(n_pos, 1), 0.0)

  return map_anchor_chunks(reduce, distance, emb, labels, chunk_size, anchor_indices,
                            valid, ref_embeddings, ref_labels, ref_valid,
                            ref_exclude)
