"""The Keras MNIST Siamese example on the device: MLP, Euclidean, contrastive, RMSprop.

    python experiments/mnist_contrastive.py --data-dir ../shared/data --workdir /tmp/mc
    # expected: test_pair_accuracy ~0.97-0.98 after 20 epochs; see
    # experiments/results/mnist_contrastive.json for the committed run and its time.

``--smoke`` trains 1 epoch on 2,000 train / 1,000 test images (seconds). ``--source
tfds`` reads tfds' ``mnist`` instead of the IDX files.
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
  p.add_argument("--data-dir", help="folder with mnist/ (default: $SIAMJAX_DATA_DIR)")
  p.add_argument("--source", choices=["idx", "tfds"], default="idx")
  p.add_argument("--workdir", required=True, help="where results.json and roc.png go")
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--pairing", choices=["keras", "keras_fresh", "random"], default="keras",
                 help="keras: the example's pairs, made once (default, faithful); "
                      "keras_fresh: fresh negatives each epoch; random: fresh pairs over all "
                      "images each epoch")
  p.add_argument("--smoke", action="store_true", help="tiny run for CI")
  args = p.parse_args(argv)

  from siamjax import recipes
  from siamjax.data import mnist
  from siamjax.evaluation import verification

  if args.source == "idx":
    root = _common.data_dir(args.data_dir)
    (x_tr, y_tr), (x_te, y_te) = mnist.load_mnist("train", root), mnist.load_mnist("test", root)
  else:
    (x_tr, y_tr), (x_te, y_te) = mnist.load_mnist_tfds("train"), mnist.load_mnist_tfds("test")
  epochs = args.epochs
  if args.smoke:
    x_tr, y_tr, x_te, y_te, epochs = x_tr[:2000], y_tr[:2000], x_te[:1000], y_te[:1000], 1
  results, _ = recipes.mnist_contrastive(
      x_tr, y_tr, x_te, y_te, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
      pairing=args.pairing, log=lambda r: print(r, flush=True))
  os.makedirs(args.workdir, exist_ok=True)
  curves = results.pop("_roc_curves", None)
  if curves:
    verification.save_roc_png(os.path.join(args.workdir, "roc.png"), curves,
                              title="MNIST contrastive, test pairs")
  results = {"recipe": "mnist_contrastive", "smoke": args.smoke, "source": args.source, **results}
  path = _common.write_results(args.workdir, results, wall_time_s=time.perf_counter() - t0)
  print(f"test_pair_accuracy {results['test_pair_accuracy']:.4f}  "
        f"train_pair_accuracy {results['train_pair_accuracy']:.4f}  "
        f"AUC {results['test_verification']['auc']:.4f}  -> {path}")
  return results


if __name__ == "__main__":
  main()
