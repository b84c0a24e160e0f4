"""Building, finding and loading the oneDNN kernel library, and the route it gives.

See :mod:`siamjax.cpu_kernels` for what the kernel does and when it is used. This module
decides the route once per process (:func:`matmul_route`) and registers the library's
XLA FFI targets; :mod:`siamjax.cpu_kernels._ops` holds the operations that call them.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

import jax

from siamjax._cache import cache_dir

MATMUL_TARGET = "siamjax_onednn_matmul_bf16"
MATMUL_BF16_OUT_TARGET = "siamjax_onednn_matmul_bf16_out"
CONV_TARGET = "siamjax_onednn_conv_bf16"
CONV_BWD_WEIGHTS_TARGET = "siamjax_onednn_conv_bwd_weights_bf16"
CONV_BWD_DATA_TARGET = "siamjax_onednn_conv_bwd_data_bf16"
CONV_RELU_POOL_TARGET = "siamjax_onednn_conv_relu_pool_bf16"
CONV_RELU_POOL_BWD_TARGET = "siamjax_onednn_conv_relu_pool_bwd_bf16"
POOL_RELU_BIAS_TARGET = "siamjax_pool_relu_bias_bf16"
POOL_RELU_BIAS_BWD_TARGET = "siamjax_pool_relu_bias_bwd_bf16"
DENSE_TARGET = "siamjax_onednn_dense_f32_weights_bf16"
_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                       "onednn_matmul.cc")
_state: dict = {}


def _source_tag() -> str:
  with open(_SOURCE, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def library_path(onednn: str | None = None) -> str:
  """Where :func:`build` writes the kernel library for oneDNN at ``onednn``.

  One file per source version and oneDNN library folder (the library records that folder
  as its run path, so two virtual environments sharing the cache each get their own).
  ``onednn=None`` looks for oneDNN as :func:`build` does.
  """
  libdir, _ = _libdnnl(_onednn_prefix(onednn))
  where = hashlib.sha256(os.path.realpath(libdir).encode()).hexdigest()[:8]
  return os.path.join(cache_dir(), f"libsiamjax_onednn-{_source_tag()}-{where}.so")


def _built_libraries() -> list[str]:
  """The libraries built from this source version: the one for the oneDNN found here
  first, then any other (e.g. built with ``--onednn DIR`` for a prefix not searched)."""
  try:
    preferred = [library_path()]
  except FileNotFoundError:
    preferred = []
  pattern = os.path.join(cache_dir(), f"libsiamjax_onednn-{_source_tag()}-*.so")
  return [p for p in preferred if os.path.exists(p)] + [
      p for p in sorted(glob.glob(pattern)) if p not in preferred]


def _onednn_prefix(prefix: str | None) -> str:
  """A directory holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so*``."""
  candidates = [prefix] if prefix else list(dict.fromkeys(
      [os.environ.get("SIAMJAX_ONEDNN"), sys.prefix, sysconfig.get_paths().get("data"),
       sysconfig.get_paths("posix_user").get("data"), "/usr", "/usr/local"]))
  for p in candidates:
    if p and os.path.exists(os.path.join(p, "include", "oneapi", "dnnl", "dnnl.hpp")):
      return p
  raise FileNotFoundError(
      "oneDNN headers not found (include/oneapi/dnnl/dnnl.hpp under "
      f"{[p for p in candidates if p]}); pass --onednn DIR or set SIAMJAX_ONEDNN=DIR")


def _libdnnl(prefix: str) -> tuple[str, str]:
  """(library directory, file name) of oneDNN's shared library under ``prefix``."""
  for sub in ("lib", "lib64", os.path.join("lib", "x86_64-linux-gnu")):
    found = sorted(glob.glob(os.path.join(prefix, sub, "libdnnl.so*")), key=len)
    if found:
      return os.path.dirname(found[0]), os.path.basename(found[-1])
  raise FileNotFoundError(f"libdnnl.so not found under {prefix}/lib")


def build(onednn: str | None = None, *, cxx: str | None = None, verbose: bool = False) -> str:
  """Compiles the oneDNN FFI kernel into :func:`library_path` and returns that path.

  Args:
    onednn: oneDNN install prefix (``include/`` and ``lib/``); ``None`` tries
      ``$SIAMJAX_ONEDNN``, ``sys.prefix``, ``/usr`` and ``/usr/local``.
    cxx: the C++ compiler (default ``$CXX``, else the first of ``g++``, ``c++`` and
      ``clang++`` on the ``PATH``).
    verbose: print the compiler command.

  Raises:
    FileNotFoundError: no oneDNN headers or library.
    RuntimeError: no C++ compiler, or the compiler failed (its output is in the message).
  """
  compiler = _compiler(cxx)
  prefix = _onednn_prefix(onednn)
  libdir, libname = _libdnnl(prefix)
  out = library_path(prefix)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.{os.getpid()}.tmp"
  cmd = [compiler, "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
         "-w", f"-I{jax.ffi.include_dir()}", f"-I{os.path.join(prefix, 'include')}", _SOURCE,
         "-o", tmp, f"-L{libdir}", f"-l:{libname}", f"-Wl,-rpath,{libdir}"]
  if verbose:
    print(" ".join(cmd))
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    raise RuntimeError(f"no C++ compiler: {e}") from e  # e.g. $CXX names a missing file
  if proc.returncode != 0:
    raise RuntimeError(f"building {_SOURCE} failed:\n{proc.stderr[-4000:]}")
  os.replace(tmp, out)
  return out


_COMPILERS = ("g++", "c++", "clang++")


def _compiler(cxx: str | None = None) -> str:
  """``cxx``, else ``$CXX``, else the first of :data:`_COMPILERS` on the ``PATH``."""
  if cxx or os.environ.get("CXX"):
    return cxx or os.environ["CXX"]
  for name in _COMPILERS:
    if shutil.which(name):
      return name
  raise RuntimeError(f"no C++ compiler found ({', '.join(_COMPILERS)} are not on the PATH "
                     "and $CXX is not set)")


def _cpu_has_bf16() -> bool:
  from siamjax import machine

  return bool({"avx512_bf16", "amx_bf16"} & set(machine.cpu_isa()))


def _load() -> ctypes.CDLL | None:
  """Loads the kernel library (building it first when needed) and registers its targets.

  Tries the library built for the oneDNN found here, then any other build of this source
  version. When none exists, or none loads (its oneDNN was removed), and oneDNN's headers
  are found (``$SIAMJAX_ONEDNN``, or oneDNN installed in this environment), it is built
  once, in about 3 s; otherwise the route is ``"xla"``, one line on standard error says
  so (:func:`_say_why`) and ``route`` says why.
  """
  if "lib" in _state:
    return _state["lib"]
  _state["lib"] = None
  setting = os.environ.get("SIAMJAX_ONEDNN", "")
  if setting == "0":
    _state["reason"] = "SIAMJAX_ONEDNN=0"
    return None
  if jax.default_backend() != "cpu":
    _state["reason"] = f"the backend is {jax.default_backend()}, not the CPU"
    return None
  if not _cpu_has_bf16():
    _state["reason"] = "this CPU has neither AVX512-BF16 nor AMX"
    return None
  errors = []
  lib = None
  try:
    for path in _built_libraries():
      try:
        lib = ctypes.CDLL(path)
        break
      except OSError as e:
        errors.append(str(e))
    if lib is None:  # not built for this source yet, or its oneDNN is gone: build it
      path = build(setting or None)
      lib = ctypes.CDLL(path)
    for target, symbol in ((MATMUL_TARGET, lib.SiamjaxOnednnMatmulBf16),
                           (MATMUL_BF16_OUT_TARGET, lib.SiamjaxOnednnMatmulBf16Out),
                           (CONV_TARGET, lib.SiamjaxOnednnConvBf16),
                           (CONV_BWD_WEIGHTS_TARGET, lib.SiamjaxOnednnConvBwdWeightsBf16),
                           (CONV_BWD_DATA_TARGET, lib.SiamjaxOnednnConvBwdDataBf16),
                           (CONV_RELU_POOL_TARGET, lib.SiamjaxOnednnConvReluPoolBf16),
                           (CONV_RELU_POOL_BWD_TARGET, lib.SiamjaxOnednnConvReluPoolBwdBf16),
                           (POOL_RELU_BIAS_TARGET, lib.SiamjaxPoolReluBiasBf16),
                           (POOL_RELU_BIAS_BWD_TARGET, lib.SiamjaxPoolReluBiasBwdBf16),
                           (DENSE_TARGET, lib.SiamjaxOnednnDenseF32WeightsBf16)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
  except (OSError, RuntimeError, FileNotFoundError, AttributeError) as e:
    _state["error"] = "; ".join(errors + [str(e)])
    _state["reason"] = _short_reason(e)
    _say_why(_state["reason"], _fix(e))
    return None
  _state["lib"] = lib
  _state["path"] = getattr(lib, "_name", None)
  return lib


def _short_reason(e: Exception) -> str:
  if isinstance(e, FileNotFoundError):
    return "oneDNN's headers or library were not found"
  if "no C++ compiler" in str(e):
    return "no C++ compiler was found to build its kernel"
  if isinstance(e, RuntimeError):
    return "building its kernel failed"
  return "its kernel did not load"


def _fix(e: Exception) -> str:
  if isinstance(e, FileNotFoundError):
    return "pip install onednn-cpu-gomp onednn-devel-cpu-gomp (or set SIAMJAX_ONEDNN=DIR)"
  if "no C++ compiler" in str(e):
    return "install a C++ compiler (e.g. apt install g++); it is built on the next use"
  return "python -m siamjax.cpu_kernels build shows the error"


def _say_why(reason: str, fix: str) -> None:
  """The one line a user sees when the fast bf16 route could run here but does not."""
  print(f"siamjax: bf16 runs on XLA (slower) instead of oneDNN: {reason}. For the fast "
        f"route: {fix}; SIAMJAX_ONEDNN=0 silences this.", file=sys.stderr, flush=True)


# oneDNN's dnnl_cpu_isa_avx512_core_amx; its ISA values are bit masks that include the
# older ISAs' bits, so a newer AMX ISA has all of these.
_ISA_AMX = 0xFEF


def onednn_amx() -> bool:
  """Whether oneDNN's kernels run on AMX here: the route is ``"onednn-bf16"`` and oneDNN
  dispatches to AMX (the CPU has it and the operating system lets programs use it).

  >>> onednn_amx() in (True, False)
  True
  """
  lib = _load()
  isa = getattr(lib, "siamjax_onednn_isa", None) if lib is not None else None
  return isa is not None and (int(isa()) & _ISA_AMX) == _ISA_AMX


def route_info() -> dict:
  """What :func:`matmul_route` decided here and why, as a JSON-able dict.

  Keys: ``route``, ``library`` (the kernel's path on the oneDNN route, else ``None``),
  ``reason`` (why the route is ``"xla"``, else ``None``), ``error`` (the full load or
  build error, else ``None``), ``cpu_bf16`` (the CPU has AVX512-BF16 or AMX), ``amx``
  (:func:`onednn_amx`) and ``backend``.

  >>> sorted(route_info())
  ['amx', 'backend', 'cpu_bf16', 'error', 'library', 'reason', 'route']
  """
  route = matmul_route()
  return {"route": route, "library": _state.get("path"), "reason": _state.get("reason"),
          "error": _state.get("error"), "cpu_bf16": _cpu_has_bf16(), "amx": onednn_amx(),
          "backend": jax.default_backend()}


def matmul_route() -> str:
  """The route bf16 matrix products take here: ``"onednn-bf16"`` or ``"xla"``.

  ``"onednn-bf16"`` when the kernel library is built (or buildable from
  ``$SIAMJAX_ONEDNN``), loads, the backend is the CPU and the CPU has AVX512-BF16 or
  AMX; ``SIAMJAX_ONEDNN=0`` forces ``"xla"``. Decided once per process.

  >>> matmul_route() in ("onednn-bf16", "xla")
  True
  """
  return "onednn-bf16" if _load() is not None else "xla"


def _main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(prog="python -m siamjax.cpu_kernels",
                              description="Build the oneDNN bf16 kernel, or say which route "
                                          "bf16 products take here.")
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="compile siamjax/csrc/onednn_matmul.cc")
  b.add_argument("--onednn", default=None, help="oneDNN prefix holding include/ and lib/")
  sub.add_parser("route", help="print the route bf16 products take here (first line), then "
                               "the kernel's path or why it is not used")
  args = p.parse_args(argv)
  if args.cmd == "build":
    try:
      print(build(args.onednn, verbose=True))
    except (FileNotFoundError, RuntimeError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  info = route_info()
  print(info["route"])
  if info["library"]:
    print(f"kernel: {info['library']}")
    print(f"AMX: {'yes' if info['amx'] else 'no'}")
  if info["reason"]:
    print(f"why not oneDNN: {info['reason']}")
  if info["error"]:
    print(f"error: {info['error']}")
  return 0
