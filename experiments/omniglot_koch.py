"""Omniglot one-shot (Koch et al. 2015) on Lake's 20-way within-alphabet runs.

  python experiments/omniglot_koch.py                      # paper on a GPU, else cpu
  python experiments/omniglot_koch.py --smoke --workdir /tmp/smoke
  python experiments/omniglot_koch.py --preset quick --num-steps 2000   # any Config knob
  python experiments/omniglot_koch.py --baseline pixels --workdir /tmp/px
  python experiments/omniglot_koch.py --learning-curve OUT.json WORKDIR [WORKDIR ...]
  python experiments/omniglot_koch.py --compare OUT.json WORKDIR [WORKDIR ...]

``--learning-curve`` collects finished work directories (their metrics.jsonl and
results.json) into one JSON of pairs seen against validation accuracy, with a PNG beside
it (experiments/results/omniglot_koch_learning_curve.json: the evidence behind the
paper_fast preset). ``--compare`` puts finished runs side by side (what each changes
against the first, best validation accuracy, wall time, Lake accuracy where scored and
the mean over those) in one JSON with a PNG of the validation curves
(experiments/results/omniglot_koch_cpu_ablations.json and
experiments/results/omniglot_koch_cpu_seeds.json).

Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with omniglot/*.zip); a missing zip is
downloaded from Lake's repository into it (or into ~/.cache/siamjax) with SHA-256
verification (--no-download to refuse). The presets are siamjax.recipes.omniglot_koch.PRESETS
(docs/omniglot-presets.md). The
flags, the work directory and the exit codes are those of every script
(siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import dataclasses
import sys

from siamjax.recipes import cli, learning_curves, omniglot_koch


def _by_device() -> str:
  import jax
  return "paper" if jax.devices()[0].platform in ("gpu", "cuda", "rocm", "tpu") else "cpu"


# The collectors of finished work directories: flag -> (OUT.json, [WORKDIR, ...]) -> path.
_COLLECTORS = {
    "--learning-curve": lambda out, workdirs: learning_curves.collect(
        out, workdirs, paper_fast=omniglot_koch.PRESETS["paper_fast"]()),
    "--compare": lambda out, workdirs: learning_curves.compare(
        out, workdirs, defaults=dataclasses.asdict(omniglot_koch.Config())),
}


def main(argv=None, hooks=()) -> int:
  args = sys.argv[1:] if argv is None else list(argv)
  if args[:1] and args[0] in _COLLECTORS:
    if len(args) < 3:
      print(f"error: {args[0]} OUT.json WORKDIR [WORKDIR ...]", file=sys.stderr)
      return 2
    try:
      print(f"-> {_COLLECTORS[args[0]](args[1], args[2:])}")
    except (ValueError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  return cli.main(omniglot_koch, argv, default_preset=_by_device,
                  hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
