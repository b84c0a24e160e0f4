"""``omniglot_koch.py --learning-curve``: finished work directories into one figure."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from siamjax import results as results_lib
from siamjax.recipes import learning_curves

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
  spec = importlib.util.spec_from_file_location("omniglot_koch_script",
                                                ROOT / "experiments" / "omniglot_koch.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _workdir(root: pathlib.Path, name: str, batch: int, steps: int) -> pathlib.Path:
  w = root / name
  recs = []
  for s in range(1, steps + 1):
    recs.append({"kind": "train", "step": s, "loss": 1.0 / s})
    if s % 2 == 0:
      recs.append({"kind": "eval", "step": s, "val_accuracy": 0.1 * s})
  w.mkdir()
  (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  results_lib.write_results(w, {
      "config": {"preset": "quick", "optimizer": "adam", "learning_rate": 3e-4,
                 "num_steps": steps, "batch_pairs": batch, "dtype": "float32"},
      "lake_20way_accuracy": 0.4, "lake_20way_ci95": [0.35, 0.45],
      "validation_best_step": steps, "pairs_per_s": 30.0, "train_time_s": 12.0,
      "steps": steps, "end": "finished",
      "machine": {"load_average_at_start": [0.1, 0.1, 0.1],
                  "load_average_at_end": [1.0, 1.0, 1.0]}}, command="python x.py")
  return w


def test_learning_curve_collects_runs_and_draws_them(tmp_path):
  a = _workdir(tmp_path, "a", batch=32, steps=4)
  b = _workdir(tmp_path, "b", batch=128, steps=6)
  out = tmp_path / "out" / "curve.json"
  assert _script().main(["--learning-curve", str(out), str(a), str(b)]) == 0
  d = json.loads(out.read_text())
  assert [r["name"] for r in d["runs"]] == ["a", "b"]
  run_b = d["runs"][1]
  assert [v["pairs_seen"] for v in run_b["validation"]] == [256, 512, 768]
  assert run_b["validation"][-1]["val_accuracy"] == pytest.approx(0.6)
  assert len(run_b["train_loss"]) == 6 and run_b["recipe"]["learning_rate"] == 3e-4
  assert run_b["recipe"]["lr_schedule"] is None  # older work directories lack the field
  assert d["gpu_plan"]["cpu_pairs_seen_max"] == 768
  assert d["gpu_plan"]["paper_fast_pairs"] == (d["gpu_plan"]["paper_fast_steps"]
                                               * d["gpu_plan"]["paper_fast_batch_pairs"])
  assert d["command"] and d["machine"]  # provenance of every results file
  assert out.with_suffix(".png").stat().st_size > 1000


def test_learning_curve_refuses_unfinished_workdirs(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  script = _script()
  assert script.main(["--learning-curve", str(tmp_path / "o.json"), str(tmp_path / "empty")]) == 2
  assert "holds no results.json (train it first)" in capsys.readouterr().err
  assert script.main(["--learning-curve", str(tmp_path / "o.json")]) == 2
  assert "WORKDIR" in capsys.readouterr().err
  w = _workdir(tmp_path, "w", batch=8, steps=2)
  (w / "metrics.jsonl").unlink()
  with pytest.raises(ValueError, match="no metrics.jsonl"):
    learning_curves.collect(str(tmp_path / "o.json"), [str(w)], paper_fast=None)
  assert not (tmp_path / "o.json").exists()


def _run_dir(root, name, *, seed, lake, channels=32):
  w = _workdir(root, name, batch=8, steps=4)
  res = json.loads((w / "results.json").read_text())
  res["config"].update(seed=seed, channels=channels, data_dir=f"/data/{name}")
  res["machine"].update(cpu_model="AMD EPYC", cpu_isa=["avx2"], nproc=2)
  res.update(lake_20way_accuracy=lake, lake_20way_ci95=lake and [lake - 0.05, lake + 0.05],
             validation_best_accuracy=0.3 + seed / 10, wall_time_s=600.0,
             compile_time_s=3.0, images_per_s=1000.0)
  results_lib.write_results(w, {k: v for k, v in res.items()
                                if k not in ("command", "machine", "git_commit", "date")},
                            command=f"python x.py --seed {seed}")
  # write_results records this machine; keep the run's own.
  (w / "results.json").write_text(json.dumps({**json.loads((w / "results.json").read_text()),
                                              "machine": res["machine"]}))
  return w


def test_compare_names_what_each_run_changes_and_means_the_scored_runs(tmp_path):
  runs = [_run_dir(tmp_path, f"s{s}", seed=s, lake=0.9 + s / 100) for s in range(3)]
  wide = _run_dir(tmp_path, "wide", seed=0, lake=None, channels=64)
  out = tmp_path / "out" / "cmp.json"
  assert _script().main(["--compare", str(out), *map(str, runs), str(wide)]) == 0
  d = json.loads(out.read_text())
  assert [r["changed"] for r in d["runs"]] == [{}, {"seed": 1}, {"seed": 2}, {"channels": 64}]
  s = d["summary"]
  assert s["runs"] == 4 and s["lake_scored_runs"] == 3
  assert s["lake_20way_mean"] == pytest.approx(0.91)
  assert (s["lake_20way_min"], s["lake_20way_max"]) == (0.9, 0.92)
  assert d["runs"][3]["lake_20way_accuracy"] is None and d["runs"][3]["wall_time_min"] == 10
  assert d["runs"][1]["validation"][-1] == {"step": 4, "val_accuracy": pytest.approx(0.4)}
  assert d["runs"][0]["cpu"]["cpu_isa"] == ["avx2"] and d["command"]
  assert out.with_suffix(".png").stat().st_size > 1000
  assert _script().main(["--compare", str(out)]) == 2
