"""Every recipe's smoke work directory (``conftest.smoke_run``) loads in a fresh process and
embeds its inputs as the recipe's own evaluation does: ``embed(preprocess(raw files or
texts))`` equals the evaluation's embeddings of the same items, computed here with the
recipe's own code."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from siamjax import train
from siamjax.recipes import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DATA = bool(os.environ.get("SIAMJAX_DATA_DIR"))
pytestmark = pytest.mark.slow

_LOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from siamjax import inference
    workdir, raw, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = inference.load(workdir)
    if raw["kind"] == "pairs_csv":
      x = model.read_pairs(raw["path"])[0][:raw["rows"]]
    else:
      x = model.preprocess(raw["items"])
    np.save(out, np.asarray(model.embed(x)))
    print(json.dumps({"variant": model.variant, "checkpoint": model.checkpoint}))
""")


def _loaded(workdir, raw: dict, tmp_path) -> tuple[np.ndarray, dict]:
  """Embeddings from a fresh process that knows only the work directory."""
  out = tmp_path / "loaded.npy"
  r = subprocess.run([sys.executable, "-c", _LOAD, str(workdir), json.dumps(raw), str(out)],
                     capture_output=True, text=True, timeout=600, cwd=tmp_path,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode == 0, r.stderr[-3000:]
  return np.load(out), json.loads(r.stdout.strip().splitlines()[-1])


def _config(workdir):
  return json.loads((workdir / "config.json").read_text())["config"]


def _close(got, want):
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_DATA, reason="needs SIAMJAX_DATA_DIR (Omniglot zips)")
def test_omniglot(smoke_run, tmp_path):
  from siamjax.data import omniglot
  from siamjax.recipes import omniglot_koch as ok
  w = smoke_run("omniglot_koch.py")
  zpath = omniglot._locate("images_evaluation.zip", None, False, None)
  with zipfile.ZipFile(zpath) as zf:
    members = [m for m in zf.namelist() if m.endswith(".png")][::2000][:7]
    files = []
    for i, m in enumerate(members):
      files.append(tmp_path / f"drawing{i}.png")
      files[-1].write_bytes(zf.read(m))
    images = np.stack([omniglot._decode_png(zf, m, zpath) for m in members]).astype(
        np.uint8) * np.uint8(255)  # the dataset's own decoding
  cfg = cli.config_from_dict(ok.Config, _config(w))
  model = ok.Model(cfg)
  like = ok.init_state(model, cfg)
  state = train.restore_best(w, like) or train.restore(w, like)[0]
  want = model.embed({"params": state["params"], **state["model_state"]}, images)
  got, info = _loaded(w, {"kind": "files", "items": list(map(str, files))}, tmp_path)
  _close(got, want)
  assert info["checkpoint"] == ("best" if (w / "checkpoints_best").is_dir() else "latest")


@pytest.mark.skipif(not HAS_DATA, reason="needs SIAMJAX_DATA_DIR (MNIST)")
@pytest.mark.parametrize("script", ["mnist_contrastive.py", "mnist_triplet.py"])
def test_mnist(smoke_run, tmp_path, script):
  from PIL import Image
  from siamjax.data import mnist as mnist_data
  from siamjax.recipes import mnist
  w = smoke_run(script)
  x = mnist_data.load_mnist("test")[0][:9]
  files = []
  for i, img in enumerate(x):
    files.append(tmp_path / f"digit{i}.png")
    Image.fromarray(img, mode="L").save(files[-1])
  triplet = script == "mnist_triplet.py"
  folder, normalize = w, False
  if triplet:
    rule = json.loads((w / "results.json").read_text())["best_mining"]
    folder, normalize = w / rule, mnist.MINING_PRESETS[rule][1]
  cfg = _config(w)
  params = train.restore(folder, mnist.init_state(cfg["seed"], cfg["learning_rate"]))[0][
      "params"]  # the recipes score their final parameters
  want = mnist.embed(params, x, normalize=normalize)
  got, info = _loaded(w, {"kind": "files", "items": list(map(str, files))}, tmp_path)
  _close(got, want)
  assert info["variant"] == (rule if triplet else None)


def test_vector_pairs(smoke_run, tmp_path):
  import jax
  from siamjax import encoders, models
  from siamjax.data import folders, splits
  from siamjax.recipes import vector_pairs as vp
  w = smoke_run("vector_pairs.py")
  cfg = cli.config_from_dict(vp.Config, _config(w))
  left, right, _ = folders.load_vector_pairs_csv(w / "pairs.csv", left_columns=cfg.left_columns,
                                                 right_columns=cfg.right_columns or None)
  tr = splits.split_indices(left.shape[0], tuple(cfg.fractions), cfg.seed)[0]
  both = np.concatenate([left[tr], right[tr]])  # the recipe's standardisation, recomputed
  z = (left[:20] - both.mean(0)) / (both.std(0) + 1e-6)
  heads = json.loads((w / "results.json").read_text())["heads"]
  head = max(heads, key=lambda h: heads[h]["val_best_accuracy"])
  state = train.restore_variables(w / head)[0]
  mlp = encoders.MLP(features=tuple(cfg.hidden), dropout_rate=cfg.dropout_rate)
  net = models.SiameseNet(encoder=mlp) if head == "bce" else mlp
  want = (net.apply({"params": state}, z, method=net.embed) if head == "bce"
          else net.apply({"params": state}, z))
  got, info = _loaded(w, {"kind": "pairs_csv", "path": str(w / "pairs.csv"), "rows": 20},
                      tmp_path)
  _close(got, jax.device_get(want))
  assert info["variant"] == head


def test_image_folder(smoke_run, tmp_path):
  from siamjax import encoders, models
  from siamjax.data import folders
  from siamjax.recipes import image_folder as imf
  w = smoke_run("image_folder.py")
  cfg = cli.config_from_dict(imf.Config, _config(w))
  images, _, _, paths = folders.load_image_folder(w / "synthetic_folder",
                                                  size=(cfg.size, cfg.size),
                                                  grayscale=cfg.grayscale)
  params = train.restore_variables(w)[0]
  net = models.SiameseNet(encoder=encoders.SmallCNN())
  want = net.apply({"params": params}, images[:10].astype(np.float32) / 255.0, method=net.embed)
  got, _ = _loaded(w, {"kind": "files", "items": paths[:10]}, tmp_path)
  _close(got, want)


def test_thucnews(smoke_run, tmp_path):
  from siamjax import bag
  from siamjax.data import thucnews
  from siamjax.recipes import thucnews as tn
  w = smoke_run("thucnews_fewshot.py")
  cfg = cli.config_from_dict(tn.Config, _config(w))
  titles, labels = thucnews.synthetic_titles(per_class=cfg.synthetic_per_class)
  split = thucnews.draw_split(labels, cfg.seed, shots=cfg.shots, max_test=cfg.max_test,
                              val_per_class=cfg.val_per_class)
  nontest = np.concatenate([split.train, split.val, split.unlabelled])
  vocab = thucnews.build_vocab([titles[i] for i in nontest], min_count=cfg.min_count)
  test_titles = [titles[i] for i in split.test[:12]]
  params = train.restore_variables(w / f"seed{cfg.seed}" / "splitview_finetune")[0]
  want = bag.embed_all(bag.bag_embed, params,
                           thucnews.encode(test_titles, vocab, max_len=cfg.max_len))
  got, info = _loaded(w, {"kind": "texts", "items": test_titles}, tmp_path)
  _close(got, want)
  assert info["variant"] == f"seed{cfg.seed}/splitview_finetune"
