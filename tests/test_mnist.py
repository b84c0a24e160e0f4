"""The MNIST recipes end to end on synthetic digits written as IDX files.

Both recipes learn through ``train_and_evaluate``; the validation split holds training
images only; the triplet recipe's choices (thresholds, headline rule) do not move when
the test set changes; the contrastive batches are a pure function of the step.
"""

import gzip
import json
import struct

import jax
import numpy as np
import pytest

from siamjax import sampling
from siamjax.data import mnist as mnist_data
from siamjax.recipes import mnist


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _synthetic_digits(n, seed, marker):
  """Ten well-separated 28x28 'digits': a class-specific bright stripe plus noise; pixel
  (27, 27) holds ``marker`` (tells training and test images apart)."""
  rng = np.random.default_rng(seed)
  labels = np.tile(np.arange(10), n // 10)
  images = rng.integers(0, 60, (labels.size, 28, 28))
  for c in range(10):
    images[labels == c, 2 * c + 3, :] = 255
  images[:, 27, 27] = marker
  return images.astype(np.uint8), labels.astype(np.int32)


def _write_split(root, split, images, labels):
  folder = root / "mnist"
  folder.mkdir(parents=True, exist_ok=True)
  image_file, label_file = mnist_data.FILES[split]
  _write_idx(folder / image_file, images)
  _write_idx(folder / label_file, labels)


@pytest.fixture
def digits(tmp_path):
  """A data directory of 300 training (marker 100) and 100 test (marker 200) digits."""
  root = tmp_path / "data"
  _write_split(root, "train", *_synthetic_digits(300, 0, 100))
  _write_split(root, "test", *_synthetic_digits(100, 1, 200))
  return root


def _eval_records(path):
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "eval"]


@pytest.mark.slow
def test_contrastive_learns_synthetic_digits(digits, tmp_path):
  cfg = mnist.ContrastiveConfig(data_dir=str(digits), epochs=2, batch_size=32)
  results = mnist.contrastive.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  assert results["train_pairs"] == 2 * 10 * 29 and results["test_pairs"] == 2 * 10 * 9
  assert results["steps_per_epoch"] == 580 // 32 and results["steps"] == 2 * (580 // 32)
  assert results["test_pair_accuracy"] > 0.9
  assert results["test_verification"]["auc"] > 0.95
  assert results["test_recall_at_1"] > 0.9
  assert [h["epoch"] for h in results["history"]] == [1, 2]
  assert results["images"] == {"train": 300, "val": 0, "test": 100}
  assert (tmp_path / "run" / "roc.png").is_file()
  assert not _eval_records(tmp_path / "run" / "metrics.jsonl")  # no validation: no evals


@pytest.mark.slow
@pytest.mark.parametrize("pairing", ["keras_fresh", "random"])
def test_contrastive_validation_every_epoch(digits, tmp_path, pairing):
  cfg = mnist.ContrastiveConfig(data_dir=str(digits), epochs=3, batch_size=32,
                                val_fraction=0.2, pairing=pairing, steps_per_call=7)
  results = mnist.contrastive.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  assert results["images"] == {"train": 240, "val": 60, "test": 100}
  assert results["train_pairs"] == 2 * 10 * 23 and results["val_pairs"] == 2 * 10 * 5
  per_epoch = results["steps_per_epoch"]
  evals = _eval_records(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in evals] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
  assert all(0.0 <= r["val_pair_accuracy"] <= 1.0 for r in evals)
  assert results["val_pair_accuracy"] == evals[-1]["val_pair_accuracy"]
  assert [h["val_pair_accuracy"] for h in results["history"]] == [
      r["val_pair_accuracy"] for r in evals]
  assert results["test_pair_accuracy"] > 0.8


def test_validation_split_holds_training_images_only(digits):
  cfg = mnist.TripletConfig(data_dir=str(digits), val_fraction=0.2, seed=3)
  d = mnist.load_data(cfg)
  x_all, y_all = mnist_data.load_mnist("train", digits)
  assert not set(d.train_positions.tolist()) & set(d.val_positions.tolist())
  assert sorted(d.train_positions.tolist() + d.val_positions.tolist()) == list(range(300))
  np.testing.assert_array_equal(d.x_val, x_all[d.val_positions])
  np.testing.assert_array_equal(d.y_train, y_all[d.train_positions])
  assert (d.x_val[:, 27, 27] == 100).all() and (d.x_train[:, 27, 27] == 100).all()
  assert (d.x_test[:, 27, 27] == 200).all() and len(d.y_test) == 100
  assert np.bincount(d.y_val).tolist() == [6] * 10  # stratified
  again = mnist.load_data(cfg)
  np.testing.assert_array_equal(again.val_positions, d.val_positions)  # a function of seed
  none = mnist.load_data(mnist.ContrastiveConfig(data_dir=str(digits), train_images=200))
  assert none.x_val is None and len(none.y_train) == 200


@pytest.mark.slow
def test_triplet_chooses_on_validation_never_on_test(digits, tmp_path):
  cfg = mnist.TripletConfig(data_dir=str(digits), rules=("batch_all", "batch_hard"),
                            val_fraction=0.2, epochs=2, steps_per_epoch=15,
                            contrastive_results="")
  workdir = tmp_path / "run"
  results = mnist.triplet.train_and_evaluate(cfg, workdir, progress=False)
  sel = results["selection"]
  assert sel["on"] == "validation" and sel["measure"] == "auc"
  assert sel["values"] == {r: results["runs"][r]["selection_verification"]["auc"]
                           for r in cfg.rules}
  assert sel["rule"] == results["best_mining"] == max(cfg.rules, key=sel["values"].get)
  assert results["test_pair_accuracy"] == results["runs"][sel["rule"]]["test_pair_accuracy"]
  for rule in cfg.rules:
    run = results["runs"][rule]
    assert run["test_pair_accuracy"] > 0.9 and run["test_recall_at_1"] > 0.9
    assert sel["thresholds"][rule] == run["threshold"]
    assert [r["step"] for r in _eval_records(workdir / rule / "metrics.jsonl")] == [15, 30]
  assert results["images"] == {"train": 240, "val": 60, "test": 100}
  assert set(results["comparison"]) == set(cfg.rules)

  # Another test set (labels shuffled): every test figure moves, no choice does.
  x_te, y_te = _synthetic_digits(100, 1, 200)
  _write_split(digits, "test", x_te, np.random.default_rng(0).permutation(y_te))
  other = mnist.triplet.train_and_evaluate(cfg, workdir, progress=False, eval_only=True)
  assert other["selection"] == sel
  for rule in cfg.rules:
    assert other["runs"][rule]["threshold"] == results["runs"][rule]["threshold"]
    assert other["runs"][rule]["test_verification"]["auc"] < 0.8
    assert other["runs"][rule]["selection_verification"] == results["runs"][rule][
        "selection_verification"]


@pytest.mark.slow
def test_contrastive_prepare_is_a_function_of_the_step():
  labels = np.repeat(np.arange(10), 6).astype(np.int32)
  pairs, similar = mnist.example_pairs(jax.random.key(0), labels)
  data = {"pairs": pairs, "similar": similar, "classes": sampling.index_table(labels)}
  key = jax.random.key(1)
  n_pairs, batch = int(pairs.shape[0]), 10
  per_epoch = n_pairs // batch
  for pairing in mnist.PAIRINGS:
    cfg = mnist.ContrastiveConfig(pairing=pairing, batch_size=batch)
    prepare = mnist.contrastive_prepare(cfg, n_pairs, per_epoch)
    epoch1 = prepare(data, key, per_epoch, per_epoch)
    part = prepare(data, key, per_epoch + 2, 3)
    for k in ("pairs", "similar"):
      np.testing.assert_array_equal(part[k], epoch1[k][2:5])
    p = np.asarray(epoch1["pairs"])
    assert p.shape == (per_epoch, batch, 2)
    np.testing.assert_array_equal(labels[p[..., 0]] == labels[p[..., 1]],
                                  np.asarray(epoch1["similar"]) == 1)
    epoch0 = np.asarray(prepare(data, key, 0, per_epoch)["pairs"])
    rows0 = {tuple(r) for r in epoch0.reshape(-1, 2).tolist()}
    rows1 = {tuple(r) for r in p.reshape(-1, 2).tolist()}
    assert (rows0 == rows1) == (pairing == "keras")  # fresh pairs: another set each epoch


def test_bad_config_names_the_argument(digits, tmp_path):
  cases = [(mnist.contrastive, mnist.ContrastiveConfig(pairing="nope"), "pairing"),
           (mnist.contrastive, mnist.ContrastiveConfig(source="csv"), "source"),
           (mnist.contrastive, mnist.ContrastiveConfig(val_fraction=1.0), "val_fraction"),
           (mnist.contrastive, mnist.ContrastiveConfig(steps_per_call=5), "steps_per_call"),
           (mnist.contrastive, mnist.ContrastiveConfig(batch_size=10_000), "batch_size"),
           (mnist.triplet, mnist.TripletConfig(rules=("hardest",)), "rules"),
           (mnist.triplet, mnist.TripletConfig(select_by="test_auc"), "select_by"),
           (mnist.triplet, mnist.TripletConfig(classes_per_batch=11), "classes_per_batch")]
  for recipe, cfg, name in cases:
    cfg.data_dir = str(digits)
    with pytest.raises(ValueError, match=name):
      recipe.train_and_evaluate(cfg, tmp_path / name, progress=False)


@pytest.mark.parametrize("recipe", [mnist.contrastive, mnist.triplet])
def test_presets_follow_the_contract(recipe):
  assert set(recipe.PRESETS) >= {"default", "smoke"}
  for name, make in recipe.PRESETS.items():
    cfg = make()
    assert cfg.preset == name and hasattr(cfg, "seed") and hasattr(cfg, "devices")
    assert hasattr(cfg, "data_dir")
  smoke = recipe.PRESETS["smoke"]()
  assert (smoke.train_images, smoke.test_images) == (2000, 1000) and smoke.epochs >= 2
  default = recipe.PRESETS["default"]()
  assert default.epochs == (20 if recipe is mnist.contrastive else 10)
