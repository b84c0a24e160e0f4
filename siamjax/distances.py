"""Distances and similarities between embeddings.

float16 and bfloat16 inputs are computed in float32 inside (their squares overflow
above ``|x| ~ 181`` in float16) and the result is returned in the input dtype.

Every function takes two arrays of embeddings ``a, b`` of shape ``[..., D]`` and returns
one value per embedding pair, of shape ``[...]``. Leading axes broadcast, so
``euclidean(x[:, None], y[None])`` is a ``[N, M]`` distance matrix (but prefer
:func:`pairwise_distances`, which never builds the ``[N, M, D]`` difference tensor).

All distances have finite gradients everywhere, including at ``a == b`` where the
Euclidean norm is not differentiable: there the gradient is the zero subgradient.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from siamjax import _checks

DistanceName = Literal["euclidean", "squared_euclidean", "cosine"]

__all__ = [
    "l1",
    "euclidean",
    "squared_euclidean",
    "cosine_similarity",
    "cosine_distance",
    "inverse_distance_similarity",
    "exp_similarity",
    "pairwise_distances",
    "gram_rows",
    "from_gram",
    "safe_sqrt",
]


def _pair(a, b) -> tuple[jax.Array, jax.Array]:
  a = _checks.floating("a", a)
  b = _checks.floating("b", b)
  _checks.min_rank("a", a, 1, "[..., D] embeddings")
  _checks.min_rank("b", b, 1, "[..., D] embeddings")
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(
        f"a and b must have the same embedding size D (last axis), got {a.shape} and {b.shape}")
  try:
    jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
  except ValueError:
    raise ValueError(f"a and b have leading shapes that do not broadcast: {a.shape} and {b.shape}")
  return a, b


def _up(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jnp.dtype]:
  """Both inputs in the working dtype (float32 for half precision) and the output dtype."""
  dtype = jnp.result_type(a, b)
  work = _work_dtype(dtype)
  return a.astype(work), b.astype(work), dtype


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0`` with a finite (zero) gradient at ``x == 0``.

  Uses the "double where" so that neither the value nor the gradient sees ``1/sqrt(0)``.

  Args:
    x: non-negative values of any shape.

  Returns:
    ``sqrt(x)``, same shape; its gradient at 0 is 0 instead of ``inf``/NaN. NaN stays
    NaN (a NaN embedding gives a NaN distance, not 0).

  References:
    JAX FAQ, "Gradients contain NaN where using where" (the double-where trick).

  >>> import jax, jax.numpy as jnp
  >>> float(jax.grad(safe_sqrt)(0.0)), float(safe_sqrt(jnp.nan))
  (0.0, nan)
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)),
                   jnp.where(jnp.isnan(x), x, jnp.zeros_like(x)))


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """L1 (Manhattan) distance ``sum_j |a_j - b_j|``.

  Args:
    a: ``[..., D]`` floating embeddings.
    b: ``[..., D]`` floating embeddings, broadcastable with ``a``.

  Returns:
    ``[...]`` distances, in ``a``'s dtype.

  References:
    The component-wise ``|h1 - h2|`` of the Koch et al. (2015) head is this distance
    before its learned weighting.

  >>> import jax.numpy as jnp
  >>> float(l1(jnp.array([0.0, 1.0]), jnp.array([2.0, -1.0])))
  4.0
  """
  a, b, dtype = _up(*_pair(a, b))
  return jnp.sum(jnp.abs(a - b), axis=-1).astype(dtype)


def squared_euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distance ``sum_j (a_j - b_j)^2``.

  Args:
    a: ``[..., D]`` floating embeddings.
    b: ``[..., D]`` floating embeddings, broadcastable with ``a``.

  Returns:
    ``[...]`` squared distances.

  References:
    The distance of FaceNet's triplet loss (Schroff et al., CVPR 2015) and of
    prototypical networks (Snell et al., NeurIPS 2017).

  >>> import jax.numpy as jnp
  >>> float(squared_euclidean(jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0])))
  25.0
  """
  a, b, dtype = _up(*_pair(a, b))
  return jnp.sum(jnp.square(a - b), axis=-1).astype(dtype)


def euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distance ``||a - b||_2`` with a finite gradient at ``a == b``.

  Args:
    a: ``[..., D]`` floating embeddings.
    b: ``[..., D]`` floating embeddings, broadcastable with ``a``.

  Returns:
    ``[...]`` distances. The gradient at ``a == b`` is zero (a subgradient), not NaN.

  References:
    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant
    Mapping", CVPR 2006 (the distance of the contrastive loss).

  >>> import jax, jax.numpy as jnp
  >>> float(euclidean(jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0])))
  5.0
  >>> jax.grad(lambda x: euclidean(x, x))(jnp.ones(2)).tolist()
  [0.0, 0.0]
  """
  a, b, dtype = _up(*_pair(a, b))
  return safe_sqrt(jnp.sum(jnp.square(a - b), axis=-1)).astype(dtype)


def cosine_similarity(a: jax.Array, b: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Cosine similarity ``<a, b> / (||a|| ||b||)`` in ``[-1, 1]``.

  Norms below ``eps`` are clamped to ``eps``, so a zero vector has similarity 0 with
  everything and finite gradients.

  Args:
    a: ``[..., D]`` floating embeddings.
    b: ``[..., D]`` floating embeddings, broadcastable with ``a``.
    eps: smallest norm used in the denominator.

  Returns:
    ``[...]`` similarities.

  References:
    The similarity of NT-Xent (Chen et al., SimCLR, ICML 2020); equals
    ``optax.losses.cosine_similarity`` up to the handling of ``eps``.

  >>> import jax.numpy as jnp
  >>> float(cosine_similarity(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])))  # doctest: +NUMBER
  0.7071
  """
  a, b, dtype = _up(*_pair(a, b))
  norm_a = jnp.maximum(safe_sqrt(jnp.sum(jnp.square(a), axis=-1)), eps)
  norm_b = jnp.maximum(safe_sqrt(jnp.sum(jnp.square(b), axis=-1)), eps)
  return (jnp.sum(a * b, axis=-1) / (norm_a * norm_b)).astype(dtype)


def cosine_distance(a: jax.Array, b: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """``1 - cosine_similarity(a, b)``, in ``[0, 2]``.

  Args:
    a: ``[..., D]`` floating embeddings.
    b: ``[..., D]`` floating embeddings, broadcastable with ``a``.
    eps: smallest norm used in the denominator.

  Returns:
    ``[...]`` distances.

  References:
    See :func:`cosine_similarity`.

  >>> import jax.numpy as jnp
  >>> float(cosine_distance(jnp.array([1.0, 0.0]), jnp.array([-1.0, 0.0])))
  2.0
  """
  a, b, dtype = _up(*_pair(a, b))
  return (1.0 - cosine_similarity(a, b, eps=eps)).astype(dtype)


def inverse_distance_similarity(d: jax.Array) -> jax.Array:
  """Maps a distance ``d >= 0`` to a similarity ``1 / (1 + d)`` in ``(0, 1]``.

  Args:
    d: distances of any shape.

  Returns:
    similarities of the same shape.

  References:
    The similarity of the THUCNews Siamese text classifier this project reproduces
    (support-vector matching by ``1 / (1 + d)``).

  >>> import jax.numpy as jnp
  >>> inverse_distance_similarity(jnp.array([0.0, 1.0, 3.0])).tolist()
  [1.0, 0.5, 0.25]
  """
  d = _checks.floating("d", d)
  return 1.0 / (1.0 + d)


def exp_similarity(d: jax.Array) -> jax.Array:
  """Maps a distance ``d >= 0`` to a similarity ``exp(-d)`` in ``(0, 1]``.

  Args:
    d: distances of any shape.

  Returns:
    similarities of the same shape.

  References:
    Chopra, Hadsell & LeCun, "Learning a Similarity Metric Discriminatively, with
    Application to Face Verification", CVPR 2005 (energy ``exp(-d)``-style scores).

  >>> import jax.numpy as jnp
  >>> exp_similarity(jnp.array([0.0])).tolist()
  [1.0]
  """
  d = _checks.floating("d", d)
  return jnp.exp(-d)


def pairwise_distances(
    x: jax.Array,
    y: jax.Array,
    *,
    distance: DistanceName = "euclidean",
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """All distances between the rows of ``x`` and ``y`` through one matrix product.

  Computes ``||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>`` (clamped at 0) so memory is
  ``O(N M)``, never the ``O(N M D)`` of broadcasting ``x[:, None] - y[None]``. For the
  Euclidean distances both sides are first centred on the mean of ``y``, so a large
  offset shared by the embeddings (``1e3 u + noise``) does not cancel catastrophically;
  float16/bfloat16 inputs are computed in float32 and returned in their own dtype.

  Args:
    x: ``[N, D]`` floating embeddings.
    y: ``[M, D]`` floating embeddings.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).
    precision: matmul precision. ``HIGHEST`` by default so that GPU/TPU TF32 or bf16
      passes do not perturb losses; lower it for speed if you accept that.

  Returns:
    ``[N, M]`` distances.

  References:
    The Gram-matrix expansion of Euclidean distance used by batch-hard mining
    (Hermans, Beyer & Leibe, arXiv:1703.07737, 2017).

  >>> import jax.numpy as jnp
  >>> pairwise_distances(jnp.array([[0.0, 0.0]]), jnp.array([[3.0, 4.0], [0.0, 1.0]])).tolist()
  [[5.0, 1.0]]
  """
  x = _checks.floating("x", x)
  y = _checks.floating("y", y)
  _checks.rank("x", x, 2, "[N, D] embeddings")
  _checks.rank("y", y, 2, "[M, D] embeddings")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same embedding size D, got {x.shape} and {y.shape}")
  if distance not in ("euclidean", "squared_euclidean", "cosine"):
    raise ValueError(
        f"distance must be 'euclidean', 'squared_euclidean' or 'cosine', got {distance!r}")
  dtype = jnp.result_type(x, y)
  work = _work_dtype(dtype)
  return _pairwise(x.astype(work), y.astype(work), distance, precision).astype(dtype)


def _work_dtype(dtype) -> jnp.dtype:
  """float32 for float16/bfloat16 (their squares overflow or lose digits), else ``dtype``."""
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def gram_rows(x: jax.Array, distance: str) -> tuple[jax.Array, jax.Array | None]:
  """The rows that enter the Gram product for ``distance``, and their squared norms.

  With :func:`from_gram`, the two halves of :func:`pairwise_distances` without its checks,
  centring or dtype round trip: for code that forms a Gram block of its own (a block of
  anchors against a reference set, say) and turns it into distances. Cosine distances
  normalise the rows first (norms clamped at 1e-8, so a zero row has similarity 0 with
  everything) and need no norms (``None``); the Euclidean ones use ``x`` as given.

  >>> import jax.numpy as jnp
  >>> x, sq = gram_rows(jnp.array([[3.0, 4.0]]), "euclidean")
  >>> sq.tolist()
  [25.0]
  """
  if distance == "cosine":
    return x / jnp.maximum(safe_sqrt(jnp.sum(jnp.square(x), -1, keepdims=True)), 1e-8), None
  return x, jnp.sum(jnp.square(x), -1)


def from_gram(dot_NxM: jax.Array, sq_N, sq_M, distance: str) -> jax.Array:
  """``[N, M]`` distances from the Gram block ``dot_NxM`` of :func:`gram_rows`' rows and
  their squared norms ``sq_N``, ``sq_M`` (``None`` for cosine); squared Euclidean values
  are clamped at 0 before the square root.

  >>> import jax.numpy as jnp
  >>> (x, sq_x), (y, sq_y) = gram_rows(jnp.zeros((1, 2)), "euclidean"), gram_rows(
  ...     jnp.array([[3.0, 4.0]]), "euclidean")
  >>> from_gram(x @ y.T, sq_x, sq_y, "euclidean").tolist()
  [[5.0]]
  """
  if distance == "cosine":
    return 1.0 - dot_NxM
  sq = jnp.maximum(sq_N[:, None] + sq_M[None, :] - 2.0 * dot_NxM, 0.0)
  return sq if distance == "squared_euclidean" else safe_sqrt(sq)


def _pairwise(x: jax.Array, y: jax.Array, distance: str,
              precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """:func:`pairwise_distances` without the checks or the dtype round trip (private).

  Euclidean distances are translation-invariant, so both sides are first centred on
  the mean of ``y`` (a constant for the gradient, which is exact since the distances do
  not depend on it): the Gram expansion then cancels no large shared offset. Cosine
  distances normalise the rows first, so the ``[N, M]`` block sees one product and one
  subtraction. Code that centres once itself calls :func:`gram_rows` and
  :func:`from_gram`.
  """
  if distance != "cosine":
    mean = jax.lax.stop_gradient(jnp.mean(y, axis=0, keepdims=True))
    x, y = x - mean, y - mean
  (x, sq_x), (y, sq_y) = gram_rows(x, distance), gram_rows(y, distance)
  return from_gram(jnp.matmul(x, y.T, precision=precision), sq_x, sq_y, distance)
