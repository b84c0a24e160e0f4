"""siamjax.evaluation.retrieval_metrics against a naive NumPy ranking and PML's AccuracyCalculator.

The comparisons run in float64 (``jax.enable_x64``) on random embeddings, where no two
distances of a row tie, so every ranking is unique; ties are tested apart, on duplicate
rows and on small-integer embeddings whose float32 distances are exact.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from siamjax.evaluation import recall_at_1, retrieval_metrics

METRICS = ("precision_at_1", "r_precision", "map_at_r", "mrr")


def _distances(q, r, distance):
  q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
  if distance == "cosine":
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    return 1.0 - qn @ rn.T
  sq = np.sum(np.square(q[:, None, :] - r[None, :, :]), axis=-1)  # the direct formula
  return sq if distance == "squared_euclidean" else np.sqrt(sq)


def naive_metrics(q, ql, r=None, rl=None, *, k=(1, 5, 10), distance="euclidean"):
  """One query at a time: sort the candidates by (distance, index), read the metrics off."""
  self_retrieval = r is None
  if self_retrieval:
    r, rl = q, ql
  d = _distances(q, r, distance)
  firsts, rprec, ap = [], [], []
  lone = 0
  for i in range(len(q)):
    cand = np.array([j for j in range(len(r)) if not (self_retrieval and j == i)])
    order = cand[np.lexsort((cand, d[i, cand]))]
    rel = np.asarray(rl)[order] == ql[i]
    n_rel = int(rel.sum())
    if n_rel == 0:
      lone += 1
      continue
    firsts.append(int(np.argmax(rel)) + 1)
    top = rel[:n_rel]
    rprec.append(top.sum() / n_rel)
    precision = np.cumsum(top) / np.arange(1, n_rel + 1)
    ap.append(np.sum(precision * top) / n_rel)
  firsts = np.array(firsts)
  if not len(firsts):
    return {"n_lone_queries": lone}
  out = {"precision_at_1": np.mean(firsts == 1), "r_precision": np.mean(rprec),
         "map_at_r": np.mean(ap), "mrr": np.mean(1.0 / firsts), "n_lone_queries": lone}
  out.update({f"recall_at_{v}": np.mean(firsts <= v) for v in k})
  return out


def _data(seed, n, d=8, n_classes=7, singletons=2):
  """Irregular class sizes (drawn at random) plus ``singletons`` classes of one member."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, n_classes, n - singletons)
  labels = np.concatenate([labels, n_classes + np.arange(singletons)])
  rng.shuffle(labels)
  return rng.normal(size=(n, d)), labels.astype(np.int32)


def _assert_same(got, want):
  assert got.keys() == want.keys()
  for key, v in want.items():
    if key == "n_lone_queries":
      assert got[key] == v
    else:
      np.testing.assert_allclose(got[key], v, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_self_retrieval_matches_naive(seed, distance):
  emb, labels = _data(seed, 53)
  with jax.enable_x64(True):
    got = retrieval_metrics(jnp.asarray(emb), jnp.asarray(labels), distance=distance,
                            chunk_size=16)  # 16 does not divide 53
  want = naive_metrics(emb, labels, distance=distance)
  assert got["n_lone_queries"] >= 2  # the singleton classes (and any drawn once)
  _assert_same(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_separate_reference_matches_naive(seed, distance):
  q, ql = _data(seed, 29, n_classes=9, singletons=0)
  r, rl = _data(seed + 100, 41, n_classes=7, singletons=3)
  rl = np.where(rl >= 7, rl + 100, rl)  # reference-only singletons; query classes 7, 8: lone
  with jax.enable_x64(True):
    got = retrieval_metrics(jnp.asarray(q), jnp.asarray(ql), jnp.asarray(r), jnp.asarray(rl),
                            k=(1, 3, 41), distance=distance, chunk_size=8)
  want = naive_metrics(q, ql, r, rl, k=(1, 3, 41), distance=distance)
  assert got["n_lone_queries"] == int(np.sum(ql >= 7)) > 0
  assert got["recall_at_41"] == 1.0  # every relevant item is within the whole set
  _assert_same(got, want)


def test_chunk_size_does_not_change_the_result():
  emb, labels = _data(3, 37)
  with jax.enable_x64(True):
    results = [retrieval_metrics(jnp.asarray(emb), jnp.asarray(labels), chunk_size=c)
               for c in (1, 5, 36, 37, 1000)]
  for r in results[1:]:
    assert r == results[0]


def test_float32_default_path_matches_naive():
  emb, labels = _data(4, 40, d=16)
  got = retrieval_metrics(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), chunk_size=7)
  want = naive_metrics(emb.astype(np.float32), labels)
  for key, v in want.items():
    np.testing.assert_allclose(got[key], v, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_ties_rank_by_index_on_exact_integer_distances(dtype):
  """Small-integer embeddings, symmetric about 0: float32 distances are exact and tie a lot;
  the result must equal the (distance, index) order of the naive ranking."""
  rng = np.random.default_rng(5)
  half = rng.integers(-2, 3, size=(30, 3)).astype(np.float64)
  emb = np.concatenate([half, -half])  # the mean is exactly 0
  labels = rng.integers(0, 4, size=60).astype(np.int32)
  for distance in ("euclidean", "squared_euclidean"):
    got = retrieval_metrics(jnp.asarray(emb, dtype), jnp.asarray(labels), k=(1, 2, 7),
                            distance=distance, chunk_size=11)
    want = naive_metrics(emb, labels, k=(1, 2, 7), distance=distance)
    for key, v in want.items():
      np.testing.assert_allclose(got[key], v, rtol=1e-6, err_msg=f"{distance} {key}")


def test_duplicates_of_a_query_are_candidates():
  """Self-retrieval leaves out the query's own row only: an exact copy elsewhere is found
  at distance 0; with a separate reference set, the query's copy is a relevant item."""
  emb = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
  labels = np.array([0, 0, 1, 1])
  m = retrieval_metrics(jnp.asarray(emb), jnp.asarray(labels), k=1)
  assert m["precision_at_1"] == 0.5 and m["n_lone_queries"] == 0  # 0, 1 find each other
  np.testing.assert_allclose(m["mrr"], (1 + 1 + 1 / 3 + 1 / 3) / 4)
  ref = retrieval_metrics(jnp.asarray(emb[:1]), jnp.asarray(labels[:1]), jnp.asarray(emb),
                          jnp.asarray(labels), k=(1, 4))
  assert ref["precision_at_1"] == 1.0 and ref["r_precision"] == 1.0  # R = 2: rows 0 and 1


def test_lone_queries_are_left_out():
  emb = np.array([[0.0], [0.1], [5.0], [9.0]])
  m = retrieval_metrics(jnp.asarray(emb), jnp.array([0, 0, 1, 2]), k=1)
  assert m == {"precision_at_1": 1.0, "recall_at_1": 1.0, "r_precision": 1.0,
               "map_at_r": 1.0, "mrr": 1.0, "n_lone_queries": 2}
  none = retrieval_metrics(jnp.asarray(emb), jnp.array([0, 1, 2, 3]), k=1)
  assert none["n_lone_queries"] == 4
  assert all(np.isnan(none[key]) for key in METRICS + ("recall_at_1",))
  other = retrieval_metrics(jnp.asarray(emb), jnp.array([0, 0, 1, 2]), jnp.asarray(emb),
                            jnp.array([5, 5, 5, 5]), k=2)
  assert other["n_lone_queries"] == 4


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_shared_offset_keeps_the_ranking(offset):
  """float32 embeddings 1e3-1e4 away from the origin: the naive float64 ranking of the same
  values (without centring, the Gram form's rounding reorders neighbours here)."""
  emb, labels = _data(6, 50)
  u = np.random.default_rng(7).normal(size=emb.shape[1])
  x = (emb + offset * u).astype(np.float32)
  got = retrieval_metrics(jnp.asarray(x), jnp.asarray(labels))
  want = naive_metrics(x.astype(np.float64), labels)
  for key in METRICS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_takes_numpy_inputs_and_any_int_types():
  emb, labels = _data(8, 20)
  a = retrieval_metrics(emb.astype(np.float32), labels, k=[5, 1])
  b = retrieval_metrics(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), k=(1, 5),
                        chunk_size=np.int64(4))
  assert a == b and list(a)[:3] == ["precision_at_1", "recall_at_1", "recall_at_5"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=np.zeros((4,))), "query must have rank 2"),
    (dict(query=np.zeros((0, 2))), "query is empty"),
    (dict(query=np.zeros((4, 2), np.int32)), "query must have a floating dtype"),
    (dict(query=np.full((4, 2), np.nan)), "query must be finite"),
    (dict(query_labels=np.zeros(3, np.int32)), "query_labels has 3 entries"),
    (dict(query_labels=np.zeros(4)), "query_labels must be integer"),
    (dict(reference=np.zeros((5, 2))), "reference and reference_labels go together"),
    (dict(reference=np.zeros((5, 3)), reference_labels=np.zeros(5, np.int32)),
     "same embedding size D"),
    (dict(reference=np.zeros((5, 2)), reference_labels=np.zeros(4, np.int32)),
     "reference_labels has 4 entries"),
    (dict(k=0), "k must be >= 1"),
    (dict(k=(1, 4)), r"k=4 exceeds the 3 reference items"),
    (dict(k=(1.5,)), "k must hold ints"),
    (dict(k="a"), "k must hold ints"),
    (dict(k=None), "k must be an int or a sequence"),
    (dict(distance="l1"), "distance must be"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=2.0), "chunk_size must be a positive int"),
])
def test_bad_input_raises_value_error(kwargs, match):
  args = dict(query=np.random.default_rng(0).normal(size=(4, 2)),
              query_labels=np.array([0, 0, 1, 1], np.int32), k=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    retrieval_metrics(**args)


# ----------------------------------------------------------------------------- PML


def _pml(q, ql, r=None, rl=None, *, distance="euclidean"):
  """PML's AccuracyCalculator with an exact float64 k-NN over every item (``k=None``)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  from pytorch_metric_learning.utils.inference import CustomKNN

  dist = {"euclidean": LpDistance(normalize_embeddings=False),
          "squared_euclidean": LpDistance(normalize_embeddings=False, power=2),
          "cosine": CosineSimilarity()}[distance]
  knn = CustomKNN(dist)

  def knn64(query, k, reference, ref_includes_query=False):  # get_accuracy casts to float32
    return knn(query.double(), k, reference.double(), ref_includes_query)

  calc = AccuracyCalculator(
      include=("precision_at_1", "r_precision", "mean_average_precision_at_r",
               "mean_reciprocal_rank"),
      avg_of_avgs=False, k=None, device=torch.device("cpu"), knn_func=knn64)
  to_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
  got = calc.get_accuracy(to_t(q.astype(np.float32)), to_t(ql), to_t(
      None if r is None else r.astype(np.float32)), to_t(rl))
  return {"precision_at_1": got["precision_at_1"], "r_precision": got["r_precision"],
          "map_at_r": got["mean_average_precision_at_r"], "mrr": got["mean_reciprocal_rank"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("separate", [False, True])
def test_matches_pml_accuracy_calculator(seed, distance, separate):
  q, ql = _data(seed, 61, n_classes=6, singletons=3)
  r, rl = (None, None) if not separate else _data(seed + 50, 47, n_classes=8, singletons=0)
  want = _pml(q, ql, r, rl, distance=distance)
  q32 = q.astype(np.float32).astype(np.float64)  # the values PML saw
  r32 = None if r is None else r.astype(np.float32).astype(np.float64)
  with jax.enable_x64(True):
    got = retrieval_metrics(jnp.asarray(q32), jnp.asarray(ql),
                            None if r is None else jnp.asarray(r32),
                            None if rl is None else jnp.asarray(rl),
                            distance=distance, chunk_size=13)
  for key in METRICS:  # PML averages the reciprocal ranks in float32, the others in float64
    tol = 1e-6 if key == "mrr" else 1e-12
    np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=key)
  # PML leaves the same queries out: the singletons, or labels absent from the reference.
  lone = naive_metrics(q32, ql, r32, rl, distance=distance)["n_lone_queries"]
  assert got["n_lone_queries"] == lone > 0


def test_memory_grows_with_the_chunk_not_the_query_count():
  """Compiled (not run) for Q = N = 100,000: the temporaries stay O(chunk_size * N), far
  below the 37 GiB of one [Q, N] float32 matrix."""
  from siamjax.evaluation.retrieval import _query_stats

  n, d, chunk = 100_000, 64, 256
  spec = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
  args = (spec(n, d), spec(n, dt=jnp.int32), spec(n, d), spec(n, dt=jnp.int32),
          spec(n, dt=jnp.int32))
  mem = _query_stats.lower(*args, self_retrieval=True, top=1024, distance="euclidean",
                           chunk=chunk).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend gives no memory analysis")
  assert mem.temp_size_in_bytes < 32 * chunk * n + 4 * n * d  # measured: 19 B per entry


def test_recall_at_1_against_brute_force():
  rng = np.random.default_rng(8)
  emb = rng.normal(size=(50, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 50)
  d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  expected = np.mean(labels[d.argmin(1)] == labels)
  got = recall_at_1(jnp.asarray(emb), jnp.asarray(labels), chunk_size=7)
  assert float(got) == pytest.approx(expected)


def test_recall_at_1_counts_lone_queries_as_misses_unlike_retrieval_metrics():
  rng = np.random.default_rng(9)
  emb = rng.normal(size=(40, 4)).astype(np.float32) + 100.0  # a shared offset too
  labels = np.concatenate([rng.integers(0, 5, 37), [7, 8, 9]])  # three lone labels
  d = ((emb[:, None].astype(np.float64) - emb[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  hits = labels[d.argmin(1)] == labels
  got = float(recall_at_1(jnp.asarray(emb), jnp.asarray(labels), chunk_size=6))
  assert got == pytest.approx(np.mean(hits))
  m = retrieval_metrics(jnp.asarray(emb), jnp.asarray(labels))
  assert m["n_lone_queries"] == 3
  assert m["precision_at_1"] == pytest.approx(got * 40 / 37)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    recall_at_1(jnp.asarray(emb), jnp.asarray(labels), chunk_size=0)
  with pytest.raises(ValueError, match="labels has 3 entries"):
    recall_at_1(jnp.asarray(emb), jnp.asarray(labels[:3]))
