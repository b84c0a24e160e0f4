"""Every GPU figure the README needs, in one command, into one folder (issue 14).

On a lent GPU machine (one H200 or H100), from the checkout's root, with Omniglot
prepared beforehand in ``device_data/`` (``--prepare-data``, below)::

    PYTHONPATH=$PWD python3 benchmarks/device_suite.py --out $OUT --commit SHA

On this project's CPU machines and in CI, the same code paths at tiny sizes (2-3 minutes)::

    python benchmarks/device_suite.py --dry-run --out /tmp/suite

One process tree; the parent imports no JAX (so it holds no GPU memory) and runs each
stage as a child process with its own time limit, killed with its process group when
the limit passes. Every stage's output is streamed into ``--out/suite.log`` and printed
(``PYTHONUNBUFFERED=1``), one ``figure:`` line per figure as soon as it exists.
``summary.json`` is rewritten (atomically) when each stage starts and ends, naming the
stages ``finished`` and the one ``running``, so a kill at any moment leaves it valid.
Real runs set ``JAX_PLATFORMS=cuda`` for every stage: a failed CUDA start is an error,
never a run on the CPU.

Stages, the most valuable figure first:

0. ``preflight`` (<= 90 s; past it, a warning and the suite goes on): JAX starts first
   (``jax.devices()``; torch's cuDNN loaded before it can make JAX fall back to the CPU),
   then the versions of jaxlib and its CUDA plugin, flax, optax, orbax-checkpoint, chex;
   then torch (CUDA, cuDNN) and the optional packages (triton, Pillow, matplotlib, tqdm),
   reported present or absent; ``nvidia-smi``. ``preflight.json`` is rewritten after each
   part. Aborts only when a package ``paper_fast`` needs fails to import or JAX's backend
   is not the GPU (``--dry-run`` allows both and says so).
1. ``paper_fast``: ``experiments/omniglot_koch.py --preset paper_fast`` (Koch's network
   trained for its 5-minute budget, then Lake's 400 trials). Its stage limit is the time
   left less ``BENCH_RESERVE_S``, its training limit ``min(300, limit - 90)``; it
   checkpoints at the end only (what Lake's score restores). Its work directory (~1 GB
   of checkpoints) is a temporary folder; ``metrics.jsonl`` and ``results.json`` are
   copied into ``--out`` while it runs.
2. ``bench``: ``benchmarks/pairs_per_sec.py`` through its command line, in whatever time
   is left: siamjax, then PyTorch eager, then ``torch.compile`` (last: its graphs compile
   slowest), float32 and bf16, batch 512 then 128, training / inference / Lake's 400
   trials, 5 repeats of 10 steps (no Keras: the device image lacks it). No new block
   starts in its last ``BENCH_TAIL_S``; rows stream into ``bench.json`` and the plot is
   redrawn after each block, so a cut keeps both.

``--out`` receives at most these 7 files (the ``run`` tool brings back 8 at most, each
< 16 MiB, at most two folders down; the suite checks that at the end):
``suite.log``, ``preflight.json``, ``paper_fast.json``, ``paper_fast_metrics.jsonl``,
``bench.json``, ``bench.png``, ``summary.json``.

Plan (one H200), compiles counted. Compile times are the CPU dry run's, measured on the
2-core AMD EPYC (siamjax's batch-2 train step 3.3 s, inference 0.4 s, Lake 0.7 s; the
paper_fast step 7 s), scaled by 8 for cuDNN autotuning at batches 128-512 on the GPU and
rounded up: ~25 s per train program, ~5 s per inference or Lake program; a
``torch.compile`` graph ~20-40 s (inductor's autotuning, training graphs forward and
backward). Timed work from counted FLOPs (a training pair ~10.9 GFLOP) at 30% of the
~790 TFLOP/s bf16 matmul peak: ~22k training pairs/s in bf16, half in float32, PyTorch
eager at half siamjax's rate:

=============  ===========  ==========================================================
stage          limit (s)    what fills it
=============  ===========  ==========================================================
preflight      <= 90        imports and JAX's start ~10 s, torch's CUDA start ~5 s,
                            nvidia-smi; typical ~20 s
paper_fast     left - 110   start ~10 s (prepared arrays, no PNG; 212 MB to the
               (<= 420)     device); training 300 s, its ~30 s compile inside; after
                            it ~35 s: final validation (1 program), two ~470 MB saves
                            and a restore, Lake's evaluation (1 program): ~345 s
bench          left - 10    the matmul peak and the FLOP count (4 XLA programs, ~10 s);
                            per dtype, siamjax's 5 XLA programs (2 train, 2 inference,
                            Lake: ~65 s) and ~5 s timed (a batch-512 training row is 60
                            steps = 0.33 PFLOP: 1.4 s in bf16, 2.8 s in float32);
                            torch eager ~10 s per dtype; then torch.compile's 10
                            graphs (~300 s: what time is left of them)
=============  ===========  ==========================================================

In all the bench compiles 14 XLA programs and 10 torch.compile graphs
(:func:`planned_compiles`). With ~20 s of preflight, paper_fast ends near 365 s and the
bench has ~165 s: siamjax's two dtypes (~150 s) and most of torch eager's rows, rarely
any ``torch.compile`` row. Total ``--total-limit-s 540`` (a stage never runs past it);
the ``run`` tool's command limit is 600 s.

XLA's GPU flags are left at their defaults (autotune level 4, Triton GEMM and command
buffers on in jax 0.11): XLA aborts at start on a flag it does not know, and a blind run
on a machine lent for 15 minutes cannot afford that; the Koch network's time is in
cuDNN convolutions, which the autotuner already picks per shape.

Data: the device copy has no ``../shared`` and no network. ``--prepare-data`` writes
Omniglot as prepared arrays (:func:`siamjax.data.omniglot.prepare_arrays`: bit-packed
``.npz``, 5.5 MB) from ``$SIAMJAX_DATA_DIR/omniglot`` (or ``--source-data-dir``) into
``device_data/omniglot/`` and adds ``/device_data/`` to ``.git/info/exclude``; name
``device_data`` in the ``run`` tool's ``carry``. The stages read that folder with
downloads off and decode no PNG (Pillow is not needed on the device). Provenance: the
device copy has no ``.git``, so pass ``--commit``, which wins over any repository
around the copy (recorded in every JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("images_background.zip", "images_evaluation.zip", "all_runs.zip")
PREPARED_FILES = tuple(f.replace(".zip", ".npz") for f in DATA_FILES)
OUT_FILES = ("suite.log", "preflight.json", "bench.json", "bench.png", "paper_fast.json",
             "paper_fast_metrics.jsonl", "summary.json")
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
# Seconds (real run); see the plan in the module docstring.
TOTAL_LIMIT_S = 540        # the run tool's command limit is 600
PREFLIGHT_LIMIT_S = 90     # past it: a warning, the suite goes on
TRAIN_TIME_LIMIT_S = 300   # paper_fast's training budget when the time left allows it
PAPER_FAST_EXTRA_S = 90    # paper_fast's start and its work after training
BENCH_RESERVE_S = 100      # kept for the bench when paper_fast's limit is set
BENCH_TAIL_S = 60          # no new bench block starts in the bench's last 60 s
END_S = 10                 # the suite's own end: figures, summary, output check
# Needed by paper_fast: a failed import aborts a real run. The rest is reported only.
REQUIRED_MODULES = (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
                    ("optax", "optax"), ("orbax-checkpoint", "orbax.checkpoint"),
                    ("chex", "chex"), ("numpy", "numpy"))
OPTIONAL_MODULES = (("torch", "torch"), ("triton", "triton"), ("pillow", "PIL"),
                    ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))
# Tiny sizes of --dry-run: the same commands, seconds each on a 2-core CPU. The bench's
# rows are the real run's: not the direct-convolution rows a CPU run adds (--no-direct).
DRY_BENCH = ["--smoke", "--batches", "2", "--modes", "train", "infer", "lake", "--no-direct"]
DRY_PAPER_FAST = ["--batch-pairs", "4", "--num-steps", "4", "--steps-per-call", "2",
                  "--warmup-steps", "1", "--val-tasks", "2"]
REAL_BENCH = ["--batches", "512", "128", "--modes", "train", "infer", "lake",
              "--dtypes", "float32", "bfloat16", "--repeats", "5", "--steps", "10"]


def planned_compiles(batches: int, modes: int, dtypes: int, torch_compile: bool) -> dict:
  """Programs the bench compiles: XLA's (the matmul peak's 2, the FLOP count's 2, and per
  dtype one per batch of train and infer plus Lake's) and ``torch.compile``'s graphs (one
  per mode, batch and dtype). Lake's mode is counted once per dtype."""
  per_dtype = (modes - 1) * batches + 1
  return {"xla": 4 + dtypes * per_dtype,
          "torch_compile": dtypes * per_dtype if torch_compile else 0}


# ----------------------------------------------------------------------------- data

def _exclude_file() -> Path:
  try:
    out = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    return (ROOT / out).resolve()
  except (OSError, subprocess.SubprocessError):
    return ROOT / ".git" / "info" / "exclude"


def _source(source) -> str:
  """The folder the zips are read from; ``ValueError`` when it lacks one of them."""
  source = source or os.environ.get("SIAMJAX_DATA_DIR")
  if not source:
    raise ValueError("source: no data folder; pass --source-data-dir or set SIAMJAX_DATA_DIR "
                     "to a folder with omniglot/*.zip")
  src = Path(source) / "omniglot"
  missing = [f for f in DATA_FILES if not (src / f).is_file()]
  if missing:
    raise ValueError(f"source: {src} lacks {', '.join(missing)}")
  return str(source)


def prepare_data(dest, source=None, *, exclude: bool = True) -> Path:
  """Writes Omniglot as prepared arrays into ``dest/omniglot`` (no PNG left to decode).

  :func:`siamjax.data.omniglot.prepare_arrays`: the two splits and Lake's runs as
  bit-packed ``.npz`` files (5.5 MB), which the device reads without Pillow.

  Args:
    dest: the folder to fill (``device_data`` in the checkout for the ``run`` tool).
    source: a data folder with ``omniglot/*.zip`` (default ``$SIAMJAX_DATA_DIR``).
    exclude: add ``dest`` to ``.git/info/exclude`` when it lies inside the checkout.

  Returns:
    ``dest``.

  Raises:
    ValueError: no source folder, or a zip missing from it.
  """
  source, dest = _source(source), Path(dest)
  from siamjax.data import omniglot  # here, not at the top: the suite's parent runs no JAX

  omniglot.prepare_arrays(dest, data_dir=source)
  inside = dest.resolve().is_relative_to(ROOT)
  if exclude and inside:
    path = _exclude_file()
    line = "/" + dest.resolve().relative_to(ROOT).as_posix() + "/"
    text = path.read_text() if path.exists() else ""
    if line not in text.split("\n"):
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
  return dest


def _check_data(folder: Path) -> None:
  missing = [f for f in PREPARED_FILES if not (folder / "omniglot" / f).is_file()]
  if missing:
    raise ValueError(f"data-dir: {folder}/omniglot lacks {', '.join(missing)}; run "
                     f"python benchmarks/device_suite.py --prepare-data first (it prepares "
                     f"them from $SIAMJAX_DATA_DIR) and name its folder in the run tool's carry")


# ----------------------------------------------------------------------------- preflight

def _nvidia_smi() -> str:
  cmd = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
         "power.limit", "--format=csv,noheader"]
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return f"unavailable: {type(e).__name__}: {e}"


def _version(mod, dist: str):
  import importlib.metadata as md
  try:
    return getattr(mod, "__version__", None) or md.version(dist)
  except Exception:  # noqa: BLE001 - a version is informational
    return "unknown"


def preflight(dry_run: bool, save=None) -> dict:
  """Versions, devices and the GPU; ``record["abort"]`` names why a real run must stop.

  JAX starts (``jax.devices()``) before torch is imported: torch's cuDNN, loaded first,
  can make JAX refuse its own and fall back to the CPU. ``save(record)`` is called after
  each part, so a preflight cut by its time limit still leaves what it found.
  """
  import importlib
  t0 = time.perf_counter()
  save = save or (lambda rec: None)
  rec = {"versions": {}, "failed_imports": {}, "optional": {},
         "python": sys.version.split()[0], "jax_platforms": os.environ.get("JAX_PLATFORMS")}
  try:
    import jax
    rec["jax_devices"] = [f"{d} ({d.device_kind})" for d in jax.devices()]
    rec["jax_backend"] = jax.default_backend()
  except Exception as e:  # noqa: BLE001 - any failure to start JAX is a failed preflight
    rec["failed_imports"]["jax"] = f"{type(e).__name__}: {e}"[:300]
  rec["time_jax_s"] = round(time.perf_counter() - t0, 2)
  save(rec)
  for dist, mod in REQUIRED_MODULES:
    try:
      rec["versions"][dist] = _version(importlib.import_module(mod), dist)
    except Exception as e:  # noqa: BLE001
      rec["failed_imports"].setdefault(dist, f"{type(e).__name__}: {e}"[:300])
  try:
    import importlib.metadata as md
    rec["jax_plugins"] = sorted(f"{d.metadata['Name']} {d.version}" for d in md.distributions()
                                if (d.metadata["Name"] or "").lower().startswith(
                                    ("jax-cuda", "jax_cuda", "jax-rocm")))
  except Exception as e:  # noqa: BLE001 - informational
    rec["jax_plugins"] = f"unavailable: {e}"
  save(rec)
  for dist, mod in OPTIONAL_MODULES:  # present or absent; never a reason to stop
    try:
      rec["optional"][dist] = _version(importlib.import_module(mod), dist)
    except Exception as e:  # noqa: BLE001
      rec["optional"][dist] = f"absent: {type(e).__name__}: {e}"[:200]
  if not str(rec["optional"]["torch"]).startswith("absent"):
    try:
      import torch
      cuda = torch.cuda.is_available()
      rec["torch_cuda"] = {"available": cuda, "cuda": torch.version.cuda}
      rec["torch_cuda"]["device"] = torch.cuda.get_device_name(0) if cuda else None
      rec["torch_cuda"]["cudnn"] = torch.backends.cudnn.version() if cuda else None
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN older than JAX's: the bench says more
      rec.setdefault("torch_cuda", {})["error"] = f"{type(e).__name__}: {e}"[:300]
  save(rec)
  rec["nvidia_smi"] = _nvidia_smi()
  abort = []
  if rec["failed_imports"]:
    abort.append("failed imports: " + ", ".join(rec["failed_imports"]))
  if rec.get("jax_backend") != "gpu":
    abort.append(f"JAX backend is {rec.get('jax_backend')!r}, not 'gpu'")
  rec["abort"] = None if dry_run or not abort else "; ".join(abort)
  rec["dry_run_allowed"] = abort if dry_run else []
  rec["time_s"] = round(time.perf_counter() - t0, 2)
  save(rec)
  return rec


# ----------------------------------------------------------------------------- running

def _write_json(path: Path, obj) -> None:
  """Writes ``obj`` to ``path`` atomically: a kill leaves the old file or the new one."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
  os.replace(tmp, path)


def _copy(src: Path, dst: Path) -> None:
  """Copies ``src`` over ``dst`` atomically (nothing when ``src`` is missing)."""
  try:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  except OSError:
    pass


class Suite:
  """The parent process: runs the stages, streams their output, writes the summary."""

  def __init__(self, args):
    self.args, self.out = args, Path(args.out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.log = open(self.out / "suite.log", "w", buffering=1)
    self.t0 = time.perf_counter()
    self.child = None
    self.summary = {"suite": "benchmarks/device_suite.py", "dry_run": args.dry_run,
                    "commit": args.commit, "command": " ".join(sys.argv),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "total_limit_s": args.total_limit_s, "finished": [], "running": None,
                    "stages": [], "figures": [], "warnings": [], "files": {}}
    self.lock = threading.Lock()
    self.write_summary()

  def say(self, line: str) -> None:
    with self.lock:
      print(line, flush=True)
      if not self.log.closed:
        self.log.write(line + "\n")

  def warn(self, text: str) -> None:
    self.summary["warnings"].append(text)
    self.say(f"warning: {text}")

  def figure(self, text: str, **values) -> None:
    self.summary["figures"].append({"figure": text, **values})
    self.say(f"figure: {text}")

  def write_summary(self) -> None:
    with self.lock:
      self.summary["wall_s"] = round(time.perf_counter() - self.t0, 1)
      _write_json(self.out / "summary.json", self.summary)

  def left(self) -> float:
    return self.args.total_limit_s - (time.perf_counter() - self.t0)

  def stage(self, name: str, cmd: list[str], limit: float, env: dict, watch=None) -> int:
    """Runs ``cmd`` in its own process group for at most ``limit`` s; returns its status."""
    limit = max(min(limit, self.left()), 1.0)
    self.say(f"== stage {name} at {time.perf_counter() - self.t0:.0f} s (limit {limit:.0f} s):"
             f" {' '.join(cmd)}")
    t = time.perf_counter()
    self.child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  process_group=0)
    self.summary["running"] = {"stage": name, "pid": self.child.pid, "limit_s": round(limit, 1),
                               "since_s": round(t - self.t0, 1)}
    self.write_summary()
    reader = threading.Thread(target=self._pump, args=(self.child.stdout,), daemon=True)
    reader.start()
    stop = threading.Event()
    watcher = None
    if watch is not None:
      watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
      watcher.start()
    try:
      rc = self.child.wait(timeout=limit)
      status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
      self._kill()
      rc, status = 124, "timed_out"
    stop.set()
    reader.join(timeout=10)
    if watcher is not None:
      watcher.join(timeout=30)
    self.child = None
    wall = round(time.perf_counter() - t, 1)
    self.summary["stages"].append({"stage": name, "status": status, "rc": rc, "wall_s": wall,
                                   "limit_s": round(limit, 1), "command": cmd})
    self.summary["running"] = None
    if status == "ok":
      self.summary["finished"].append(name)
    self.say(f"== stage {name}: {status} (rc {rc}) in {wall} s")
    self.write_summary()
    return rc

  def _pump(self, stream) -> None:
    for line in stream:
      self.say("  | " + line.rstrip("\n"))

  def _kill(self) -> None:
    if self.child is None or self.child.poll() is not None:
      return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
      try:
        os.killpg(self.child.pid, sig)
      except ProcessLookupError:
        return
      try:
        self.child.wait(timeout=wait)
        return
      except subprocess.TimeoutExpired:
        continue

  def on_signal(self, signum, _frame) -> None:
    self._kill()
    self.say(f"suite stopped by {signal.Signals(signum).name}")
    self.summary["stopped_by"] = signal.Signals(signum).name
    self.write_summary()
    sys.exit(128 + signum)


def _env(cache_dir: Path | None, dry_run: bool) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "")
                                                     .split(os.pathsep) if p])
  env["PYTHONUNBUFFERED"] = "1"
  env.pop("SIAMJAX_DATA_DIR", None)  # the stages read --data-dir only, downloads off
  if not dry_run:
    env["JAX_PLATFORMS"] = "cuda"  # a failed CUDA start is an error, never a CPU run
    # Compile times are reported: every program compiles, none loads from an earlier run.
    env["SIAMJAX_NO_COMPILATION_CACHE"] = "1"
  if cache_dir is not None:
    env["SIAMJAX_CACHE_DIR"] = str(cache_dir)
  return env


def _bench_figures(suite: Suite, path: Path) -> None:
  try:
    rec = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    suite.say(f"bench: no readable {path.name}")
    return
  suite.summary["bench_rows"] = len([r for r in rec.get("rows", []) if not r.get("skipped")])
  suite.summary["bench_complete"] = rec.get("complete")
  compiles = [r["compile_and_first_s"] for r in rec.get("rows", [])
              if isinstance(r.get("compile_and_first_s"), (int, float))]
  suite.summary["bench_first_calls"] = {"count": len(compiles), "s": round(sum(compiles), 1)}
  for r in rec.get("rows", []):
    if r.get("skipped"):
      suite.figure(f"bench {r.get('impl')} {r.get('variant', '')} skipped: {r['skipped']}")
      continue
    what = (f"bench {r.get('impl')} {r.get('variant')} {r.get('dtype')} {r.get('mode')} "
            f"b={r.get('batch')}")
    if r.get("pairs_per_s") is not None:
      frac = r.get("fraction_of_peak")
      suite.figure(f"{what}: {r['pairs_per_s']:.1f} pairs/s" + (
          f", {frac:.1%} of the matmul peak" if isinstance(frac, (int, float)) else ""),
          pairs_per_s=r["pairs_per_s"], fraction_of_peak=frac)
    elif r.get("step_s") is not None:
      suite.figure(f"{what}: {r['step_s'] * 1e3:.2f} ms", seconds=r["step_s"])
  peak = rec.get("matmul_peak_tflops")
  if peak:
    text = (", ".join(f"{k} {v:.4g}" for k, v in peak.items() if isinstance(v, (int, float)))
            if isinstance(peak, dict) else str(peak))
    suite.figure(f"bench matmul peak TFLOP/s: {text}", matmul_peak_tflops=peak)


def _train_records(text: str) -> list[dict]:
  """The ``train`` records of a metrics.jsonl text; a line cut by a writer is skipped."""
  out = []
  for line in text.splitlines():
    if '"train"' not in line:
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(r, dict) and r.get("kind") == "train":
      out.append(r)
  return out


def _watch_paper_fast(suite: Suite, work: Path, every_s: float):
  """Copies paper_fast's metrics (and its results, once written) into ``--out`` as it runs,
  and prints its progress."""
  def watch(stop: threading.Event):
    shown = None
    while True:
      stopping = stop.wait(every_s)
      for src, dst in (("metrics.jsonl", "paper_fast_metrics.jsonl"),
                       ("results.json", "paper_fast.json")):
        _copy(work / src, suite.out / dst)
      try:
        text = (work / "metrics.jsonl").read_text()
      except OSError:
        text = ""
      train = _train_records(text)
      if train and train[-1].get("step") != shown:
        r = train[-1]
        shown = r.get("step")
        rate, loss = r.get("pairs_per_s"), r.get("loss")
        suite.say(f"paper_fast: step {r.get('step')}"
                  + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                  + (f", {rate:.0f} pairs/s" if isinstance(rate, (int, float)) else ""))
      if stopping:
        return
  return watch


def _g(value, digits: int = 4) -> str:
  return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)


def _paper_fast_figures(suite: Suite, res: dict) -> None:
  lo, hi = res.get("lake_20way_ci95") or (None, None)
  suite.figure(f"paper_fast Lake 20-way within-alphabet: {_g(res.get('lake_20way_accuracy'))} "
               f"[{_g(lo)}, {_g(hi)}] on {res.get('lake_trials')} trials",
               lake_20way_accuracy=res.get("lake_20way_accuracy"))
  suite.figure(f"paper_fast training: {res.get('steps')} steps, {res.get('pairs_seen')} pairs "
               f"in {_g(res.get('train_time_s'))} s (compile {_g(res.get('compile_time_s'))} "
               f"s), {_g(res.get('pairs_per_s'))} pairs/s, ended by {res.get('end')}",
               pairs_per_s=res.get("pairs_per_s"), train_time_s=res.get("train_time_s"))


def check_outputs(out: Path, expected=OUT_FILES) -> list[str]:
  """What is wrong with ``out`` for the ``run`` tool: missing, extra or too large files."""
  problems = [f"{name} was not written" for name in expected if not (out / name).is_file()]
  files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
  if len(files) > MAX_FILES:
    problems.append(f"{len(files)} files, more than {MAX_FILES}")
  for p in files:
    rel = p.relative_to(out)
    if p.stat().st_size >= MAX_BYTES:
      problems.append(f"{rel} is {p.stat().st_size} bytes, not under {MAX_BYTES}")
    if len(rel.parts) - 1 > MAX_DEPTH:
      problems.append(f"{rel} is more than {MAX_DEPTH} folders down")
  return problems


def run_suite(args) -> int:
  """The whole suite (see the module docstring); returns the exit status."""
  suite = Suite(args)
  previous = signal.signal(signal.SIGTERM, suite.on_signal)
  try:
    return _run_stages(suite, args)
  finally:
    signal.signal(signal.SIGTERM, previous)
    suite.log.close()


def _preflight(suite: Suite, args, env: dict, me: list[str]) -> dict | None:
  """Stage 0; returns its record, or ``None`` when the suite must stop."""
  rc = suite.stage("preflight", me + ["--stage-preflight", "--out", str(suite.out)]
                   + (["--dry-run"] if args.dry_run else []),
                   PREFLIGHT_LIMIT_S, {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  try:
    pre = json.loads((suite.out / "preflight.json").read_text())
  except (OSError, json.JSONDecodeError):
    pre = {}
  suite.summary["preflight"] = {k: pre.get(k) for k in (
      "versions", "failed_imports", "optional", "jax_backend", "torch_cuda", "abort")}
  if rc == 124:
    suite.warn(f"preflight passed its {PREFLIGHT_LIMIT_S} s; going on (JAX backend "
               f"{pre.get('jax_backend')!r} when it stopped)")
  elif rc != 0 and not pre.get("abort"):
    suite.warn(f"preflight failed (rc {rc}); going on")
  abort = pre.get("abort")
  if not args.dry_run and pre.get("jax_backend") not in (None, "gpu"):
    abort = abort or f"JAX backend is {pre.get('jax_backend')!r}, not 'gpu'"
  if abort:
    suite.say(f"abort: {abort}")
    suite.summary["abort"] = abort
    suite.write_summary()
    return None
  return pre


def _paper_fast(suite: Suite, args, env: dict, data: Path, tmp: Path) -> None:
  """Stage 1: paper_fast, its limit and training budget from the time left."""
  limit = min(args.paper_fast_limit_s, suite.left() - BENCH_RESERVE_S - END_S)
  train_limit = min(args.train_time_limit_s, limit - PAPER_FAST_EXTRA_S)
  if train_limit < 30:
    suite.warn(f"paper_fast skipped: its limit of {limit:.0f} s leaves {train_limit:.0f} s to "
               f"train, under 30 s ({suite.left():.0f} s left in all)")
    return
  work = tmp / "paper_fast"
  cmd = [sys.executable, str(ROOT / "experiments" / "omniglot_koch.py"),
         "--preset", "paper_fast", "--workdir", str(work), "--data-dir", str(data),
         "--no-download", "--no-progress", "--train-time-limit-s", f"{train_limit:.0f}",
         "--checkpoint-every", "0"]  # saved at the end only: what Lake's score needs
  cmd += DRY_PAPER_FAST if args.dry_run else []
  suite.stage("paper_fast", cmd, limit, env,
              watch=_watch_paper_fast(suite, work, 1 if args.dry_run else 15))
  for src, dst in (("results.json", "paper_fast.json"),
                   ("metrics.jsonl", "paper_fast_metrics.jsonl")):
    _copy(work / src, suite.out / dst)
  try:
    res = json.loads((suite.out / "paper_fast.json").read_text())
  except (OSError, json.JSONDecodeError):
    suite.say("paper_fast: no results.json (see the stage's output above)")
    return
  res["git_commit"] = args.commit or res.get("git_commit")  # --commit wins
  res["device_suite"] = {"commit": args.commit, "dry_run": args.dry_run,
                         "train_time_limit_s": round(train_limit)}
  _write_json(suite.out / "paper_fast.json", res)
  _paper_fast_figures(suite, res)


def _bench(suite: Suite, args, env: dict) -> None:
  """Stage 2: pairs/s in whatever time is left; rows and plot stream into ``--out``."""
  limit = suite.left() - END_S
  if args.bench_limit_s:
    limit = min(limit, args.bench_limit_s)
  if limit < 20:
    suite.warn(f"bench skipped: {limit:.0f} s left")
    return
  cmd = [sys.executable, str(ROOT / "benchmarks" / "pairs_per_sec.py"),
         "--out", str(suite.out / "bench.json"), "--png", str(suite.out / "bench.png"),
         "--no-keras"] + (DRY_BENCH if args.dry_run else REAL_BENCH)
  # No new implementation x dtype block starts in the last BENCH_TAIL_S (torch.compile's
  # blocks come last); the block under way then has that long to finish.
  cmd += ["--time-limit-s", f"{max(limit - BENCH_TAIL_S, 0.4 * limit):.0f}"]
  if args.commit:
    cmd += ["--commit", args.commit]
  suite.stage("bench", cmd, limit, env)
  _bench_figures(suite, suite.out / "bench.json")


def _run_stages(suite: Suite, args) -> int:
  tmp = Path(tempfile.mkdtemp(prefix="siamjax-suite-"))
  me = [sys.executable, str(Path(__file__).resolve())]
  try:
    data = Path(args.data_dir)
    env = _env(Path(args.cache_dir) if args.cache_dir else None if args.dry_run
               else tmp / "cache", args.dry_run)
    if args.dry_run and not all((data / "omniglot" / f).is_file() for f in PREPARED_FILES):
      data = tmp / "device_data"
      prep = me + ["--prepare-data", "--no-exclude", "--data-dir", str(data),
                   "--source-data-dir", _source(args.source_data_dir)]
      suite.stage("prepare", prep, 300, env)
      suite.say(f"dry run: prepared the Omniglot arrays in {data} (--prepare-data's path)")
    _check_data(data)
    suite.say(f"device suite{' (dry run)' if args.dry_run else ''}, commit {args.commit}, "
              f"output {suite.out}, data {data}, {args.total_limit_s:.0f} s in all")
    if _preflight(suite, args, env, me) is None:
      return 1
    _paper_fast(suite, args, env, data, tmp)
    _bench(suite, args, env)
  except ValueError as e:
    suite.say(f"error: {e}")
    suite.summary["error"] = str(e)
    suite.write_summary()
    return 2
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  problems = check_outputs(suite.out)
  suite.summary["files"] = {p.name: p.stat().st_size for p in sorted(suite.out.iterdir())
                            if p.is_file() and not p.name.startswith(".")}
  suite.summary["output_problems"] = problems
  failed = [s["stage"] for s in suite.summary["stages"] if s["status"] != "ok"]
  suite.say("figures (again, for the end of the output):")
  for f in suite.summary["figures"]:
    suite.say(f"  {f['figure']}")
  for w in suite.summary["warnings"]:
    suite.say(f"  warning: {w}")
  suite.say(f"done in {time.perf_counter() - suite.t0:.0f} s; stages not ok: "
            f"{', '.join(failed) or 'none'}; output problems: {'; '.join(problems) or 'none'}")
  suite.write_summary()
  return 1 if (problems or failed) else 0


def _default_commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="the one folder every output goes into (required to run)")
  p.add_argument("--dry-run", action="store_true",
                 help="the same stages at tiny sizes on the CPU (< 2 min), for CI")
  p.add_argument("--commit", default=None,
                 help="the git commit of this checkout, recorded in every JSON (default: git "
                      "rev-parse HEAD; the device copy has no .git)")
  p.add_argument("--data-dir", default=str(ROOT / "device_data"),
                 help="a folder with omniglot/*.npz from --prepare-data (default: "
                      "device_data in the checkout)")
  p.add_argument("--source-data-dir", default=None,
                 help="where --prepare-data (and a dry run) read the zips "
                      "(default $SIAMJAX_DATA_DIR)")
  p.add_argument("--cache-dir", default=None,
                 help="Omniglot decode cache of the stages (default: a temporary folder; a "
                      "dry run uses this machine's)")
  p.add_argument("--prepare-data", action="store_true",
                 help="write Omniglot as prepared arrays into --data-dir and git-ignore it, "
                      "then exit")
  p.add_argument("--no-exclude", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--train-time-limit-s", type=float, default=TRAIN_TIME_LIMIT_S,
                 help="paper_fast's training budget, at most (compilation included; less "
                      "when the time left is short)")
  p.add_argument("--paper-fast-limit-s", type=float, default=TRAIN_TIME_LIMIT_S
                 + PAPER_FAST_EXTRA_S + 30, help="paper_fast's stage limit, at most")
  p.add_argument("--bench-limit-s", type=float, default=None,
                 help="the bench's stage limit, at most (default: the time left)")
  p.add_argument("--total-limit-s", type=float, default=TOTAL_LIMIT_S)
  p.add_argument("--stage-preflight", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:
    if args.prepare_data:
      dest = prepare_data(args.data_dir, args.source_data_dir, exclude=not args.no_exclude)
      files = [dest / "omniglot" / f for f in PREPARED_FILES]
      size = sum(f.stat().st_size for f in files)
      print(f"wrote {', '.join(PREPARED_FILES)} into {dest / 'omniglot'} ({size / 1e6:.1f} MB);"
            f" name {dest.name} in the run tool's carry")
      return 0
    if not args.out:
      raise ValueError("out: pass --out DIR (the one folder the suite writes into)")
    for name in ("train_time_limit_s", "bench_limit_s", "paper_fast_limit_s", "total_limit_s"):
      if getattr(args, name) is not None and getattr(args, name) <= 0:
        raise ValueError(f"{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.stage_preflight:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = preflight(args.dry_run, save=lambda r: _write_json(out / "preflight.json", r))
    for k in ("python", "jax_backend", "jax_devices", "versions", "failed_imports",
              "jax_plugins", "optional", "torch_cuda", "nvidia_smi"):
      print(f"{k}: {rec.get(k)}")
    if rec["dry_run_allowed"]:
      print(f"dry run: not aborting for {'; '.join(rec['dry_run_allowed'])}")
    return 1 if rec["abort"] else 0
  args.commit = args.commit or _default_commit()
  return run_suite(args)


if __name__ == "__main__":
  sys.exit(main())
