"""Use a trained model: load any work directory, embed, compare, calibrate, verify, identify.

Training ends with a work directory (``config.json`` and orbax checkpoints).
:func:`load` turns it into a :class:`Model` with nothing but that folder: the recipe that
wrote it (named in ``config.json``) rebuilds its network and preprocessing through the
loader it registered with :func:`register_loader`. A :class:`Model` then

* :meth:`Model.preprocess`: raw inputs (image files or arrays, text, vector rows) to the
  arrays the network reads, exactly as the recipe's evaluation prepared them;
* :meth:`Model.embed`: ``[N, ...] -> [N, D]``, jitted, in fixed batch buckets (a new
  ``N`` does not recompile) and sharded over the local devices;
* :meth:`Model.score`: the model's own comparison of two inputs, in its units: the pair
  head's probability for pair-BCE models (higher = same), the training distance for the
  others (lower = same); :attr:`Model.same_when` says which.

Decisions follow TF Similarity's flow (index -> lookup -> calibrate -> match):

* :meth:`Model.enroll` builds a :class:`siamjax.index.Index` of labelled gallery items
  under the model's own comparison, fingerprinted with its parameters;
* :func:`calibrate` chooses thresholds for targets (``{"far": 1e-3}``,
  ``{"precision": 0.99}``, ``"eer"``, ``"best_accuracy"``) on labelled calibration data,
  as pairs or, with an index, as open-set identification (strangers' false accepts),
  with each rate's 95% interval, and stores them beside the checkpoints
  (``calibration.json``);
* :func:`verify` says same or different for pairs, :func:`identify` answers the nearest
  gallery label, or ``"unknown"`` when the nearest match is beyond the threshold.

:mod:`siamjax.export` writes a model as a ``jax.export`` artefact that runs without
siamjax; ``python -m siamjax`` (its commands: ``python -m siamjax --help``) does all of this from a shell.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from siamjax import _progress
from siamjax import index as _index
from siamjax import train
from siamjax.evaluation import verification

__all__ = ["Model", "Inputs", "load", "register_loader", "calibrate", "verify", "identify",
           "Verification", "Identification", "CALIBRATION_FILE", "UNKNOWN",
           "parse_target", "read_items", "image_batch", "head_metric", "verify_scores",
           "open_set_outcomes", "choose_thresholds", "operating_record"]

CALIBRATION_FILE = "calibration.json"
UNKNOWN = "unknown"

_LOADERS: dict[str, Callable[..., "Model"]] = {}


def register_loader(recipe: str) -> Callable:
  """Decorator: ``loader(config: dict, workdir: Path, *, which, variant) -> Model`` is how
  :func:`load` opens work directories whose ``config.json`` names ``recipe``.

  Every recipe module registers one (``siamjax.recipes.*``); :func:`load` imports the
  recipe modules to find it, so a user's own recipe registers the same way.
  """
  def add(loader):
    _LOADERS[recipe] = loader
    return loader
  return add


def _loader(recipe: str):
  if recipe not in _LOADERS:  # the recipes register themselves when imported
    import siamjax.recipes
    for info in pkgutil.iter_modules(siamjax.recipes.__path__):
      importlib.import_module(f"siamjax.recipes.{info.name}")
      if recipe in _LOADERS:
        break
  if recipe not in _LOADERS:
    raise ValueError(f"no loader is registered for recipe {recipe!r} (known: "
                     f"{', '.join(sorted(_LOADERS)) or 'none'}); import the module that "
                     f"defines it first")
  return _LOADERS[recipe]


def load(workdir: str | os.PathLike, *, which: str = "best", variant: str | None = None
         ) -> "Model":
  """The trained model of a work directory, from its ``config.json`` and checkpoint alone.

  Args:
    workdir: a recipe's work directory (``experiments/*.py --workdir W``).
    which: ``"best"``: the checkpoint the recipe's results were computed from (the best
      on validation where the recipe evaluates that one, else the last); ``"latest"``:
      the last one saved.
    variant: for recipes that train several models in one directory, which one
      (``mnist_triplet``: a mining rule; ``vector_pairs``: a head; ``thucnews_fewshot``:
      a model, optionally ``seed<k>/<model>``); default: the one the recipe's results
      chose (``None`` for single-model recipes).

  Returns:
    A :class:`Model`.

  Raises:
    siamjax.train.RunError: a missing folder, one that is not a work directory, or one
      with no checkpoint yet.
    ValueError: an unknown variant, or a checkpoint that does not fit the network its
      ``config.json`` describes.
  """
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise train.RunError(f"workdir {workdir} does not exist")
  path = workdir / "config.json"
  if not path.is_file():
    raise train.RunError(f"workdir {workdir} has no config.json: it is not the work "
                         f"directory of a siamjax experiment (pass the folder given to "
                         f"--workdir)")
  try:
    saved = json.loads(path.read_text())
    recipe, config = saved["recipe"], saved["config"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError):
    raise train.RunError(f"{path} is unreadable or not a siamjax config") from None
  return _loader(recipe)(config, workdir, which=which, variant=variant)


class Inputs(NamedTuple):
  """What :meth:`Model.preprocess` produces and :meth:`Model.embed` reads.

  Attributes:
    kind: ``"image"``, ``"text"`` or ``"vectors"``.
    shape: one preprocessed item's shape (``(105, 105)``, ``(64,)`` ...).
    dtype: its dtype name (``"uint8"``, ``"int32"``, ``"float32"``).
    describe: a JSON-ready account of the preprocessing (what to do to raw inputs to get
      these arrays), written into exported models; may hold the vocabulary or the
      standardisation statistics.
  """

  kind: str
  shape: tuple
  dtype: str
  describe: dict


def read_items(paths: Sequence[str | os.PathLike], kind: str) -> tuple[list, list[str]]:
  """Raw inputs of ``kind`` from files: ``(items, names)``.

  * ``"image"``: each file is one item (its path; :meth:`Model.preprocess` decodes it);
  * ``"text"``: each file holds one item per non-empty line (UTF-8);
  * ``"vectors"``: each file is a CSV (one vector per row, numbers only) or ``.npy``
    (``[N, D]``); each row is one item.

  Names are ``path`` for an image and ``path:line`` / ``path:row`` otherwise.

  Raises:
    ValueError: a missing or unreadable file, naming it.
  """
  items, names = [], []
  for p in map(Path, paths):
    if not p.is_file():
      raise ValueError(f"{p}: no such file")
    if kind == "image":
      items.append(p)
      names.append(str(p))
    elif kind == "text":
      try:
        lines = p.read_text(encoding="utf-8").splitlines()
      except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read it as UTF-8 text ({e})") from None
      for i, line in enumerate(lines, 1):
        if line.strip():
          items.append(line.strip())
          names.append(f"{p}:{i}")
    elif kind == "vectors":
      rows = _vector_rows(p)
      items.extend(rows)
      names.extend(f"{p}:{i}" for i in range(1, len(rows) + 1))
    else:
      raise ValueError(f"kind must be 'image', 'text' or 'vectors', got {kind!r}")
  return items, names


def _vector_rows(path: Path) -> np.ndarray:
  if path.suffix == ".npy":
    try:
      rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a readable .npy array ({e})") from None
  else:
    try:
      rows = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a CSV of numbers, one vector per row ({e})") from None
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[0] == 0 or not np.issubdtype(rows.dtype, np.number):
    raise ValueError(f"{path}: expected a non-empty [N, D] array of numbers, got shape "
                     f"{rows.shape} of {rows.dtype}")
  return rows.astype(np.float32)


def image_batch(raw, *, shape: tuple, decode: Callable, from_array: Callable | None = None
                ) -> np.ndarray:
  """Raw images as one ``[N, *shape]`` uint8 array, for a loader's ``prepare``.

  Args:
    raw: a file path, a Pillow image, an array of one image or of ``N`` images, or a list
      of those.
    shape: one prepared image's shape.
    decode: ``(pillow image, name) -> array of shape`` for files and Pillow images.
    from_array: ``(array, name) -> array of shape`` for arrays (one image of
      ``len(shape)`` axes, or a batch of ``N``); ``None``: arrays must already be
      prepared (``shape``, uint8), as in the recipe's own dataset.

  Raises:
    ValueError: a file that does not decode, or an image ``decode`` refuses, naming it.
  """
  from PIL import Image
  from siamjax.data import folders
  if isinstance(raw, (str, os.PathLike, Image.Image)):
    raw = [raw]
  elif isinstance(raw, (np.ndarray, jax.Array)):
    a = np.asarray(raw)
    raw = list(a) if a.ndim == len(shape) + 1 else [a]
  out = []
  for i, item in enumerate(raw):
    if isinstance(item, (str, os.PathLike)):
      x = decode(folders.open_image(item), str(item))
    elif isinstance(item, Image.Image):
      x = decode(item, f"image {i}")
    else:
      a = np.asarray(item)
      if from_array is not None:
        x = from_array(a, f"image {i}")
      elif a.shape != tuple(shape) or a.dtype != np.uint8:
        raise ValueError(f"image {i}: an array of shape {a.shape} {a.dtype}; the model reads "
                         f"{'x'.join(map(str, shape))} uint8 arrays in its dataset's form, or "
                         f"image files")
      else:
        x = a
    out.append(np.asarray(x, np.uint8))
  if not out:
    raise ValueError("no images given")
  return np.stack(out)


def head_metric(params) -> "_index.Metric":
  """The weighted-L1 pair head of :class:`siamjax.models.SiameseNet` as a search metric."""
  head = params["head"]
  return _index.Metric("weighted_l1", weights=np.asarray(head["kernel"], np.float32)[:, 0],
                       bias=float(np.asarray(head["bias"])[0]))


class Model:
  """A trained network ready to use (see the module docstring); built by :func:`load`.

  Attributes:
    recipe: which experiment wrote it.
    variant: which of its models this is.
    workdir: its work directory; ``step`` and ``checkpoint`` (``"best"`` or ``"latest"``):
      the checkpoint read.
    variables: the parameters (and batch statistics) pytree.
    metric: the model's comparison (:class:`siamjax.index.Metric`).
    inputs: :class:`Inputs`.
    fingerprint: :func:`siamjax.index.fingerprint` of ``variables``: ties indexes and
      calibrations to these parameters.
    thresholds: the calibrated thresholds (``{name: record}``), read from the work
      directory's ``calibration.json`` when it was made with these parameters.
  """

  def __init__(self, *, recipe: str, workdir, step: int, checkpoint: str, variables,
               apply: Callable, metric, inputs: Inputs, prepare: Callable,
               variant: str | None = None, batch_size: int = 256, info: dict | None = None,
               read_pairs: Callable | None = None):
    self.recipe, self.variant, self.workdir = recipe, variant, Path(workdir)
    self.step, self.checkpoint = int(step), checkpoint
    self.metric, self.inputs, self.info = metric, inputs, dict(info or {})
    self._apply, self._prepare, self._read_pairs = apply, prepare, read_pairs
    devices = jax.local_devices()
    self._mesh = Mesh(np.array(devices), ("data",))
    self._n_dev = len(devices)
    self.batch_size = self._n_dev * max(1, -(-int(batch_size) // self._n_dev))
    self.fingerprint = _index.fingerprint(variables)
    try:  # a checkpoint of another architecture fails here, not at the first call
      out = jax.eval_shape(apply, variables,
                           jax.ShapeDtypeStruct((self._n_dev,) + tuple(inputs.shape),
                                                jnp.dtype(inputs.dtype)))
    except Exception as e:  # flax raises many kinds; one line for the user
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"the checkpoint in {self.workdir} does not fit the network its "
                       f"config.json describes ({first})") from None
    if out.ndim != 2:
      raise ValueError(f"the {recipe} loader's network returns shape {out.shape}, not "
                       f"[N, D] embeddings")
    self.dim = int(out.shape[1])
    self.variables = jax.device_put(variables, NamedSharding(self._mesh, P()))
    self._embed_jit = jax.jit(apply)
    # The metric's scores, jitted once per model: rows of two [N, D] arrays, and blocks.
    self._pair_jit = jax.jit(metric.pair_scores)
    self._block_jit = jax.jit(metric.scores)
    self.thresholds = _read_calibration(self.workdir, self.variant, self.fingerprint)

  # -- what the network reads --------------------------------------------------------

  def preprocess(self, raw) -> np.ndarray:
    """Raw inputs as the recipe's evaluation prepared them: ``[N, *inputs.shape]``.

    Images: file paths (or arrays in the dataset's own form); text: strings; vectors:
    rows of numbers. See the recipe's loader for the details (``inputs.describe``).

    Raises:
      ValueError: an input that cannot be read as the model expects, naming it.
    """
    x = np.asarray(self._prepare(raw))
    if x.ndim == len(self.inputs.shape) + 1 and x.shape[0] == 0:
      raise ValueError("no inputs given")
    return x

  def read_pairs(self, path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pairs from a file, preprocessed: ``(a [N, ...], b [N, ...], same [N] or None)``.

    The recipe's own pair file where it has one (a vector-pair CSV is split as in
    training); otherwise a CSV of rows ``a,b`` or ``a,b,same`` (0/1), where ``a`` and
    ``b`` are image paths (relative to the file's folder) or texts.

    Raises:
      ValueError: an unreadable file or row, naming it and its line.
    """
    if self._read_pairs is not None:
      return self._read_pairs(path)
    import csv
    path = Path(path)
    try:
      rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
      raise ValueError(f"{path}: cannot read it as a CSV of pairs ({e})") from None
    if rows and len(rows[0]) >= 2 and rows[0][-1].strip().lower() in ("same", "label", "b"):
      rows = rows[1:]  # a header
    if not rows or any(len(r) not in (2, 3) for r in rows):
      bad = next((i for i, r in enumerate(rows, 1) if len(r) not in (2, 3)), 0)
      raise ValueError(f"{path}: expected rows 'a,b' or 'a,b,same'"
                       + (f" (line {bad} has {len(rows[bad - 1])} cells)" if bad else
                          " (the file holds none)"))
    def item(cell):
      cell = cell.strip()
      return path.parent / cell if self.inputs.kind == "image" else cell
    a = self.preprocess([item(r[0]) for r in rows])
    b = self.preprocess([item(r[1]) for r in rows])
    if all(len(r) == 3 for r in rows):
      try:
        same = np.asarray([int(r[2]) for r in rows])
      except ValueError:
        raise ValueError(f"{path}: the third column must be 0 or 1") from None
      return a, b, same
    return a, b, None

  def _check(self, name: str, x) -> jax.Array | np.ndarray:
    if not isinstance(x, jax.Array):
      x = np.asarray(x)
    want = tuple(self.inputs.shape)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
      raise ValueError(f"{name} must be [N, {', '.join(map(str, want))}] "
                       f"({self.inputs.kind} inputs as Model.preprocess returns them), got "
                       f"shape {tuple(x.shape)}")
    if x.shape[0] == 0:
      raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if np.dtype(x.dtype) != np.dtype(self.inputs.dtype):
      if not (np.issubdtype(x.dtype, np.floating)
              and np.issubdtype(np.dtype(self.inputs.dtype), np.floating)):
        raise ValueError(f"{name} must have dtype {self.inputs.dtype} (as Model.preprocess "
                         f"returns it), got {x.dtype}")
      x = x.astype(self.inputs.dtype)
    return x

  def _bucket(self, m: int) -> int:
    """The padded batch for ``m`` rows: ``devices * 2^j``, at most ``batch_size``."""
    per = -(-m // self._n_dev)
    return min(self._n_dev * (1 << max(0, math.ceil(math.log2(per)))), self.batch_size)

  def embed(self, x, *, progress: bool = False) -> jax.Array:
    """``[N, *inputs.shape] -> [N, D]`` float32 embeddings.

    Runs in batches of at most ``batch_size``, each padded to a power-of-two bucket
    (so a new ``N`` compiles at most ``log2(batch_size)`` programs once) and split over
    the local devices.

    Args:
      x: preprocessed inputs (:meth:`preprocess`).
      progress: show a progress bar (stderr) over the batches.
    """
    x = self._check("x", x)
    n, outs = x.shape[0], []
    starts = range(0, n, self.batch_size)
    bar = _progress.bar(len(starts), "embed", "batch") if progress and len(starts) > 1 else None
    sharding = NamedSharding(self._mesh, P("data"))
    for start in starts:
      chunk = x[start:start + self.batch_size]
      m = chunk.shape[0]
      b = self._bucket(m)
      if b > m:
        pad = ((0, b - m),) + ((0, 0),) * (chunk.ndim - 1)
        chunk = jnp.pad(chunk, pad) if isinstance(chunk, jax.Array) else np.pad(chunk, pad)
      out = self._embed_jit(self.variables, jax.device_put(chunk, sharding))
      outs.append(out[:m])
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    emb = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    return emb.astype(jnp.float32)

  # -- comparisons -------------------------------------------------------------------

  @property
  def units(self) -> str:
    """The unit of :meth:`score` (``"squared distance"``, ``"probability"`` ...)."""
    return self.metric.units

  @property
  def same_when(self) -> str:
    """``"lower"`` (distances) or ``"higher"`` (probabilities, similarities) means same."""
    return self.metric.same_when

  def score_embeddings(self, h_a, h_b) -> np.ndarray:
    """:meth:`score` of embedded pairs ``[N, D]``, ``[N, D] -> [N]`` (in :attr:`units`)."""
    return np.asarray(self.metric.to_units(self.pair_scores(h_a, h_b)))

  def pair_scores(self, h_a, h_b) -> jax.Array:
    """Internal scores (higher = more alike) of rows ``h_a[i]``, ``h_b[i]`` (``[N, D]``)."""
    h_a, h_b = jnp.asarray(h_a, jnp.float32), jnp.asarray(h_b, jnp.float32)
    if h_a.shape != h_b.shape or h_a.ndim != 2 or h_a.shape[1] != self.dim:
      raise ValueError(f"embeddings must be two [N, {self.dim}] arrays of one shape, got "
                       f"{h_a.shape} and {h_b.shape}")
    return self._pair_jit(h_a, h_b)

  def score(self, a, b) -> np.ndarray:
    """The model's comparison of pairs ``(a[i], b[i])``: ``[N]`` in :attr:`units`.

    Args:
      a, b: preprocessed inputs ``[N, ...]`` of the same shape; both are encoded in one
        batch.
    """
    return np.asarray(self.metric.to_units(verify_scores(self, a, b)))

  def enroll(self, x, labels, ids=None, *, progress: bool = False, **index_kwargs):
    """A gallery (:class:`siamjax.index.Index`) of ``x``'s embeddings under its ``metric``,
    fingerprinted with these parameters (``index_kwargs`` go to ``Index.build``)."""
    emb = self.embed(x, progress=progress)
    return _index.Index.build(emb, labels, ids, metric=self.metric,
                              fingerprint=self.fingerprint, **index_kwargs)

  def check_index(self, index) -> None:
    """Raises :class:`siamjax.index.IndexMismatch` unless ``index`` was built by this model."""
    _index.check_fingerprint(index.fingerprint, self.fingerprint)

  # -- thresholds ----------------------------------------------------------------------

  def threshold(self, name: str | None = None) -> dict:
    """A calibrated threshold record by name (default: the last one calibrated).

    Raises:
      ValueError: nothing calibrated yet, or no threshold of that name.
    """
    if not self.thresholds:
      raise ValueError(f"no threshold: the model in {self.workdir} has not been "
                       f"calibrated yet (siamjax.inference.calibrate, or python -m siamjax "
                       f"calibrate --workdir {self.workdir} ...)")
    if name is None:
      return self.thresholds[max(self.thresholds, key=lambda k: self.thresholds[k]["order"])]
    if name not in self.thresholds:
      raise ValueError(f"no threshold named {name!r}; calibrated: "
                       f"{', '.join(sorted(self.thresholds))}")
    return self.thresholds[name]

  def describe(self) -> dict:
    """A JSON-ready summary: recipe, variant, checkpoint, inputs, comparison, thresholds."""
    return {"recipe": self.recipe, "variant": self.variant, "workdir": str(self.workdir),
            "checkpoint": self.checkpoint, "step": self.step, "fingerprint": self.fingerprint,
            "embedding_dim": self.dim, "inputs": {"kind": self.inputs.kind,
                                                  "shape": list(self.inputs.shape),
                                                  "dtype": self.inputs.dtype},
            "metric": self.metric.to_json(), "units": self.units,
            "same_when": self.same_when, "thresholds": self.thresholds, **self.info}

  def __repr__(self) -> str:
    var = f", variant={self.variant!r}" if self.variant else ""
    return (f"Model({self.recipe}{var}, {self.checkpoint} step {self.step}, D={self.dim}, "
            f"{self.metric.kind})")


# ---------------------------------------------------------------------------------------
# Calibration and decisions
# ---------------------------------------------------------------------------------------


def parse_target(target) -> tuple[str, str, float | None]:
  """``(name, kind, value)`` of a calibration target.

  >>> parse_target({"far": 1e-3}), parse_target("eer"), parse_target("precision=0.99")
  (('far=0.001', 'far', 0.001), ('eer', 'eer', None), ('precision=0.99', 'precision', 0.99))
  """
  if isinstance(target, str) and "=" in target:
    k, _, v = target.partition("=")
    try:
      target = {k.strip(): float(v)}
    except ValueError:
      raise ValueError(f"target {target!r}: the value after '=' must be a number") from None
  if isinstance(target, str):
    if target not in ("eer", "best_accuracy"):
      raise ValueError(f"target must be {{'far': x}}, {{'precision': x}}, 'eer' or "
                       f"'best_accuracy', got {target!r}")
    return target, target, None
  if isinstance(target, Mapping) and len(target) == 1:
    (kind, value), = target.items()
    if kind in ("far", "precision") and isinstance(value, (int, float)) and 0 <= value <= 1:
      value = float(value)
      return f"{kind}={value:g}", kind, value
  raise ValueError(f"target must be {{'far': x}} or {{'precision': x}} with x in [0, 1], 'eer' "
                   f"or 'best_accuracy', got {target!r}")


def _targets(target) -> list[tuple[str, str, float | None]]:
  return [parse_target(t) for t in (target if isinstance(target, (list, tuple)) else [target])]


def _all_pair_scores(model: Model, emb: jax.Array, labels: np.ndarray, max_pairs: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores and same-label flags of every pair ``i < j`` (all positives and, beyond
  ``max_pairs``, a uniform sample of the negative pairs)."""
  n = emb.shape[0]
  total = n * (n - 1) // 2
  keep_neg = 1.0
  if total > max_pairs:
    n_pos = int(sum(c * (c - 1) // 2 for c in np.unique(labels, return_counts=True)[1]))
    keep_neg = max(max_pairs - n_pos, 1) / max(total - n_pos, 1)
  rng = np.random.default_rng(seed)
  scores, same = [], []
  block = max(1, min(n, 4_000_000 // max(n, 1)))
  codes = np.unique(labels, return_inverse=True)[1]
  for start in range(0, n, block):
    rows = slice(start, min(start + block, n))
    s = np.asarray(model._block_jit(emb[rows], emb))
    i = np.arange(rows.start, rows.stop)[:, None]
    upper = np.arange(n)[None, :] > i
    eq = codes[rows][:, None] == codes[None, :]
    keep = upper & (eq | (rng.random(upper.shape) < keep_neg) if keep_neg < 1 else upper)
    scores.append(s[keep])
    same.append(eq[keep])
  return np.concatenate(scores), np.concatenate(same)


def calibrate(model: Model, data=None, labels=None, target="eer", *, pairs=None, index=None,
              save: bool = True, max_pairs: int = 20_000_000, seed: int = 0,
              progress: bool = False) -> dict:
  """Thresholds for targets, measured on labelled calibration data; stored with the model.

  Three protocols:

  * ``data`` and ``labels`` (verification): every pair of ``data`` is scored; a pair is
    genuine when its two labels are equal. FAR is the fraction of impostor pairs
    accepted, FRR of genuine pairs rejected, precision the fraction of accepted pairs
    that are genuine, recall ``1 - FRR``.
  * ``pairs=(a, b, same)`` (verification on given pairs): the same rates over these pairs.
  * ``data``, ``labels`` and ``index`` (open-set identification): each item of ``data``
    is a probe matched to its nearest gallery item; a probe whose label is not in the
    gallery is a stranger. FAR is the fraction of strangers accepted (false alarms),
    recall (the detection-and-identification rate) the fraction of enrolled probes
    accepted with their right label, FRR ``1 - recall``, precision the fraction of
    accepted probes given their right label.

  Calibrate on data the scored results never use (validation classes).

  Args:
    model: the :class:`Model`.
    data: preprocessed calibration inputs ``[N, ...]``.
    labels: ``[N]`` class labels (ints or strings).
    target: one target or a list: ``{"far": x}`` (the most accepting threshold with FAR
      <= x), ``{"precision": x}`` (the most accepting one with precision >= x),
      ``"eer"`` (FAR = FRR) or ``"best_accuracy"`` (the most correct decisions); strings
      ``"far=0.001"`` too.
    pairs: ``(a [P, ...], b [P, ...], same [P])`` preprocessed pairs with 0/1 labels,
      instead of ``data`` and ``labels``.
    index: a gallery built by this model (:meth:`Model.enroll`): open-set protocol.
    save: add the thresholds to ``model.thresholds`` and to the work directory's
      ``calibration.json`` (written atomically; other thresholds are kept).
    max_pairs: verification with more pairs than this keeps every genuine pair and a
      uniform sample of the impostor pairs (``seed``).
    progress: progress bars while embedding.

  Returns:
    ``{name: record}`` per target: ``threshold`` (in ``model.units``; same when the score
    is at or beyond it in the ``same_when`` direction), ``far``, ``frr``, ``precision``,
    ``recall``, ``accuracy``, each with ``*_ci95`` (Wilson), the counts, the protocol and
    the target.

  Raises:
    ValueError: bad shapes or labels, calibration data without genuine or impostor
      cases, or an index of another model.
  """
  _targets(target)  # bad targets fail before any work
  if (pairs is None) == (data is None):
    raise ValueError("pass data and labels, or pairs=(a, b, same), not both")
  if pairs is not None:
    if index is not None:
      raise ValueError("an index calibrates identification: pass data and labels with it")
    a, b, same = pairs
    same = np.asarray(same)
    if same.ndim != 1 or not np.isin(same, (0, 1)).all():
      raise ValueError(f"same must be a [P] array of 0/1 labels, got shape {same.shape}")
    scores = np.asarray(verify_scores(model, a, b, progress=progress))
    if scores.shape != same.shape:
      raise ValueError(f"the pairs hold {scores.size} pairs but same {same.size} labels")
    correct, protocol = same.astype(bool), "pairs"
    impostor = ~correct
    counts = {"pairs": int(scores.size), "genuine": int(correct.sum()),
              "impostor": int(impostor.sum())}
  else:
    labels = np.asarray(labels)
    x = model._check("data", data)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
      raise ValueError(f"labels must be [N] for the {x.shape[0]} inputs of data, got shape "
                       f"{labels.shape}")
    emb = model.embed(x, progress=progress)
    if index is None:
      scores, correct = _all_pair_scores(model, emb, labels, max_pairs, seed)
      impostor, protocol = ~correct, "pairs"
      counts = {"pairs": int(scores.size), "genuine": int(correct.sum()),
                "impostor": int(impostor.sum())}
    else:
      scores, correct, impostor = open_set_outcomes(model, index, emb, labels)
      protocol = "open_set"
      counts = {"probes": int(scores.size), "enrolled_probes": int((~impostor).sum()),
                "strangers": int(impostor.sum()), "gallery": len(index)}
  return choose_thresholds(model, (scores, correct, impostor), target, protocol=protocol,
                           counts=counts, save=save)


def choose_thresholds(model: Model, outcomes, target, *, protocol: str = "pairs",
                      counts: dict | None = None, save: bool = False) -> dict:
  """:func:`calibrate`'s thresholds from outcomes already scored.

  Args:
    model: the model the scores are of.
    outcomes: ``(scores, correct, impostor)``, ``[P]`` each: internal scores (higher =
      more alike) and the flags of :func:`siamjax.evaluation.verification.operating_points`
      (for open-set probes, :func:`open_set_outcomes`).
    target: as in :func:`calibrate`.
    protocol: ``"pairs"`` or ``"open_set"``, recorded with each threshold.
    counts: figures recorded with each threshold (numbers of pairs, probes ...).
    save: as in :func:`calibrate`.

  Returns:
    As :func:`calibrate`.
  """
  scores, correct, impostor = (np.asarray(v) for v in outcomes)
  targets = _targets(target)
  if impostor.all() or not impostor.any():
    what = ("probes whose label is enrolled and probes whose label is not (strangers)"
            if protocol == "open_set" else "genuine (same) and impostor (different) pairs")
    raise ValueError(f"calibration data must hold both {what}")
  points = verification.operating_points(scores, correct, impostor)
  out = {}
  order = max((r["order"] for r in model.thresholds.values()), default=-1)
  for name, kind, value in targets:
    i = verification.choose_operating_point(points, kind, value)
    order += 1
    out[name] = {**operating_record(model, points, i), "target": name, "protocol": protocol,
                 **(counts or {}), "order": order}
  if save:
    model.thresholds.update(out)
    _write_calibration(model)
  return out


def open_set_outcomes(model: Model, index, embeddings, labels
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each probe against its nearest gallery item: ``(score, correct, stranger)``, ``[Q]``.

  ``score`` is the internal score (higher = more alike) of the nearest item, ``correct``
  that its label is the probe's, ``stranger`` that the probe's label is not enrolled;
  :func:`siamjax.evaluation.verification.operating_points` takes them as they are.

  Args:
    model: the model that built ``index``.
    index: the gallery.
    embeddings: ``[Q, D]`` the probes' embeddings (:meth:`Model.embed`).
    labels: ``[Q]`` the probes' labels (compared with the gallery's as strings).
  """
  model.check_index(index)
  result = index.search(embeddings, 1)
  names = np.asarray([str(v) for v in np.asarray(labels).tolist()])
  enrolled = np.isin(names, np.asarray([str(v) for v in index.label_names]))
  correct = enrolled & (np.asarray([str(row[0]) for row in result.labels]) == names)
  return np.asarray(result.scores, np.float64)[:, 0], correct, ~enrolled


def verify_scores(model: Model, a, b, *, progress: bool = False) -> jax.Array:
  """Internal scores (higher = more alike) of preprocessed pairs ``(a[i], b[i])``."""
  a, b = model._check("a", a), model._check("b", b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"a and b must hold the same number of inputs, got {a.shape[0]} and "
                     f"{b.shape[0]}")
  h = model.embed(np.concatenate([np.asarray(a), np.asarray(b)]), progress=progress)
  return model.pair_scores(h[:a.shape[0]], h[a.shape[0]:])


def operating_record(model: Model, points: dict, i: int) -> dict:
  """Point ``i`` of :func:`siamjax.evaluation.verification.operating_points` as a JSON-ready
  record: the threshold (in the model's units and as an internal score) and every rate of
  :func:`~siamjax.evaluation.verification.operating_rates` with its 95% Wilson interval."""
  s = float(points["thresholds"][i])
  rec = {"threshold": float(model.metric.to_units(jnp.float32(s))) if np.isfinite(s) else
         (math.inf if model.same_when == "higher" else -math.inf),
         "score_threshold": s, "units": model.units, "same_when": model.same_when}
  for rate, (num, den) in verification.operating_rates(points, i).items():
    rec[rate] = num / den if den else math.nan
    rec[f"{rate}_ci95"] = (list(_wilson(num, den)) if den else [math.nan, math.nan])
  return rec


def _wilson(num: int, den: int) -> tuple[float, float]:
  from siamjax.evaluation.oneshot import accuracy_interval
  return accuracy_interval(int(num), int(den))


def _read_calibration(workdir: Path, variant, fingerprint: str) -> dict:
  path = workdir / CALIBRATION_FILE
  if not path.is_file():
    return {}
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    raise ValueError(f"{path} is unreadable; delete it and calibrate again") from None
  entry = saved.get(variant or "", {})
  return dict(entry.get("thresholds", {})) if entry.get("fingerprint") == fingerprint else {}


def _write_calibration(model: Model) -> None:
  from siamjax import results
  path = model.workdir / CALIBRATION_FILE
  saved = {}
  if path.is_file():
    try:
      saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      saved = {}
  saved[model.variant or ""] = {"fingerprint": model.fingerprint, "step": model.step,
                                "checkpoint": model.checkpoint, "thresholds": model.thresholds}
  results.write_json(path, saved)


def _score_threshold(model: Model, threshold) -> tuple[float, str]:
  """``(threshold on the internal score, its name)`` from a name, a record or a number."""
  if threshold is None or isinstance(threshold, str):
    rec = model.threshold(threshold)
    return float(rec["score_threshold"]), rec["target"]
  if isinstance(threshold, Mapping):
    return float(threshold["score_threshold"]), str(threshold.get("target", "given"))
  value = float(threshold)
  return float(model.metric.from_units(jnp.float32(value))), f"{value:g} {model.units}"


class Verification(NamedTuple):
  """:func:`verify`'s answer for ``N`` pairs: ``same [N]`` bool, ``score [N]`` in the
  model's units, and the threshold used (its name)."""

  same: np.ndarray
  score: np.ndarray
  threshold: str


def verify(model: Model, a, b, *, threshold=None) -> Verification:
  """Same or different, for pairs of preprocessed inputs ``(a[i], b[i])``.

  Args:
    model: the :class:`Model`.
    a, b: ``[N, ...]`` preprocessed inputs.
    threshold: a calibrated threshold's name (default: the last calibrated), or a value
      in ``model.units``.

  Raises:
    ValueError: no calibrated threshold (and none given).
  """
  t, name = _score_threshold(model, threshold)
  s = np.asarray(verify_scores(model, a, b))
  return Verification(s >= t, np.asarray(model.metric.to_units(jnp.asarray(s))), name)


class Identification(NamedTuple):
  """:func:`identify`'s answer for ``Q`` queries.

  Attributes:
    label: ``[Q]`` the nearest gallery item's label, or ``"unknown"`` when it is beyond
      the threshold.
    nearest: ``[Q]`` the nearest item's label, accepted or not.
    id: ``[Q]`` the nearest gallery item's id.
    score: ``[Q]`` its score in the model's units.
    accepted: ``[Q]`` bool.
    threshold: the threshold used (its name).
  """

  label: list
  nearest: list
  id: list
  score: np.ndarray
  accepted: np.ndarray
  threshold: str


def identify(model: Model, index, queries, *, threshold=None, unknown: str = UNKNOWN,
             progress: bool = False) -> Identification:
  """The gallery label of each query, or ``unknown`` when its nearest match is too far.

  Args:
    model: the :class:`Model` that built ``index``.
    index: a :class:`siamjax.index.Index` (:meth:`Model.enroll`).
    queries: ``[Q, ...]`` preprocessed inputs.
    threshold: as in :func:`verify`.
    unknown: the answer for a rejected query.

  Raises:
    siamjax.index.IndexMismatch: ``index`` was built by another model.
    ValueError: no calibrated threshold (and none given), or bad queries.
  """
  model.check_index(index)
  t, name = _score_threshold(model, threshold)
  emb = model.embed(queries, progress=progress)
  r = index.search(emb, 1)
  scores = np.asarray(r.scores)[:, 0]
  accepted = scores >= t
  nearest = [row[0] for row in r.labels]
  return Identification([lab if ok else unknown for lab, ok in zip(nearest, accepted)],
                        nearest, [row[0] for row in r.ids],
                        np.asarray(model.metric.to_units(jnp.asarray(scores))), accepted, name)
