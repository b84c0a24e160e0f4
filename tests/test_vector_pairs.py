"""Vector-pair CSVs: parsing, row-naming errors, and both heads on separable data."""

import csv

import numpy as np
import pytest

from siamjax import recipes
from siamjax.data import folders


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


@pytest.mark.parametrize("head", ["contrastive", "bce"])
def test_both_heads_separate_generated_pairs(tmp_path, head):
  path = tmp_path / "p.csv"
  folders.write_synthetic_vector_pairs_csv(path, 2000, left_columns=16, right_columns=16,
                                           classes=8, noise=0.3, seed=0)
  left, right, similar = folders.load_vector_pairs_csv(path, left_columns=16, right_columns=16)
  results, _ = recipes.vector_pairs(left, right, similar, head=head, epochs=30, patience=3,
                                    hidden=(64, 32), batch_size=64)
  assert results["test_accuracy"] > 0.9
  assert results["test_verification"]["auc"] > 0.95
  assert results["best_epoch"] <= results["epochs_run"] <= 30
  assert "val_loss" in results["history"][0]


def test_vector_pairs_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="left and right"):
    recipes.vector_pairs(np.zeros((10, 3)), np.zeros((10, 4)), np.zeros(10))
  with pytest.raises(ValueError, match="head"):
    recipes.vector_pairs(np.zeros((400, 3)), np.zeros((400, 3)), np.arange(400) % 2, head="l2")
