"""XLA settings for fast CPU training, for the programs they help, and the compilation cache.

XLA:CPU (jaxlib 0.10) routes convolutions through a YNNPACK fusion by default, and its
weight-gradient convolutions with large windows (the Koch net's conv1 and conv2) are
slow. :data:`FAST_CPU_FLAGS` turns the YNNPACK fusions off
(``--xla_cpu_experimental_ynn_fusion_type=``, an empty list), so convolutions run on
XLA's own kernels, and hands matrix multiplications, batched ones included, to XNNPACK
(``--xla_cpu_experimental_xnn_fusion_type=dot``), which is what
:func:`siamjax.fourier.dft_conv2d`'s frequency-wise products need. Results are unchanged
beyond float rounding.

They do not help everything, so they are set per workload, never globally, where a
workload's training step was measured faster with them (``benchmarks/xla_flags.py``,
``benchmarks/results/xla-flags-*.json``: every recipe's step in a fresh process per
setting): the convolutional recipes (``omniglot_koch``, ``image_folder``, and
``enrolment``, which embeds with a Koch tower), the two MLP pair recipes
(``mnist_contrastive``, ``vector_pairs``: XNNPACK's small products) and
``benchmarks/pairs_per_sec.py`` set them (``FAST_CPU = True`` in the recipe modules);
``mnist_triplet`` and ``thucnews_fewshot`` (no faster) and the in-batch losses of
:mod:`siamjax.losses` (slower with them: Gram products and elementwise work) run on
XLA's own flags, as does ``benchmarks/losses_per_sec.py``. Every results file records
``XLA_FLAGS`` (``machine.xla_flags``). A program of your own measures its step both ways
and sets them, first thing, only if they help.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its backends (the first
``jax.devices()``, array creation or jitted call). So the fast path must be chosen
before that, in one of two ways:

* in the shell: ``export XLA_FLAGS="$(python -c 'import siamjax.xla as x;
  print(x.FAST_CPU_FLAGS)')"``, that is ``--xla_cpu_experimental_xnn_fusion_type=dot
  --xla_cpu_experimental_ynn_fusion_type=``;
* at the top of a script, before any other JAX use::

      import siamjax.xla
      siamjax.xla.enable_fast_cpu()  # raises RuntimeError when called too late

siamjax never sets the flags on import: a library should not change a process-wide
setting behind the user's back. The flags only concern the CPU backend; they are
harmless on a GPU machine.
"""

from __future__ import annotations

import os

__all__ = ["FAST_CPU_FLAGS", "enable_fast_cpu", "fast_cpu_enabled", "fast_cpu_supported",
           "enable_compilation_cache"]

FAST_CPU_FLAGS = ("--xla_cpu_experimental_xnn_fusion_type=dot "
                  "--xla_cpu_experimental_ynn_fusion_type=")
"""The ``XLA_FLAGS`` entries of the fast CPU path (space separated)."""


def _backends_initialised() -> bool:
  from jax._src import xla_bridge  # private, but the only way to ask without initialising

  return bool(xla_bridge.backends_are_initialized())


def fast_cpu_enabled(xla_flags: str | None = None) -> bool:
  """Whether ``xla_flags`` (default: the ``XLA_FLAGS`` environment variable) holds the fast path.

  Args:
    xla_flags: a flags string; ``None`` reads ``os.environ["XLA_FLAGS"]``.

  Returns:
    ``True`` when every flag of :data:`FAST_CPU_FLAGS` is present.

  >>> fast_cpu_enabled("--foo=1 " + FAST_CPU_FLAGS)
  True
  >>> fast_cpu_enabled("--foo=1")
  False
  """
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  if not isinstance(xla_flags, str):
    raise ValueError(f"xla_flags must be a string or None, got {type(xla_flags).__name__}")
  present = xla_flags.split()
  return all(flag in present for flag in FAST_CPU_FLAGS.split())


def fast_cpu_supported() -> bool:
  """Whether the fast CPU flags apply: a CPU-only install of a jaxlib that knows them.

  jaxlib < 0.10 rejects the (then unknown) flag at start-up, and with a GPU/TPU plugin
  installed the CPU backend is not the one that trains, so both are left alone.

  >>> isinstance(fast_cpu_supported(), bool)
  True
  """
  import importlib.metadata
  import importlib.util

  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
  if any(importlib.util.find_spec(m) for m in plugins):
    return False
  try:
    major, minor = (int(v) for v in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return False
  return (major, minor) >= (0, 10)


def enable_fast_cpu() -> bool:
  """Adds :data:`FAST_CPU_FLAGS` to ``XLA_FLAGS``; call it before any other JAX use.

  A no-op when the flags are already set (e.g. exported in the shell), when
  ``SIAMJAX_NO_XLA_FLAGS=1`` asks siamjax to leave ``XLA_FLAGS`` alone, when the user's
  ``XLA_FLAGS`` already chooses a YNN or XNN fusion type, and where
  :func:`fast_cpu_supported` is false; so scripts may call it unconditionally.

  Returns:
    ``True`` when the flags were added now, ``False`` otherwise.

  Raises:
    RuntimeError: JAX's backends are already initialised without the flags, so the
      setting can no longer take effect. Call this first thing, or export
      ``XLA_FLAGS`` in the shell.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if (fast_cpu_enabled() or os.environ.get("SIAMJAX_NO_XLA_FLAGS")
      or "ynn_fusion_type" in flags or "xnn_fusion_type" in flags
      or not fast_cpu_supported()):
    return False
  if _backends_initialised():
    raise RuntimeError(
        "siamjax.xla.enable_fast_cpu() was called after JAX initialised its backends, so "
        "XLA_FLAGS can no longer change. Call it before any other JAX use, or run with "
        f'XLA_FLAGS="{FAST_CPU_FLAGS}" set in the environment.')
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_CPU_FLAGS).strip()
  return True


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache for this process.

  A program this machine compiled before is then loaded from disk instead of compiled
  again: a resumed or repeated run, and each ``python -m siamjax`` command on the same
  model, skip most of their compile time. JAX keys every entry by the program, the
  compile options, ``XLA_FLAGS`` and the versions, so a changed program never loads a
  stale one. Only programs that took at least a second to compile are kept (JAX's
  default). The ``experiments/`` scripts and ``python -m siamjax`` call this first
  thing; importing siamjax never does. Delete the directory to reclaim its space.

  Args:
    directory: where to keep the programs (default ``$SIAMJAX_CACHE_DIR/jax``, that is
      ``~/.cache/siamjax/jax``).

  Returns:
    The directory in use, or ``None`` where the cache stays off:
    ``SIAMJAX_NO_COMPILATION_CACHE=1``. A directory the user already chose
    (``JAX_COMPILATION_CACHE_DIR``, or ``jax_compilation_cache_dir`` in ``jax.config``)
    is kept, and returned.
  """
  if os.environ.get("SIAMJAX_NO_COMPILATION_CACHE"):
    return None
  import jax

  from siamjax._cache import cache_dir

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = directory or os.path.join(cache_dir(), "jax")
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
