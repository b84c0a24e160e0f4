"""paper_fast preset: Koch et al.'s network and protocol, trained in 5 GPU minutes.

  python experiments/omniglot_koch.py --preset paper_fast --workdir runs/omniglot_paper_fast

(DRAFT: the docstring is completed from the CPU learning curves.)
"""

from siamjax.recipes.omniglot_koch import Config


def get_config() -> Config:
  return Config(
      preset="paper_fast", model="koch", image_size=105, dtype="bfloat16", conv="auto",
      loss="pair_bce", batch_pairs=256, within_alphabet=False,
      train_drawers=tuple(range(20)), val_drawers=tuple(range(12, 16)),
      augment=True, rotation=10.0, shear=0.3, scale=(0.8, 1.2), translation=2.0,
      augment_prob=0.5,
      optimizer="adam", learning_rate=3e-4, lr_schedule="cosine", warmup_steps=500,
      num_steps=22_000, steps_per_call=100, eval_every=0, val_tasks=20, patience=0,
      checkpoint_every=10_000, log_every=1, extra_evals=False, time_budget_s=420,
      train_time_limit_s=300)
