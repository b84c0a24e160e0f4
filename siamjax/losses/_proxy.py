"""Proxy and margin-softmax losses: Proxy-NCA, Proxy-Anchor, ArcFace and CosFace.

These losses compare each embedding with a matrix of class vectors ``[C, D]`` (proxies
or classifier weights) that the caller owns and trains with the encoder, instead of
with the other embeddings of the batch: no P x K batches are needed and the cost is
one ``[B, C]`` matrix product. Labels must be class ids in ``[0, C)``: outside ``jit``
anything else raises ``ValueError``; under ``jit`` (where values are unknown) an
out-of-range label gives NaN for its anchor instead of a silently clamped index.
float16/bfloat16 inputs are computed and returned in float32, as everywhere here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances
from siamjax.losses._chunked import compute_dtype, in_batch_inputs, log1p_sum_exp


def _proxy_inputs(embeddings, labels, class_name: str, classes, valid):
  """Checks ``[B, D]`` embeddings, ``[B]`` labels, ``[C, D]`` classes and the valid mask.

  Returns ``(emb, classes, labels, valid, in_range)`` with ``emb`` and ``classes`` in
  their common dtype (float32 for half-precision inputs, as the in-batch losses).
  """
  emb, labels = in_batch_inputs(embeddings, labels)
  classes = _checks.floating(class_name, classes)
  _checks.rank(class_name, classes, 2, "[C, D], one row per class")
  _checks.nonempty(class_name, classes)
  if classes.shape[1] != emb.shape[1]:
    raise ValueError(f"{class_name} must be [C, D] with the embeddings' D = {emb.shape[1]}, "
                     f"got shape {classes.shape}")
  n_classes = classes.shape[0]
  valid = _checks.row_mask("valid", valid, emb.shape[0])
  if _checks.is_concrete(labels) and _checks.is_concrete(valid):
    bad = np.asarray(labels)[np.asarray(valid)]
    bad = bad[(bad < 0) | (bad >= n_classes)]
    if bad.size:
      raise ValueError(f"labels must be class ids in [0, {n_classes}) (one row of "
                       f"{class_name} per class), found {sorted(set(bad.tolist()))[:5]}")
  in_range = (labels >= 0) & (labels < n_classes)
  dtype = compute_dtype(emb, classes)
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
  pos_term = log1p_sum_exp(alpha * (margin - cos), pos, axis=0)  # [C]
  neg_term = log1p_sum_exp(alpha * (cos + margin), neg, axis=0)  # [C]
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
  if _checks.is_concrete(margin) and float(margin) >= jnp.pi:
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
