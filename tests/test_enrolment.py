"""The attendance protocol (siamjax.recipes.enrolment): its groups never mix the scored
classes into calibration, and the script behaves like every other (a re-run is a no-op)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from siamjax.recipes import enrolment

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("SIAMJAX_DATA_DIR"),
                                reason="needs SIAMJAX_DATA_DIR (Omniglot zips)")


def test_omniglot_groups_keep_scored_classes_out_of_calibration():
  from siamjax.data import omniglot
  cfg = enrolment.Config(probe_drawers=(1, 2))
  groups = enrolment._omniglot_groups(cfg)
  evaluation = omniglot.load_omniglot("evaluation")
  lake = {evaluation.alphabets[a] for a in omniglot.lake_alphabets(
      evaluation, omniglot.load_lake_runs())}
  cal, scored = groups["calibration"], groups["scored"]
  assert set(scored[4]["alphabets"]) == lake and not set(cal[4]["alphabets"]) & lake
  assert not set(cal[3]) & set(scored[3])  # no character in both groups
  for gallery, staff, probes, probe_labels, about in (cal, scored):
    assert gallery.shape[0] == len(staff) == about["staff"] and len(set(staff)) == len(staff)
    assert probes.shape[0] == len(probe_labels) == 2 * about["characters"]
    strangers = set(probe_labels) - set(staff)
    assert len(strangers) == about["strangers"] > 0
    assert 0.45 < about["staff"] / about["characters"] < 0.55
  # The enrolled drawing is never a probe: drawer 0 enrols, drawers 1 and 2 probe.
  chars = {c: i for i, c in enumerate(evaluation.characters)}
  i = chars[scored[1][0]]
  np.testing.assert_array_equal(scored[0][0], evaluation.images[i, 0])
  first = list(scored[3]).index(scored[1][0])
  np.testing.assert_array_equal(scored[2][first], evaluation.images[i, 1])
  with pytest.raises(ValueError, match="distinct drawers"):
    enrolment._omniglot_groups(enrolment.Config(enrol_drawer=1, probe_drawers=(1, 2)))


@pytest.mark.slow
def test_script_enrols_calibrates_scores_and_reruns_as_a_no_op(smoke_run, tmp_path):
  run = smoke_run("omniglot_koch.py")  # read only: enrolment writes to its own --workdir
  cmd = [sys.executable, str(ROOT / "experiments/enrolment.py"), "--smoke", "--model-workdir",
         str(run), "--workdir", str(tmp_path / "out"), "--no-progress"]
  first = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
  results = json.loads((tmp_path / "out/results.json").read_text())
  cal = results["calibration"]["far=0.1"]
  assert cal["protocol"] == "open_set" and cal["far"] <= 0.1
  at = results["at_far"]["far=0.1"]
  assert at["threshold"] == cal["threshold"] and at["calibration_far"] == cal["far"]
  assert at["far_ci95"][0] <= at["far"] <= at["far_ci95"][1]
  assert abs(at["stranger_rejection"] - (1 - at["far"])) < 1e-12
  assert 0 <= results["closed_set_accuracy"] <= 1 and results["plots"] == ["dir_far.png"]
  assert results["groups"]["scored"]["gallery"] > 0
  again = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert again.stdout == first.stdout
  assert "finished run" in again.stderr
  assert json.loads((tmp_path / "out/results.json").read_text()) == results
  bad = subprocess.run(cmd[:2] + ["--smoke", "--workdir", str(tmp_path / "o2")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert bad.returncode == 2 and "pass --model-workdir" in bad.stderr
