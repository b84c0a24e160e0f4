"""MNIST Siamese recipes: the Keras example (contrastive) and in-batch triplet mining.

Two recipes, each a namespace with the contract of :mod:`siamjax.recipes`, on the Keras
example's MLP tower (:data:`TOWER`), trained by :func:`siamjax.train.run` (checkpoint
every epoch, resume), tested once on the example's alternating test pairs (the same for
both at one seed): verification report, recall@1, ROC curve in ``workdir/roc.png``.

* :data:`contrastive` (``mnist_contrastive``), Keras' ``mnist_siamese.py``: Euclidean
  distance, twice :func:`siamjax.losses.contrastive_loss` (margin 1), Keras' RMSprop,
  batch 128, 20 epochs over the example's training pairs, "same" at distance < 0.5. It
  chooses nothing, so it trains on all 60,000 images (``val_fraction > 0``: a validation
  split evaluated every epoch).
* :data:`triplet` (``mnist_triplet``): in-batch triplet losses (:data:`MINING`) on
  P x K = 10 x 16 batches, one sub-run per rule in ``workdir/<rule>/``; each rule's
  threshold and the headline rule (by ROC-AUC) are chosen on the example's pairs over a
  held-out 10% of the training images (:func:`load_data`), before any test.

References: Keras' ``mnist_siamese.py`` ("97.2% test accuracy after 20 epochs");
Hadsell, Chopra, LeCun, CVPR 2006 (contrastive); Hermans, Beyer, Leibe, arXiv:1703.07737
(batch-all, batch-hard); Schroff, Kalenichenko, Philbin, CVPR 2015 (semi-hard).
"""

from __future__ import annotations

import contextlib
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

from siamjax import distances, encoders, inference, losses, parallel, plotting, sampling, train
from siamjax.data import mnist as mnist_data, splits
from siamjax.evaluation import retrieval, verification
from siamjax.index import Metric
from siamjax.recipes import cli

__all__ = ["contrastive", "triplet", "ContrastiveConfig", "TripletConfig", "MnistData",
           "load_data", "example_pairs", "embed", "pair_distances", "init_state",
           "optimizer", "contrastive_loss_fn", "contrastive_prepare", "triplet_loss_fn",
           "TOWER", "MINING", "MINING_PRESETS", "PAIRINGS", "load_model"]

#: The Keras example's tower (dense 128-128-128, ReLU, dropout 0.1 after the first two).
TOWER = encoders.MLP(features=(128, 128, 128), dropout_rate=0.1)

#: The triplet-mining rules, each its in-batch loss.
MINING = {rule: getattr(losses, f"{rule}_triplet_loss")
          for rule in ("batch_all", "batch_hard", "semi_hard")}

#: Per-rule ``(margin, normalize)``. The tower ends in a ReLU: with batch-hard mining on
#: raw embeddings MNIST collapses every embedding to 0 (a fixed point with zero gradient),
#: so batch-hard runs on unit-length embeddings with a smaller margin.
MINING_PRESETS = {"batch_all": (1.0, False), "batch_hard": (0.2, True), "semi_hard": (1.0, False)}

#: ``keras``: the example's pairs, made once; ``keras_fresh``: fresh negative partners every
#: epoch; ``random``: as many fresh balanced pairs (:func:`siamjax.sampling.sample_pairs`) each epoch.
PAIRINGS = ("keras", "keras_fresh", "random")

_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class _DataConfig:
  """The knobs both recipes share: the run's identity and which MNIST images it loads."""

  preset: str = "custom"
  seed: int = 0
  devices: int = 1  # data-parallel devices; the batch must divide evenly
  data_dir: str | None = None  # a folder with mnist/ (IDX .gz); else $SIAMJAX_DATA_DIR
  source: str = "idx"  # or "tfds" (tfds' own data directory)
  train_images: int = 0  # the first N training images (0: all 60,000)
  test_images: int = 0  # the first N test images (0: all 10,000)


@dataclasses.dataclass
class ContrastiveConfig(_DataConfig):
  """Every knob of the contrastive recipe (defaults: the Keras example)."""

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
class TripletConfig(_DataConfig):
  """Every knob of the triplet recipe."""

  val_fraction: float = 0.1  # the choices' held-out images (0: the training pairs serve)
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
  contrastive_results: str | None = None  # None: experiments/results/'s, "": no comparison


class MnistData(NamedTuple):
  """Host arrays, ``[N, 28, 28]`` uint8 images and ``[N]`` int32 digits (``x_val = y_val =
  None`` without validation); ``*_positions``: rows of the (truncated) training set."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray | None
  y_val: np.ndarray | None
  x_test: np.ndarray
  y_test: np.ndarray
  train_positions: np.ndarray
  val_positions: np.ndarray


def load_data(cfg) -> MnistData:
  """Loads MNIST per ``cfg`` (``source``, ``data_dir``, sizes) and splits off validation:
  ``cfg.val_fraction`` of each digit of the training images, never a test image
  (:func:`siamjax.data.splits.split_per_class` with ``cfg.seed``)."""
  if (cfg.source not in ("idx", "tfds") or not 0.0 <= cfg.val_fraction < 1.0
      or min(cfg.train_images, cfg.test_images) < 0):
    raise ValueError(f"source must be 'idx' or 'tfds', val_fraction in [0, 1), train_images "
                     f"and test_images >= 0; got {cfg.source!r}, {cfg.val_fraction}, "
                     f"{cfg.train_images}, {cfg.test_images}")
  load = ((lambda s: mnist_data.load_mnist(s, cfg.data_dir)) if cfg.source == "idx"
          else mnist_data.load_mnist_tfds)
  (x_tr, y_tr), (x_te, y_te) = load("train"), load("test")
  x_tr, y_tr = x_tr[:cfg.train_images or None], y_tr[:cfg.train_images or None]
  x_te, y_te = x_te[:cfg.test_images or None], y_te[:cfg.test_images or None]
  if not cfg.val_fraction:
    return MnistData(x_tr, y_tr, None, None, x_te, y_te, np.arange(len(y_tr)), np.arange(0))
  kept, held = splits.split_per_class(y_tr, cfg.val_fraction, seed=cfg.seed)
  return MnistData(x_tr[kept], y_tr[kept], x_tr[held], y_tr[held], x_te, y_te, kept, held)


def example_pairs(key: jax.Array, labels) -> tuple[jax.Array, jax.Array]:
  """The Keras example's alternating pairs over ``labels`` (:func:`siamjax.sampling.keras_pairs`,
  ``n`` = the smallest digit's count minus one): ``(pairs [P, 2], similar [P])``."""
  classes = sampling.index_table(np.asarray(labels), name="labels")
  if int(classes.counts.min()) < 2:
    raise ValueError("labels: the example's pairs need two images of every digit")
  return sampling.keras_pairs(key, classes, int(classes.counts.min()) - 1)


def embed(params, images_u8, *, normalize: bool = False, train: bool = False, key=None):
  """``[N, 28, 28]`` uint8 images -> ``[N, 128]`` embeddings, unit length if ``normalize``;
  ``train`` applies dropout with ``key``."""
  emb = TOWER.apply({"params": params}, images_u8.astype(jnp.float32) / 255.0, train=train,
                    rngs={"dropout": key} if train else None)
  if normalize:
    emb = emb / jnp.maximum(distances.safe_sqrt(jnp.sum(jnp.square(emb), -1, keepdims=True)), 1e-6)
  return emb


@functools.partial(jax.jit, static_argnames="normalize")
def pair_distances(params, images_u8, pairs_Px2, *, normalize: bool = False) -> jax.Array:
  """Euclidean distances of ``pairs`` (positions into ``images``), each image encoded once."""
  emb_NxD = embed(params, images_u8, normalize=normalize)
  return distances.euclidean(emb_NxD[pairs_Px2[:, 0]], emb_NxD[pairs_Px2[:, 1]])


@functools.partial(jax.jit, static_argnames="normalize")
def _recall_at_1(params, images_u8, labels, *, normalize: bool = False):
  return retrieval.recall_at_1(embed(params, images_u8, normalize=normalize), labels)


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Keras' RMSprop: rho 0.9, eps 1e-7 added outside the square root."""
  return optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, eps_in_sqrt=False)


def init_state(seed: int, learning_rate: float) -> dict:
  """A fresh train state of the tower (same initialisation for every recipe and rule)."""
  k_init, k_run = jax.random.split(jax.random.key(seed), 5)[:2]  # _setup takes [2:]
  params = TOWER.init(k_init, jnp.zeros((1, 28, 28), jnp.float32))["params"]
  return train.init_state(params, optimizer(learning_rate), key=k_run)


def _setup(cfg):
  """``(data, train, val or None, test)``, each the example's ``(images, pairs, similar)``."""
  d, keys = load_data(cfg), jax.random.split(jax.random.key(cfg.seed), 5)[2:]
  parts = (d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)
  return (d,) + tuple(None if x is None else (jnp.asarray(x),) + example_pairs(k, y)
                      for k, (x, y) in zip(keys, parts))


def _verify(params, x, pairs, similar, *, normalize: bool = False):
  """``(distances, similar, verification report)`` of ``pairs`` over the images ``x``."""
  d, s = np.asarray(pair_distances(params, x, pairs, normalize=normalize)), np.asarray(similar)
  return d, s, verification.verification_report(d, s)


def _train(cfg, loss_fn, data, workdir: Path, per_epoch: int, eval_fn, unit: str, **kw):
  """:func:`siamjax.train.run`, checkpointed and evaluated every epoch: ``(params, figures)``
  (``history``: each epoch's last training metrics and its evaluation)."""
  state, fit = train.run(
      loss_fn, optimizer(cfg.learning_rate), init_state(cfg.seed, cfg.learning_rate), data,
      num_steps=cfg.epochs * per_epoch, steps_per_call=cfg.steps_per_call or per_epoch,
      devices=cfg.devices, eval_fn=eval_fn, eval_every=per_epoch if eval_fn else 0,
      workdir=workdir, checkpoint_every=per_epoch, log_every=cfg.log_every, unit=unit, **kw)
  evals = {r["step"]: r for r in fit["history"]}
  history = [{"epoch": r["step"] // per_epoch, "step": r["step"],
              **{k: v for k, v in r.items() if k not in ("kind", "step") and "_per_s" not in k},
              **evals.get(r["step"], {})}
             for r in train.read_metrics(workdir, kind="train") if r["step"] % per_epoch == 0]
  return state["params"], {
      "epochs": fit["steps"] // per_epoch, "steps": fit["steps"],
      "train_time_s": fit["train_time_s"], "compile_time_s": fit["compile_time_s"],
      f"{unit}_per_s": fit["examples_per_s"], "final_loss": fit["final_loss"],
      "resumed_from": fit["resumed_from"], "history": history}


def _finish(workdir: Path, t0: float, d: MnistData, curves: dict, title: str) -> dict:
  """The figures both recipes end with: image counts, device, time, the ROC plot."""
  plots = []
  if jax.process_index() == 0:
    with contextlib.suppress(ImportError):  # no matplotlib: no plot
      plotting.save_roc_png(workdir / "roc.png", curves, title=title)
      plots = ["roc.png"]
  return {"images": {"train": len(d.y_train), "val": len(d.val_positions),
                     "test": len(d.y_test)}, "device": str(jax.devices()[0]),
          "session_time_s": time.perf_counter() - t0, "plots": plots}


def contrastive_loss_fn(cfg: ContrastiveConfig):
  """``loss_fn(params, model_state, data, key, batch)``: the example's loss on one batch of
  pairs (``batch = {"pairs" [B, 2], "similar" [B]}`` from :func:`contrastive_prepare`),
  both towers as one 2B batch; metric ``pair_accuracy`` at ``cfg.threshold``."""
  def loss_fn(params, model_state, data, key, batch):
    pairs_Bx2, similar_B = parallel.shard_batch((batch["pairs"], batch["similar"]))
    x = data["x"][jnp.concatenate([pairs_Bx2[:, 0], pairs_Bx2[:, 1]])]
    h_2BxD = embed(params, x, train=True, key=key)
    d_B = distances.euclidean(*jnp.split(h_2BxD, 2))
    loss = 2.0 * jnp.mean(losses.contrastive_loss(d_B, similar_B, margin=cfg.margin))
    acc = jnp.mean(((d_B < cfg.threshold) == (similar_B > 0.5)).astype(jnp.float32))
    return loss, (model_state, {"pair_accuracy": acc})
  return loss_fn


def contrastive_prepare(cfg: ContrastiveConfig, n_pairs: int, per_epoch: int):
  """``prepare(data, key, step, num_steps)``: the call's batches of pairs in the epoch's
  order (:func:`siamjax.sampling.epoch_batches`), the epoch's fresh pairs (unless
  ``pairing="keras"``) drawn from ``fold_in(key, epoch)``: a function of the step."""
  if cfg.pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {cfg.pairing!r}")
  def prepare(data, key, step, num_steps):
    n_per_class = n_pairs // (2 * data["classes"].table.shape[0])  # the example's n
    k_pairs, k_order = jax.random.split(key)
    k_epoch = jax.random.fold_in(k_pairs, step // per_epoch)
    pairs, similar = data["pairs"], data["similar"]  # "keras"
    if cfg.pairing == "keras_fresh":
      pairs, similar = sampling.keras_pairs(k_epoch, data["classes"], n_per_class)
    elif cfg.pairing == "random":
      pairs, similar = sampling.sample_pairs(k_epoch, data["classes"], n_pairs)
    rows_SxB = sampling.epoch_batches(k_order, n_pairs, cfg.batch_size, step, num_steps)
    return {"pairs": pairs[rows_SxB], "similar": similar[rows_SxB]}
  return prepare


def _contrastive_train_and_evaluate(cfg: ContrastiveConfig, workdir, *, progress: bool = True,
                                    hooks=(), eval_only: bool = False) -> dict:
  """Trains the Keras example per ``cfg`` (resuming ``workdir``) and evaluates it once."""
  t0, workdir = time.perf_counter(), Path(workdir)
  d, *sets = _setup(cfg)
  (_, pairs_tr, similar_tr), val, test = sets
  n_pairs = int(pairs_tr.shape[0])
  if not 1 <= cfg.batch_size <= n_pairs:
    raise ValueError(f"batch_size must be in [1, {n_pairs}] (training pairs), got {cfg.batch_size}")
  per_epoch = n_pairs // cfg.batch_size
  def evaluate(params, pairs):  # (pair accuracy at cfg.threshold, report, ROC curve)
    dist, similar, report = _verify(params, *pairs)
    return float(np.mean((dist < cfg.threshold) == (similar > 0.5))), report, (dist, similar)
  def eval_fn(state):
    accuracy, report, _ = evaluate(state["params"], val)
    return {"val_pair_accuracy": accuracy, "val_auc": report["auc"]}
  data = {"x": d.x_train, "pairs": pairs_tr, "similar": similar_tr,
          "classes": sampling.index_table(d.y_train)}
  params, run = _train(
      cfg, contrastive_loss_fn(cfg), data, workdir, per_epoch, None if val is None else eval_fn,
      "pairs", prepare=contrastive_prepare(cfg, n_pairs, per_epoch), monitor="val_pair_accuracy",
      examples_per_step=cfg.batch_size, progress=progress, hooks=hooks, desc=contrastive.NAME,
      restore_only=eval_only)
  (acc_tr, _, _), (acc_te, report, curve) = evaluate(params, sets[0]), evaluate(params, test)
  results = {"train_pair_accuracy": acc_tr, "test_pair_accuracy": acc_te,
             "threshold": cfg.threshold, "pairing": cfg.pairing, "test_verification": report,
             "test_recall_at_1": float(_recall_at_1(params, test[0], jnp.asarray(d.y_test)))}
  if val is not None:
    results["val_pair_accuracy"], results["val_verification"], _ = evaluate(params, val)
  return {**results, "train_pairs": n_pairs, "test_pairs": int(test[1].shape[0]),
          "val_pairs": None if val is None else int(val[1].shape[0]), "protocols": {
              "test_pair_accuracy": f"The example's test pairs; 'same': d < {cfg.threshold}.",
              "training": f"Pairing {cfg.pairing!r} over {len(d.y_train)} training images.",
              "validation": val and f"The example's pairs over a held-out {cfg.val_fraction:.0%}."},
          "steps_per_epoch": per_epoch, **run,
          **_finish(workdir, t0, d, {"test pairs": curve}, "MNIST contrastive, test pairs")}


def triplet_loss_fn(rule: str, *, margin: float, normalize: bool, classes_per_batch: int,
                    per_class: int):
  """``loss_fn(params, model_state, data, key)``: a P x K batch drawn from
  ``data["classes"]`` (with replacement), embedded once, the mean of ``MINING[rule]``'s
  per-anchor losses; metric ``active_anchors`` (the fraction with a positive loss)."""
  def loss_fn(params, model_state, data, key):
    k_sample, k_dropout = jax.random.split(key)
    pos_B, labels_B = parallel.shard_batch(sampling.sample_groups(
        k_sample, data["classes"], classes_per_batch, per_class, replace=True))
    emb_BxD = embed(params, data["x"][pos_B], normalize=normalize, train=True, key=k_dropout)
    per_anchor_B = MINING[rule](emb_BxD, labels_B, margin=margin)
    active = jnp.mean((per_anchor_B > 0).astype(jnp.float32))
    return jnp.mean(per_anchor_B), (model_state, {"active_anchors": active})
  return loss_fn


def _triplet_train_and_evaluate(cfg: TripletConfig, workdir, *, progress: bool = True,
                                hooks=(), eval_only: bool = False) -> dict:
  """Trains every rule (``workdir/<rule>/``), chooses on validation, tests once."""
  t0, workdir = time.perf_counter(), Path(workdir)
  rules = (cfg.rules,) if isinstance(cfg.rules, str) else tuple(cfg.rules)
  p, k = cfg.classes_per_batch, cfg.per_class
  if (not rules or len(set(rules)) < len(rules) or not set(rules) <= set(MINING)
      or cfg.select_by not in ("auc", "pair_accuracy") or not 2 <= p <= 10 or k < 2):
    raise ValueError(f"rules must be distinct names among {sorted(MINING)}, select_by 'auc' or "
                     f"'pair_accuracy', classes_per_batch in [2, 10], per_class >= 2; got "
                     f"{cfg.rules!r}, {cfg.select_by!r}, {p}, {k}")
  d, train_pairs, val, test = _setup(cfg)
  sel, y_te = train_pairs if val is None else val, jnp.asarray(d.y_test)
  chosen_on = ("The example's pairs over the training images." if val is None else
               f"The example's pairs over a held-out {cfg.val_fraction:.0%} of training.")
  per_epoch = cfg.steps_per_epoch or max(1, len(d.y_train) // (p * k))
  data = {"x": d.x_train, "classes": sampling.index_table(d.y_train)}
  def eval_fn(state, normalize):
    report = _verify(state["params"], *sel, normalize=normalize)[2]
    return {"val_auc": report["auc"], "val_best_accuracy": report["best_accuracy"]}
  runs, curves = {}, {}
  for rule in rules:
    margin, normalize = MINING_PRESETS[rule]
    margin = margin if cfg.margin is None else cfg.margin
    loss_fn = triplet_loss_fn(rule, margin=margin, normalize=normalize, classes_per_batch=p,
                              per_class=k)
    params, run = _train(cfg, loss_fn, data, workdir / rule, per_epoch,
                         val and functools.partial(eval_fn, normalize=normalize), "images",
                         monitor="val_auc", examples_per_step=p * k, progress=progress,
                         hooks=hooks, desc=f"{triplet.NAME} {rule}", restore_only=eval_only)
    d_sel, similar_sel, report_sel = _verify(params, *sel, normalize=normalize)
    sel_accuracy, score_t = verification.best_threshold_accuracy(-d_sel, similar_sel)
    d_te, similar_te, report = _verify(params, *test, normalize=normalize)
    curves[rule] = (d_te, similar_te)
    recall = _recall_at_1(params, test[0], y_te, normalize=normalize)
    runs[rule] = {
        "mining": rule, "test_pair_accuracy": verification.accuracy_at(-d_te, similar_te, score_t),
        "threshold": -score_t, "selection_pair_accuracy": sel_accuracy,
        "selection_verification": report_sel, "test_best_accuracy": report["best_accuracy"],
        "test_verification": report, "test_recall_at_1": float(recall), "margin": margin,
        "normalize": normalize, **run}
  values = {rule: r["selection_verification"]["auc"] if cfg.select_by == "auc"
            else r["selection_pair_accuracy"] for rule, r in runs.items()}
  best = max(rules, key=values.get)  # ties: the first listed
  def row(r):  # a results dict's figures in the comparison table (a rule's, the contrastive's)
    v = r["test_verification"]
    return {"test_pair_accuracy": r["test_pair_accuracy"], "test_auc": v["auc"],
            "test_eer": v["eer"], "test_recall_at_1": r["test_recall_at_1"],
            "train_time_s": r.get("train_time_s")}
  path = Path(cfg.contrastive_results or _ROOT / "experiments/results/mnist_contrastive.json")
  where = str(path.resolve().relative_to(_ROOT) if path.resolve().is_relative_to(_ROOT) else path)
  table = {rule: row(r) for rule, r in runs.items()}
  with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
    if cfg.contrastive_results != "":
      table["contrastive (Keras example)"] = {**row(json.loads(path.read_text())), "from": where}
  return {"best_mining": best, "test_pair_accuracy": runs[best]["test_pair_accuracy"],
          "selection": {"rule": best, "measure": cfg.select_by,
                        "on": "training" if val is None else "validation", "pairs": chosen_on,
                        "values": values, "thresholds": {r: runs[r]["threshold"] for r in runs}},
          "protocols": {"test_pair_accuracy": "The example's test pairs at the chosen threshold.",
                        "selection": chosen_on,
                        "training": f"P x K = {p} x {k} images a step, {per_epoch} per epoch."},
          "comparison": table, "runs": runs, "test_pairs": int(test[1].shape[0]),
          "selection_pairs": int(sel[1].shape[0]), "batch": {"classes": p, "per_class": k},
          "steps_per_epoch": per_epoch,
          **_finish(workdir, t0, d, curves, "MNIST triplet mining, test pairs")}


def _summary(results: dict) -> str:
  """One line: the headline test figures (every rule's for the triplet recipe), wall time."""
  def rounded(r, *names):
    return {n: round(r["test_verification"]["auc"] if n == "test_auc" else r[n], 4) for n in names}
  r, tests = results, ("test_pair_accuracy", "test_auc", "test_recall_at_1")
  head = ({"pairing": r.get("pairing"), **rounded(r, tests[0], "train_pair_accuracy", *tests[1:])}
          if "runs" not in r else  # the triplet recipe's
          {"best_mining": r["best_mining"], "chosen_by": "{on} {measure}".format(**r["selection"]),
           **rounded(r, tests[0]), "rules": {m: rounded(x, *tests) for m, x in r["runs"].items()}})
  return json.dumps({"preset": r.get("preset"), **head,
                     "wall_time_s": round(r.get("wall_time_s") or 0.0, 1)})


#: The Keras MNIST Siamese example (``experiments/mnist_contrastive.py``).
contrastive = types.SimpleNamespace(
    NAME="mnist_contrastive", Config=ContrastiveConfig, RESUMABLE=frozenset({"epochs"}),
    # An MLP, but its step ran faster with siamjax.xla.FAST_CPU_FLAGS in every round
    # (XNNPACK's small products; benchmarks/results/xla-flags-*.json): set them.
    FAST_CPU=True,
    PRESETS={"default": lambda: ContrastiveConfig(preset="default"),
             "smoke": lambda: ContrastiveConfig(preset="smoke", train_images=2000,
                                                test_images=1000, epochs=2)},
    train_and_evaluate=_contrastive_train_and_evaluate, summary=_summary)

#: Triplet mining on the example's tower (``experiments/mnist_triplet.py``).
triplet = types.SimpleNamespace(
    NAME="mnist_triplet", RESUMABLE=frozenset({"epochs", "contrastive_results"}),
    # The same MLP with a batch-all triplet loss: no faster with the flags (0.94-1.06x over five
    # rounds; the in-batch losses run slower with them), so XLA's own CPU flags.
    FAST_CPU=False,
    PRESETS={"default": lambda: TripletConfig(preset="default"),
             "smoke": lambda: TripletConfig(preset="smoke", train_images=2000, test_images=1000,
                                            epochs=2, steps_per_epoch=10, contrastive_results="")},
    Config=TripletConfig, train_and_evaluate=_triplet_train_and_evaluate, summary=_summary)


def _digit(im, where: str) -> np.ndarray:
  """One digit image file as MNIST's ``[28, 28]`` uint8 (white digit on black)."""
  if im.mode not in ("L", "1"):
    raise ValueError(f"{where}: a mode {im.mode} image; the model reads greyscale digits "
                     f"(mode L), white on black, as MNIST's are")
  if im.size != (28, 28):
    raise ValueError(f"{where}: {im.size[0]}x{im.size[1]} pixels; the model reads 28x28 "
                     f"digits (MNIST's size): resize it first")
  return np.asarray(im.convert("L"), np.uint8)


def load_model(config: dict, workdir, *, which: str = "best",
               variant: str | None = None, recipe=None) -> inference.Model:
  """The tower of an ``mnist_contrastive`` or ``mnist_triplet`` work directory.

  Inputs are ``28x28`` greyscale digits, white on black (PNG files, or MNIST's own
  ``[28, 28]`` uint8 arrays); the comparison is the Euclidean distance of the
  embeddings (unit-length for the rules that train on them). ``mnist_triplet`` trains one
  tower per mining rule: ``variant`` names it (default: the rule its results chose).
  Both recipes score their final parameters, so ``which="best"`` reads the latest
  checkpoint, as ``"latest"`` does.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = Path(workdir)
  if recipe is contrastive:
    if variant:
      raise ValueError(f"{contrastive.NAME} trains one model per work directory: pass no "
                       f"variant")
    cfg, folder, normalize = cli.config_from_dict(ContrastiveConfig, config), workdir, False
  else:
    cfg = cli.config_from_dict(TripletConfig, config)
    rules = (cfg.rules,) if isinstance(cfg.rules, str) else tuple(cfg.rules)
    if variant is None:
      done = json.loads((workdir / "results.json").read_text()) if (
          workdir / "results.json").is_file() else {}
      variant = done.get("best_mining") or rules[0]
    if variant not in rules:
      raise ValueError(f"variant must be one of the run's rules {list(rules)}, got {variant!r}")
    folder, normalize = workdir / variant, MINING_PRESETS[variant][1]
  # Both recipes score their final parameters: "best" is the latest checkpoint here.
  params, _, step, kind = train.restore_variables(folder, which="latest")
  name = recipe.NAME
  describe = {"input": "28x28 greyscale digit, white on black (PNG mode L)",
              "array": "[N, 28, 28] uint8", "network_input": "scaled to [0, 1]"
              + (", embedding scaled to unit length" if normalize else "")}
  return inference.Model(
      recipe=name, variant=None if recipe is contrastive else variant, workdir=workdir,
      step=step, checkpoint=kind, variables=params,
      apply=functools.partial(embed, normalize=normalize), metric=Metric("euclidean"),
      inputs=inference.Inputs("image", (28, 28), "uint8", describe),
      prepare=functools.partial(inference.image_batch, shape=(28, 28), decode=_digit),
      batch_size=4096, info={"normalize": normalize})


inference.register_loader(contrastive.NAME)(functools.partial(load_model, recipe=contrastive))
inference.register_loader(triplet.NAME)(functools.partial(load_model, recipe=triplet))
