"""Few-shot 14-way THUCNews title classification: every variant, 5 draws.

Final run with the defaults (expected: best variant ``splitview_finetune`` at
78.2 +- 0.3% 14-way test accuracy, TF-IDF + LR 69.8 +- 0.6%, seed model 23.5% / 9.4%;
401 s on a 2-core x86_64 CPU; see experiments/results/thucnews_fewshot.json):

  flock /tmp/siamjax-cpu.lock python experiments/thucnews_fewshot.py \
      --data-dir ../shared/data --workdir /tmp/thucnews_fewshot

CI smoke run on generated titles (under a minute, mostly compilation):
``--smoke --workdir DIR``. Needs the ``text`` extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from siamjax import fewshot
from siamjax.data import thucnews
from siamjax.machine import machine_info


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None,
                      help="folder with thucnews_titles/ (default: $SIAMJAX_DATA_DIR)")
  parser.add_argument("--workdir", required=True, help="where results.json and the PNG go")
  parser.add_argument("--smoke", action="store_true", help="tiny generated data, seconds")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--pretrain-steps", type=int, default=1000)
  parser.add_argument("--pretrain-batch", type=int, default=512)
  parser.add_argument("--pretrain-lr", type=float, default=2e-3)
  parser.add_argument("--temperature", type=float, default=0.1)
  parser.add_argument("--finetune-steps", type=int, default=100)
  parser.add_argument("--finetune-lr", type=float, default=1e-3)
  parser.add_argument("--keep-prob", type=float, default=0.5)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--min-count", type=int, default=5)
  args = parser.parse_args(argv)

  t_start = time.perf_counter()
  cfg = dict(pretrain_steps=args.pretrain_steps, pretrain_batch=args.pretrain_batch,
             pretrain_lr=args.pretrain_lr, temperature=args.temperature,
             finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
             keep_prob=args.keep_prob, dim=args.dim, min_count=args.min_count)
  if args.smoke:
    titles, labels = thucnews.synthetic_titles(per_class=60)
    cfg.update(shots=10, max_test=30, val_per_class=10, pretrain_steps=30,
               pretrain_batch=64, finetune_steps=10, scratch_steps=10, seed_epochs=1)
    seeds = args.seeds[:1]
  else:
    titles, labels = thucnews.load_thucnews14(args.data_dir)
    seeds = args.seeds
  out = fewshot.run_thucnews(titles, labels, seeds=seeds, **cfg)
  wall = time.perf_counter() - t_start

  summary = fewshot.summarize(out)
  results = {
      "task": "THUCNews titles, 14-way, 50 labelled titles per class, up to 3000 test "
              "titles per class, one draw per seed; vocabulary and unlabelled text from "
              "non-test titles only (not transductive)",
      "smoke": args.smoke,
      **summary,
      "wall_time_s": round(wall, 1),
      "config": {**cfg, "seeds": list(seeds)},
      "draws": out["draws"],
      "variants": out["variants"],
      "confusion_best": out["confusion"][summary["best_variant"]],
      "class_names": list(thucnews.CLASS_NAMES)[:out["num_classes"]],
      "class_names_en": list(thucnews.CLASS_NAMES_EN)[:out["num_classes"]],
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "machine": machine_info(),
  }
  try:
    results["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
  fewshot.save_confusion_png(
      np.asarray(results["confusion_best"]), results["class_names_en"],
      os.path.join(args.workdir, "confusion_best.png"),
      title=f"{summary['best_variant']}: {summary['best_accuracy_mean']:.1%} over "
            f"{len(seeds)} draws")
  print(json.dumps({k: v for k, v in results.items() if k.endswith(("mean", "std", "variant",
                                                                    "wall_time_s"))}))
  return results


if __name__ == "__main__":
  main()
