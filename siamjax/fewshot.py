"""Few-shot classification: class prototypes and nearest-prototype prediction.

* Prototypes and nearest-prototype classification (:func:`prototypes`,
  :func:`nearest_prototype`), host-side :func:`accuracy` and :func:`confusion_matrix`.

The THUCNews recipe (:mod:`siamjax.recipes.thucnews`) classifies titles with these, on
embeddings of the bag-of-n-grams encoder (:mod:`siamjax.bag`) or the TextCNN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances

__all__ = ["prototypes", "nearest_prototype", "accuracy", "confusion_matrix"]


def prototypes(embeddings: jax.Array, labels: jax.Array, num_classes: int, *,
               reduce: str = "mean") -> jax.Array:
  """Class support vectors: the mean (or sum) of each class's embeddings.

  Args:
    embeddings: ``[N, D]`` support embeddings.
    labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    reduce: ``"mean"`` (prototypical networks) or ``"sum"`` (the seed's support vector).

  Returns:
    ``[C, D]`` prototypes (a class without support gets zeros).

  References:
    J. Snell, K. Swersky, R. Zemel, "Prototypical Networks for Few-shot Learning",
    NeurIPS 2017.

  >>> emb = jnp.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
  >>> prototypes(emb, jnp.array([0, 0, 1]), 2).tolist()
  [[1.0, 1.0], [4.0, 4.0]]
  """
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[N, D]")
  labels = _checks.class_labels("labels", labels, emb.shape[0])
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
  total = jax.ops.segment_sum(emb, labels, num_segments=num_classes)
  if reduce == "sum":
    return total
  count = jax.ops.segment_sum(jnp.ones_like(labels, emb.dtype), labels,
                              num_segments=num_classes)
  return total / jnp.maximum(count, 1.0)[:, None]


def nearest_prototype(queries: jax.Array, protos: jax.Array, *,
                      distance: str = "cosine") -> tuple[jax.Array, jax.Array]:
  """Classifies each query by its nearest prototype.

  Args:
    queries: ``[Q, D]`` query embeddings (each encoded once).
    protos: ``[C, D]`` prototypes.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

  Returns:
    ``(predictions [Q] int32, distances [Q, C])``.

  >>> q = jnp.array([[0.9, 0.1], [0.0, 1.0]]); p = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> nearest_prototype(q, p)[0].tolist()
  [0, 1]
  """
  q = _checks.floating("queries", queries)
  _checks.rank("queries", q, 2, "[Q, D]")
  p = _checks.floating("protos", protos)
  _checks.rank("protos", p, 2, "[C, D]")
  if q.shape[1] != p.shape[1]:
    raise ValueError(f"queries have dim {q.shape[1]} but protos have dim {p.shape[1]}")
  dist_QxC = _distances.pairwise_distances(q, p, distance=distance)
  return jnp.argmin(dist_QxC, axis=1).astype(jnp.int32), dist_QxC


def accuracy(predictions, labels) -> float:
  """Fraction of ``predictions`` equal to ``labels`` (host-side, both ``[Q]``)."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
  return float(np.mean(predictions == labels))


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
  """``[C, C]`` counts: row = true class, column = predicted class.

  >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
  [[1, 1], [0, 1]]
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, predictions), 1)
  return out
