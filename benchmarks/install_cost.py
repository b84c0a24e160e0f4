"""Time and size of the plain install (``pip install -e .``) in a fresh virtual environment.

::

    flock -x /tmp/siamjax-cpu.lock python benchmarks/install_cost.py --venv /tmp/v1 --venv /tmp/v2

For each ``--venv`` path (which must not exist): ``python3 -m venv PATH``, then
``pip install -e ROOT`` timed (pip's cache off, so every wheel is fetched: a first install),
then the environment's size on disk, the part of it that oneDNN's packages take (their
installed files), the first-use build of the bf16 kernel (``python -m siamjax.cpu_kernels
route`` in a fresh process with an empty kernel cache, timed) and the route a bf16 Koch
network takes (``koch_siamese(dtype=jnp.bfloat16).encoder.route()``). Writes
``benchmarks/results/install-<device-slug>.json`` (``--out`` elsewhere) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEDNN = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
KOCH_ROUTE = ("import jax.numpy as jnp; from siamjax import models; "
              "print(models.koch_siamese(dtype=jnp.bfloat16).encoder.route())")


def _du(path: str) -> int:
  total = 0
  for d, _, files in os.walk(path):
    for f in files:
      p = os.path.join(d, f)
      if not os.path.islink(p):
        total += os.path.getsize(p)
  return total


def _package_bytes(python: str, names) -> dict:
  code = ("import importlib.metadata as m, json, sys\n"
          "out = {}\n"
          "for n in sys.argv[1:]:\n"
          "  try:\n"
          "    d = m.distribution(n)\n"
          "  except m.PackageNotFoundError:\n"
          "    continue\n"
          "  out[n] = [d.version, sum(f.size or 0 for f in d.files or [])]\n"
          "print(json.dumps(out))")
  return json.loads(subprocess.run([python, "-c", code, *names], capture_output=True,
                                   text=True, check=True).stdout)


def measure(venv: str) -> dict:
  if os.path.exists(venv):
    raise SystemExit(f"--venv {venv} exists; pass a new path")
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  venv_s = time.perf_counter() - t0
  python = os.path.join(venv, "bin", "python")
  env = dict(os.environ, PIP_NO_CACHE_DIR="1")
  env.pop("PYTHONPATH", None)
  t0 = time.perf_counter()
  subprocess.run([python, "-m", "pip", "install", "-q", "-e", ROOT], check=True, env=env)
  install_s = time.perf_counter() - t0
  size = _du(venv)
  packages = _package_bytes(python, ONEDNN)
  with tempfile.TemporaryDirectory() as cache:
    env_run = dict(env, SIAMJAX_CACHE_DIR=cache)
    env_run.pop("SIAMJAX_ONEDNN", None)
    t0 = time.perf_counter()
    route = subprocess.run([python, "-m", "siamjax.cpu_kernels", "route"], capture_output=True,
                           text=True, check=True, env=env_run, cwd=cache)
    first_use_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([python, "-m", "siamjax.cpu_kernels", "route"], capture_output=True,
                   text=True, check=True, env=env_run, cwd=cache)
    cached_s = time.perf_counter() - t0
    koch = subprocess.run([python, "-c", KOCH_ROUTE], capture_output=True, text=True,
                          check=True, env=env_run, cwd=cache)
  return {"venv": venv, "command": f"python3 -m venv {venv} && {venv}/bin/pip install -e .",
          "venv_s": venv_s, "install_s": install_s, "size_bytes": size,
          "onednn_packages": {n: {"version": v, "bytes": b} for n, (v, b) in packages.items()},
          "onednn_bytes": sum(b for _, b in packages.values()),
          "route_first_use_s": first_use_s, "route_cached_s": cached_s,
          "route_output": route.stdout.strip().splitlines(), "route_stderr": route.stderr.strip(),
          "koch_bf16_route": koch.stdout.strip(), "koch_stderr": koch.stderr.strip()[-400:]}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--venv", action="append", required=True,
                 help="a new virtual environment's path (repeat for repeats)")
  p.add_argument("--out", help="JSON path (default benchmarks/results/install-<device>.json)")
  args = p.parse_args(argv)
  sys.path.insert(0, ROOT)
  from siamjax import results

  load = results.load_average()
  runs = [measure(v) for v in args.venv]
  import harness  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"install-{harness.device_slug()}.json")
  body = {"runs": runs,
          "notes": ["install_s: pip install -e . with pip's cache off (every wheel fetched "
                    "from the package index) in a fresh venv; size_bytes: the venv on disk "
                    "afterwards; onednn_bytes: the installed files of oneDNN's two packages.",
                    "route_first_use_s: the first `python -m siamjax.cpu_kernels route` with "
                    "an empty kernel cache (starts JAX, builds the kernel); route_cached_s: "
                    "the same command again (kernel cached)."]}
  record = results.record(body, command=results.command_line(), load_average_at_start=load)
  results.write_json(out, record, indent=1)
  print(json.dumps(runs, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
