"""Training and inference pairs/s of the Koch Siamese net: siamjax vs PyTorch and Keras.

Full run on this machine's default JAX device (a GPU when jax[cuda] is installed, else
the CPU), holding the shared CPU lock on the project's machines::

    flock /tmp/siamjax-cpu.lock python benchmarks/pairs_per_sec.py

writes ``benchmarks/results/<device-slug>.json`` and ``.png`` and prints the table.
CI smoke run (under a minute on a CPU, no timing claims)::

    python benchmarks/pairs_per_sec.py --smoke --out /tmp/bench_smoke.json

The JSON is rewritten after every row (``complete: false`` until the end), and one line
per row is printed as it is measured, so a run cut short keeps what it measured. Besides
every row it holds ``best_vs_best``: per mode and batch, each framework's fastest row over
its precisions and variants and siamjax's ratio to the fastest reference (bf16 rows count
only when their training loss tracks float32's, see ``bf16_check``). Each torch row is
run at its fastest layout (contiguous or channels-last) and thread count on the machine at
hand, measured in the run (``settings``).

On a GPU: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` defaults to 0.5 (set before JAX starts) so
that torch has memory in the same process, cuDNN autotuning is on, and torch's float32
matmuls and convolutions use TF32 as JAX's default precision does (both recorded); the
matmul peak times 10 chained 8192^3 products per call. ``--commit HASH`` records the
commit where the copy has no ``.git``.

Batch sweep: 32 and 128 pairs on a CPU, 128 and 512 on a GPU. Batch 512 is left out
on a CPU because it is slow there: in the 2-core AMD EPYC run
(``benchmarks/results/cpu-amd-epyc-2core.json``) the implementations train at 9-31
pairs/s, so one batch-512 training step takes 15-55 s and each training row (first call
+ 3 timed repeats) 1-4 minutes, some 30 minutes more for the whole table (with several
GB of activations). Ask for it with ``--batches 32 128 512``.

On a CPU in float32, siamjax's default Koch network computes conv2-4 as DFT products
(:mod:`siamjax.fourier`); the run adds ``jit-direct`` rows with direct convolutions
beside it (``--no-direct`` leaves them out).

siamjax's train rows sample AND augment their pairs (Koch's affine distortions) on the
device inside the jitted step; torch and keras get ready-made batches (see harness.py).
The Keras rows need ``pip install keras`` (Keras 3; ``$KERAS_BACKEND`` or jax).

The script enables siamjax's fast CPU path (:func:`siamjax.xla.enable_fast_cpu`) before
JAX starts, unless ``--no-fast-cpu``. All measuring code is in ``benchmarks/harness.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny run for CI: batch 2, float32, torch eager, keras if installed")
  p.add_argument("--out", help="JSON path (default benchmarks/results/<device-slug>.json)")
  p.add_argument("--png", help="plot path (default: --out with .png; none with --smoke)")
  p.add_argument("--batches", type=int, nargs="+", help="batch sizes in pairs "
                 "(default 32 128 on a CPU, 128 512 on a GPU). 512 on the 2-core CPU: "
                 "10-25 training pairs/s, so 20-50 s per step and 2-4 min per training "
                 "row (longer for bf16); ask for it with --batches 32 128 512")
  p.add_argument("--repeats", type=int, help="timed repeats per row (default 3 CPU, 10 GPU)")
  p.add_argument("--steps", type=int, help="steps per timed repeat (default 1 CPU, 10 GPU)")
  p.add_argument("--modes", nargs="+", choices=["train", "infer", "lake"])
  p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"])
  p.add_argument("--no-torch-compile", action="store_true")
  p.add_argument("--no-keras", action="store_true", help="leave out the Keras rows")
  p.add_argument("--no-direct", action="store_true",
                 help="leave out the siamjax rows with direct convolutions that a CPU run "
                      "adds beside the default (DFT conv2-4, siamjax.fourier)")
  p.add_argument("--no-augment", action="store_true",
                 help="siamjax train step without Koch's affine distortions (sampling only)")
  p.add_argument("--devices", type=int, nargs="+",
                 help="siamjax training rows on each of these device counts (data "
                      "parallel, siamjax.parallel); default 1. On a CPU, fake devices "
                      "(XLA_FLAGS=--xla_force_host_platform_device_count=N) share the "
                      "same cores: a correctness check, not a speed claim")
  p.add_argument("--no-fast-cpu", action="store_true",
                 help="leave XLA_FLAGS alone (measures JAX's default CPU convolutions)")
  p.add_argument("--compile-search", action="store_true",
                 help="torch.compile rows try every layout and thread setting too (default: "
                      "they reuse torch eager's choice from the same run; each candidate "
                      "costs a compile)")
  p.add_argument("--bf16-rtol", type=float,
                 help="relative tolerance of the bf16 loss check (default "
                      "harness.BF16_LOSS_RTOL, beside harness.BF16_LOSS_ATOL)")
  p.add_argument("--time-limit-s", type=float,
                 help="start no new implementation x dtype block after this many seconds "
                      "(its rows are recorded as skipped); the JSON keeps what was measured")
  p.add_argument("--commit", help="git commit to record (for copies without .git)")
  p.add_argument("--markdown", metavar="JSON",
                 help="print the best-against-best table of a results JSON as Markdown (the "
                      "README's) and exit; runs nothing")
  args = p.parse_args(argv)
  if args.markdown:
    import json

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    with open(args.markdown, encoding="utf-8") as f:
      record = json.load(f)
    if "best_vs_best" not in record:
      p.error(f"--markdown: {args.markdown} has no best_vs_best (written by an older run?)")
    print(harness.format_best_markdown(record["best_vs_best"]))
    return
  if args.bf16_rtol is not None and not args.bf16_rtol >= 0:
    p.error(f"--bf16-rtol must be >= 0, got {args.bf16_rtol}")
  if args.time_limit_s is not None and not args.time_limit_s > 0:
    p.error(f"--time-limit-s must be > 0, got {args.time_limit_s}")
  # Before JAX starts on a GPU: leave memory for torch in the same process.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

  import siamjax.xla

  if not args.no_fast_cpu:
    siamjax.xla.enable_fast_cpu()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import harness
  import jax

  on_cpu = jax.default_backend() == "cpu"
  cfg = harness.Config()
  if on_cpu:
    cfg.batches, cfg.repeats, cfg.steps = (32, 128), 3, 1
  else:
    cfg.batches, cfg.repeats, cfg.steps = (128, 512), 10, 10
    cfg.matmul_n, cfg.matmul_products = 8192, 10
  if args.smoke:
    cfg.batches, cfg.repeats, cfg.steps = (2,), 1, 1
    cfg.dtypes, cfg.torch_compile, cfg.lake_runs, cfg.matmul_n = ("float32",), False, 1, 512
    cfg.compare_direct = False
  for name in ("batches", "repeats", "steps", "modes", "dtypes", "devices"):
    if getattr(args, name) is not None:
      setattr(cfg, name, tuple(getattr(args, name)) if name in ("batches", "modes", "dtypes",
                                                                "devices")
              else getattr(args, name))
  if args.no_torch_compile:
    cfg.torch_compile = False
  cfg.keras = not args.no_keras
  cfg.compare_direct = cfg.compare_direct and not args.no_direct
  cfg.augment = not args.no_augment
  cfg.compile_search = args.compile_search
  cfg.time_limit_s = args.time_limit_s
  if args.bf16_rtol is not None:
    cfg.bf16_loss_rtol = args.bf16_rtol
  here = os.path.dirname(os.path.abspath(__file__))
  out = args.out or os.path.join(here, "results", harness.device_slug() + ".json")
  png = args.png or (None if args.smoke else os.path.splitext(out)[0] + ".png")
  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
  harness.run(cfg, out, png, command, commit=args.commit)


if __name__ == "__main__":
  main()
