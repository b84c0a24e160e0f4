"""Argument checks shared by the public functions (private).

Shape, rank and dtype checks run at trace time, so they cost nothing inside ``jit``.
Value checks (labels in {0, 1}) need concrete values: they run when the argument is a
concrete array and are skipped for tracers, where the value is unknown until run time.
Every failure raises ``ValueError`` naming the offending argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """Whether ``x`` has a value now (not a tracer inside ``jit``)."""
  return not isinstance(x, jax.core.Tracer)


def as_array(name: str, x) -> jax.Array:
  """Converts ``x`` to an array, naming ``name`` when that fails."""
  if isinstance(x, jax.Array):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e


def positive_int(name: str, v) -> int:
  """Returns ``v`` as an ``int``; it must be a Python or NumPy integer >= 1 (not a bool)."""
  if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1):
    raise ValueError(f"{name} must be a positive int, got {v!r}")
  return int(v)


def floating(name: str, x) -> jax.Array:
  """Returns ``x`` as an array, which must have a floating dtype."""
  x = as_array(name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}; "
        f"cast it first, e.g. {name}.astype(jnp.float32)")
  return x


def rank(name: str, x: jax.Array, expected: int, what: str) -> None:
  if x.ndim != expected:
    raise ValueError(f"{name} must have rank {expected} ({what}), got shape {x.shape}")


def min_rank(name: str, x: jax.Array, expected: int, what: str) -> None:
  if x.ndim < expected:
    raise ValueError(f"{name} must have rank >= {expected} ({what}), got shape {x.shape}")


def nonempty(name: str, x: jax.Array, axis: int = 0) -> None:
  if x.shape[axis] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape}): the batch needs at least one element")


def same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def binary_labels(name: str, y, like: jax.Array) -> jax.Array:
  """Checks ``y`` holds 0/1 (or bool) labels and returns it in ``like``'s float dtype."""
  y = as_array(name, y)
  if not (jnp.issubdtype(y.dtype, jnp.bool_) or jnp.issubdtype(y.dtype, jnp.number)):
    raise ValueError(f"{name} must be bool or numeric 0/1 labels, got dtype {y.dtype}")
  if jnp.issubdtype(y.dtype, jnp.complexfloating):
    raise ValueError(f"{name} must be real 0/1 labels, got dtype {y.dtype}")
  if is_concrete(y) and y.size:
    values = np.unique(np.asarray(y))
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
      raise ValueError(f"{name} must hold only 0 and 1 (1 = same class), found {bad[:5].tolist()}")
  return y.astype(like.dtype)


def class_labels(name: str, labels, batch: int) -> jax.Array:
  """Checks integer class labels of shape ``[batch]``."""
  labels = as_array(name, labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
  rank(name, labels, 1, "[batch] class ids")
  if labels.shape[0] != batch:
    raise ValueError(f"{name} has {labels.shape[0]} entries but the embeddings have {batch} rows")
  return labels


def positive_scalar(name: str, value, *, allow_zero: bool = False) -> None:
  """Checks a Python/NumPy hyper-parameter that must be positive (skipped for tracers)."""
  if is_concrete(value):
    v = float(np.asarray(value))
    if not (v > 0 or (allow_zero and v == 0)) or not np.isfinite(v):
      bound = ">= 0" if allow_zero else "> 0"
      raise ValueError(f"{name} must be finite and {bound}, got {v}")


def row_mask(name: str, mask, n: int) -> jax.Array:
  """Checks an optional ``[n]`` bool row mask; all True when ``None``."""
  if mask is None:
    return jnp.ones((n,), dtype=bool)
  mask = as_array(name, mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a bool mask, got dtype {mask.dtype}")
  rank(name, mask, 1, f"[{n}] bool, one per row")
  if mask.shape[0] != n:
    raise ValueError(f"{name} has {mask.shape[0]} entries but there are {n} rows")
  return mask


def anchor_rows(anchor_indices, b: int) -> jax.Array:
  """Checks ``anchor_indices`` (``[A]`` rows of ``[0, b)``; range checked when concrete)."""
  if anchor_indices is None:
    return jnp.arange(b)
  rows_A = as_array("anchor_indices", anchor_indices)
  if not jnp.issubdtype(rows_A.dtype, jnp.integer):
    raise ValueError(f"anchor_indices must be integer rows, got dtype {rows_A.dtype}")
  rank("anchor_indices", rows_A, 1, "[A] rows of embeddings")
  nonempty("anchor_indices", rows_A)
  if is_concrete(rows_A):
    r = np.asarray(rows_A)
    bad = r[(r < 0) | (r >= b)]
    if bad.size:
      raise ValueError(
          f"anchor_indices must be rows in [0, {b}) of embeddings, found {bad[:5].tolist()}")
  return rows_A
