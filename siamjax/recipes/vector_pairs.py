"""Siamese heads over a CSV of vector pairs: Euclidean + contrastive, and L1 + linear + BCE.

:func:`train_and_evaluate` reads a CSV whose rows hold a left vector, a right vector and
a 0/1 label (:func:`siamjax.data.folders.load_vector_pairs_csv`; ``csv`` is read from
``data_dir`` when it is a relative path, or ``generate`` rows of a synthetic CSV are
written to ``workdir/pairs.csv`` first) and, for each head (:func:`train_head`):

1. splits the rows 70/15/15 into train / validation / test
   (:func:`siamjax.data.splits.split_indices`, by ``seed``) and standardises the
   features with the training rows' mean and deviation (left and right together: one
   encoder reads both);
2. trains one shared :class:`siamjax.encoders.MLP` over both vectors with Adam through
   :func:`siamjax.train.run`, each epoch one shuffled pass over the training rows
   (:func:`siamjax.sampling.epoch_batches`), one epoch per jitted call. Heads:
   ``"contrastive"``: Euclidean distance and :func:`siamjax.losses.contrastive_loss`;
   ``"bce"``: ``|h1 - h2|``, one linear unit and :func:`siamjax.losses.pair_bce_loss`
   (:class:`siamjax.models.SiameseNet`);
3. early-stops on the validation loss (``patience`` epochs without a lower one) and
   restores the best checkpoint (:func:`siamjax.train.restore_best`);
4. chooses the accept threshold with the best accuracy on the validation pairs and
   applies it once to the test pairs; the test ROC (AUC, EER) needs no threshold.

``head="both"`` trains the two heads one after the other, each a run of its own in
``workdir/contrastive/`` and ``workdir/bce/`` (a single head runs in
``workdir/<head>/`` too), so a killed run resumes in the head it was in. Training
losses per epoch are in each head's ``metrics.jsonl``; ``roc.png`` shows both heads'
test ROC curves.
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

from siamjax import distances, encoders, losses, models, parallel, sampling, train
from siamjax.data import folders, splits
from siamjax.evaluation import verification

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "HEADS", "PairModel", "load_pairs",
           "train_head", "train_and_evaluate", "summary"]

NAME = "vector_pairs"
# How long it trains and how often it saves, not what it computes up to a given epoch.
RESUMABLE = frozenset({"epochs", "checkpoint_every"})
HEADS = ("contrastive", "bce")


@dataclasses.dataclass
class Config:
  """Every knob of the recipe."""

  seed: int = 0  # the split, the initialisation, the shuffles, the dropout, a generated CSV
  devices: int = 1  # data-parallel devices (batch_size must divide evenly)
  data_dir: str | None = None  # the folder a relative csv is read from (default: cwd)
  # The pairs: a CSV file, or the rows of a synthetic one to write into the workdir.
  csv: str | None = None
  generate: int = 0
  left_columns: int = 200
  right_columns: int = 200  # 0: every column after the left vector but the label
  label_column: int = -1  # -1: the last column
  # Model and training.
  head: str = "both"  # "contrastive", "bce" or "both"
  hidden: tuple[int, ...] = (128, 128, 64)  # MLP widths; the last is the embedding's
  dropout_rate: float = 0.1
  margin: float = 1.0  # contrastive head
  learning_rate: float = 1e-3
  batch_size: int = 128
  epochs: int = 100  # at most
  patience: int = 5  # epochs without a lower validation loss before stopping
  fractions: tuple[float, float] = (0.7, 0.15)  # train and validation; the rest is test
  checkpoint_every: int = 5  # epochs


PRESETS = {
    "default": Config,
    # A 600-row CSV written into the workdir; 4 epochs of 3 steps, a checkpoint each.
    "smoke": lambda: Config(generate=600, epochs=4, checkpoint_every=1),
}


class PairModel:
  """The shared MLP and one head, as pure functions of the parameters.

  ``scores(params, a, b, train=..., key=...)`` gives ``[P]`` pair scores, higher = more
  alike: the negated Euclidean distance (``"contrastive"``) or the logit (``"bce"``);
  ``loss(scores, similar)`` the per-pair loss of that head.
  """

  def __init__(self, head: str, cfg: Config):
    if head not in HEADS:
      raise ValueError(f"head must be 'contrastive', 'bce' or 'both', got {head!r}")
    self.head, self.margin = head, cfg.margin
    encoder = encoders.MLP(features=tuple(cfg.hidden), dropout_rate=cfg.dropout_rate)
    self.net = models.SiameseNet(encoder=encoder) if head == "bce" else encoder

  def init(self, key, a, b):
    return (self.net.init(key, a, b) if self.head == "bce" else self.net.init(key, a))["params"]

  def scores(self, params, a_PxD, b_PxD, *, train=False, key=None):
    kw = {"train": train, "rngs": {"dropout": key} if train else None}
    if self.head == "bce":
      return self.net.apply({"params": params}, a_PxD, b_PxD, **kw)
    h = self.net.apply({"params": params}, jnp.concatenate([a_PxD, b_PxD]), **kw)
    return -distances.euclidean(h[:a_PxD.shape[0]], h[a_PxD.shape[0]:])

  def loss(self, scores_P, similar_P):
    if self.head == "bce":
      return losses.pair_bce_loss(scores_P, similar_P)
    return losses.contrastive_loss(-scores_P, similar_P, margin=self.margin)


def load_pairs(cfg: Config, workdir) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
  """``(left [P, L], right [P, R], similar [P], csv path)`` of ``cfg``'s pairs.

  With ``cfg.generate`` rows, writes a synthetic CSV (:func:`siamjax.data.folders.
  write_synthetic_vector_pairs_csv`, seeded by ``cfg.seed``) to ``workdir/pairs.csv``
  first; else reads ``cfg.csv`` (relative to ``cfg.data_dir`` when that is given).

  Raises:
    ValueError: neither or both of ``csv`` and ``generate``, or a bad CSV (naming its line).
  """
  if bool(cfg.csv) == bool(cfg.generate):
    raise ValueError("csv / generate: pass one of --csv FILE and --generate ROWS (or --smoke)"
                     + (f", not both (got {cfg.csv!r} and {cfg.generate})" if cfg.csv else ""))
  if cfg.generate:
    if cfg.generate < 2:
      raise ValueError(f"generate must be >= 2 rows, got {cfg.generate}")
    path = Path(workdir) / "pairs.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    folders.write_synthetic_vector_pairs_csv(
        path, cfg.generate, left_columns=cfg.left_columns,
        right_columns=cfg.right_columns or cfg.left_columns, seed=cfg.seed)
  else:
    path = Path(cfg.csv)
    if cfg.data_dir and not path.is_absolute():
      path = Path(cfg.data_dir) / path
  left, right, similar = folders.load_vector_pairs_csv(
      path, left_columns=cfg.left_columns, right_columns=cfg.right_columns or None,
      label_column=cfg.label_column)
  return left, right, similar, path


def train_head(left, right, similar, cfg: Config, head: str, workdir, *,
               progress: bool = True, hooks=(), eval_only: bool = False
               ) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
  """Trains (or, with ``eval_only``, restores) one head in ``workdir``; evaluates it.

  Args:
    left, right: ``[P, D]`` feature vectors (one shared encoder: the same width).
    similar: ``[P]`` 0/1 labels (1 = same class).
    cfg: the :class:`Config` (its ``head`` is ignored).
    head: ``"contrastive"`` or ``"bce"``.
    workdir: this head's run folder (checkpoints, ``metrics.jsonl``).
    progress, hooks: passed to :func:`siamjax.train.fit`.
    eval_only: evaluate the checkpoints already in ``workdir``.

  Returns:
    ``(results, (test distances, test labels))``: ``results`` holds
    ``val_best_accuracy`` and ``val_best_threshold`` (a score: a negated distance or a
    logit; "same" when ``score >= threshold``), ``test_accuracy`` at that threshold,
    ``test_verification`` (threshold-free ROC figures of the test pairs; its
    ``best_*`` entries are the test pairs' own optimum, for reference only), the
    evaluated checkpoint's ``val_loss``, ``epochs_run``, ``best_epoch``, ``history``
    (validation loss per epoch); the second item is for the ROC plot.

  Raises:
    ValueError: mismatched shapes, an unknown head, or a batch that does not fit.
  """
  left, right = np.asarray(left, np.float32), np.asarray(right, np.float32)
  similar = np.asarray(similar)
  if left.ndim != 2 or left.shape != right.shape:
    raise ValueError(f"left and right must be [P, D] with the same shape (one shared "
                     f"encoder), got {left.shape} and {right.shape}")
  if similar.shape != (left.shape[0],):
    raise ValueError(f"similar must be [P] = [{left.shape[0]}], got {similar.shape}")
  model = PairModel(head, cfg)
  tr, va, te = splits.split_indices(left.shape[0], tuple(cfg.fractions), cfg.seed)
  if not 1 <= cfg.batch_size <= tr.size:
    raise ValueError(f"batch_size must be in [1, {tr.size}] (the training rows), got "
                     f"{cfg.batch_size}")
  if cfg.batch_size % cfg.devices:
    raise ValueError(f"batch_size={cfg.batch_size} must be divisible by devices={cfg.devices}")
  both = np.concatenate([left[tr], right[tr]])
  mean, std = both.mean(0), both.std(0) + 1e-6

  def part(rows):
    return {"a": (left[rows] - mean) / std, "b": (right[rows] - mean) / std,
            "similar": similar[rows].astype(np.float32)}

  data, val, test = part(tr), jax.device_put(part(va)), jax.device_put(part(te))
  steps_per_epoch = tr.size // cfg.batch_size
  n_train, batch = int(tr.size), cfg.batch_size

  def prepare(data, key, step, num_steps):
    return sampling.epoch_batches(key, n_train, batch, step, num_steps)

  def loss_fn(params, model_state, data, key, rows_B):
    rows_B = parallel.shard_batch(rows_B)
    s = model.scores(params, data["a"][rows_B], data["b"][rows_B], train=True, key=key)
    return jnp.mean(model.loss(s, data["similar"][rows_B])), (model_state, {})

  @jax.jit
  def scores(params, split):
    return model.scores(params, split["a"], split["b"])

  @jax.jit
  def mean_loss(params, split):
    return jnp.mean(model.loss(model.scores(params, split["a"], split["b"]), split["similar"]))

  def eval_fn(state):
    return {"val_loss": float(mean_loss(state["params"], val))}

  k_init, k_run = jax.random.split(jax.random.key(cfg.seed))
  optimizer = optax.adam(cfg.learning_rate)
  params = jax.jit(model.init)(k_init, data["a"][:1], data["b"][:1])
  workdir = Path(workdir)
  t0 = time.perf_counter()
  state, fit = train.run(
      loss_fn, optimizer, train.init_state(params, optimizer, key=k_run), data,
      num_steps=cfg.epochs * steps_per_epoch, steps_per_call=steps_per_epoch,
      prepare=prepare, devices=cfg.devices, eval_fn=eval_fn, eval_every=steps_per_epoch,
      monitor="val_loss", mode="min", patience=cfg.patience,
      checkpoint_every=cfg.checkpoint_every * steps_per_epoch, workdir=workdir,
      examples_per_step=batch, progress=progress, hooks=hooks, unit="pairs", desc=head,
      restore_only=eval_only)
  session_time = time.perf_counter() - t0
  best = train.restore_best(workdir, state)
  final = best if best is not None else state
  s_val = np.asarray(scores(final["params"], val))
  s_te = np.asarray(scores(final["params"], test))
  val_acc, val_t = verification.best_threshold_accuracy(s_val, similar[va])
  history = [{"epoch": h["step"] // steps_per_epoch, "step": h["step"],
              "val_loss": h["val_loss"]} for h in fit["history"]]
  results = {
      "head": head,
      "val_best_accuracy": val_acc,
      "val_best_threshold": val_t,
      "test_accuracy": verification.accuracy_at(s_te, similar[te], val_t),
      "test_verification": verification.verification_report(-s_te, similar[te]),
      "threshold_units": {
          "val_best_threshold": ("negated distance (same when -distance >= threshold)"
                                 if head == "contrastive" else
                                 "logit (same when logit >= threshold)"),
          "test_verification": ("distance (same when distance <= threshold)"
                                if head == "contrastive" else
                                "negated logit (same when -logit <= threshold)")},
      "val_loss": float(mean_loss(final["params"], val)),
      "evaluated_checkpoint": "best" if best is not None else "final",
      "rows": {"train": int(tr.size), "val": int(va.size), "test": int(te.size)},
      "epochs_run": fit["steps"] // steps_per_epoch,
      "best_epoch": fit["best_step"] // steps_per_epoch if fit["best_step"] >= 0 else None,
      "stopped_early": fit["stopped_early"],
      "steps_per_epoch": steps_per_epoch,
      "train_time_s": fit["train_time_s"], "session_time_s": session_time,
      "compile_time_s": fit["compile_time_s"], "pairs_per_s": fit["examples_per_s"],
      "final_loss": fit["final_loss"],
      "history": history,
  }
  return results, (-s_te, similar[te])


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Trains and evaluates ``cfg.head`` (or both heads); writes ``roc.png``; the results.

  Returns:
    ``{"csv", "synthetic", "pairs", "heads": {head: train_head's results}, "plots"}``.
  """
  if cfg.head not in HEADS + ("both",):
    raise ValueError(f"head must be 'contrastive', 'bce' or 'both', got {cfg.head!r}")
  workdir = Path(workdir)
  left, right, similar, path = load_pairs(cfg, workdir)
  heads = HEADS if cfg.head == "both" else (cfg.head,)
  per_head, curves = {}, {}
  for head in heads:
    per_head[head], curves[f"{head} (test)"] = train_head(
        left, right, similar, cfg, head, workdir / head, progress=progress, hooks=hooks,
        eval_only=eval_only)
  plots = []
  if jax.process_index() == 0:
    try:
      verification.save_roc_png(workdir / "roc.png", curves, title="vector pairs, test")
      plots.append("roc.png")
    except ImportError:
      pass
  return {"csv": path.name, "synthetic": bool(cfg.generate), "pairs": int(len(similar)),
          "heads": per_head, "plots": plots}


def summary(results: dict) -> str:
  """One line: each head's test accuracy and AUC, and the wall time."""
  heads = {h: {"test_accuracy": round(r["test_accuracy"], 4),
               "auc": round(r["test_verification"]["auc"], 4)}
           for h, r in results["heads"].items()}
  return json.dumps({"preset": results.get("preset"), "heads": heads,
                     "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})
