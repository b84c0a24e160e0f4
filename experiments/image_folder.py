"""A Siamese SmallCNN on any folder of class-named image folders.

    python experiments/image_folder.py --data-dir DIR --workdir /tmp/if
    # DIR/<class>/<images>: any sizes, resized to --size; split by image (30% held out);
    # reports held-out pair accuracy, N-way one-shot accuracy, ROC-AUC/EER, and writes
    # roc.png and mistakes.png (the hardest wrong pairs).

Convolutions train much faster on XLA:CPU with ``siamjax.xla.FAST_CPU_FLAGS`` in
``XLA_FLAGS`` (see :mod:`siamjax.xla`). ``--smoke`` writes a small synthetic folder into the workdir and
trains a few steps.
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
  p.add_argument("--data-dir", help="folder of class-named subfolders of images")
  p.add_argument("--workdir", required=True)
  p.add_argument("--size", type=int, default=48, help="images are resized to SIZE x SIZE")
  p.add_argument("--grayscale", action="store_true")
  p.add_argument("--val-fraction", type=float, default=0.3)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--steps-per-epoch", type=int, default=100)
  p.add_argument("--batch-pairs", type=int, default=32)
  p.add_argument("--learning-rate", type=float, default=1e-3)
  p.add_argument("--n-way", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="synthetic folder, a few steps (CI)")
  args = p.parse_args(argv)

  from siamjax import recipes
  from siamjax.data import folders
  from siamjax.evaluation import verification

  os.makedirs(args.workdir, exist_ok=True)
  root, size, epochs, steps = args.data_dir, args.size, args.epochs, args.steps_per_epoch
  if args.smoke:
    root = os.path.join(args.workdir, "synthetic_folder")
    folders.write_synthetic_image_folder(root, classes=4, per_class=8, seed=args.seed)
    size, epochs, steps = 24, 2, 10
  if not root:
    sys.exit("error: pass --data-dir DIR (a folder of class-named subfolders) or --smoke")
  images, labels, names, _ = folders.load_image_folder(root, size=(size, size),
                                                       grayscale=args.grayscale)
  results, _ = recipes.image_folder(
      images, labels, val_fraction=args.val_fraction, epochs=epochs, steps_per_epoch=steps,
      batch_pairs=args.batch_pairs, learning_rate=args.learning_rate, n_way=args.n_way,
      seed=args.seed, log=lambda r: print(r, flush=True))
  mistakes = results.pop("_mistakes")
  verification.save_roc_png(os.path.join(args.workdir, "roc.png"), results.pop("_roc_curves"),
                            title="image folder, held-out pairs")
  shown = recipes.contact_sheet(os.path.join(args.workdir, "mistakes.png"), images, mistakes,
                                class_names=names, labels=labels)
  out = {"recipe": "image_folder", "smoke": args.smoke, "data_dir": os.path.basename(
      os.path.normpath(root)), "classes": names if len(names) <= 50 else len(names),
         "mistakes_shown": shown, **results}
  path = _common.write_results(args.workdir, out, wall_time_s=time.perf_counter() - t0)
  print(f"held-out pair accuracy {results['val_pair_accuracy']:.4f}, "
        f"{results['n_way']}-way one-shot {results['val_one_shot_accuracy']:.4f}, "
        f"AUC {results['val_verification']['auc']:.4f} -> {path}")
  return out


if __name__ == "__main__":
  main()
