"""Learning curves of finished Omniglot (Koch) work directories, collected into one figure.

``python experiments/omniglot_koch.py --learning-curve OUT.json WORKDIR [WORKDIR ...]``
calls :func:`collect`: each work directory's ``metrics.jsonl`` (training loss and the
validation accuracy against pairs seen) and ``results.json`` (Lake accuracy, throughput,
the machine's load) become one results JSON (through :mod:`siamjax.results`) with a PNG
beside it, plus the GPU plan that the ``paper_fast`` preset is sized for.
(experiments/results/omniglot_koch_learning_curve.json was made this way.)

``python experiments/omniglot_koch.py --compare OUT.json WORKDIR [WORKDIR ...]`` calls
:func:`compare`: runs of any preset side by side, each with what its config changes
against the first run, its best validation accuracy, its wall time and, where it was
scored, its Lake accuracy; the mean over the scored runs (seeds of one config); a PNG of
the validation curves beside it. The ablation table and the seeds file of the default
CPU preset are made this way.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from siamjax import plotting, train
from siamjax import results as results_lib
from siamjax.recipes import cli

# What the paper_fast preset is sized for (see siamjax.recipes.omniglot_koch.PRESETS):
FLOPS_PER_TRAINING_PAIR = 10.9e9  # Koch net forward + backward, both images of the pair
H200_BF16_FLOPS = 790e12          # dense bf16 matmul peak
PLANNED_FRACTION = 0.30           # of that peak, for a conv net of this size
COMPILE_S_ASSUMED = 30.0


def _finished(workdir: Path) -> tuple[dict, list[dict]]:
  """A finished work directory's ``results.json`` and ``metrics.jsonl`` records."""
  res = results_lib.read_results(workdir)
  if res is None:
    raise ValueError(f"workdirs: {workdir} holds no results.json (train it first)")
  recs = train.read_metrics(workdir)
  if not recs:
    raise ValueError(f"workdirs: {workdir} holds no metrics.jsonl")
  return res, recs


def _run(workdir: Path) -> dict:
  res, recs = _finished(workdir)
  cfg = res["config"]
  per_step = cfg["batch_pairs"]
  return {
      "name": workdir.name, "command": res["command"],
      "recipe": {k: cfg.get(k) for k in ("preset", "optimizer", "learning_rate",
                                         "lr_schedule", "warmup_steps", "num_steps",
                                         "batch_pairs", "dtype", "train_drawers",
                                         "within_alphabet")},
      "validation": [{"step": r["step"], "pairs_seen": r["step"] * per_step,
                      "val_accuracy": r["val_accuracy"]} for r in recs if r["kind"] == "eval"],
      "train_loss": [{"pairs_seen": r["step"] * per_step, "loss": r["loss"]} for r in recs
                     if r["kind"] == "train"],
      "lake_20way_accuracy": res["lake_20way_accuracy"],
      "lake_20way_ci95": res["lake_20way_ci95"],
      "evaluated_checkpoint_step": res["validation_best_step"],
      "pairs_per_s": res["pairs_per_s"], "train_time_s": res["train_time_s"],
      "steps": res["steps"], "end": res["end"],
      "machine_load": [res["machine"]["load_average_at_start"],
                       res["machine"]["load_average_at_end"]]}


def gpu_plan(paper_fast, cpu_pairs_seen_max: int) -> dict:
  """The throughput ``paper_fast`` assumes on an H200, next to what the CPU runs reached."""
  rate = PLANNED_FRACTION * H200_BF16_FLOPS / FLOPS_PER_TRAINING_PAIR
  return {"flops_per_training_pair": FLOPS_PER_TRAINING_PAIR,
          "h200_bf16_matmul_tflops": H200_BF16_FLOPS / 1e12,
          "pairs_per_s_at_100pct": H200_BF16_FLOPS / FLOPS_PER_TRAINING_PAIR,
          "planned_fraction_of_peak": PLANNED_FRACTION, "planned_pairs_per_s": rate,
          "train_time_limit_s": paper_fast.train_time_limit_s,
          "compile_s_assumed": COMPILE_S_ASSUMED,
          "pairs_in_budget": rate * (paper_fast.train_time_limit_s - COMPILE_S_ASSUMED),
          "paper_fast_pairs": paper_fast.num_steps * paper_fast.batch_pairs,
          "paper_fast_steps": paper_fast.num_steps,
          "paper_fast_batch_pairs": paper_fast.batch_pairs,
          "cpu_pairs_seen_max": cpu_pairs_seen_max}


def collect(out: str, workdirs: list[str], *, paper_fast) -> Path:
  """Writes ``out`` (JSON) and the PNG beside it from finished ``workdirs``; returns the path.

  Args:
    out: the results file to write (its folder is created).
    workdirs: finished Omniglot work directories (``results.json`` and ``metrics.jsonl``).
    paper_fast: the ``paper_fast`` preset's config, for the GPU plan.

  Raises:
    ValueError: a work directory is not finished (one line naming it).
  """
  if not workdirs:
    raise ValueError("workdirs: pass at least one finished work directory")
  runs = [_run(Path(w)) for w in workdirs]
  plan = gpu_plan(paper_fast, max(r["steps"] * r["recipe"]["batch_pairs"] for r in runs))
  path = results_lib.write_results(Path(out).parent, {
      "figure": "Koch network learning curves at reduced budgets on the CPU",
      "note": "Each run: the same network and loss as paper_fast, float32 on the CPU, "
              "validation (400 within-alphabet trials on evaluation alphabets outside "
              "Lake's runs) every 60 steps, a 420 s training limit; the load average "
              "beside each run says how many other processes shared its 2 cores. The "
              "GPU plan below is what paper_fast is sized for (unmeasured).",
      "gpu_plan": plan, "runs": runs}, name=Path(out).name)
  plotting.save_learning_curves_png(runs, path.with_suffix(".png"))
  return path


def _compared(workdir: Path, first: dict | None, defaults: dict) -> dict:
  res, recs = _finished(workdir)
  # A field a run's config lacks (added to Config after that run) had its default.
  cfg = {**defaults, **res["config"]}
  first = {**defaults, **(first or cfg)}
  skip = cli.ALWAYS_RESUMABLE | {"preset"}
  changed = {k: v for k, v in cfg.items() if k not in skip and first.get(k) != v}
  return {
      "name": workdir.name, "command": res["command"], "git_commit": res.get("git_commit"),
      "preset": cfg.get("preset"), "seed": cfg.get("seed"), "changed": changed,
      "validation_best_accuracy": res["validation_best_accuracy"],
      "validation_best_step": res["validation_best_step"],
      # The scored checkpoint on validation with the final embedding (test-time shifts).
      "validation_scored_accuracy": res.get("validation_scored_accuracy"),
      "lake_20way_accuracy": res["lake_20way_accuracy"],
      "lake_20way_ci95": res["lake_20way_ci95"],
      "wall_time_min": res["wall_time_s"] / 60, "train_time_s": res["train_time_s"],
      "compile_time_s": res["compile_time_s"], "images_per_s": res.get("images_per_s"),
      "steps": res["steps"], "end": res["end"],
      "cpu": {k: res["machine"].get(k) for k in ("cpu_model", "cpu_isa", "nproc")},
      "machine_load": [res["machine"]["load_average_at_start"],
                       res["machine"]["load_average_at_end"]],
      "validation": [{"step": r["step"], "val_accuracy": r["val_accuracy"]} for r in recs
                     if r["kind"] == "eval"],
      "train_loss": [{"step": r["step"], "loss": r["loss"]} for r in recs
                     if r["kind"] == "train"]}


def compare(out: str, workdirs: list[str], *, defaults=None, figure: str = "") -> Path:
  """Writes ``out`` (JSON) and the PNG beside it from finished ``workdirs``; returns the path.

  Args:
    out: the results file to write (its folder is created).
    workdirs: finished Omniglot work directories; the first is the reference that every
      run's ``changed`` fields are measured against.
    defaults: the config's field defaults (``dataclasses.asdict(Config())``): the value of
      a field that a run's ``config.json`` predates.
    figure: what the runs are, stored in the file (default: a sentence naming the first).

  Raises:
    ValueError: a work directory is not finished (one line naming it).
  """
  if not workdirs:
    raise ValueError("workdirs: pass at least one finished work directory")
  first = results_lib.read_results(workdirs[0])
  runs = [_compared(Path(w), first and first["config"], cli._normal(defaults or {}))
          for w in workdirs]
  scored = [r["lake_20way_accuracy"] for r in runs if r["lake_20way_accuracy"] is not None]
  val = [r["validation_best_accuracy"] for r in runs]
  summary = {"runs": len(runs), "validation_best_mean": statistics.fmean(val),
             "wall_time_min_max": max(r["wall_time_min"] for r in runs)}
  if scored:
    summary.update(lake_scored_runs=len(scored), lake_20way_mean=statistics.fmean(scored),
                   lake_20way_min=min(scored), lake_20way_max=max(scored))
  figure = figure or (f"{len(runs)} Omniglot runs side by side: what each changes against "
                      f"{runs[0]['name']}, its validation accuracy and wall time, and Lake's "
                      f"accuracy where it was scored")
  path = results_lib.write_results(Path(out).parent, {
      "figure": figure, "summary": summary, "runs": runs}, name=Path(out).name)
  plotting.save_learning_curves_png(
      runs, path.with_suffix(".png"), x="step", xlabel="training step",
      loss_label="training loss",
      title="Omniglot: validation during training (plain embedding); chance 0.05")
  return path
