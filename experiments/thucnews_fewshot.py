"""Few-shot 14-way THUCNews title classification: every variant, 5 draws.

  python experiments/thucnews_fewshot.py --data-dir ../shared/data      # the 5 draws
  python experiments/thucnews_fewshot.py --num-draws 1 --workdir /tmp/t  # one draw
  python experiments/thucnews_fewshot.py --smoke --workdir /tmp/smoke    # generated titles

Expected with the defaults (experiments/results/thucnews_fewshot.json): best variant
splitview_finetune (chosen on validation) at 78.2 +- 0.3% 14-way test accuracy, TF-IDF +
LR 69.8 +- 0.6%, the seed's model 24.3% (mean support) / 6.6% (sum); 224 s on a 2-core
AMD EPYC CPU. Data: --data-dir, else $SIAMJAX_DATA_DIR (a folder with thucnews_titles/).
Needs the text extra (scikit-learn). Every model is a sub-run in <workdir>/seed<k>/;
the flags, the work directory and the exit codes are those of every script
(siamjax.recipes.cli): re-running a command resumes it.
"""

from __future__ import annotations

import sys

from siamjax.recipes import cli, thucnews


def main(argv=None, hooks=()) -> int:
  return cli.main(thucnews, argv, hooks=hooks, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
