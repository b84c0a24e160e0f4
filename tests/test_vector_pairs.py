"""Vector-pair CSVs: parsing, row-naming errors, and the recipe's heads, early stopping
and validation-only threshold on generated pairs."""

import csv

import numpy as np
import pytest

import siamjax.recipes.vector_pairs as vp
from siamjax.data import folders, splits


def _write(path, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)


def test_default_layout_round_trip(tmp_path):
  path = tmp_path / "p.csv"
  folders.write_synthetic_vector_pairs_csv(path, 12, seed=1)
  left, right, similar = folders.load_vector_pairs_csv(path)
  assert left.shape == (12, 200) and right.shape == (12, 200) and similar.shape == (12,)
  assert left.dtype == np.float32 and similar.dtype == np.int32
  assert set(similar.tolist()) == {0, 1}
  raw = np.loadtxt(path, delimiter=",", skiprows=1)
  np.testing.assert_allclose(left, raw[:, :200], rtol=1e-6)
  np.testing.assert_allclose(right, raw[:, 200:400], rtol=1e-6)
  np.testing.assert_array_equal(similar, raw[:, 400])


def test_configurable_split_and_label_column(tmp_path):
  path = tmp_path / "p.csv"
  _write(path, [[1, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10]])  # label first, 2 + 3 columns
  left, right, similar = folders.load_vector_pairs_csv(
      path, left_columns=2, right_columns=None, label_column=0)
  assert left.tolist() == [[1, 2], [6, 7]]
  assert right.tolist() == [[3, 4, 5], [8, 9, 10]]
  assert similar.tolist() == [1, 0]


@pytest.mark.parametrize("bad_row,message", [
    (["1", "2", "3", "1"], r"line 3 has 4 columns, expected 5"),
    (["1", "x", "3", "4", "1"], r"line 3, column 2 is not a number: 'x'"),
    (["1", "2", "3", "4", "2"], r"line 3 has label '2' in column 5"),
    (["1", "2", "3", "4", "0.5"], r"line 3 has label '0.5'"),
    (["1", "nan", "3", "4", "1"], r"line 3, column 2 is not finite"),
])
def test_bad_rows_are_named(tmp_path, bad_row, message):
  path = tmp_path / "p.csv"
  _write(path, [["a0", "a1", "b0", "b1", "same"], ["1", "2", "3", "4", "0"], bad_row])
  with pytest.raises(ValueError, match=message):
    folders.load_vector_pairs_csv(path, left_columns=2, right_columns=2)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    folders.load_vector_pairs_csv(tmp_path / "none.csv")
  _write(tmp_path / "h.csv", [["a", "b", "label"]])
  with pytest.raises(ValueError, match="no data rows"):
    folders.load_vector_pairs_csv(tmp_path / "h.csv", left_columns=1, right_columns=1)


def _pairs(tmp_path, rows=2000, noise=0.3, seed=0):
  path = tmp_path / "p.csv"
  folders.write_synthetic_vector_pairs_csv(path, rows, left_columns=16, right_columns=16,
                                           classes=8, noise=noise, seed=seed)
  return folders.load_vector_pairs_csv(path, left_columns=16, right_columns=16)


SMALL = vp.Config(hidden=(64, 32), batch_size=64, epochs=30, patience=3, checkpoint_every=10)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["contrastive", "bce"])
def test_both_heads_separate_generated_pairs(tmp_path, head):
  left, right, similar = _pairs(tmp_path)
  results, (dist, labels) = vp.train_head(left, right, similar, SMALL, head, tmp_path / head,
                                          progress=False)
  assert results["rows"] == {"train": 1400, "val": 300, "test": 300}
  assert results["test_accuracy"] > 0.9
  assert results["test_verification"]["auc"] > 0.95
  assert results["best_epoch"] <= results["epochs_run"] <= 30
  assert "val_loss" in results["history"][0]
  assert dist.shape == labels.shape == (300,)


@pytest.mark.slow
def test_early_stopping_restores_the_best_checkpoint(tmp_path):
  left, right, similar = _pairs(tmp_path, rows=300, noise=1.5)  # a wide net overfits fast
  cfg = vp.Config(hidden=(256, 256), dropout_rate=0.0, learning_rate=1e-2, batch_size=30,
                  epochs=40, patience=2, checkpoint_every=40)
  results, _ = vp.train_head(left, right, similar, cfg, "bce", tmp_path / "run", progress=False)
  val = [h["val_loss"] for h in results["history"]]
  assert results["stopped_early"] and results["epochs_run"] < 40
  assert results["best_epoch"] == results["history"][int(np.argmin(val))]["epoch"]
  assert results["best_epoch"] == results["epochs_run"] - 2  # patience 2
  assert results["evaluated_checkpoint"] == "best"
  # The evaluated parameters are the best epoch's, not the last one's.
  assert results["val_loss"] == pytest.approx(min(val), rel=1e-6)
  assert results["val_loss"] < val[-1]


@pytest.mark.slow
def test_threshold_is_chosen_on_validation_pairs_only(tmp_path):
  left, right, similar = _pairs(tmp_path, rows=1000)
  _, _, test_rows = splits.split_indices(len(similar), (0.7, 0.15), seed=0)
  flipped = similar.copy()
  flipped[test_rows] = 1 - flipped[test_rows]  # the test labels cannot move the threshold
  cfg = vp.Config(hidden=(64, 32), batch_size=64, epochs=3, checkpoint_every=3)
  a, _ = vp.train_head(left, right, similar, cfg, "bce", tmp_path / "a", progress=False)
  b, _ = vp.train_head(left, right, flipped, cfg, "bce", tmp_path / "b", progress=False)
  assert a["val_best_threshold"] == b["val_best_threshold"]
  assert a["val_best_accuracy"] == b["val_best_accuracy"]
  assert b["test_accuracy"] == pytest.approx(1.0 - a["test_accuracy"])
  assert b["test_verification"]["auc"] == pytest.approx(1.0 - a["test_verification"]["auc"])


def test_train_head_rejects_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="left and right"):
    vp.train_head(np.zeros((10, 3)), np.zeros((10, 4)), np.zeros(10), vp.Config(), "bce",
                  tmp_path)
  with pytest.raises(ValueError, match="head"):
    vp.train_head(np.zeros((400, 3)), np.zeros((400, 3)), np.arange(400) % 2, vp.Config(),
                  "l2", tmp_path)
  with pytest.raises(ValueError, match="batch_size"):
    vp.train_head(np.zeros((40, 3)), np.zeros((40, 3)), np.arange(40) % 2, vp.Config(), "bce",
                  tmp_path)
  with pytest.raises(ValueError, match="head"):
    vp.train_and_evaluate(vp.Config(head="l2", generate=10), tmp_path)


def test_load_pairs_reads_generates_and_names_the_arguments(tmp_path):
  with pytest.raises(ValueError, match="--csv FILE and --generate ROWS"):
    vp.load_pairs(vp.Config(), tmp_path)
  with pytest.raises(ValueError, match="not both"):
    vp.load_pairs(vp.Config(csv="p.csv", generate=10), tmp_path)
  left, right, similar, path = vp.load_pairs(vp.Config(generate=10, left_columns=3,
                                                       right_columns=3), tmp_path / "w")
  assert path == tmp_path / "w" / "pairs.csv" and left.shape == right.shape == (10, 3)
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "mine.csv", [[1, 2, 3, 4, 1], [5, 6, 7, 8, 0]])
  left, right, similar, path = vp.load_pairs(vp.Config(csv="mine.csv", data_dir=str(data),
                                                       left_columns=2, right_columns=2), None)
  assert left.tolist() == [[1, 2], [5, 6]] and similar.tolist() == [1, 0]
  with pytest.raises(ValueError, match="does not exist"):
    vp.load_pairs(vp.Config(csv="mine.csv"), None)
