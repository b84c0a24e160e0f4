"""``python -m siamjax``: enrol, calibrate, identify, verify and export on a trained smoke
run; every bad input is one line and exit status 2, and leaves saved files as they were;
the exported model runs in a process where siamjax and flax cannot be imported."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from siamjax import inference
from siamjax.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DATA = bool(os.environ.get("SIAMJAX_DATA_DIR"))
pytestmark = pytest.mark.slow


def _train(workdir: pathlib.Path, script="image_folder.py", *extra) -> pathlib.Path:
  subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", "--workdir",
                  str(workdir), "--no-progress", *extra], check=True, capture_output=True,
                 timeout=900, cwd=ROOT)
  return workdir


@pytest.fixture(scope="module")
def trained(smoke_run, tmp_path_factory):
  """Two image-folder smoke runs, seeds 0 (``conftest.smoke_run``'s, read only) and 1: two
  models of one architecture."""
  seed1 = tmp_path_factory.mktemp("runs") / "seed1"
  return smoke_run("image_folder.py"), _train(seed1, "image_folder.py", "--seed", "1")


@pytest.fixture
def run(trained, tmp_path):
  """A fresh copy of the seed-0 run (calibration files of other tests do not leak)."""
  return pathlib.Path(shutil.copytree(trained[0], tmp_path / "run"))


def _cli(capsys, *argv):
  code = main([str(a) for a in argv] + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, [json.loads(line) for line in out.splitlines()], err


def _error(capsys, *argv, match):
  code, out, err = _cli(capsys, *argv)
  assert code == 2 and out == [], (code, out, err)
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert match in err, err
  return err


def test_enroll_calibrate_identify_verify_export(run, tmp_path, capsys):
  gallery = run / "synthetic_folder"
  code, out, _ = _cli(capsys, "enroll", "--workdir", run, "--gallery", gallery, "--index",
                      tmp_path / "idx")
  assert code == 0 and out[0]["items"] == 32 and out[0]["classes"] == 4
  code, out, _ = _cli(capsys, "calibrate", "--workdir", run, "--data", gallery, "--target",
                      "eer", "--target", "far=0.2")
  assert code == 0 and [r["name"] for r in out] == ["eer", "far=0.2"]
  assert out[1]["far"] <= 0.2 and out[0]["protocol"] == "pairs"
  saved = json.loads((run / inference.CALIBRATION_FILE).read_text())
  assert set(saved[""]["thresholds"]) == {"eer", "far=0.2"}
  probes = sorted(gallery.glob("*/img_00[01].png"))
  code, out, _ = _cli(capsys, "identify", "--index", tmp_path / "idx", "--threshold", "eer",
                      *probes)
  assert code == 0 and len(out) == len(probes)
  model = inference.load(run)
  for rec, probe in zip(out, probes):
    assert rec["input"] == str(probe) and rec["threshold"] == "eer"
    assert rec["label"] == (rec["nearest"] if rec["accepted"] else "unknown")
    assert rec["accepted"] == (rec["probability"] >= model.threshold("eer")["threshold"] - 1e-6)
  code, out, _ = _cli(capsys, "verify", "--workdir", run, *probes[:4])
  assert code == 0 and [(r["a"], r["b"]) for r in out] == [(str(probes[0]), str(probes[1])),
                                                          (str(probes[2]), str(probes[3]))]
  x = model.preprocess(probes[:4])
  np.testing.assert_allclose([r["probability"] for r in out], model.score(x[0::2], x[1::2]),
                             rtol=1e-5)
  assert [r["threshold"] for r in out] == ["far=0.2"] * 2  # the last calibrated
  # Open-set calibration against the index: classes not enrolled are strangers.
  code, out, _ = _cli(capsys, "enroll", "--workdir", run, "--gallery", gallery, "--index",
                      tmp_path / "idx2")
  partial = tmp_path / "partial"
  for c in ("class_00", "class_01"):
    shutil.copytree(gallery / c, partial / c)
  shutil.rmtree(tmp_path / "idx2")
  code, out, _ = _cli(capsys, "enroll", "--workdir", run, "--gallery", partial, "--index",
                      tmp_path / "idx2", "--per-class", 1)
  assert out[0]["items"] == 2  # one file of each of the two classes
  code, out, _ = _cli(capsys, "calibrate", "--workdir", run, "--data", gallery, "--index",
                      tmp_path / "idx2", "--target", "far=0.5")
  assert code == 0 and out[0]["protocol"] == "open_set" and out[0]["strangers"] == 16
  # Export, then run it where siamjax and flax cannot be imported.
  code, out, _ = _cli(capsys, "export", "--workdir", run, "--out", tmp_path / "exported")
  assert code == 0 and out[0]["files"] == ["embed.jax", "model.json", "score.jax"]
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent("""
      import importlib.abc, json, sys
      class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in ("siamjax", "flax"):
            raise ImportError(f"{name} is not importable here")
      sys.meta_path.insert(0, Refuse())
      import jax, numpy as np
      folder = sys.argv[1]
      meta = json.load(open(f"{folder}/model.json"))
      embed = jax.export.deserialize(open(f"{folder}/embed.jax", "rb").read())
      score = jax.export.deserialize(open(f"{folder}/score.jax", "rb").read())
      x = np.load(sys.argv[2]).astype(meta["inputs"]["dtype"])
      h = np.asarray(embed.call(x))
      s = np.asarray(score.call(h[0::2], h[1::2]))
      np.save(sys.argv[3], h); np.save(sys.argv[4], s)
      for name in ("siamjax", "flax"):
        try:
          __import__(name)
          raise SystemExit(f"{name} was importable")
        except ImportError:
          pass
  """)
  subprocess.run([sys.executable, "-c", script, tmp_path / "exported", tmp_path / "x.npy",
                  tmp_path / "h.npy", tmp_path / "s.npy"], check=True, cwd=tmp_path,
                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
  np.testing.assert_allclose(np.load(tmp_path / "h.npy"), model.embed(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.load(tmp_path / "s.npy"), model.score(x[0::2], x[1::2]),
                             rtol=1e-5)
  meta = json.loads((tmp_path / "exported" / "model.json").read_text())
  assert meta["comparison"]["same_when"] == "higher" and "far=0.5" in meta["thresholds"]


def test_a_missing_workdir_or_one_without_a_checkpoint(trained, tmp_path, capsys):
  _error(capsys, "verify", "--workdir", tmp_path / "nowhere", "a", "b", match="does not exist")
  empty = tmp_path / "untrained"
  empty.mkdir()
  shutil.copy(trained[0] / "config.json", empty / "config.json")
  _error(capsys, "export", "--workdir", empty, "--out", tmp_path / "o",
         match="holds no checkpoint")
  _error(capsys, "export", "--workdir", tmp_path, "--out", tmp_path / "o",
         match="has no config.json")
  assert not (tmp_path / "o").exists()


def test_files_that_do_not_decode_and_bad_galleries(run, tmp_path, capsys):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not a png at all")
  good = next((run / "synthetic_folder").glob("*/*.png"))
  _error(capsys, "verify", "--workdir", run, good, bad, match=f"cannot read image {bad}")
  empty = tmp_path / "empty_gallery"
  empty.mkdir()
  _error(capsys, "enroll", "--workdir", run, "--gallery", empty, "--index", tmp_path / "i",
         match="holds no class folders")
  (empty / "alice").mkdir()
  (empty / "bob").mkdir()
  shutil.copy(good, empty / "alice" / "a.png")
  _error(capsys, "enroll", "--workdir", run, "--gallery", empty, "--index", tmp_path / "i",
         match=f"class folder {empty / 'bob'} holds no files")
  assert not (tmp_path / "i").exists()


def test_an_existing_index_is_kept_and_another_models_index_is_refused(trained, run, tmp_path,
                                                                      capsys):
  gallery = run / "synthetic_folder"
  assert _cli(capsys, "enroll", "--workdir", run, "--gallery", gallery, "--index",
              tmp_path / "idx")[0] == 0
  before = {p: p.read_bytes() for p in (tmp_path / "idx").rglob("*") if p.is_file()}
  _error(capsys, "enroll", "--workdir", run, "--gallery", gallery, "--index", tmp_path / "idx",
         match="exists; pass --add")
  assert {p: p.read_bytes() for p in (tmp_path / "idx").rglob("*") if p.is_file()} == before
  probe = next(gallery.glob("*/*.png"))
  _error(capsys, "identify", "--index", tmp_path / "idx", "--workdir", trained[1],
         "--threshold", "0.5", probe, match="built by another model")
  _error(capsys, "calibrate", "--workdir", trained[1], "--data", gallery, "--index",
         tmp_path / "idx", "--target", "eer", match="built by another model")


def test_a_threshold_asked_for_before_calibration(run, tmp_path, capsys):
  gallery = run / "synthetic_folder"
  _cli(capsys, "enroll", "--workdir", run, "--gallery", gallery, "--index", tmp_path / "idx")
  probe = next(gallery.glob("*/*.png"))
  _error(capsys, "identify", "--index", tmp_path / "idx", probe,
         match="has not been calibrated yet")
  _error(capsys, "verify", "--workdir", run, probe, probe, match="has not been calibrated yet")
  _error(capsys, "identify", "--index", tmp_path / "idx", "--threshold", "far=0.01", probe,
         match="has not been calibrated yet")
  _error(capsys, "calibrate", "--workdir", run, "--data", gallery, "--target", "far=2",
         match="target")
  assert not (run / inference.CALIBRATION_FILE).exists()


@pytest.mark.skipif(not HAS_DATA, reason="needs SIAMJAX_DATA_DIR (MNIST)")
def test_an_image_of_another_mode_or_size(smoke_run, tmp_path, capsys):
  from PIL import Image
  w = smoke_run("mnist_contrastive.py")  # verify only reads the work directory
  Image.new("RGB", (28, 28)).save(tmp_path / "colour.png")
  Image.new("L", (32, 32)).save(tmp_path / "big.png")
  Image.new("L", (28, 28)).save(tmp_path / "ok.png")
  _error(capsys, "verify", "--workdir", w, tmp_path / "ok.png", tmp_path / "colour.png",
         match="colour.png: a mode RGB image; the model reads greyscale digits")
  _error(capsys, "verify", "--workdir", w, tmp_path / "ok.png", tmp_path / "big.png",
         match="big.png: 32x32 pixels; the model reads 28x28 digits")
