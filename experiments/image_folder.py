"""A Siamese SmallCNN on any folder of class-named image folders, split by image.

  python experiments/image_folder.py --data-dir DIR --workdir /tmp/if
  # DIR/<class>/<images>: any sizes, resized to --size; about 30% of each class's images
  # are held out as a test set; reports held-out pair accuracy, N-way one-shot accuracy,
  # ROC-AUC/EER, and writes roc.png and mistakes.png (the hardest wrong pairs).
  python experiments/image_folder.py --data-dir DIR --grayscale --size 32 --epochs 15
  python experiments/image_folder.py --smoke --workdir /tmp/if_smoke   # synthetic folder

The flags, the work directory and the exit codes are those of every script
(siamjax.recipes.cli): re-running a command resumes it; a checkpoint is saved every epoch.
"""

from __future__ import annotations

import sys

from siamjax.recipes import cli, image_folder


def main(argv=None, hooks=()) -> int:
  return cli.main(image_folder, argv, hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
