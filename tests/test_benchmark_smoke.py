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
  assert rec["prob"] == 0.5 and rec["function"] == "siamjax.augment.augment"
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


@pytest.mark.slow
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
params = jax.jit(net.init)(k3, x1, x2)
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
  # Training rows only: CI's smoke run of benchmarks/pairs_per_sec.py runs the same harness
  # through every mode (float32), and the bf16 check needs only the training rows.
  cfg = harness.Config(batches=(2,), repeats=1, steps=1, modes=("train",),
                       dtypes=("float32", "bfloat16"), torch_compile=False,
                       bank_classes=4, bank_drawers=2, matmul_n=256, compare_direct=False)
  out = tmp_path / "bench.json"
  harness.run(cfg, str(out), str(tmp_path / "bench.png"), "pytest")
  rec = json.loads(out.read_text())
  assert rec["param_check"]["ok"] and rec["complete"] is True
  # every bf16 row is checked against float32's training loss, from the same init and data
  for r in rec["rows"]:
    if r.get("dtype") == "bfloat16" and not r.get("skipped"):
      assert r["bf16_check"]["ok"] in (True, False)
      if r["mode"] == "train":
        assert r["bf16_check"]["steps"] == r["train_steps"] > 0
        assert r["bf16_check"]["abs_diff"] == pytest.approx(
            abs(r["loss"] - r["bf16_check"]["loss_float32"]))
  assert {(e["mode"], e["batch"]) for e in rec["best_vs_best"]} == {("train", 2)}
  assert all(e["fastest"]["siamjax"] for e in rec["best_vs_best"])
  # each torch row tried both layouts on this machine and names the one it kept
  for r in (r for r in rec["rows"] if r["impl"] == "torch" and not r.get("skipped")):
    cands = r["settings"]["candidates"]
    assert {c["layout"] for c in cands.values()} == {"contiguous", "channels_last"}
    assert r["settings"]["chosen"] in cands and cands[r["settings"]["chosen"]]["layout"] == (
        r["layout"])
  assert all(v == 38_951_745 for v in rec["param_check"]["counted"].values())
  rows = [r for r in rec["rows"] if not r.get("skipped")]
  modes = {(r["impl"], r["mode"]) for r in rows}
  assert ("siamjax", "train") in modes
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
    assert {r["mode"] for r in keras_rows} == {"train"} and len(keras_rows) == 2
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_siamjax_lake_finds_the_identical_image():
  net = koch_siamese()
  x = jnp.zeros((1, 105, 105, 1))
  params = jax.jit(net.init)(jax.random.key(0), x, x)
  # A head that scores smaller L1 distances higher: an identical image must win.
  params["params"]["head"]["kernel"] = -jnp.abs(params["params"]["head"]["kernel"])
  test = jax.random.uniform(jax.random.key(1), (1, 20, 105, 105, 1))
  correct = harness.siamjax_lake(net)(params, test, test)
  assert correct.shape == (1, 20) and bool(jnp.all(correct))
  shuffled = test[:, ::-1]
  assert not bool(jnp.any(harness.siamjax_lake(net)(params, test, shuffled)))


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_step_contains_the_distortion():
  """The default step warps its images (a bilinear gather that augment=False lacks)."""
  texts = []
  for augment in (True, False):
    _, _, step, state, data = _bench_step(2, augment=augment)
    texts.append(step.lower(state, data).as_text())
  assert texts[0] != texts[1]
  assert texts[0].count("cos") > texts[1].count("cos")  # the rotation matrix


# ----------------------------------------------------------------------------- reporting


def _fake_row(impl, variant, dtype, mode, batch, step_s, **kw):
  row = {"impl": impl, "variant": variant, "dtype": dtype, "mode": mode, "batch": batch,
         "step_s": step_s, **kw}
  if mode == "lake":
    row["eval_s"] = step_s
  else:
    row["pairs_per_s"] = batch / step_s
  return row


def _fake_rows(bf16_loss=0.70):
  """siamjax and torch train/infer rows at batch 8, float32 and bf16, and one Lake row."""
  train = dict(loss=0.70, train_steps=4)
  return [
      _fake_row("siamjax", "jit", "float32", "train", 8, 1.0, **train),
      _fake_row("siamjax", "jit-direct", "float32", "train", 8, 2.0, **train),
      _fake_row("siamjax", "jit", "bfloat16", "train", 8, 1.5, loss=0.701, train_steps=4),
      _fake_row("torch", "eager", "float32", "train", 8, 2.0, **train),
      _fake_row("torch", "eager", "bfloat16", "train", 8, 0.8, loss=bf16_loss, train_steps=4),
      _fake_row("torch", "eager", "float32", "infer", 8, 0.4),
      _fake_row("torch", "eager", "bfloat16", "infer", 8, 0.2),
      _fake_row("siamjax", "jit", "float32", "infer", 8, 0.3),
      _fake_row("siamjax", "jit", "float32", "lake", 400, 3.0),
      _fake_row("keras", "keras3-jax", "float32", "lake", 400, 4.0),
      {"impl": "keras", "skipped": "--no-keras"},
  ]


def test_check_bf16_passes_close_losses_and_excludes_the_rest():
  rows = _fake_rows(bf16_loss=0.70)
  harness.check_bf16(rows, rtol=0.02, atol=0.01)
  by = {(r["impl"], r["variant"], r["dtype"], r["mode"]): r for r in rows if "mode" in r}
  check = by["torch", "eager", "bfloat16", "train"]["bf16_check"]
  assert check["ok"] is True and check["abs_diff"] == 0.0 and check["steps"] == 4
  assert check["tolerance"] == pytest.approx(0.01 + 0.02 * 0.70)
  assert by["torch", "eager", "bfloat16", "infer"]["bf16_check"]["ok"] is True  # inherited
  assert "bf16_check" not in by["torch", "eager", "float32", "train"]
  assert not any(r.get("excluded_from_best") for r in rows)

  rows = _fake_rows(bf16_loss=0.9)  # 0.2 away from float32's 0.70: fails
  harness.check_bf16(rows, rtol=0.02, atol=0.01)
  by = {(r["impl"], r["variant"], r["dtype"], r["mode"]): r for r in rows if "mode" in r}
  check = by["torch", "eager", "bfloat16", "train"]["bf16_check"]
  assert check["ok"] is False and check["abs_diff"] == pytest.approx(0.2)
  for mode in ("train", "infer"):  # the inference row goes with its train rows
    assert "beyond the tolerance" in by["torch", "eager", "bfloat16", mode]["excluded_from_best"]
  assert by["siamjax", "jit", "bfloat16", "train"]["bf16_check"]["ok"] is True

  rows = [_fake_row("torch", "eager", "bfloat16", "infer", 8, 0.2)]  # no train rows at all
  harness.check_bf16(rows)
  assert rows[0]["bf16_check"]["ok"] is None and "unchecked" in rows[0]["excluded_from_best"]
  rows = _fake_rows()
  rows[4]["train_steps"] = 5  # a different number of updates: not comparable
  harness.check_bf16(rows)
  assert rows[4]["bf16_check"]["ok"] is None and rows[4]["excluded_from_best"]
  rows[4]["loss"] = None  # a NaN loss (written as null) fails
  rows[4]["train_steps"] = 4
  harness.check_bf16(rows)
  assert rows[4]["bf16_check"]["ok"] is False


def test_best_vs_best_compares_each_frameworks_fastest_counted_row():
  rows = _fake_rows()
  harness.check_bf16(rows)
  best = {(e["mode"], e["batch"]): e for e in harness.best_vs_best(rows)}
  train = best["train", 8]
  assert train["fastest"]["siamjax"]["variant"] == "jit"  # 1.0 s: its fastest of three
  assert train["fastest"]["torch"]["dtype"] == "bfloat16"  # 0.8 s, bf16 counted
  assert train["fastest_reference"] == "torch eager bfloat16"
  assert train["ratio"] == pytest.approx(0.8)  # torch's 0.8 s over siamjax's 1.0 s
  assert train["same_precision"]["float32"]["torch"] == pytest.approx(2.0)
  assert train["same_precision"]["bfloat16"]["torch"] == pytest.approx(0.8 / 1.5)
  assert best["infer", 8]["ratio"] == pytest.approx(0.2 / 0.3)
  lake = best["lake", 400]
  assert lake["fastest_reference"].startswith("keras") and lake["ratio"] == pytest.approx(4 / 3)
  assert lake["fastest"]["siamjax"]["eval_s"] == 3.0

  rows = _fake_rows(bf16_loss=0.9)  # torch's bf16 fails its check: float32 is its best
  harness.check_bf16(rows)
  train = harness.best_vs_best(rows)[0]
  assert train["fastest"]["torch"]["dtype"] == "float32" and train["ratio"] == pytest.approx(2.0)
  assert "bfloat16" not in train["same_precision"] or "torch" not in train["same_precision"][
      "bfloat16"]
  assert any(x.startswith("torch eager bfloat16") for x in train["excluded"])
  table = harness.format_best_table(harness.best_vs_best(rows))
  assert "2.00x" in table and "excluded: torch eager bfloat16" in table
  md = harness.format_best_markdown(harness.best_vs_best(rows)).splitlines()
  assert md[0].startswith("| | siamjax fastest") and len(md) == 2 + 3  # train, infer, lake
  assert "| **2.00×** |" in md[2] and "torch eager float32" in md[2]  # > 1 in bold
  assert "Lake's trials (400)" in md[4] and "keras" in md[4]


class _FakeClock:
  """time.perf_counter that only the fake runs advance: timing without wall time."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_fastest_setting_keeps_the_faster_layout_and_records_the_others(monkeypatch):
  clock = _FakeClock()
  monkeypatch.setattr(harness.time, "perf_counter", clock)
  cost = {"contiguous": 3.0, "channels_last": 1.0}
  current, calls = [None], []

  def enter(s):
    current[0] = s

  def run():
    calls.append(current[0].layout)
    clock.now += cost[current[0].layout]
    return len(calls)

  settings = [harness.Setting("contiguous", 2), harness.Setting("channels_last", 2)]
  t, best, record = harness.fastest_setting(settings, enter, run, lambda _: None, repeats=3)
  assert best.layout == "channels_last" and record["chosen"] == "channels_last/2t"
  assert t.times_s == [1.0, 1.0, 1.0] and t.last == len(calls)
  assert record["candidates"]["contiguous/2t"]["call_s"] == [3.0]  # the loser: one timed call
  assert calls == ["contiguous", "contiguous", "channels_last", "channels_last",
                   "channels_last", "channels_last"]
  t, best, record = harness.fastest_setting(settings[:1], enter, run, lambda _: None, 2)
  assert best == settings[0] and record["candidates"] == {} and len(t.times_s) == 2


def test_torch_settings_try_both_layouts_and_the_cpu_count():
  pytest.importorskip("torch")
  cpu = harness.torch_settings(on_gpu=False)
  assert {s.layout for s in cpu} == {"contiguous", "channels_last"}
  assert os.cpu_count() in {s.threads for s in cpu}
  gpu = harness.torch_settings(on_gpu=True)
  assert [s.name for s in gpu] == ["contiguous", "channels_last"]


class _CutShort(Exception):
  pass


def test_run_writes_the_json_after_every_row_and_keeps_it_when_cut_short(tmp_path, monkeypatch):
  out = tmp_path / "bench.json"
  seen = []

  def fake_siamjax(cfg, dtype, rows, log, conv="auto"):
    for mode, step_s in (("train", 1.0), ("infer", 0.5)):
      rows.append(_fake_row("siamjax", "jit", dtype, mode, 2, step_s, loss=0.7, train_steps=2,
                            tflops=0.1, steps_per_repeat=1, compile_and_first_s=1.0,
                            pairs_per_s_spread=[1.0, 2.0], step_s_all=[step_s]))
      log(rows[-1])
      seen.append(len(json.loads(out.read_text())["rows"]))  # on disk after each row
    raise _CutShort  # the run is cut short here

  monkeypatch.setattr(harness, "bench_siamjax", fake_siamjax)
  monkeypatch.setattr(harness, "_flops_record", lambda: {"stub": True})
  cfg = harness.Config(batches=(2,), repeats=1, dtypes=("float32",), matmul_n=32)
  with pytest.raises(_CutShort):
    harness.run(cfg, str(out), None, "pytest", commit="abc123")
  assert seen == [1, 2]
  rec = json.loads(out.read_text())
  assert rec["complete"] is False and rec["git_commit"] == "abc123"
  assert [r["mode"] for r in rec["rows"]] == ["train", "infer"]
  assert [e["mode"] for e in rec["best_vs_best"]] == ["train", "infer"]
  assert rec["matmul_peak_tflops"]["jax_float32"] > 0  # measured before the first row
  assert "fraction_of_peak" in rec["rows"][0]
  assert rec["cpu"]["isa"] == rec["machine"]["cpu_isa"] and isinstance(rec["cpu"]["amx"], bool)
  assert rec["cpu"]["model"] == rec["machine"]["cpu_model"]
  assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary file left behind


def test_run_starts_no_block_past_its_time_limit(tmp_path, monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("a block started past the time limit")

  for name in ("bench_siamjax", "bench_torch", "bench_keras"):
    monkeypatch.setattr(harness, name, must_not_run)
  monkeypatch.setattr(harness, "_flops_record", lambda: {"stub": True})
  out = tmp_path / "bench.json"
  cfg = harness.Config(dtypes=("float32",), matmul_n=32, keras=False, time_limit_s=1e-9)
  rec = harness.run(cfg, str(out), None, "pytest")
  assert rec["complete"] is True and json.loads(out.read_text())["complete"] is True
  timed_out = [r for r in rec["rows"] if "time limit" in r.get("skipped", "")]
  assert {r["impl"] for r in timed_out} >= {"siamjax"} and rec["best_vs_best"] == []


def test_a_failing_torch_block_is_a_skipped_row_and_the_plot_follows_each_block(
    tmp_path, monkeypatch):
  def fake_siamjax(cfg, dtype, rows, log, conv="auto"):
    rows.append(_fake_row("siamjax", "jit", dtype, "train", 2, 1.0, loss=0.7, train_steps=2,
                          tflops=0.1, steps_per_repeat=1, compile_and_first_s=1.0,
                          pairs_per_s_spread=[1.0, 2.0], step_s_all=[1.0]))
    log(rows[-1])
    return harness.KOCH_PARAMS

  def failing_torch(*args, **kwargs):
    raise RuntimeError("cuDNN version incompatibility")  # torch's CUDA start beside JAX's

  drawn = []
  monkeypatch.setattr(harness, "bench_siamjax", fake_siamjax)
  monkeypatch.setattr(harness, "bench_torch", failing_torch)
  monkeypatch.setattr(harness, "_flops_record", lambda: {"stub": True})
  monkeypatch.setattr(harness, "plot", lambda rows, path, title: drawn.append(len(rows)))
  cfg = harness.Config(batches=(2,), repeats=1, dtypes=("float32",), matmul_n=32,
                       keras=False, compare_direct=False)
  rec = harness.run(cfg, str(tmp_path / "b.json"), str(tmp_path / "b.png"), "pytest")
  assert rec["complete"] is True and rec["rows"][0]["impl"] == "siamjax"
  skipped = [r["skipped"] for r in rec["rows"] if r["impl"] == "torch"]
  assert skipped == ["torch eager failed: RuntimeError: cuDNN version incompatibility",
                     "torch compile failed: RuntimeError: cuDNN version incompatibility"]
  assert drawn[0] == 1 and len(drawn) >= 3  # after siamjax's block, each torch block, the end


def test_software_survives_torch_probes_that_raise(monkeypatch):
  import torch

  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "fake GPU")
  monkeypatch.setattr(harness, "_torch_cuda_setup", lambda t: {})

  def cudnn_version():
    raise RuntimeError("cuDNN version incompatibility: PyTorch was compiled against 9.10")

  monkeypatch.setattr(torch.backends.cudnn, "version", cudnn_version)
  monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError()))
  info = harness.software()
  assert info["torch_gpu"] == "fake GPU" and "cuDNN version" in info["torch_error"]


def test_tf32_uses_the_new_api_where_torch_has_it():
  import types

  legacy = types.SimpleNamespace(allow_tf32=False)
  new = types.SimpleNamespace(fp32_precision="ieee")
  fake = types.SimpleNamespace(backends=types.SimpleNamespace(
      cuda=types.SimpleNamespace(matmul=new),
      cudnn=types.SimpleNamespace(benchmark=False, allow_tf32=False,
                                  conv=types.SimpleNamespace(fp32_precision="ieee"))))
  got = harness._torch_cuda_setup(fake)
  assert got == {"cudnn_benchmark": True, "matmul_fp32_precision": "tf32",
                 "cudnn_conv_fp32_precision": "tf32"}
  assert fake.backends.cudnn.allow_tf32 is False  # the legacy flags stay untouched
  old = types.SimpleNamespace(backends=types.SimpleNamespace(
      cuda=types.SimpleNamespace(matmul=legacy),
      cudnn=types.SimpleNamespace(benchmark=False, allow_tf32=False)))
  assert harness._torch_cuda_setup(old)["matmul_allow_tf32"] is True
