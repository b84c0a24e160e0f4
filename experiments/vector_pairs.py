"""Siamese heads over a CSV of vector pairs: Euclidean + contrastive, and L1 + linear + BCE.

    python experiments/vector_pairs.py --csv pairs.csv --workdir /tmp/vp
    # each row: 200 left values, 200 right values, a 0/1 label (1 = same class)
    python experiments/vector_pairs.py --generate 20000 --workdir /tmp/vp   # synthetic CSV

Reports, per head, the best-threshold accuracy on validation pairs, the test accuracy
at that threshold, ROC-AUC and EER, and writes roc.png. ``--smoke`` generates a small
CSV in the workdir and trains a few epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _recipe_io as _common  # noqa: E402


def main(argv=None) -> dict:
  t0 = time.perf_counter()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--csv", help="the pairs file")
  p.add_argument("--generate", type=int, metavar="ROWS",
                 help="write a synthetic CSV of ROWS pairs to WORKDIR/pairs.csv and use it")
  p.add_argument("--workdir", required=True)
  p.add_argument("--left-columns", type=int, default=200)
  p.add_argument("--right-columns", type=int, default=200,
                 help="width of the right vector (0: every column left after the label)")
  p.add_argument("--label-column", type=int, default=-1, help="label position; -1 = last")
  p.add_argument("--head", choices=["contrastive", "bce", "both"], default="both")
  p.add_argument("--epochs", type=int, default=100)
  p.add_argument("--patience", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny generated CSV, few epochs (CI)")
  args = p.parse_args(argv)

  from siamjax import recipes
  from siamjax.data import folders
  from siamjax.evaluation import verification

  os.makedirs(args.workdir, exist_ok=True)
  csv_path, epochs = args.csv, args.epochs
  if args.smoke or args.generate:
    rows = 600 if args.smoke else args.generate
    csv_path = os.path.join(args.workdir, "pairs.csv")
    folders.write_synthetic_vector_pairs_csv(csv_path, rows, left_columns=args.left_columns,
                                             right_columns=args.right_columns, seed=args.seed)
    epochs = 3 if args.smoke else epochs
  if not csv_path:
    sys.exit("error: pass --csv FILE (or --generate ROWS, or --smoke)")
  left, right, similar = folders.load_vector_pairs_csv(
      csv_path, left_columns=args.left_columns, right_columns=args.right_columns or None,
      label_column=args.label_column)
  heads = ["contrastive", "bce"] if args.head == "both" else [args.head]
  per_head, curves = {}, {}
  for head in heads:
    results, _ = recipes.vector_pairs(
        left, right, similar, head=head, epochs=epochs, patience=args.patience,
        batch_size=min(args.batch_size, int(0.7 * len(similar))), seed=args.seed,
        log=lambda r, h=head: print(h, r, flush=True))
    curves.update(results.pop("_roc_curves"))
    per_head[head] = results
    print(f"{head}: val best accuracy {results['val_best_accuracy']:.4f}, test accuracy "
          f"{results['test_accuracy']:.4f}, AUC {results['test_verification']['auc']:.4f}")
  verification.save_roc_png(os.path.join(args.workdir, "roc.png"), curves,
                            title="vector pairs, test")
  out = {"recipe": "vector_pairs", "smoke": args.smoke,
         "csv": os.path.basename(csv_path), "synthetic": bool(args.smoke or args.generate),
         "pairs": int(len(similar)), "heads": per_head}
  path = _common.write_results(args.workdir, out, wall_time_s=time.perf_counter() - t0)
  print(f"-> {path}")
  return out


if __name__ == "__main__":
  main()
