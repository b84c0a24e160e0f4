"""In-batch loss + gradient throughput: siamjax vs pytorch-metric-learning (PML).

Full run on this machine's default JAX device, holding the CPU lock on the project's
machines::

    flock /tmp/siamjax-cpu.lock python benchmarks/losses_per_sec.py

times every in-batch loss of siamjax and its PML equivalent, loss and gradient with
respect to the embeddings, at B = 256, 1024 and 4096 with D = 512, writes
``benchmarks/results/losses-<device-slug>.json`` and prints one table. CI smoke run
(seconds, no timing claims)::

    python benchmarks/losses_per_sec.py --smoke --out /tmp/losses_smoke.json

PML rows need ``pip install -e '.[pml]'`` (and torch); without it the siamjax rows run
alone. Losses siamjax does not have yet are skipped with a printed reason. What each row
measures (compile apart, the spread, compiled temporaries, peak resident memory, the
equality check against PML) is in ``benchmarks/losses_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny run for CI: B = 16, D = 8, one repeat, every loss")
  p.add_argument("--out", help="JSON path (default benchmarks/results/losses-<device>.json)")
  p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 256 1024 4096)")
  p.add_argument("--dim", type=int, help="embedding size D (default 512)")
  p.add_argument("--repeats", type=int, help="timed calls per row (default 5)")
  p.add_argument("--slow-repeats", type=int,
                 help="timed calls of a row whose first call took over 2 s (default 2)")
  p.add_argument("--min-total-s", type=float,
                 help="a fast row repeats until its timed calls add up to this (default 0.5)")
  p.add_argument("--pml-memory-gib", type=float,
                 help="address-space cap for PML rows beyond the process's size (default 6; "
                      "0: no cap). A row that needs more is reported as skipped")
  p.add_argument("--losses", nargs="+", help="loss names (default: all)")
  p.add_argument("--no-pml", action="store_true", help="siamjax rows only")
  p.add_argument("--stages", action="store_true",
                 help="also time each loss's value alone (forward pass): how its time "
                      "splits between the forward and backward passes")
  p.add_argument("--fast-cpu", action="store_true",
                 help="set siamjax.xla.FAST_CPU_FLAGS first (default: XLA's own flags, which "
                      "run most losses 10-50%% faster here; the fast flags are tuned for the "
                      "Koch convnet)")
  p.add_argument("--markdown", metavar="JSON",
                 help="print a results JSON's time-to-floor and PML table as Markdown and "
                      "exit; runs nothing")
  args = p.parse_args(argv)
  if args.markdown:
    import json

    import losses_bench as lb
    with open(args.markdown, encoding="utf-8") as f:
      print(lb.format_floor_markdown(json.load(f)["rows"]))
    return

  import siamjax.xla

  if args.fast_cpu:
    siamjax.xla.enable_fast_cpu()
  import losses_bench as lb
  import harness

  cfg = lb.Config()
  if args.smoke:
    cfg.batches, cfg.dim, cfg.repeats, cfg.slow_repeats, cfg.min_total_s = (16,), 8, 1, 1, 0.0
  for name in ("batches", "dim", "repeats", "slow_repeats", "min_total_s", "pml_memory_gib",
               "losses"):
    value = getattr(args, name)
    if value is not None:
      setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
  unknown = set(cfg.losses) - set(lb.LOSS_NAMES)
  if unknown:
    p.error(f"unknown --losses {sorted(unknown)}; choose from {list(lb.LOSS_NAMES)}")
  if any(b % 4 for b in cfg.batches):
    p.error("--batches must be multiples of 4 (P x K batches with K = 4)")
  cfg.pml = not args.no_pml
  cfg.stages = args.stages
  if cfg.pml_memory_gib is not None and cfg.pml_memory_gib <= 0:
    cfg.pml_memory_gib = None
  out = args.out or os.path.join(here, "results", f"losses-{harness.device_slug()}.json")
  from siamjax.results import command_line
  lb.run(cfg, out, command_line())


if __name__ == "__main__":
  main()
