"""Measurement code behind ``benchmarks/pairs_per_sec.py`` (siamjax vs reference Koch nets).

Every implementation runs the Koch et al. (2015) Siamese network (38,951,745
parameters, checked) on one device, side by side in one process:

* ``siamjax``: the step users train with: :func:`siamjax.train.make_train_step` over the
  Omniglot recipe's pair-BCE loss (:func:`siamjax.recipes.omniglot_koch.make_loss_fn`)
  on :func:`siamjax.models.koch_siamese`, float32 and bf16 compute (float32 parameters).
  It samples the pairs on the device from a uint8 image bank (gather + cast) AND applies
  Koch et al.'s affine distortions to every image (:data:`KOCH_AFFINE` through
  :func:`siamjax.augment.augment`: rotation in [-10, 10] degrees, shear_x and shear_y in
  [-0.3, 0.3], scale_x and scale_y in [0.8, 1.2], shift_x and shift_y in [-2, 2] pixels,
  each of the 7 components drawn uniformly and applied independently with probability
  0.5, bilinear warp, zero fill), all inside the one jitted, donated step with keys from
  ``fold_in(key, step)``. ``--no-augment`` leaves the distortion out.
* ``torch``: the reference in :mod:`torch_koch`, eager and ``torch.compile``, float32 and
  autocast bf16, each row at the fastest layout (contiguous or channels-last) and thread
  count measured on the machine at hand (:func:`fastest_setting`; the row's ``settings``).
* ``keras``: the Keras 3 reference in :mod:`keras_koch` (``model.train_on_batch`` /
  ``predict_on_batch`` on Keras' backend: ``$KERAS_BACKEND``, else jax, else torch),
  float32 and the ``mixed_bfloat16`` policy. Skipped, with one printed line and a
  ``skipped`` row in the JSON, when keras is not installed.

The references receive ready-made batches already on their device: no sampling and no
augmentation in their timed step. That favours them, and the JSON's ``notes`` say so;
each train row records its ``augmentation`` (``null`` for the references).

Modes: ``train`` (forward, backward, SGD-momentum update), ``infer`` (logits of a batch
of pairs) and ``lake`` (time of Lake's 20 runs x 20 trials = 400 one-shot trials: all 800
images encoded once in one batch, every run's 20x20 scores from the embeddings). Warm-up (and
compile) time is reported apart; each repeat is clocked between device syncs.

Reporting: each bf16 row is checked against float32's training loss (:func:`check_bf16`);
:func:`best_vs_best` compares each framework's fastest counted row per mode and batch. The
JSON is rewritten after every row (:func:`run`).

FLOPs are counted from the layer shapes (:func:`koch_forward_flops`, 1.817 GFLOP per
105x105 image forward) and cross-checked against XLA's cost analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import subprocess
import statistics
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import siamjax
from siamjax import cpu_kernels, models, parallel, results, train
from siamjax import xla as sxla
from siamjax.machine import cpu_isa, cpu_model
from siamjax.recipes import omniglot_koch

KOCH_PARAMS = 38_951_745
_LAYERS = (  # (output H=W, out channels, kernel H*W*in channels) of each matmul-like layer
    ("conv1", 96, 64, 10 * 10 * 1),
    ("conv2", 42, 128, 7 * 7 * 64),
    ("conv3", 18, 128, 4 * 4 * 128),
    ("conv4", 6, 256, 4 * 4 * 128),
    ("dense", 1, 4096, 9216),
)


def koch_forward_flops() -> dict[str, int]:
  """FLOPs (2 x multiply-adds) of one 105x105 image through the Koch tower, per layer.

  Returns:
    ``{layer: flops}`` plus ``"total"``; bias, ReLU, pooling and sigmoid are left out
    (under 0.1%).

  >>> f = koch_forward_flops(); f["total"]
  1817247744
  """
  out = {name: 2 * hw * hw * c * k for name, hw, c, k in _LAYERS}
  out["total"] = sum(out.values())
  return out


def koch_flops_per_pair() -> dict[str, int]:
  """Counted FLOPs per pair: ``infer`` (2 images forward) and ``train`` (forward, input and
  weight gradients; conv1 needs no input gradient).

  >>> koch_flops_per_pair()["train"]
  10667556864
  """
  f = koch_forward_flops()
  return {"infer": 2 * f["total"], "train": 2 * (3 * f["total"] - f["conv1"])}


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  compile_s: float | None
  times_s: list[float]
  last: Any = None  # what the last call returned (a train step's loss, for the bf16 check)

  @property
  def median(self) -> float:
    return statistics.median(self.times_s)


def _clock(run: Callable[[], Any], sync: Callable[[Any], None], repeats: int,
           warmup: int = 1) -> Timing:
  """``warmup`` untimed calls (the first one's time is ``compile_s``), then ``repeats``
  timed ones, each ended by ``sync``; ``warmup=0`` continues an already warm ``run``."""
  compile_s, last = None, None
  for i in range(warmup):
    t0 = time.perf_counter()
    last = run()
    sync(last)
    if i == 0:
      compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    last = run()
    sync(last)
    times.append(time.perf_counter() - t0)
  return Timing(compile_s, times, last)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One way to run a reference: a memory layout and (on the CPU) a thread count."""
  layout: str  # "contiguous" (NCHW) or "channels_last"
  threads: int | None = None  # torch.set_num_threads; None: not set (GPU)

  @property
  def name(self) -> str:
    return self.layout + ("" if self.threads is None else f"/{self.threads}t")


def fastest_setting(settings: list, enter: Callable[[Setting], None], run: Callable[[], Any],
                    sync: Callable[[Any], None], repeats: int) -> tuple[Timing, Setting, dict]:
  """Times ``run`` under each setting and keeps the fastest.

  Each setting gets its first call and one timed repeat (``enter(setting)`` first); the
  fastest then gets ``repeats - 1`` more, so only the losers are timed less. With one
  setting this is a plain ``repeats`` timing.

  Returns:
    ``(timing of the chosen setting, the chosen setting, record)``; the record, stored in
    the row as ``settings``, names the choice and every candidate's first call and
    per-call times.
  """
  if len(settings) == 1:
    enter(settings[0])
    t = _clock(run, sync, repeats)
    return t, settings[0], {"chosen": settings[0].name, "candidates": {}}
  probes = {}
  for s in settings:
    enter(s)
    probes[s] = _clock(run, sync, 1)
  best = min(settings, key=lambda s: probes[s].median)
  t = probes[best]
  if repeats > 1:
    enter(best)
    more = _clock(run, sync, repeats - 1, warmup=0)
    t = Timing(t.compile_s, t.times_s + more.times_s, more.last)
  record = {"chosen": best.name,
            "how": "each candidate: first call + 1 timed call; the fastest of those then "
                   f"gets {repeats - 1} more timed calls",
            "candidates": {s.name: {"layout": s.layout, "threads": s.threads,
                                    "first_call_s": probes[s].compile_s,
                                    "call_s": probes[s].times_s} for s in settings}}
  return t, best, record


# ----------------------------------------------------------------------------- data


def synthetic_bank(key: jax.Array, classes: int, drawers: int) -> jax.Array:
  """A ``[classes, drawers, 105, 105]`` uint8 bank of stroke-like binary images.

  Each class is a random low-resolution template upsampled to 105x105; each drawer adds
  its own noise before thresholding, so drawings of one class look alike.
  """
  k1, k2 = jax.random.split(key)
  template = jax.random.normal(k1, (classes, 1, 15, 15))
  template = jax.image.resize(template, (classes, 1, 105, 105), "bilinear")
  noise = jax.random.normal(k2, (classes, drawers, 105, 105))
  return jnp.where(template + 0.3 * noise > 1.0, 255, 0).astype(jnp.uint8)


# Koch et al. (2015), section 4.3: rotation, shears, scales and translations, each drawn
# uniformly and applied independently with probability 0.5 (siamjax.augment.sample_affine).
KOCH_AFFINE = types.MappingProxyType(
    {"rotation": 10.0, "shear": 0.3, "scale": (0.8, 1.2), "translation": 2.0, "prob": 0.5})


def recipe_config(batch: int, dtype: str = "float32", *, conv: str = "auto",
                  augment: bool = True, steps_per_call: int = 1,
                  drawers: int = 20) -> omniglot_koch.Config:
  """The Omniglot recipe's config of a siamjax training row: the Koch network, pair BCE
  on ``batch`` pairs, Koch's distortions (:data:`KOCH_AFFINE`) unless ``augment`` is off,
  SGD (learning rate 1e-3, momentum 0.9) as the references."""
  return omniglot_koch.Config(
      preset="benchmark", model="koch", image_size=105, dtype=dtype, conv=conv,
      loss="pair_bce", batch_pairs=batch, within_alphabet=False,
      train_drawers=tuple(range(drawers)), augment=augment,
      rotation=KOCH_AFFINE["rotation"], shear=KOCH_AFFINE["shear"],
      scale=KOCH_AFFINE["scale"], translation=KOCH_AFFINE["translation"],
      augment_prob=KOCH_AFFINE["prob"], optimizer="sgd", learning_rate=1e-3,
      steps_per_call=steps_per_call)


def siamjax_train_step(rc: omniglot_koch.Config, mesh=None):
  """What a user trains with: ``siamjax.train.make_train_step`` over the Omniglot recipe's
  pair-BCE ``loss_fn`` (:func:`siamjax.recipes.omniglot_koch.make_loss_fn`), which samples
  the pairs from the uint8 bank, distorts every image (Koch's affine warps) and encodes
  them inside the one jitted, donated step; ``rc.steps_per_call`` updates per call.

  Returns:
    ``(model, step)``: :class:`siamjax.recipes.omniglot_koch.Model` and
    ``step(state, data) -> (state, metrics)``; the state is
    :func:`siamjax.recipes.omniglot_koch.init_state`'s, the data
    :func:`siamjax.recipes.omniglot_koch.training_data`'s.
  """
  model = omniglot_koch.Model(rc)
  step = train.make_train_step(omniglot_koch.make_loss_fn(model), omniglot_koch.optimizer(rc),
                               steps_per_call=rc.steps_per_call, mesh=mesh)
  return model, step


def augmentation_record(rc: omniglot_koch.Config) -> dict | None:
  """What a siamjax train row's step does to its images, for the JSON (``None``: nothing)."""
  if not rc.augment:
    return None
  affine = {"rotation": rc.rotation, "shear": rc.shear, "scale": list(rc.scale),
            "translation": rc.translation, "prob": rc.augment_prob}
  return {**affine, "function": "siamjax.augment.augment",
          "where": "on the device, inside the jitted train step: "
                   "siamjax.recipes.omniglot_koch.make_loss_fn run by "
                   "siamjax.train.make_train_step (after sampling the pairs)",
          "applied_to": "every image of every pair, each with its own random draw",
          "components": "rotation [-10, 10] deg, shear_x and shear_y [-0.3, 0.3], scale_x and "
                        "scale_y [0.8, 1.2], shift_x and shift_y [-2, 2] px; each of the 7 "
                        "drawn uniformly and applied independently with probability 0.5"
                        if affine == {**KOCH_AFFINE, "scale": list(KOCH_AFFINE["scale"])}
                        else "see the other keys",
          "warp": "bilinear (jax.scipy.ndimage.map_coordinates) about the image centre, "
                  "zero fill"}


def siamjax_lake(net):
  """Jitted Lake evaluation: ``(params, test [R,20,...], train [R,20,...]) -> correct [R,20]``.

  Every image is encoded once, all ``R x 40`` in one batch; each run's 20x20 scores come
  from the embeddings through the pair head.
  """

  def lake(params, test, train):
    runs, n = test.shape[:2]
    images = jnp.concatenate([test, train], 1).reshape(runs * 2 * n, *test.shape[2:])
    h = net.apply(params, images, method=net.embed).reshape(runs, 2 * n, -1)
    scores = net.apply(params, h[:, :n, None, :], h[:, None, n:, :], method=net.head)
    return jnp.argmax(scores, axis=2) == jnp.arange(n)[None, :]  # [R, 20]

  return jax.jit(lake)


def bench_siamjax(cfg, dtype_name: str, results: list, log, conv: str = "auto"):
  """siamjax rows of one dtype; ``conv`` is :class:`siamjax.encoders.Koch`'s ``conv``.

  ``"auto"`` (the library default, variant ``jit``) computes conv2-4 as DFT products on
  the CPU in float32 (:mod:`siamjax.fourier`); ``"direct"`` (variant ``jit-direct``) is
  the direct convolution, run beside it on the CPU to show what that choice is worth.
  """
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  net = models.koch_siamese(dtype=dtype, conv=conv)
  key = jax.random.key(cfg.seed)
  x0 = jnp.zeros((1, 105, 105, 1))
  bank = synthetic_bank(jax.random.fold_in(key, 1), cfg.bank_classes, cfg.bank_drawers)
  alphabets = np.arange(cfg.bank_classes) // 2  # unused by the steps (negatives across)
  sync = jax.block_until_ready
  params0 = net.init(key, x0, x0)
  n_params = sum(p.size for p in jax.tree.leaves(params0))
  base = "jit" if conv == "auto" else f"jit-{conv}"
  common = {"impl": "siamjax", "variant": base, "dtype": dtype_name, "params": int(n_params),
            "conv": net.encoder.conv_impl(), "route": net.encoder.route()}
  for batch in cfg.batches:
    for n_dev in (cfg.devices if "train" in cfg.modes else ()):
      if batch % n_dev:
        results.append({**common, "mode": "train", "batch": batch, "devices": n_dev,
                        "skipped": f"batch {batch} does not split over {n_dev} devices"})
        continue
      mesh = parallel.make_mesh(n_dev) if n_dev > 1 else None
      rc = recipe_config(batch, dtype_name, conv=conv, augment=cfg.augment,
                         steps_per_call=cfg.steps, drawers=cfg.bank_drawers)
      model, step = siamjax_train_step(rc, mesh)
      state0 = omniglot_koch.init_state(model, rc)
      n_params = sum(p.size for p in jax.tree.leaves(state0["params"]))
      data = omniglot_koch.training_data(np.asarray(bank), alphabets, rc)
      state0, data = (jax.device_put((state0, data)) if mesh is None
                      else parallel.replicate((state0, data), mesh))
      state = [state0]

      def run_train(step=step, state=state, data=data):
        state[0], metrics = step(state[0], data)
        return metrics

      t = _clock(run_train, sync, cfg.repeats)
      variant = base if n_dev == 1 else f"{base}-{n_dev}dev"
      results.append(_row({**common, "variant": variant, "devices": n_dev,
                           "params": int(n_params), "augmentation": augmentation_record(rc),
                           "train_step": "siamjax.train.make_train_step("
                                         "siamjax.recipes.omniglot_koch.make_loss_fn(...))"},
                          "train", batch, cfg.steps, t))
      # the mean loss of the last call's steps, after (1 + repeats) calls from the init
      results[-1].update(loss=float(t.last["loss"]), train_steps=(1 + cfg.repeats) * cfg.steps)
      log(results[-1])
      del state
    if "infer" in cfg.modes:
      k1, k2 = jax.random.split(jax.random.fold_in(key, 3))
      x1 = jax.random.uniform(k1, (batch, 105, 105, 1))
      x2 = jax.random.uniform(k2, (batch, 105, 105, 1))
      infer = jax.jit(net.apply)
      t = _clock(lambda: [infer(params0, x1, x2) for _ in range(cfg.steps)][-1], sync,
                 cfg.repeats)
      results.append(_row(common, "infer", batch, cfg.steps, t))
      log(results[-1])
  if "lake" in cfg.modes:
    test, train = _lake_images(cfg)
    test, train = jnp.asarray(test), jnp.asarray(train)
    lake = siamjax_lake(net)
    t = _clock(lambda: lake(params0, test, train), sync, cfg.repeats)
    results.append(_row(common, "lake", cfg.lake_runs * 20, 1, t))
    log(results[-1])
  return n_params


def _lake_images(cfg):
  rng = np.random.default_rng(cfg.seed)
  shape = (cfg.lake_runs, 20, 105, 105, 1)
  return (rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32))


# ----------------------------------------------------------------------------- torch


def torch_settings(on_gpu: bool) -> list[Setting]:
  """The settings a torch row tries on this machine: both layouts and, on the CPU, torch's
  default thread count and ``os.cpu_count()`` (one when they agree)."""
  import torch

  threads = [None] if on_gpu else sorted({torch.get_num_threads(), os.cpu_count() or 1})
  return [Setting(layout, t) for layout in ("contiguous", "channels_last") for t in threads]


def _torch_cuda_setup(torch) -> dict:
  """cuDNN autotuning on, and TF32 as JAX's default precision has it (float32 convolutions
  and matmuls on TF32 tensor cores). Returns the settings for the JSON.

  Uses ``fp32_precision`` where torch has it (2.9 and later): newer ``torch.compile``
  rejects a process that mixes it with the legacy ``allow_tf32`` flags.
  """
  import warnings

  torch.backends.cudnn.benchmark = True
  matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
  if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
    matmul.fp32_precision = "tf32"
    conv.fp32_precision = "tf32"
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_fp32_precision": matmul.fp32_precision,
            "cudnn_conv_fp32_precision": conv.fp32_precision}
  with warnings.catch_warnings():  # torch before 2.9: the legacy flags, same effect
    warnings.simplefilter("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def _torch_compile_limits(torch) -> None:
  """One static graph per shape, mode and autocast (``dynamic=False`` at each call), and a
  recompile limit high enough for all of them: dynamo's default of 8 graphs per code object
  would silently fall back to eager after 2 batches x train/infer x 2 dtypes."""
  cfg = torch._dynamo.config
  for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
               "accumulated_cache_size_limit"):
    if hasattr(cfg, name):
      setattr(cfg, name, max(getattr(cfg, name), 256))


def bench_torch(cfg, dtype_name: str, compiled: bool, results: list, log,
                chosen: dict | None = None):
  """torch rows of one dtype, eager or ``torch.compile``, at their fastest setting.

  Every (mode, batch) row tries :func:`torch_settings` (layouts x thread counts) with
  :func:`fastest_setting` and records the choice in ``settings``. ``chosen`` maps
  ``(mode, batch, dtype)`` to eager's choice: eager rows fill it; compile rows reuse it
  unless ``cfg.compile_search`` (each candidate would be a compile of its own, and
  inductor lays out convolutions itself). Returns the parameter count.
  """
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_koch

  torch.manual_seed(cfg.seed)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  on_gpu = dev.type == "cuda"
  if on_gpu:
    _torch_cuda_setup(torch)
  if compiled:
    _torch_compile_limits(torch)
  chosen = {} if chosen is None else chosen
  default_threads = torch.get_num_threads()

  def sync(_):
    if on_gpu:
      torch.cuda.synchronize()

  autocast = dtype_name == "bfloat16"
  variant = "compile" if compiled else "eager"
  model = torch_koch.KochSiamese().to(dev)
  n_params = torch_koch.num_params(model)
  common = {"impl": "torch", "variant": variant, "dtype": dtype_name, "params": int(n_params)}
  ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
  fmts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
  compile_ = lambda f: torch.compile(f, dynamic=False) if compiled else f  # noqa: E731
  fwd, embed = compile_(model), compile_(model.embed)
  steps_done = [0]  # optimizer updates since init (the bf16 check compares equal counts)

  def measure(mode, batch, inputs, run):
    """Times ``run`` at its fastest setting; ``inputs`` are converted to each layout."""
    key = (mode, batch, dtype_name)
    if compiled and not cfg.compile_search and key in chosen:
      settings, reused = [chosen[key]], True
    else:
      settings, reused = torch_settings(on_gpu), False

    def enter(s):
      if s.threads is not None:
        torch.set_num_threads(s.threads)
      model.to(memory_format=fmts[s.layout])
      for name, x in inputs.items():
        x.data = x.data.contiguous(memory_format=fmts[s.layout])

    try:
      t, best, record = fastest_setting(settings, enter, run, sync, cfg.repeats)
    finally:
      torch.set_num_threads(default_threads)
    if reused:
      record["from"] = "torch eager's choice for the same mode, batch and dtype in this run"
    if not compiled:
      chosen[key] = best
    row = _row({**common, "layout": best.layout, "threads": best.threads or None,
                "settings": record}, mode, batch, cfg.steps if mode != "lake" else 1, t)
    if mode == "train":
      row.update(loss=float(t.last), train_steps=steps_done[0])
    results.append(row)
    log(row)

  for batch in cfg.batches:
    x1 = torch.rand(batch, 1, 105, 105, device=dev)
    x2 = torch.rand(batch, 1, 105, 105, device=dev)
    if "train" in cfg.modes:
      opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
      y = (torch.rand(batch, device=dev) > 0.5).float()

      def run_train(opt=opt, x1=x1, x2=x2, y=y):
        losses = []
        for _ in range(cfg.steps):
          opt.zero_grad(set_to_none=True)
          with ac():
            logits = fwd(x1, x2)
          loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
          loss.backward()
          opt.step()
          losses.append(loss.detach())
        steps_done[0] += cfg.steps
        return torch.stack(losses).mean()  # as siamjax: the mean over the call's steps

      measure("train", batch, {"x1": x1, "x2": x2}, run_train)
    if "infer" in cfg.modes:
      def run_infer(x1=x1, x2=x2):
        with torch.inference_mode(), ac():
          return [fwd(x1, x2) for _ in range(cfg.steps)][-1]

      measure("infer", batch, {"x1": x1, "x2": x2}, run_infer)
  if "lake" in cfg.modes:
    test, train = (torch.from_numpy(a).permute(0, 1, 4, 2, 3).to(dev) for a in _lake_images(cfg))
    runs, n = test.shape[:2]
    x = torch.cat([test, train], 1).reshape(runs * 2 * n, 1, 105, 105)

    def run_lake():
      with torch.inference_mode(), ac():
        h = embed(x).float().reshape(runs, 2 * n, -1)
        scores = model.score(h[:, :n, None, :], h[:, None, n:, :])
        return scores.argmax(2) == torch.arange(n, device=dev)[None, :]

    measure("lake", cfg.lake_runs * 20, {"x": x}, run_lake)
  return n_params


# ----------------------------------------------------------------------------- keras

KERAS_MISSING = "keras not installed: pip install keras to add the Keras rows"


def import_keras_koch():
  """Imports :mod:`keras_koch` (which picks Keras' backend first).

  Returns:
    ``(module, None)``, or ``(None, reason)`` when keras is missing or fails to import
    (e.g. ``KERAS_BACKEND`` names a backend that is not installed).
  """
  if importlib.util.find_spec("keras") is None:
    return None, KERAS_MISSING
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  try:
    import keras_koch
  except ImportError as e:
    return None, f"keras failed to import: {type(e).__name__}: {e}"[:300]
  return keras_koch, None


def bench_keras(cfg, dtype_name: str, results: list, log, keras_koch=None) -> int:
  """Keras 3 rows of the Koch net (:mod:`keras_koch`) on Keras' selected backend.

  ``train``: ``model.train_on_batch`` (jit-compiled by Keras on the jax backend) on one
  ready-made batch already on the backend's device, as torch gets; ``infer``:
  ``model.predict_on_batch``; ``lake``: the tower's ``predict_on_batch`` on all images in
  one batch, then the L1 + dense score of every run's 20x20 pairs from the embeddings.
  ``train_on_batch`` and ``predict_on_batch`` return NumPy arrays, so every Keras step
  ends with a device sync (Keras' own API, not the harness, does this). Returns the
  parameter count.
  """
  if keras_koch is None:
    keras_koch, reason = import_keras_koch()
    if keras_koch is None:
      raise ImportError(reason)
  keras, ops = keras_koch.keras, keras_koch.ops
  backend = keras.backend.backend()
  # Keras' jax ops broadcast bias ranks implicitly; allow it whatever the caller set.
  ctx = jax.numpy_rank_promotion("allow") if backend == "jax" else contextlib.nullcontext()
  with ctx:
    model = keras_koch.compile_sgd(keras_koch.koch_siamese(dtype_name, seed=cfg.seed))
    n_params = model.count_params()
    common = {"impl": "keras", "variant": f"keras3-{backend}", "dtype": dtype_name,
              "params": int(n_params), "keras": keras.__version__,
              "keras_dtype_policy": keras_koch.DTYPE_POLICY[dtype_name],
              "keras_jit_compile": bool(model.jit_compile)}
    rng = np.random.default_rng(cfg.seed)
    steps_done = [0]
    dev = lambda a: ops.convert_to_tensor(a)  # noqa: E731  (onto the backend's device)
    no_sync = lambda _: None  # noqa: E731  (Keras returns NumPy: already synced)
    for batch in cfg.batches:
      x1, x2 = (dev(rng.random((batch, 105, 105, 1), dtype=np.float32)) for _ in range(2))
      if "train" in cfg.modes:
        y = dev((rng.random((batch, 1)) > 0.5).astype(np.float32))

        def run_train(x1=x1, x2=x2, y=y):
          steps_done[0] += cfg.steps  # mean loss over the call's steps, as siamjax and torch
          return float(np.mean([model.train_on_batch([x1, x2], y) for _ in range(cfg.steps)]))

        t = _clock(run_train, no_sync, cfg.repeats)
        results.append(_row(common, "train", batch, cfg.steps, t))
        results[-1].update(loss=t.last, train_steps=steps_done[0])
        log(results[-1])
      if "infer" in cfg.modes:
        t = _clock(lambda x1=x1, x2=x2: [model.predict_on_batch([x1, x2])
                                         for _ in range(cfg.steps)][-1], no_sync, cfg.repeats)
        results.append(_row(common, "infer", batch, cfg.steps, t))
        log(results[-1])
    if "lake" in cfg.modes:
      test, train = (dev(a) for a in _lake_images(cfg))
      tower, score = model.get_layer("tower"), model.get_layer("score")

      def run_lake():
        runs, n = test.shape[:2]
        x = ops.reshape(ops.concatenate([test, train], 1), (runs * 2 * n, 105, 105, 1))
        h = ops.reshape(dev(tower.predict_on_batch(x)), (runs, 2 * n, -1))
        scores = score(ops.abs(h[:, :n, None, :] - h[:, None, n:, :]))[..., 0]
        return ops.convert_to_numpy(ops.argmax(scores, axis=2)) == np.arange(n)[None, :]

      t = _clock(run_lake, no_sync, cfg.repeats)
      results.append(_row(common, "lake", cfg.lake_runs * 20, 1, t))
      log(results[-1])
  return n_params


# ----------------------------------------------------------------------------- peak


def matmul_peak(n: int, repeats: int, products: int = 1) -> dict[str, float]:
  """Measured TFLOP/s of ``n x n`` matmuls in JAX and torch, float32 and bf16.

  Each timed call chains ``products`` dependent products (``x <- x @ a``; one jitted
  ``fori_loop`` in JAX), so that on a GPU launch overhead does not dominate: 10 products
  of 8192^3 there, one 4096^3 on a CPU.
  """
  out = {}
  flops = 2 * n**3 * products
  for name, dt in (("jax_float32", jnp.float32), ("jax_bfloat16", jnp.bfloat16)):
    a = (jax.random.normal(jax.random.key(0), (n, n)) / np.sqrt(n)).astype(dt)
    mm = jax.jit(lambda x, a: jax.lax.fori_loop(0, products, lambda i, x: x @ a, x))
    t = _clock(lambda a=a, mm=mm: mm(a, a), jax.block_until_ready, repeats)
    out[name] = flops / t.median / 1e12
  try:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, dt in (("torch_float32", torch.float32), ("torch_bfloat16", torch.bfloat16)):
      a = (torch.randn(n, n, device=dev) / n**0.5).to(dt)

      def chain(a=a):
        x = a
        for _ in range(products):
          x = x @ a
        return x

      sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
      t = _clock(chain, sync, repeats)
      out[name] = flops / t.median / 1e12
  except Exception as e:  # noqa: BLE001 - no torch, or torch's CUDA failing: JAX's peak stands
    print(f"torch matmul peak not measured: {type(e).__name__}: {e}"[:300], flush=True)
  return out


# ----------------------------------------------------------------------------- report


def _row(common: dict, mode: str, batch: int, steps: int, t: Timing) -> dict:
  per_step = [s / steps for s in t.times_s]
  step_s = statistics.median(per_step)
  row = dict(common, mode=mode, batch=batch, steps_per_repeat=steps,
             compile_and_first_s=t.compile_s, step_s=step_s, step_s_all=per_step,
             step_s_min=min(per_step), step_s_max=max(per_step))
  if mode == "train":
    row.setdefault("augmentation", None)  # references: ready-made batches, no distortion
  if mode == "lake":
    row["trials"] = batch
    row["eval_s"] = step_s
  else:
    row["pairs_per_s"] = batch / step_s
    row["pairs_per_s_spread"] = [batch / max(per_step), batch / min(per_step)]
    row["tflops"] = koch_flops_per_pair()[mode] * batch / step_s / 1e12
  return row


def _annotate(rows: list, peak: dict) -> None:
  peaks = {"float32": max(v for k, v in peak.items() if k.endswith("float32")),
           "bfloat16": max(v for k, v in peak.items() if k.endswith("bfloat16"))}
  for r in rows:
    if "tflops" in r:
      r["fraction_of_peak"] = r["tflops"] / peaks[r["dtype"]]
    if r["impl"] != "siamjax":
      continue
    for ref in rows:
      if ref["impl"] == "siamjax" or (ref["mode"], ref["batch"], ref["dtype"]) != (
          r["mode"], r["batch"], r["dtype"]):
        continue
      key = f"vs_{ref['impl']}_{ref['variant']}"
      r[key] = ref["step_s"] / r["step_s"]  # > 1: siamjax faster


# Default tolerance of the bf16 check: atol + rtol x |float32 loss|. Measured on the 2-core
# AMD EPYC at batch 32 after 4-6 updates (losses ~0.69): siamjax 3e-5, keras 4.5e-3, torch
# eager 1.3e-2 (autocast's bf16 gradients learn the fixed batch a little more slowly).
BF16_LOSS_RTOL = 0.05
BF16_LOSS_ATOL = 0.01


def check_bf16(rows: list, *, rtol: float = BF16_LOSS_RTOL,
               atol: float = BF16_LOSS_ATOL) -> None:
  """Marks which bf16 rows count: their training loss tracks the float32 run's.

  Every bf16 train row is paired with the float32 train row of the same implementation,
  variant and batch, which started from the same initial parameters and data and took the
  same number of updates (``train_steps``). It passes when
  ``|loss_bf16 - loss_f32| <= atol + rtol * |loss_f32|``; ``loss`` is the mean loss of the
  row's last timed call. Its ``bf16_check`` records both losses, the difference, the
  tolerance and ``ok``. bf16 inference and Lake rows inherit the verdict of their
  implementation and variant's train rows (all must pass; none run: unchecked). A bf16 row
  that does not pass gets ``excluded_from_best`` with the reason. Rows change in place.
  """
  f32 = {(r["impl"], r["variant"], r["batch"]): r for r in rows
         if r.get("mode") == "train" and r.get("dtype") == "float32" and not r.get("skipped")}
  verdicts: dict = {}
  bf16 = [r for r in rows if r.get("dtype") == "bfloat16" and not r.get("skipped")]
  for r in bf16:
    if r["mode"] != "train":
      continue
    ref = f32.get((r["impl"], r["variant"], r["batch"]))
    if ref is None or ref.get("train_steps") != r.get("train_steps"):
      check = {"ok": None, "why": "no float32 train row of the same variant, batch and steps"}
    else:
      lo, lb = ref.get("loss"), r.get("loss")
      diff = abs(lb - lo) if lo is not None and lb is not None else None
      tol = atol + rtol * abs(lo) if lo is not None else None
      check = {"steps": r["train_steps"], "loss_float32": lo, "loss_bfloat16": lb,
               "abs_diff": diff, "tolerance": tol, "rtol": rtol, "atol": atol,
               "ok": diff is not None and math.isfinite(diff) and diff <= tol}
    r["bf16_check"] = check
    verdicts.setdefault((r["impl"], r["variant"]), []).append(check["ok"])
  for r in bf16:
    if r["mode"] != "train":
      oks = verdicts.get((r["impl"], r["variant"]), [])
      r["bf16_check"] = {"ok": (all(oks) if oks and None not in oks else None),
                         "from": "this implementation and variant's bf16 train rows"}
    ok = r["bf16_check"]["ok"]
    if ok:
      r.pop("excluded_from_best", None)
    else:
      r["excluded_from_best"] = ("bf16 loss differs from float32's beyond the tolerance"
                                 if ok is False else "bf16 unchecked (no float32 train row "
                                 "of the same variant, batch and steps)")


def _rate(r: dict) -> dict:
  """A row's identity and speed for the best-against-best list."""
  out = {"variant": r["variant"], "dtype": r["dtype"], "step_s": r["step_s"]}
  out.update({k: r[k] for k in ("layout", "threads", "conv", "pairs_per_s", "eval_s")
              if k in r})
  return out


def best_vs_best(rows: list) -> list[dict]:
  """Each framework's fastest row per mode and batch, and how siamjax's compares.

  Counted: timed rows without ``excluded_from_best`` (see :func:`check_bf16`). For each
  (mode, batch): ``fastest`` maps each implementation to its fastest row over precisions
  and variants; ``ratio`` is the fastest reference's step time over siamjax's fastest
  (> 1: siamjax is faster; pairs/s ratio in train and infer, time ratio in Lake's trials),
  ``fastest_reference`` names it, ``ratio_vs`` gives the same against each framework, and
  ``same_precision[dtype][impl]`` compares the fastest rows of one precision only.
  ``excluded`` lists the rows left out.

  >>> rows = [{"impl": "siamjax", "variant": "jit", "dtype": "float32", "mode": "train",
  ...          "batch": 8, "step_s": 1.0},
  ...         {"impl": "torch", "variant": "eager", "dtype": "bfloat16", "mode": "train",
  ...          "batch": 8, "step_s": 0.5}]
  >>> best_vs_best(rows)[0]["ratio"]
  0.5
  """
  timed = [r for r in rows if not r.get("skipped") and "step_s" in r]
  out = []
  for mode, batch in dict.fromkeys((r["mode"], r["batch"]) for r in timed):
    group = [r for r in timed if (r["mode"], r["batch"]) == (mode, batch)]
    counted = [r for r in group if not r.get("excluded_from_best")]
    entry = {"mode": mode, "batch": batch, "fastest": {}, "ratio": None,
             "fastest_reference": None, "ratio_vs": {}, "same_precision": {},
             "excluded": [f"{r['impl']} {r['variant']} {r['dtype']}: {r['excluded_from_best']}"
                          for r in group if r.get("excluded_from_best")]}
    best = {}
    for r in counted:
      if r["impl"] not in best or r["step_s"] < best[r["impl"]]["step_s"]:
        best[r["impl"]] = r
    entry["fastest"] = {impl: _rate(r) for impl, r in best.items()}
    sj = best.get("siamjax")
    refs = [impl for impl in best if impl != "siamjax"]
    if sj is not None and refs:
      top = min(refs, key=lambda impl: best[impl]["step_s"])
      entry["fastest_reference"] = f"{top} {best[top]['variant']} {best[top]['dtype']}"
      entry["ratio"] = best[top]["step_s"] / sj["step_s"]
      entry["ratio_vs"] = {impl: best[impl]["step_s"] / sj["step_s"] for impl in refs}
    for dtype in dict.fromkeys(r["dtype"] for r in counted):
      of = {}
      for r in counted:
        if r["dtype"] == dtype and (r["impl"] not in of or r["step_s"] < of[r["impl"]]["step_s"]):
          of[r["impl"]] = r
      if "siamjax" in of and len(of) > 1:
        entry["same_precision"][dtype] = {impl: r["step_s"] / of["siamjax"]["step_s"]
                                          for impl, r in of.items() if impl != "siamjax"}
    out.append(entry)
  return out


def format_best_table(best: list) -> str:
  """The best-against-best list as a table (ratios > 1: siamjax faster)."""
  def who(e, impl):
    r = e["fastest"].get(impl)
    if r is None:
      return "-"
    speed = f"{r['pairs_per_s']:.1f}/s" if "pairs_per_s" in r else f"{r['eval_s']:.2f}s"
    extra = f" {r['layout']}" if "layout" in r else ""
    return f"{r['variant']} {r['dtype']}{extra} {speed}"

  fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
  head = (f"{'mode':5} {'batch':>5}  {'siamjax fastest':30} {'torch fastest':36} "
          f"{'keras fastest':28} {'best/best':>9} {'float32':>8} {'bf16':>8}")
  lines = ["best against best (fastest reference's step time / siamjax's; > 1: siamjax "
           "faster; same precision: against that precision's fastest reference)",
           head, "-" * len(head)]
  for e in best:
    same = {dt: (min(v.values()) if v else None) for dt, v in e["same_precision"].items()}
    lines.append(f"{e['mode']:5} {e['batch']:5d}  {who(e, 'siamjax'):30} {who(e, 'torch'):36} "
                 f"{who(e, 'keras'):28} {fmt(e['ratio']):>9} {fmt(same.get('float32')):>8} "
                 f"{fmt(same.get('bfloat16')):>8}")
    for x in e["excluded"]:
      lines.append(f"{'':13}excluded: {x}")
  return "\n".join(lines)


_MODE_NAMES = {"train": "training", "infer": "inference", "lake": "Lake's trials"}


def format_best_markdown(best: list) -> str:
  """The best-against-best list as the README's Markdown table (from a results JSON:
  ``python benchmarks/pairs_per_sec.py --markdown FILE``)."""
  def who(r):
    if r is None:
      return "—"
    speed = f"{r['pairs_per_s']:.1f} pairs/s" if "pairs_per_s" in r else f"{r['eval_s']:.2f} s"
    how = ", ".join(str(r[k]) for k in ("conv", "layout") if r.get(k))
    return f"{r['variant']} {r['dtype']}" + (f" ({how})" if how else "") + f": {speed}"

  def ratio(v):
    return "—" if v is None else (f"**{v:.2f}×**" if v > 1 else f"{v:.2f}×")

  lines = ["| | siamjax fastest | fastest reference | best vs best | float32 vs float32 | "
           "bf16 vs bf16 |", "|---|---|---|---|---|---|"]
  for e in best:
    ref = e["fastest_reference"]
    ref_row = e["fastest"].get(ref.split()[0]) if ref else None
    same = {dt: (min(v.values()) if v else None) for dt, v in e["same_precision"].items()}
    name = _MODE_NAMES.get(e["mode"], e["mode"])
    label = f"{name}, batch {e['batch']}" if e["mode"] != "lake" else f"{name} ({e['batch']})"
    lines.append(f"| {label} | {who(e['fastest'].get('siamjax'))} | "
                 f"{(ref.split()[0] + ' ' + who(ref_row)) if ref else '—'} | {ratio(e['ratio'])} "
                 f"| {ratio(same.get('float32'))} | {ratio(same.get('bfloat16'))} |")
  return "\n".join(lines)


def _fairness_notes(cfg) -> list[str]:
  if cfg.augment:
    first = ("siamjax samples AND augments its pairs on the device inside its jitted train "
             "step: gather + cast from a synthetic uint8 bank, then Koch et al.'s affine "
             "distortion of every image (rotation +-10 deg, shear +-0.3, scale 0.8-1.2, "
             "translation +-2 px, each of the 7 components applied independently with "
             "probability 0.5; siamjax.augment.augment, bilinear). See each siamjax train "
             "row's 'augmentation'.")
  else:
    first = ("--no-augment: siamjax samples pairs on the device inside its jitted train step "
             "(gather + cast from a synthetic uint8 bank) but does not distort them.")
  return [first, "torch and keras receive ready-made batches already on their device (no "
          "sampling, no augmentation in their timed step), which favours them; their train "
          "rows have 'augmentation': null."]


def software() -> dict:
  """Versions and settings of the frameworks in the run (the machine is in ``machine``):
  torch's threads, and on a GPU the driver, CUDA and cuDNN versions and both sides' TF32
  settings."""
  info = {"siamjax": siamjax.__version__, "siamjax_fast_cpu_flags": sxla.fast_cpu_enabled(),
          "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
          "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
          "siamjax_cpu_matmul_route": cpu_kernels.matmul_route()}
  if jax.default_backend() == "gpu":
    dev = jax.devices()[0]
    info["jax_platform_version"] = getattr(getattr(dev, "client", None), "platform_version",
                                           None)  # e.g. the CUDA and cuDNN XLA was built for
    info["jax_tf32"] = ("float32 convolutions and matmuls on TF32 (JAX's default precision "
                        "on GPUs); torch is set to match")
  try:
    import torch

    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads(),
                torch_cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
      info.update(torch_cuda_version=torch.version.cuda, torch_gpu=torch.cuda.get_device_name(0),
                  **_torch_cuda_setup(torch))
      info["cudnn_version"] = torch.backends.cudnn.version()  # raises if JAX's cuDNN is older
  except ImportError:
    info["torch"] = None
  except Exception as e:  # noqa: BLE001 - a probe never costs the rows; torch's rows say more
    info["torch_error"] = f"{type(e).__name__}: {e}"[:300]
  if jax.default_backend() == "gpu" or info.get("torch_cuda"):
    try:
      smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20, check=True).stdout.strip()
      info["nvidia_smi"] = smi
    except (OSError, subprocess.SubprocessError) as e:
      info["nvidia_smi"] = f"unavailable: {type(e).__name__}"
  return info


def device_slug() -> str:
  """``cpu-<model>-<n>core`` or ``gpu-<device kind>``, lower case, for the results file name."""
  if jax.default_backend() == "cpu":
    name = f"cpu-{cpu_model()}-{os.cpu_count()}core"
  else:
    name = f"{jax.default_backend()}-{jax.devices()[0].device_kind}"
  return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def format_table(rows: list) -> str:
  head = (f"{'impl':8} {'variant':10} {'dtype':8} {'mode':5} {'batch':>5} {'pairs/s':>9} "
          f"{'spread':>15} {'step s':>8} {'compile s':>9} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'vs eager':>8} {'vs compile':>10} {'vs keras':>8} {'layout':14} {'bf16 check':10}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if r.get("skipped"):
      lines.append(f"{r['impl']:8} skipped: {r['skipped']}")
      continue
    if r["mode"] == "lake":
      rate, spread = f"{r['eval_s']:.2f}s/400" if r["trials"] == 400 else f"{r['eval_s']:.2f}s", ""
    else:
      rate = f"{r['pairs_per_s']:.1f}"
      spread = f"{r['pairs_per_s_spread'][0]:.1f}-{r['pairs_per_s_spread'][1]:.1f}"
    tfl = f"{r['tflops']:.3f}" if "tflops" in r else ""
    pk = f"{100 * r['fraction_of_peak']:.0f}" if "fraction_of_peak" in r else ""
    ve = f"{r['vs_torch_eager']:.2f}x" if "vs_torch_eager" in r else ""
    vc = f"{r['vs_torch_compile']:.2f}x" if "vs_torch_compile" in r else ""
    vk = next((f"{v:.2f}x" for k, v in r.items() if k.startswith("vs_keras_")), "")
    lines.append(f"{r['impl']:8} {r['variant']:10} {r['dtype']:8} {r['mode']:5} {r['batch']:5d} "
                 f"{rate:>9} {spread:>15} {r['step_s']:8.3f} {r['compile_and_first_s'] or 0:9.1f} "
                 f"{tfl:>8} {pk:>6} {ve:>8} {vc:>10} {vk:>8} {_setting_cell(r):14} "
                 f"{_bf16_cell(r):10}")
  return "\n".join(lines)


def _setting_cell(r: dict) -> str:
  if "layout" not in r:
    return ""
  return r["settings"]["chosen"] if "settings" in r else r["layout"]


def _bf16_cell(r: dict) -> str:
  c = r.get("bf16_check")
  if c is None:
    return ""
  word = {True: "ok", False: "FAIL", None: "unchecked"}[c["ok"]]
  return f"{word} {c['abs_diff']:.1e}" if c.get("abs_diff") is not None else word


def plot(rows: list, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, mode in zip(axes, ("train", "infer")):
    series: dict[str, list] = {}
    for r in rows:
      if r.get("mode") == mode:
        aug = " +sample+augment" if r.get("augmentation") else ""
        series.setdefault(f"{r['impl']} {r['variant']} {r['dtype']}{aug}", []).append(
            (r["batch"], r["pairs_per_s"]))
    for name, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (pairs)")
    ax.set_ylabel("pairs/s (median)")
    ax.set_title(f"{mode}")
    ax.grid(alpha=0.3)
    if series:
      ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@dataclasses.dataclass
class Config:
  batches: tuple = (32, 128)
  repeats: int = 3
  steps: int = 1
  modes: tuple = ("train", "infer", "lake")
  dtypes: tuple = ("float32", "bfloat16")
  torch_compile: bool = True
  lake_runs: int = 20
  bank_classes: int = 100
  bank_drawers: int = 20
  matmul_n: int = 4096
  matmul_products: int = 1  # dependent products per timed matmul call (10 on a GPU)
  seed: int = 0
  devices: tuple = (1,)  # data-parallel device counts for siamjax's training rows
  augment: bool = True  # Koch's affine distortion inside siamjax's train step
  keras: bool = True  # Keras rows when keras is installed
  compare_direct: bool = True  # also siamjax with direct convolutions where auto picks DFT
  compile_search: bool = False  # torch.compile tries every setting too (else eager's choice)
  bf16_loss_rtol: float = BF16_LOSS_RTOL
  bf16_loss_atol: float = BF16_LOSS_ATOL
  time_limit_s: float | None = None  # no new implementation x dtype block starts after it


def _log_row(r: dict) -> None:
  """One line per row as it is measured."""
  if r.get("skipped"):
    print(f"  {r['impl']} {r.get('variant', '')} {r.get('dtype', '')}: skipped: {r['skipped']}",
          flush=True)
    return
  speed = (f"{r['eval_s']:.3f}s for {r['trials']} trials" if r["mode"] == "lake" else
           f"{r['pairs_per_s']:.1f} pairs/s ({r['pairs_per_s_spread'][0]:.1f}-"
           f"{r['pairs_per_s_spread'][1]:.1f})")
  extra = ""
  if "settings" in r:
    alts = ", ".join(f"{name} {statistics.median(c['call_s']) / r['steps_per_repeat']:.3f}s"
                     for name, c in r["settings"]["candidates"].items()
                     if name != r["settings"]["chosen"])
    extra = f" [{r['settings']['chosen']}" + (f"; tried {alts}" if alts else "") + "]"
  if "loss" in r:
    extra += f" loss {r['loss']:.4f} after {r['train_steps']} steps"
  print(f"  {r['impl']} {r['variant']} {r['dtype']} {r['mode']} b={r['batch']}: {speed}, "
        f"step {r['step_s']:.3f}s, first call {r['compile_and_first_s'] or 0:.1f}s{extra}",
        flush=True)


def run(cfg: Config, out: str, png: str | None, command: str,
        commit: str | None = None) -> dict:
  """Runs every implementation, prints the tables, writes the JSON (and PNG).

  The JSON is rewritten (atomically) after every row, with ``complete: false`` until the
  end, and the PNG after every implementation x dtype block, so a run cut short keeps what
  it measured; a failing torch block (a failed CUDA start, ``torch.compile`` without a
  toolchain) becomes a ``skipped`` row and the run goes on. Each rewrite re-derives the
  bf16 checks, the ratios and the best-against-best list from the rows so far. ``commit`` is recorded
  as ``git_commit`` (for copies without ``.git``). Returns the final record.
  """
  t_start = time.time()
  load_at_start = results.load_average()
  info = software()
  dev = jax.devices()[0]
  isa = cpu_isa()
  print(f"device: {dev} ({dev.device_kind}); {cpu_model()}, {os.cpu_count()} cores, ISA "
        f"{' '.join(isa) or 'unknown'}; fast CPU flags: {info['siamjax_fast_cpu_flags']}",
        flush=True)
  rows: list = []
  params: dict = {}
  state = {"peak": {}, "flops": None, "complete": False}

  def body() -> dict:
    timed = [r for r in rows if not r.get("skipped")]
    check_bf16(timed, rtol=cfg.bf16_loss_rtol, atol=cfg.bf16_loss_atol)
    if state["peak"]:
      _annotate(timed, state["peak"])
    bad = {k: v for k, v in params.items() if v != KOCH_PARAMS}
    return {
        "complete": state["complete"],
        "software": info,
        "cpu": {"model": cpu_model(), "isa": isa, "amx": "amx_bf16" in isa,
                "avx512_bf16": "avx512_bf16" in isa, "avx2": "avx2" in isa},
        "config": dataclasses.asdict(cfg),
        "param_check": {"expected": KOCH_PARAMS, "counted": params, "ok": not bad},
        "flops": state["flops"],
        "matmul_peak_tflops": state["peak"],
        "notes": _notes(cfg),
        "best_vs_best": best_vs_best(rows),
        "rows": rows,
        "wall_s": time.time() - t_start,
    }

  def write() -> dict:
    record = results.record(body(), command=command, load_average_at_start=load_at_start)
    if commit:
      record["git_commit"] = commit
    results.write_json(out, record, indent=1)
    return record

  def log(r: dict) -> None:
    _log_row(r)
    write()

  def draw() -> bool:
    """Redraws the PNG from the rows so far (after each block: a cut run keeps its plot)."""
    if not png or state.get("no_plot"):
      return False
    try:
      plot([r for r in rows if not r.get("skipped")], png,
           f"Koch Siamese net, {dev.device_kind} / {cpu_model()}")
      return True
    except ImportError:
      print("matplotlib not installed (pip install '.[bench]'): no PNG written", flush=True)
      state["no_plot"] = True
      return False

  state["peak"] = matmul_peak(cfg.matmul_n, cfg.repeats, cfg.matmul_products)
  print("matmul peak TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in state["peak"].items()),
        flush=True)
  state["flops"] = _flops_record()
  write()

  def out_of_time(impl: str, variant: str, dtype: str) -> bool:
    """Past ``cfg.time_limit_s``: no new block starts; a skipped row says so."""
    spent = time.time() - t_start
    if cfg.time_limit_s is None or spent < cfg.time_limit_s:
      return False
    rows.append({"impl": impl, "variant": variant, "dtype": dtype,
                 "skipped": f"time limit: {spent:.0f} s spent of --time-limit-s "
                            f"{cfg.time_limit_s:g}"})
    log(rows[-1])
    return True

  for dt in cfg.dtypes:
    if not out_of_time("siamjax", "jit", dt):
      params[f"siamjax_{dt}"] = bench_siamjax(cfg, dt, rows, log)
      draw()
    auto_conv = models.koch_siamese(dtype=jnp.dtype(dt)).encoder.conv_impl()
    if (cfg.compare_direct and auto_conv != "direct"
        and not out_of_time("siamjax", "jit-direct", dt)):
      params[f"siamjax_direct_{dt}"] = bench_siamjax(cfg, dt, rows, log, conv="direct")
      draw()
  try:
    import torch  # noqa: F401
  except ImportError:
    torch = None
    why = "torch not installed (pip install '.[bench]')"
  except Exception as e:  # noqa: BLE001 - a broken torch costs its rows only
    torch = None
    why = f"torch failed to import: {type(e).__name__}: {e}"[:300]
  if torch is None:
    rows.append({"impl": "torch", "skipped": why})
    log(rows[-1])
  else:
    chosen: dict = {}  # eager's setting per (mode, batch, dtype), reused by torch.compile
    for compiled in ([False, True] if cfg.torch_compile else [False]):
      for dt in cfg.dtypes:
        if out_of_time("torch", "compile" if compiled else "eager", dt):
          continue
        variant = "compile" if compiled else "eager"
        try:
          params[f"torch_{variant}_{dt}"] = bench_torch(cfg, dt, compiled, rows, log, chosen)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C++ toolchain,
          # or torch's CUDA start failing beside JAX's: its rows say so, the others stay
          rows.append({"impl": "torch", "variant": variant, "dtype": dt,
                       "skipped": f"torch {variant} failed: {type(e).__name__}: {e}"[:300]})
          log(rows[-1])
        draw()
  if cfg.keras:
    keras_koch, reason = import_keras_koch()
    if keras_koch is None:
      print(reason, flush=True)
      rows.append({"impl": "keras", "skipped": reason})
      write()
    else:
      info.update(keras=keras_koch.keras.__version__,
                  keras_backend=keras_koch.keras.backend.backend())
      for dt in cfg.dtypes:
        if not out_of_time("keras", f"keras3-{keras_koch.keras.backend.backend()}", dt):
          params[f"keras_{dt}"] = bench_keras(cfg, dt, rows, log, keras_koch)
  else:
    rows.append({"impl": "keras", "skipped": "--no-keras"})
  state["complete"] = True
  record = write()
  bad = {k: v for k, v in params.items() if v != KOCH_PARAMS}
  print(format_table(rows))
  print(format_best_table(record["best_vs_best"]))
  print(f"parameter check: {params} -> {'ok' if not bad else 'MISMATCH'}")
  if bad:
    raise RuntimeError(f"parameter count differs from {KOCH_PARAMS}: {bad}")
  drawn = draw()
  print(f"wrote {out}" + (f" and {png}" if drawn else "") + f" in {record['wall_s']:.0f}s")
  return record


def _flops_record() -> dict:
  return {"forward_per_image": koch_forward_flops(), "per_pair": koch_flops_per_pair(),
          "xla_cost_analysis_forward_per_image": _xla_flops("direct"),
          "xla_cost_analysis_forward_per_image_auto": _xla_flops("auto"),
          "xla_cost_analysis_batch": 64,
          "siamjax_auto_conv": models.koch_siamese().encoder.conv_impl(),
          "note": "2 x multiply-adds of convolutions and dense layers of the direct "
                  "computation; train = forward + weight gradients + input gradients "
                  "(none for conv1). Every row's tflops and fraction_of_peak use these "
                  "counts. Rows with conv 'dft' (siamjax on the CPU in float32) compute "
                  "conv2-4 as DFT products (siamjax.fourier): about 4x fewer FLOPs per "
                  "forward pass (xla_cost_analysis_forward_per_image_auto, per image of "
                  "a batch of xla_cost_analysis_batch), so their tflops is an effective "
                  "rate and their fraction_of_peak may exceed 1."}


def _notes(cfg) -> list[str]:
  return [
      *_fairness_notes(cfg),
      "Optimizer: SGD lr 1e-3 momentum 0.9 in all; loss: pair BCE on the logits in "
      "siamjax and torch, Keras' binary_crossentropy on the sigmoid output in keras.",
      "keras: the idiomatic Keras reimplementation (benchmarks/keras_koch.py): the "
      "tower is called once per input (two B batches; siamjax and torch run one 2B "
      "batch); train_on_batch / predict_on_batch return NumPy, so each Keras step ends "
      "with a device sync; bfloat16 is Keras' mixed_bfloat16 policy (float32 params).",
      "torch settings: every torch eager row tries the contiguous (NCHW) and channels-last "
      "layouts and, on the CPU, torch's default thread count and os.cpu_count() (one "
      "candidate when equal); each candidate gets its first call and one timed call, the "
      "fastest then the remaining repeats ('settings' in the row names the choice and "
      "every candidate's times). torch.compile rows reuse eager's choice for the same "
      "mode, batch and dtype" + (" (--compile-search: they try every setting too)"
                                 if cfg.compile_search else
                                 " (each candidate would be another compile, and "
                                 "inductor picks convolution layouts itself)") +
      "; torch.compile is called with dynamic=False (one graph per shape, mode and "
      "autocast) and a recompile limit of 256. Inter-op threads are recorded, not varied: "
      "torch allows setting them once, before any parallel work, and the Koch step runs "
      "its ops one after another.",
      "bf16 check: a bf16 row counts in best_vs_best only if its implementation's bf16 "
      "training loss matches the float32 one of the same variant and batch (same initial "
      "parameters and data, same number of updates: 'train_steps') within "
      f"atol {cfg.bf16_loss_atol} + rtol {cfg.bf16_loss_rtol} x |loss_float32|; loss is the "
      "mean of the row's last timed call. See each bf16 row's 'bf16_check'; rows that fail "
      "get 'excluded_from_best'.",
      "best_vs_best: per mode and batch, each framework's fastest counted row over its "
      "precisions and variants; ratio = fastest reference's step time / siamjax's fastest "
      "(> 1: siamjax faster); same_precision: the same within one dtype.",
      "lake: 20 runs x 20 one-shot trials, random images, each image encoded once.",
      "vs_*: step-time ratio reference/siamjax (>1 means siamjax is faster), same "
      "mode, batch and dtype.",
      "fraction_of_peak: TFLOP/s over the best measured matmul TFLOP/s of that dtype "
      f"({cfg.matmul_products} chained {cfg.matmul_n}^3 product(s) per timed call).",
  ]


def _xla_flops(conv: str = "direct", batch: int = 64) -> float | None:
  """XLA's FLOP count of the tower's forward pass on ``batch`` images, per image.

  Per image of a batch, not of a single image: the DFT path transforms the kernels once
  per call, which a batch of one would charge in full to that image.
  """
  net = models.koch_siamese(conv=conv)
  x = jax.ShapeDtypeStruct((batch, 105, 105, 1), jnp.float32)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 105, 105, 1)),
                                           jnp.zeros((1, 105, 105, 1))))
  try:
    cost = jax.jit(lambda p, x: net.apply(p, x, method=net.embed)).lower(params, x).compile()
    cost = cost.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    return float(cost["flops"]) / batch
  except Exception:  # cost analysis is best-effort and backend-dependent
    return None
