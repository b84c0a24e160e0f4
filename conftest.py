"""Strict test settings (after equinox's tests/conftest.py).

* Eight fake CPU devices, so sharded code paths run in CI (a correctness check only,
  never a speed claim). Must be set before JAX initialises its backends.
* Implicit rank promotion raises: a broadcasting bug fails loudly instead of silently
  building a ``[B, B]`` array.
* ``SIAMJAX_DATA_DIR`` made absolute: the script tests run their subprocesses in
  temporary folders, where a relative path (``SIAMJAX_DATA_DIR=../shared/data``) would
  point nowhere.
"""

import os

if os.environ.get("SIAMJAX_DATA_DIR"):
  os.environ["SIAMJAX_DATA_DIR"] = os.path.abspath(os.environ["SIAMJAX_DATA_DIR"])

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
