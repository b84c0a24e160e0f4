"""Exact k-nearest-neighbour search: siamjax's Index against FAISS's flat indexes.

Full run, holding the CPU lock on the project's machines::

    flock /tmp/siamjax-cpu.lock python benchmarks/search_per_sec.py

For gallery sizes 10^4, 10^5 and 10^6 and D = 128 and 512 (float32, Gaussian rows), it
times exact k = 10 search of 1,000 queries with :class:`siamjax.index.Index` (squared
Euclidean and dot product) and with FAISS's ``IndexFlatL2`` and ``IndexFlatIP``, each in
a process of its own on the same data, and records:

* queries per second (min, median and max over the timed repeats; the first call, which
  compiles, is reported apart);
* peak resident memory during search above the memory held before the gallery existed,
  as a multiple of the gallery's size (the kernel's ``VmHWM``, reset once the index is
  built);
* the floor: the search's matrix products at this machine's measured float32 matmul
  rate, or the gallery's reads at its measured memory bandwidth, whichever is slower;
* agreement: the share of siamjax's top-10 lists equal to FAISS's.

Each cell runs two rounds of one process per framework, in alternating order, and pools
their timed searches. Then FAISS IVF and HNSW behind the same ``Index.search``
(``backend="faiss_ivf"`` / ``"faiss_hnsw"``), recall@10 against the exact answer and
queries per second, at 10^5 x 128, on rows of low intrinsic dimension (as learned
embeddings are; on structureless Gaussian rows no approximate index does well). It writes ``benchmarks/results/search-<machine>.json`` and a PNG beside it, and
prints a table. CI smoke run (seconds, no timing claims)::

    python benchmarks/search_per_sec.py --smoke --out /tmp/search_smoke.json

FAISS rows need ``pip install -e '.[faiss]'``; without it the siamjax rows run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _timing import repeat_until, reset_peak, status_bytes

K = 10


def _rss(field: str) -> int:
  """A memory field of this process in bytes; 0 off Linux, so differences stay defined."""
  return status_bytes(field) or 0


def _data(n: int, d: int, q: int, seed: int = 0):
  """Gaussian gallery and query rows: no structure for a search to exploit."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d), dtype=np.float32),
          rng.standard_normal((q, d), dtype=np.float32))


def _embedding_like(n: int, d: int, q: int, seed: int = 1, intrinsic: int = 16):
  """Rows near a random 16-dimensional subspace, with a little noise in every direction:
  the low intrinsic dimension of learned embeddings, which approximate search exploits."""
  import numpy as np
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((intrinsic, d), dtype=np.float32)
  def rows(m):
    return (rng.standard_normal((m, intrinsic), dtype=np.float32) @ basis
            + 0.1 * rng.standard_normal((m, d), dtype=np.float32))
  return rows(n), rows(q)


def child(args) -> dict:
  """One framework on one (N, D) cell, in its own process (see ``main``)."""
  import numpy as np
  if args.framework == "siamjax":
    import jax
    import jax.numpy as jnp
    from siamjax import index as ix
    jax.devices()  # the runtime's own memory is not the search's
  else:
    import faiss
  base_rss = _rss("VmRSS")
  g, q = _data(args.n, args.d, args.queries)
  rows = []
  if args.framework == "siamjax":
    gal = jax.device_put(g)
    jax.block_until_ready(gal)
    del g  # the device copy is now the only one
    base_rss = min(base_rss, _rss("VmRSS"))
    for kind in ("squared_euclidean", "dot"):
      index = ix.Index.build(gal, np.zeros(args.n, np.int32), metric=ix.Metric(kind))
      reset_peak()
      before = _rss("VmRSS")
      t = time.perf_counter()
      first = index.search(q, K)
      first_s = time.perf_counter() - t
      times = repeat_until(lambda: index.search(q, K), args.repeats, args.min_total_s)
      rows.append({"metric": kind, "first_call_s": first_s, "times_s": times,
                   "peak_rss_bytes": _rss("VmHWM") - base_rss,
                   "rss_before_search_bytes": before - base_rss,
                   "top": first.indices[:args.agree_rows].tolist()})
      del index
    # The machine's own rates, for the floor: a large float32 product and a gallery read.
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t_mm = min(repeat_until(lambda: mm(a).block_until_ready(), 5, 0.5))
    rd = jax.jit(lambda x: jnp.sum(x, axis=0))
    rd(gal).block_until_ready()
    t_rd = min(repeat_until(lambda: rd(gal).block_until_ready(), 3, 0.3))
    rates = {"matmul_flops_per_s": 2 * 2048 ** 3 / t_mm,
             "read_bytes_per_s": gal.size * 4 / t_rd}
  else:
    rates = {}
    for kind, cls in (("squared_euclidean", faiss.IndexFlatL2),
                      ("dot", faiss.IndexFlatIP)):
      index = cls(args.d)
      index.add(g)
      if kind == "dot":
        del g  # FAISS holds its own copy; the second index is the last to need it
        base_rss = min(base_rss, _rss("VmRSS"))
      reset_peak()
      before = _rss("VmRSS")
      t = time.perf_counter()
      _, top = index.search(q, K)
      first_s = time.perf_counter() - t
      times = repeat_until(lambda: index.search(q, K), args.repeats, args.min_total_s)
      rows.append({"metric": kind, "first_call_s": first_s, "times_s": times,
                   "peak_rss_bytes": _rss("VmHWM") - base_rss,
                   "rss_before_search_bytes": before - base_rss,
                   "top": top[:args.agree_rows].tolist()})
      del index
  return {"rows": rows, "rates": rates}


def approximate(args) -> list[dict]:
  """FAISS IVF and HNSW behind ``Index.search``: recall@10 and queries/s (own process)."""
  import numpy as np
  from siamjax import index as ix
  g, q = _embedding_like(args.n, args.d, args.queries)
  labels = np.zeros(args.n, np.int32)
  metric = ix.Metric("squared_euclidean")
  exact_index = ix.Index.build(g, labels, metric=metric)
  exact_index.search(q, K)
  exact_times = repeat_until(lambda: exact_index.search(q, K), args.repeats, args.min_total_s)
  exact = exact_index.search(q, K).indices
  out = [{"backend": "exact", "options": {}, "build_s": None, "recall_at_10": 1.0,
          "times_s": exact_times}]
  nlist = max(1, min(4 * int(np.sqrt(args.n)), args.n // 39))
  sweeps = [("faiss_ivf", {"nlist": nlist}, "nprobe", (1, 4, 16, 64)),
            ("faiss_hnsw", {"m": 32, "ef_construction": 40}, "ef_search", (16, 64, 256))]
  for backend, opts, knob, values in sweeps:
    t = time.perf_counter()
    index = ix.Index.build(g, labels, metric=metric, backend=backend, **opts)
    build_s = time.perf_counter() - t
    for v in values:
      ix._faiss_configure(index._faiss, backend, {knob: v})
      try:
        found = index.search(q, K).indices
      except ValueError as e:  # too few probed: fewer than k found for some queries
        out.append({"backend": backend, "options": {**opts, knob: v}, "build_s": build_s,
                    "recall_at_10": None, "times_s": [], "error": str(e)})
        continue
      recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)]))
      times = repeat_until(lambda: index.search(q, K), args.repeats, args.min_total_s)
      out.append({"backend": backend, "options": {**opts, knob: v}, "build_s": build_s,
                  "recall_at_10": recall, "times_s": times})
  return out


def _spawn(argv: list[str]) -> dict:
  p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True,
                     text=True)
  if p.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def _summary(times: list[float], queries: int) -> dict:
  import numpy as np
  rates = sorted(queries / t for t in times)
  return {"queries_per_s": float(np.median(rates)), "queries_per_s_min": rates[0],
          "queries_per_s_max": rates[-1], "repeats": len(times)}


def _plot(cells: list[dict], approx: list[dict], path: str, title: str) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot")
    return
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  ax = axes[0]
  styles = {"siamjax": "-o", "faiss": "--s"}
  for fw in ("siamjax", "faiss"):
    for metric in ("squared_euclidean", "dot"):
      for d in sorted({c["d"] for c in cells}):
        pts = [(c["n"], c["queries_per_s"]) for c in cells
               if c["framework"] == fw and c["metric"] == metric and c["d"] == d]
        if pts:
          xs, ys = zip(*sorted(pts))
          ax.plot(xs, ys, styles[fw], label=f"{fw} {metric} D={d}")
  ax.set(xscale="log", yscale="log", xlabel="gallery size N",
         ylabel="queries / s (exact, k = 10)", title="exact search")
  ax.legend(fontsize=7)
  ax = axes[1]
  for backend in ("faiss_ivf", "faiss_hnsw", "exact"):
    pts = [(a["queries_per_s"], a["recall_at_10"]) for a in approx
           if a["backend"] == backend and not a.get("error")]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, "-o" if backend != "exact" else "*", label=backend, markersize=8)
  ax.set(xscale="log", xlabel="queries / s", ylabel="recall@10",
         title="approximate backends behind Index.search")
  ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny run for CI: N = 1000, D = 16")
  p.add_argument("--out", help="JSON path (default benchmarks/results/search-<machine>.json)")
  p.add_argument("--sizes", type=int, nargs="+", help="gallery sizes (default 1e4 1e5 1e6)")
  p.add_argument("--dims", type=int, nargs="+", help="embedding sizes (default 128 512)")
  p.add_argument("--queries", type=int, help="queries per search (default 1000)")
  p.add_argument("--repeats", type=int, help="timed searches per row and round (default 5)")
  p.add_argument("--rounds", type=int, default=None,
                 help="processes per framework and cell, alternating (default 2)")
  p.add_argument("--min-total-s", type=float, default=None,
                 help="a fast row repeats until its timed searches add up to this (default 1)")
  p.add_argument("--approx-size", type=int, help="gallery size of the IVF/HNSW rows "
                 "(default 100000; D is the first of --dims)")
  p.add_argument("--no-faiss", action="store_true", help="siamjax rows only")
  # A cell in its own process (internal).
  p.add_argument("--child", choices=("siamjax", "faiss", "approx"), help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, help=argparse.SUPPRESS)
  p.add_argument("--d", type=int, help=argparse.SUPPRESS)
  p.add_argument("--agree-rows", type=int, default=100, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  smoke = args.smoke
  args.queries = args.queries or (50 if smoke else 1000)
  args.repeats = args.repeats or (1 if smoke else 5)
  args.rounds = args.rounds or (1 if smoke else 2)
  if args.min_total_s is None:
    args.min_total_s = 0.0 if smoke else 1.0
  if args.child:
    sys.path.insert(0, os.path.dirname(here))
    if args.child == "approx":
      result = {"approx": approximate(args)}
    else:
      args.framework = args.child
      result = child(args)
    print(json.dumps(result))
    return

  sizes = args.sizes or ([1000] if smoke else [10_000, 100_000, 1_000_000])
  dims = args.dims or ([16] if smoke else [128, 512])
  approx_size = args.approx_size or (1000 if smoke else 100_000)
  try:
    import faiss  # noqa: F401
    have_faiss = not args.no_faiss
  except ImportError:
    have_faiss = False
    print("FAISS is not installed (pip install -e '.[faiss]'): siamjax rows only")
  frameworks = ["siamjax"] + (["faiss"] if have_faiss else [])
  common = ["--queries", str(args.queries), "--repeats", str(args.repeats),
            "--min-total-s", str(args.min_total_s)]
  from siamjax import results as res
  load_start = res.load_average()
  cells, raw = [], {}
  for d in dims:
    for n in sizes:
      # Rounds alternate the frameworks' processes (A B, B A, ...), so that a machine
      # slower for a while slows both; every round's timed searches are pooled.
      for fw in frameworks:
        raw[(fw, n, d)] = None
      t = time.perf_counter()
      for rnd in range(args.rounds):
        for fw in (frameworks if rnd % 2 == 0 else frameworks[::-1]):
          out = _spawn(["--child", fw, "--n", str(n), "--d", str(d), *common])
          if raw[(fw, n, d)] is None:
            raw[(fw, n, d)] = out
          else:
            for mine, new in zip(raw[(fw, n, d)]["rows"], out["rows"]):
              mine["times_s"] += new["times_s"]
              mine["peak_rss_bytes"] = max(mine["peak_rss_bytes"], new["peak_rss_bytes"])
      for fw in frameworks:
        out = raw[(fw, n, d)]
        flops = 2.0 * args.queries * n * d
        for r in out["rows"]:
          row = {"framework": fw, "metric": r["metric"], "n": n, "d": d,
                 "queries": args.queries, "k": K, "first_call_s": r["first_call_s"],
                 **_summary(r["times_s"], args.queries), "times_s": r["times_s"],
                 "gallery_bytes": n * d * 4, "peak_rss_bytes": r["peak_rss_bytes"],
                 "peak_over_gallery": r["peak_rss_bytes"] / (n * d * 4),
                 "gflop_per_s": flops * _summary(r["times_s"], args.queries)["queries_per_s"]
                 / args.queries / 1e9}
          cells.append(row)
          print(f"{fw:8s} {r['metric']:18s} N={n:>8d} D={d:4d} "
                f"{row['queries_per_s']:10.0f} q/s ({row['queries_per_s_min']:.0f}-"
                f"{row['queries_per_s_max']:.0f})  peak {row['peak_over_gallery']:.2f}x gallery"
                f"  [{time.perf_counter() - t:.0f} s, {args.rounds} rounds]", flush=True)
      # Floors from the siamjax process's measured rates, and agreement with FAISS.
      rates = raw[("siamjax", n, d)]["rates"]
      blocks = -(-args.queries // 512)  # each query block reads the whole gallery
      compute_s = 2.0 * args.queries * n * d / rates["matmul_flops_per_s"]
      memory_s = blocks * n * d * 4 / rates["read_bytes_per_s"]
      floor_qps = args.queries / max(compute_s, memory_s)
      for row in cells:
        if (row["n"], row["d"]) == (n, d):
          row["floor_queries_per_s"] = floor_qps
          row["floor_bound"] = "matmul" if compute_s >= memory_s else "memory"
          row["of_floor"] = row["queries_per_s"] / floor_qps
          row["machine_rates"] = rates
          if have_faiss:
            mine = [r for r in raw[("siamjax", n, d)]["rows"] if r["metric"] == row["metric"]]
            theirs = [r for r in raw[("faiss", n, d)]["rows"] if r["metric"] == row["metric"]]
            row["top10_lists_equal_to_faiss"] = sum(
                a == b for a, b in zip(mine[0]["top"], theirs[0]["top"])) / len(mine[0]["top"])
  approx = []
  if have_faiss:
    t = time.perf_counter()
    out = _spawn(["--child", "approx", "--n", str(approx_size), "--d", str(dims[0]), *common])
    for a in out["approx"]:
      a.update(n=approx_size, d=dims[0])
      approx.append(a)
      if a.get("error"):
        print(f"{a['backend']:10s} {json.dumps(a['options']):40s} {a['error']}")
        continue
      a.update(_summary(a["times_s"], args.queries))
      print(f"{a['backend']:10s} {json.dumps(a['options']):40s} recall@10 "
            f"{a['recall_at_10']:.3f} {a['queries_per_s']:10.0f} q/s", flush=True)
    print(f"[approximate rows: {time.perf_counter() - t:.0f} s]")
  ratios = []
  for row in cells:
    if row["framework"] != "siamjax" or not have_faiss:
      continue
    other = [c for c in cells if c["framework"] == "faiss" and c["metric"] == row["metric"]
             and (c["n"], c["d"]) == (row["n"], row["d"])][0]
    ratios.append({"metric": row["metric"], "n": row["n"], "d": row["d"],
                   "siamjax_over_faiss": row["queries_per_s"] / other["queries_per_s"],
                   "worst_case_ratio": row["queries_per_s_min"] / other["queries_per_s_max"]})
  from siamjax.machine import cpu_model
  slug = "cpu-" + "-".join(cpu_model().lower().split()[:3]) + f"-{os.cpu_count()}core"
  out_path = args.out or os.path.join(here, "results", f"search-{slug}.json")
  record = res.record({
      "benchmark": "exact k-NN search, k = 10, float32 Gaussian rows; approximate search "
                   "on rows near a 16-dimensional subspace",
      "rounds": args.rounds,
      "smoke": smoke, "queries": args.queries,
      "faiss_version": __import__("faiss").__version__ if have_faiss else None,
      "exact": cells, "siamjax_over_faiss": ratios, "approximate": approx,
      "notes": [
          "Each framework runs in its own process on the same data; FAISS uses its "
          "OpenMP threads, XLA its own thread pool, on every core.",
          "peak_over_gallery: peak resident memory during search above what the process "
          "held before the gallery existed, over the gallery's bytes.",
          "floor: the search's matrix products at the measured float32 matmul rate "
          "(2048^3), or one read of the gallery per 512-query block at the measured read "
          "rate, whichever is slower.",
      ]}, load_average_at_start=load_start)
  res.write_json(out_path, record)
  png = os.path.splitext(out_path)[0] + ".png"
  _plot(cells, approx, png, f"{record['machine']['cpu_model']} ({os.cpu_count()} cores), "
        f"{args.queries} queries, k = {K}")
  print(f"wrote {out_path} and {png}")
  if ratios:
    worst = min(ratios, key=lambda r: r["siamjax_over_faiss"])
    print(f"siamjax / FAISS flat, lowest median ratio: {worst['siamjax_over_faiss']:.2f}x "
          f"({worst['metric']}, N = {worst['n']}, D = {worst['d']})")


if __name__ == "__main__":
  main()
