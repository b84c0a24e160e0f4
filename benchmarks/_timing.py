"""Clocks and memory marks shared by the benchmarks, on the standard library alone.

Kept apart from ``harness.py`` so that a reference's own process (FAISS, PyTorch) can use
them without importing JAX or siamjax.
"""

from __future__ import annotations

import re
import time
from typing import Callable


def repeat_until(call: Callable[[], object], repeats: int, min_total_s: float = 0.0,
                 max_repeats: int | None = None) -> list[float]:
  """Times ``call()`` (which must wait for its own result) at least ``repeats`` times, and
  more until the timed calls add up to ``min_total_s``, at most ``max_repeats`` calls.

  Single millisecond-long calls on two cores swing by 2-3x; a floor on the total time
  keeps the median steady.
  """
  times: list[float] = []
  while len(times) < repeats or (sum(times) < min_total_s
                                 and (max_repeats is None or len(times) < max_repeats)):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def status_bytes(field: str) -> int | None:
  """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
  try:
    with open("/proc/self/status") as f:
      m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(m.group(1)) * 1024 if m else None


def reset_peak() -> bool:
  """Resets the peak resident memory mark (``VmHWM``) to the current resident memory.

  Linux only (``/proc/self/clear_refs``); False where the kernel does not allow it.
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False
