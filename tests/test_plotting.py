"""The plots and picture sheets write PNG files."""

import numpy as np
import pytest

from siamjax import plotting


def _random_pairs(seed, n=500):
  rng = np.random.default_rng(seed)
  similar = rng.integers(0, 2, n)
  return rng.normal(similar * 1.0, 1.0), similar


def test_save_roc_png(tmp_path):
  pytest.importorskip("matplotlib")
  scores, similar = _random_pairs(7)
  path = tmp_path / "roc.png"
  plotting.save_roc_png(path, {"a": (-scores, similar)})
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contact_sheet(tmp_path):
  pytest.importorskip("PIL")
  images = np.random.default_rng(0).integers(0, 255, (4, 10, 12, 1), dtype=np.uint8)
  path = tmp_path / "sheet.png"
  assert plotting.contact_sheet(path, images, [[0, 3], [1, 2]], [1, 0], [0.1, 0.8],
                         class_names=["a", "b"], labels=np.array([0, 0, 1, 1])) == 2
  assert path.read_bytes()[:4] == b"\x89PNG"
  assert plotting.contact_sheet(path, images, np.zeros((0, 2), int), [], []) == 0
  with pytest.raises(ValueError, match="same pairs"):
    plotting.contact_sheet(path, images, [[0, 1]], [1, 0], [0.5])


@pytest.mark.parametrize("name", ["confusion", "training", "oneshot", "learning_curves"])
def test_the_other_plots_write_pngs(tmp_path, name):
  pytest.importorskip("matplotlib")
  path = tmp_path / f"{name}.png"
  rng = np.random.default_rng(0)
  if name == "confusion":
    plotting.save_confusion_png(rng.integers(0, 9, (3, 3)), ["a", "b", "c"], path, title="t")
  elif name == "training":
    plotting.save_training_png(path, [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)],
                               [{"step": 3, "val_accuracy": 0.5}], title="t")
  elif name == "oneshot":
    images = rng.integers(0, 255, (21, 8, 8), dtype=np.uint8)
    plotting.save_oneshot_task_png(path, images[0], images[1:], 3, 4, title="t")
  else:
    run = {"name": "r", "validation": [{"pairs_seen": 10, "val_accuracy": 0.2}],
           "train_loss": [{"pairs_seen": 10, "loss": 0.7}]}
    plotting.save_learning_curves_png([run], path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
