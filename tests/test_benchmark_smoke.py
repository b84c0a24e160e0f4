"""Tests of benchmarks/pairs_per_sec.py's parts and of siamjax.xla (no timing asserts)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import koch_siamese
from siamjax import xla as sxla
from siamjax.recipes import omniglot_koch as ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import harness  # noqa: E402


def test_flop_count_matches_layers_and_xla():
  f = harness.koch_forward_flops()
  assert f["total"] == 1_817_247_744  # the "1.82 GFLOP per 105x105 image"
  assert f["conv2"] == 2 * 42 * 42 * 128 * 7 * 7 * 64
  xla = harness._xla_flops()
  if xla is not None:  # XLA also counts bias, ReLU, pooling: a little more
    assert f["total"] <= xla <= 1.01 * f["total"]
  assert harness.koch_flops_per_pair()["train"] == 2 * (3 * f["total"] - f["conv1"])


def test_koch_affine_is_the_papers_distortion():
  assert dict(harness.KOCH_AFFINE) == {"rotation": 10.0, "shear": 0.3, "scale": (0.8, 1.2),
                                       "translation": 2.0, "prob": 0.5}
  rec = harness.augmentation_record(harness.recipe_config(2))
  assert rec["prob"] == 0.5 and rec["function"] == "siamjax.sampling.augment"
  assert "make_train_step" in rec["where"] and "drawn uniformly" in rec["components"]
  assert harness.augmentation_record(harness.recipe_config(2, augment=False)) is None


def _bench_step(batch, mesh=None, **kw):
  """The benchmark's siamjax step, its fresh state and data on a small synthetic bank."""
  from siamjax import parallel
  rc = harness.recipe_config(batch, drawers=2, **kw)
  model, step = harness.siamjax_train_step(rc, mesh)
  bank = np.asarray(harness.synthetic_bank(jax.random.key(0), 4, 2))
  state = ok.init_state(model, rc)
  data = ok.training_data(bank, np.array([0, 0, 1, 1]), rc)
  if mesh is not None:
    state, data = parallel.replicate((state, data), mesh)
  return rc, model, step, state, data


def test_benchmark_times_the_recipes_own_train_step():
  """The benchmark's siamjax row is train.make_train_step over the Omniglot recipe's loss:
  the same loss and update as a step built directly from the library."""
  from siamjax import train
  rc, model, step, state, data = _bench_step(2)
  direct = train.make_train_step(ok.make_loss_fn(ok.Model(rc)), ok.optimizer(rc))
  mine, m1 = step(jax.tree.map(jnp.copy, state), data)
  theirs, m2 = direct(jax.tree.map(jnp.copy, state), data)
  assert float(m1["loss"]) == float(m2["loss"]) and "pair_accuracy" in m1
  for a, b in zip(jax.tree.leaves(mine["params"]), jax.tree.leaves(theirs["params"])):
    np.testing.assert_array_equal(a, b)
  assert sum(p.size for p in jax.tree.leaves(state["params"])) == 38_951_745


def test_synthetic_bank_shape_and_dtype():
  bank = harness.synthetic_bank(jax.random.key(0), 4, 2)
  assert bank.shape == (4, 2, 105, 105) and bank.dtype == jnp.uint8
  assert 0 < float(jnp.mean(bank > 0)) < 1


# With the paper's init two things make gradients ill-conditioned in float32, so that
# correct implementations differ by percent: the tower's sigmoid saturates (s * (1 - s)
# loses its digits), and convolution outputs are all close to the 0.5 biases, so a
# max-pool's argmax is decided by rounding. The comparisons widen the convolution
# kernels and shrink the dense one (same network, well-conditioned gradients).
_GRAD_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
from siamjax import koch_siamese, losses
net = koch_siamese()
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x1 = jax.random.uniform(k1, (1, 105, 105, 1)); x2 = jax.random.uniform(k2, (1, 105, 105, 1))
params = net.init(k3, x1, x2)
enc = params["params"]["encoder"]
for name in ("conv1", "conv2", "conv3", "conv4"):
  enc[name]["kernel"] = enc[name]["kernel"] * 10.0
enc["dense"]["kernel"] = enc["dense"]["kernel"] * 1e-4
y = jnp.array([1.0])
f = lambda p: jnp.mean(losses.pair_bce_loss(net.apply(p, x1, x2), y))
loss, g = jax.jit(jax.value_and_grad(f))(params)
out = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(g)}
out.update(loss=np.asarray(loss), logits=np.asarray(jax.jit(net.apply)(params, x1, x2)))
"""


@pytest.fixture(scope="module")
def default_path():
  """Loss, logits and gradients with this process's (default, non-fast) XLA flags."""
  scope = {}
  exec(_GRAD_SCRIPT, scope)
  return scope


def _assert_close(actual, desired, name, rtol):
  scale = float(np.max(np.abs(desired))) or 1.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * 0.1 * scale, err_msg=name)


@pytest.mark.slow
def test_torch_reference_matches_flax_forward_and_grad(default_path):
  torch = pytest.importorskip("torch")
  import torch_koch

  ref = default_path
  model = torch_koch.load_flax_params(torch_koch.KochSiamese(), ref["params"])
  assert torch_koch.num_params(model) == 38_951_745
  to_t = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
  logits = model(to_t(ref["x1"]), to_t(ref["x2"]))
  _assert_close(logits.detach().numpy(), ref["out"]["logits"], "logits", 1e-5)
  loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(1))
  loss.backward()
  _assert_close(loss.item(), ref["out"]["loss"], "loss", 1e-5)
  for name in ("conv1", "conv2", "conv3", "conv4"):
    conv = getattr(model.tower, name)
    key = f"['params']['encoder']['{name}']"
    _assert_close(conv.weight.grad.numpy().transpose(2, 3, 1, 0), ref["out"][key + "['kernel']"],
                  name, 1e-3)
    _assert_close(conv.bias.grad.numpy(), ref["out"][key + "['bias']"], name, 1e-3)


@pytest.mark.slow
def test_fast_cpu_flags_give_the_same_results(default_path, tmp_path):
  """The fast CPU path gives the plain Flax forward and gradients (float tolerance)."""
  env = dict(os.environ, XLA_FLAGS=sxla.FAST_CPU_FLAGS, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  path = tmp_path / "fast.npz"
  script = _GRAD_SCRIPT + "np.savez(sys.argv[1], **out)\n"
  subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True, cwd=ROOT,
                 timeout=300)
  fast = dict(np.load(path))
  assert fast.keys() == default_path["out"].keys()
  for k, ref in default_path["out"].items():
    _assert_close(fast[k], ref, k, 1e-3)


def test_fast_cpu_enabled_parses_flags():
  assert sxla.fast_cpu_enabled(sxla.FAST_CPU_FLAGS)
  assert sxla.fast_cpu_enabled("--a=1 " + sxla.FAST_CPU_FLAGS + " --b=2")
  assert not sxla.fast_cpu_enabled("")
  assert not sxla.fast_cpu_enabled("--xla_cpu_experimental_ynn_fusion_type=dot")
  with pytest.raises(ValueError, match="xla_flags"):
    sxla.fast_cpu_enabled(3)


def test_enable_fast_cpu_after_backend_init(monkeypatch):
  jax.devices()  # the backend is up, as in any process that already used JAX
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.raises(RuntimeError, match="before any other JAX use"):
    sxla.enable_fast_cpu()
  monkeypatch.setenv("XLA_FLAGS", sxla.FAST_CPU_FLAGS)
  assert sxla.enable_fast_cpu() is False  # already set: a no-op


@pytest.mark.slow
def test_harness_run_writes_json_with_param_check_and_torch_row(tmp_path):
  cfg = harness.Config(batches=(2,), repeats=1, steps=1, modes=("train", "lake"),
                       dtypes=("float32",), torch_compile=False, lake_runs=1, bank_classes=4,
                       bank_drawers=2, matmul_n=256)
  out = tmp_path / "bench.json"
  harness.run(cfg, str(out), str(tmp_path / "bench.png"), "pytest")
  rec = json.loads(out.read_text())
  assert rec["param_check"]["ok"]
  assert all(v == 38_951_745 for v in rec["param_check"]["counted"].values())
  rows = [r for r in rec["rows"] if not r.get("skipped")]
  modes = {(r["impl"], r["mode"]) for r in rows}
  assert ("siamjax", "train") in modes and ("siamjax", "lake") in modes
  if any(k.startswith("torch") for k in rec["param_check"]["counted"]):
    assert ("torch", "train") in modes
    sj = next(r for r in rows if r["impl"] == "siamjax" and r["mode"] == "train")
    assert sj["vs_torch_eager"] > 0
  assert rec["machine"]["nproc"] >= 1 and rec["command"] == "pytest"
  sj = next(r for r in rows if r["impl"] == "siamjax" and r["mode"] == "train")
  assert sj["augmentation"]["rotation"] == 10.0 and sj["augmentation"]["prob"] == 0.5
  assert "inside the jitted train step" in sj["augmentation"]["where"]
  assert all(r["augmentation"] is None for r in rows if r["impl"] != "siamjax"
             and r["mode"] == "train")
  assert any("ready-made batches" in n for n in rec["notes"])
  if importlib.util.find_spec("keras") is not None:  # the Keras rows are optional
    keras_rows = [r for r in rows if r["impl"] == "keras"]
    assert {r["mode"] for r in keras_rows} == {"train", "lake"}
    assert all(r["params"] == 38_951_745 for r in keras_rows)
    assert rec["param_check"]["counted"]["keras_float32"] == 38_951_745
    assert next(k for k in sj if k.startswith("vs_keras_")) and rec["software"]["keras_backend"]
  if importlib.util.find_spec("matplotlib") is not None:
    assert (tmp_path / "bench.png").stat().st_size > 0


_NO_KERAS_SCRIPT = """
import json, sys
sys.modules["keras"] = None  # as if keras were not installed
sys.modules["torch"] = None  # (and torch: only the siamjax rows run, fast)
sys.path.insert(0, "benchmarks")
import harness
cfg = harness.Config(batches=(1,), repeats=1, modes=("infer",), dtypes=("float32",),
                     torch_compile=False, matmul_n=64)
harness.run(cfg, sys.argv[1], None, "no-keras")
"""


@pytest.mark.slow
def test_harness_records_keras_skipped_when_keras_is_missing(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _NO_KERAS_SCRIPT, str(out)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  assert harness.KERAS_MISSING in proc.stdout.splitlines()
  assert "pip install keras" in harness.KERAS_MISSING
  rows = json.loads(out.read_text())["rows"]
  assert {"impl": "keras", "skipped": harness.KERAS_MISSING} in rows
  assert [r for r in rows if r["impl"] == "siamjax" and r["mode"] == "infer"]


def test_keras_reference_is_the_koch_net():
  if importlib.util.find_spec("keras") is None:
    pytest.skip("keras not installed (pip install keras)")
  import keras_koch  # picks Keras' backend before importing keras

  for dtype in ("float32", "bfloat16"):
    model = keras_koch.koch_siamese(dtype)
    assert model.count_params() == 38_951_745
    tower = model.get_layer("tower")
    assert [type(layer).__name__ for layer in tower.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
        "Conv2D", "Flatten", "Dense"]
    assert tower.output_shape == (None, 4096) and model.output_shape == (None, 1)
    assert tower.layers[0].dtype_policy.name == keras_koch.DTYPE_POLICY[dtype]
  with pytest.raises(ValueError, match="dtype"):
    keras_koch.koch_siamese("float16")


def test_siamjax_lake_finds_the_identical_image():
  net = koch_siamese()
  x = jnp.zeros((1, 105, 105, 1))
  params = net.init(jax.random.key(0), x, x)
  # A head that scores smaller L1 distances higher: an identical image must win.
  params["params"]["head"]["kernel"] = -jnp.abs(params["params"]["head"]["kernel"])
  test = jax.random.uniform(jax.random.key(1), (1, 20, 105, 105, 1))
  correct = harness.siamjax_lake(net)(params, test, test)
  assert correct.shape == (1, 20) and bool(jnp.all(correct))
  shuffled = test[:, ::-1]
  assert not bool(jnp.any(harness.siamjax_lake(net)(params, test, shuffled)))


def test_data_parallel_train_step_matches_one_device():
  """`--devices 2`: the benchmark's sharded step gives the one-device loss and update."""
  from siamjax import parallel

  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (conftest makes 8 fake CPU devices)")
  out = []
  for mesh in (None, parallel.make_mesh(2)):  # both with Koch's distortion (the default)
    _, _, step, state, data = _bench_step(2, mesh)
    new, metrics = step(state, data)
    out.append((float(metrics["loss"]), np.asarray(new["params"]["head"]["kernel"])))
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
  np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-5, atol=1e-7)


def test_train_step_contains_the_distortion():
  """The default step warps its images (a bilinear gather that augment=False lacks)."""
  texts = []
  for augment in (True, False):
    _, _, step, state, data = _bench_step(2, augment=augment)
    texts.append(step.lower(state, data).as_text())
  assert texts[0] != texts[1]
  assert texts[0].count("cos") > texts[1].count("cos")  # the rotation matrix
