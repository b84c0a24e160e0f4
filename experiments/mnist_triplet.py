"""MNIST with the Keras example's MLP tower and triplet losses mined on the device.

    python experiments/mnist_triplet.py --data-dir ../shared/data --workdir /tmp/mt
    # trains batch_all, batch_hard and semi_hard in turn (10 epochs each) and compares
    # their test pair accuracy, ROC-AUC and recall@1 with the contrastive run in
    # experiments/results/mnist_contrastive.json.

``--smoke`` runs one short epoch per mining rule on 2,000 / 1,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _recipe_io as _common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Per-rule settings. The tower ends in a ReLU: with batch-hard mining on raw embeddings
# MNIST collapses every embedding to 0 (loss stuck at the margin), so batch-hard runs on
# unit-length embeddings with a smaller margin.
PRESETS = {
    "batch_all": {"margin": 1.0, "normalize": False},
    "batch_hard": {"margin": 0.2, "normalize": True},
    "semi_hard": {"margin": 1.0, "normalize": False},
}


def main(argv=None) -> dict:
  t0 = time.perf_counter()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", help="folder with mnist/ (default: $SIAMJAX_DATA_DIR)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--mining", nargs="+", default=["batch_all", "batch_hard", "semi_hard"],
                 choices=["batch_all", "batch_hard", "semi_hard"])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--classes-per-batch", type=int, default=10)
  p.add_argument("--per-class", type=int, default=16)
  p.add_argument("--margin", type=float, help="override every rule's preset margin")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--contrastive-results",
                 default=os.path.join(HERE, "results", "mnist_contrastive.json"),
                 help="results JSON of the contrastive run to compare with")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)

  from siamjax import recipes
  from siamjax.data import mnist
  from siamjax.evaluation import verification

  root = _common.data_dir(args.data_dir)
  (x_tr, y_tr), (x_te, y_te) = mnist.load_mnist("train", root), mnist.load_mnist("test", root)
  epochs, steps = args.epochs, None
  if args.smoke:
    x_tr, y_tr, x_te, y_te, epochs, steps = x_tr[:2000], y_tr[:2000], x_te[:1000], y_te[:1000], 1, 20
  runs, curves = {}, {}
  for mining in args.mining:
    results, _ = recipes.mnist_triplet(
        x_tr, y_tr, x_te, y_te, mining=mining, epochs=epochs, steps_per_epoch=steps,
        classes_per_batch=args.classes_per_batch, per_class=args.per_class,
        **{**PRESETS[mining], **({"margin": args.margin} if args.margin else {})},
        seed=args.seed, log=lambda r, m=mining: print(m, r, flush=True))
    curves.update(results.pop("_roc_curves"))
    runs[mining] = results
    print(f"{mining}: test pair accuracy {results['test_pair_accuracy']:.4f} (threshold "
          f"{results['threshold']:.3f}), AUC {results['test_verification']['auc']:.4f}, "
          f"recall@1 {results['test_recall_at_1']:.4f}", flush=True)
  table = {m: {"test_pair_accuracy": r["test_pair_accuracy"],
               "test_auc": r["test_verification"]["auc"], "test_eer": r["test_verification"]["eer"],
               "test_recall_at_1": r["test_recall_at_1"], "train_time_s": r["train_time_s"]}
           for m, r in runs.items()}
  if os.path.exists(args.contrastive_results) and not args.smoke:
    with open(args.contrastive_results) as f:
      c = json.load(f)
    table["contrastive (Keras example)"] = {
        "test_pair_accuracy": c["test_pair_accuracy"], "test_auc": c["test_verification"]["auc"],
        "test_eer": c["test_verification"]["eer"], "test_recall_at_1": c["test_recall_at_1"],
        "train_time_s": c["train_time_s"], "from": os.path.relpath(args.contrastive_results)}
  os.makedirs(args.workdir, exist_ok=True)
  verification.save_roc_png(os.path.join(args.workdir, "roc.png"), curves,
                            title="MNIST triplet mining, test pairs")
  best = max(runs, key=lambda m: runs[m]["test_pair_accuracy"])
  out = {"recipe": "mnist_triplet", "smoke": args.smoke,
         "test_pair_accuracy": runs[best]["test_pair_accuracy"], "best_mining": best,
         "comparison": table, "runs": runs}
  path = _common.write_results(args.workdir, out, wall_time_s=time.perf_counter() - t0)
  for name, row in table.items():
    print(f"{name:>28}: acc {row['test_pair_accuracy']:.4f}  AUC {row['test_auc']:.4f}  "
          f"recall@1 {row['test_recall_at_1']:.4f}")
  print(f"-> {path}")
  return out


if __name__ == "__main__":
  main()
