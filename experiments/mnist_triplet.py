"""MNIST with the Keras example's MLP tower and triplet losses mined on the device.

  python experiments/mnist_triplet.py --workdir /tmp/mt     # 3 rules x 10 epochs, CPU
  python experiments/mnist_triplet.py --smoke --workdir /tmp/mt_smoke        # seconds
  python experiments/mnist_triplet.py --rules "('semi_hard',)" --margin 0.5

Trains batch_all, batch_hard and semi_hard in turn (each in <workdir>/<rule>/), chooses
each rule's threshold and the headline rule on validation pairs (10% of the training
images held out), then reports every rule's test pair accuracy, ROC-AUC and recall@1,
beside the contrastive run of experiments/results/mnist_contrastive.json when present.

Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with mnist/*.gz). The recipe is
siamjax.recipes.mnist.triplet; the flags, the work directory and the exit codes are those
of every script (siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import sys

from siamjax.recipes import cli
from siamjax.recipes.mnist import triplet


def main(argv=None, hooks=()) -> int:
  return cli.main(triplet, argv, hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
