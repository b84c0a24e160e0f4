"""siamjax.index: exact search against a brute-force reference, building, saving, FAISS.

Sharding over 4 fake CPU devices runs here in a subprocess; over 2 processes on
loopback in tests/test_multihost.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from siamjax import index as ix

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The test run's XLA flags (conftest.py); a later device count overrides its own.
_XLA = os.environ.get("XLA_FLAGS", "")
KINDS = ["squared_euclidean", "euclidean", "cosine", "dot", "weighted_l1"]


def _metric(kind: str, dim: int) -> ix.Metric:
  if kind == "weighted_l1":  # a trained head: negative weights, "same" = small |a - b|
    w = -np.random.default_rng(3).uniform(0.5, 1.5, dim).astype(np.float32)
    return ix.Metric("weighted_l1", weights=w, bias=2.0)
  return ix.Metric(kind)


def _naive(kind: str, metric: ix.Metric, q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Internal scores (higher = more alike), one pair at a time in float64."""
  q, g = q.astype(np.float64), g.astype(np.float64)
  out = np.empty((len(q), len(g)))
  for i, a in enumerate(q):
    for j, b in enumerate(g):
      if kind == "squared_euclidean":
        out[i, j] = -np.sum((a - b) ** 2)
      elif kind == "euclidean":
        out[i, j] = -np.sqrt(np.sum((a - b) ** 2))
      elif kind == "cosine":
        out[i, j] = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
      elif kind == "dot":
        out[i, j] = a @ b
      else:
        out[i, j] = np.abs(a - b) @ np.asarray(metric.weights, np.float64) + metric.bias
  return out


def _data(n, q, d, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)).astype(np.float32),
          rng.standard_normal((q, d)).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_search_equals_brute_force(kind):
  # 300 rows: a group top-k block (300 = 16 * 18 + 12 would not split; 288 does) and a
  # tail; 9 queries: a padded query bucket.
  g, q = _data(300, 9, 6)
  metric = _metric(kind, 6)
  index = ix.Index.build(g, np.arange(300) % 7, metric=metric)
  r = index.search(q, k=5)
  ref = _naive(kind, metric, q, g)
  order = np.argsort(-ref, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(r.indices, order)
  np.testing.assert_allclose(r.scores, np.take_along_axis(ref, order, 1), rtol=1e-4,
                             atol=1e-4)
  assert r.labels.tolist() == (order % 7).astype(str).tolist()
  assert r.ids.tolist() == order.astype(str).tolist()
  np.testing.assert_allclose(np.asarray(metric.scores(q, g)), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(metric.pair_scores(q, g[:9])),
                             np.diag(ref[:, :9]), rtol=1e-4, atol=1e-4)


def test_search_over_many_blocks_and_query_blocks():
  """More rows than one gallery block and more queries than one query block."""
  g, q = _data(ix.GALLERY_BLOCK * 2 + 123, ix.QUERY_BLOCK + 5, 4, seed=1)
  index = ix.Index.build(g, np.zeros(len(g)), metric=ix.Metric("squared_euclidean"))
  r = index.search(q, k=3)
  d2 = ((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(r.indices, np.argsort(d2, axis=1, kind="stable")[:, :3])


def test_group_top_k_is_exact_with_ties_and_padding():
  import jax.numpy as jnp
  rng = np.random.default_rng(2)
  r = np.round(rng.standard_normal((5, 64 * ix.GROUP)), 1).astype(np.float32)  # many ties
  r[:, -7:] = -np.inf
  cols = np.arange(r.shape[1], dtype=np.int32)[None] + 100
  s, i = ix._block_top_k(jnp.asarray(r), jnp.asarray(cols), 10)
  order = np.argsort(-r, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(r, order, 1))
  np.testing.assert_array_equal(np.asarray(i), order + 100)


def test_add_remove_and_labels():
  g, q = _data(20, 3, 4)
  metric = ix.Metric("cosine")
  index = ix.Index.build(g[:10], ["a"] * 10, [f"x{i}" for i in range(10)], metric=metric)
  index = index.add(g[10:], ["b"] * 10, [f"y{i}" for i in range(10)])
  assert len(index) == 20 and index.label_names == ("a", "b")
  whole = ix.Index.build(g, ["a"] * 10 + ["b"] * 10, metric=metric)
  np.testing.assert_array_equal(index.search(q, 4).indices, whole.search(q, 4).indices)
  smaller = index.remove(["x0", "y3"])
  assert len(smaller) == 18 and "x0" not in smaller.ids.tolist()
  r = smaller.search(g[:1], 1)  # x0's own vector now finds something else
  assert r.ids[0, 0] != "x0"


@pytest.mark.parametrize("call, match", [
    (lambda i, g: i.search(g[:, :2], 1), r"queries must be \[Q, 4\]"),
    (lambda i, g: i.search(g, 0), "k must be in 1..6"),
    (lambda i, g: i.search(g, 7), "k must be in 1..6"),
    (lambda i, g: i.add(g, ["a"] * 6, [str(n) for n in range(6)]), "already in the index"),
    (lambda i, g: i.remove(["nope"]), "not in the index"),
    (lambda i, g: i.remove([str(n) for n in range(6)]), "empty index"),
    (lambda i, g: ix.Index.build(g[:0], [], metric=ix.Metric("dot")), "non-empty"),
    (lambda i, g: ix.Index.build(g, ["a"] * 5, metric=ix.Metric("dot")), "5 labels for 6"),
    (lambda i, g: ix.Index.build(g, ["a"] * 6, ["1"] * 6, metric=ix.Metric("dot")),
     "unique"),
    (lambda i, g: ix.Index.build(g * np.nan, ["a"] * 6, metric=ix.Metric("dot")), "NaN"),
    (lambda i, g: ix.Metric("manhattan"), "unknown metric"),
])
def test_bad_input_is_one_clear_error(call, match):
  g, _ = _data(6, 1, 4)
  index = ix.Index.build(g, ["a"] * 6, metric=ix.Metric("dot"))
  with pytest.raises(ValueError, match=match):
    call(index, g)


_RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from siamjax import index as ix
    index = ix.Index.load(sys.argv[1], fingerprint=sys.argv[2])
    r = index.search(np.load(sys.argv[3]), 4)
    print(json.dumps({"scores": r.scores.tolist(), "ids": r.ids.tolist(),
                      "labels": r.labels.tolist(), "metric": index.metric.kind}))
""")


def _env(**extra):
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu", **extra}


def test_save_load_in_a_fresh_process_is_identical(tmp_path):
  g, q = _data(50, 6, 8)
  index = ix.Index.build(g, np.arange(50) % 4, [f"p{i}" for i in range(50)],
                         metric=_metric("weighted_l1", 8), fingerprint="abc")
  index.save(tmp_path / "idx")
  (tmp_path / "idx" / "note.json").write_text("{}")  # another program's file in the folder
  np.save(tmp_path / "q.npy", q)
  out = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "idx"), "abc",
                        str(tmp_path / "q.npy")], capture_output=True, text=True, env=_env(),
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout)
  r = index.search(q, 4)
  assert got["scores"] == r.scores.tolist() and got["ids"] == r.ids.tolist()
  assert got["labels"] == r.labels.tolist() and got["metric"] == "weighted_l1"
  # Saving again over it keeps the other file and replaces the index.
  index.add(q, ["new"] * 6, [f"q{i}" for i in range(6)]).save(tmp_path / "idx")
  assert (tmp_path / "idx" / "note.json").exists()
  assert len(ix.Index.load(tmp_path / "idx")) == 56
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_refuses_another_models_index_and_non_indexes(tmp_path):
  g, _ = _data(5, 1, 3)
  ix.Index.build(g, ["a"] * 5, metric=ix.Metric("dot"), fingerprint="abc").save(tmp_path / "i")
  with pytest.raises(ix.IndexMismatch, match="another model"):
    ix.Index.load(tmp_path / "i", fingerprint="def")
  with pytest.raises(ValueError, match="is not an index"):
    ix.Index.load(tmp_path)
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "precious.txt").write_text("keep")
  with pytest.raises(ValueError, match="not an index; not overwriting"):
    ix.Index.build(g, ["a"] * 5, metric=ix.Metric("dot")).save(tmp_path / "folder")
  assert (tmp_path / "folder" / "precious.txt").read_text() == "keep"


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from siamjax import index as ix
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1001, 8)).astype(np.float32)
    q = rng.standard_normal((70, 8)).astype(np.float32)
    out = {"devices": jax.device_count()}
    for kind in ["squared_euclidean", "cosine"]:
      r = ix.Index.build(g, np.arange(1001) % 3, metric=ix.Metric(kind)).search(q, 7)
      out[kind] = {"indices": r.indices.tolist(), "scores": r.scores.tolist()}
    print(json.dumps(out))
""")


def test_sharded_over_four_devices_equals_one_device():
  runs = []
  for n in (1, 4):
    p = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                       timeout=120, env=_env(
                           XLA_FLAGS=_XLA + f" --xla_force_host_platform_device_count={n}"))
    assert p.returncode == 0, p.stderr[-2000:]
    runs.append(json.loads(p.stdout))
  one, four = runs
  assert (one["devices"], four["devices"]) == (1, 4)
  for kind in ("squared_euclidean", "cosine"):
    assert four[kind]["indices"] == one[kind]["indices"]
    np.testing.assert_allclose(four[kind]["scores"], one[kind]["scores"], rtol=1e-5)


def test_faiss_backends():
  faiss = pytest.importorskip("faiss")
  del faiss
  g, q = _data(2000, 20, 16)
  for kind in ("squared_euclidean", "euclidean", "cosine", "dot"):
    exact = ix.Index.build(g, np.zeros(2000), metric=ix.Metric(kind)).search(q, 5)
    flat = ix.Index.build(g, np.zeros(2000), metric=ix.Metric(kind),
                          backend="faiss_flat").search(q, 5)
    np.testing.assert_array_equal(flat.indices, exact.indices)
    np.testing.assert_allclose(flat.scores, exact.scores, rtol=1e-4, atol=1e-4)
    for backend, opts in (("faiss_hnsw", {"ef_search": 128}), ("faiss_ivf", {"nprobe": 16})):
      approx = ix.Index.build(g, np.zeros(2000), metric=ix.Metric(kind), backend=backend,
                              **opts).search(q, 5)
      recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx.indices,
                                                                  exact.indices)])
      assert recall > 0.9, (kind, backend, recall)
  with pytest.raises(ValueError, match="FAISS cannot search the weighted_l1"):
    ix.Index.build(g, np.zeros(2000), metric=_metric("weighted_l1", 16), backend="faiss_hnsw")
  with pytest.raises(ValueError, match="unknown options"):
    ix.Index.build(g, np.zeros(2000), metric=ix.Metric("dot"), backend="faiss_ivf", ef=3)


def test_faiss_index_saves_and_reloads(tmp_path):
  pytest.importorskip("faiss")
  g, q = _data(500, 3, 8)
  index = ix.Index.build(g, np.arange(500) % 5, metric=ix.Metric("cosine"),
                         backend="faiss_hnsw", m=8)
  index.save(tmp_path / "h")
  back = ix.Index.load(tmp_path / "h")
  assert back.backend == "faiss_hnsw"
  a, b = index.search(q, 3), back.search(q, 3)
  np.testing.assert_array_equal(a.indices, b.indices)
  np.testing.assert_array_equal(a.scores, b.scores)
