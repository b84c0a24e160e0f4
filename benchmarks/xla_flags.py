"""Training-step throughput of each recipe's model with and without siamjax.xla.FAST_CPU_FLAGS.

::

    flock -x /tmp/siamjax-cpu.lock python benchmarks/xla_flags.py

XLA reads ``XLA_FLAGS`` once per process, so every (workload, setting) runs in a fresh
process: the workload's jitted training step (value and gradient of the recipe's loss over
its model, then the optimiser's update, state donated) at the recipe's default batch, on
fixed random inputs of the recipe's shapes, compiled and run once, then timed over
``--min-s`` seconds of steps (at least 3), each around ``block_until_ready``. The two
settings alternate in order from round to round (``--rounds``, default 2). The table gives
each workload's median step time over every timed step of its rounds with and without
the flags, their spreads (fastest and slowest step) and the ratio; the JSON
(``benchmarks/results/xla-flags-<device-slug>.json``) holds, per setting, the quartiles
of every timed step and each round's median and number of steps. The setting each
script uses (``FAST_CPU`` in its recipe module) follows this table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# workload -> (recipe script, what the step computes)
WORKLOADS = {
    "omniglot_koch": ("experiments/omniglot_koch.py",
                      "koch_siamese() float32, pair_bce_loss, SGD momentum; 32 pairs of "
                      "105x105x1"),
    "image_folder": ("experiments/image_folder.py",
                     "SiameseNet(SmallCNN()), pair_bce_loss, Adam; 32 pairs of 48x48x3"),
    "mnist_contrastive": ("experiments/mnist_contrastive.py",
                          "MLP(128, 128, 128) tower, contrastive_loss, Adam; 128 pairs of "
                          "28x28"),
    "mnist_triplet": ("experiments/mnist_triplet.py",
                      "MLP(128, 128, 128) tower, batch_all_triplet_loss, Adam; P x K = "
                      "10 x 16 images of 28x28"),
    "vector_pairs": ("experiments/vector_pairs.py",
                     "MLP(128, 128, 64), contrastive_loss, Adam; 128 pairs of 200 features"),
    "thucnews_splitview": ("experiments/thucnews_fewshot.py",
                           "n-gram bag (vocabulary 50,000 x 128), split-view ntxent_loss, "
                           "Adam; 512 titles of 64 n-grams"),
    "thucnews_seed_textcnn": ("experiments/thucnews_fewshot.py",
                              "TextCNN (vocabulary 5,000), contrastive_loss, Adam; 32 pairs "
                              "of 32 characters"),
    "loss_multi_similarity": ("benchmarks/losses_per_sec.py",
                              "multi_similarity_loss value and gradient, B = 1024, D = 512"),
    "loss_in_batch_softmax": ("benchmarks/losses_per_sec.py",
                              "in_batch_softmax_loss value and gradient, B = 1024, D = 512"),
}


def _step(name: str):
  """``(step, state, batch)``: ``state = step(state, batch)`` is one training update."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from siamjax import bag, distances, encoders, losses, models
  from siamjax.recipes import mnist, thucnews

  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  f32 = lambda *s: jnp.asarray(rng.random(s, np.float32))  # noqa: E731

  if name.startswith("loss_"):
    fn = {"loss_multi_similarity": lambda e, y: losses.multi_similarity_loss(
              e, y, alpha=2.0, beta=50.0, base=0.5),
          "loss_in_batch_softmax": lambda e, y: losses.in_batch_softmax_loss(
              e, y, temperature=1.0)}[name]
    per_class = 2 if name == "loss_in_batch_softmax" else 4
    emb = jnp.asarray(rng.standard_normal((1024, 512), np.float32) / np.sqrt(512))
    y = jnp.asarray(rng.permutation(np.arange(1024) // per_class).astype(np.int32))
    grad = jax.value_and_grad(lambda e: jnp.mean(fn(e, y)))

    def step(e, batch):
      del batch
      v, g = grad(e)
      return e - 1e-3 * g + 0 * v

    return step, emb, None

  def pair_bce(net):
    def loss(params, batch):
      return jnp.mean(losses.pair_bce_loss(net.apply({"params": params}, batch["a"],
                                                     batch["b"]), batch["y"]))
    return loss

  def contrastive(tower, margin=1.0):
    def loss(params, batch):
      b = batch["a"].shape[0]
      h = tower.apply({"params": params}, jnp.concatenate([batch["a"], batch["b"]]))
      return jnp.mean(losses.contrastive_loss(distances.euclidean(h[:b], h[b:]), batch["y"],
                                              margin=margin))
    return loss

  y32 = jnp.asarray(rng.integers(0, 2, 32).astype(np.float32))
  y128 = jnp.asarray(rng.integers(0, 2, 128).astype(np.float32))
  if name == "omniglot_koch":
    net, opt = models.koch_siamese(), optax.sgd(1e-3, momentum=0.9)
    batch = {"a": f32(32, 105, 105, 1), "b": f32(32, 105, 105, 1), "y": y32}
    params = net.init(key, batch["a"][:1], batch["b"][:1])["params"]
    loss = pair_bce(net)
  elif name == "image_folder":
    net, opt = models.SiameseNet(encoder=encoders.SmallCNN()), optax.adam(1e-3)
    batch = {"a": f32(32, 48, 48, 3), "b": f32(32, 48, 48, 3), "y": y32}
    params = net.init(key, batch["a"][:1], batch["b"][:1])["params"]
    loss = pair_bce(net)
  elif name == "mnist_contrastive":
    tower, opt = encoders.MLP(features=(128, 128, 128)), optax.adam(1e-3)
    batch = {"a": f32(128, 28, 28), "b": f32(128, 28, 28), "y": y128}
    params = tower.init(key, batch["a"][:1])["params"]
    loss = contrastive(tower)
  elif name == "mnist_triplet":
    tower, opt = mnist.TOWER, optax.adam(1e-3)
    batch = {"x": f32(160, 28, 28), "y": jnp.repeat(jnp.arange(10), 16)}
    params = tower.init(key, batch["x"][:1])["params"]

    def loss(params, batch):
      h = tower.apply({"params": params}, batch["x"], train=True,
                      rngs={"dropout": jax.random.key(1)})
      return jnp.mean(losses.batch_all_triplet_loss(h, batch["y"], margin=1.0))
  elif name == "vector_pairs":
    tower, opt = encoders.MLP(features=(128, 128, 64)), optax.adam(1e-3)
    batch = {"a": f32(128, 200), "b": f32(128, 200), "y": y128}
    params = tower.init(key, batch["a"][:1])["params"]
    loss = contrastive(tower)
  elif name == "thucnews_splitview":
    opt = optax.adam(2e-3)
    params = bag.init_bag(key, 50_000, 128)
    batch = {"tokens": jnp.asarray(rng.integers(1, 50_000, (20_000, 64)).astype(np.int32))}
    fn = thucnews.split_view_loss_fn(batch_size=512, temperature=0.1)
    loss = lambda params, batch: fn(params, None, batch, jax.random.key(2))[0]  # noqa: E731
  elif name == "thucnews_seed_textcnn":
    net, opt = encoders.TextCNN(vocab_size=5000), optax.adam(1e-3)
    tokens = jnp.asarray(rng.integers(1, 5000, (64, 32)).astype(np.int32))
    params = net.init(key, tokens[:1])["params"]
    batch = {"a": tokens[:32], "b": tokens[32:], "y": y32}
    loss = contrastive(net, margin=2.0)
  else:
    raise ValueError(f"unknown workload {name!r}")

  grad = jax.value_and_grad(loss)

  def step(state, batch):
    params, opt_state = state
    _, g = grad(params, batch)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, (params, opt.init(params)), batch


def child(name: str, min_s: float) -> dict:
  """Times one workload in this process (XLA_FLAGS as the parent set them)."""
  import jax

  step, state, batch = _step(name)
  jitted = jax.jit(step, donate_argnums=0)
  t0 = time.perf_counter()
  state = jax.block_until_ready(jitted(state, batch))
  first_s = time.perf_counter() - t0
  times = []
  while len(times) < 3 or sum(times) < min_s:
    t0 = time.perf_counter()
    state = jax.block_until_ready(jitted(state, batch))
    times.append(time.perf_counter() - t0)
  return {"first_call_s": first_s, "step_s_all": times,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--min-s", type=float, default=3.0, help="timed seconds per process")
  p.add_argument("--out", help="JSON path (default benchmarks/results/xla-flags-<device>.json)")
  p.add_argument("--markdown", metavar="JSON",
                 help="print a results JSON's table as Markdown and exit; runs nothing")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.markdown:
    with open(args.markdown, encoding="utf-8") as f:
      print(format_table(json.load(f)["rows"]))
    return
  if args.child:
    print(json.dumps(child(args.child, args.min_s)))
    return
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  from siamjax import results
  from siamjax.xla import FAST_CPU_FLAGS

  load = results.load_average()
  t_start = time.time()
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SIAMJAX_NO_XLA_FLAGS")}
  base["PYTHONPATH"] = os.pathsep.join([ROOT] + [base["PYTHONPATH"]] * bool(
      base.get("PYTHONPATH")))
  settings = {"fast_cpu_flags": dict(base, XLA_FLAGS=FAST_CPU_FLAGS),
              "xla_defaults": dict(base, XLA_FLAGS="")}
  runs = {w: {s: [] for s in settings} for w in args.workloads}
  for r in range(args.rounds):
    for i, w in enumerate(args.workloads):
      order = list(settings) if (r + i) % 2 == 0 else list(settings)[::-1]
      for s in order:
        out = subprocess.run([sys.executable, __file__, "--child", w, "--min-s",
                              str(args.min_s)], env=settings[s], capture_output=True,
                             text=True, check=True).stdout
        runs[w][s].append(json.loads(out.strip().splitlines()[-1]))
        med = statistics.median(runs[w][s][-1]["step_s_all"]) * 1e3
        print(f"round {r + 1} {w:24} {s:15} {med:9.2f} ms", flush=True)
  rows = []
  for w in args.workloads:
    row = {"workload": w, "recipe": WORKLOADS[w][0], "step": WORKLOADS[w][1]}
    for s in settings:
      all_s = [t for run in runs[w][s] for t in run["step_s_all"]]
      row[s] = {"step_s": statistics.median(all_s), "step_s_min": min(all_s),
                "step_s_max": max(all_s),
                "steps": len(all_s), "quartiles_s": statistics.quantiles(all_s, n=4),
                "round_medians_s": [statistics.median(run["step_s_all"]) for run in runs[w][s]],
                "round_steps": [len(run["step_s_all"]) for run in runs[w][s]],
                "first_call_s": [run["first_call_s"] for run in runs[w][s]]}
    row["flags_speedup"] = row["xla_defaults"]["step_s"] / row["fast_cpu_flags"]["step_s"]
    rows.append(row)
  import harness

  out = args.out or os.path.join(HERE, "results", f"xla-flags-{harness.device_slug()}.json")
  body = {"fast_cpu_flags": FAST_CPU_FLAGS, "rounds": args.rounds, "min_s": args.min_s,
          "notes": ["One fresh process per (workload, setting, round); settings alternate "
                    "in order. step_s: median over every timed step of the rounds; "
                    "flags_speedup: xla_defaults step_s / fast_cpu_flags step_s (> 1: the "
                    "flags help)."],
          "rows": rows, "wall_s": time.time() - t_start}
  results.write_json(out, results.record(body, command=results.command_line(),
                                         load_average_at_start=load), indent=1)
  print(format_table(rows))
  print(f"wrote {out}")


def format_table(rows) -> str:
  lines = ["| workload | recipe | with flags, ms (spread) | XLA's defaults, ms (spread) | "
           "speed-up from the flags |", "|---|---|---|---|---|"]
  for r in rows:
    f, d = r["fast_cpu_flags"], r["xla_defaults"]
    cell = lambda x: (f"{x['step_s'] * 1e3:.2f} ({x['step_s_min'] * 1e3:.2f}-"  # noqa: E731
                      f"{x['step_s_max'] * 1e3:.2f})")
    lines.append(f"| {r['workload']} | `{r['recipe']}` | {cell(f)} | {cell(d)} | "
                 f"{r['flags_speedup']:.2f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
