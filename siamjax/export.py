"""A trained model as files that run without siamjax: ``jax.export`` artefacts and a JSON.

:func:`export_model` writes a folder:

* ``embed.jax``: the embedding function, ``x [N, *inputs.shape] -> [N, D]`` float32, with
  the parameters inside, serialised with :mod:`jax.export` for any batch size ``N``;
* ``score.jax``: the model's comparison of embedded pairs, ``(h_a [N, D], h_b [N, D]) ->
  [N]`` in the model's units (a distance, or the pair head's probability);
* ``model.json``: what the inputs are and how raw inputs become them (with the
  vocabulary or the standardisation statistics where the recipe has them), the
  comparison's units and direction, the calibrated thresholds, and the versions.

Running them needs only ``jax`` (and NumPy)::

    import json, jax, numpy as np
    embed = jax.export.deserialize(open("out/embed.jax", "rb").read())
    score = jax.export.deserialize(open("out/score.jax", "rb").read())
    h = embed.call(x)                          # x prepared as model.json describes
    s = score.call(h[:n], h[n:])               # one score per pair
    same = s <= threshold                      # "same_when": "lower" (else >=)

Compatibility (the ``jax.export`` guarantees): an artefact runs on jaxlib releases up to
6 months newer, and up to 3 weeks older, than the jaxlib that exported it; export for
archival with a recent jaxlib. ``model.json`` records the versions.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import jax
import jax.numpy as jnp

__all__ = ["export_model", "FORMAT"]

FORMAT = "siamjax-export-1"

COMPATIBILITY = ("jax.export: runs on jaxlib releases up to 6 months newer and up to 3 weeks "
                 "older than the exporting jaxlib")


def _serialise(fn, *specs, platforms) -> bytes:
  exp = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  return bytes(exp.serialize())


def export_model(model, out_dir: str | os.PathLike, *,
                 platforms: tuple[str, ...] = ("cpu", "cuda")) -> Path:
  """Writes ``model`` (a :class:`siamjax.inference.Model`) into ``out_dir``.

  Args:
    model: the loaded model.
    out_dir: the folder to write (created; files of an earlier export are replaced one by
      one, each atomically).
    platforms: the platforms the artefacts compile for (``jax.export``'s
      ``platforms``); the default runs on CPUs and NVIDIA GPUs.

  Returns:
    The path of ``model.json``.

  Raises:
    ValueError: the network uses an operation ``jax.export`` cannot serialise (such as a
      CPU kernel of this package's own); load the model on the plain XLA route.
  """
  from siamjax import results
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  variables = jax.device_get(model.variables)
  apply, metric = model._apply, model.metric
  b = jax.export.symbolic_shape("n")[0]
  x_spec = jax.ShapeDtypeStruct((b,) + tuple(model.inputs.shape), jnp.dtype(model.inputs.dtype))
  h_spec = jax.ShapeDtypeStruct((b, model.dim), jnp.float32)

  def embed(x):
    return apply(variables, x).astype(jnp.float32)

  def score(h_a, h_b):
    return metric.to_units(metric.pair_scores(h_a, h_b))

  try:
    blobs = {"embed.jax": _serialise(embed, x_spec, platforms=platforms),
             "score.jax": _serialise(score, h_spec, h_spec, platforms=platforms)}
  except ValueError as e:
    first = str(e).strip().splitlines()[0]
    raise ValueError(f"jax.export cannot serialise this model ({first})") from None
  for name, blob in blobs.items():
    tmp = out / f".{name}.tmp{os.getpid()}"
    tmp.write_bytes(blob)
    os.replace(tmp, out / name)
  import jaxlib
  meta = {
      "format": FORMAT, "recipe": model.recipe, "variant": model.variant,
      "checkpoint": model.checkpoint, "step": model.step, "fingerprint": model.fingerprint,
      "inputs": {"kind": model.inputs.kind, "shape": list(model.inputs.shape),
                 "dtype": model.inputs.dtype, "preprocessing": model.inputs.describe},
      "embedding": {"file": "embed.jax", "shape": ["N", model.dim], "dtype": "float32"},
      "comparison": {"file": "score.jax", "metric": metric.to_json(), "units": model.units,
                     "same_when": model.same_when},
      "thresholds": {k: {f: v[f] for f in ("threshold", "units", "same_when", "far", "frr",
                                           "precision", "recall", "protocol") if f in v}
                     for k, v in model.thresholds.items()},
      "platforms": list(platforms), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "compatibility": COMPATIBILITY,
      "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  return results.write_json(out / "model.json", meta)
