"""Image folders: a folder the test writes, loaded, trained on, and drawn."""

import numpy as np
import pytest

from siamjax import recipes
from siamjax.data import folders

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
  tr, va = recipes.split_per_class(labels, 0.3, seed=0)
  assert np.intersect1d(tr, va).size == 0 and tr.size + va.size == labels.size
  for c in range(3):
    assert (labels[tr] == c).any() and (labels[va] == c).any()
  with pytest.raises(ValueError, match="needs two"):
    recipes.split_per_class(np.array([0, 1, 1]), 0.5, seed=0)


def test_sample_pairs_alternate_and_respect_classes():
  import jax
  import jax.numpy as jnp
  labels = np.repeat(np.arange(5), 4).astype(np.int32)
  table, counts = recipes.class_index_table(labels)
  pairs, similar = recipes.sample_pairs(jax.random.key(0), jnp.asarray(table),
                                        jnp.asarray(counts), 200)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  assert similar.tolist() == [1, 0] * 100
  assert ((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == (similar == 1)).all()
  assert (pairs[:, 0] != pairs[:, 1]).all()


@pytest.mark.slow
def test_image_folder_learns_and_draws_mistakes(folder, tmp_path):
  x, y, names, _ = folders.load_image_folder(folder, size=(20, 20))
  results, _ = recipes.image_folder(x, y, epochs=2, steps_per_epoch=20, batch_pairs=16,
                                    n_way=4, eval_pairs=200)
  assert results["images"] == {"train": 24, "val": 8, "classes": 4}
  assert results["val_pair_accuracy"] > 0.75
  assert results["val_one_shot_accuracy"] > 0.5  # chance is 0.25
  assert 0.5 < results["val_verification"]["auc"] <= 1.0
  mistakes = results["_mistakes"]
  losses = [-np.log(p if s else 1 - p) for _, _, s, p in mistakes]
  assert losses == sorted(losses, reverse=True)
  path = tmp_path / "sheet.png"
  fake = [(0, 9, 1, 0.1), (1, 30, 0, 0.8)]
  assert recipes.contact_sheet(path, x, fake, class_names=names, labels=y) == 2
  assert path.read_bytes()[:4] == b"\x89PNG"
