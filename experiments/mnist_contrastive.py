"""The Keras MNIST Siamese example on the device: MLP, Euclidean, contrastive, RMSprop.

  python experiments/mnist_contrastive.py --workdir /tmp/mc       # 20 epochs, ~1 min CPU
  # expected: test_pair_accuracy ~0.97 (the example states 97.2%)
  python experiments/mnist_contrastive.py --smoke --workdir /tmp/mc_smoke    # seconds
  python experiments/mnist_contrastive.py --pairing keras_fresh   # fresh negatives/epoch
  python experiments/mnist_contrastive.py --val-fraction 0.1      # + validation per epoch

Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with mnist/*.gz, the IDX files);
--source tfds reads tfds' mnist instead. The recipe is siamjax.recipes.mnist.contrastive;
the flags, the work directory and the exit codes are those of every script
(siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import sys

from siamjax.recipes import cli
from siamjax.recipes.mnist import contrastive


def main(argv=None, hooks=()) -> int:
  return cli.main(contrastive, argv, hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
