"""Siamese heads over a CSV of vector pairs: Euclidean + contrastive, and L1 + linear + BCE.

:func:`train_and_evaluate` reads rows of a left vector, a right vector and a 0/1 label
(:func:`load_pairs`) and, for each head, :func:`train_head`:

1. splits the rows 70/15/15 into train / validation / test (by ``seed``) and standardises
   the features with the training rows' mean and deviation (left and right together);
2. trains one shared :class:`siamjax.encoders.MLP` with Adam through
   :func:`siamjax.train.run`, an epoch (one shuffled pass over the training rows,
   :func:`siamjax.sampling.epoch_batches`) per jitted call. ``"contrastive"``: Euclidean
   distance and :func:`siamjax.losses.contrastive_loss`; ``"bce"``: ``|h1 - h2|``, one
   linear unit and :func:`siamjax.losses.pair_bce_loss` (:class:`siamjax.models.SiameseNet`);
3. early-stops on the validation loss (``patience`` epochs without a lower one), restores
   the best checkpoint, and applies the threshold of best validation accuracy once to the
   test pairs; the test ROC (AUC, EER) needs no threshold.

``head="both"`` trains the heads one after the other, each a run of its own in
``workdir/<head>/``; ``roc.png`` shows their test ROC curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import (distances, encoders, inference, losses, models, parallel, plotting,
                     sampling, train)
from siamjax import results as results_lib
from siamjax.data import folders, splits
from siamjax.evaluation import verification
from siamjax.index import Metric
from siamjax.recipes import cli

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "HEADS", "load_pairs", "train_head",
           "train_and_evaluate", "summary", "load_model", "STANDARDIZE_FILE"]

NAME = "vector_pairs"
# An MLP, but its step ran faster with siamjax.xla.FAST_CPU_FLAGS in every round
# (XNNPACK's small products; benchmarks/results/xla-flags-*.json): set them.
FAST_CPU = True
RESUMABLE = frozenset({"epochs", "checkpoint_every"})  # how long it trains, how often it saves
HEADS = ("contrastive", "bce")
#: Each head's folder keeps the training rows' feature means and deviations here.
STANDARDIZE_FILE = "standardize.json"


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
  header: bool | None = None  # --header / --no-header; None: a first row of names is one
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


def load_pairs(cfg: Config, workdir) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
  """``(left [P, L], right [P, R], similar [P], csv path)`` of ``cfg``'s pairs.

  Writes ``cfg.generate`` synthetic rows (seeded by ``cfg.seed``) to ``workdir/pairs.csv``
  first, or reads ``cfg.csv`` (relative to ``cfg.data_dir`` when that is given).

  Raises:
    ValueError: neither or both of ``csv`` and ``generate``, or a bad CSV (naming its line).
  """
  if bool(cfg.csv) == bool(cfg.generate) or cfg.generate < 0:
    raise ValueError("csv / generate: pass one of --csv FILE and --generate ROWS (or --smoke)"
                     + (f", not both (got {cfg.csv!r} and {cfg.generate})" if cfg.csv else ""))
  path = Path(workdir) / "pairs.csv" if cfg.generate else Path(cfg.data_dir or "") / cfg.csv
  if cfg.generate:
    path.parent.mkdir(parents=True, exist_ok=True)
    folders.write_synthetic_vector_pairs_csv(
        path, cfg.generate, left_columns=cfg.left_columns,
        right_columns=cfg.right_columns or cfg.left_columns, seed=cfg.seed)
  return (*folders.load_vector_pairs_csv(path, left_columns=cfg.left_columns,
                                         right_columns=cfg.right_columns or None,
                                         label_column=cfg.label_column,
                                         header=cfg.header), path)


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
    ``(results, (test distances, test labels))``, the latter for the ROC plot. ``results``:
    ``val_best_accuracy``, ``val_best_threshold`` ("same" when ``score >= threshold``, a
    score being -distance or a logit), ``test_accuracy`` at it, ``test_verification`` (ROC
    figures of ``-score``; its ``best_*`` are the test pairs' own optimum), the evaluated
    checkpoint's ``val_loss``, ``epochs_run``, ``best_epoch``, ``history`` (per epoch).

  Raises:
    ValueError: mismatched shapes, an unknown head, a split without both labels, or a
      batch that does not fit.
  """
  left, right = np.asarray(left, np.float32), np.asarray(right, np.float32)
  similar = np.asarray(similar)
  if left.ndim != 2 or left.shape != right.shape or similar.shape != left.shape[:1]:
    raise ValueError(f"left and right must be [P, D] (one shared encoder) and similar [P], "
                     f"got {left.shape}, {right.shape} and {similar.shape}")
  if head not in HEADS:
    raise ValueError(f"head must be 'contrastive', 'bce' or 'both', got {head!r}")
  tr, va, te = splits.split_indices(left.shape[0], tuple(cfg.fractions), cfg.seed)
  for part, rows in (("training", tr), ("validation", va), ("test", te)):  # before training
    if np.unique(similar[rows]).size < 2:
      raise ValueError(f"similar: the {rows.size} {part} rows (of {similar.size}, split by "
                       f"fractions={tuple(cfg.fractions)}) hold only label "
                       f"{int(similar[rows][0])}; every split needs both labels: pass more "
                       f"rows of each label")
  if not 1 <= cfg.batch_size <= tr.size or cfg.batch_size % cfg.devices:
    raise ValueError(f"batch_size must be in [1, {tr.size}] (the training rows) and divisible "
                     f"by devices={cfg.devices}, got {cfg.batch_size}")
  both = np.concatenate([left[tr], right[tr]])
  mean, std = both.mean(0), both.std(0) + 1e-6
  if jax.process_index() == 0:  # what a loaded model standardises new vectors with
    results_lib.write_json(Path(workdir) / STANDARDIZE_FILE,
                           {"mean": mean.tolist(), "std": std.tolist()})
  z = {"a": (left - mean) / std, "b": (right - mean) / std, "similar": similar.astype(np.float32)}
  data, val, test = ({k: v[rows] for k, v in z.items()} for rows in (tr, va, te))
  val, test = jax.device_put((val, test))
  steps_per_epoch, bce = tr.size // cfg.batch_size, head == "bce"
  encoder = encoders.MLP(features=tuple(cfg.hidden), dropout_rate=cfg.dropout_rate)
  net = models.SiameseNet(encoder=encoder) if bce else encoder

  def scores(params, split, key=None):
    """``[P]`` pair scores, higher = more alike: the negated distance or the logit."""
    kw = {"train": key is not None, "rngs": None if key is None else {"dropout": key}}
    if bce:
      return net.apply({"params": params}, split["a"], split["b"], **kw)
    h = net.apply({"params": params}, jnp.concatenate([split["a"], split["b"]]), **kw)
    return -distances.euclidean(h[:split["a"].shape[0]], h[split["a"].shape[0]:])

  def mean_loss(params, split, key=None):
    s, y = scores(params, split, key), split["similar"]
    return jnp.mean(losses.pair_bce_loss(s, y) if bce else
                    losses.contrastive_loss(-s, y, margin=cfg.margin))

  def loss_fn(params, model_state, data, key, rows_B):
    rows_B = parallel.shard_batch(rows_B)
    return mean_loss(params, {k: v[rows_B] for k, v in data.items()}, key), (model_state, {})

  scores_jit, mean_loss_jit = jax.jit(scores), jax.jit(mean_loss)
  k_init, k_run = jax.random.split(jax.random.key(cfg.seed))
  optimizer = optax.adam(cfg.learning_rate)
  params = jax.jit(net.init)(k_init, data["a"][:1],
                             *([data["b"][:1]] if bce else []))["params"]
  t0 = time.perf_counter()
  state, fit = train.run(
      loss_fn, optimizer, train.init_state(params, optimizer, key=k_run), data,
      num_steps=cfg.epochs * steps_per_epoch, steps_per_call=steps_per_epoch,
      prepare=lambda _, k, step, n: sampling.epoch_batches(k, tr.size, cfg.batch_size, step, n),
      devices=cfg.devices, eval_every=steps_per_epoch, monitor="val_loss", mode="min",
      eval_fn=lambda state: {"val_loss": float(mean_loss_jit(state["params"], val))},
      patience=cfg.patience, checkpoint_every=cfg.checkpoint_every * steps_per_epoch,
      workdir=workdir, examples_per_step=cfg.batch_size, progress=progress, hooks=hooks,
      unit="pairs", desc=head, restore_only=eval_only)
  session_time = time.perf_counter() - t0
  best = train.restore_best(workdir, state)
  final = best if best is not None else state
  s_val, s_te = (np.asarray(scores_jit(final["params"], s)) for s in (val, test))
  val_acc, val_t = verification.best_threshold_accuracy(s_val, similar[va])
  return {
      "val_best_accuracy": val_acc, "val_best_threshold": val_t,
      "test_accuracy": verification.accuracy_at(s_te, similar[te], val_t),
      "test_verification": verification.verification_report(-s_te, similar[te]),
      "threshold_units": {"val_best_threshold": "logit" if bce else "negated distance",
                          "test_verification": "negated logit" if bce else "distance"},
      "val_loss": float(mean_loss_jit(final["params"], val)), "final_loss": fit["final_loss"],
      "evaluated_checkpoint": "best" if best is not None else "final",
      "rows": {"train": int(tr.size), "val": int(va.size), "test": int(te.size)},
      "epochs_run": fit["steps"] // steps_per_epoch,
      "best_epoch": fit["best_step"] // steps_per_epoch if fit["best_step"] >= 0 else None,
      "stopped_early": fit["stopped_early"], "steps_per_epoch": steps_per_epoch,
      "train_time_s": fit["train_time_s"], "session_time_s": session_time,
      "compile_time_s": fit["compile_time_s"], "pairs_per_s": fit["examples_per_s"],
      "history": [{"epoch": h["step"] // steps_per_epoch, "step": h["step"],
                   "val_loss": h["val_loss"]} for h in fit["history"]],
  }, (-s_te, similar[te])


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Trains and evaluates ``cfg.head`` (or both heads); writes ``roc.png``; the results.

  Returns:
    ``{"csv", "synthetic", "pairs", "heads": {head: train_head's results}, "plots"}``.
  """
  workdir = Path(workdir)
  left, right, similar, path = load_pairs(cfg, workdir)
  per_head, curves = {}, {}
  for head in HEADS if cfg.head == "both" else (cfg.head,):
    per_head[head], curves[f"{head} (test)"] = train_head(
        left, right, similar, cfg, head, workdir / head, progress=progress, hooks=hooks,
        eval_only=eval_only)
  plots = []
  with contextlib.suppress(ImportError):  # no matplotlib: no plot
    if jax.process_index() == 0:
      plotting.save_roc_png(workdir / "roc.png", curves, title="vector pairs, test")
      plots.append("roc.png")
  return {"csv": path.name, "synthetic": bool(cfg.generate), "pairs": int(len(similar)),
          "heads": per_head, "plots": plots}


def summary(results: dict) -> str:
  """One line: each head's test accuracy and AUC, and the wall time."""
  heads = {h: {"test_accuracy": round(r["test_accuracy"], 4),
               "auc": round(r["test_verification"]["auc"], 4)}
           for h, r in results["heads"].items()}
  return json.dumps({"preset": results.get("preset"), "heads": heads,
                     "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})


@inference.register_loader(NAME)
def load_model(config: dict, workdir, *, which: str = "best",
               variant: str | None = None) -> inference.Model:
  """One head's network of a ``vector_pairs`` work directory (``variant``: ``"bce"`` or
  ``"contrastive"``; default: the one with the better validation accuracy in the run's
  results, else the one trained).

  Inputs are feature vectors ``[N, D]`` (one side of a pair), standardised with the
  training rows' means and deviations as in training;
  :meth:`siamjax.inference.Model.read_pairs` splits a CSV of pairs into its two sides with the run's column layout. The comparison is the
  Euclidean distance (``"contrastive"``) or the pair head's probability (``"bce"``).
  """
  cfg = cli.config_from_dict(Config, config)
  workdir = Path(workdir)
  trained = HEADS if cfg.head == "both" else (cfg.head,)
  if variant is None:
    done = results_lib.read_results(workdir) or {}
    heads = {h: r.get("val_best_accuracy", -1.0) for h, r in done.get("heads", {}).items()}
    variant = max(heads, key=heads.get) if heads else trained[-1]
  if variant not in trained:
    raise ValueError(f"variant must be one of the run's heads {list(trained)}, got {variant!r}")
  folder = workdir / variant
  params, _, step, kind = train.restore_variables(folder, which=which)
  stats_path = folder / STANDARDIZE_FILE
  if not stats_path.is_file():
    raise train.RunError(f"{folder} has no {STANDARDIZE_FILE} (a run of an older siamjax): "
                         f"re-run its command with --eval-only to write it")
  stats = json.loads(stats_path.read_text())
  mean, std = (np.asarray(stats[k], np.float32) for k in ("mean", "std"))
  width = mean.shape[0]
  encoder = encoders.MLP(features=tuple(cfg.hidden), dropout_rate=cfg.dropout_rate)
  bce = variant == "bce"
  net = models.SiameseNet(encoder=encoder) if bce else encoder

  def apply(variables, z):
    return net.apply(variables, z, method=net.embed) if bce else net.apply(variables, z)

  def prepare(raw):
    x = np.asarray(raw, np.float32)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != width:
      raise ValueError(f"vectors must be [N, {width}] (one side of a pair, as in training), "
                       f"got shape {np.shape(raw)}")
    if not np.all(np.isfinite(x)):
      raise ValueError("vectors must be finite (found NaN or inf)")
    return (x - mean) / std

  def read_pairs(path):
    left, right, similar = folders.load_vector_pairs_csv(
        path, left_columns=cfg.left_columns, right_columns=cfg.right_columns or None,
        label_column=cfg.label_column, header=cfg.header)
    return prepare(left), prepare(right), np.asarray(similar)

  describe = {"input": f"a vector of {width} numbers (one side of a pair)",
              "array": f"[N, {width}] float32",
              "network_input": "standardised: (x - mean) / std with the training rows' "
                               "statistics (left and right sides together)",
              "mean": mean.tolist(), "std": std.tolist()}
  return inference.Model(
      recipe=NAME, variant=variant, workdir=workdir, step=step, checkpoint=kind,
      variables={"params": params}, apply=apply,
      metric=inference.head_metric(params) if bce else Metric("euclidean"),
      inputs=inference.Inputs("vectors", (width,), "float32", describe), prepare=prepare,
      read_pairs=read_pairs, batch_size=4096)
