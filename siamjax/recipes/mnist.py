"""MNIST Siamese recipes: the Keras example (contrastive) and in-batch triplet mining.

Two recipes in one module, each a namespace satisfying the recipe contract of
:mod:`siamjax.recipes` (``NAME``, ``Config``, ``PRESETS``, ``RESUMABLE``,
``train_and_evaluate``, ``summary``):

* :data:`contrastive` (``mnist_contrastive``): the Keras MNIST Siamese example
  (``mnist_siamese.py``): the MLP tower 784-128-128-128 with dropout 0.1
  (:data:`TOWER`), Euclidean distance, the example's contrastive loss (twice
  :func:`siamjax.losses.contrastive_loss`, margin 1), RMSprop (1e-3, rho 0.9, eps 1e-7
  outside the square root, as Keras), batch 128, 20 epochs over the example's
  alternating pairs (:func:`example_pairs`), made once on the device and shuffled each
  epoch (:func:`siamjax.sampling.epoch_batches`), and pair accuracy at distance
  ``< 0.5``. It chooses nothing, so by default it trains on all 60,000 images and
  reports the test pairs once; ``val_fraction > 0`` holds out a stratified validation
  split evaluated every epoch.
* :data:`triplet` (``mnist_triplet``): the same tower trained with an in-batch triplet
  loss (:data:`MINING`: batch-all, batch-hard, semi-hard) on P x K = 10 x 16 batches
  sampled every step (:func:`siamjax.sampling.sample_groups`). It *chooses* a distance
  threshold per rule and the headline rule, so it holds out 10% of the training images
  (stratified), picks each rule's threshold and the headline rule on the example's
  pairs over them (by validation ROC-AUC), and then reports every rule's test figures
  once. Each rule is a sub-run in ``workdir/<rule>/`` with its own checkpoints.

Both train through :func:`siamjax.train.run` (checkpoint every epoch, resume, the
shared CLI's ``experiments/mnist_contrastive.py`` / ``experiments/mnist_triplet.py``),
test on the example's test pairs (the same key for both recipes at one seed), report
:func:`siamjax.evaluation.verification.verification_report`, recall@1 over the test
images and write the ROC curve to ``workdir/roc.png``.

References:
  Keras examples, ``mnist_siamese.py`` ("Gets to 97.2% test accuracy after 20 epochs").
  R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006 (contrastive loss).
  A. Hermans, L. Beyer, B. Leibe, arXiv:1703.07737, 2017 (batch-all, batch-hard).
  F. Schroff, D. Kalenichenko, J. Philbin, CVPR 2015 (semi-hard).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import types
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import distances, encoders, losses, parallel, sampling, train
from siamjax.data import mnist as mnist_data
from siamjax.data import splits
from siamjax.evaluation import verification

__all__ = ["contrastive", "triplet", "ContrastiveConfig", "TripletConfig", "MnistData",
           "load_data", "example_pairs", "embed", "pair_distances", "init_state",
           "optimizer", "contrastive_loss_fn", "contrastive_prepare", "triplet_loss_fn",
           "TOWER", "MINING", "MINING_PRESETS", "PAIRINGS"]

#: The Keras example's tower: dense 128-128-128, ReLU, dropout 0.1 after the first two.
TOWER = encoders.MLP(features=(128, 128, 128), dropout_rate=0.1)

MINING = {
    "batch_all": losses.batch_all_triplet_loss,
    "batch_hard": losses.batch_hard_triplet_loss,
    "semi_hard": losses.semi_hard_triplet_loss,
}

#: Per-rule ``(margin, normalize)``. The tower ends in a ReLU: with batch-hard mining on
#: raw embeddings MNIST collapses every embedding to 0 (a fixed point with zero gradient,
#: the loss stuck at the margin), so batch-hard runs on unit-length embeddings with a
#: smaller margin.
MINING_PRESETS = {
    "batch_all": (1.0, False),
    "batch_hard": (0.2, True),
    "semi_hard": (1.0, False),
}

#: ``keras``: the example's pairs, made once (faithful); ``keras_fresh``: the example's
#: layout with fresh negative partners every epoch; ``random``: fresh balanced pairs
#: (:func:`siamjax.sampling.sample_pairs`) over every training image each epoch, as many.
PAIRINGS = ("keras", "keras_fresh", "random")

_CONTRASTIVE_JSON = Path(__file__).resolve().parents[2] / "experiments" / "results" / (
    "mnist_contrastive.json")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass
class ContrastiveConfig:
  """Every knob of the contrastive recipe (defaults: the Keras example)."""

  preset: str = "custom"
  seed: int = 0
  devices: int = 1  # data-parallel devices; batch_size must divide evenly
  data_dir: str | None = None  # a folder with mnist/ (IDX .gz); else $SIAMJAX_DATA_DIR
  source: str = "idx"  # or "tfds" (tfds' own data directory)
  train_images: int = 0  # the first N training images (0: all 60,000)
  test_images: int = 0  # the first N test images (0: all 10,000)
  val_fraction: float = 0.0  # > 0: a stratified validation split, evaluated every epoch
  pairing: str = "keras"  # see PAIRINGS
  epochs: int = 20
  batch_size: int = 128
  learning_rate: float = 1e-3
  margin: float = 1.0
  threshold: float = 0.5  # "same" when distance < threshold (the example's)
  steps_per_call: int = 0  # fused updates per call, dividing an epoch (0: one epoch)
  log_every: int = 1


@dataclasses.dataclass
class TripletConfig:
  """Every knob of the triplet recipe."""

  preset: str = "custom"
  seed: int = 0
  devices: int = 1  # data-parallel devices; P x K must divide evenly
  data_dir: str | None = None
  source: str = "idx"
  train_images: int = 0
  test_images: int = 0
  # Held-out training images on which each rule's threshold and the headline rule are
  # chosen (0: the example's training pairs serve instead).
  val_fraction: float = 0.1
  rules: tuple[str, ...] = ("batch_all", "batch_hard", "semi_hard")
  select_by: str = "auc"  # or "pair_accuracy" (at each rule's chosen threshold)
  margin: float | None = None  # overrides every rule's MINING_PRESETS margin
  epochs: int = 10
  classes_per_batch: int = 10  # P
  per_class: int = 16  # K (drawn with replacement)
  steps_per_epoch: int = 0  # 0: training images // (P K)
  steps_per_call: int = 0  # dividing an epoch (0: one epoch)
  learning_rate: float = 1e-3
  log_every: int = 1
  # The contrastive results to compare with (read only); None: the committed
  # experiments/results/mnist_contrastive.json when present; "": no comparison.
  contrastive_results: str | None = None


# ----------------------------------------------------------------------------- data


class MnistData(NamedTuple):
  """Host arrays: ``[N, 28, 28]`` uint8 images and ``[N]`` int32 digits per part.

  ``x_val``/``y_val`` are ``None`` without a validation split; ``val_positions`` are the
  held-out rows of the (truncated) training set, ``train_positions`` the kept ones.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray | None
  y_val: np.ndarray | None
  x_test: np.ndarray
  y_test: np.ndarray
  train_positions: np.ndarray
  val_positions: np.ndarray


def _check_common(cfg) -> None:
  if cfg.source not in ("idx", "tfds"):
    raise ValueError(f"source must be 'idx' or 'tfds', got {cfg.source!r}")
  for name in ("train_images", "test_images", "steps_per_call"):
    if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
      raise ValueError(f"{name} must be an int >= 0, got {getattr(cfg, name)!r}")
  if not 0.0 <= cfg.val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
  if not isinstance(cfg.epochs, int) or cfg.epochs < 1:
    raise ValueError(f"epochs must be an int >= 1, got {cfg.epochs!r}")


def load_data(cfg) -> MnistData:
  """Loads MNIST per ``cfg`` (``source``, ``data_dir``, sizes) and splits off validation.

  The validation split (``cfg.val_fraction`` of each digit,
  :func:`siamjax.data.splits.split_per_class` with ``cfg.seed``) is drawn from the
  training images only; the test images are never part of it.
  """
  _check_common(cfg)
  if cfg.source == "idx":
    (x_tr, y_tr), (x_te, y_te) = (mnist_data.load_mnist(s, cfg.data_dir)
                                  for s in ("train", "test"))
  else:
    (x_tr, y_tr), (x_te, y_te) = (mnist_data.load_mnist_tfds(s) for s in ("train", "test"))
  if cfg.train_images:
    x_tr, y_tr = x_tr[:cfg.train_images], y_tr[:cfg.train_images]
  if cfg.test_images:
    x_te, y_te = x_te[:cfg.test_images], y_te[:cfg.test_images]
  if not cfg.val_fraction:
    return MnistData(x_tr, y_tr, None, None, x_te, y_te, np.arange(len(y_tr)),
                     np.zeros(0, np.int64))
  kept, held = splits.split_per_class(y_tr, cfg.val_fraction, seed=cfg.seed)
  return MnistData(x_tr[kept], y_tr[kept], x_tr[held], y_tr[held], x_te, y_te, kept, held)


def _keys(seed: int):
  """``(init, run, train pairs, validation pairs, test pairs)`` keys of a seed: both
  recipes use the same test pairs at the same seed."""
  return tuple(jax.random.split(jax.random.key(seed), 5))


def example_pairs(key: jax.Array, labels) -> tuple[jax.Array, jax.Array]:
  """The Keras example's alternating pairs over ``labels`` (:func:`sampling.keras_pairs`,
  ``n`` = the smallest digit's count minus one): ``(pairs [P, 2], similar [P])``."""
  classes = sampling.index_table(np.asarray(labels), name="labels")
  if int(classes.counts.min()) < 2:
    raise ValueError("labels: the example's pairs need two images of every digit (use more "
                     "images or a smaller val_fraction)")
  return sampling.keras_pairs(key, classes, int(classes.counts.min()) - 1)


# ----------------------------------------------------------------------------- model


def embed(params, images_u8, *, normalize: bool = False, train: bool = False, key=None):
  """``[N, 28, 28]`` uint8 images -> ``[N, 128]`` tower embeddings (unit length if
  ``normalize``); ``train`` applies dropout with ``key``."""
  x = images_u8.astype(jnp.float32) / 255.0
  emb = TOWER.apply({"params": params}, x, train=train,
                    rngs={"dropout": key} if train else None)
  if normalize:
    norm = distances.safe_sqrt(jnp.sum(jnp.square(emb), axis=-1, keepdims=True))
    emb = emb / jnp.maximum(norm, 1e-6)
  return emb


@functools.partial(jax.jit, static_argnames="normalize")
def pair_distances(params, images_u8, pairs_Px2, *, normalize: bool = False) -> jax.Array:
  """Euclidean distances of ``pairs`` (positions into ``images``), each image encoded once."""
  emb_NxD = embed(params, images_u8, normalize=normalize)
  return distances.euclidean(emb_NxD[pairs_Px2[:, 0]], emb_NxD[pairs_Px2[:, 1]])


@functools.partial(jax.jit, static_argnames="normalize")
def _recall_at_1(params, images_u8, labels, *, normalize: bool = False):
  return verification.recall_at_1(embed(params, images_u8, normalize=normalize), labels)


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Keras' RMSprop: rho 0.9, eps 1e-7 added outside the square root."""
  return optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, eps_in_sqrt=False)


def init_state(seed: int, learning_rate: float) -> dict:
  """A fresh train state of the tower (same initialisation for every recipe and rule)."""
  k_init, k_run = _keys(seed)[:2]
  params = TOWER.init(k_init, jnp.zeros((1, 28, 28), jnp.float32))["params"]
  return train.init_state(params, optimizer(learning_rate), key=k_run)


def _steps_per_call(value: int, per_epoch: int) -> int:
  if value == 0:
    return per_epoch
  if per_epoch % value:
    raise ValueError(f"steps_per_call={value} must divide the {per_epoch} steps of an epoch")
  return value


def _history(workdir: Path, per_epoch: int, evals: list) -> list[dict]:
  """One record per epoch: the training metrics of the epoch's last call, and the
  validation figures where evaluated (from ``metrics.jsonl`` and ``fit``'s history)."""
  by_step = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in evals}
  out = []
  log = workdir / "metrics.jsonl"
  lines = log.read_text().splitlines() if log.is_file() else []
  for r in map(json.loads, lines):
    if r.get("kind") == "train" and r["step"] % per_epoch == 0:
      rec = {"epoch": r["step"] // per_epoch, "step": r["step"],
             **{k: v for k, v in r.items() if k not in ("kind", "step")
                and not k.endswith("_per_s")}}
      out.append({**rec, **by_step.get(r["step"], {})})
  return out


def _save_roc(workdir: Path, curves: dict, title: str) -> list[str]:
  if jax.process_index() != 0:
    return []
  try:
    verification.save_roc_png(workdir / "roc.png", curves, title=title)
  except ImportError:
    return []
  return ["roc.png"]


def _pair_accuracy(d, similar, threshold: float) -> float:
  return float(np.mean((np.asarray(d) < threshold) == (np.asarray(similar) > 0.5)))


# ----------------------------------------------------------------------------- contrastive


def contrastive_loss_fn(cfg: ContrastiveConfig):
  """``loss_fn(params, model_state, data, key, batch)``: the example's loss on one batch of
  pairs (``batch = {"pairs" [B, 2], "similar" [B]}`` from :func:`contrastive_prepare`),
  both towers as one 2B batch; metric ``pair_accuracy`` at ``cfg.threshold``."""

  def loss_fn(params, model_state, data, key, batch):
    pairs_Bx2, similar_B = parallel.shard_batch((batch["pairs"], batch["similar"]))
    b = pairs_Bx2.shape[0]
    x = data["x"][jnp.concatenate([pairs_Bx2[:, 0], pairs_Bx2[:, 1]])]
    h_2BxD = embed(params, x, train=True, key=key)
    d_B = distances.euclidean(h_2BxD[:b], h_2BxD[b:])
    loss = 2.0 * jnp.mean(losses.contrastive_loss(d_B, similar_B, margin=cfg.margin))
    acc = jnp.mean(((d_B < cfg.threshold) == (similar_B > 0.5)).astype(jnp.float32))
    return loss, (model_state, {"pair_accuracy": acc})

  return loss_fn


def contrastive_prepare(cfg: ContrastiveConfig, n_pairs: int, per_epoch: int):
  """The ``prepare(data, key, step, num_steps)`` of the contrastive recipe.

  Gathers the call's batches of pairs in the epoch's shuffled order
  (:func:`siamjax.sampling.epoch_batches`); with ``pairing="keras_fresh"`` or
  ``"random"`` the epoch's pairs are drawn first from ``fold_in(key, epoch)``, so the
  batches stay a pure function of ``(key, step)`` (a call lies inside one epoch).
  """
  if cfg.pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {cfg.pairing!r}")

  def prepare(data, key, step, num_steps):
    n_per_class = n_pairs // (2 * data["classes"].table.shape[0])  # the example's n
    k_pairs, k_order = jax.random.split(key)
    k_epoch = jax.random.fold_in(k_pairs, step // per_epoch)
    if cfg.pairing == "keras":
      pairs, similar = data["pairs"], data["similar"]
    elif cfg.pairing == "keras_fresh":
      pairs, similar = sampling.keras_pairs(k_epoch, data["classes"], n_per_class)
    else:
      pairs, similar = sampling.sample_pairs(k_epoch, data["classes"], n_pairs)
    rows_SxB = sampling.epoch_batches(k_order, n_pairs, cfg.batch_size, step, num_steps)
    return {"pairs": pairs[rows_SxB], "similar": similar[rows_SxB]}

  return prepare


def _contrastive_train_and_evaluate(cfg: ContrastiveConfig, workdir, *, progress: bool = True,
                                    hooks=(), eval_only: bool = False) -> dict:
  """Trains the Keras example per ``cfg`` (resuming ``workdir``) and evaluates it once."""
  t0 = time.perf_counter()
  workdir = Path(workdir)
  if cfg.pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {cfg.pairing!r}")
  d = load_data(cfg)
  _, _, k_train, k_val, k_test = _keys(cfg.seed)
  pairs_tr, similar_tr = example_pairs(k_train, d.y_train)
  pairs_te, similar_te = example_pairs(k_test, d.y_test)
  n_pairs = int(pairs_tr.shape[0])
  if not isinstance(cfg.batch_size, int) or not 1 <= cfg.batch_size <= n_pairs:
    raise ValueError(f"batch_size must be an int in [1, {n_pairs}] (the training pairs), "
                     f"got {cfg.batch_size!r}")
  per_epoch = n_pairs // cfg.batch_size
  per_call = _steps_per_call(cfg.steps_per_call, per_epoch)
  x_tr, x_te = jnp.asarray(d.x_train), jnp.asarray(d.x_test)
  data = {"x": d.x_train, "pairs": pairs_tr, "similar": similar_tr,
          "classes": sampling.index_table(d.y_train)}

  val = None if d.x_val is None else (jnp.asarray(d.x_val),) + example_pairs(k_val, d.y_val)

  def eval_fn(state):
    dist = np.asarray(pair_distances(state["params"], val[0], val[1]))
    return {"val_pair_accuracy": _pair_accuracy(dist, val[2], cfg.threshold),
            "val_auc": verification.verification_report(dist, np.asarray(val[2]))["auc"]}

  state, fit = train.run(
      contrastive_loss_fn(cfg), optimizer(cfg.learning_rate),
      init_state(cfg.seed, cfg.learning_rate), data, num_steps=cfg.epochs * per_epoch,
      steps_per_call=per_call, prepare=contrastive_prepare(cfg, n_pairs, per_epoch),
      devices=cfg.devices, eval_fn=None if val is None else eval_fn,
      eval_every=0 if val is None else per_epoch, monitor="val_pair_accuracy",
      workdir=workdir, examples_per_step=cfg.batch_size, checkpoint_every=per_epoch,
      log_every=cfg.log_every, progress=progress, hooks=hooks, unit="pairs",
      desc=NAME_CONTRASTIVE, restore_only=eval_only)

  params = state["params"]
  d_tr = np.asarray(pair_distances(params, x_tr, pairs_tr))
  d_te = np.asarray(pair_distances(params, x_te, pairs_te))
  similar_tr, similar_te = np.asarray(similar_tr), np.asarray(similar_te)
  results = {
      "train_pair_accuracy": _pair_accuracy(d_tr, similar_tr, cfg.threshold),
      "test_pair_accuracy": _pair_accuracy(d_te, similar_te, cfg.threshold),
      "threshold": cfg.threshold,
      "pairing": cfg.pairing,
      "test_verification": verification.verification_report(d_te, similar_te),
      "test_recall_at_1": float(_recall_at_1(params, x_te, jnp.asarray(d.y_test))),
  }
  if val is not None:
    d_va = np.asarray(pair_distances(params, val[0], val[1]))
    results["val_pair_accuracy"] = _pair_accuracy(d_va, val[2], cfg.threshold)
    results["val_verification"] = verification.verification_report(d_va, np.asarray(val[2]))
  results.update({
      "train_pairs": n_pairs, "test_pairs": int(pairs_te.shape[0]),
      "val_pairs": None if val is None else int(val[1].shape[0]),
      "images": {"train": len(d.y_train), "val": len(d.val_positions),
                 "test": len(d.y_test)},
      "protocols": {
          "test_pair_accuracy": (
              "the Keras example's alternating pairs over the test images (each digit's "
              "i-th image with its (i+1)-th, and with the i-th image of a random other "
              f"digit); 'same' when the Euclidean distance < {cfg.threshold} (fixed, the "
              "example's)"),
          "training": (f"pairing {cfg.pairing!r} over {len(d.y_train)} training images, "
                       f"each epoch's pairs shuffled, the last partial batch dropped"),
          "validation": None if val is None else (
              f"the example's pairs over a stratified {cfg.val_fraction:.0%} of the training "
              f"images (never trained on), evaluated every epoch; the final epoch is "
              f"reported"),
      },
      "steps_per_epoch": per_epoch, "epochs": fit["steps"] // per_epoch,
      "steps": fit["steps"], "device": str(jax.devices()[0]),
      "train_time_s": fit["train_time_s"], "session_time_s": time.perf_counter() - t0,
      "compile_time_s": fit["compile_time_s"], "pairs_per_s": fit["examples_per_s"],
      "final_loss": fit["final_loss"], "resumed_from": fit["resumed_from"],
      "history": _history(workdir, per_epoch, fit["history"]),
      "plots": _save_roc(workdir, {"test pairs": (d_te, similar_te)},
                         "MNIST contrastive, test pairs"),
  })
  return results


def _contrastive_summary(results: dict) -> str:
  """One line: test and train pair accuracy, test AUC, wall time."""
  return json.dumps({
      "preset": results.get("preset"), "pairing": results.get("pairing"),
      "test_pair_accuracy": round(results["test_pair_accuracy"], 4),
      "train_pair_accuracy": round(results["train_pair_accuracy"], 4),
      "test_auc": round(results["test_verification"]["auc"], 4),
      "test_recall_at_1": round(results["test_recall_at_1"], 4),
      "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})


# ----------------------------------------------------------------------------- triplet


def triplet_loss_fn(rule: str, *, margin: float, normalize: bool, classes_per_batch: int,
                    per_class: int):
  """``loss_fn(params, model_state, data, key)``: a P x K batch drawn from
  ``data["classes"]`` (with replacement), embedded once, the mean of ``MINING[rule]``'s
  per-anchor losses; metric ``active_anchors`` (the fraction with a positive loss)."""
  if rule not in MINING:
    raise ValueError(f"rules must be among {sorted(MINING)}, got {rule!r}")
  loss_per_anchor = MINING[rule]

  def loss_fn(params, model_state, data, key):
    k_sample, k_dropout = jax.random.split(key)
    pos_B, labels_B = sampling.sample_groups(k_sample, data["classes"], classes_per_batch,
                                             per_class, replace=True)
    pos_B, labels_B = parallel.shard_batch((pos_B, labels_B))
    emb_BxD = embed(params, data["x"][pos_B], normalize=normalize, train=True, key=k_dropout)
    per_anchor_B = loss_per_anchor(emb_BxD, labels_B, margin=margin)
    active = jnp.mean((per_anchor_B > 0).astype(jnp.float32))
    return jnp.mean(per_anchor_B), (model_state, {"active_anchors": active})

  return loss_fn


def _rules(cfg: TripletConfig) -> tuple[str, ...]:
  rules = (cfg.rules,) if isinstance(cfg.rules, str) else tuple(cfg.rules)
  bad = [r for r in rules if r not in MINING]
  if not rules or bad or len(set(rules)) != len(rules):
    raise ValueError(f"rules must be distinct names among {sorted(MINING)}, got {cfg.rules!r}")
  return rules


def _comparison_row(path: Path) -> dict | None:
  try:
    c = json.loads(path.read_text())
    row = {"test_pair_accuracy": c["test_pair_accuracy"],
           "test_auc": c["test_verification"]["auc"],
           "test_eer": c["test_verification"]["eer"],
           "test_recall_at_1": c["test_recall_at_1"], "train_time_s": c.get("train_time_s")}
  except (OSError, json.JSONDecodeError, KeyError, TypeError):
    return None
  try:
    where = str(path.resolve().relative_to(_CONTRASTIVE_JSON.parents[2]))
  except ValueError:
    where = str(path)
  return {**row, "from": where}


def _triplet_train_and_evaluate(cfg: TripletConfig, workdir, *, progress: bool = True,
                                hooks=(), eval_only: bool = False) -> dict:
  """Trains every rule (``workdir/<rule>/``), chooses on validation, tests once."""
  t0 = time.perf_counter()
  workdir = Path(workdir)
  rules = _rules(cfg)
  if cfg.select_by not in ("auc", "pair_accuracy"):
    raise ValueError(f"select_by must be 'auc' or 'pair_accuracy', got {cfg.select_by!r}")
  p, k = cfg.classes_per_batch, cfg.per_class
  if not isinstance(p, int) or not 2 <= p <= 10 or not isinstance(k, int) or k < 2:
    raise ValueError(f"classes_per_batch must be in [2, 10] and per_class >= 2, got {p} and "
                     f"{k}")
  d = load_data(cfg)
  _, _, k_train, k_val, k_test = _keys(cfg.seed)
  pairs_te, similar_te = example_pairs(k_test, d.y_test)
  has_val = d.x_val is not None
  if has_val:
    x_sel, (pairs_sel, similar_sel) = jnp.asarray(d.x_val), example_pairs(k_val, d.y_val)
    chosen_on = (f"validation pairs: the Keras example's pairs over a stratified "
                 f"{cfg.val_fraction:.0%} of the training images ({len(d.y_val)}), never "
                 f"trained on")
  else:
    x_sel, (pairs_sel, similar_sel) = jnp.asarray(d.x_train), example_pairs(k_train,
                                                                             d.y_train)
    chosen_on = "training pairs: the Keras example's pairs over the training images"
  similar_sel, similar_te = np.asarray(similar_sel), np.asarray(similar_te)
  x_te, y_te = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
  per_epoch = cfg.steps_per_epoch or max(1, len(d.y_train) // (p * k))
  per_call = _steps_per_call(cfg.steps_per_call, per_epoch)
  data = {"x": d.x_train, "classes": sampling.index_table(d.y_train)}

  runs, curves = {}, {}
  for rule in rules:
    margin, normalize = MINING_PRESETS[rule]
    margin = margin if cfg.margin is None else cfg.margin

    def eval_fn(state, normalize=normalize):
      dist = np.asarray(pair_distances(state["params"], x_sel, pairs_sel, normalize=normalize))
      report = verification.verification_report(dist, similar_sel)
      return {"val_auc": report["auc"], "val_best_accuracy": report["best_accuracy"]}

    state, fit = train.run(
        triplet_loss_fn(rule, margin=margin, normalize=normalize, classes_per_batch=p,
                        per_class=k),
        optimizer(cfg.learning_rate), init_state(cfg.seed, cfg.learning_rate), data,
        num_steps=cfg.epochs * per_epoch, steps_per_call=per_call, devices=cfg.devices,
        eval_fn=eval_fn if has_val else None, eval_every=per_epoch if has_val else 0,
        monitor="val_auc", workdir=workdir / rule, examples_per_step=p * k,
        checkpoint_every=per_epoch,
        log_every=cfg.log_every, progress=progress, hooks=hooks, unit="images",
        desc=f"{NAME_TRIPLET} {rule}", restore_only=eval_only)
    params = state["params"]
    d_sel = np.asarray(pair_distances(params, x_sel, pairs_sel, normalize=normalize))
    sel_accuracy, score_t = verification.best_threshold_accuracy(-d_sel, similar_sel)
    d_te = np.asarray(pair_distances(params, x_te, pairs_te, normalize=normalize))
    report = verification.verification_report(d_te, similar_te)
    curves[rule] = (d_te, similar_te)
    runs[rule] = {
        "mining": rule,
        "test_pair_accuracy": verification.accuracy_at(-d_te, similar_te, score_t),
        "threshold": -score_t,
        "selection_pair_accuracy": sel_accuracy,
        "selection_verification": verification.verification_report(d_sel, similar_sel),
        "test_best_accuracy": report["best_accuracy"],
        "test_verification": report,
        "test_recall_at_1": float(_recall_at_1(params, x_te, y_te, normalize=normalize)),
        "margin": margin, "normalize": normalize,
        "epochs": fit["steps"] // per_epoch, "steps": fit["steps"],
        "train_time_s": fit["train_time_s"], "compile_time_s": fit["compile_time_s"],
        "images_per_s": fit["examples_per_s"], "final_loss": fit["final_loss"],
        "resumed_from": fit["resumed_from"],
        "history": _history(workdir / rule, per_epoch, fit["history"]),
    }

  measure = {"auc": lambda r: r["selection_verification"]["auc"],
             "pair_accuracy": lambda r: r["selection_pair_accuracy"]}[cfg.select_by]
  values = {rule: measure(r) for rule, r in runs.items()}
  best = max(rules, key=lambda rule: values[rule])  # ties: the first listed
  table = {m: {"test_pair_accuracy": r["test_pair_accuracy"],
               "test_auc": r["test_verification"]["auc"],
               "test_eer": r["test_verification"]["eer"],
               "test_recall_at_1": r["test_recall_at_1"], "train_time_s": r["train_time_s"]}
           for m, r in runs.items()}
  path = _CONTRASTIVE_JSON if cfg.contrastive_results is None else (
      Path(cfg.contrastive_results) if cfg.contrastive_results else None)
  row = None if path is None else _comparison_row(path)
  if row is not None:
    table["contrastive (Keras example)"] = row
  return {
      "best_mining": best,
      "test_pair_accuracy": runs[best]["test_pair_accuracy"],
      "selection": {"rule": best, "measure": cfg.select_by,
                    "on": "validation" if has_val else "training",
                    "pairs": chosen_on, "values": values,
                    "thresholds": {rule: r["threshold"] for rule, r in runs.items()}},
      "protocols": {
          "test_pair_accuracy": (
              "the Keras example's alternating pairs over the test images (the contrastive "
              "recipe's test pairs at the same seed); 'same' when the distance <= each "
              "rule's threshold, which is the best-accuracy threshold on the selection "
              "pairs; the headline rule is the one with the highest selection "
              f"{cfg.select_by}. Test figures are computed once, after every choice"),
          "selection": chosen_on,
          "training": (f"P x K = {p} x {k} images drawn each step (members with "
                       f"replacement) from {len(d.y_train)} training images, "
                       f"{per_epoch} steps per epoch"),
      },
      "comparison": table, "runs": runs,
      "images": {"train": len(d.y_train), "val": len(d.val_positions), "test": len(d.y_test)},
      "test_pairs": int(pairs_te.shape[0]), "selection_pairs": int(pairs_sel.shape[0]),
      "batch": {"classes": p, "per_class": k}, "steps_per_epoch": per_epoch,
      "device": str(jax.devices()[0]), "session_time_s": time.perf_counter() - t0,
      "plots": _save_roc(workdir, curves, "MNIST triplet mining, test pairs"),
  }


def _triplet_summary(results: dict) -> str:
  """One line: the rule chosen on validation, its test accuracy, every rule's figures."""
  return json.dumps({
      "preset": results.get("preset"), "best_mining": results["best_mining"],
      "chosen_by": f"{results['selection']['on']} {results['selection']['measure']}",
      "test_pair_accuracy": round(results["test_pair_accuracy"], 4),
      "rules": {m: {"test_pair_accuracy": round(r["test_pair_accuracy"], 4),
                    "test_auc": round(r["test_verification"]["auc"], 4),
                    "test_recall_at_1": round(r["test_recall_at_1"], 4)}
                for m, r in results["runs"].items()},
      "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})


# ----------------------------------------------------------------------------- recipes

NAME_CONTRASTIVE = "mnist_contrastive"
NAME_TRIPLET = "mnist_triplet"

#: The Keras MNIST Siamese example (``experiments/mnist_contrastive.py``).
contrastive = types.SimpleNamespace(
    NAME=NAME_CONTRASTIVE,
    Config=ContrastiveConfig,
    PRESETS={
        "default": lambda: ContrastiveConfig(preset="default"),
        "smoke": lambda: ContrastiveConfig(preset="smoke", train_images=2000,
                                           test_images=1000, epochs=2),
    },
    # Training longer continues a finished run.
    RESUMABLE=frozenset({"epochs"}),
    train_and_evaluate=_contrastive_train_and_evaluate,
    summary=_contrastive_summary,
)

#: Triplet mining on the example's tower (``experiments/mnist_triplet.py``).
triplet = types.SimpleNamespace(
    NAME=NAME_TRIPLET,
    Config=TripletConfig,
    PRESETS={
        "default": lambda: TripletConfig(preset="default"),
        "smoke": lambda: TripletConfig(preset="smoke", train_images=2000, test_images=1000,
                                       epochs=2, steps_per_epoch=10, contrastive_results=""),
    },
    RESUMABLE=frozenset({"epochs", "contrastive_results"}),
    train_and_evaluate=_triplet_train_and_evaluate,
    summary=_triplet_summary,
)
