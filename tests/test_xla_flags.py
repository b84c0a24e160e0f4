"""Flags per workload: the recipes measured faster with siamjax.xla.FAST_CPU_FLAGS set them,
the others run on XLA's own flags; the A/B benchmark's steps run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import siamjax.xla as sxla
from siamjax.recipes import (enrolment, image_folder, mnist, omniglot_koch, thucnews,
                             vector_pairs)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_the_recipes_measured_faster_ask_for_the_flags():
  asks = {r.NAME: getattr(r, "FAST_CPU", False) for r in (
      omniglot_koch, image_folder, enrolment, mnist.contrastive, mnist.triplet, vector_pairs,
      thucnews)}
  assert asks == {"omniglot_koch": True, "image_folder": True, "enrolment": True,
                  "mnist_contrastive": True, "mnist_triplet": False, "vector_pairs": True,
                  "thucnews_fewshot": False}


@pytest.mark.parametrize("script,sets", [("thucnews_fewshot", False), ("image_folder", True)])
def test_a_script_sets_the_flags_only_for_its_own_model(script, sets):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SIAMJAX_NO_XLA_FLAGS")}
  env["PYTHONPATH"] = str(ROOT)
  out = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{script}.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=120, check=True)
  said = any(l.startswith("set XLA_FLAGS") for l in out.stderr.splitlines())
  assert said == (sets and sxla.fast_cpu_supported())


def test_flag_benchmark_steps_run():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import xla_flags

  for name in ("vector_pairs", "mnist_triplet"):
    step, state, batch = xla_flags._step(name)
    state = jax.jit(step)(state, batch)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  row = {"workload": "w", "recipe": "r", "step": "s", "flags_speedup": 0.5,
         **{k: {"step_s": 1.0, "step_s_min": 0.9, "step_s_max": 1.1}
            for k in ("fast_cpu_flags", "xla_defaults")}}
  assert "0.50x" in xla_flags.format_table([row])


_CACHE_PROBE = """
import jax, jax.numpy as jnp, siamjax.xla as sxla
print(sxla.enable_compilation_cache())
print(jax.config.jax_compilation_cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.jit(lambda x: jnp.sin(x) * 2.0)(jnp.ones(3)).block_until_ready()
"""


@pytest.mark.parametrize("setting", ["default", "own_dir", "off"])
def test_compilation_cache_default_dir_users_dir_and_opt_out(tmp_path, setting):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")
         and k != "SIAMJAX_NO_COMPILATION_CACHE"}
  env.update(PYTHONPATH=str(ROOT), SIAMJAX_CACHE_DIR=str(tmp_path / "siamjax"))
  if setting == "own_dir":
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "own")
  if setting == "off":
    env["SIAMJAX_NO_COMPILATION_CACHE"] = "1"
  out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True,
                       env=env, timeout=120, check=True).stdout.split("\n")
  want = {"default": tmp_path / "siamjax" / "jax", "own_dir": tmp_path / "own", "off": None}
  returned, in_use = out[0], out[1]
  assert returned == str(want[setting])
  assert in_use == (str(want[setting]) if want[setting] else "None")
  if want[setting] is not None:  # the compiled program was written there
    assert any(p.name.endswith("-cache") for p in want[setting].iterdir())
  assert not (tmp_path / "siamjax" / "jax").exists() or setting == "default"
