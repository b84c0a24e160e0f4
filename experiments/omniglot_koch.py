"""Omniglot one-shot (Koch et al. 2015) on Lake's 20-way within-alphabet runs.

  python experiments/omniglot_koch.py                      # paper on a GPU, else quick
  python experiments/omniglot_koch.py --smoke --workdir /tmp/smoke
  python experiments/omniglot_koch.py --preset quick --num-steps 2000   # any Config knob
  python experiments/omniglot_koch.py --baseline pixels --workdir /tmp/px
  python experiments/omniglot_koch.py --learning-curve OUT.json WORKDIR [WORKDIR ...]

``--learning-curve`` collects finished work directories (their metrics.jsonl and
results.json) into one JSON of pairs seen against validation accuracy, with a PNG beside
it (experiments/results/omniglot_koch_learning_curve.json: the evidence behind the
paper_fast preset).

Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with omniglot/*.zip); a missing zip is
downloaded from Lake's repository into it (or into ~/.cache/siamjax) with SHA-256
verification (--no-download to refuse). Presets live in experiments/configs/. The
flags, the work directory and the exit codes are those of every script
(siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from siamjax.recipes import cli, omniglot_koch

CONFIGS = Path(__file__).resolve().parent / "configs"


def _preset(name: str):
  def load():
    path = CONFIGS / f"omniglot_koch_{name}.py"
    spec = importlib.util.spec_from_file_location(f"omniglot_koch_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()
  return load


PRESETS = {name: _preset(name) for name in ("smoke", "quick", "paper", "paper_fast")}


def _by_device() -> str:
  import jax
  return "paper" if jax.devices()[0].platform in ("gpu", "cuda", "rocm", "tpu") else "quick"


def learning_curve(out: str, workdirs: list[str]) -> Path:
  """Writes ``out`` (JSON, through siamjax.results) and a PNG beside it; returns the path."""
  import json

  from siamjax import results as results_lib
  runs = []
  for w in map(Path, workdirs):
    res = results_lib.read_results(w)
    if res is None:
      raise ValueError(f"workdirs: {w} holds no results.json (train it first)")
    cfg = res["config"]
    per_step = cfg["batch_pairs"]
    recs = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    runs.append({
        "name": w.name, "command": res["command"],
        "recipe": {k: cfg[k] for k in ("preset", "optimizer", "learning_rate", "lr_schedule",
                                       "warmup_steps", "num_steps", "batch_pairs", "dtype",
                                       "train_drawers", "within_alphabet")},
        "validation": [{"step": r["step"], "pairs_seen": r["step"] * per_step,
                        "val_accuracy": r["val_accuracy"]} for r in recs
                       if r["kind"] == "eval"],
        "train_loss": [{"pairs_seen": r["step"] * per_step, "loss": r["loss"]} for r in recs
                       if r["kind"] == "train"],
        "lake_20way_accuracy": res["lake_20way_accuracy"],
        "lake_20way_ci95": res["lake_20way_ci95"],
        "evaluated_checkpoint_step": res["validation_best_step"],
        "pairs_per_s": res["pairs_per_s"], "train_time_s": res["train_time_s"],
        "steps": res["steps"], "end": res["end"], "machine_load": [
            res["machine"]["load_average_at_start"], res["machine"]["load_average_at_end"]]})
  fast = PRESETS["paper_fast"]()
  per_pair, peak, fraction, compile_s = 10.9e9, 790e12, 0.30, 30.0
  rate = fraction * peak / per_pair
  plan = {"flops_per_training_pair": per_pair, "h200_bf16_matmul_tflops": peak / 1e12,
          "pairs_per_s_at_100pct": peak / per_pair, "planned_fraction_of_peak": fraction,
          "planned_pairs_per_s": rate, "train_time_limit_s": fast.train_time_limit_s,
          "compile_s_assumed": compile_s,
          "pairs_in_budget": rate * (fast.train_time_limit_s - compile_s),
          "paper_fast_pairs": fast.num_steps * fast.batch_pairs,
          "paper_fast_steps": fast.num_steps, "paper_fast_batch_pairs": fast.batch_pairs,
          "cpu_pairs_seen_max": max(r["steps"] * r["recipe"]["batch_pairs"] for r in runs)}
  path = results_lib.write_results(Path(out).parent, {
      "figure": "Koch network learning curves at reduced budgets on the CPU",
      "note": "Each run: the same network and loss as paper_fast, float32 on the CPU, "
              "validation (400 within-alphabet trials on evaluation alphabets outside "
              "Lake's runs) every 60 steps, a 420 s training limit; the load average "
              "beside each run says how many other processes shared its 2 cores. The "
              "GPU plan below is what paper_fast is sized for (unmeasured).",
      "gpu_plan": plan, "runs": runs}, name=Path(out).name)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in runs:
    ax[0].plot([v["pairs_seen"] for v in r["validation"]],
               [v["val_accuracy"] for v in r["validation"]], "o-", label=r["name"])
    ax[1].plot([v["pairs_seen"] for v in r["train_loss"]], [v["loss"] for v in r["train_loss"]],
               label=r["name"])
  ax[0].axhline(0.05, color="grey", lw=0.8, ls=":")
  ax[0].set(xlabel="training pairs seen", ylabel="validation 20-way accuracy", ylim=(0, 1))
  ax[1].set(xlabel="training pairs seen", ylabel="training pair BCE")
  ax[0].legend(fontsize=7)
  fig.suptitle("Koch net (38.9M parameters), 105x105, pair BCE, CPU; chance 0.05", fontsize=9)
  fig.tight_layout()
  fig.savefig(path.with_suffix(".png"), dpi=90)
  plt.close(fig)
  return path


def main(argv=None, hooks=()) -> int:
  args = sys.argv[1:] if argv is None else list(argv)
  if args[:1] == ["--learning-curve"]:
    if len(args) < 3:
      print("error: --learning-curve OUT.json WORKDIR [WORKDIR ...]", file=sys.stderr)
      return 2
    try:
      print(f"-> {learning_curve(args[1], args[2:])}")
    except (ValueError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  return cli.main(omniglot_koch, argv, presets=PRESETS, default_preset=_by_device,
                  hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
