"""Tests of benchmarks/losses_per_sec.py's parts (no timing asserts)."""

import json
import os
import resource
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import losses_bench as lb  # noqa: E402

from siamjax import losses  # noqa: E402


def test_batches_are_p_by_k_and_shared():
  cfg = lb.Config(dim=6)
  emb, labels = lb.batch(cfg, 12, 4)
  assert emb.shape == (12, 6) and emb.dtype == np.float32
  assert sorted(np.bincount(labels).tolist()) == [4, 4, 4]
  again = lb.batch(cfg, 12, 4)
  np.testing.assert_array_equal(again[0], emb)
  np.testing.assert_array_equal(again[1], labels)


def test_every_loss_names_a_siamjax_function_or_is_reported_missing():
  names = [s.fn for s in lb.LOSSES]
  assert len(set(lb.LOSS_NAMES)) == len(lb.LOSSES)
  present = [n for n in names if hasattr(losses, n)]
  assert {"batch_all_triplet_loss", "batch_hard_triplet_loss", "ntxent_loss"} <= set(present)


def test_peak_rss_delta_sees_an_allocation():
  if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("needs Linux /proc")
  delta, out = lb.peak_rss_delta(lambda: float(np.ones(16 * 2**20)[::4096].sum()))  # 128 MiB
  if delta is None:
    pytest.skip("the kernel does not let this process reset its peak RSS")
  assert out == 16 * 2**20 / 4096
  assert 120 * 2**20 <= delta < 1024 * 2**20


def test_address_space_cap_fails_big_allocations_and_restores_the_limit():
  before = resource.getrlimit(resource.RLIMIT_AS)
  with lb.address_space_cap(64 * 2**20):
    with pytest.raises(MemoryError):
      np.ones(2**30 // 8 * 4)  # 4 GiB
  assert resource.getrlimit(resource.RLIMIT_AS) == before
  assert np.ones(2**20).sum() == 2**20


def test_compare_flags_differences():
  g = np.ones((3, 2))
  assert lb.compare(1.0, g, 1.0, g)["equal"]
  assert not lb.compare(1.0, g, 1.1, g)["equal"]
  bad = lb.compare(1.0, g * 1.01, 1.0, g)
  assert not bad["equal"] and bad["grad_rel_diff"] == pytest.approx(0.01)


def test_clock_repeats_fast_rows_until_min_total_and_caps_them():
  calls = []

  def run():
    calls.append(1)
    time.sleep(0.004)

  cfg = lb.Config(repeats=2, min_total_s=0.03, max_repeats=50)
  _, times, _, _ = lb.clock(run, lambda x: x, cfg)
  assert 2 <= len(times) < 50 and sum(times) >= 0.03 and sum(times[:-1]) < 0.03
  cfg = lb.Config(repeats=2, min_total_s=10.0, max_repeats=4)
  assert len(lb.clock(run, lambda x: x, cfg)[1]) == 4
  cfg = lb.Config(repeats=3, min_total_s=0.0)
  assert len(lb.clock(run, lambda x: x, cfg)[1]) == 3


@pytest.mark.slow
def test_run_writes_rows_checks_equality_and_skips_missing_losses(tmp_path):
  cfg = lb.Config(batches=(8,), dim=4, repeats=1, slow_repeats=1, min_total_s=0.0)
  out = tmp_path / "losses.json"
  lb.run(cfg, str(out), "pytest")
  rec = json.loads(out.read_text())
  assert rec["command"] == "pytest" and rec["machine"]["cpu_model"]
  assert "cpu_isa" in rec["machine"]
  rows = rec["rows"]
  for spec in lb.LOSSES:
    mine = [r for r in rows if r["impl"] == "siamjax" and r["loss"] == spec.name]
    assert len(mine) == 1
    r = mine[0]
    if not hasattr(losses, spec.fn):
      assert "no " + spec.fn in r["skipped"]
      continue
    assert r["step_s"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] >= 0
    assert r["repeats"] == 1 and r["batch"] == 8 and r["per_class"] == spec.per_class
    assert r["floor"]["step_s"] > 0 and r["vs_floor"] == r["step_s"] / r["floor"]["step_s"]
    assert len(r["floor"]["products"]) == spec.gram_products
    assert r["vs_best_floor"] >= r["vs_floor"] * (1 - 1e-12)
    pml = [p for p in rows if p["impl"] == "pml" and p["loss"] == spec.name]
    if spec.pml is None:
      assert not pml and r["pml"]["skipped"]
    elif "pytorch_metric_learning" in rec["software"]:
      assert len(pml) == 1 and r["vs_pml"] > 0
      if spec.equivalent:
        assert r["pml"]["equal"], (spec.name, r["pml"])
      else:
        assert "equal" not in r["pml"]
  assert "batch_all" in lb.format_table(rows)
  assert "| batch_hard | 8 |" in lb.format_floor_markdown(rows)


def test_floor_times_the_losses_own_products():
  cfg = lb.Config(repeats=1, min_total_s=0.0)
  emb = np.ones((8, 4), np.float32)
  spec = {s.name: s for s in lb.LOSSES}
  three, one = lb.floor_row(spec["ntxent"], emb, cfg), lb.floor_row(spec["batch_hard"], emb, cfg)
  assert three["products"] == ["E E^T", "dG E", "dG^T E"] and three["flops"] == 3 * 2 * 64 * 4
  assert one["products"] == ["E E^T"] and one["flops"] == 2 * 64 * 4
  assert three["step_s"] > 0 and three["gflop_per_s"] > 0
  assert [s.name for s in lb.LOSSES if s.gram_products == 1] == ["batch_hard"]


def test_format_table_shows_skipped_and_failed_references():
  base = {"impl": "siamjax", "batch": 8, "step_s": 0.01, "step_s_min": 0.01,
          "step_s_max": 0.02, "compile_s": 1.0, "temp_bytes": 2**20,
          "rss_peak_delta_bytes": None}
  rows = [
      {**base, "loss": "ntxent", "pml": {"skipped": "failed under the 6.0 GiB cap: [enforce "
                                                    "fail] you tried to allocate 12834570240 "
                                                    "bytes. Error code 12"}},
      {"impl": "pml", "loss": "ntxent", "batch": 8, "skipped": "failed under the cap"},
      {**base, "loss": "semi_hard", "pml": {"skipped": "no equivalent: another rule"}},
      {"impl": "siamjax", "loss": "circle", "skipped": "siamjax.losses has no circle_loss yet"},
  ]
  table = lb.format_table(rows)
  assert "an allocation of 12.0 GiB failed" in table
  assert "no equivalent" in table and "circle_loss yet" in table
