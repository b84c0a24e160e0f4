"""Every experiment script at smoke size survives a crash and behaves like the others.

For each script: its uninterrupted smoke run (``conftest.smoke_run``, the command CI and
users run); run it again in another work directory, killed
with SIGKILL right after its first checkpoint is on disk (a ``fit`` hook, so the kill
lands at the same place every time); re-run that command, which resumes; the resumed run
must end with the uninterrupted run's final parameters (every checkpoint, bitwise) and
results (every figure but timings). A second re-run of the finished work directory
exits 0 without training, says so, prints the run's summary again and leaves
``results.json`` as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DATA = bool(os.environ.get("SIAMJAX_DATA_DIR"))

# (script, smoke arguments, needs the real data in $SIAMJAX_DATA_DIR)
SCRIPTS = [(script, ["--smoke"], needs_data)
           for script, needs_data in conftest.SMOKE_EXPERIMENTS.items()]

_DRIVER = textwrap.dedent("""
    import importlib.util, os, pathlib, signal, sys
    script, workdir, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
    spec = importlib.util.spec_from_file_location("script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def die_after_first_checkpoint(step, state):
      if kill and any(p.parent.parent.name == "checkpoints"  # latest, not best, saves
                      for p in pathlib.Path(workdir).rglob("_CHECKPOINT_METADATA")):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like kill -9

    sys.exit(mod.main(["--workdir", workdir, "--no-progress"] + sys.argv[4:],
                      hooks=(die_after_first_checkpoint,)))
""")

# Figures that measure time or describe the session, not the result.
_VOLATILE = ("time", "per_s", "date", "machine", "command", "git_commit", "resumed_from",
             "load_average")


def _stable(obj):
  if isinstance(obj, dict):
    return {k: _stable(v) for k, v in obj.items() if not any(s in k for s in _VOLATILE)}
  if isinstance(obj, list):
    return [_stable(v) for v in obj]
  return obj


def _strict_json(path):
  def refuse(name):
    raise AssertionError(f"{path} holds {name}")
  return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def _final_checkpoints(workdir):
  """``{relative path of each checkpoints/ folder: {leaf: array}}`` of its latest step."""
  import orbax.checkpoint as ocp
  out = {}
  for folder in sorted(pathlib.Path(workdir).rglob("checkpoints")):
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    mgr = ocp.CheckpointManager(folder.absolute(), item_handlers={
        "state": ocp.StandardCheckpointHandler()})
    state = mgr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax
    out[str(folder.relative_to(workdir))] = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(state["state"])[0]}
  return out


def run_script(tmp_path, script, args, workdir, *, kill=False, extra=()):
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]))
  return subprocess.run([sys.executable, str(driver), str(ROOT / "experiments" / script),
                         str(workdir), "kill" if kill else "run", *args, *extra],
                        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script,args,needs_data", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, smoke_run, script, args,
                                                      needs_data):
  if needs_data and not HAS_DATA:
    pytest.skip("needs the real data: set SIAMJAX_DATA_DIR")
  full = smoke_run(script)
  killed = run_script(tmp_path, script, args, tmp_path / "killed", kill=True)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (tmp_path / "killed" / "results.json").exists()
  resumed = run_script(tmp_path, script, args, tmp_path / "killed")
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  want, got = _strict_json(full / "results.json"), _strict_json(
      tmp_path / "killed" / "results.json")
  assert _stable(got) == _stable(want)
  a, b = _final_checkpoints(full), _final_checkpoints(tmp_path / "killed")
  assert a and a.keys() == b.keys()
  for run in a:
    assert a[run].keys() == b[run].keys(), run
    for leaf in a[run]:
      np.testing.assert_array_equal(a[run][leaf], b[run][leaf], err_msg=f"{run} {leaf}")

  before = (tmp_path / "killed" / "results.json").read_bytes()
  again = run_script(tmp_path, script, args, tmp_path / "killed")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "holds a finished run" in again.stderr
  assert (tmp_path / "killed" / "results.json").read_bytes() == before
  assert _stable(json.loads(again.stdout)) == _stable(json.loads(resumed.stdout))  # its summary
  for log in (tmp_path / "killed").rglob("metrics.jsonl"):  # no record written twice
    keys = [(r["kind"], r["step"]) for r in map(json.loads, log.read_text().splitlines())]
    assert len(keys) == len(set(keys)), log
