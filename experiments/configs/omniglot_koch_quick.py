"""Quick preset: <= 10 minutes on a 2-core CPU, Lake 20-way within-alphabet >= 0.80.

  flock /tmp/siamjax-cpu.lock python experiments/omniglot_koch.py --preset quick \
      --workdir runs/omniglot_quick

Expected: measured 0.8975 [0.864, 0.924] on Lake's 400 trials, 369 s for the whole process
on a 2-core AMD EPYC CPU (about 2,230 images/s with siamjax.xla.FAST_CPU_FLAGS): all 3000
steps within the 430 s limit on that host; the best validation checkpoint, at step 2800
(validation 0.778: other alphabets and drawers), is the one scored
(experiments/results/omniglot_koch_quick.json; one seed, so expect a few points either
way; a slower host of the same kind stopped at its time limit, step 2200, at 0.8925).
NOT the paper's network: a 4-block 32-channel
conv net with batch norm on 28x28 downsampled images, trained with an in-batch softmax over
negative squared distances (126 characters x 2 drawers per step, 14 characters at a time
from 9 alphabets so negatives share an alphabet), scored by nearest neighbour (squared L2)
on the embedding. Koch's pair-BCE Siamese learns far too slowly for 10 CPU minutes.
"""

from siamjax.recipes.omniglot_koch import Config


def get_config() -> Config:
  return Config(
      preset="quick", model="conv4", channels=32, image_size=28, loss="softmax",
      n_chars=126, n_per_char=2, chars_per_alphabet=14,
      # Light affine distortions at 28x28 (Koch's ranges scaled down).
      augment=True, rotation=10.0, shear=0.1, scale=(0.9, 1.1), translation=1.0,
      augment_prob=0.5,
      optimizer="adam", learning_rate=1e-3,
      # Training stops at 3000 steps or after 430 s of wall time, whichever comes first,
      # so the whole run (load, compile, evaluation) stays under 10 minutes.
      num_steps=3000, steps_per_call=10, eval_every=200, val_tasks=20, patience=0,
      checkpoint_every=200, log_every=5, time_budget_s=600, train_time_limit_s=430)
