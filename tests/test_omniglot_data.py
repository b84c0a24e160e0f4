"""Omniglot loader on small generated zips (real data only when SIAMJAX_DATA_DIR is set)."""

import io
import os
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from siamjax.data import omniglot


def _png(ink: np.ndarray) -> bytes:
  """A 1-bit PNG like Omniglot's: True = background."""
  buf = io.BytesIO()
  Image.fromarray(~ink).convert("1").save(buf, format="PNG")
  return buf.getvalue()


def _ink(seed: int) -> np.ndarray:
  ink = np.zeros((105, 105), bool)
  r = np.random.default_rng(seed)
  y, x = r.integers(0, 95, 2)
  ink[y:y + 10, x:x + 3] = True
  return ink


def _make_split_zip(path, alphabets=("Beta", "Alpha"), chars=2, skip=None):
  truth = {}
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("images_background/", "")
    cid = 1
    for a in alphabets:
      for c in range(chars):
        for d in range(1, 21):
          if skip == (a, c, d):
            continue
          ink = _ink(cid * 100 + d)
          truth[(a, c, d)] = ink
          zf.writestr(f"images_background/{a}/character{c + 1:02d}/{cid:04d}_{d:02d}.png",
                      _png(ink))
        cid += 1
  return truth


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  (tmp_path / "omniglot").mkdir()
  monkeypatch.setitem(omniglot._COUNTS, "background", (2, 4))
  monkeypatch.setenv("SIAMJAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path


def test_loads_generated_zip_with_ink_255_and_cache(data_dir, monkeypatch):
  truth = _make_split_zip(data_dir / "omniglot" / "images_background.zip")
  split = omniglot.load_omniglot("background", data_dir=data_dir)
  assert split.images.shape == (4, 20, 105, 105) and split.images.dtype == np.uint8
  assert split.alphabets == ("Alpha", "Beta")  # sorted
  np.testing.assert_array_equal(split.alphabet_ids, [0, 0, 1, 1])
  assert set(np.unique(split.images).tolist()) == {0, 255}
  # Alpha/character02 drawer 07 (Alpha was written second: character ids 3 and 4).
  np.testing.assert_array_equal(split.images[1, 6] == 255, truth[("Alpha", 1, 7)])
  assert len(list((data_dir / "cache").glob("*.npz"))) == 1
  # The second load reads the cache, not the zip.
  monkeypatch.setattr(omniglot, "_decode_split", lambda *a: pytest.fail("decoded twice"))
  again = omniglot.load_omniglot("background", data_dir=data_dir)
  np.testing.assert_array_equal(again.images, split.images)
  assert again.alphabets == split.alphabets and again.characters == split.characters


def test_env_var_data_dir(data_dir, monkeypatch):
  _make_split_zip(data_dir / "omniglot" / "images_background.zip")
  monkeypatch.setenv("SIAMJAX_DATA_DIR", str(data_dir))
  assert omniglot.load_omniglot("background").images.shape[0] == 4


def test_missing_file_names_it(tmp_path, monkeypatch):
  monkeypatch.delenv("SIAMJAX_DATA_DIR", raising=False)
  with pytest.raises(omniglot.OmniglotDataError, match="images_evaluation.zip"):
    omniglot.load_omniglot("evaluation", data_dir=tmp_path)
  with pytest.raises(omniglot.OmniglotDataError, match="SIAMJAX_DATA_DIR"):
    omniglot.load_omniglot("evaluation")


def test_corrupt_zip_and_member(data_dir):
  path = data_dir / "omniglot" / "images_background.zip"
  path.write_bytes(b"not a zip at all")
  with pytest.raises(omniglot.OmniglotDataError, match="not a readable zip"):
    omniglot.load_omniglot("background", data_dir=data_dir)
  path.unlink()
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("images_background/A/character01/0001_01.png", b"garbage")
  with pytest.raises(omniglot.OmniglotDataError, match="found 1 alphabets"):
    omniglot.load_omniglot("background", data_dir=data_dir)


def test_missing_drawer_and_corrupt_png(data_dir, monkeypatch):
  _make_split_zip(data_dir / "omniglot" / "images_background.zip", skip=("Alpha", 0, 5))
  with pytest.raises(omniglot.OmniglotDataError, match="drawers"):
    omniglot.load_omniglot("background", data_dir=data_dir)
  monkeypatch.setitem(omniglot._COUNTS, "evaluation", (1, 1))
  with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip", "w") as zf:
    for d in range(1, 21):
      zf.writestr(f"e/A/character01/0001_{d:02d}.png", b"\x89PNG broken")
  with pytest.raises(omniglot.OmniglotDataError, match="corrupt"):
    omniglot.load_omniglot("evaluation", data_dir=data_dir)


def test_lake_runs_from_generated_zip(data_dir):
  answers = np.random.default_rng(0).permutation(20)
  with zipfile.ZipFile(data_dir / "omniglot" / "all_runs.zip", "w") as zf:
    for r in range(1, 21):
      lines = []
      for c in range(20):
        zf.writestr(f"run{r:02d}/training/class{c + 1:02d}.png", _png(_ink(r * 50 + c)))
        zf.writestr(f"run{r:02d}/test/item{c + 1:02d}.png", _png(_ink(r * 50 + answers[c])))
        lines.append(f"run{r:02d}/test/item{c + 1:02d}.png "
                     f"run{r:02d}/training/class{answers[c] + 1:02d}.png")
      zf.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")
  runs = omniglot.load_lake_runs(data_dir=data_dir)
  assert runs.support.shape == runs.query.shape == (20, 20, 105, 105)
  np.testing.assert_array_equal(runs.answers[3], answers)
  r = np.arange(20)[:, None]
  np.testing.assert_array_equal(runs.query, runs.support[r, runs.answers])


def test_download_verifies_checksum(tmp_path, monkeypatch):
  payload = b"zip bytes"
  monkeypatch.setattr(omniglot, "_fetch", lambda url, dest: dest.write_bytes(payload))
  import hashlib
  monkeypatch.setitem(omniglot.SHA256, "all_runs.zip", hashlib.sha256(payload).hexdigest())
  path = omniglot._locate("all_runs.zip", tmp_path, True, None)
  assert path.read_bytes() == payload and path.parent == tmp_path / "omniglot"
  monkeypatch.setitem(omniglot.SHA256, "images_evaluation.zip", "0" * 64)
  with pytest.raises(omniglot.OmniglotDataError, match="SHA-256"):
    omniglot._locate("images_evaluation.zip", tmp_path, True, None)
  assert not (tmp_path / "omniglot" / "images_evaluation.zip").exists()
  assert not list((tmp_path / "omniglot").glob("*.part"))

  def offline(url, dest):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(omniglot, "_fetch", offline)
  with pytest.raises(omniglot.OmniglotDataError, match="could not download"):
    omniglot._locate("images_background.zip", tmp_path, True, None)


def test_tfds_source_matches_zip(data_dir, monkeypatch):
  truth = _make_split_zip(data_dir / "omniglot" / "images_background.zip")
  zipped = omniglot.load_omniglot("background", data_dir=data_dir)
  examples = []
  for label, key in enumerate(sorted({(a, c) for a, c, _ in truth},
                                     key=lambda k: (k[0], k[1]))):
    for d in range(20, 0, -1):  # any order: tfds records no drawer
      gray = np.where(truth[key + (d,)], 0, 255).astype(np.uint8)  # TF decodes to {0, 255}
      examples.append({"image": np.repeat(gray[..., None], 3, -1), "label": label,
                       "alphabet": 0 if key[0] == "Alpha" else 1})
  monkeypatch.setattr(omniglot, "_tfds_examples", lambda split: examples)
  tf = omniglot.load_omniglot("background", source="tfds")
  np.testing.assert_array_equal(tf.alphabet_ids, zipped.alphabet_ids)
  for i in range(4):  # same images per character, drawer order aside
    key = lambda a: a.tobytes()
    assert sorted(map(key, tf.images[i])) == sorted(map(key, zipped.images[i]))


@pytest.mark.skipif(not os.environ.get("SIAMJAX_DATA_DIR"), reason="SIAMJAX_DATA_DIR unset")
def test_real_data_counts():
  ev = omniglot.load_omniglot("evaluation")
  assert ev.images.shape == (659, 20, 105, 105) and len(ev.alphabets) == 20
  runs = omniglot.load_lake_runs()
  assert runs.answers.shape == (20, 20)
  assert (np.sort(runs.answers, axis=1) == np.arange(20)).all()
