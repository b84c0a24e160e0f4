"""Bad data never gives a silent wrong result (issue 12): each case as a user meets it.

Every loader and evaluator refuses what it cannot use with one ``ValueError`` naming the
file (line, column, member or folder) or the argument and what to do; the scripts print
it as one line, ``error: ...``, exit status 2. All data is generated here; no network.
"""

from __future__ import annotations

import csv
import gzip
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import encoders, sampling
from siamjax.data import folders, mnist, omniglot
from siamjax.evaluation import oneshot, verification
from siamjax.recipes import cli, image_folder, vector_pairs

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  return path


def _rows(n=10, seed=0):
  """``n`` rows of 2 left + 2 right values and a label, both labels present."""
  rng = np.random.default_rng(seed)
  return [[f"{v:.3f}" for v in rng.normal(size=4)] + [str(i % 2)] for i in range(n)]


def _load(path, **kw):
  return folders.load_vector_pairs_csv(path, left_columns=2, right_columns=2, **kw)


# ---------------------------------------------------------------------------------
# Vector-pair CSVs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cell,message", [("", r"line 1, column 2 is empty"),
                                          ("abc", r"line 1, column 2 is not a number: 'abc'")])
def test_csv_first_row_with_a_bad_cell_is_a_bad_row_not_a_header(tmp_path, cell, message):
  rows = _rows()
  rows[0][1] = cell  # used to be taken for a header and dropped (9 of 10 rows kept)
  with pytest.raises(folders.CSVDataError, match=message + r".*pass --header"):
    _load(_write_csv(tmp_path / "p.csv", rows))


def test_csv_header_is_decided_once_and_the_flag_overrides(tmp_path):
  names = ["a0", "a1", "b0", "b1", "same"]
  with_header = _write_csv(tmp_path / "h.csv", [names] + _rows())
  plain = _write_csv(tmp_path / "n.csv", _rows())
  assert _load(with_header)[2].shape == (10,) and _load(plain)[2].shape == (10,)
  assert _load(plain, header=True)[2].shape == (9,)  # asked for: the first row is skipped
  with pytest.raises(ValueError, match=r"line 1, column 1 is not a number: 'a0'"):
    _load(with_header, header=False)
  # A header of numbers is data to the detector: the error says how to skip it.
  numeric = _write_csv(tmp_path / "d.csv", [["0", "1", "2", "3", "4"]] + _rows())
  with pytest.raises(ValueError, match=r"line 1 has label '4'.*pass --header"):
    _load(numeric)
  assert _load(numeric, header=True)[2].shape == (10,)


def test_csv_with_one_label_is_refused_before_training(tmp_path):
  rows = _rows()
  for r in rows:
    r[-1] = "1"
  with pytest.raises(folders.CSVDataError,
                     match=r"one.csv: all 10 rows have label 1 \(column 5\); pairs need both"):
    _load(_write_csv(tmp_path / "one.csv", rows))


def test_a_split_without_both_labels_is_refused_before_training(tmp_path):
  x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
  similar = np.r_[0, np.ones(19, np.int32)]  # one 0: some split holds only 1s
  with pytest.raises(ValueError, match=r"only label 1; every split needs both labels"):
    vector_pairs.train_head(x, x, similar, vector_pairs.Config(), "bce", tmp_path / "w",
                            progress=False)
  assert not (tmp_path / "w").exists()  # nothing trained


def _script(monkeypatch, capsys, recipe, argv):
  """Runs a recipe's command line in this process: ``(exit status, stderr lines)``."""
  monkeypatch.setenv("SIAMJAX_NO_XLA_FLAGS", "1")  # JAX is already running here
  monkeypatch.delenv("SIAMJAX_TRACEBACK", raising=False)
  status = cli.main(recipe, argv)
  return status, [line for line in capsys.readouterr().err.splitlines()
                  if line.strip() and " -> " not in line]  # not "recipe (preset) -> workdir"


def test_script_prints_csv_errors_as_one_line(tmp_path, monkeypatch, capsys):
  rows = _rows()
  rows[0][2] = "nan"
  bad = _write_csv(tmp_path / "bad.csv", rows)
  cols = ["--left-columns", "2", "--right-columns", "2"]
  status, lines = _script(monkeypatch, capsys, vector_pairs,
                          ["--csv", str(bad), "--workdir", str(tmp_path / "w1"), *cols])
  assert status == 2 and lines == [f"error: {bad}: line 1, column 3 is not finite: 'nan'"]
  # --header / --no-header come from Config.header (None: detect).
  named = _write_csv(tmp_path / "named.csv", [["a0", "a1", "b0", "b1", "same"]] + _rows())
  status, lines = _script(monkeypatch, capsys, vector_pairs,
                          ["--csv", str(named), "--no-header", "--workdir",
                           str(tmp_path / "w2"), *cols])
  assert status == 2 and lines == [
      f"error: {named}: line 1, column 1 is not a number: 'a0'"]


# ---------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------


def _png(path, value=128, size=(20, 20), mode="L"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, value).save(path)


def test_a_root_of_split_folders_is_refused_naming_the_split(tmp_path):
  for split in ("train", "val"):
    for cls in ("cat", "dog"):
      for j in range(2):
        _png(tmp_path / split / cls / f"{j}.png")
  # Used to train on the two "classes" train and val.
  with pytest.raises(folders.ImageFolderError,
                     match=rf"split folders \(train/, val/\).*--data-dir {tmp_path / 'train'}"):
    folders.load_image_folder(tmp_path)
  x, y, names, _ = folders.load_image_folder(tmp_path / "train", size=(8, 8))
  assert names == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1]


def test_nested_class_folders_are_refused_unless_flattened(tmp_path):
  for cls in ("a", "b"):
    _png(tmp_path / cls / "0.png", 10)
    _png(tmp_path / cls / "sub" / "1.png", 200)  # used to be merged into the class silently
  with pytest.raises(folders.ImageFolderError,
                     match=r"class folder .*a holds subfolders of images \(sub/\).*"
                           r"--flatten-subfolders"):
    folders.load_image_folder(tmp_path)
  x, y, names, paths = folders.load_image_folder(tmp_path, size=(4, 4), grayscale=True,
                                                 flatten_subfolders=True)
  assert names == ["a", "b"] and y.tolist() == [0, 0, 1, 1]
  assert sorted(x[:, 0, 0, 0].tolist()) == [10, 10, 200, 200]


def test_images_outside_class_folders_are_refused(tmp_path):
  for cls in ("a", "b"):
    for j in range(2):
      _png(tmp_path / cls / f"{j}.png")
  _png(tmp_path / "stray.png")
  with pytest.raises(folders.ImageFolderError, match=r"1 image file\(s\) outside any class "
                                                      r"folder \(e.g. stray.png\)"):
    folders.load_image_folder(tmp_path)
  (tmp_path / "stray.png").unlink()
  (tmp_path / "a" / "notes.txt").write_text("not an image")  # other files are skipped
  assert folders.load_image_folder(tmp_path, size=(4, 4))[0].shape == (4, 4, 4, 3)


def _mode_image(mode):
  """``(image, expected grey, expected RGB)`` for one Pillow mode, 6x5 pixels."""
  w, h = 6, 5
  if mode == "1":
    return Image.new("1", (w, h), 1), 255, (255, 255, 255)
  if mode == "L":
    return Image.new("L", (w, h), 77), 77, (77, 77, 77)
  if mode == "I;16":  # 16-bit grey: 32896 / 65535 * 255 = 128 (Pillow alone clips to 255)
    return Image.fromarray(np.full((h, w), 32896, np.uint16)), 128, (128, 128, 128)
  if mode == "I":  # how 16-bit data often arrives: 32-bit ints holding 16-bit values
    return Image.fromarray(np.full((h, w), 13107, np.int32)), 51, (51, 51, 51)
  if mode == "P":
    im = Image.new("P", (w, h), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    return im, round(200 * 0.299 + 100 * 0.587 + 50 * 0.114), (200, 100, 50)
  if mode == "P+transparency":
    im, grey, rgb = _mode_image("P")
    im.info["transparency"] = 0  # Pillow warns unless this goes through RGBA first
    return im, grey, rgb
  if mode == "RGB":
    return Image.new("RGB", (w, h), (10, 200, 30)), round(
        10 * 0.299 + 200 * 0.587 + 30 * 0.114), (10, 200, 30)
  if mode == "RGBA":
    return Image.new("RGBA", (w, h), (10, 200, 30, 90)), round(
        10 * 0.299 + 200 * 0.587 + 30 * 0.114), (10, 200, 30)
  if mode == "LA":
    return Image.new("LA", (w, h), (60, 10)), 60, (60, 60, 60)
  if mode == "CMYK":  # no black, full magenta and yellow: red
    return Image.new("CMYK", (w, h), (0, 255, 255, 0)), 76, (255, 0, 0)
  raise AssertionError(mode)


MODES = ["1", "L", "I;16", "I", "P", "P+transparency", "RGB", "RGBA", "LA", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pillow_mode_becomes_the_right_8_bit_image(tmp_path, mode):
  im, grey, rgb = _mode_image(mode)
  suffix = ".tif" if mode in ("I", "CMYK") else ".png"  # PNG has no 32-bit int or CMYK
  for cls in ("a", "b"):
    for j in range(2):
      (tmp_path / cls).mkdir(exist_ok=True)
      im.save(tmp_path / cls / f"{j}{suffix}", **({"transparency": 0} if "transp" in mode
                                                   else {}))
  with Image.open(tmp_path / "a" / f"0{suffix}") as check:
    assert check.mode == mode.split("+")[0]  # the file really is in that mode
  x, *_ = folders.load_image_folder(tmp_path, size=(5, 6))
  assert x.shape == (4, 5, 6, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x, np.broadcast_to(np.array(rgb, np.uint8), x.shape))
  g, *_ = folders.load_image_folder(tmp_path, size=(5, 6), grayscale=True)
  np.testing.assert_allclose(g.astype(int), grey, atol=1)


def test_images_without_an_8_or_16_bit_range_are_refused(tmp_path):
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / cls / "0.tif")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / cls / "1.tif")
  with pytest.raises(folders.ImageFolderError, match=r"0.tif: mode I image holds values in "
                                                      r"\[70000, 70000\]"):
    folders.load_image_folder(tmp_path)
  for cls in ("a", "b"):
    (tmp_path / cls / "0.tif").unlink()
  with pytest.raises(folders.ImageFolderError, match=r"1.tif: mode F"):
    folders.load_image_folder(tmp_path, min_per_class=1)


def test_image_folder_script_prints_layout_errors_as_one_line(tmp_path, monkeypatch, capsys):
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      _png(tmp_path / "d" / split / cls / "0.png")
  status, lines = _script(monkeypatch, capsys, image_folder,
                          ["--data-dir", str(tmp_path / "d"), "--workdir", str(tmp_path / "w")])
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error: root: ")
  assert f"--data-dir {tmp_path / 'd' / 'train'}" in lines[0]


@pytest.mark.slow
def test_small_cnn_names_the_smallest_image():
  with pytest.raises(ValueError, match=r"SmallCNN needs images of at least 16x16 pixels, "
                                       r"got 15x20"):  # was a ZeroDivisionError
    encoders.SmallCNN().init(jax.random.key(0), jnp.zeros((1, 15, 20, 1)))
  params = encoders.SmallCNN().init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  assert encoders.SmallCNN().apply(params, jnp.zeros((2, 16, 16, 1))).shape == (2, 512)


# ---------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------


def _idx_gz(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not gzip"])
def test_mnist_damaged_gz_names_the_file_and_the_fix(tmp_path, damage):
  folder = tmp_path / "mnist"
  folder.mkdir()
  images = np.random.default_rng(0).integers(0, 256, (50, 28, 28))
  for name, array in zip(mnist.FILES["test"], (images, np.arange(50) % 10)):
    _idx_gz(folder / name, array)
  path = folder / mnist.FILES["test"][0]
  raw = path.read_bytes()
  if damage == "truncated":  # was EOFError
    path.write_bytes(raw[:len(raw) // 2])
  elif damage == "corrupt":  # was zlib.error
    path.write_bytes(raw[:30] + bytes(b ^ 0xFF for b in raw[30:200]) + raw[200:])
  else:  # was gzip.BadGzipFile
    path.write_bytes(b"<html>not found</html>")
  with pytest.raises(ValueError, match=rf"{path.name} is truncated or corrupt .*; delete it "
                                       rf"and download {path.name} again"):
    mnist.load_mnist("test", tmp_path)


def test_mnist_data_dir_that_is_not_a_folder(tmp_path):
  with pytest.raises(ValueError, match=r"data_dir: .*nowhere \(from --data-dir\) is not a "
                                       r"folder"):
    mnist.load_mnist("test", tmp_path / "nowhere")


# ---------------------------------------------------------------------------------
# Omniglot data directory
# ---------------------------------------------------------------------------------


def test_omniglot_missing_data_dir_is_reported_never_created(tmp_path, monkeypatch):
  monkeypatch.setattr(omniglot, "_fetch", lambda url, dest: pytest.fail("downloaded"))
  missing = tmp_path / "typo"
  with pytest.raises(omniglot.OmniglotDataError,
                     match=r"typo \(from --data-dir / data_dir\) is not a folder.*"
                           r"SIAMJAX_DATA_DIR.*never created"):
    omniglot.load_omniglot("background", data_dir=missing, download=True)
  monkeypatch.setenv("SIAMJAX_DATA_DIR", str(missing))
  with pytest.raises(omniglot.OmniglotDataError, match=r"\(from SIAMJAX_DATA_DIR\)"):
    omniglot.load_lake_runs(download=True)
  assert not missing.exists()


def test_omniglot_offline_message_names_the_flag_the_variable_and_the_file(tmp_path,
                                                                          monkeypatch):
  def offline(url, dest):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(omniglot, "_fetch", offline)
  monkeypatch.delenv("SIAMJAX_DATA_DIR", raising=False)
  with pytest.raises(omniglot.OmniglotDataError) as e:
    omniglot.load_omniglot("background", cache_dir=tmp_path / "cache", download=True)
  msg = str(e.value)
  for needle in ("could not download images_background.zip", omniglot.URLS[
      "images_background.zip"], "DIR/omniglot/images_background.zip", "--data-dir DIR",
                 "SIAMJAX_DATA_DIR=DIR", str(tmp_path / "cache" / "downloads")):
    assert needle in msg, (needle, msg)
  with pytest.raises(omniglot.OmniglotDataError) as e:
    omniglot.load_lake_runs(data_dir=tmp_path, download=True)
  assert f"place it at {tmp_path / 'omniglot' / 'all_runs.zip'}" in str(e.value)
  assert "--data-dir / SIAMJAX_DATA_DIR" in str(e.value)


# ---------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------


def _task(t=2, n=5):
  support = jnp.arange(t * n, dtype=jnp.float32).reshape(t, n, 1)
  return support, support + 0.1, jnp.broadcast_to(jnp.arange(n), (t, n))


def _evaluate(support, query, answers, embed=lambda v, x: x):
  return oneshot.evaluate_oneshot(embed, oneshot.neg_squared_euclidean, None, support, query,
                                  answers)


def test_oneshot_empty_tasks():
  s, q, a = _task()
  with pytest.raises(ValueError, match=r"query is empty \(shape \(0, 5, 1\): 0 tasks"):
    _evaluate(s[:0], q[:0], a[:0])  # was a ZeroDivisionError
  with pytest.raises(ValueError, match=r"query is empty .*2 tasks of 0 queries"):
    _evaluate(s, q[:, :0], a[:, :0])


@pytest.mark.parametrize("bad", [7, -1])
def test_oneshot_answers_out_of_range(bad):
  s, q, a = _task()
  with pytest.raises(ValueError, match=rf"answers must be support indices in \[0, 5\) for a "
                                       rf"5-way task; 1 of 10 are not \(e.g. {bad}\)"):
    _evaluate(s, q, a.at[0, 3].set(bad))  # was silently scored


def test_oneshot_nan_embeddings_are_counted_and_refused():
  s, q, a = _task()
  s = s.at[0, 1, 0].set(jnp.nan).at[1, 4, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"2 of 20 embeddings and 10 of 50 scores are NaN"):
    _evaluate(s, q, a)
  # Inside jit nothing is checked and nothing crosses to the host.
  predict = jax.jit(lambda s, q: oneshot.oneshot_predictions(
      lambda v, x: x, oneshot.neg_squared_euclidean, None, s, q))
  s, q = jax.device_put((s, q))
  predict(s, q)
  with jax.transfer_guard("disallow"):
    assert predict(s, q).shape == (2, 5)


def test_sample_oneshot_tasks_refuses_the_query_as_its_own_support():
  images = jnp.arange(6 * 4 * 2 * 2, dtype=jnp.float32).reshape(6, 4, 2, 2)
  alphabets = np.array([0, 0, 0, 1, 1, 1])
  key = jax.random.key(0)
  for drawers in [(0,), (1, 1)]:  # (0,) used to give support == query in every task
    with pytest.raises(ValueError, match=r"drawers must name at least two distinct drawers"):
      sampling.sample_oneshot_tasks(key, images, alphabets, n_way=3, n_tasks=2,
                                    drawers=drawers)
  with pytest.raises(ValueError, match=r"drawers must be in \[0, 4\)"):
    sampling.sample_oneshot_tasks(key, images, alphabets, n_way=3, n_tasks=2, drawers=(0, 4))
  support, query, _ = sampling.sample_oneshot_tasks(key, images, alphabets, n_way=3,
                                                    n_tasks=8, drawers=(0, 1))
  assert not np.any(np.all(np.asarray(support == query), axis=(-2, -1)))


def test_sample_oneshot_tasks_n_way_larger_than_the_classes():
  images = jnp.zeros((6, 4, 2, 2))
  alphabets = np.array([0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match=r"n_way=7 is larger than the 6 characters"):
    sampling.sample_oneshot_tasks(jax.random.key(0), images, alphabets, n_way=7, n_tasks=2,
                                  within_alphabet=False)  # was a broadcasting error
  with pytest.raises(ValueError, match=r"n_way=4: alphabet 0 has only 3 characters"):
    sampling.sample_oneshot_tasks(jax.random.key(0), images, alphabets, n_way=4, n_tasks=2)
  with pytest.raises(ValueError, match=r"n_tasks must be >= 1"):
    sampling.sample_oneshot_tasks(jax.random.key(0), images, alphabets, n_way=2, n_tasks=0)


def test_empty_roc_arrays():
  with pytest.raises(ValueError, match=r"far must be a \[T\] ROC array with T >= 2 points"):
    verification.auc([], [])  # was 0.0
  with pytest.raises(ValueError, match=r"far must be a \[T\] ROC array"):
    verification.equal_error_rate([], [], [])  # was numpy's argmax error
  with pytest.raises(ValueError, match=r"far and tar must have the same shape"):
    verification.auc([0.0, 1.0], [0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match=r"far must be non-decreasing"):
    verification.auc([1.0, 0.0], [0.0, 1.0])
  with pytest.raises(ValueError, match=r"scores must be a non-empty"):
    verification.roc_curve([], [])
  with pytest.raises(ValueError, match=r"scores must be finite: 1 of 3 are NaN or inf"):
    verification.roc_curve([0.1, np.nan, 0.3], [0, 1, 1])


@pytest.mark.parametrize("correct,trials,name", [(5, 3, "correct"), (-1, 3, "correct"),
                                                 (1.5, 3, "correct"), (0, 0, "trials")])
def test_accuracy_interval_arguments(correct, trials, name):
  with pytest.raises(ValueError, match=rf"^{name} must be a whole number"):
    oneshot.accuracy_interval(correct, trials)  # (5, 3) was "math domain error"
