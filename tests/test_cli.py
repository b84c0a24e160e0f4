"""The scripts' side of the work-directory protocol (siamjax.recipes.cli), on a real script.

Each case of the pipeline issue, as a user meets it on the command line: a finished run
re-run or re-evaluated (it used to die with orbax's StepAlreadyExistsError), Ctrl-C (a
traceback, nothing saved), a second process on the same work directory, a run with
another architecture in an old work directory (a 168-line traceback, and config.json
overwritten), and the results file (NaN after a resume).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from siamjax.recipes import cli, omniglot_koch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "omniglot_koch.py"

pytestmark = pytest.mark.skipif(not os.environ.get("SIAMJAX_DATA_DIR"),
                                reason="needs Omniglot: set SIAMJAX_DATA_DIR")

_DRIVER = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("script", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    at = int(sys.argv[2])

    def interrupt(step, state):
      if step == at:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    sys.exit(mod.main(sys.argv[3:], hooks=(interrupt,)))
""")


def _run(tmp_path, *args, sigint_at=-1, **kw):
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]))
  return subprocess.run([sys.executable, str(driver), str(SCRIPT), str(sigint_at), "--smoke",
                         "--no-progress", *args], capture_output=True, text=True,
                        timeout=300, env=env, **kw)


def _lines(stderr):
  """stderr without the line announcing the XLA flags (printed before JAX starts)."""
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith("set XLA_FLAGS")]


def _strict(path):
  def refuse(name):
    raise AssertionError(f"{path} holds {name}")
  return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_a_finished_run_evaluated_again_and_refused_another_config(smoke_run, tmp_path):
  w = pathlib.Path(shutil.copytree(smoke_run("omniglot_koch.py"), tmp_path / "w"))
  results = _strict(w / "results.json")
  assert results["final_loss"] is not None and results["images_per_s"] > 0
  config = (w / "config.json").read_bytes()
  # A plain re-run of a finished run (it used to raise StepAlreadyExistsError): every
  # script's, in tests/test_scripts.py.

  evaluated = _run(tmp_path, "--workdir", str(w), "--eval-only")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  re = _strict(w / "results.json")
  assert re["lake_20way_accuracy"] == results["lake_20way_accuracy"]
  assert re["final_loss"] == results["final_loss"]  # the run's, not NaN

  other = _run(tmp_path, "--workdir", str(w), "--channels", "16")
  assert other.returncode == 2
  assert _lines(other.stderr) == [
      f"error: workdir {w} holds a run with another config (channels: 8 in the workdir, "
      f"16 now); pass another --workdir, or delete it to start over"]
  assert (w / "config.json").read_bytes() == config  # not overwritten
  # More steps is a change a run resumes from (the recipe's RESUMABLE): checked by
  # test_config_diff_names_fields_and_ignores_resumable_ones below, and the resume itself by
  # tests/test_workdir.py's test_more_steps_continue_a_finished_run.


@pytest.mark.slow
def test_a_validation_only_run_never_scores_lake_until_asked(tmp_path):
  w = tmp_path / "w"
  first = _run(tmp_path, "--workdir", str(w), "--no-test")
  assert first.returncode == 0, first.stderr[-3000:]
  res = _strict(w / "results.json")
  assert res["lake_20way_accuracy"] is None and res["lake_trials"] is None
  assert res["protocols"]["lake_20way_accuracy"] == "not scored (test=False)"
  assert 0 <= res["validation_scored_accuracy"] <= 1 and res["tta_shift"] == 1
  assert json.loads(first.stdout)["validation_scored_accuracy"] == res[
      "validation_scored_accuracy"]
  # test and tta_shift change what is evaluated, not what was trained.
  scored = _run(tmp_path, "--workdir", str(w), "--test", "--tta-shift", "0", "--eval-only")
  assert scored.returncode == 0, scored.stderr[-3000:]
  res2 = _strict(w / "results.json")
  assert res2["lake_trials"] == 400 and res2["steps"] == res["steps"]
  assert res2["tta_shift"] == 0


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_with_one_line(tmp_path):
  w = tmp_path / "w"
  stopped = _run(tmp_path, "--workdir", str(w), sigint_at=10)
  assert stopped.returncode == 130
  assert _lines(stopped.stderr)[-1] == (
      f"interrupted by SIGINT at step 15: checkpoint saved in {w}; re-run the same command "
      f"to resume")
  assert "Traceback" not in stopped.stderr
  from siamjax import train
  assert train.checkpoint_steps(w)[-1] == 15
  # That a re-run resumes from such a checkpoint to the uninterrupted result:
  # tests/test_workdir.py (sigint_at_14 and sigint_at_18) and tests/test_scripts.py.


@pytest.mark.slow
def test_a_second_process_on_the_workdir_is_refused_naming_the_pid(tmp_path):
  w = tmp_path / "w"
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from siamjax import train
      with train.lock_workdir({str(w)!r}):
        print("locked", flush=True)
        time.sleep(120)
  """)], stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = _run(tmp_path, "--workdir", str(w))
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  assert second.returncode == 2
  assert _lines(second.stderr) == [
      f"error: workdir {w} is in use by another run (pid {holder.pid}); wait for it to "
      f"finish or pass another --workdir"]


def test_config_diff_names_fields_and_ignores_resumable_ones():
  assert cli.config_diff({"a": (1, 2), "b": 1}, {"a": [1, 2], "b": 1}) == []
  assert cli.config_diff({"a": 1}, {"a": 2, "c": 3}) == [
      "a: 1 in the workdir, 2 now", "c: (absent) in the workdir, 3 now"]
  assert cli.config_diff({"num_steps": 1}, {"num_steps": 2}, {"num_steps"}) == []
  assert {"num_steps", "train_time_limit_s", "test"} <= omniglot_koch.RESUMABLE
  # A field added to Config after the run: no difference at its default, one otherwise.
  assert cli.config_diff({"a": 1}, {"a": 1, "c": None}, added={"c": None}) == []
  assert cli.config_diff({"a": 1}, {"a": 1, "c": True}, added={"c": None}) == [
      "c: (absent) in the workdir, True now"]
