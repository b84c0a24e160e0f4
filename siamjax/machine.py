"""The machine a figure was measured on: every results JSON carries :func:`machine_info`."""

from __future__ import annotations

import os
import platform

import jax

__all__ = ["cpu_model", "cpu_family_model", "cpu_isa", "machine_info", "ISA_FLAGS"]

# The instruction-set extensions that decide which matrix kernels a CPU can run.
#: The CPU instruction-set flags a machine record lists when present.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere).

  >>> isinstance(cpu_model(), str)
  True
  """
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_family_model() -> str | None:
  """``"family F model M stepping S"`` from ``/proc/cpuinfo`` (``None`` elsewhere): the
  model name alone ("AMD EPYC") does not tell one generation from another.

  >>> cpu_family_model() is None or cpu_family_model().startswith("family ")
  True
  """
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    return None
  if "cpu family" not in fields:
    return None
  return (f"family {fields['cpu family']} model {fields.get('model', '?')} stepping "
          f"{fields.get('stepping', '?')}")


def cpu_isa() -> list[str]:
  """The CPU's matrix-relevant ISA flags (:data:`ISA_FLAGS`) listed in ``/proc/cpuinfo``.

  >>> set(cpu_isa()) <= set(ISA_FLAGS)
  True
  """
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          present = set(line.split(":", 1)[1].split())
          return [flag for flag in ISA_FLAGS if flag in present]
  except OSError:
    pass
  return []


def machine_info() -> dict:
  """Processor, cores, load, JAX devices, versions and ``XLA_FLAGS``, as a JSON-able dict.

  The load average matters on shared machines: a timing taken while other jobs ran is an
  upper bound, and the record says so.

  Returns:
    a dict with ``platform``, ``processor``, ``cpu_model``, ``cpu_family_model``,
    ``cpu_isa``, ``nproc``,
    ``jax_backend``, ``jax_devices``, ``device_kind``,
    ``jax``, ``python``, ``xla_flags``.

  >>> info = machine_info()
  >>> info["nproc"] >= 1 and info["jax_backend"] in ("cpu", "gpu", "tpu")
  True
  """
  devices = jax.devices()
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_model": cpu_model(),
      "cpu_family_model": cpu_family_model(),
      "cpu_isa": cpu_isa(),
      "nproc": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devices],
      "jax_processes": jax.process_count(),
      "device_kind": devices[0].device_kind,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
