"""Every script's smoke mode, exactly as a user or CI types it, finishes.

The experiment scripts' smoke runs are :func:`conftest.smoke_run`'s (shared with the tests
that read them: resumed, loaded, enrolled); the benchmarks' smoke modes, the GPU suite's
CPU dry run and every ``python -m siamjax`` command run here. No timing or accuracy
claims: these check that the commands run and write what they say.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DATA = bool(os.environ.get("SIAMJAX_DATA_DIR"))
pytestmark = pytest.mark.slow

EXPERIMENTS = conftest.SMOKE_EXPERIMENTS
# experiments/enrolment.py needs a trained model: tests/test_enrolment.py runs its smoke mode
# on the Omniglot smoke run.
ENROLMENT = "enrolment.py"
# benchmarks/<script> with a smoke mode: its flag
BENCHMARKS = {"pairs_per_sec.py": "--smoke", "losses_per_sec.py": "--smoke",
              "search_per_sec.py": "--smoke", "device_suite.py": "--dry-run"}


def _strict_json(path):
  def refuse(name):
    raise AssertionError(f"{path} holds {name}")
  return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def test_every_script_with_a_smoke_mode_runs_here():
  assert {p.name for p in (ROOT / "experiments").glob("*.py")} == {*EXPERIMENTS, ENROLMENT}
  with_smoke = {p.name for p in (ROOT / "benchmarks").glob("*.py")
                if re.search(r'add_argument\("--(smoke|dry-run)"', p.read_text())}
  assert with_smoke == set(BENCHMARKS)


@pytest.mark.parametrize("script", sorted(EXPERIMENTS))
def test_experiment_smoke_run_writes_its_results(smoke_run, script):
  if EXPERIMENTS[script] and not HAS_DATA:
    pytest.skip("needs the real data: set SIAMJAX_DATA_DIR")
  workdir = smoke_run(script)
  results = _strict_json(workdir / "results.json")
  assert results and (workdir / "config.json").is_file()


@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmark_smoke_mode(tmp_path, script):
  flag = BENCHMARKS[script]
  if script == "device_suite.py" and not HAS_DATA:
    pytest.skip("the dry run trains on Omniglot: set SIAMJAX_DATA_DIR")
  out = tmp_path / ("out" if script == "device_suite.py" else "out.json")
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), flag, "--out",
                      str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  if script == "device_suite.py":
    summary = json.loads((out / "summary.json").read_text())
    assert summary["running"] is None and summary["finished"] == [
        "prepare", "preflight", "paper_fast", "bench"], summary
  else:
    rec = json.loads(out.read_text())
    assert rec.get("complete", True) is True


def test_every_command_line_command_on_the_image_folder_smoke_run(smoke_run, tmp_path):
  """``python -m siamjax`` enroll, calibrate, identify, verify and export, as processes."""
  w = pathlib.Path(shutil.copytree(smoke_run("image_folder.py"), tmp_path / "run"))
  g = w / "synthetic_folder"

  def cli(*argv):
    r = subprocess.run([sys.executable, "-m", "siamjax", *map(str, argv)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]

  cli("enroll", "--workdir", w, "--gallery", g, "--index", tmp_path / "index", "--no-progress")
  cli("calibrate", "--workdir", w, "--data", g, "--target", "eer", "--target", "far=0.1",
      "--no-progress")
  found = cli("identify", "--index", tmp_path / "index", g / "class_00" / "img_000.png",
              "--no-progress")
  assert len(found) == 1
  pair = cli("verify", "--workdir", w, g / "class_00" / "img_000.png",
             g / "class_01" / "img_001.png")
  assert len(pair) == 1 and isinstance(pair[0]["same"], bool)
  cli("export", "--workdir", w, "--out", tmp_path / "exported", "--no-progress")
  assert (tmp_path / "exported" / "model.json").is_file()
