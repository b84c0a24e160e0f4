"""The one results writer: every ``results.json`` of the scripts and the benchmark.

A results record names what was run and where: the command, the git commit, the date,
the machine (:func:`siamjax.machine.machine_info`, with the load average when the run
started and when it ended: on shared cores a wall time means little without it) and the
figures. Every float is finite or ``null``: :func:`finite` maps NaN and infinities to
``None``, so the files are strict JSON that every parser reads. Files are replaced
atomically (written beside, then renamed), and in a multi-process run only process 0
writes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["finite", "record", "write_json", "write_results", "read_results", "git_commit",
           "command_line", "load_average"]


def finite(obj: Any) -> Any:
  """``obj`` with NaN/inf floats as ``None`` and NumPy/JAX scalars and arrays as Python.

  >>> finite({"a": float("nan"), "b": [1.5, float("inf")], "c": np.float32(2)})
  {'a': None, 'b': [1.5, None], 'c': 2.0}
  """
  if isinstance(obj, dict):
    return {str(k): finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # NumPy or JAX arrays
    return finite(np.asarray(obj).tolist())
  if isinstance(obj, Path):
    return str(obj)
  return obj


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages."""
  return [round(v, 2) for v in os.getloadavg()]


def git_commit(path: str | os.PathLike | None = None) -> str | None:
  """The commit checked out at ``path`` (default: this package's folder), or ``None``."""
  where = path or os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=where, check=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def command_line(argv: list[str] | None = None) -> str:
  """``python <script> <args>`` as typed (the script path relative to the current folder)."""
  argv = list(sys.argv if argv is None else argv)
  if argv and argv[0]:
    argv[0] = os.path.relpath(argv[0])
  return "python " + " ".join(shlex.quote(a) for a in argv)


def record(results: dict, *, command: str | None = None,
           load_average_at_start: list[float] | None = None) -> dict:
  """``results`` with the provenance every results file carries, made strict JSON.

  Args:
    results: the figures (any JSON-able values; NaN becomes ``null``).
    command: the command line (default: this process's).
    load_average_at_start: the load average when the run started.

  Returns:
    ``{"command", "git_commit", "date", "machine", **results}``; ``machine`` holds
    :func:`siamjax.machine.machine_info` plus ``load_average_at_start`` and
    ``load_average_at_end``.
  """
  from siamjax.machine import machine_info
  machine = {**machine_info(), "load_average_at_start": load_average_at_start,
             "load_average_at_end": load_average()}
  head = {"command": command or command_line(), "git_commit": git_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": machine}
  return finite({**head, **results})


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
  """Writes ``finite(obj)`` as strict JSON, atomically (process 0 only). Returns the path."""
  path = Path(path)
  import jax
  if jax.process_index() != 0:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(finite(obj), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)
  return path


def write_results(workdir: str | os.PathLike, results: dict, *, command: str | None = None,
                  load_average_at_start: list[float] | None = None,
                  name: str = "results.json") -> Path:
  """Writes ``record(results, ...)`` to ``workdir/results.json``; returns its path."""
  return write_json(Path(workdir) / name, record(
      results, command=command, load_average_at_start=load_average_at_start))


def read_results(workdir: str | os.PathLike, name: str = "results.json") -> dict | None:
  """The results record in ``workdir`` (``None`` when missing or unreadable)."""
  path = Path(workdir) / name
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return None
