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
