"""Shared flag and results plumbing for the experiments/ scripts (no model code here)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

from siamjax import recipes


def data_dir(flag: str | None) -> str:
  """``--data-dir`` if given, else ``$SIAMJAX_DATA_DIR``; exits with a message if neither."""
  value = flag or os.environ.get("SIAMJAX_DATA_DIR")
  if not value:
    sys.exit("error: pass --data-dir DIR or set SIAMJAX_DATA_DIR")
  return value


LOAD_AT_START = [round(v, 2) for v in os.getloadavg()]


def write_results(workdir: str, results: dict, *, wall_time_s: float) -> pathlib.Path:
  """Writes ``<workdir>/results.json`` with the wall time, the machine and the command.

  The machine record holds the load average when the script started and when it ended:
  the CPU is shared, and a wall time means little without it.
  """
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  record = {
      "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      "wall_time_s": wall_time_s,
      "machine": {**recipes.machine_info(), "load_average_at_start": LOAD_AT_START},
      "env": {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS") if k in os.environ},
      **results,
  }
  path = out / "results.json"
  path.write_text(json.dumps(record, indent=2) + "\n")
  return path
