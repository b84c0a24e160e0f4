"""paper_fast preset: Koch et al.'s network and protocol, trained in 5 minutes on one GPU.

  python experiments/omniglot_koch.py --preset paper_fast --workdir runs/omniglot_paper_fast
  python experiments/omniglot_koch.py --preset paper_fast --train-time-limit-s 600  # longer

Expected: UNMEASURED (no GPU has run it). The goal is >= 92% on Lake's 400 within-alphabet
trials (Koch et al. report 92.0%) after <= 5 minutes of training on one H100/H200; our
estimate is 88-92%, since nothing measured here shows this network past its first 10,000
pairs (below). Runtime: the 300 s training limit (compilation included) plus ~1 minute
of start-up, data decoding and the final evaluation. A GPU preset: on a CPU its 100
fused steps per call are unrolled (siamjax.train) and compile for a long time.

Same as the paper (and the `paper` preset): Koch's network (38,951,745 parameters) at
105x105, the weighted-L1 head, pair BCE on fresh random pairs (half same-character),
Koch's affine distortions applied on the device inside the step (rotation +-10 deg, shear
+-0.3, scale 0.8-1.2, translation +-2 px, each with p=0.5), the 30 background alphabets
for training, validation on evaluation alphabets that Lake's runs do not use, and
scoring by the Siamese head on Lake's 20 runs.

Where it departs, and why:
- bf16 compute with float32 parameters (and optimiser state): the GPU's bf16 matrix
  units; the paper's float32 would halve the pairs seen in the budget.
- Adam, a linear warm-up over 500 steps to 3e-4, then a cosine decay to 0 at step 22,000,
  instead of per-layer SGD with a momentum ramp, a 1% per-epoch decay, per-layer L2 and
  up to 200 epochs with early stopping. A fixed wall-time budget wants a schedule that
  ends at learning rate 0 on its last step; the paper's per-layer values came from a
  Bayesian search over far longer runs and are unpublished; Adam needs no per-layer
  guesses. No L2: every step sees fresh pairs and fresh distortions for ~21 epochs.
- 256 pairs per step instead of 128: fuller GPU batches (512 images per step).
- All 20 drawers of the background alphabets (the paper: 12): validation uses other
  alphabets (the evaluation set), so drawers 12-19 of the background set held nothing
  out; 60% more training images for a budget of ~21 epochs.
- No validation inside the window: the model is scored at its last step (where the
  schedule ends), validated once after training; no early stopping, no random N-way or
  pair-verification extras. Checkpoints at steps 10,000 and 20,000 only: ~470 MB each
  (parameters + Adam moments), about a second each, < 1% of the budget.

How many pairs: a training pair costs ~10.9 GFLOP (1.82 GFLOP per 105x105 forward, x2
images, x3 for forward + backward); an H200's bf16 dense matmul ran at ~790 TFLOP/s here,
so 100% of peak is ~72.5k pairs/s. Planned at 30% (the best public small-convnet
anchor, airbench on an A100 with torch.compile, sustains ~35%): ~21.7k pairs/s; after
~30 s of compilation inside the 300 s limit, 270 s give ~5.9M pairs, hence 22,000 steps
of 256 = 5.63M pairs (~21 epochs of 270,000 pairs). The published PyTorch
reimplementation of Koch's net (Adam 6e-5, batch 128) reports ~89% on an easier random
20-way protocol after 50,000 steps = 6.4M pairs: the same order. At the issue's goal of
40k pairs/s the 22,000 steps end after ~140 s; below ~19k pairs/s the time limit stops
training before the decay reaches 0 (the final evaluation still runs).

CPU evidence (experiments/results/omniglot_koch_learning_curve.json and .png: the same
network and loss, float32, batch 32, a 420 s training limit each on 2 cores shared with
other jobs, load averages 5-11, so 8-20 pairs/s): the paper's SGD (6,080 pairs), Adam at
a constant 1e-4 (3,200 pairs) and Adam 3e-4 with this preset's warm-up + cosine shape
(7,680 pairs) all sit at 17-24% validation accuracy and 24-28% on Lake's runs (chance
5%, raw pixels 19%), the training BCE falling from 0.69 to 0.57-0.64. That is at most
0.14% of the 5.63M pairs planned here: it shows the pipeline learns and that Adam at
3e-4 does not diverge from Koch's initialisation, but it cannot rank optimisers or pin
the schedule, which rest on the step counts and throughput above. At batch 32, 3e-4 gave
the noisiest, highest training loss of the three; 3e-4 at 256 pairs is 1e-4 at 32 under
square-root batch scaling, so the peak was not set higher.
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
