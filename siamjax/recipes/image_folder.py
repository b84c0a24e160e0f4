"""A Siamese SmallCNN on any folder of class-named image folders, split by image.

:func:`train_and_evaluate` loads ``data_dir/<class>/<image>`` resized to ``size x size``
(:func:`load_images`; ``synthetic``: a folder written first), and :func:`fit_and_evaluate`:

1. holds out about ``val_fraction`` of each class's images (by ``seed``) as a TEST set:
   nothing (no epoch, no threshold) is chosen on them;
2. trains :class:`siamjax.encoders.SmallCNN` towers sharing weights, the weighted-L1 logit
   head of :class:`siamjax.models.SiameseNet`, pair BCE and Adam through
   :func:`siamjax.train.run`, each step on ``batch_pairs`` balanced training pairs drawn
   on the device (:func:`siamjax.sampling.sample_pairs`); a checkpoint every epoch;
3. evaluates the final parameters, every image encoded once: pair accuracy at logit 0 and
   ROC-AUC/EER of ``eval_pairs`` (held-out probe, training image) pairs, half same-class;
   ``n_way``-way one-shot accuracy of every held-out image against training images
   (:func:`siamjax.sampling.sample_oneshot_trials`), with a 95% interval; ``roc.png``, and
   ``mistakes.png`` of the hardest wrongly judged pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import encoders, inference, losses, models, parallel, plotting, sampling, train
from siamjax.data import folders, splits
from siamjax.evaluation import oneshot, verification
from siamjax.recipes import cli

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "load_images", "fit_and_evaluate",
           "train_and_evaluate", "summary", "load_model"]

NAME = "image_folder"
# A convolutional network: its script sets siamjax.xla.FAST_CPU_FLAGS on a CPU-only install
# (recipes/cli.py), measured faster for it (benchmarks/results/xla-flags-*.json).
FAST_CPU = True
RESUMABLE = frozenset({"epochs"})  # how long it trains, not what it computes up to a step


@dataclasses.dataclass
class Config:
  """Every knob of the recipe."""

  seed: int = 0  # the split, the initialisation, the pairs, the dropout, the evaluation
  devices: int = 1  # data-parallel devices (batch_pairs must divide evenly)
  data_dir: str | None = None  # the image folder: data_dir/<class name>/<image files>
  flatten_subfolders: bool = False  # read data_dir/<class>/<sub>/.../<image> as <class>
  synthetic: bool = False  # write a 4-class synthetic folder into the workdir and use it
  size: int = 48  # images are resized to size x size
  grayscale: bool = False
  val_fraction: float = 0.3  # of each class's images held out (the test set)
  epochs: int = 10
  steps_per_epoch: int = 100
  steps_per_call: int = 5  # updates per jitted call (unrolled on the CPU: compile time)
  batch_pairs: int = 32
  learning_rate: float = 1e-3
  n_way: int = 5  # classes per one-shot trial (capped at the number of classes)
  eval_pairs: int = 2000


PRESETS = {
    "default": Config,
    # A synthetic folder in the workdir; 2 epochs of 10 steps, a checkpoint after each.
    "smoke": lambda: Config(synthetic=True, size=24, epochs=2, steps_per_epoch=10),
}


def load_images(cfg: Config, workdir) -> tuple[np.ndarray, np.ndarray, list[str], Path]:
  """``(images [N, S, S, C] uint8, labels [N], class names, folder)`` of ``cfg``.

  Raises:
    ValueError: no ``data_dir`` (and not ``synthetic``), or a bad folder
      (:func:`siamjax.data.folders.load_image_folder` names it and what to pass).
  """
  if not (cfg.synthetic or cfg.data_dir):
    raise ValueError("data_dir: pass --data-dir DIR (class-named image folders) or --smoke")
  root = Path(workdir) / "synthetic_folder" if cfg.synthetic else Path(cfg.data_dir)
  if cfg.synthetic:
    folders.write_synthetic_image_folder(root, classes=4, per_class=8, seed=cfg.seed)
  return (*folders.load_image_folder(root, size=(cfg.size, cfg.size),
                                     grayscale=cfg.grayscale,
                                     flatten_subfolders=cfg.flatten_subfolders)[:3], root)


def _table(labels_N, rows, num_classes: int) -> sampling.IndexTable:
  """The :class:`IndexTable` of the images at ``rows``, holding their global positions."""
  t = sampling.index_table(labels_N[rows], num_classes)
  return sampling.IndexTable(rows[t.table].astype(np.int32), t.counts)


def fit_and_evaluate(images, labels, cfg: Config, workdir, *, class_names=None,
                     progress: bool = True, hooks=(), eval_only: bool = False) -> dict:
  """Trains (or, with ``eval_only``, restores) in ``workdir`` and evaluates on held-out images.

  Args:
    images: ``[N, H, W, C]`` uint8 images (scaled to [0, 1] on the device).
    labels: ``[N]`` integer classes ``0 .. C-1``, each with at least two images.
    cfg: the :class:`Config` (its data fields are ignored).
    workdir: the run folder (checkpoints, ``metrics.jsonl``, ``roc.png``, ``mistakes.png``).
    class_names: ``[C]`` names for the contact sheet's captions.
    progress, hooks: passed to :func:`siamjax.train.fit`.
    eval_only: evaluate the checkpoint already in ``workdir``.

  Returns:
    ``test_pair_accuracy``, ``test_one_shot_accuracy`` (``_ci95``, ``_trials``), ``n_way``,
    ``test_verification``, ``mistakes_shown``, split sizes, ``history`` (per epoch), timings.
  """
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if images.ndim != 4 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"images must be [N, H, W, C], labels [N]; got {images.shape}, {labels.shape}")
  if cfg.steps_per_call < 1 or cfg.steps_per_epoch < 1:  # before the init
    raise ValueError(f"steps_per_call={cfg.steps_per_call} and steps_per_epoch="
                     f"{cfg.steps_per_epoch} must be >= 1")
  # Updates per call: the largest divisor of an epoch's steps up to cfg.steps_per_call, so
  # any --steps-per-epoch works (the checkpoints fall on epoch ends).
  steps_per_call = max(d for d in range(1, cfg.steps_per_call + 1) if cfg.steps_per_epoch % d == 0)
  if cfg.batch_pairs < 2 or cfg.batch_pairs % 2 or cfg.batch_pairs % cfg.devices:
    raise ValueError(f"batch_pairs={cfg.batch_pairs} must be even and divisible by devices")
  if cfg.eval_pairs < 2 or cfg.eval_pairs % 2 or cfg.n_way < 2:  # else: known after training
    raise ValueError(f"eval_pairs={cfg.eval_pairs} must be even and >= 2, n_way={cfg.n_way} >= 2")
  workdir = Path(workdir)
  tr, te = splits.split_per_class(labels, cfg.val_fraction, cfg.seed)
  c = int(labels.max()) + 1
  n_way = min(cfg.n_way, c)
  train_table, test_table = _table(labels, tr, c), _table(labels, te, c)
  if (small := np.flatnonzero(train_table.counts < 2)).size:  # positive pairs need two
    raise ValueError(f"val_fraction: class {int(small[0])} keeps 1 training image; hold out fewer")
  net = models.SiameseNet(encoder=encoders.SmallCNN())

  def scale(u8):
    return u8.astype(jnp.float32) / 255.0

  def loss_fn(params, model_state, data, key):
    k_pairs, k_drop = jax.random.split(key)
    pairs_Px2, similar_P = parallel.shard_batch(
        sampling.sample_pairs(k_pairs, data["classes"], cfg.batch_pairs))
    x = scale(data["images"][pairs_Px2])
    logits_P = net.apply({"params": params}, x[:, 0], x[:, 1], train=True, rngs={"dropout": k_drop})
    acc = jnp.mean(((logits_P >= 0) == (similar_P > 0)).astype(jnp.float32))
    return jnp.mean(losses.pair_bce_loss(logits_P, similar_P)), (model_state,
                                                                 {"pair_accuracy": acc})

  k_init, k_run, k_pairs, k_shot = jax.random.split(jax.random.key(cfg.seed), 4)
  optimizer = optax.adam(cfg.learning_rate)
  params = jax.jit(net.init)(k_init, *[scale(jnp.asarray(images[:1]))] * 2)["params"]
  t0 = time.perf_counter()
  state, fit = train.run(
      loss_fn, optimizer, train.init_state(params, optimizer, key=k_run),
      {"images": images, "classes": train_table}, num_steps=cfg.epochs * cfg.steps_per_epoch,
      steps_per_call=steps_per_call, devices=cfg.devices,
      checkpoint_every=cfg.steps_per_epoch, workdir=workdir, examples_per_step=cfg.batch_pairs,
      progress=progress, hooks=hooks, unit="pairs", restore_only=eval_only)
  session_time = time.perf_counter() - t0

  @jax.jit
  def evaluate(params, images):
    n, chunk = images.shape[0], min(256, images.shape[0])  # each image encoded once
    padded = jnp.concatenate([images, jnp.zeros((-n % chunk, *images.shape[1:]), images.dtype)])
    emb = jax.lax.map(lambda x: net.apply({"params": params}, scale(x), method=net.embed),
                      padded.reshape((-1, chunk) + images.shape[1:]))
    emb_NxD = emb.reshape(-1, emb.shape[-1])[:n]
    pairs_Px2, similar_P = sampling.sample_pairs(k_pairs, test_table, cfg.eval_pairs,
                                                 partners=train_table)
    head = functools.partial(net.apply, {"params": params}, method=net.head)
    logits_P = head(emb_NxD[pairs_Px2[:, 0]], emb_NxD[pairs_Px2[:, 1]])
    support_QxN, answers_Q = sampling.sample_oneshot_trials(k_shot, labels[te], train_table, n_way)
    shot_QxN = head(emb_NxD[te][:, None, :], emb_NxD[support_QxN])
    return pairs_Px2, similar_P, logits_P, jnp.sum(jnp.argmax(shot_QxN, axis=1) == answers_Q)

  pairs, similar, logits, correct = jax.device_get(evaluate(state["params"], images))
  worst = verification.hardest_mistakes(pairs, logits, similar)
  shown = 0
  if jax.process_index() == 0:
    plotting.save_roc_png(workdir / "roc.png", {"held-out pairs (test)": (-logits, similar)},
                              title="image folder, held-out pairs")
    shown = plotting.contact_sheet(
        workdir / "mistakes.png", images, pairs[worst], similar[worst],
        1.0 / (1.0 + np.exp(-logits[worst].astype(np.float64))),
        class_names=class_names, labels=labels)
  records = train.read_metrics(workdir)
  return {
      "test_pair_accuracy": verification.accuracy_at(logits, similar, 0.0), "n_way": n_way,
      "test_one_shot_accuracy": int(correct) / int(te.size), "test_one_shot_trials": int(te.size),
      "test_one_shot_ci95": list(oneshot.accuracy_interval(int(correct), int(te.size))),
      "test_verification": verification.verification_report(-logits, similar),
      "threshold_units": "negated logit (same when -logit <= threshold)", "steps": fit["steps"],
      "image_shape": list(images.shape[1:]), "final_loss": fit["final_loss"],
      "images": {"train": int(tr.size), "test": int(te.size), "classes": c},
      "epochs": fit["steps"] // cfg.steps_per_epoch, "mistakes_shown": shown,
      "train_time_s": fit["train_time_s"], "session_time_s": session_time,
      "compile_time_s": fit["compile_time_s"], "pairs_per_s": fit["examples_per_s"],
      "history": [{"epoch": r["step"] // cfg.steps_per_epoch, "loss": r["loss"],
                   "pair_accuracy": r["pair_accuracy"]} for r in records
                  if r.get("kind") == "train" and r["step"] % cfg.steps_per_epoch == 0],
      "protocols": {"split": f"about {cfg.val_fraction:g} of each class's images held out",
                    "test_pairs": f"{cfg.eval_pairs} held-out probe + training image pairs",
                    "test_one_shot": f"each held-out image vs training images of {n_way} classes"},
  }


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Loads the folder of ``cfg`` and runs :func:`fit_and_evaluate`; the results."""
  images, labels, names, root = load_images(cfg, workdir)
  out = fit_and_evaluate(images, labels, cfg, workdir, class_names=names, progress=progress,
                         hooks=hooks, eval_only=eval_only)
  return {"data_dir": root.name, "classes": names if len(names) <= 50 else len(names), **out,
          "plots": ["roc.png", "mistakes.png"]}


def summary(results: dict) -> str:
  """One line: the held-out pair accuracy, N-way one-shot accuracy, AUC, wall time."""
  return json.dumps({"preset": results.get("preset"),
                     "test_pair_accuracy": round(results["test_pair_accuracy"], 4),
                     f"test_{results['n_way']}way_one_shot_accuracy": round(
                         results["test_one_shot_accuracy"], 4),
                     "auc": round(results["test_verification"]["auc"], 4),
                     "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})


@inference.register_loader(NAME)
def load_model(config: dict, workdir, *, which: str = "best",
               variant: str | None = None) -> inference.Model:
  """The Siamese SmallCNN of an ``image_folder`` work directory.

  Inputs are images of any size and Pillow mode (files, or uint8 arrays ``[H, W]`` /
  ``[H, W, C]``), converted and resized as the recipe read its folder
  (:func:`siamjax.data.folders.image_array`); the comparison is the pair head's
  probability of "same".
  """
  from PIL import Image
  cfg = cli.config_from_dict(Config, config)
  if variant:
    raise ValueError(f"{NAME} trains one model per work directory: pass no variant")
  params, _, step, kind = train.restore_variables(workdir, which=which)
  net = models.SiameseNet(encoder=encoders.SmallCNN())
  channels = 1 if cfg.grayscale else 3
  shape = (cfg.size, cfg.size, channels)

  def apply(variables, images_u8):
    return net.apply(variables, images_u8.astype(jnp.float32) / 255.0, method=net.embed)

  def decode(im, where):
    return folders.image_array(im, size=(cfg.size, cfg.size), grayscale=cfg.grayscale,
                               where=where)

  def from_array(a, where):
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
      raise ValueError(f"{where}: an array of shape {a.shape} {a.dtype}; pass uint8 images "
                       f"[H, W] or [H, W, C] with C = 1, 3 or 4, or image files")
    return decode(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a), where)

  describe = {"input": "an image of any size and Pillow mode",
              "array": f"[N, {cfg.size}, {cfg.size}, {channels}] uint8",
              "network_input": f"{'greyscale' if cfg.grayscale else 'RGB'} (Pillow's "
                               f"conversion, alpha dropped, 16-bit scaled), resized to "
                               f"{cfg.size}x{cfg.size} (bilinear), scaled to [0, 1]"}
  return inference.Model(
      recipe=NAME, workdir=workdir, step=step, checkpoint=kind, variables={"params": params},
      apply=apply, metric=inference.head_metric(params),
      inputs=inference.Inputs("image", shape, "uint8", describe),
      prepare=functools.partial(inference.image_batch, shape=shape, decode=decode,
                                from_array=from_array))
