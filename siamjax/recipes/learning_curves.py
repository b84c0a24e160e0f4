"""Learning curves of finished Omniglot (Koch) work directories, collected into one figure.

``python experiments/omniglot_koch.py --learning-curve OUT.json WORKDIR [WORKDIR ...]``
calls :func:`collect`: each work directory's ``metrics.jsonl`` (training loss and the
validation accuracy against pairs seen) and ``results.json`` (Lake accuracy, throughput,
the machine's load) become one results JSON (through :mod:`siamjax.results`) with a PNG
beside it, plus the GPU plan that the ``paper_fast`` preset is sized for.
(experiments/results/omniglot_koch_learning_curve.json was made this way.)
"""

from __future__ import annotations

from pathlib import Path

from siamjax import plotting, train
from siamjax import results as results_lib

# What the paper_fast preset is sized for (see siamjax.recipes.omniglot_koch.PRESETS):
FLOPS_PER_TRAINING_PAIR = 10.9e9  # Koch net forward + backward, both images of the pair
H200_BF16_FLOPS = 790e12          # dense bf16 matmul peak
PLANNED_FRACTION = 0.30           # of that peak, for a conv net of this size
COMPILE_S_ASSUMED = 30.0


def _run(workdir: Path) -> dict:
  res = results_lib.read_results(workdir)
  if res is None:
    raise ValueError(f"workdirs: {workdir} holds no results.json (train it first)")
  recs = train.read_metrics(workdir)
  if not recs:
    raise ValueError(f"workdirs: {workdir} holds no metrics.jsonl")
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
