"""The one training loop of siamjax: a jitted, donated step of K fused updates, and a
resumable, crash-proof loop around it.

The train state is a plain dict pytree::

    {"step": int32 [], "params": ..., "opt_state": ..., "model_state": ..., "rng": uint32 key data}

A recipe supplies ``loss_fn(params, model_state, data, key) -> (loss, (model_state,
metrics))`` where ``data`` is any pytree of device arrays (e.g. the whole training set)
and ``key`` is ``fold_in(rng, step)``, so sampling happens inside the step and a run is a
pure function of the seed. Recipes that walk an epoch in a fixed shuffled order add a
``prepare(data, key, step, num_steps)`` that draws the rows of the call's batches once
per call (:func:`siamjax.sampling.epoch_batches`); ``loss_fn`` then takes the update's
batch as a fifth argument.

:func:`make_train_step` fuses ``steps_per_call`` updates into one ``lax.scan`` under one
``jit`` with the state donated. :func:`fit` runs it under
``jax.transfer_guard("disallow")``, fetches metrics every ``log_every`` calls, evaluates
(early stopping on a value to maximise or minimise), writes ``metrics.jsonl``, shows a
progress bar with examples/s and an ETA that respects the time limit, and checkpoints
with orbax. The work directory protocol:

* re-running the same command resumes from the latest checkpoint, bitwise: a resumed run
  ends with the parameters of an uninterrupted one; a finished run is recorded as such
  in its last checkpoint, and fitting it again trains nothing;
* one process at a time: :func:`lock_workdir` (``fcntl.flock``, released by the kernel
  when a process dies) refuses a second one at once, naming the holder's pid;
* a checkpoint that does not match the state being fitted (another architecture) is
  refused before anything is written, naming the differing leaves;
* Ctrl-C or SIGTERM stops after the current call, saves a checkpoint and raises
  :class:`Interrupted`;
* saving is idempotent (a step already on disk is replaced), so no sequence of kills
  leaves a work directory that cannot be resumed;
* multi-process (``jax.distributed``): every process calls orbax (its multi-process
  save), only process 0 writes ``metrics.jsonl`` and the progress bar, and stop
  decisions (signals, time limit) are agreed between processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["init_state", "make_train_step", "fit", "run", "FitResult", "restore", "restore_best",
           "restore_variables", "per_layer_sgd", "lock_workdir", "RunError", "WorkdirLocked",
           "CheckpointMismatch", "Interrupted", "checkpoint_steps", "read_metrics",
           "METRICS_FILE"]

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


class RunError(Exception):
  """A problem with a run's work directory that the user must resolve (one-line message)."""


class WorkdirLocked(RunError):
  """Another live process holds the work directory."""


class CheckpointMismatch(RunError):
  """The work directory's checkpoint was written for another model or optimiser."""


class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) or SIGTERM after saving a checkpoint.

  Attributes:
    step: the step of the saved checkpoint.
    workdir: where it was saved (``None`` without a work directory).
    signum: the signal number; :attr:`exit_code` is ``128 + signum`` (130 for Ctrl-C).
  """

  def __init__(self, step: int, workdir, signum: int):
    self.step, self.workdir, self.signum = step, workdir, signum
    where = f"checkpoint saved in {workdir}" if workdir is not None else "nothing saved"
    super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: {where}"
                     + ("; re-run the same command to resume" if workdir is not None else ""))

  @property
  def exit_code(self) -> int:
    """The process exit status for this signal, ``128 + signum``."""
    return 128 + self.signum


def init_state(params, optimizer: optax.GradientTransformation, *, key: jax.Array,
               model_state=None) -> dict:
  """A fresh train state.

  Args:
    params: the parameter pytree.
    optimizer: an optax transformation.
    key: the run's root ``jax.random`` key (typed or raw); per-step keys are
      ``fold_in(key, step)``.
    model_state: non-trained variables (e.g. batch-norm statistics), default ``{}``.

  Returns:
    The state dict (see the module docstring).
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimizer.init(params),
          "model_state": {} if model_state is None else model_state,
          "rng": jnp.asarray(key, jnp.uint32)}


_CONV_PRIMITIVES = ("conv_general_dilated",)


def _has_conv(jaxpr) -> bool:
  """Whether a (closed) jaxpr contains a convolution, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _CONV_PRIMITIVES:
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          if _has_conv(sub):
            return True
  return False


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    steps_per_call: int = 1, prepare: Callable | None = None,
                    unroll: int | bool | None = None, mesh=None) -> Callable:
  """Builds ``step(state, data) -> (state, metrics)``: ``steps_per_call`` fused updates.

  Args:
    loss_fn: ``(params, model_state, data, key) -> (loss, (model_state, metrics))``;
      ``metrics`` is a dict of scalars; ``key`` is ``fold_in(rng, step)``. With
      ``prepare``, ``loss_fn(params, model_state, data, key, batch)``.
    optimizer: an optax transformation.
    steps_per_call: updates per dispatch (one ``lax.scan``; no loop for 1), amortising
      Python overhead.
    prepare: ``(data, key, step, num_steps) -> batches``, run once per call before its
      ``num_steps = steps_per_call`` updates, with the run's shuffle key (derived from
      ``rng``, independent of the per-step keys) and the call's first step; ``batches``
      is a pytree with leading axis ``num_steps`` and update ``i`` receives
      ``batches[i]``. For epoch-wise shuffles (:func:`siamjax.sampling.epoch_batches`).
    unroll: ``lax.scan``'s ``unroll``. Default: fully unrolled on the CPU when the step
      contains a convolution (XLA:CPU runs convolutions inside a while loop several
      times slower), else 1.
    mesh: a data-parallel mesh (:func:`siamjax.parallel.make_mesh`) to run the step on
      several devices: state and data replicated, and every batch that ``loss_fn``
      passes through :func:`siamjax.parallel.shard_batch` split across the devices,
      gradients reduced by XLA. The results do not depend on the device count (up to
      float reduction order). ``None``: one device.

  Returns:
    A jitted function with ``state`` donated; ``metrics`` holds the mean over the fused
    steps of ``loss`` and of each entry of ``loss_fn``'s metrics.

  Raises:
    ValueError: ``steps_per_call < 1``.
  """
  if not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one(state, data, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    args = () if prepare is None else (batch,)
    (loss, (model_state, metrics)), grads = grad_fn(state["params"], state["model_state"],
                                                    data, key, *args)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
           "model_state": model_state, "rng": state["rng"]}
    return new, {"loss": loss, **metrics}

  def step(state, data):
    batches = None
    if prepare is not None:
      shuffle_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))[1]
      batches = prepare(data, shuffle_key, state["step"], steps_per_call)
    first = None if batches is None else jax.tree.map(lambda b: b[0], batches)
    if steps_per_call == 1:  # no loop at all (a length-1 scan stays a while loop)
      return one(state, data, first)
    how = unroll
    if how is None:
      how = jax.default_backend() == "cpu" and _has_conv(
          jax.make_jaxpr(one)(state, data, first))
    state, metrics = jax.lax.scan(lambda s, b: one(s, data, b), state, batches,
                                  length=steps_per_call, unroll=how)
    return state, jax.tree.map(jnp.mean, metrics)

  if mesh is not None:
    from siamjax import parallel
    return parallel.data_parallel(step, mesh, donate_argnums=0)
  return jax.jit(step, donate_argnums=0)


class FitResult(dict):
  """Summary of :func:`fit` (JSON-ready; ``None`` where a figure does not exist).

  Keys: ``steps``, ``examples``, ``wall_time_s`` (this call), ``compile_time_s`` (the
  first call's, of the session that compiled), ``train_time_s`` and ``examples_per_s``
  (over every session of the run, compilation and evaluation excluded),
  ``trained_steps`` (in this call), ``final_loss`` (the last fetched training loss),
  ``best`` (the monitored value), ``best_step``, ``stopped_early``, ``out_of_time``,
  ``finished``, ``end`` (why training ended: ``"num_steps"``, ``"early_stop"``,
  ``"time_limit"``), ``resumed_from``, ``history`` (evaluation records).
  """


# ----------------------------------------------------------------------------- workdirs

_HELD: dict[str, list] = {}  # lock path -> [file, depth]: locks are re-entrant per process


def _process_index() -> int:
  return jax.process_index()


def _lock_path(workdir: Path) -> Path:
  i = _process_index()
  return workdir / (".lock" if i == 0 else f".lock.p{i}")


@contextlib.contextmanager
def lock_workdir(workdir):
  """Holds ``workdir`` for this process (created if missing); re-entrant.

  Uses ``fcntl.flock`` on ``workdir/.lock`` (``.lock.p<i>`` for process ``i > 0`` of a
  multi-process run), which the kernel releases when the holder dies, ``kill -9``
  included: a crash never leaves a stale lock.

  Raises:
    WorkdirLocked: another live process holds it (the message names its pid).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = _lock_path(workdir)
  key = str(path.resolve())
  if key in _HELD:
    _HELD[key][1] += 1
    try:
      yield workdir
    finally:
      _HELD[key][1] -= 1
    return
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise WorkdirLocked(f"workdir {workdir} is in use by another run (pid {holder}); wait "
                        f"for it to finish or pass another --workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  _HELD[key] = [f, 1]
  try:
    yield workdir
  finally:
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
      del _HELD[key]
      fcntl.flock(f, fcntl.LOCK_UN)
      f.close()


def _managers(workdir: Path, *, with_best: bool = True):
  """The latest (2 kept) and best (1 kept) checkpoint managers of ``workdir``; the best
  one is ``None`` when ``with_best`` is off and there is no ``checkpoints_best/`` yet."""
  import orbax.checkpoint as ocp
  opts = dict(enable_async_checkpointing=False, cleanup_tmp_directories=True)

  def manager(name, keep):
    return ocp.CheckpointManager(
        (workdir / name).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  best = workdir / "checkpoints_best"
  return manager("checkpoints", 2), (manager("checkpoints_best", 1) if best.is_dir()
                                     or with_best else None)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the latest-checkpoint folder of ``workdir`` (finished saves only)."""
  folder = Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def _save(mgr, step: int, state, meta: dict) -> None:
  """Saves ``state`` and ``meta`` at ``step``, replacing a save of that step if any."""
  import orbax.checkpoint as ocp
  if step in mgr.all_steps():
    mgr.delete(step)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)), force=True)
  mgr.wait_until_finished()


def _leaf_name(path) -> str:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return "/".join(out)


def _check_matches(mgr, step: int, like, where: Path) -> None:
  """Raises :class:`CheckpointMismatch` unless the checkpoint's leaves match ``like``'s."""
  saved = mgr.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)
  have = {_leaf_name(p): (tuple(v.shape), np.dtype(v.dtype))
          for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  want = {_leaf_name(p): (tuple(np.shape(v)), np.dtype(v.dtype))
          for p, v in jax.tree_util.tree_flatten_with_path(like)[0]}
  diffs = [f"{k} is missing from the checkpoint" for k in want if k not in have]
  diffs += [f"{k} is in the checkpoint but not in this run" for k in have if k not in want]
  diffs += [f"{k} has shape {have[k][0]} {have[k][1]} in the checkpoint, {want[k][0]} "
            f"{want[k][1]} in this run" for k in want if k in have and have[k] != want[k]]
  if diffs:
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    raise CheckpointMismatch(
        f"the checkpoint in {where} was written by another model or optimiser: "
        f"{'; '.join(diffs[:4])}{more}. Use another --workdir, or delete {where} to start "
        f"over")


def _restore(mgr, step: int, like, where: Path):
  import orbax.checkpoint as ocp
  _check_matches(mgr, step, like, where)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                  meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def restore(workdir, like, *, which: str = "latest"):
  """``(state, meta)`` of ``workdir``'s latest or best checkpoint (``None`` if none).

  Args:
    workdir: a work directory written by :func:`fit`.
    like: a state with the shapes, dtypes and shardings to restore into.
    which: ``"latest"`` or ``"best"``.

  Raises:
    CheckpointMismatch: the checkpoint does not match ``like``.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  workdir = Path(workdir)
  folder = workdir / ("checkpoints" if which == "latest" else "checkpoints_best")
  if not folder.is_dir():
    return None
  latest, best = _managers(workdir, with_best=False)
  mgr = latest if which == "latest" else best
  step = mgr.latest_step()
  return None if step is None else _restore(mgr, step, like, folder / str(step))


def restore_best(workdir, like):
  """The best checkpoint's state under ``workdir`` (``None`` if there is none)."""
  out = restore(workdir, like, which="best")
  return None if out is None else out[0]


def restore_variables(workdir, *, which: str = "best") -> tuple[dict, dict, int, str]:
  """A finished or running work directory's model variables, without knowing its optimiser.

  Reads the checkpoint's own metadata for the shapes, so no ``like`` state is needed: a
  model can be loaded by code that never built the training state.

  Args:
    workdir: a work directory written by :func:`fit`.
    which: ``"best"``: the best checkpoint when the run kept one, else the latest (what
      the recipes evaluate); ``"latest"``: the latest.

  Returns:
    ``(params, model_state, step, kind)`` with host (NumPy) arrays; ``kind`` is
    ``"best"`` or ``"latest"``, the checkpoint actually read.

  Raises:
    RunError: ``workdir`` is missing or holds no finished checkpoint (naming the
      checkpoint interval the run would have saved at, when it says).
  """
  import orbax.checkpoint as ocp
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise RunError(f"workdir {workdir} does not exist")
  folders = (["checkpoints_best"] if which == "best" else []) + ["checkpoints"]
  for name in folders:
    steps = checkpoint_steps(workdir) if name == "checkpoints" else sorted(
        int(p.name) for p in (workdir / name).glob("*")
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())
    if steps:
      break
  else:
    raise RunError(f"workdir {workdir} holds no checkpoint: its run has not saved one yet "
                   f"(it saves at every checkpoint interval and when training ends); "
                   f"train it first, or wait for its first checkpoint")
  mgr = ocp.CheckpointManager((workdir / name).absolute(), item_handlers={
      "state": ocp.StandardCheckpointHandler()})
  state = mgr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = jax.device_get(state["state"])
  return (state["params"], state.get("model_state") or {}, steps[-1],
          "best" if name == "checkpoints_best" else "latest")


METRICS_FILE = "metrics.jsonl"
"""The file in a work directory where :func:`fit` appends one JSON record per line."""


def read_metrics(path: str | os.PathLike, *, kind: str | None = None) -> list[dict]:
  """The records of a run's ``metrics.jsonl``, in the order written.

  Tolerant of an interrupted run: blank lines and a line cut short by a kill are
  skipped, and a missing file reads as no records.

  Args:
    path: a work directory (its :data:`METRICS_FILE`) or the file itself.
    kind: keep only the records of this kind (``"train"`` or ``"eval"``).

  Returns:
    A list of dicts, each with ``"kind"`` and ``"step"``.
  """
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:  # blank, or cut by a kill
      continue
    if isinstance(r, dict) and (kind is None or r.get("kind") == kind):
      records.append(r)
  return records


def _trim_log(path: Path, step: int) -> None:
  """Keeps the records up to ``step``, the last one of each (kind, step) (process 0)."""
  if not path.is_file():
    return
  records = {}
  for r in read_metrics(path):
    if r.get("step", 0) <= step:
      records[(r.get("kind"), r.get("step"))] = json.dumps(r)
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(line + "\n" for line in records.values()))
  os.replace(tmp, path)


def _finite(v):
  v = float(v)
  return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- signals


class _Signals:
  """Turns SIGINT/SIGTERM into a flag checked between calls (main thread only).

  A second signal restores the previous handlers, so pressing Ctrl-C twice stops at once.
  """

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:
      self._restore()
      raise KeyboardInterrupt
    self.signum = signum

  def _restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()


def _agree(flag: int) -> int:
  """The largest ``flag`` over the processes (a no-op with one process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(flag))))


# ----------------------------------------------------------------------------- fit


def fit(state: dict, step_fn: Callable, data, *, num_steps: int, steps_per_call: int,
        workdir=None, examples_per_step: int = 1, eval_fn: Callable | None = None,
        eval_every: int = 0, monitor: str = "val_accuracy", mode: str = "max",
        patience: int = 0, checkpoint_every: int = 0, log_every: int = 1,
        progress: bool = True, hooks: tuple[Callable, ...] = (), unit: str = "pairs",
        time_limit_s: float = 0.0, desc: str | None = None,
        restore_only: bool = False) -> tuple[dict, FitResult]:
  """Trains ``state`` with ``step_fn`` (from :func:`make_train_step`) for ``num_steps``.

  Args:
    state: from :func:`init_state` (ignored in favour of the latest checkpoint when
      ``workdir`` holds one: re-running the same command resumes; a run recorded there
      as finished is returned without training).
    step_fn: ``(state, data) -> (state, metrics)`` doing ``steps_per_call`` updates.
    data: pytree of device arrays passed to every call (put it on the device first;
      nothing is transferred inside the loop, which runs under
      ``jax.transfer_guard("disallow")``).
    num_steps: total updates (a multiple of ``steps_per_call``). Raising it for a
      finished run continues that run.
    steps_per_call: updates per call of ``step_fn``.
    workdir: folder for ``checkpoints/``, ``checkpoints_best/`` and ``metrics.jsonl``
      (``None``: nothing written, no resume); held with :func:`lock_workdir`.
    examples_per_step: pairs (or images) per update, for throughput.
    eval_fn: ``state -> dict`` of floats, run every ``eval_every`` updates and at the end.
    monitor: the ``eval_fn`` key that picks the best checkpoint and drives early stopping.
    mode: ``"max"`` (accuracy) or ``"min"`` (a validation loss) for ``monitor``.
    patience: stop after this many evaluations without improvement (0: never).
    checkpoint_every: updates between checkpoints (0: only at the end).
    log_every: calls between metric fetches (the only device-to-host syncs).
    progress: show a tqdm bar with examples/s and ETA (process 0).
    hooks: callables ``hook(step, state)`` run after each call (e.g. for tests).
    unit: name of an example in the bar and logs (``"pairs"``, ``"images"``).
    time_limit_s: stop (and checkpoint) once this much wall time has passed in this
      call, checked at metric fetches (0: no limit); a run stopped so is finished. A
      time-limited run is not reproducible step for step; leave it 0 where that matters.
    desc: label of the progress bar.
    restore_only: restore the latest checkpoint and return it without training or
      writing anything (evaluation of a trained work directory).

  Returns:
    ``(state, FitResult)``.

  Raises:
    ValueError: misaligned step counts or a bad ``mode``.
    WorkdirLocked, CheckpointMismatch: see :func:`lock_workdir` and the module docstring.
    RunError: ``restore_only`` and no checkpoint.
    Interrupted: SIGINT or SIGTERM arrived; a checkpoint of the current step was saved.
  """
  if num_steps % steps_per_call:
    raise ValueError(f"num_steps={num_steps} must be a multiple of steps_per_call="
                     f"{steps_per_call}")
  for name, every in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
    if every % steps_per_call:
      raise ValueError(f"{name}={every} must be a multiple of steps_per_call={steps_per_call}")
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  if workdir is None:
    if restore_only:
      raise RunError("restore_only needs a workdir")
    return _fit(state, step_fn, data, None, locals())
  with lock_workdir(workdir) as w:
    return _fit(state, step_fn, data, w, locals())


def _fit(state, step_fn, data, workdir, kw):
  num_steps, steps_per_call = kw["num_steps"], kw["steps_per_call"]
  eval_fn, eval_every, monitor = kw["eval_fn"], kw["eval_every"], kw["monitor"]
  sign = 1.0 if kw["mode"] == "max" else -1.0
  patience, checkpoint_every = kw["patience"], kw["checkpoint_every"]
  log_every, unit, time_limit_s = kw["log_every"], kw["unit"], kw["time_limit_s"]
  examples_per_step = kw["examples_per_step"]
  chief = _process_index() == 0
  meta = {"best": None, "best_step": -1, "bad_evals": 0, "history": [], "end": None,
          "final_loss": None, "train_time_s": 0.0, "timed_steps": 0, "compile_time_s": None}
  latest = best_mgr = log = None
  resumed_from = None
  if workdir is not None:
    latest, best_mgr = _managers(workdir, with_best=eval_fn is not None)
    log = workdir / METRICS_FILE if chief else None
    last = latest.latest_step()
    if last is not None:
      resumed_from = int(last)
      state, saved = _restore(latest, resumed_from, state, workdir / "checkpoints" / str(last))
      meta.update(saved)
      if log is not None and not kw["restore_only"]:
        _trim_log(log, resumed_from)
    elif kw["restore_only"]:
      raise RunError(f"{workdir} holds no checkpoint to evaluate; train first (run without "
                     f"--eval-only)")
  step = int(jax.device_get(state["step"]))
  t_start = time.perf_counter()

  def result(trained: int, wall: float):
    timed = meta["timed_steps"] * examples_per_step
    return FitResult(
        steps=step, examples=step * examples_per_step, wall_time_s=wall,
        compile_time_s=meta["compile_time_s"], train_time_s=meta["train_time_s"],
        examples_per_s=(timed / meta["train_time_s"] if meta["timed_steps"] and
                        meta["train_time_s"] > 0 else None),  # None: only the compile call
        trained_steps=trained, final_loss=meta["final_loss"], best=meta["best"],
        best_step=meta["best_step"], stopped_early=meta["end"] == "early_stop",
        out_of_time=meta["end"] == "time_limit", finished=meta["end"] is not None,
        end=meta["end"], resumed_from=resumed_from, history=meta["history"])

  if kw["restore_only"]:
    return state, result(0, time.perf_counter() - t_start)
  if meta["end"] == "num_steps" and step < num_steps:
    meta["end"] = None  # a finished run asked for more steps continues
  if meta["end"] is not None:  # finished: nothing to do
    return state, result(0, time.perf_counter() - t_start)

  def write(record):
    if log is not None:
      with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")

  def evaluate(step, state):
    record = {"step": step, **{k: _finite(v) for k, v in eval_fn(state).items()}}
    meta["history"].append(record)
    write({"kind": "eval", **record})
    value = record[monitor]
    if value is not None and (meta["best"] is None or sign * value > sign * meta["best"]):
      meta.update(best=value, best_step=step, bad_evals=0)
      if best_mgr is not None:
        _save(best_mgr, step, state, meta)
    else:
      meta["bad_evals"] += 1
    return record

  bar = None
  if kw["progress"] and chief:
    from tqdm.auto import tqdm
    # disable=None: no bar when the output is not a terminal (a log file, CI), whose
    # carriage-return frames would fill it.
    bar = tqdm(total=num_steps, initial=step, unit="step", dynamic_ncols=True, disable=None,
               desc=kw["desc"], bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
               "[{elapsed}{postfix}]")
  first = True
  calls = 0
  trained = 0
  t_mark, steps_mark = t_start, step
  end = None
  with _Signals() as signals:
    while step < num_steps:
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, data)
      if first:  # The first call compiles: time it apart.
        jax.block_until_ready(metrics)
        if meta["compile_time_s"] is None:
          meta["compile_time_s"] = time.perf_counter() - t_start
        t_mark, steps_mark, first = time.perf_counter(), step + steps_per_call, False
      step += steps_per_call
      trained += steps_per_call
      calls += 1
      fetch = calls % log_every == 0 or step >= num_steps
      if fetch:
        m = jax.device_get(metrics)  # the one sync per log_every calls
        now = time.perf_counter()
        meta["train_time_s"] += now - t_mark
        meta["timed_steps"] += step - steps_mark
        rate = ((step - steps_mark) * examples_per_step / max(now - t_mark, 1e-9)
                if step > steps_mark else None)  # None: only the compiling call ran
        t_mark, steps_mark = now, step
        meta["final_loss"] = _finite(m["loss"])
        write({"kind": "train", "step": step, f"{unit}_per_s": rate,
               **{k: _finite(v) for k, v in m.items()}})
        out_of_time = bool(time_limit_s) and now - t_start > time_limit_s
        if _agree(int(out_of_time)):
          end = "time_limit"
        if bar is not None and rate is not None:
          left = (num_steps - step) / max(rate / examples_per_step, 1e-9)
          if time_limit_s:
            left = min(left, max(time_limit_s - (now - t_start), 0.0))
          bar.set_postfix_str(f"<{_clock(left)}, loss={m['loss']:.4f}, "
                              f"{unit}/s={rate:.0f}")
      if bar is not None:
        bar.update(steps_per_call)
      if end is None and step >= num_steps:
        end = "num_steps"
      signum = _agree(signals.signum or 0) if fetch or jax.process_count() == 1 else 0
      if end is None and eval_fn is not None and eval_every and step % eval_every == 0:
        t_eval = time.perf_counter()
        rec = evaluate(step, state)
        if bar is not None:
          best = "-" if meta["best"] is None else f"{meta['best']:.4f}"
          bar.write(f"step {step}: {monitor}={rec[monitor]} (best {best})")
        if patience and meta["bad_evals"] >= patience:
          end = "early_stop"
        t_mark += time.perf_counter() - t_eval  # throughput excludes evaluation
      if signum and end is None:  # a run that ends at this step just finishes
        if latest is not None:
          _save(latest, step, state, meta)
        if bar is not None:
          bar.close()
        raise Interrupted(step, workdir, signum)
      if end is None and latest is not None and checkpoint_every and \
          step % checkpoint_every == 0:
        t_save = time.perf_counter()
        _save(latest, step, state, meta)
        t_mark += time.perf_counter() - t_save
      for hook in kw["hooks"]:
        hook(step, state)
      if end is not None:
        break
  if end is None:  # num_steps reached before the loop (a resumed or zero-step run)
    end = "num_steps"
  if eval_fn is not None and (not meta["history"] or meta["history"][-1]["step"] != step):
    evaluate(step, state)
  meta["end"] = end
  if latest is not None:
    _save(latest, step, state, meta)
  jax.block_until_ready(state)
  if bar is not None:
    bar.close()
  return state, result(trained, time.perf_counter() - t_start)


def run(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: dict, data, *,
        num_steps: int, steps_per_call: int, prepare: Callable | None = None,
        devices: int = 1, eval_fn: Callable | None = None,
        **fit_kwargs) -> tuple[dict, FitResult]:
  """:func:`make_train_step` + :func:`fit` on ``devices`` devices: what every recipe calls.

  Builds the step (with a data-parallel mesh when ``devices > 1``), replicates ``state``
  and ``data`` on it (:func:`siamjax.parallel.replicate`, multi-process too), fits, and
  returns this process's copy of the final state (:func:`siamjax.parallel.local`), so
  that evaluation code sees arrays on one device. ``eval_fn`` receives such a copy too.
  The step donates its state: device arrays passed in ``state`` are used up (pass a
  copy, ``jax.tree.map(jnp.copy, state)``, to keep them).

  Args:
    loss_fn, optimizer, prepare, steps_per_call: as :func:`make_train_step`.
    state: from :func:`init_state` (on one device or on the host).
    data: the training data pytree (host or device arrays).
    num_steps: as :func:`fit`.
    devices: devices of the data-parallel mesh (1: no mesh).
    eval_fn: as :func:`fit`, called with a one-device copy of the state.
    **fit_kwargs: the other arguments of :func:`fit`.

  Returns:
    ``(state on one device, FitResult)``.
  """
  from siamjax import parallel
  mesh = parallel.make_mesh(devices) if devices != 1 else None
  step_fn = make_train_step(loss_fn, optimizer, steps_per_call=steps_per_call,
                            prepare=prepare, mesh=mesh)
  if mesh is None:
    state, data = jax.device_put((state, data))
  else:
    state, data = parallel.replicate((state, data), mesh)
  local_eval = None if eval_fn is None else (lambda s: eval_fn(parallel.local(s)))
  state, result = fit(state, step_fn, data, num_steps=num_steps,
                      steps_per_call=steps_per_call, eval_fn=local_eval, **fit_kwargs)
  return parallel.local(state), result


def _clock(seconds: float) -> str:
  seconds = int(seconds)
  return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
          else f"{seconds // 60:02d}:{seconds % 60:02d}")


def per_layer_sgd(layers: dict[str, tuple[float, float, float]], *, steps_per_epoch: int,
                  lr_decay_per_epoch: float = 0.99, momentum_start: float = 0.5,
                  momentum_ramp_epochs: int = 10) -> optax.GradientTransformation:
  """Koch et al.'s SGD: per-layer learning rate, momentum and L2, decayed per epoch.

  Layer ``j`` (every parameter whose path contains the name ``j``; the first listed name
  that matches wins, so list specific names first) gets learning rate
  ``lr_j * lr_decay_per_epoch ** epoch``, momentum rising linearly from
  ``momentum_start`` to ``mu_j`` over ``momentum_ramp_epochs``, and L2 weight decay
  ``l2_j`` (added to the gradient as ``l2_j * w``, i.e. a loss term ``l2_j / 2 * |w|^2``).

  Args:
    layers: ``{name: (lr_j, mu_j, l2_j)}``.
    steps_per_epoch: updates per epoch.
    lr_decay_per_epoch: multiplicative decay per epoch (0.99 = the paper's 1%).
    momentum_start: initial momentum of every layer.
    momentum_ramp_epochs: epochs to reach ``mu_j``.

  Returns:
    An optax transformation.

  References:
    G. Koch, R. Zemel, R. Salakhutdinov, ICML DL Workshop 2015, section 4.2.

  >>> import jax.numpy as jnp
  >>> opt = per_layer_sgd({"a": (0.1, 0.9, 0.0)}, steps_per_epoch=10)
  >>> p = {"a": jnp.ones(2)}; u, _ = opt.update({"a": jnp.ones(2)}, opt.init(p), p)
  >>> [round(v, 3) for v in u["a"].tolist()]
  [-0.1, -0.1]
  """
  if not layers:
    raise ValueError("layers must name at least one layer")
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  names = list(layers)

  def label(path, _):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    for name in names:
      if name in keys:
        return name
    raise ValueError(f"parameter {'/'.join(keys)} matches none of the layers {names}")

  transforms = {}
  for name, (lr, mu, l2) in layers.items():
    lr_fn = optax.exponential_decay(lr, steps_per_epoch, lr_decay_per_epoch, staircase=True)
    ramp = max(momentum_ramp_epochs * steps_per_epoch, 1)

    def mom_fn(count, mu=mu, ramp=ramp):
      frac = jnp.minimum(count // steps_per_epoch * steps_per_epoch / ramp, 1.0)
      return momentum_start + (mu - momentum_start) * frac

    transforms[name] = optax.chain(
        optax.add_decayed_weights(l2),
        optax.inject_hyperparams(optax.sgd)(learning_rate=lr_fn, momentum=mom_fn))
  return optax.multi_transform(
      transforms, lambda params: jax.tree_util.tree_map_with_path(label, params))
