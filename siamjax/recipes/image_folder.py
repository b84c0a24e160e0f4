"""A Siamese SmallCNN on any folder of class-named image folders, split by image.

:func:`train_and_evaluate` loads ``data_dir/<class>/<image>`` files resized to
``size x size`` (:func:`siamjax.data.folders.load_image_folder`; the smoke preset
writes a small synthetic folder into the work directory first), and
:func:`fit_and_evaluate`:

1. holds out about ``val_fraction`` of each class's images
   (:func:`siamjax.data.splits.split_per_class`, by ``seed``). The held-out images are
   a TEST set: nothing (no epoch, no threshold) is chosen on them, and the results name
   their figures ``test_*``;
2. trains :class:`siamjax.encoders.SmallCNN` towers sharing weights with the weighted-L1
   logit head of :class:`siamjax.models.SiameseNet`, pair BCE and Adam through
   :func:`siamjax.train.run`: every step draws ``batch_pairs`` balanced pairs of training
   images on the device (:func:`siamjax.sampling.sample_pairs` over the training
   split's :class:`~siamjax.sampling.IndexTable`; the dropout key is split from the
   step key), and a checkpoint is saved every epoch;
3. evaluates the final parameters on the held-out images, every image encoded once:

   * pair accuracy at logit 0 (probability 0.5) and the verification report (ROC-AUC,
     EER) of ``eval_pairs`` pairs whose first image is a held-out probe and whose
     second a training image, of the probe's class for half of them and of another
     class for the rest (:func:`siamjax.sampling.sample_pairs` with ``partners=`` the
     training table; classes uniform, members uniform within a class);
   * ``n_way``-way one-shot accuracy: every held-out image against one training image
     of its class and of ``n_way - 1`` other classes
     (:func:`siamjax.sampling.sample_oneshot_trials`), with a 95% interval;
   * ``mistakes.png``, the hardest wrongly judged pairs
     (:func:`siamjax.evaluation.verification.hardest_mistakes` and
     :func:`~siamjax.evaluation.verification.contact_sheet`), and ``roc.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import encoders, losses, models, parallel, sampling, train
from siamjax.data import folders, splits
from siamjax.evaluation import oneshot, verification

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "load_images", "fit_and_evaluate",
           "train_and_evaluate", "summary"]

NAME = "image_folder"
RESUMABLE = frozenset({"epochs"})  # how long it trains, not what it computes up to a step


@dataclasses.dataclass
class Config:
  """Every knob of the recipe."""

  seed: int = 0  # the split, the initialisation, the pairs, the dropout, the evaluation
  devices: int = 1  # data-parallel devices (batch_pairs must divide evenly)
  data_dir: str | None = None  # the image folder: data_dir/<class name>/<image files>
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
    "smoke": lambda: Config(synthetic=True, size=24, epochs=2, steps_per_epoch=10,
                            steps_per_call=5),
}


def load_images(cfg: Config, workdir) -> tuple[np.ndarray, np.ndarray, list[str], Path]:
  """``(images [N, S, S, C] uint8, labels [N], class names, folder)`` of ``cfg``.

  Raises:
    ValueError: no ``data_dir`` (and not ``synthetic``), or a bad folder.
  """
  if cfg.synthetic:
    root = Path(workdir) / "synthetic_folder"
    folders.write_synthetic_image_folder(root, classes=4, per_class=8, seed=cfg.seed)
  elif cfg.data_dir:
    root = Path(cfg.data_dir)
  else:
    raise ValueError("data_dir: pass --data-dir DIR (a folder of class-named subfolders of "
                     "images) or --smoke")
  if cfg.size < 1:
    raise ValueError(f"size must be >= 1, got {cfg.size}")
  images, labels, names, _ = folders.load_image_folder(root, size=(cfg.size, cfg.size),
                                                       grayscale=cfg.grayscale)
  return images, labels, names, root


def _check(cfg: Config, images, labels) -> None:
  if images.ndim != 4 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"images must be [N, H, W, C] with N = labels' length, got "
                     f"{images.shape} and {labels.shape}")
  if cfg.steps_per_call < 1 or cfg.steps_per_epoch % cfg.steps_per_call:
    raise ValueError(f"steps_per_epoch={cfg.steps_per_epoch} must be a multiple of "
                     f"steps_per_call={cfg.steps_per_call}")
  if cfg.batch_pairs < 2 or cfg.batch_pairs % 2 or cfg.batch_pairs % cfg.devices:
    raise ValueError(f"batch_pairs must be even and divisible by devices={cfg.devices}, got "
                     f"{cfg.batch_pairs}")
  if cfg.eval_pairs < 2 or cfg.eval_pairs % 2:
    raise ValueError(f"eval_pairs must be an even number >= 2, got {cfg.eval_pairs}")
  if cfg.n_way < 2:
    raise ValueError(f"n_way must be >= 2, got {cfg.n_way}")


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
    The results: ``test_pair_accuracy``, ``test_one_shot_accuracy`` (with
    ``test_one_shot_ci95`` and ``test_one_shot_trials``), ``n_way``,
    ``test_verification``, ``mistakes_shown``, the split sizes, ``history`` (the
    training loss and pair accuracy of each epoch's last call), timings, ``protocols``.
  """
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  _check(cfg, images, labels)
  workdir = Path(workdir)
  tr, te = splits.split_per_class(labels, cfg.val_fraction, cfg.seed)
  c = int(labels.max()) + 1
  n_way = min(cfg.n_way, c)
  train_table, test_table = _table(labels, tr, c), _table(labels, te, c)
  if (small := np.flatnonzero(train_table.counts < 2)).size:
    raise ValueError(f"val_fraction: class {int(small[0])} keeps "
                     f"{int(train_table.counts[small[0]])} training image after the split, "
                     f"but a positive pair needs two; add images or hold out fewer")
  net = models.SiameseNet(encoder=encoders.SmallCNN())
  b = cfg.batch_pairs

  def scale(u8):
    return u8.astype(jnp.float32) / 255.0

  def loss_fn(params, model_state, data, key):
    k_pairs, k_drop = jax.random.split(key)
    pairs_Px2, similar_P = sampling.sample_pairs(k_pairs, data["classes"], b)
    pairs_Px2, similar_P = parallel.shard_batch((pairs_Px2, similar_P))
    x = scale(data["images"][pairs_Px2])
    logits_P = net.apply({"params": params}, x[:, 0], x[:, 1], train=True,
                         rngs={"dropout": k_drop})
    acc = jnp.mean(((logits_P >= 0) == (similar_P > 0)).astype(jnp.float32))
    return jnp.mean(losses.pair_bce_loss(logits_P, similar_P)), (model_state,
                                                                 {"pair_accuracy": acc})

  k_init, k_run, k_pairs, k_shot = jax.random.split(jax.random.key(cfg.seed), 4)
  optimizer = optax.adam(cfg.learning_rate)
  x0 = scale(jnp.asarray(images[:1]))
  params = jax.jit(net.init)(k_init, x0, x0)["params"]
  data = {"images": images, "classes": train_table}
  t0 = time.perf_counter()
  state, fit = train.run(
      loss_fn, optimizer, train.init_state(params, optimizer, key=k_run), data,
      num_steps=cfg.epochs * cfg.steps_per_epoch, steps_per_call=cfg.steps_per_call,
      devices=cfg.devices, checkpoint_every=cfg.steps_per_epoch, workdir=workdir,
      examples_per_step=b, progress=progress, hooks=hooks, unit="pairs",
      restore_only=eval_only)
  session_time = time.perf_counter() - t0

  @jax.jit
  def evaluate(params, images):
    n = images.shape[0]  # every image encoded once, 256 at a time
    chunk = min(256, n)
    padded = jnp.concatenate([images, jnp.zeros((-n % chunk,) + images.shape[1:],
                                                 images.dtype)])
    emb = jax.lax.map(lambda x: net.apply({"params": params}, scale(x), method=net.embed),
                      padded.reshape((-1, chunk) + images.shape[1:]))
    emb_NxD = emb.reshape(-1, emb.shape[-1])[:n]
    pairs_Px2, similar_P = sampling.sample_pairs(k_pairs, test_table, cfg.eval_pairs,
                                                 partners=train_table)
    logits_P = net.apply({"params": params}, emb_NxD[pairs_Px2[:, 0]],
                         emb_NxD[pairs_Px2[:, 1]], method=net.head)
    support_QxN, answers_Q = sampling.sample_oneshot_trials(k_shot, labels[te], train_table,
                                                            n_way)
    shot_QxN = net.apply({"params": params}, emb_NxD[te][:, None, :], emb_NxD[support_QxN],
                         method=net.head)
    correct = jnp.sum(jnp.argmax(shot_QxN, axis=1) == answers_Q)
    return pairs_Px2, similar_P, logits_P, correct

  pairs, similar, logits, correct = jax.device_get(evaluate(state["params"],
                                                            jnp.asarray(images)))
  low, high = oneshot.accuracy_interval(int(correct), int(te.size))
  worst = verification.hardest_mistakes(pairs, logits, similar)
  shown = 0
  if jax.process_index() == 0:
    verification.save_roc_png(workdir / "roc.png", {"held-out pairs (test)": (-logits,
                                                                                similar)},
                              title="image folder, held-out pairs")
    shown = verification.contact_sheet(
        workdir / "mistakes.png", images, pairs[worst], similar[worst],
        1.0 / (1.0 + np.exp(-logits[worst].astype(np.float64))),
        class_names=class_names, labels=labels)
  log = workdir / "metrics.jsonl"
  records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  history = [{"epoch": r["step"] // cfg.steps_per_epoch, "loss": r["loss"],
              "pair_accuracy": r["pair_accuracy"]} for r in records
             if r.get("kind") == "train" and r["step"] % cfg.steps_per_epoch == 0]
  return {
      "test_pair_accuracy": verification.accuracy_at(logits, similar, 0.0),
      "test_one_shot_accuracy": int(correct) / int(te.size),
      "test_one_shot_ci95": [low, high],
      "test_one_shot_trials": int(te.size),
      "n_way": n_way,
      "test_verification": verification.verification_report(-logits, similar),
      "threshold_units": "negated logit (same when -logit <= threshold)",
      "mistakes_shown": shown,
      "images": {"train": int(tr.size), "test": int(te.size), "classes": c},
      "image_shape": list(images.shape[1:]),
      "epochs": fit["steps"] // cfg.steps_per_epoch,
      "steps": fit["steps"],
      "steps_per_epoch": cfg.steps_per_epoch,
      "batch_pairs": b,
      "train_time_s": fit["train_time_s"], "session_time_s": session_time,
      "compile_time_s": fit["compile_time_s"], "pairs_per_s": fit["examples_per_s"],
      "final_loss": fit["final_loss"],
      "history": history,
      "protocols": {
          "split": (f"about {cfg.val_fraction:g} of each class's images held out (seed "
                    f"{cfg.seed}); the held-out images are a test set: nothing is chosen "
                    f"on them; the final parameters are evaluated"),
          "test_pairs": (f"{cfg.eval_pairs} pairs: a held-out probe and a training image, of "
                         f"the probe's class for the first half and of another class for "
                         f"the rest (classes uniform); accuracy at logit 0"),
          "test_one_shot": (f"every held-out image against one training image of its class "
                            f"and of {n_way - 1} other classes (uniform), argmax of the "
                            f"head's logit; Wilson 95% interval"),
      },
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
