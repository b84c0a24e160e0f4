"""Measurement code behind ``benchmarks/losses_per_sec.py``: in-batch losses, siamjax vs PML.

Each row times one in-batch loss and its gradient with respect to the embeddings
``[B, D]`` (the step a training loop pays for besides the encoder), for siamjax (one
jitted ``value_and_grad`` of ``jnp.mean(loss)``) and for pytorch-metric-learning's
equivalent (``loss_fn(embeddings, labels).backward()``, eager torch) on the same device,
the same float32 embeddings and the same labels, in one process.

* Embeddings: ``N(0, 1) / sqrt(D)`` (norms near 1, so margins of 0.1-1 and softmax
  temperatures of 0.07-1 act as in training). Labels: ``P x K`` batches (``K`` samples of
  each of ``B / K`` classes, :data:`LOSSES` gives ``K``), where every anchor has the same
  number of pairs and triplets, so siamjax's per-anchor mean and PML's mean over pairs
  or triplets (``MeanReducer``) are the same number.
* Timing: the first call is reported apart (siamjax: ``lower + compile`` as
  ``compile_s``, then a first run; torch: ``first_call_s``), then ``repeats`` calls, each
  clocked around ``block_until_ready`` (torch CPU ops are synchronous); the row gives
  the median and the spread. A row whose first call took over ``slow_s`` (2 s) times
  ``slow_repeats`` (2) calls instead, so that the default run fits in about 3 minutes on
  2 cores; a fast row keeps calling until its timed calls add up to ``min_total_s``
  (0.5 s, at most ``max_repeats`` = 50 calls), because single millisecond-long calls on
  2 cores swing by 2-3x; each row records its ``repeats``. Both sides are clocked alike.
* Memory: ``temp_bytes`` is siamjax's compiled temporaries
  (``jitted.lower(...).compile().memory_analysis().temp_size_in_bytes``: what XLA
  allocates for the call besides inputs and outputs). ``rss_peak_delta_bytes`` is
  measured the same way for both, in one extra untimed call: the growth of the
  process's peak resident memory (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) over its resident memory just before the call, after the C
  heap's free pages were handed back (``malloc_trim``). It is the call's peak working
  memory as the kernel saw it (inputs and anything else alive before the call are not
  in it), except pages an allocator keeps mapped across calls: XLA reuses some of its
  buffers, so for siamjax read ``temp_bytes``; its RSS figure is a lower bound.
  ``null`` where the kernel does not allow the reset.
* PML rows run under an address-space cap (``Config.pml_memory_gib``, 6 GiB beyond the
  process's size, :func:`address_space_cap`): PML's NT-Xent asks for 12 GiB at B = 1024
  and 192 GiB at B = 4096, which on a shared machine would mean swap or the OOM killer;
  such a row is reported as ``skipped`` with PML's allocation error.
* Equality: every row with a PML equivalent records both losses, their relative
  difference and the largest gradient difference relative to the largest gradient
  entry; ``equal`` is both below :data:`RTOL`.
* Floor: just before each siamjax row, the same run times the loss's own matrix products
  alone on the same device, in one jitted call clocked the same way (:func:`floor_row`):
  the forward Gram product ``E E^T`` and the two gradient products ``dG E`` and
  ``dG^T E`` (``[B, B] x [B, D]``) for the losses that differentiate through the whole
  distance matrix, the Gram product alone for batch-hard (its two partners' distances are
  formed again from gathered rows, ``O(B D)``). ``vs_floor`` is the loss's time over the
  floor's: 1 would be a loss that costs no more than its products. The same products are
  timed once per row, so a shared machine's swings show in the floor too;
  ``vs_best_floor`` divides by the fastest floor of the same products and size in the run
  (:func:`best_floors`), the stricter ratio.

A loss siamjax does not have yet (the names of :data:`LOSSES` not in
:mod:`siamjax.losses`) is skipped with a printed reason and a ``skipped`` row.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import losses as sj_losses
from siamjax import results

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (the device slug and software record)
from _timing import repeat_until, reset_peak, status_bytes  # noqa: E402

RTOL = 1e-4  # float32: both sides sum O(B^2) terms in different orders


def _lp(**kw):
  from pytorch_metric_learning.distances import LpDistance
  return LpDistance(normalize_embeddings=False, **kw)


def _mean():
  from pytorch_metric_learning.reducers import MeanReducer
  return MeanReducer()


def _pml_triplet_all():
  from pytorch_metric_learning.losses import TripletMarginLoss
  loss = TripletMarginLoss(margin=1.0, distance=_lp(), reducer=_mean())
  return lambda e, y: loss(e, y)


def _pml_triplet_hard():
  from pytorch_metric_learning.losses import TripletMarginLoss
  from pytorch_metric_learning.miners import BatchHardMiner
  loss = TripletMarginLoss(margin=1.0, distance=_lp(), reducer=_mean())
  miner = BatchHardMiner(distance=_lp())
  return lambda e, y: loss(e, y, miner(e, y))


def _pml_contrastive():
  from pytorch_metric_learning.losses import ContrastiveLoss
  loss = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=_lp(), reducer=_mean())
  return lambda e, y: loss(e, y)


def _pml(cls_name: str, **kw):
  def make():
    from pytorch_metric_learning import losses as pml_losses
    extra = {k: v() if callable(v) else v for k, v in kw.items()}
    loss = getattr(pml_losses, cls_name)(reducer=_mean(), **extra)
    return lambda e, y: loss(e, y)
  return make


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """One row family: a siamjax loss by name and the PML loss it is compared with."""
  name: str
  fn: str  # the function's name in siamjax.losses
  kwargs: dict
  per_class: int  # K of the P x K batches
  pml: Callable | None  # () -> (embeddings, labels) -> scalar torch loss; None: no equivalent
  pml_what: str  # the PML call, or why there is none
  equivalent: bool = True  # False: PML's nearest loss is another formula (timed, not compared)
  # [B, D] x [D, B]-sized products of value and gradient: the Gram product and its two
  # gradient products (3), or the Gram product alone (1: batch-hard, see floor_row).
  gram_products: int = 3


LOSSES = (
    LossSpec("batch_all", "batch_all_triplet_loss", {"margin": 1.0}, 4, _pml_triplet_all,
             "TripletMarginLoss(margin=1, LpDistance(normalize_embeddings=False), "
             "MeanReducer()): every triplet"),
    LossSpec("batch_all_maxpos", "batch_all_triplet_loss",
             {"margin": 1.0, "max_positives": 3}, 4, _pml_triplet_all,
             "as batch_all; siamjax told max_positives=3 (K - 1): no sort, O(P B) per anchor"),
    LossSpec("batch_hard", "batch_hard_triplet_loss", {"margin": 1.0}, 4, _pml_triplet_hard,
             "TripletMarginLoss(margin=1, LpDistance(normalize_embeddings=False), "
             "MeanReducer()) on BatchHardMiner(LpDistance(normalize_embeddings=False))",
             gram_products=1),
    LossSpec("semi_hard", "semi_hard_triplet_loss", {"margin": 1.0}, 4, None,
             "no equivalent: PML's TripletMarginMiner('semihard') keeps every semi-hard "
             "triplet; siamjax (FaceNet, TF-Addons) takes the closest one per positive"),
    LossSpec("semi_hard_maxpos", "semi_hard_triplet_loss",
             {"margin": 1.0, "max_positives": 3}, 4, None,
             "no equivalent (as semi_hard); siamjax told max_positives=3 (K - 1)"),
    LossSpec("all_pairs_contrastive", "all_pairs_contrastive_loss", {"margin": 1.0}, 4,
             _pml_contrastive,
             "nearest: ContrastiveLoss(pos_margin=0, neg_margin=1, LpDistance("
             "normalize_embeddings=False), MeanReducer()), the unsquared hinges relu(d), "
             "relu(1 - d) where siamjax has d^2/2, relu(1 - d)^2/2: timed, values not "
             "compared", equivalent=False),
    LossSpec("ntxent", "ntxent_loss", {"temperature": 0.07}, 4,
             _pml("NTXentLoss", temperature=0.07), "NTXentLoss(temperature=0.07)"),
    LossSpec("in_batch_softmax", "in_batch_softmax_loss", {"temperature": 1.0}, 2,
             _pml("NCALoss", softmax_scale=1.0, distance=lambda: _lp(power=2)),
             "NCALoss(softmax_scale=1, LpDistance(normalize_embeddings=False, power=2)): "
             "the same loss with one positive per anchor (K = 2)"),
    LossSpec("multi_similarity", "multi_similarity_loss",
             {"alpha": 2.0, "beta": 50.0, "base": 0.5}, 4,
             _pml("MultiSimilarityLoss", alpha=2.0, beta=50.0, base=0.5),
             "MultiSimilarityLoss(alpha=2, beta=50, base=0.5)"),
    LossSpec("circle", "circle_loss", {"margin": 0.4, "gamma": 80.0}, 4,
             _pml("CircleLoss", m=0.4, gamma=80.0), "CircleLoss(m=0.4, gamma=80, "
             "MeanReducer())"),
    LossSpec("lifted_structure", "lifted_structure_loss",
             {"pos_margin": 0.0, "neg_margin": 1.0}, 4,
             _pml("GeneralizedLiftedStructureLoss", pos_margin=0.0, neg_margin=1.0,
                  distance=_lp),
             "GeneralizedLiftedStructureLoss(pos_margin=0, neg_margin=1, LpDistance("
             "normalize_embeddings=False))"),
)
LOSS_NAMES = tuple(s.name for s in LOSSES)


@dataclasses.dataclass
class Config:
  batches: tuple = (256, 1024, 4096)
  dim: int = 512
  repeats: int = 5
  # A row whose first call takes longer than slow_s seconds times slow_repeats calls.
  slow_s: float = 2.0
  slow_repeats: int = 2
  # A fast row repeats until its timed calls add up to min_total_s (at most max_repeats).
  min_total_s: float = 0.5
  max_repeats: int = 50
  # PML rows may map at most this many GiB beyond the process's size (None: no cap).
  pml_memory_gib: float | None = 6.0
  losses: tuple = LOSS_NAMES
  pml: bool = True
  seed: int = 0
  # Also time the loss's value alone (jit(mean(loss))): how the time splits between the
  # forward pass (distances, mining, reductions) and the backward pass.
  stages: bool = False


def batch(cfg: Config, b: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """Float32 embeddings ``N(0, 1) / sqrt(D)`` and P x K labels, the same for both sides."""
  rng = np.random.default_rng([cfg.seed, b, per_class])
  emb = (rng.standard_normal((b, cfg.dim)) / np.sqrt(cfg.dim)).astype(np.float32)
  labels = rng.permutation(np.arange(b) // per_class).astype(np.int32)
  return emb, labels


# ----------------------------------------------------------------------------- memory


def _malloc_trim() -> None:
  """Hands the C heap's free pages back to the kernel (glibc ``malloc_trim``), so a call's
  allocations show in its peak RSS even where an earlier call's freed memory was kept."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def peak_rss_delta(call: Callable[[], object]) -> tuple[int | None, object]:
  """``(bytes, call())``: how far the process's peak resident memory rose above its resident
  memory during ``call()``.

  Linux only: the free heap pages are returned first (:func:`_malloc_trim`), then the
  peak mark ``VmHWM`` is reset to the current RSS (``/proc/self/clear_refs``), and the
  peak read after the call. ``None`` bytes where the kernel does not allow the reset.
  """
  _malloc_trim()
  before = status_bytes("VmRSS") if reset_peak() else None
  out = call()
  peak = status_bytes("VmHWM")
  if before is None or peak is None:
    return None, out
  return max(peak - before, 0), out


@contextlib.contextmanager
def address_space_cap(extra_bytes: int | None):
  """Lets the process map at most ``extra_bytes`` more than it has now (``RLIMIT_AS``), so a
  reference that asks for more fails with an allocation error instead of pushing a shared
  machine into swap or the OOM killer. No-op where the limit cannot be set."""
  size = status_bytes("VmSize")
  if extra_bytes is None or size is None:
    yield
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  cap = size + extra_bytes
  if hard != resource.RLIM_INFINITY:
    cap = min(cap, hard)
  try:
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
  except (ValueError, OSError):
    yield
    return
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------------------- timing


def clock(run: Callable[[], object], sync: Callable[[object], object], cfg: "Config"):
  """First call, then ``cfg.repeats`` timed calls (``cfg.slow_repeats`` when the first took
  longer than ``cfg.slow_s``; more, up to ``cfg.max_repeats``, until they add up to
  ``cfg.min_total_s``), then one untimed call that measures the peak memory.

  Returns ``(first_s, times_s, rss_peak_delta_bytes, output of the last call)``.
  """
  t0 = time.perf_counter()
  sync(run())
  first = time.perf_counter() - t0
  n = cfg.slow_repeats if first > cfg.slow_s else cfg.repeats
  times = repeat_until(lambda: sync(run()), n, cfg.min_total_s, cfg.max_repeats)
  rss, out = peak_rss_delta(lambda: sync(run()))
  return first, times, rss, out


def _timing_fields(first: float, times: list, b: int) -> dict:
  step = statistics.median(times)
  return {"first_call_s": first, "repeats": len(times), "step_s": step, "step_s_all": times,
          "step_s_min": min(times), "step_s_max": max(times), "anchors_per_s": b / step,
          "anchors_per_s_spread": [b / max(times), b / min(times)]}


# ----------------------------------------------------------------------------- rows


def siamjax_row(spec: LossSpec, emb: np.ndarray, labels: np.ndarray, cfg: "Config"):
  """Times ``jit(value_and_grad(mean(loss)))``; returns ``(row, loss, grad)``."""
  fn = getattr(sj_losses, spec.fn)

  def objective(e, y):
    return jnp.mean(fn(e, y, **spec.kwargs))

  e, y = jax.device_put(emb), jax.device_put(labels)
  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(objective)).lower(e, y).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  first, times, rss, (loss, grad) = clock(lambda: compiled(e, y), jax.block_until_ready, cfg)
  row = {"impl": "siamjax", "loss": spec.name, "function": f"siamjax.losses.{spec.fn}",
         "kwargs": spec.kwargs, "batch": emb.shape[0], "dim": emb.shape[1],
         "per_class": spec.per_class, "compile_s": compile_s,
         **_timing_fields(first, times, emb.shape[0]),
         "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
         "rss_peak_delta_bytes": rss, "loss_value": float(loss)}
  if cfg.stages:
    fwd = jax.jit(objective).lower(e, y).compile()
    _, ftimes, _, _ = clock(lambda: fwd(e, y), jax.block_until_ready, cfg)
    fwd_s = statistics.median(ftimes)
    row["stages"] = {"forward_s": fwd_s, "forward_s_min": min(ftimes),
                     "forward_s_max": max(ftimes), "backward_s": row["step_s"] - fwd_s}
  return row, float(loss), np.asarray(grad)


def floor_row(spec: LossSpec, emb: np.ndarray, cfg: "Config") -> dict:
  """Times the loss's matrix products alone: ``E E^T``, then ``dG E`` and ``dG^T E``.

  ``spec.gram_products`` of them (3, or 1: the Gram product alone), float32, jitted in one
  call on the same device as the loss, clocked as :func:`clock` does, with a fixed
  ``dG`` (``[B, B]``). Returns the floor's timing fields, its products and its GFLOP/s.
  """
  b, d = emb.shape
  e = jax.device_put(emb)
  g = jax.device_put(np.random.default_rng(1).standard_normal((b, b)).astype(np.float32))
  if spec.gram_products == 3:
    fn = jax.jit(lambda e, g: (e @ e.T, g @ e, g.T @ e))
  elif spec.gram_products == 1:
    fn = jax.jit(lambda e, g: e @ e.T)
  else:
    raise ValueError(f"gram_products must be 1 or 3, got {spec.gram_products}")
  compiled = fn.lower(e, g).compile()
  first, times, _, _ = clock(lambda: compiled(e, g), jax.block_until_ready, cfg)
  row = _timing_fields(first, times, b)
  flops = spec.gram_products * 2.0 * b * b * d
  return {"products": ["E E^T", "dG E", "dG^T E"][:spec.gram_products], "flops": flops,
          "gflop_per_s": flops / row["step_s"] / 1e9,
          **{k: row[k] for k in ("step_s", "step_s_min", "step_s_max", "repeats")}}


def best_floors(rows: list) -> dict:
  """``{(batch, dim, products): fastest floor step_s}`` over the rows' floors of one run."""
  best: dict = {}
  for r in rows:
    fl = r.get("floor")
    if fl:
      key = (r["batch"], r["dim"], len(fl["products"]))
      best[key] = min(best.get(key, float("inf")), fl["step_s"])
  return best


def add_best_floor(rows: list) -> None:
  """Sets ``vs_best_floor`` on every row with a floor (see :func:`best_floors`)."""
  best = best_floors(rows)
  for r in rows:
    fl = r.get("floor")
    if fl:
      r["vs_best_floor"] = r["step_s"] / best[(r["batch"], r["dim"], len(fl["products"]))]


def pml_row(spec: LossSpec, emb: np.ndarray, labels: np.ndarray, cfg: "Config"):
  """Times ``loss_fn(embeddings, labels).backward()``; returns ``(row, loss, grad)``.

  Runs under :func:`address_space_cap`; an allocation failure gives a ``skipped`` row and
  ``None`` for the loss and gradient.
  """
  import torch

  loss_fn = spec.pml()
  e = torch.from_numpy(emb.copy()).requires_grad_(True)
  y = torch.from_numpy(labels.astype(np.int64))

  def run():
    e.grad = None
    loss = loss_fn(e, y)
    loss.backward()
    return loss

  common = {"impl": "pml", "loss": spec.name, "function": spec.pml_what,
            "batch": emb.shape[0], "dim": emb.shape[1], "per_class": spec.per_class}
  cap = None if cfg.pml_memory_gib is None else int(cfg.pml_memory_gib * 2**30)
  try:
    with address_space_cap(cap):
      first, times, rss, loss = clock(run, lambda x: x, cfg)
      grad = e.grad.numpy().copy()
  except (RuntimeError, MemoryError) as err:
    e.grad = None
    msg = str(err).splitlines()[0][:240]
    return {**common, "skipped": f"failed under the {cfg.pml_memory_gib} GiB cap: {msg}"}, \
        None, None
  row = {**common, **_timing_fields(first, times, emb.shape[0]),
         "rss_peak_delta_bytes": rss, "loss_value": float(loss.item())}
  return row, float(loss.item()), grad


def compare(sj_loss: float, sj_grad: np.ndarray, pml_loss: float, pml_grad: np.ndarray) -> dict:
  """Relative differences of the loss and of the gradient (max entry over max entry)."""
  loss_rel = abs(sj_loss - pml_loss) / max(abs(pml_loss), 1e-12)
  grad_rel = float(np.max(np.abs(sj_grad - pml_grad)) / max(np.max(np.abs(pml_grad)), 1e-30))
  return {"loss_rel_diff": loss_rel, "grad_rel_diff": grad_rel,
          "equal": bool(loss_rel < RTOL and grad_rel < RTOL), "rtol": RTOL}


def run(cfg: Config, out: str | None, command: str) -> dict:
  """Runs every (loss, batch) row, prints the table, writes the JSON. Returns the record."""
  t_start = time.time()
  load_at_start = results.load_average()
  info = harness.software()
  try:
    import torch
    import pytorch_metric_learning
    info["pytorch_metric_learning"] = pytorch_metric_learning.__version__
    pml_missing = None if cfg.pml else "--no-pml"
  except ImportError:
    torch = None
    pml_missing = "pytorch-metric-learning not installed (pip install -e '.[pml]')"
  if torch is not None and torch.cuda.is_available():
    print("note: PML runs on the CPU here (the embeddings are torch CPU tensors)", flush=True)
  dev = jax.devices()[0]
  print(f"device: {dev} ({dev.device_kind}); {harness.cpu_model()}, {os.cpu_count()} cores; "
        f"D = {cfg.dim}, batches {list(cfg.batches)}", flush=True)
  if pml_missing:
    print(f"PML rows skipped: {pml_missing}", flush=True)
  specs = [s for s in LOSSES if s.name in cfg.losses]
  rows: list = []
  todo = len(specs) * len(cfg.batches)
  done = 0
  for spec in specs:
    if not hasattr(sj_losses, spec.fn):
      reason = f"siamjax.losses has no {spec.fn} yet"
      print(f"{spec.name}: skipped ({reason})", flush=True)
      rows.append({"impl": "siamjax", "loss": spec.name, "skipped": reason})
      done += len(cfg.batches)
      continue
    for b in cfg.batches:
      done += 1
      emb, labels = batch(cfg, b, spec.per_class)
      floor = floor_row(spec, emb, cfg)
      sj, sj_loss, sj_grad = siamjax_row(spec, emb, labels, cfg)
      sj["floor"] = floor
      sj["vs_floor"] = sj["step_s"] / floor["step_s"]
      if cfg.stages:  # the forward pass has one of the floor's products (E E^T)
        n = len(floor["products"])
        sj["stages"]["forward_minus_its_product_s"] = (sj["stages"]["forward_s"]
                                                       - floor["step_s"] / n)
        sj["stages"]["backward_minus_its_products_s"] = (sj["stages"]["backward_s"]
                                                         - floor["step_s"] * (n - 1) / n)
      rows.append(sj)
      print(f"[{done}/{todo}] {spec.name} B={b}: siamjax {sj['step_s'] * 1e3:.1f} ms "
            f"(compile {sj['compile_s']:.1f} s, {sj['repeats']} repeats, temp "
            f"{_gib(sj['temp_bytes'])}); floor {floor['step_s'] * 1e3:.1f} ms "
            f"({floor['gflop_per_s']:.0f} GFLOP/s): {sj['vs_floor']:.2f}x the floor",
            flush=True)
      if spec.pml is None or pml_missing:
        sj["pml"] = {"skipped": pml_missing or spec.pml_what}
        continue
      pm, pml_loss, pml_grad = pml_row(spec, emb, labels, cfg)
      rows.append(pm)
      sj["pml"] = {"function": spec.pml_what, "equivalent": spec.equivalent}
      if pm.get("skipped"):
        sj["pml"]["skipped"] = pm["skipped"]
        print(f"    PML skipped: {pm['skipped']}", flush=True)
        continue
      sj["vs_pml"] = pm["step_s"] / sj["step_s"]  # > 1: siamjax faster
      if spec.equivalent:
        sj["pml"].update(compare(sj_loss, sj_grad, pml_loss, pml_grad))
      check = (f"equal: {sj['pml']['equal']} (loss rel {sj['pml']['loss_rel_diff']:.1e}, "
               f"grad rel {sj['pml']['grad_rel_diff']:.1e})" if spec.equivalent
               else "values not compared (another formula)")
      print(f"    PML {pm['step_s'] * 1e3:.1f} ms ({pm['repeats']} repeats): siamjax "
            f"{sj['vs_pml']:.1f}x as fast; {check}", flush=True)
  add_best_floor(rows)
  import siamjax.xla
  body = {
      "software": info,
      "fast_cpu_flags": siamjax.xla.fast_cpu_enabled(),
      "config": dataclasses.asdict(cfg),
      "notes": [
          "Each row: one in-batch loss and its gradient w.r.t. float32 embeddings [B, D], "
          "D = %d, N(0, 1)/sqrt(D); P x K labels (per_class = K)." % cfg.dim,
          "siamjax: jit(value_and_grad(mean(loss))); compile_s is lower + compile, "
          "first_call_s the first run after it. PML: loss_fn(e, y).backward(), eager torch "
          "on the CPU; first_call_s is its first call.",
          "step_s: median of the repeats, each clocked around block_until_ready; a row whose "
          "first call took over %g s times %d repeats instead of %d, a fast row repeats "
          "until its timed calls add up to %g s (at most %d; see its 'repeats')."
          % (cfg.slow_s, cfg.slow_repeats, cfg.repeats, cfg.min_total_s, cfg.max_repeats),
          "PML rows run under an address-space cap of %s GiB beyond the process's size "
          "(RLIMIT_AS); a row that needs more is 'skipped' with PML's allocation error."
          % cfg.pml_memory_gib,
          "temp_bytes: XLA's compiled temporaries (memory_analysis). rss_peak_delta_bytes: "
          "peak resident memory above the resident memory before one call (Linux VmHWM "
          "reset via /proc/self/clear_refs, after malloc_trim), in one extra untimed call, "
          "the same measure for both; pages an allocator keeps mapped across calls are not "
          "counted (a lower bound; XLA reuses some buffers, so for siamjax read temp_bytes).",
          "floor: the loss's own matrix products alone, timed in the same run just before "
          "its row (E E^T, dG E, dG^T E; E E^T alone for batch_hard: 'products'); vs_floor: "
          "siamjax step time / floor step time (1: the loss costs no more than its products); "
          "vs_best_floor: over the fastest floor of the same products and size in the run.",
          "vs_pml: PML step time / siamjax step time (> 1: siamjax faster). equal: loss "
          "and gradient within rtol %g; rows whose PML loss is another formula "
          "(equivalent: false) are timed but not compared." % RTOL,
      ],
      "rows": rows,
      "wall_s": time.time() - t_start,
  }
  record = results.record(body, command=command, load_average_at_start=load_at_start)
  if out:
    results.write_json(out, record, indent=1)
  print(format_table(rows))
  print((f"wrote {out}" if out else "no JSON written") + f" in {record['wall_s']:.0f}s")
  return record


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.3f} GiB"


def format_table(rows: list) -> str:
  """One line per (loss, batch): both step times, the ratio, memory and the equality check."""
  head = (f"{'loss':22} {'B':>5} {'siamjax ms':>10} {'spread':>13} {'floor ms':>8} "
          f"{'/floor':>6} {'compile s':>9} "
          f"{'temp GiB':>8} {'rss GiB':>7} {'PML ms':>9} {'spread':>15} {'PML rss':>7} "
          f"{'speedup':>7}  equal")
  lines = [head, "-" * len(head)]
  pml = {(r["loss"], r["batch"]): r for r in rows
         if r["impl"] == "pml" and not r.get("skipped")}
  fmt_gib = lambda n: "-" if n is None else f"{n / 2**30:.3f}"  # noqa: E731
  for r in rows:
    if r["impl"] != "siamjax":
      continue
    if r.get("skipped"):
      lines.append(f"{r['loss']:22} skipped: {r['skipped']}")
      continue
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    spread = f"{ms(r['step_s_min'])}-{ms(r['step_s_max'])}"
    p = pml.get((r["loss"], r["batch"]))
    if p is None:
      why = r.get("pml", {}).get("skipped", "")
      big = re.search(r"allocate (\d+) bytes", why)
      why = (f"PML: an allocation of {int(big.group(1)) / 2**30:.1f} GiB failed" if big
             else why.split(":")[0])
      ptxt = f"{'-':>9} {'':>15} {'-':>7} {'-':>7}  {why}"
    else:
      eq = r["pml"].get("equal")
      eq = "not compared" if eq is None else ("yes" if eq else
                                              f"NO (loss {r['pml']['loss_rel_diff']:.1e})")
      ptxt = (f"{ms(p['step_s']):>9} {ms(p['step_s_min']) + '-' + ms(p['step_s_max']):>15} "
              f"{fmt_gib(p['rss_peak_delta_bytes']):>7} {r['vs_pml']:6.1f}x  {eq}")
    fl = r.get("floor")
    ftxt = (f"{ms(fl['step_s']):>8} {r['vs_floor']:5.2f}x" if fl else f"{'-':>8} {'-':>6}")
    lines.append(f"{r['loss']:22} {r['batch']:5d} {ms(r['step_s']):>10} {spread:>13} {ftxt} "
                 f"{r['compile_s']:9.1f} {fmt_gib(r['temp_bytes']):>8} "
                 f"{fmt_gib(r['rss_peak_delta_bytes']):>7} {ptxt}")
  return "\n".join(lines)


def format_floor_markdown(rows: list) -> str:
  """Markdown: per loss and batch, siamjax's time, its floor, time / floor and vs PML."""
  pml = {(r["loss"], r["batch"]): r for r in rows
         if r["impl"] == "pml" and not r.get("skipped")}
  best = best_floors(rows)
  lines = ["| loss | B | siamjax ms (spread) | floor ms (GFLOP/s) | time / floor | "
           "time / fastest floor | PML ms (spread) | siamjax vs PML |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["impl"] != "siamjax" or r.get("skipped") or "floor" not in r:
      continue
    fl, p = r["floor"], pml.get((r["loss"], r["batch"]))
    lines.append(
        f"| {r['loss']} | {r['batch']} | {r['step_s'] * 1e3:.1f} ({r['step_s_min'] * 1e3:.1f}-"
        f"{r['step_s_max'] * 1e3:.1f}) | {fl['step_s'] * 1e3:.1f} ({fl['gflop_per_s']:.0f}) | "
        f"{r['vs_floor']:.2f}x | "
        f"{r['step_s'] / best[(r['batch'], r['dim'], len(fl['products']))]:.2f}x | "
        + (f"{p['step_s'] * 1e3:.1f} ({p['step_s_min'] * 1e3:.1f}-{p['step_s_max'] * 1e3:.1f}) "
           f"| {r['vs_pml']:.1f}x |" if p else "- | - |"))
  return "\n".join(lines)
