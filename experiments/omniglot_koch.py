"""Omniglot one-shot (Koch et al. 2015) on Lake's 20-way within-alphabet runs.

  python experiments/omniglot_koch.py                      # paper on a GPU, else quick
  python experiments/omniglot_koch.py --preset smoke --workdir /tmp/smoke
  python experiments/omniglot_koch.py --preset quick --num-steps 2000   # any Config knob
  python experiments/omniglot_koch.py --eval-only --baseline pixels --workdir /tmp/px

Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with omniglot/*.zip); a missing zip is
downloaded from Lake's repository into it (or into ~/.cache/siamjax) with SHA-256
verification (--download False to refuse). Re-running a command resumes from --workdir.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = ("smoke", "quick", "paper")


def _load_preset(name: str):
  path = HERE / "configs" / f"omniglot_koch_{name}.py"
  spec = importlib.util.spec_from_file_location(f"omniglot_koch_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _run(p, args, cfg, preset, workdir, command):
  from siamjax.recipes import omniglot_koch
  if args.baseline == "pixels":
    return omniglot_koch.pixel_baseline(cfg, workdir, command=command)
  if args.eval_only:
    if not (workdir / "checkpoints").is_dir():
      p.error(f"--eval-only needs a trained --workdir (no checkpoints in {workdir})")
    return omniglot_koch.train_and_evaluate(cfg, workdir, command=command, progress=False,
                                           eval_only=True)
  print(f"preset {preset}: {cfg.model} / {cfg.loss}, {cfg.num_steps} steps -> {workdir}",
        file=sys.stderr)
  return omniglot_koch.train_and_evaluate(cfg, workdir, command=command,
                                         progress=not args.no_progress)


def main(argv=None) -> int:
  import siamjax.xla
  if siamjax.xla.enable_fast_cpu():  # before JAX starts; see siamjax/xla.py
    print(f"set XLA_FLAGS={os.environ['XLA_FLAGS']} (faster CPU convolutions; "
          f"SIAMJAX_NO_XLA_FLAGS=1 to skip)", file=sys.stderr)
  from siamjax import parallel
  parallel.initialize_distributed()  # multi-host: before any other JAX call; else no-op
  from siamjax.recipes.omniglot_koch import Config
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=PRESETS, default=None,
                 help="default: paper when a GPU/TPU is present, else quick")
  p.add_argument("--workdir", default=None, help="default: runs/omniglot_koch_<preset>")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate only: with --baseline pixels, or the checkpoint in --workdir")
  p.add_argument("--baseline", choices=("pixels",), default=None)
  p.add_argument("--no-progress", action="store_true")
  skip = {"preset", "sgd_layers"}
  for f in dataclasses.fields(Config):
    if f.name not in skip:
      p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                     type=_value if f.name not in ("data_dir", "cache_dir") else str,
                     metavar="V", help=f"Config.{f.name} (preset default)")
  args = p.parse_args(argv)

  import jax
  from siamjax.data import omniglot
  preset = args.preset
  if preset is None:
    platform = jax.devices()[0].platform
    preset = "paper" if platform in ("gpu", "cuda", "rocm", "tpu") else "quick"
    print(f"no --preset given: found {platform} device(s), chose '{preset}'", file=sys.stderr)
  cfg = _load_preset(preset)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
               if f.name not in skip and getattr(args, f.name) is not None}
  cfg = cfg.replace(**overrides)
  workdir = Path(args.workdir or f"runs/omniglot_koch_{preset}")
  command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(
      sys.argv[1:] if argv is None else argv))
  try:
    res = _run(p, args, cfg, preset, workdir, command)
  except omniglot.OmniglotDataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  lo, hi = res["lake_20way_ci95"]
  print(json.dumps({"preset": res["preset"], "lake_20way_accuracy": res["lake_20way_accuracy"],
                    "ci95": [round(lo, 4), round(hi, 4)], "lake_trials": res["lake_trials"],
                    "wall_time_s": round(res["wall_time_s"], 1),
                    "results": str(workdir / "results.json")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
