"""Siamese heads over a CSV of vector pairs: Euclidean + contrastive, and L1 + linear + BCE.

  python experiments/vector_pairs.py --csv pairs.csv --workdir /tmp/vp
  # each row: 200 left values, 200 right values, a 0/1 label (1 = same class);
  # --left-columns, --right-columns, --label-column for other layouts
  python experiments/vector_pairs.py --generate 20000 --workdir /tmp/vp   # synthetic CSV
  python experiments/vector_pairs.py --smoke --workdir /tmp/vp_smoke

Rows split 70/15/15; each head (--head contrastive|bce|both) early-stops on the
validation loss, takes the best-accuracy threshold of the validation pairs, and reports
the test accuracy at it, ROC-AUC and EER; roc.png shows the test ROC curves. A relative
--csv is read from --data-dir when given. The flags, the work directory and the exit
codes are those of every script (siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import sys

from siamjax.recipes import cli, vector_pairs


def main(argv=None, hooks=()) -> int:
  return cli.main(vector_pairs, argv, hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
