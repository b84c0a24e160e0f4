"""Host-side splits of a dataset into parts (train / validation / test), by seed.

* :func:`split_indices`: a shuffled cut of ``range(n)`` by fractions (rows of a table).
* :func:`split_per_class`: about a fraction of every class held out (stratified, each
  class keeping at least one member on both sides).

Both draw from ``numpy.random.default_rng(seed)``: a split is a pure function of its
arguments, never of global random state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_indices", "split_per_class"]


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
  """Shuffles ``range(n)`` (NumPy ``Generator(seed)``) and cuts it by ``fractions``.

  The last part takes the rest. Every part must be non-empty.

  >>> [p.size for p in split_indices(10, (0.6, 0.2), seed=0)]
  [6, 2, 2]
  """
  if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
    raise ValueError(f"fractions must be positive with a sum below 1, got {fractions}")
  perm = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions])
  parts = np.split(perm, cuts)
  if any(p.size == 0 for p in parts):
    raise ValueError(f"n={n} is too small to split into {len(parts)} non-empty parts "
                     f"with fractions {fractions}")
  return parts


def split_per_class(labels: np.ndarray, fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Holds out about ``fraction`` of each class: ``(kept, held_out)`` sorted positions.

  Every class keeps at least one member on each side (classes need two).

  >>> kept, held = split_per_class(np.array([0, 0, 0, 0, 1, 1]), 0.5, seed=0)
  >>> sorted(kept.tolist() + held.tolist()), len(held)
  ([0, 1, 2, 3, 4, 5], 3)
  """
  if not 0 < fraction < 1:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  kept, held = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if members.size < 2:
      raise ValueError(f"labels: class {int(c)} has {members.size} member; each class needs "
                       f"two to be split")
    k = min(max(1, int(round(fraction * members.size))), members.size - 1)
    held.append(members[:k])
    kept.append(members[k:])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
