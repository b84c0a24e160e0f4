"""`train.fit`'s work-directory protocol: each failure of the old loop, reproduced.

1. a finished run re-run (or restored for evaluation) raised orbax's StepAlreadyExists;
   so did a run stopped by its time limit on a checkpoint step;
2. kill -9 during the latest-checkpoint write, between the best and latest saves, or
   Ctrl-C during the final evaluation left the work directory stuck, and metrics.jsonl
   got duplicate lines;
3. resuming from the final checkpoint reported a NaN final loss and zero throughput;
4. Ctrl-C saved nothing at the interrupt point;
5. two processes on one work directory crashed each other;
6. a run of another architecture buried the shape mismatch in an orbax traceback.
(7, multi-host, is in tests/test_multihost.py; the scripts' side of each case is in
tests/test_cli.py.)
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 64


def _problem():
  x = jax.random.normal(jax.random.key(0), (N, 4))
  return {"x": x, "y": x @ jnp.array([[1.0], [-2.0], [0.5], [3.0]])}


def _loss_fn(params, model_state, data, key):
  idx = jax.random.randint(key, (8,), 0, N)
  err = data["x"][idx] @ params["w"] + params["b"][None, :] - data["y"][idx]
  return jnp.mean(err ** 2), (model_state, {})


def _eval(state):
  return {"val_accuracy": -float(jnp.sum(jnp.abs(state["params"]["w"] - 1.0)))}


def _fit(workdir, *, width=4, num_steps=40, **kw):
  opt = optax.adam(0.05)
  params = {"w": jnp.zeros((width, 1)), "b": jnp.zeros((1,))}
  state = train.init_state(params, opt, key=jax.random.key(3))
  step = train.make_train_step(_loss_fn, opt, steps_per_call=2)
  data = _problem() if width == 4 else {"x": jnp.zeros((N, width)), "y": jnp.zeros((N, 1))}
  kw = {"checkpoint_every": 10, "eval_every": 10, "eval_fn": _eval, "progress": False,
        **kw}
  return train.fit(state, step, data, num_steps=num_steps, steps_per_call=2,
                   workdir=workdir, **kw)


def _files(workdir):
  """Every file but the lock (which records the pid of its last holder) and its mtime."""
  return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
          for p in pathlib.Path(workdir).rglob("*") if p.is_file()
          and not p.name.startswith(".lock")}


def _log_keys(workdir):
  return [(r["kind"], r["step"]) for r in map(
      json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())]


def test_finished_run_refits_and_restores_without_error(tmp_path):
  state, first = _fit(tmp_path)
  assert first["finished"] and first["end"] == "num_steps" and first["trained_steps"] == 40
  again_state, again = _fit(tmp_path)  # failure 1: StepAlreadyExistsError
  assert again["trained_steps"] == 0 and again["steps"] == 40
  np.testing.assert_array_equal(again_state["params"]["w"], state["params"]["w"])
  # failure 3: the summary of a resumed finished run is the run's, never NaN or zero
  assert again["final_loss"] == first["final_loss"] is not None
  assert again["examples_per_s"] == first["examples_per_s"] > 0
  assert again["best"] == first["best"] and again["history"] == first["history"]
  json.dumps(dict(again), allow_nan=False)
  before = _files(tmp_path)
  restored, info = _fit(tmp_path, restore_only=True)  # evaluation of a trained workdir
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert info["trained_steps"] == 0 and _files(tmp_path) == before  # wrote nothing
  assert len(_log_keys(tmp_path)) == len(set(_log_keys(tmp_path)))


def test_time_limited_run_stopped_on_a_checkpoint_step_is_finished(tmp_path):
  _, first = _fit(tmp_path, time_limit_s=1e-9, checkpoint_every=2, log_every=1)
  assert first["end"] == "time_limit" and first["out_of_time"] and first["steps"] == 2
  _, again = _fit(tmp_path, time_limit_s=1e-9, checkpoint_every=2, log_every=1)
  assert again["trained_steps"] == 0 and again["end"] == "time_limit"


def test_more_steps_continue_a_finished_run(tmp_path):
  _fit(tmp_path, num_steps=20)
  state, res = _fit(tmp_path, num_steps=40)
  ref, _ = _fit(tmp_path / "ref", num_steps=40)
  assert res["trained_steps"] == 20 and res["resumed_from"] == 20
  np.testing.assert_array_equal(state["params"]["w"], ref["params"]["w"])


def test_restore_only_needs_a_checkpoint(tmp_path):
  with pytest.raises(train.RunError, match="no checkpoint"):
    _fit(tmp_path, restore_only=True)


def test_another_architecture_is_refused_naming_the_leaf(tmp_path):
  _fit(tmp_path)
  before = _files(tmp_path)
  with pytest.raises(train.CheckpointMismatch, match=r"params/w has shape \(4, 1\).*\(5, 1\)"):
    _fit(tmp_path, width=5)  # failure 6
  assert _files(tmp_path) == before


_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, os.environ["TEST_DIR"])
    import test_workdir as t
    from siamjax import train
    workdir, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    # Ctrl-C as in a terminal, also when the tests were started in the background (a
    # non-interactive shell's background job inherits SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    kw = {}
    if mode == "kill_between_best_and_latest":  # the final best save done, latest not
      real = train._save
      def save(mgr, step, state, meta):
        if meta.get("end") is not None and "checkpoints_best" not in str(mgr.directory):
          os.kill(os.getpid(), signal.SIGKILL)
        real(mgr, step, state, meta)
      train._save = save
    elif mode == "kill_during_latest_write":  # arrays written, the save not finalised
      import orbax.checkpoint as ocp
      real = ocp.StandardCheckpointHandler.async_save
      async def save(self, directory, *a, **k):
        futures = await real(self, directory, *a, **k)
        if "checkpoints_best" not in str(directory) and "/30." in str(directory):
          for f in futures or ():
            f.result()  # the arrays are on disk in orbax's temporary folder
          os.kill(os.getpid(), signal.SIGKILL)
        return futures
      ocp.StandardCheckpointHandler.async_save = save
    elif mode == "sigint_in_final_eval":
      def ev(state):
        if int(state["step"]) == 40:
          os.kill(os.getpid(), signal.SIGINT)
        return t._eval(state)
      kw["eval_fn"] = ev
    elif mode.startswith("sigint_at_"):  # sigint_at_<step>[_early_stop]
      at = int(mode.split("_")[2])
      def hook(step, state):
        if step == at:
          os.kill(os.getpid(), signal.SIGINT)
      kw["hooks"] = (hook,)
      if mode.endswith("early_stop"):  # constant: the evaluation at step 20 stops the run
        kw.update(eval_fn=lambda s: {"val_accuracy": 0.0}, patience=1)
    elif mode == "hold_lock":
      with train.lock_workdir(workdir):
        print("locked", flush=True)
        import time; time.sleep(60)
    try:
      state, res = t._fit(workdir, **kw)
    except train.Interrupted as e:
      print(e, file=sys.stderr)
      sys.exit(e.exit_code)
    np.save(out, np.asarray(state["params"]["w"]))
""")


def _run(tmp_path, workdir, mode, **popen):
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  env = dict(os.environ, TEST_DIR=os.path.dirname(__file__), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  cmd = [sys.executable, str(driver), str(workdir), mode, str(tmp_path / f"{mode}.npy")]
  if popen:
    return subprocess.Popen(cmd, env=env, text=True, **popen)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  state, res = _fit(tmp_path_factory.mktemp("ref"))
  return np.asarray(state["params"]["w"]), res


@pytest.mark.slow
@pytest.mark.parametrize("mode,code", [
    ("kill_between_best_and_latest", -signal.SIGKILL),
    ("kill_during_latest_write", -signal.SIGKILL),
    ("sigint_in_final_eval", None),  # a KeyboardInterrupt traceback (the CLI prints a line)
    ("sigint_at_14", 130),
    ("sigint_at_18", 130),  # stops on an evaluation and checkpoint step: both done first
])
def test_crash_then_rerun_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, mode,
                                                              code):
  workdir = tmp_path / "w"
  crashed = _run(tmp_path, workdir, mode)  # failures 2 and 4
  assert crashed.returncode != 0 and (code is None or crashed.returncode == code), \
      crashed.stderr[-2000:]
  if mode == "kill_during_latest_write":  # orbax's unfinished temporary folder is left
    assert list((workdir / "checkpoints").glob("30.orbax-checkpoint-tmp*"))
  if mode == "sigint_at_14":  # the checkpoint is the interrupt point's, not older
    assert "interrupted by SIGINT at step 16" in crashed.stderr
    assert train.checkpoint_steps(workdir)[-1] == 16
  if mode == "sigint_at_18":
    assert "at step 20" in crashed.stderr and train.checkpoint_steps(workdir)[-1] == 20
  rerun = _run(tmp_path, workdir, "plain")
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), uninterrupted[0])
  keys = _log_keys(workdir)
  assert len(keys) == len(set(keys))  # no duplicate metrics.jsonl lines
  _, res = _fit(workdir)
  assert res["trained_steps"] == 0 and res["history"] == uninterrupted[1]["history"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,steps", [("sigint_at_38", 40), ("sigint_at_18_early_stop", 20)])
def test_an_interrupt_on_the_runs_last_step_lets_it_finish(tmp_path, mode, steps):
  """A signal that arrives as the run ends (last step, early stop) is not an interruption:
  the run finishes, so that a re-run does not train past where it stopped."""
  done = _run(tmp_path, tmp_path / "w", mode)
  assert done.returncode == 0, done.stderr[-2000:]
  assert train.checkpoint_steps(tmp_path / "w")[-1] == steps
  kw = {"eval_fn": lambda s: {"val_accuracy": 0.0}, "patience": 1} if steps == 20 else {}
  _, again = _fit(tmp_path / "w", **kw)
  assert again["finished"] and again["trained_steps"] == 0 and again["steps"] == steps


@pytest.mark.slow
def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
  holder = _run(tmp_path, tmp_path / "w", "hold_lock", stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.perf_counter()
    with pytest.raises(train.WorkdirLocked, match=f"pid {holder.pid}"):  # failure 5
      _fit(tmp_path / "w")
    assert time.perf_counter() - t0 < 5
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  _, res = _fit(tmp_path / "w")  # the kernel released the dead holder's lock
  assert res["finished"]


def test_lock_is_reentrant_within_a_process(tmp_path):
  with train.lock_workdir(tmp_path):
    with train.lock_workdir(tmp_path):
      pass
    _, res = _fit(tmp_path)  # fit takes the lock this process already holds
  assert res["finished"]
  assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
