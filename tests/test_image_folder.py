"""Image folders: a folder the test writes, loaded, split, trained on, and drawn."""

import jax
import numpy as np
import pytest

import siamjax.recipes.image_folder as imf
from siamjax import sampling
from siamjax.data import folders, splits

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  folders.write_synthetic_image_folder(root, classes=4, per_class=8, seed=0)
  (root / "notes.txt").write_text("not a class")
  (root / "class_00" / "readme.md").write_text("not an image")
  return root


def test_load_image_folder_resizes_and_labels(folder):
  x, y, names, paths = folders.load_image_folder(folder, size=(20, 24))
  assert x.shape == (32, 20, 24, 3) and x.dtype == np.uint8
  assert names == ["class_00", "class_01", "class_02", "class_03"]
  assert np.bincount(y).tolist() == [8, 8, 8, 8]
  assert all(names[c] in p for c, p in zip(y, paths))
  g, *_ = folders.load_image_folder(folder, size=(16, 16), grayscale=True)
  assert g.shape == (32, 16, 16, 1)


def test_load_image_folder_errors(tmp_path, folder):
  with pytest.raises(ValueError, match="not a folder"):
    folders.load_image_folder(tmp_path / "missing")
  (tmp_path / "only").mkdir()
  with pytest.raises(ValueError, match="at least two class"):
    folders.load_image_folder(tmp_path)
  with pytest.raises(ValueError, match="needs at least 9"):
    folders.load_image_folder(folder, min_per_class=9)


def test_split_per_class_keeps_both_sides():
  labels = np.repeat(np.arange(3), [2, 5, 10])
  tr, va = splits.split_per_class(labels, 0.3, seed=0)
  assert np.intersect1d(tr, va).size == 0 and tr.size + va.size == labels.size
  for c in range(3):
    assert (labels[tr] == c).any() and (labels[va] == c).any()
  with pytest.raises(ValueError, match="needs two"):
    splits.split_per_class(np.array([0, 1, 1]), 0.5, seed=0)


def test_training_and_test_pairs_respect_the_split_and_the_classes():
  labels = np.repeat(np.arange(5), 6).astype(np.int32)
  tr, te = splits.split_per_class(labels, 0.3, seed=0)
  train, test = imf._table(labels, tr, 5), imf._table(labels, te, 5)
  pairs, similar = sampling.sample_pairs(jax.random.key(0), train, 200)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  assert np.isin(pairs, tr).all() and (pairs[:, 0] != pairs[:, 1]).all()
  assert ((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == (similar == 1)).all()
  pairs, similar = sampling.sample_pairs(jax.random.key(1), test, 200, partners=train)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  assert np.isin(pairs[:, 0], te).all() and np.isin(pairs[:, 1], tr).all()
  assert ((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == (similar == 1)).all()


def test_config_errors_name_the_argument(tmp_path, folder):
  with pytest.raises(ValueError, match="data_dir"):
    imf.load_images(imf.Config(), tmp_path)
  x, y, _, _ = folders.load_image_folder(folder, size=(8, 8))
  for bad, name in [(dict(steps_per_call=0), "steps_per_call"), (dict(batch_pairs=7),
                                                                  "batch_pairs"),
                    (dict(eval_pairs=3), "eval_pairs"), (dict(n_way=1), "n_way")]:
    with pytest.raises(ValueError, match=name):
      imf.fit_and_evaluate(x, y, imf.Config(**bad), tmp_path, progress=False)
  with pytest.raises(ValueError, match="val_fraction: class 1 keeps 1 training image"):
    imf.fit_and_evaluate(x[:6], np.array([0, 0, 0, 0, 1, 1]), imf.Config(), tmp_path,
                         progress=False)


@pytest.mark.slow
def test_image_folder_learns_and_draws_mistakes(folder, tmp_path):
  x, y, names, _ = folders.load_image_folder(folder, size=(20, 20))
  cfg = imf.Config(epochs=2, steps_per_epoch=40, steps_per_call=2, batch_pairs=16, n_way=4,
                   eval_pairs=200)
  results = imf.fit_and_evaluate(x, y, cfg, tmp_path, class_names=names, progress=False)
  assert results["images"] == {"train": 24, "test": 8, "classes": 4}
  assert results["test_pair_accuracy"] > 0.75
  assert results["test_one_shot_accuracy"] > 0.5  # chance is 0.25
  assert results["test_one_shot_trials"] == 8 and results["n_way"] == 4
  assert 0.5 < results["test_verification"]["auc"] <= 1.0
  assert [h["epoch"] for h in results["history"]] == [1, 2]
  for png in ("mistakes.png", "roc.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  assert 0 <= results["mistakes_shown"] <= 12
  again = imf.fit_and_evaluate(x, y, cfg, tmp_path, progress=False, eval_only=True)
  assert again["test_pair_accuracy"] == results["test_pair_accuracy"]
  assert again["test_one_shot_accuracy"] == results["test_one_shot_accuracy"]
