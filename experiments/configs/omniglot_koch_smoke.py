"""Smoke preset: seconds on a CPU, for tests and CI. Proves the pipeline runs, not accuracy.

  python experiments/omniglot_koch.py --preset smoke --workdir /tmp/omniglot_smoke

Expected: about 15 s on a 2-core CPU (data decode on first use adds ~10 s); Lake 20-way
accuracy is meaningless (a few dozen updates of a tiny net).
SGD with momentum rather than Adam: `--devices 4` must give the `--devices 1` final loss to
1e-5 (tests/test_parallel_omniglot.py). Adam's early updates are ``lr * sign(g)``, so float
reduction-order noise in zero gradients (biases before batch norm) moves parameters by
``+-lr`` and runs drift apart by 1e-4 in 20 steps; SGD keeps them within 2e-6.
"""

from siamjax.recipes.omniglot_koch import Config


def get_config() -> Config:
  return Config(
      preset="smoke", model="conv4", channels=8, image_size=28, loss="softmax",
      n_chars=28, n_per_char=2, chars_per_alphabet=14, optimizer="sgd",
      learning_rate=0.05, num_steps=20, steps_per_call=5, eval_every=10, val_tasks=2,
      checkpoint_every=10, extra_evals=False, time_budget_s=60)
