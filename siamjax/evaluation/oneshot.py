"""N-way one-shot classification, scored on the device in one jitted call.

A task set is ``support [T, N, ...]`` (one image per class), ``query [T, Q, ...]`` and
``answers [T, Q]`` (the index in ``support`` of each query's class). Every image is
encoded once (``T * (N + Q)`` images, in chunks), each query is scored against its
task's ``N`` support embeddings, and the prediction is the argmax. Lake's 20 runs are
such a task set with ``T = N = Q = 20`` (:func:`siamjax.data.omniglot.load_lake_runs`);
:func:`siamjax.sampling.sample_oneshot_tasks` (re-exported here) draws random ones on the device.

Models enter as two functions of a ``variables`` pytree (traced, so new parameters do
not recompile): ``embed_fn(variables, images [B, ...]) -> [B, D]`` and
``score_fn(variables, h_query [..., D], h_support [..., D]) -> [...]`` (larger = more
alike), e.g. the Siamese net's own weighted-L1 head, or :func:`neg_squared_euclidean`
(which ignores ``variables``). Pass the same function objects every time (they are static
arguments of the jitted call).

References:
  B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum, Science 2015 (the 20-way within-alphabet
  runs). G. Koch, R. Zemel, R. Salakhutdinov, ICML DL Workshop 2015.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks
from siamjax.sampling import sample_oneshot_tasks  # noqa: F401  (re-exported: a sampler)

__all__ = [
    "OneShotResult", "oneshot_predictions", "evaluate_oneshot", "accuracy_interval",
    "sample_oneshot_tasks", "neg_squared_euclidean", "pixel_embed", "LAKE_PROTOCOL",
]

LAKE_PROTOCOL = "lake-20way-within-alphabet (Lake et al. 2015 all_runs: 20 runs x 20 trials)"


class OneShotResult(NamedTuple):
  """Accuracy of a task set with its 95% (Wilson) interval, and the predictions it counts
  (``[T, Q]`` support indices, a numpy array; ``None`` when built by hand)."""

  accuracy: float
  low: float
  high: float
  trials: int
  correct: int
  predictions: np.ndarray | None = None


def neg_squared_euclidean(variables, h_query: jax.Array, h_support: jax.Array) -> jax.Array:
  """Score ``-||q - s||^2`` over the last axis (nearest neighbour = argmax); ignores ``variables``.

  >>> import jax.numpy as jnp
  >>> float(neg_squared_euclidean(None, jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0])))
  -25.0
  """
  d = h_query.astype(jnp.float32) - h_support.astype(jnp.float32)
  return -jnp.sum(d * d, axis=-1)


def pixel_embed(variables, images: jax.Array) -> jax.Array:
  """Raw pixels as an embedding: ``[B, H, W] uint8 -> [B, H*W]`` float32 in [0, 1]."""
  return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0


def accuracy_interval(correct: int, trials: int, *, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (95% with ``z=1.96``).

  Raises:
    ValueError: ``trials <= 0``, ``correct`` outside ``[0, trials]``, or ``z <= 0``.

  >>> [round(v, 3) for v in accuracy_interval(368, 400)]
  [0.889, 0.943]
  """
  if not float(trials).is_integer() or trials <= 0:
    raise ValueError(f"trials must be a whole number > 0, got {trials}")
  if not float(correct).is_integer() or not 0 <= correct <= trials:
    raise ValueError(f"correct must be a whole number in [0, trials={trials}], got {correct}")
  if not z > 0:
    raise ValueError(f"z must be > 0, got {z}")
  p = correct / trials
  denom = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / denom
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


@functools.partial(jax.jit, static_argnames=("embed_fn", "score_fn", "chunk_size"))
def oneshot_predictions(embed_fn: Callable, score_fn: Callable, variables, support: jax.Array,
                        query: jax.Array, *, chunk_size: int = 200) -> jax.Array:
  """Predicted support index for every query, in one jitted call.

  Args:
    embed_fn: ``(variables, images [B, ...]) -> [B, D]`` (a static argument).
    score_fn: ``(variables, h_query [..., D], h_support [..., D]) -> [...]``, larger =
      more alike (a static argument).
    variables: the model's variables pytree (``None`` for parameter-free baselines).
    support: ``[T, N, ...]`` one image per class and task.
    query: ``[T, Q, ...]`` query images.
    chunk_size: images encoded at once (bounds memory; the last chunk is padded).

  Returns:
    ``[T, Q]`` int32 argmax over the ``N`` support scores.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[[0.0], [1.0], [5.0]]]); q = jnp.array([[[4.0], [0.2]]])
  >>> oneshot_predictions(lambda v, x: x, neg_squared_euclidean, None, s, q).tolist()
  [[2, 0]]
  """
  return _predict(embed_fn, score_fn, variables, support, query, chunk_size=chunk_size)[0]


@functools.partial(jax.jit, static_argnames=("embed_fn", "score_fn", "chunk_size"))
def _predict(embed_fn, score_fn, variables, support, query, *, chunk_size):
  """``(predictions [T, Q], non-finite embeddings [], non-finite scores [])``."""
  t, n = support.shape[:2]
  q = query.shape[1]
  images = jnp.concatenate([support.reshape((t * n,) + support.shape[2:]),
                            query.reshape((t * q,) + query.shape[2:])], axis=0)
  total = images.shape[0]
  chunk = min(chunk_size, total)
  pad = (-total) % chunk
  padded = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
  chunks = padded.reshape((-1, chunk) + images.shape[1:])
  emb = jax.lax.map(lambda x: embed_fn(variables, x), chunks)
  emb = emb.reshape((-1,) + emb.shape[2:])[:total]
  h_s = emb[:t * n].reshape(t, n, -1)
  h_q = emb[t * n:].reshape(t, q, -1)
  scores_TxQxN = score_fn(variables, h_q[:, :, None, :], h_s[:, None, :, :])
  bad_emb = jnp.sum(~jnp.all(jnp.isfinite(emb.reshape(total, -1)), axis=1))
  bad_scores = jnp.sum(~jnp.isfinite(scores_TxQxN))
  return jnp.argmax(scores_TxQxN, axis=-1).astype(jnp.int32), bad_emb, bad_scores


def _refuse_queries_in_support(support, query) -> None:
  """Raises ValueError when a query image is one of its own task's support images.

  Such a query matches itself, so accuracy would count a copy as recognised. Images are
  compared exactly: hashed on the host, then every hash match checked pixel for pixel.
  """
  s, q = np.asarray(support), np.asarray(query)
  t, n, m = s.shape[0], s.shape[1], q.shape[1]
  s, q = s.reshape(t, n, -1), q.reshape(t, m, -1)
  if s.dtype.kind == "f":  # compare bits: -0.0 and 0.0 differ, NaN equals itself
    s, q = s.view(f"u{s.dtype.itemsize}"), q.view(f"u{q.dtype.itemsize}")
  weights = np.random.default_rng(0).integers(1, 2**61, size=s.shape[-1], dtype=np.uint64)
  with np.errstate(over="ignore"):
    h_s = (s.astype(np.uint64) * weights).sum(-1, dtype=np.uint64)
    h_q = (q.astype(np.uint64) * weights).sum(-1, dtype=np.uint64)
  for ti, qi, ni in zip(*np.nonzero(h_q[:, :, None] == h_s[:, None, :])):
    if np.array_equal(q[ti, qi], s[ti, ni]):
      raise ValueError(
          f"query {int(qi)} of task {int(ti)} is the same image as support image {int(ni)} "
          f"of its task: it would be recognised as a copy of itself; draw each query apart "
          f"from its task's support images (another drawer, another photo)")


def evaluate_oneshot(embed_fn: Callable, score_fn: Callable, variables, support, query,
                     answers, *,
                     chunk_size: int = 200) -> OneShotResult:
  """Accuracy of :func:`oneshot_predictions` on a task set, with a 95% interval.

  Args:
    embed_fn, score_fn, variables, support, query, chunk_size: as in :func:`oneshot_predictions`.
    answers: ``[T, Q]`` int index of each query's class in ``support``.

  Returns:
    :class:`OneShotResult` (fractions, Wilson interval, and the predictions).

  Raises:
    ValueError: empty tasks, fewer than two classes, ``answers`` of the wrong shape or
      outside ``[0, N)``, a query image that is one of its task's support images, or any
      NaN/inf embedding or score (counted).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[[0.0], [1.0]]]); q = jnp.array([[[0.9], [0.1]]])
  >>> evaluate_oneshot(lambda v, x: x, neg_squared_euclidean, None, s, q,
  ...                  jnp.array([[1, 1]])).accuracy
  0.5
  """
  support = _checks.as_array("support", support)
  query = _checks.as_array("query", query)
  answers = _checks.as_array("answers", answers)
  _checks.min_rank("support", support, 2, "[T, N, ...] support images")
  _checks.min_rank("query", query, 2, "[T, Q, ...] query images")
  if support.shape[0] != query.shape[0] or support.shape[2:] != query.shape[2:]:
    raise ValueError(f"support {support.shape} and query {query.shape} must agree on tasks "
                     f"and image shape")
  t, n, q = support.shape[0], support.shape[1], query.shape[1]
  if t == 0 or q == 0:
    raise ValueError(f"query is empty (shape {query.shape}: {t} tasks of {q} queries); "
                     f"pass at least one task with one query")
  if n < 2:
    raise ValueError(f"support must hold N >= 2 classes per task ([T, N, ...]), got shape "
                     f"{support.shape}")
  if answers.shape != query.shape[:2]:
    raise ValueError(f"answers must have shape {query.shape[:2]} ([T, Q]), got {answers.shape}")
  if not jnp.issubdtype(answers.dtype, jnp.integer):
    raise ValueError(f"answers must be integer support indices, got dtype {answers.dtype}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if _checks.is_concrete(answers):
    out = np.asarray(answers)
    bad = (out < 0) | (out >= n)
    if bad.any():
      raise ValueError(f"answers must be support indices in [0, {n}) for a {n}-way task; "
                       f"{int(bad.sum())} of {out.size} are not (e.g. {int(out[bad][0])})")
  if _checks.is_concrete(support) and _checks.is_concrete(query):
    _refuse_queries_in_support(support, query)
  pred, bad_emb, bad_scores = _predict(embed_fn, score_fn, variables, support, query,
                                       chunk_size=chunk_size)
  pred, correct, bad_emb, bad_scores = jax.device_get(
      (pred, jnp.sum(pred == answers), bad_emb, bad_scores))
  correct, bad_emb, bad_scores = int(correct), int(bad_emb), int(bad_scores)
  if bad_emb or bad_scores:
    raise ValueError(
        f"embed_fn / score_fn: {bad_emb} of {t * (n + q)} embeddings and {bad_scores} of "
        f"{t * q * n} scores are NaN or inf (support and query images included); check the "
        f"images and the model's parameters")
  trials = int(answers.size)
  low, high = accuracy_interval(correct, trials)
  return OneShotResult(correct / trials, low, high, trials, correct, pred)
