"""Measurement code behind ``benchmarks/pairs_per_sec.py`` (siamjax vs reference Koch nets).

Every implementation runs the Koch et al. (2015) Siamese network (38,951,745
parameters, checked) on one device, side by side in one process:

* ``siamjax``: the step users train with: :func:`siamjax.train.make_train_step` over the
  Omniglot recipe's pair-BCE loss (:func:`siamjax.recipes.omniglot_koch.make_loss_fn`)
  on :func:`siamjax.models.koch_siamese`, float32 and bf16 compute (float32 parameters).
  It samples the pairs on the device from a uint8 image bank (gather + cast) AND applies
  Koch et al.'s affine distortions to every image (:data:`KOCH_AFFINE` through
  :func:`siamjax.sampling.augment`: rotation in [-10, 10] degrees, shear_x and shear_y in
  [-0.3, 0.3], scale_x and scale_y in [0.8, 1.2], shift_x and shift_y in [-2, 2] pixels,
  each of the 7 components drawn uniformly and applied independently with probability
  0.5, bilinear warp, zero fill), all inside the one jitted, donated step with keys from
  ``fold_in(key, step)``. ``--no-augment`` leaves the distortion out.
* ``torch``: the reference in :mod:`torch_koch`, eager and ``torch.compile``, float32 and
  autocast bf16.
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

FLOPs are counted from the layer shapes (:func:`koch_forward_flops`, 1.817 GFLOP per
105x105 image forward) and cross-checked against XLA's cost analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import siamjax
from siamjax import models, parallel, results, train
from siamjax import xla as sxla
from siamjax.machine import cpu_model
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
  compile_s: float
  times_s: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.times_s)


def _clock(run: Callable[[], Any], sync: Callable[[Any], None], repeats: int,
           warmup: int = 1) -> Timing:
  t0 = time.perf_counter()
  sync(run())
  compile_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    sync(run())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(run())
    times.append(time.perf_counter() - t0)
  return Timing(compile_s, times)


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
# uniformly and applied independently with probability 0.5 (siamjax.sampling.sample_affine).
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
  return {**affine, "function": "siamjax.sampling.augment",
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
            "conv": net.encoder.conv_impl()}
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


def bench_torch(cfg, dtype_name: str, compiled: bool, results: list, log):
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_koch

  torch.manual_seed(cfg.seed)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  on_gpu = dev.type == "cuda"

  def sync(_):
    if on_gpu:
      torch.cuda.synchronize()

  autocast = dtype_name == "bfloat16"
  variant = "compile" if compiled else "eager"
  model = torch_koch.KochSiamese().to(dev)
  n_params = torch_koch.num_params(model)
  common = {"impl": "torch", "variant": variant, "dtype": dtype_name, "params": int(n_params)}
  # Channels-last where it helps: always on the GPU; on the CPU it helps inference only
  # (training ran ~1.7x slower channels-last with torch 2.13 on a 2-core CPU).
  fmt_train = torch.channels_last if on_gpu else torch.contiguous_format
  fmt_infer = torch.channels_last
  ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
  for batch in cfg.batches:
    if "train" in cfg.modes:
      model = model.to(memory_format=fmt_train)
      opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
      fwd = torch.compile(model) if compiled else model
      x1 = torch.rand(batch, 1, 105, 105, device=dev).to(memory_format=fmt_train)
      x2 = torch.rand(batch, 1, 105, 105, device=dev).to(memory_format=fmt_train)
      y = (torch.rand(batch, device=dev) > 0.5).float()

      def run_train(fwd=fwd, opt=opt, x1=x1, x2=x2, y=y):
        loss = None
        for _ in range(cfg.steps):
          opt.zero_grad(set_to_none=True)
          with ac():
            logits = fwd(x1, x2)
          loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
          loss.backward()
          opt.step()
        return loss

      t = _clock(run_train, sync, cfg.repeats)
      results.append(_row(common, "train", batch, cfg.steps, t))
      log(results[-1])
    if "infer" in cfg.modes:
      model = model.to(memory_format=fmt_infer)
      fwd = torch.compile(model) if compiled else model
      x1 = torch.rand(batch, 1, 105, 105, device=dev).to(memory_format=fmt_infer)
      x2 = torch.rand(batch, 1, 105, 105, device=dev).to(memory_format=fmt_infer)

      def run_infer(fwd=fwd, x1=x1, x2=x2):
        with torch.inference_mode(), ac():
          return [fwd(x1, x2) for _ in range(cfg.steps)][-1]

      t = _clock(run_infer, sync, cfg.repeats)
      results.append(_row(common, "infer", batch, cfg.steps, t))
      log(results[-1])
  if "lake" in cfg.modes:
    model = model.to(memory_format=fmt_infer)
    embed = torch.compile(model.embed) if compiled else model.embed
    test, train = (torch.from_numpy(a).permute(0, 1, 4, 2, 3).to(dev) for a in _lake_images(cfg))

    def run_lake():
      runs, n = test.shape[:2]
      with torch.inference_mode(), ac():
        x = torch.cat([test, train], 1).reshape(runs * 2 * n, 1, 105, 105)
        h = embed(x.contiguous(memory_format=fmt_infer)).float().reshape(runs, 2 * n, -1)
        scores = model.score(h[:, :n, None, :], h[:, None, n:, :])
        return scores.argmax(2) == torch.arange(n, device=dev)[None, :]

    t = _clock(run_lake, sync, cfg.repeats)
    results.append(_row(common, "lake", cfg.lake_runs * 20, 1, t))
    log(results[-1])
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
    dev = lambda a: ops.convert_to_tensor(a)  # noqa: E731  (onto the backend's device)
    no_sync = lambda _: None  # noqa: E731  (Keras returns NumPy: already synced)
    for batch in cfg.batches:
      x1, x2 = (dev(rng.random((batch, 105, 105, 1), dtype=np.float32)) for _ in range(2))
      if "train" in cfg.modes:
        y = dev((rng.random((batch, 1)) > 0.5).astype(np.float32))

        def run_train(x1=x1, x2=x2, y=y):
          return [model.train_on_batch([x1, x2], y) for _ in range(cfg.steps)][-1]

        t = _clock(run_train, no_sync, cfg.repeats)
        results.append(_row(common, "train", batch, cfg.steps, t))
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


def matmul_peak(n: int, repeats: int) -> dict[str, float]:
  """Measured TFLOP/s of an ``n x n`` matmul in JAX (float32, bf16) and torch (float32)."""
  out = {}
  for name, dt in (("jax_float32", jnp.float32), ("jax_bfloat16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    mm = jax.jit(jnp.matmul)
    t = _clock(lambda a=a, mm=mm: mm(a, a), jax.block_until_ready, repeats)
    out[name] = 2 * n**3 / t.median / 1e12
  try:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, dt in (("torch_float32", torch.float32), ("torch_bfloat16", torch.bfloat16)):
      a = torch.randn(n, n, device=dev, dtype=dt)
      sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
      t = _clock(lambda a=a: a @ a, sync, repeats)
      out[name] = 2 * n**3 / t.median / 1e12
  except ImportError:
    pass
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


def _fairness_notes(cfg) -> list[str]:
  if cfg.augment:
    first = ("siamjax samples AND augments its pairs on the device inside its jitted train "
             "step: gather + cast from a synthetic uint8 bank, then Koch et al.'s affine "
             "distortion of every image (rotation +-10 deg, shear +-0.3, scale 0.8-1.2, "
             "translation +-2 px, each of the 7 components applied independently with "
             "probability 0.5; siamjax.sampling.augment, bilinear). See each siamjax train "
             "row's 'augmentation'.")
  else:
    first = ("--no-augment: siamjax samples pairs on the device inside its jitted train step "
             "(gather + cast from a synthetic uint8 bank) but does not distort them.")
  return [first, "torch and keras receive ready-made batches already on their device (no "
          "sampling, no augmentation in their timed step), which favours them; their train "
          "rows have 'augmentation': null."]


def software() -> dict:
  """Versions and settings of the frameworks in the run (the machine is in ``machine``)."""
  info = {"siamjax": siamjax.__version__, "siamjax_fast_cpu_flags": sxla.fast_cpu_enabled()}
  try:
    import torch

    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_cuda=torch.cuda.is_available())
  except ImportError:
    info["torch"] = None
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
          f"{'vs eager':>8} {'vs compile':>10} {'vs keras':>8}")
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
                 f"{rate:>9} {spread:>15} {r['step_s']:8.3f} {r['compile_and_first_s']:9.1f} "
                 f"{tfl:>8} {pk:>6} {ve:>8} {vc:>10} {vk:>8}")
  return "\n".join(lines)


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
  seed: int = 0
  devices: tuple = (1,)  # data-parallel device counts for siamjax's training rows
  augment: bool = True  # Koch's affine distortion inside siamjax's train step
  keras: bool = True  # Keras rows when keras is installed
  compare_direct: bool = True  # also siamjax with direct convolutions where auto picks DFT


def run(cfg: Config, out: str, png: str | None, command: str) -> dict:
  """Runs every implementation, prints the table, writes the JSON (and PNG). Returns the record."""
  log = lambda r: print(  # noqa: E731
      f"  {r['impl']} {r['variant']} {r['dtype']} {r['mode']} b={r['batch']}: "
      f"step {r['step_s']:.3f}s (first call {r['compile_and_first_s']:.1f}s)", flush=True)
  t_start = time.time()
  load_at_start = results.load_average()
  info = software()
  dev = jax.devices()[0]
  print(f"device: {dev} ({dev.device_kind}); {cpu_model()}, {os.cpu_count()} cores; fast CPU "
        f"flags: {info['siamjax_fast_cpu_flags']}", flush=True)
  rows: list = []
  params = {}
  for dt in cfg.dtypes:
    params[f"siamjax_{dt}"] = bench_siamjax(cfg, dt, rows, log)
    auto_conv = models.koch_siamese(dtype=jnp.dtype(dt)).encoder.conv_impl()
    if cfg.compare_direct and auto_conv != "direct":
      params[f"siamjax_direct_{dt}"] = bench_siamjax(cfg, dt, rows, log, conv="direct")
  try:
    import torch  # noqa: F401

    variants = [False, True] if cfg.torch_compile else [False]
    for compiled in variants:
      for dt in cfg.dtypes:
        try:
          params[f"torch_{'compile' if compiled else 'eager'}_{dt}"] = bench_torch(
              cfg, dt, compiled, rows, log)
        except Exception as e:  # torch.compile needs a C++ toolchain on the CPU
          if not compiled:
            raise
          rows.append({"impl": "torch", "variant": "compile", "dtype": dt,
                       "skipped": f"torch.compile failed: {type(e).__name__}: {e}"[:300]})
  except ImportError:
    rows.append({"impl": "torch", "skipped": "torch not installed (pip install '.[bench]')"})
  if cfg.keras:
    keras_koch, reason = import_keras_koch()
    if keras_koch is None:
      print(reason, flush=True)
      rows.append({"impl": "keras", "skipped": reason})
    else:
      info.update(keras=keras_koch.keras.__version__,
                  keras_backend=keras_koch.keras.backend.backend())
      for dt in cfg.dtypes:
        params[f"keras_{dt}"] = bench_keras(cfg, dt, rows, log, keras_koch)
  else:
    rows.append({"impl": "keras", "skipped": "--no-keras"})
  peak = matmul_peak(cfg.matmul_n, cfg.repeats)
  timed = [r for r in rows if not r.get("skipped")]
  _annotate(timed, peak)
  bad = {k: v for k, v in params.items() if v != KOCH_PARAMS}
  if bad:
    raise RuntimeError(f"parameter count differs from {KOCH_PARAMS}: {bad}")
  body = {
      "software": info,
      "config": dataclasses.asdict(cfg),
      "param_check": {"expected": KOCH_PARAMS, "counted": params, "ok": not bad},
      "flops": {"forward_per_image": koch_forward_flops(), "per_pair": koch_flops_per_pair(),
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
                        "rate and their fraction_of_peak may exceed 1."},
      "matmul_peak_tflops": peak,
      "notes": [
          *_fairness_notes(cfg),
          "Optimizer: SGD lr 1e-3 momentum 0.9 in all; loss: pair BCE on the logits in "
          "siamjax and torch, Keras' binary_crossentropy on the sigmoid output in keras.",
          "keras: the idiomatic Keras reimplementation (benchmarks/keras_koch.py): the "
          "tower is called once per input (two B batches; siamjax and torch run one 2B "
          "batch); train_on_batch / predict_on_batch return NumPy, so each Keras step ends "
          "with a device sync; bfloat16 is Keras' mixed_bfloat16 policy (float32 params).",
          "lake: 20 runs x 20 one-shot trials, random images, each image encoded once.",
          "vs_*: step-time ratio reference/siamjax (>1 means siamjax is faster), same "
          "mode, batch and dtype.",
          "fraction_of_peak: TFLOP/s over the best measured matmul TFLOP/s of that dtype.",
      ],
      "rows": rows,
      "wall_s": time.time() - t_start,
  }
  record = results.record(body, command=command, load_average_at_start=load_at_start)
  results.write_json(out, record, indent=1)
  print(format_table(rows))
  print("matmul peak TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in peak.items()))
  print(f"parameter check: {params} -> {'ok' if not bad else 'MISMATCH'}")
  if png:
    try:
      plot(timed, png, f"Koch Siamese net, {dev.device_kind} / {cpu_model()}")
    except ImportError:
      print("matplotlib not installed (pip install '.[bench]'): no PNG written")
      png = None
  print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {record['wall_s']:.0f}s")
  return record


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
