"""Galleries of embeddings, and nearest-neighbour search under a model's own comparison.

An :class:`Index` holds a gallery: ``[N, D]`` embeddings, a label and a string id for
each, the :class:`Metric` the model compares with, and a :func:`fingerprint` of the
model's parameters. It is a pytree (the embeddings, label codes and per-row norms are
its leaves) and immutable: :meth:`Index.add` and :meth:`Index.remove` return new ones.

:meth:`Index.search` is exact k-nearest-neighbour search on the device. The gallery is
read in blocks of :data:`GALLERY_BLOCK` rows and the queries in blocks of at most
:data:`QUERY_BLOCK`; each block's scores (a matrix product for the distances, a fused
weighted-L1 sum for a pair head) are merged into a running top-k, so no search ever
holds more than one ``[QUERY_BLOCK, GALLERY_BLOCK]`` block of scores, whatever the
gallery and query counts. The gallery is split by rows over a mesh of devices (every
device of every process under ``jax.distributed``): each device searches its rows and
the per-device top-k lists are gathered and merged, which gives the same neighbours as
one device. An optional approximate backend on FAISS (``pip install 'siamjax[faiss]'``)
serves large galleries on CPUs behind the same :meth:`Index.search`.

Scores are *internal*: higher always means more alike (minus the distance for the
distances, the logit for a pair head). :meth:`Metric.to_units` turns them into the
units people read (a distance, a probability), and :attr:`Metric.same_when` says which
direction of those units means "same".

>>> import numpy as np
>>> g = np.eye(3, dtype=np.float32)
>>> index = Index.build(g, ["a", "b", "c"], metric=Metric("euclidean"))
>>> r = index.search(np.array([[0.9, 0.1, 0.0]], np.float32), k=2)
>>> r.labels[0].tolist(), r.ids[0].tolist()
(['a', 'b'], ['0', '1'])
>>> np.round(index.metric.to_units(r.scores[0]), 3).tolist()
[0.141, 1.273]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: Gallery rows scored per step of the search for D <= 256 (one ``[queries, rows]`` block
#: of scores); wider embeddings take proportionally fewer rows, so that a block of the
#: gallery stays about 8 MB.
GALLERY_BLOCK = 8192
#: Most queries searched per call of the compiled search; fewer are padded to a bucket.
QUERY_BLOCK = 512
_QUERY_BUCKETS = (8, 64, QUERY_BLOCK)
#: Columns of a score block summarised by one maximum in the block's top-k (see _block_top_k).
GROUP = 16
#: Elements of ``[queries, gallery rows, D]`` a weighted-L1 block may span.
_L1_BLOCK_ELEMENTS = 1 << 22
_AXIS = "gallery"
_META = "index.json"
_FAISS_FILE = "faiss.index"
BACKENDS = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")


class IndexMismatch(ValueError):
  """An index used with a model other than the one that built it."""


def check_fingerprint(found, expected: str, what: str = "the index") -> None:
  """Raises :class:`IndexMismatch` unless ``found`` (an index's stored fingerprint) is
  ``expected`` (the using model's :func:`fingerprint`); ``what`` names the index."""
  if found != expected:
    raise IndexMismatch(
        f"{what} was built by another model (parameters {str(found)[:12]}, this model's "
        f"{expected[:12]}); enrol the gallery again with this model")


def fingerprint(tree) -> str:
  """SHA-256 of a pytree's paths, dtypes, shapes and values: the identity of a model's
  parameters, stored with every index and calibration made with them.

  >>> fingerprint({"w": np.zeros(2)}) == fingerprint({"w": np.zeros(2)})
  True
  >>> fingerprint({"w": np.zeros(2)}) == fingerprint({"w": np.ones(2)})
  False
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # replicated parameters: every process has them
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# -- the comparison ---------------------------------------------------------------------

_UNITS = {"squared_euclidean": "squared distance", "euclidean": "distance",
          "cosine": "cosine similarity", "dot": "dot product", "weighted_l1": "probability"}


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
  """How a model compares two embeddings.

  Attributes:
    kind: ``"squared_euclidean"``, ``"euclidean"``, ``"cosine"``, ``"dot"``, or
      ``"weighted_l1"`` (the pair head of :class:`siamjax.models.SiameseNet`:
      ``sigmoid(sum(weights * |a - b|) + bias)``).
    weights: ``[D]`` the head's weights (``weighted_l1`` only).
    bias: the head's bias (``weighted_l1`` only).
  """

  kind: str
  weights: Any = None
  bias: Any = 0.0

  def __post_init__(self):
    if self.kind not in _UNITS:
      raise ValueError(f"unknown metric {self.kind!r}; expected one of {sorted(_UNITS)}")
    if (self.kind == "weighted_l1") != (self.weights is not None):
      raise ValueError("weights are given for the weighted_l1 metric, and only for it")

  def tree_flatten(self):
    return (self.weights, self.bias), self.kind

  @classmethod
  def tree_unflatten(cls, kind, children):
    obj = object.__new__(cls)
    for name, value in zip(("kind", "weights", "bias"), (kind, *children)):
      object.__setattr__(obj, name, value)
    return obj

  @property
  def units(self) -> str:
    """What :meth:`to_units` returns: ``"distance"``, ``"probability"``, ..."""
    return _UNITS[self.kind]

  @property
  def same_when(self) -> str:
    """``"lower"`` when small values of :meth:`to_units` mean "same", else ``"higher"``."""
    return "lower" if self.kind in ("squared_euclidean", "euclidean") else "higher"

  def to_units(self, s):
    """Internal scores to the metric's units."""
    s = jnp.asarray(s)
    if self.kind in ("squared_euclidean", "euclidean"):
      return -s
    if self.kind == "weighted_l1":
      return jax.nn.sigmoid(s)
    return s

  def from_units(self, u):
    """The metric's units to internal scores (the inverse of :meth:`to_units`)."""
    u = jnp.asarray(u)
    if self.kind in ("squared_euclidean", "euclidean"):
      return -u
    if self.kind == "weighted_l1":
      return jnp.log(u) - jnp.log1p(-u)
    return u

  def scores(self, q, g):
    """``[Q, G]`` internal scores of every query row against every gallery row."""
    q, g = jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32)
    return self._final(self._rank(q, g, self._row_stats(g, g.shape[0])), q)

  def pair_scores(self, a, b):
    """``[N]`` internal scores of the rows ``(a[i], b[i])``."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if self.kind == "weighted_l1":
      return jnp.abs(a - b) @ jnp.asarray(self.weights, jnp.float32) + self.bias
    if self.kind == "cosine":
      return jnp.sum(a * b, -1) * jax.lax.rsqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    if self.kind == "dot":
      return jnp.sum(a * b, -1)
    d2 = jnp.sum(jnp.square(a - b), -1)
    return -d2 if self.kind == "squared_euclidean" else -jnp.sqrt(d2)

  # The search ranks by a score that skips what is constant per query (the query's own
  # norm): r = <q * qscale, g * scale> + bias, with a (scale, bias) pair kept per gallery
  # row (bias -inf on padding rows), then finishes the k winners with _final.

  def _row_stats(self, g, n_valid):
    """``[rows, 2]`` each gallery row's (scale, bias); rows from ``n_valid`` on are padding."""
    g = g.astype(jnp.float32)
    sq = jnp.sum(g * g, -1)
    one = jnp.ones_like(sq)
    if self.kind in ("squared_euclidean", "euclidean"):
      scale, bias = one, -sq
    elif self.kind == "cosine":
      scale, bias = jax.lax.rsqrt(sq), jnp.zeros_like(sq)
    else:
      scale, bias = one, jnp.zeros_like(sq)
    bias = jnp.where(jnp.arange(g.shape[0]) < n_valid, bias, -jnp.inf)
    return jnp.stack([scale, bias], axis=1)

  def _rank(self, q, g, stats):
    """``[Q, rows]`` ranking scores of a gallery block (see above)."""
    if self.kind == "weighted_l1":
      w = jnp.asarray(self.weights, jnp.float32)
      return (jnp.einsum("qgd,d->qg", jnp.abs(q[:, None, :] - g[None, :, :]), w)
              + self.bias + stats[None, :, 1])
    if self.kind in ("squared_euclidean", "euclidean"):
      q = 2.0 * q
    elif self.kind == "cosine":
      g = g * stats[:, :1]
    # The bias rides in the product as one more column: no pass over the score block.
    q1 = jnp.concatenate([q, jnp.ones((q.shape[0], 1), q.dtype)], axis=1)
    g1 = jnp.concatenate([g, stats[:, 1:]], axis=1)
    return jnp.dot(q1, g1.T, preferred_element_type=jnp.float32)

  def _final(self, r, q):
    if self.kind in ("squared_euclidean", "euclidean"):
      d2 = jnp.maximum(jnp.sum(q * q, -1, keepdims=True) - r, 0.0)
      return -d2 if self.kind == "squared_euclidean" else -jnp.sqrt(d2)
    if self.kind == "cosine":
      return r * jax.lax.rsqrt(jnp.sum(q * q, -1, keepdims=True))
    return r

  def to_json(self) -> dict:
    """The metric as a JSON-ready dict (:meth:`from_json` reads it back)."""
    out = {"kind": self.kind}
    if self.kind == "weighted_l1":
      out.update(weights=np.asarray(self.weights, np.float32).tolist(), bias=float(self.bias))
    return out

  @classmethod
  def from_json(cls, d: dict) -> "Metric":
    """The metric that :meth:`to_json` wrote."""
    if d["kind"] == "weighted_l1":
      return cls("weighted_l1", weights=np.asarray(d["weights"], np.float32),
                 bias=float(d["bias"]))
    return cls(d["kind"])


# -- the search kernel ------------------------------------------------------------------


def _merge(best_s, best_i, s, i, k):
  """Top-k of two candidate lists (``[Q, a]`` and ``[Q, b]``); ties keep the first."""
  s_all = jnp.concatenate([best_s, s], axis=1)
  i_all = jnp.concatenate([best_i, i], axis=1)
  top, pos = jax.lax.top_k(s_all, k)
  return top, jnp.take_along_axis(i_all, pos, axis=1)


def _block_top_k(r, cols, k):
  """Exact top-k ``(scores, columns)`` of each row of a score block ``r`` (``[Q, n]``).

  A full top-k over every column costs more than the matrix product that made them on a
  CPU. The block's columns are cut into runs of :data:`GROUP`; each row's k best columns
  lie in the k runs with the highest maxima (a run holding the j-th best value has a
  maximum at least that value, and at most j runs can), so the top-k runs over the
  ``n / GROUP`` maxima and then over those k runs' ``k * GROUP`` values. Equal scores go
  to the lower column, as in ``lax.top_k`` over the whole block.
  """
  q, n = r.shape
  if n % GROUP or n // GROUP < k:
    s, pos = jax.lax.top_k(r, k)
    return s, jnp.take_along_axis(jnp.broadcast_to(cols, r.shape), pos, axis=1)
  r3 = r.reshape(q, n // GROUP, GROUP)  # column c is in group c // GROUP
  _, g = jax.lax.top_k(r3.max(axis=2), k)
  g = jnp.sort(g, axis=1)  # candidates in column order: ties go to the first column
  cand = jnp.take_along_axis(r3, g[:, :, None], axis=1).reshape(q, k * GROUP)
  cand_cols = (g[:, :, None] * GROUP
               + jnp.arange(GROUP, dtype=jnp.int32)[None, None, :]).reshape(q, k * GROUP)
  s, pos = jax.lax.top_k(cand, k)
  return s, jnp.take_along_axis(cols[:, :1] + cand_cols, pos, axis=1)


def _block_rows(metric: Metric, q_rows: int, dim: int) -> int:
  if metric.kind == "weighted_l1":
    return max(8, min(GALLERY_BLOCK, _L1_BLOCK_ELEMENTS // max(1, q_rows * dim)))
  rows = min(GALLERY_BLOCK, GALLERY_BLOCK * 256 // max(dim, 1))
  return max(GROUP * 64, rows // GROUP * GROUP)


def _local_top_k(metric, emb, stats, q, k):
  """Top-k ``(rank scores, rows)`` of ``q`` against ``emb``'s rows (traced)."""
  n, dim = emb.shape
  block = min(_block_rows(metric, q.shape[0], dim), n)
  full = n // block
  best_s = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
  best_i = jnp.zeros((q.shape[0], k), jnp.int32)

  def score(g, st, start, rows):
    cols = start + jnp.arange(rows, dtype=jnp.int32)
    r = metric._rank(q, g.astype(jnp.float32), st)
    return _block_top_k(r, cols[None, :], min(k, rows))

  def body(b, carry):
    start = b * block
    g = jax.lax.dynamic_slice_in_dim(emb, start, block)
    st = jax.lax.dynamic_slice_in_dim(stats, start, block)
    return _merge(*carry, *score(g, st, start, block), k)

  best = jax.lax.fori_loop(0, full, body, (best_s, best_i))
  if n - full * block:
    rest = n - full * block
    best = _merge(*best, *score(emb[full * block:], stats[full * block:], full * block, rest),
                  k)
  return best


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def _search(metric, emb, stats, q, *, mesh, k):
  """Exact top-k over a gallery split by rows over ``mesh``; replicated results."""
  devices = mesh.size
  rows = emb.shape[0] // devices

  def shard(emb, stats, q):
    start = jax.lax.axis_index(_AXIS) * rows
    s, i = _local_top_k(metric, emb, stats, q, k)
    i = i + start
    if devices > 1:
      s = jax.lax.all_gather(s, _AXIS, axis=1, tiled=True)
      i = jax.lax.all_gather(i, _AXIS, axis=1, tiled=True)
      s, pos = jax.lax.top_k(s, k)
      i = jnp.take_along_axis(i, pos, axis=1)
    return metric._final(s, q), i

  return jax.shard_map(shard, mesh=mesh, in_specs=(P(_AXIS, None), P(_AXIS, None), P()),
                       out_specs=(P(), P()), check_vma=False)(emb, stats, q)


@functools.partial(jax.jit, static_argnames=("mesh", "n"))
def _stats(metric, emb, *, mesh, n):
  rows = emb.shape[0] // mesh.size

  def shard(emb):
    return metric._row_stats(emb, n - jax.lax.axis_index(_AXIS) * rows)

  return jax.shard_map(shard, mesh=mesh, in_specs=P(_AXIS, None),
                       out_specs=P(_AXIS, None))(emb)


def _place(embeddings, mesh: Mesh) -> jax.Array:
  """The gallery as float32 rows split over ``mesh``, padded with zero rows to a multiple
  of its size. A float32 array already on the one device of ``mesh`` is used in place
  (a gallery of many GB is not copied)."""
  n = embeddings.shape[0]
  rows = -(-n // mesh.size) * mesh.size
  sharding = NamedSharding(mesh, P(_AXIS, None))
  if isinstance(embeddings, jax.Array) and embeddings.is_fully_addressable:
    e = embeddings.astype(jnp.float32)
    if rows != n:
      e = jnp.pad(e, ((0, rows - n), (0, 0)))
    e = jax.device_put(e, sharding)
    finite = bool(_all_finite(e))
  else:
    e = np.asarray(embeddings, np.float32)
    finite = bool(np.isfinite(e).all())
    if rows != n:
      e = np.concatenate([e, np.zeros((rows - n, e.shape[1]), np.float32)])
    e = _global_rows(mesh, e)
  if not finite:
    raise ValueError("embeddings hold NaN or infinite values")
  return e


@jax.jit
def _all_finite(x):
  return jnp.isfinite(x).all()


def _local(x: jax.Array) -> np.ndarray:
  """A replicated array's value on this process."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _global_rows(mesh: Mesh, x: np.ndarray) -> jax.Array:
  """``x`` (the same on every process) split by rows over ``mesh`` (rows already padded)."""
  spec = P(_AXIS, None) if x.ndim == 2 else P(_AXIS)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def _replicated(mesh: Mesh, x: np.ndarray) -> jax.Array:
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda i: x[i])


def default_mesh(devices: Sequence | None = None) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (_AXIS,))


# -- the index --------------------------------------------------------------------------


class SearchResult(NamedTuple):
  """The k nearest gallery entries of each query, nearest first.

  Attributes:
    scores: ``[Q, k]`` internal scores (higher = more alike; :meth:`Metric.to_units`).
    indices: ``[Q, k]`` gallery rows.
    labels: ``[Q, k]`` their labels (strings).
    ids: ``[Q, k]`` their ids.
  """

  scores: np.ndarray
  indices: np.ndarray
  labels: np.ndarray
  ids: np.ndarray


@jax.tree_util.register_pytree_node_class
class Index:
  """A gallery of labelled embeddings; build it with :meth:`build` (see the module
  docstring).

  Attributes:
    embeddings: ``[rows, D]`` the gallery on its mesh (rows past ``len(index)`` are
      padding, present only when the gallery is split over several devices).
    codes: ``[N]`` each entry's label as a position in ``label_names``.
    label_names: the distinct labels, sorted.
    ids: ``[N]`` each entry's id (strings, unique).
    metric: the comparison searched under.
    fingerprint: :func:`fingerprint` of the model that embedded the gallery (or None).
    backend: ``"exact"`` or a FAISS backend (``BACKENDS``), with ``backend_options``.
  """

  def __init__(self, embeddings, stats, codes, label_names, ids, metric, fingerprint,
               mesh, backend="exact", backend_options=None, faiss_index=None):
    self.embeddings, self.stats, self.codes = embeddings, stats, codes
    self.label_names, self.ids = tuple(label_names), ids
    self.metric, self.fingerprint, self.mesh = metric, fingerprint, mesh
    self.backend, self.backend_options = backend, dict(backend_options or {})
    self._faiss = faiss_index

  def tree_flatten(self):
    return ((self.embeddings, self.stats, self.codes, self.metric),
            (self.label_names, self.ids, self.fingerprint, self.mesh, self.backend,
             tuple(sorted(self.backend_options.items())), self._faiss))

  @classmethod
  def tree_unflatten(cls, aux, children):
    emb, stats, codes, metric = children
    names, ids, fp, mesh, backend, opts, faiss_index = aux
    return cls(emb, stats, codes, names, ids, metric, fp, mesh, backend, dict(opts),
               faiss_index)

  def __len__(self) -> int:
    return int(self.ids.shape[0])

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  @property
  def labels(self) -> np.ndarray:
    """``[N]`` each entry's label."""
    return np.asarray(self.label_names, dtype=object)[self.codes]

  def __repr__(self):
    return (f"Index({len(self)} entries, {len(self.label_names)} labels, D={self.dim}, "
            f"{self.metric.kind}, {self.backend}, {self.mesh.size} device(s))")

  # -- building ------------------------------------------------------------------------

  @classmethod
  def build(cls, embeddings, labels, ids=None, *, metric: Metric, fingerprint=None,
            mesh: Mesh | None = None, backend: str = "exact", **backend_options) -> "Index":
    """A gallery of ``embeddings`` (``[N, D]``) with their ``labels`` and ``ids``.

    Args:
      embeddings: ``[N, D]`` array; under ``jax.distributed`` every process passes the
        same gallery and keeps only its own devices' rows.
      labels: ``[N]`` labels (any values; kept as strings).
      ids: ``[N]`` unique string ids (default: the row numbers).
      metric: the model's comparison (:class:`Metric`).
      fingerprint: the model's :func:`fingerprint`, checked when the index is used.
      mesh: devices to split the gallery over (default :func:`default_mesh`: all).
      backend: ``"exact"`` (default), or an approximate FAISS index on the CPU:
        ``"faiss_ivf"`` (options ``nlist``, ``nprobe``), ``"faiss_hnsw"`` (``m``,
        ``ef_search``, ``ef_construction``) or ``"faiss_flat"``.

    Raises:
      ValueError: empty gallery, mismatched lengths, duplicate ids, bad options.
    """
    shape = tuple(np.shape(embeddings))
    if len(shape) != 2 or 0 in shape:
      raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {shape}")
    if not jnp.issubdtype(embeddings.dtype if hasattr(embeddings, "dtype")
                          else np.asarray(embeddings).dtype, jnp.floating):
      raise ValueError(f"embeddings must be floating point, got {np.asarray(embeddings).dtype}")
    labels = _strings(labels, "labels")
    ids = [str(i) for i in range(shape[0])] if ids is None else _strings(ids, "ids")
    for name, v in (("labels", labels), ("ids", ids)):
      if len(v) != shape[0]:
        raise ValueError(f"{len(v)} {name} for {shape[0]} embeddings")
    _check_unique(ids)
    if backend not in BACKENDS:
      raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    mesh = default_mesh() if mesh is None else mesh
    if mesh.axis_names != (_AXIS,):
      mesh = Mesh(mesh.devices.reshape(-1), (_AXIS,))
    dev_emb = _place(embeddings, mesh)
    stats = _stats(metric, dev_emb, mesh=mesh, n=len(labels))
    out = cls(dev_emb, stats, codes.astype(np.int32).reshape(-1), names.tolist(),
              np.asarray(ids, dtype=object), metric, fingerprint, mesh, backend,
              backend_options)
    if backend != "exact":
      out._faiss = _faiss_build(out, backend, backend_options)
    return out

  def _host_embeddings(self) -> np.ndarray:
    """The ``[N, D]`` gallery on this host."""
    e = self.embeddings
    if not e.is_fully_addressable:
      from jax.experimental import multihost_utils
      e = multihost_utils.process_allgather(e, tiled=True)
    return np.asarray(e)[:len(self)]

  def _rebuilt(self, emb, labels, ids) -> "Index":
    return Index.build(emb, labels, ids, metric=self.metric, fingerprint=self.fingerprint,
                       mesh=self.mesh, backend=self.backend, **self.backend_options)

  def add(self, embeddings, labels, ids=None) -> "Index":
    """A new index with ``embeddings`` (``[M, D]``) appended; ids default to row numbers
    after the existing ones, and must not repeat existing ids."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[1] != self.dim:
      raise ValueError(f"embeddings to add must be [M, {self.dim}], got shape {emb.shape}")
    if ids is None:
      ids = [str(len(self) + i) for i in range(emb.shape[0])]
    ids = _strings(ids, "ids")
    clash = set(ids) & set(self.ids.tolist())
    if clash:
      raise ValueError(f"ids already in the index: {sorted(clash)[:5]}")
    return self._rebuilt(np.concatenate([self._host_embeddings(), emb.astype(np.float32)]),
                         np.concatenate([self.labels, np.asarray(_strings(labels, "labels"),
                                                                 dtype=object)]),
                         np.concatenate([self.ids, np.asarray(ids, dtype=object)]))

  def remove(self, ids) -> "Index":
    """A new index without the entries of ``ids`` (each must be in the index)."""
    ids = _strings(ids, "ids")
    present = set(self.ids.tolist())
    missing = [i for i in ids if i not in present]
    if missing:
      raise ValueError(f"ids not in the index: {missing[:5]}")
    keep = ~np.isin(self.ids.astype(str), np.asarray(ids, dtype=str))
    if not keep.any():
      raise ValueError("removing every entry would leave an empty index")
    return self._rebuilt(self._host_embeddings()[keep], self.labels[keep], self.ids[keep])

  # -- searching -----------------------------------------------------------------------

  def search(self, queries, k: int = 1) -> SearchResult:
    """The ``k`` nearest entries of each query row (``[Q, D]``), nearest first.

    Exact on the default backend; approximate on ``faiss_ivf``/``faiss_hnsw``. Every
    process of a ``jax.distributed`` run passes the same queries and gets the same result.
    """
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}], got shape {q.shape}")
    if not 1 <= k <= len(self):
      raise ValueError(f"k must be in 1..{len(self)} (the index's size), got {k}")
    if self._faiss is not None:
      scores, idx = _faiss_search(self, q, k)
    else:
      scores, idx = self._exact(q, k)
    names = np.asarray(self.label_names, dtype=object)
    return SearchResult(scores, idx, names[self.codes[idx]], self.ids[idx])

  def _exact(self, q: np.ndarray, k: int):
    out_s, out_i = [], []
    for start in range(0, q.shape[0], QUERY_BLOCK):
      part = q[start:start + QUERY_BLOCK]
      bucket = next(b for b in _QUERY_BUCKETS if b >= part.shape[0])
      padded = np.zeros((bucket, q.shape[1]), np.float32)
      padded[:part.shape[0]] = part
      s, i = _search(self.metric, self.embeddings, self.stats, _replicated(self.mesh, padded),
                     mesh=self.mesh, k=k)
      out_s.append((s, part.shape[0]))
      out_i.append(i)
    scores = np.concatenate([_local(s)[:m] for s, m in out_s])
    idx = np.concatenate([_local(i)[:m] for i, (_, m) in zip(out_i, out_s)])
    return scores, idx

  # -- saving --------------------------------------------------------------------------

  def save(self, path) -> None:
    """Writes the index to the folder ``path`` (orbax arrays and ``index.json``).

    An existing index at ``path`` is replaced only once the new one is complete.
    Under ``jax.distributed`` every process calls it; process 0 writes.
    """
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    lead = jax.process_index() == 0
    tmp = path.with_name(f".{path.name}.{_shared_token()}.tmp")
    arrays = {"embeddings": self._host_embeddings(), "codes": np.asarray(self.codes)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / "arrays", arrays)
    ckpt.wait_until_finished()
    if lead:
      meta = {"format": 1, "size": len(self), "dim": self.dim,
              "label_names": list(self.label_names), "ids": self.ids.tolist(),
              "metric": self.metric.to_json(), "fingerprint": self.fingerprint,
              "backend": self.backend, "backend_options": self.backend_options}
      (tmp / _META).write_text(json.dumps(meta))
      if self._faiss is not None:
        import faiss
        faiss.write_index(self._faiss, str(tmp / _FAISS_FILE))
      if not path.exists():
        tmp.rename(path)
      elif not (path / _META).is_file():
        shutil.rmtree(tmp)
        raise ValueError(f"{path} exists and is not an index; not overwriting it")
      else:  # the old index goes only once the new one is in place
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
        path.rename(old)
        tmp.rename(path)
        _move_extras(old, path)
        shutil.rmtree(old)
    _sync("siamjax.index.save")

  @classmethod
  def load(cls, path, *, fingerprint: str | None = None, mesh: Mesh | None = None) -> "Index":
    """Reads an index written by :meth:`save`.

    Args:
      path: its folder.
      fingerprint: the using model's :func:`fingerprint`; an index built by another model
        raises :class:`IndexMismatch`.
      mesh: devices to split it over (default :func:`default_mesh`).
    """
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    try:
      meta = json.loads((path / _META).read_text())
    except (OSError, json.JSONDecodeError):
      raise ValueError(f"{path} is not an index (no readable {_META})") from None
    if fingerprint is not None:
      check_fingerprint(meta.get("fingerprint"), fingerprint, str(path))
    arrays = ocp.StandardCheckpointer().restore(path / "arrays")
    names = np.asarray(meta["label_names"], dtype=object)
    labels = names[np.asarray(arrays["codes"])]
    backend = meta["backend"]
    index = cls.build(np.asarray(arrays["embeddings"]), labels, meta["ids"],
                      metric=Metric.from_json(meta["metric"]), fingerprint=meta["fingerprint"],
                      mesh=mesh, backend="exact")
    index.backend, index.backend_options = backend, meta["backend_options"]
    if backend != "exact":
      import faiss
      index._faiss = faiss.read_index(str(path / _FAISS_FILE))
      _faiss_configure(index._faiss, backend, index.backend_options)
    return index


def _move_extras(old: Path, new: Path) -> None:
  """Carries files other programs put in an index folder (e.g. the command line's source
  note) over to its replacement, unless the replacement has its own."""
  for f in old.iterdir():
    if f.name not in ("arrays", _META, _FAISS_FILE) and not (new / f.name).exists():
      f.rename(new / f.name)


def _shared_token() -> str:
  """A name part every process agrees on (process 0's random one)."""
  token = uuid.uuid4().hex[:12]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    token = bytes(multihost_utils.broadcast_one_to_all(
        np.frombuffer(token.encode(), np.uint8))).decode()
  return token


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _strings(values, name: str) -> list[str]:
  """``values`` (a sequence or a 1-D array) as strings."""
  if isinstance(values, (str, bytes)):
    raise ValueError(f"{name} must be a sequence of values, not one string")
  if hasattr(values, "__array__"):
    values = np.asarray(values)
    if values.ndim != 1:
      raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    values = values.tolist()
  return [str(v) for v in values]


def _check_unique(ids: list[str]) -> None:
  if len(set(ids)) != len(ids):
    values, counts = np.unique(np.asarray(ids, dtype=str), return_counts=True)
    raise ValueError(f"ids must be unique; repeated: {values[counts > 1][:5].tolist()}")


# -- FAISS ------------------------------------------------------------------------------


def _faiss_kind(metric: Metric):
  import faiss
  if metric.kind in ("squared_euclidean", "euclidean"):
    return faiss.METRIC_L2
  if metric.kind in ("cosine", "dot"):
    return faiss.METRIC_INNER_PRODUCT
  raise ValueError(f"FAISS cannot search the {metric.kind} metric; use backend='exact'")


def _faiss_vectors(metric: Metric, x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x, np.float32)
  if metric.kind == "cosine":
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return x


def _faiss_build(index: Index, backend: str, opts: dict):
  try:
    import faiss
  except ImportError:
    raise ValueError(f"backend {backend!r} needs FAISS: pip install 'siamjax[faiss]'") from None
  kind = _faiss_kind(index.metric)
  x = _faiss_vectors(index.metric, index._host_embeddings())
  d = x.shape[1]
  known = {"faiss_flat": set(), "faiss_ivf": {"nlist", "nprobe"},
           "faiss_hnsw": {"m", "ef_search", "ef_construction"}}[backend]
  if set(opts) - known:
    raise ValueError(f"unknown options for {backend}: {sorted(set(opts) - known)}")
  if backend == "faiss_flat":
    f = faiss.IndexFlat(d, kind)
  elif backend == "faiss_ivf":
    nlist = int(opts.get("nlist", max(1, min(4 * int(math.sqrt(len(x))), len(x) // 39))))
    f = faiss.IndexIVFFlat(faiss.IndexFlat(d, kind), d, nlist, kind)
    f.train(x)
  else:
    f = faiss.IndexHNSWFlat(d, int(opts.get("m", 32)), kind)
    f.hnsw.efConstruction = int(opts.get("ef_construction", 40))
  f.add(x)
  _faiss_configure(f, backend, opts)
  return f


def _faiss_configure(f, backend: str, opts: dict) -> None:
  if backend == "faiss_ivf":
    f.nprobe = int(opts.get("nprobe", 8))
  elif backend == "faiss_hnsw":
    f.hnsw.efSearch = int(opts.get("ef_search", 64))


def _faiss_search(index: Index, q: np.ndarray, k: int):
  d, i = index._faiss.search(_faiss_vectors(index.metric, q), k)
  if index.metric.kind == "squared_euclidean":  # FAISS's L2 is the squared distance
    d = -np.maximum(d, 0)
  elif index.metric.kind == "euclidean":
    d = -np.sqrt(np.maximum(d, 0))
  if (i < 0).any():  # too few candidates probed: fewer than k results for some queries
    raise ValueError(f"the {index.backend} search found fewer than k={k} entries for some "
                     f"queries; probe more (nprobe / ef_search) or use backend='exact'")
  return d.astype(np.float32), i.astype(np.int64)


def knn(metric: Metric, queries, gallery, k: int, *, mesh: Mesh | None = None):
  """Exact top-k (``scores [Q, k]``, ``rows [Q, k]``) of ``queries`` among ``gallery``
  rows under ``metric``, without labels: :meth:`Index.search` on the bare arrays."""
  g = np.asarray(gallery)
  index = Index.build(g, np.zeros(g.shape[0], np.int32), metric=metric, mesh=mesh)
  r = index.search(queries, k)
  return r.scores, r.indices
