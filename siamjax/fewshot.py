"""Few-shot classification primitives: prototypes, a bag-of-n-grams encoder, views.

* Prototypes and nearest-prototype classification (:func:`prototypes`,
  :func:`nearest_prototype`), host-side :func:`accuracy` and :func:`confusion_matrix`.
* A bag-of-n-grams text encoder as a pure function over a parameter dict
  (:func:`init_bag`, :func:`bag_embed`), and chunked embedding of many rows
  (:func:`embed_all`).
* :func:`split_views`: each title's tokens split at random into two disjoint views, the
  positive pair of split-view self-supervised pre-training.

Training lives elsewhere: the THUCNews recipe (:mod:`siamjax.recipes.thucnews`) trains
the seed's TextCNN pair model and the bags' split-view pre-training and fine-tuning
through :func:`siamjax.train.run` with these primitives; its pairs come from
:func:`siamjax.sampling.exhaustive_pairs`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax import distances as _distances

__all__ = ["prototypes", "nearest_prototype", "accuracy", "confusion_matrix", "init_bag",
           "bag_embed", "split_views", "embed_all"]

Params = Any


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


def init_bag(key: jax.Array, vocab_size: int, dim: int = 128) -> Params:
  """Parameters of :func:`bag_embed`: ``{"embed": [vocab_size, dim]}`` (row 0 = padding)."""
  if vocab_size < 2 or dim < 1:
    raise ValueError(f"vocab_size must be >= 2 and dim >= 1, got {vocab_size}, {dim}")
  return {"embed": 0.1 * jax.random.normal(key, (vocab_size, dim), jnp.float32)}


def bag_embed(params: Params, tokens: jax.Array, keep: jax.Array | None = None) -> jax.Array:
  """Mean of the n-gram embeddings of each title (padding and ``~keep`` ignored).

  Args:
    params: from :func:`init_bag`.
    tokens: ``[B, L]`` int ids, 0 = padding.
    keep: optional ``[B, L]`` bool mask of the tokens to use (a view).

  Returns:
    ``[B, D]`` embeddings (zeros for a title with no token kept).

  >>> p = {"embed": jnp.array([[9.0], [1.0], [3.0]])}
  >>> bag_embed(p, jnp.array([[1, 2, 0]])).tolist()
  [[2.0]]
  """
  mask_BxL = tokens > 0
  if keep is not None:
    mask_BxL = mask_BxL & keep
  w_BxL = mask_BxL.astype(jnp.float32)
  emb_BxLxD = jnp.take(params["embed"], tokens, axis=0)
  total_BxD = jnp.einsum("bl,bld->bd", w_BxL, emb_BxLxD)
  return total_BxD / jnp.maximum(jnp.sum(w_BxL, axis=1, keepdims=True), 1.0)


def embed_all(embed_fn: Callable, params: Params, tokens: np.ndarray, *,
              chunk: int = 2048) -> jax.Array:
  """Embeds ``[N, L]`` tokens in chunks of ``chunk`` rows with one jitted ``lax.map``."""
  n = tokens.shape[0]
  n_chunks = -(-n // chunk)
  padded = np.zeros((n_chunks * chunk, tokens.shape[1]), tokens.dtype)
  padded[:n] = tokens

  @jax.jit
  def run(params, tok):
    out = jax.lax.map(lambda t: embed_fn(params, t), tok.reshape(n_chunks, chunk, -1))
    return out.reshape(n_chunks * chunk, -1)

  return run(params, jnp.asarray(padded))[:n]


def split_views(key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits each title's tokens at random into two disjoint views (a fair coin each).

  Unlike SimCSE-style dropout views, two disjoint halves of a bag of n-grams cannot be
  matched by copying, so the pre-training task stays hard.

  Args:
    key: PRNG key.
    tokens: ``[B, L]`` token ids.

  Returns:
    ``(keep_a, keep_b)``, ``[B, L]`` bool masks with ``keep_a & keep_b`` all False.
  """
  coin_BxL = jax.random.bernoulli(key, 0.5, tokens.shape)
  return coin_BxL, ~coin_BxL
