"""Attendance with one enrolled example per person, on classes the model never saw.

  python experiments/enrolment.py --model-workdir runs/omniglot_koch_quick --workdir W
  python experiments/enrolment.py --preset mnist --model-workdir runs/mnist_triplet_default --workdir W
  python experiments/enrolment.py --smoke --model-workdir RUN --workdir /tmp/enrol_smoke

Loads a finished run (siamjax.inference.load), enrols one example of each "staff" class,
calibrates open-set thresholds for target false-accept rates on other classes, and scores
closed-set identification accuracy and the detection-and-identification rate at those
thresholds once (siamjax.recipes.enrolment). The flags, the work directory and the exit
codes are those of every script (siamjax.recipes.cli).
"""

import sys

from siamjax.recipes import cli, enrolment

if __name__ == "__main__":
  sys.exit(cli.main(enrolment, description=__doc__))
