"""The generic train step and loop: learning, transfer guard, no retracing, resume."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamjax import train

N = 64


def _problem():
  x = jax.random.normal(jax.random.key(0), (N, 4))
  w_true = jnp.array([[1.0], [-2.0], [0.5], [3.0]])
  return {"x": x, "y": x @ w_true}


def _loss_fn(params, model_state, data, key):
  idx = jax.random.randint(key, (8,), 0, N)  # sampled inside the step
  pred = data["x"][idx] @ params["w"] + params["b"][None, :]
  loss = jnp.mean((pred - data["y"][idx]) ** 2)
  return loss, (model_state, {"abs_err": jnp.mean(jnp.abs(pred - data["y"][idx]))})


def _state(opt):
  params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
  return train.init_state(params, opt, key=jax.random.key(42))


def test_step_learns_and_does_not_retrace():
  opt = optax.adam(0.1)
  step = train.make_train_step(_loss_fn, opt, steps_per_call=10)
  state, data = _state(opt), _problem()
  state, m0 = step(state, data)
  for _ in range(20):
    state, m = step(state, data)
  assert int(state["step"]) == 210
  assert float(m["loss"]) < 0.05 * float(m0["loss"])
  assert set(m) == {"loss", "abs_err"}
  assert step._cache_size() == 1  # the second and later calls did not compile again


def test_fit_runs_under_transfer_guard(tmp_path):
  opt = optax.sgd(0.05)
  step = train.make_train_step(_loss_fn, opt, steps_per_call=5)
  data = jax.device_put(_problem())
  state, res = train.fit(_state(opt), step, data, num_steps=50, steps_per_call=5,
                         workdir=tmp_path, progress=False, log_every=2,
                         eval_fn=lambda s: {"val_accuracy": -float(jnp.sum(s["params"]["w"]))},
                         eval_every=25, checkpoint_every=25)
  assert res["steps"] == 50 and np.isfinite(res["final_loss"])
  assert (tmp_path / "metrics.jsonl").read_text().count('"train"') == 5
  assert train.restore_best(tmp_path, state) is not None
  # Host (NumPy) data would be transferred implicitly inside the loop: the guard refuses.
  host = jax.tree.map(np.asarray, _problem())
  with pytest.raises(Exception, match="[Dd]isallowed"):
    train.fit(_state(opt), step, host, num_steps=10, steps_per_call=5, progress=False)


def test_fit_rejects_misaligned_steps():
  opt = optax.sgd(0.1)
  step = train.make_train_step(_loss_fn, opt, steps_per_call=4)
  with pytest.raises(ValueError, match="multiple of steps_per_call"):
    train.fit(_state(opt), step, _problem(), num_steps=10, steps_per_call=4, progress=False)
  with pytest.raises(ValueError, match="steps_per_call"):
    train.make_train_step(_loss_fn, opt, steps_per_call=0)


_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_train import _loss_fn, _problem, _state
    from siamjax import train
    workdir, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    opt = optax.adam(0.05)
    step = train.make_train_step(_loss_fn, opt, steps_per_call=2)

    def die(step_no, state):
      if step_no == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like kill -9

    state, res = train.fit(
        _state(opt), step, jax.device_put(_problem()), num_steps=40, steps_per_call=2,
        workdir=workdir, checkpoint_every=10, eval_every=10, progress=False, hooks=(die,),
        eval_fn=lambda s: {"val_accuracy": -float(jnp.abs(s["params"]["b"]).sum())})
    np.savez(out, w=np.asarray(state["params"]["w"]), b=np.asarray(state["params"]["b"]),
             best_step=res["best_step"], resumed=res["resumed_from"] or -1)
""")


@pytest.mark.slow
def test_kill9_resume_gives_identical_parameters(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, TEST_DIR=os.path.dirname(__file__), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))

  def run(workdir, kill_at, out):
    return subprocess.run([sys.executable, str(script), str(workdir), str(kill_at), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)

  full = run(tmp_path / "a", 0, tmp_path / "a.npz")
  assert full.returncode == 0, full.stderr
  killed = run(tmp_path / "b", 24, tmp_path / "b.npz")  # last checkpoint at step 20
  assert killed.returncode == -9, killed.stderr
  assert not (tmp_path / "b.npz").exists()
  resumed = run(tmp_path / "b", 0, tmp_path / "b.npz")
  assert resumed.returncode == 0, resumed.stderr
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert int(b["resumed"]) == 20
  np.testing.assert_array_equal(a["w"], b["w"])
  np.testing.assert_array_equal(a["b"], b["b"])
  assert int(a["best_step"]) == int(b["best_step"])
  log = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  steps = [int(l.split('"step": ')[1].split(",")[0].rstrip("}")) for l in log if '"train"' in l]
  assert steps == sorted(set(steps))  # records past the checkpoint were dropped, not doubled


def test_per_layer_sgd_schedules():
  opt = train.per_layer_sgd({"conv1": (0.1, 0.9, 0.0), "head": (0.01, 0.5, 0.1)},
                            steps_per_epoch=2, momentum_ramp_epochs=2)
  params = {"tower": {"conv1": {"kernel": jnp.ones(1)}}, "head": {"kernel": jnp.ones(1)}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = opt.init(params)
  u, state = opt.update(grads, state, params)
  assert float(u["tower"]["conv1"]["kernel"][0]) == pytest.approx(-0.1)
  assert float(u["head"]["kernel"][0]) == pytest.approx(-0.01 * 1.1)  # L2 adds 0.1 * w
  for _ in range(5):
    u, state = opt.update(grads, state, params)
  hp = state.inner_states["conv1"].inner_state[1].hyperparams
  assert float(hp["learning_rate"]) == pytest.approx(0.1 * 0.99 ** 2)  # 2 epochs done
  assert float(hp["momentum"]) == pytest.approx(0.9)  # ramp complete
  with pytest.raises(ValueError, match="matches none"):
    opt2 = train.per_layer_sgd({"conv1": (0.1, 0.9, 0.0)}, steps_per_epoch=1)
    opt2.init({"other": jnp.ones(1)})
