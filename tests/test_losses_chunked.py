"""The in-batch losses' shared contract: naive references, gradients, masks, reference
sets, half precision, memory and errors, over every loss that runs on the chunked engine."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from siamjax import distances as D
from siamjax import losses as L

RNG = np.random.default_rng(42)


def _emb(b=12, d=5, dtype=np.float32):
  return jnp.asarray(RNG.normal(size=(b, d)).astype(dtype))


def _labels(b=12, classes=4):
  return jnp.asarray(np.arange(b) % classes, jnp.int32)


DIST = {"euclidean": D.euclidean, "squared_euclidean": D.squared_euclidean,
        "cosine": D.cosine_distance}


def _naive_setup(emb, labels, distance):
  d = DIST[distance](emb[:, None, :], emb[None, :, :])
  b = emb.shape[0]
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(b, dtype=bool)
  neg = ~same
  return d, pos, neg


def naive_batch_all(emb, labels, margin=1.0, distance="euclidean"):
  d, pos, neg = _naive_setup(emb, labels, distance)
  t = jnp.maximum(d[:, :, None] - d[:, None, :] + margin, 0.0)  # [a, p, n]
  m = pos[:, :, None] & neg[:, None, :]
  count = jnp.sum(m, axis=(1, 2))
  return jnp.where(count > 0, jnp.sum(jnp.where(m, t, 0.0), axis=(1, 2)) / jnp.maximum(count, 1), 0)


def naive_batch_hard(emb, labels, margin=1.0, distance="euclidean"):
  d, pos, neg = _naive_setup(emb, labels, distance)
  hp = jnp.max(jnp.where(pos, d, -jnp.inf), axis=1)
  hn = jnp.min(jnp.where(neg, d, jnp.inf), axis=1)
  valid = jnp.any(pos, 1) & jnp.any(neg, 1)
  return jnp.where(valid, jnp.maximum(jnp.where(valid, hp - hn, 0.0) + margin, 0.0), 0.0)


def naive_semi_hard(emb, labels, margin=1.0, distance="euclidean"):
  d, pos, neg = _naive_setup(emb, labels, distance)
  d_ap, d_an = d[:, :, None], d[:, None, :]
  semi = neg[:, None, :] & (d_an > d_ap)  # [a, p, n]
  closest_semi = jnp.min(jnp.where(semi, d_an, jnp.inf), axis=2)
  farthest = jnp.max(jnp.where(neg, d, -jnp.inf), axis=1)[:, None]
  chosen = jnp.where(jnp.any(semi, axis=2), closest_semi, farthest)
  valid = pos & jnp.any(neg, axis=1)[:, None]
  per = jnp.where(valid, jnp.maximum(d - chosen + margin, 0.0), 0.0)
  n = jnp.sum(valid, axis=1)
  return jnp.where(n > 0, jnp.sum(per, axis=1) / jnp.maximum(n, 1), 0.0)


def naive_all_pairs(emb, labels, margin=1.0, distance="euclidean"):
  d, pos, neg = _naive_setup(emb, labels, distance)
  b = emb.shape[0]
  off = ~jnp.eye(b, dtype=bool)
  per = jnp.where(pos, 0.5 * d**2, 0.5 * jnp.maximum(margin - d, 0.0) ** 2)
  return jnp.sum(jnp.where(off, per, 0.0), axis=1) / max(b - 1, 1)


IN_BATCH = [
    (L.batch_all_triplet_loss, naive_batch_all),
    (L.batch_hard_triplet_loss, naive_batch_hard),
    (L.semi_hard_triplet_loss, naive_semi_hard),
    (L.all_pairs_contrastive_loss, naive_all_pairs),
]


IDS = ["batch_all", "batch_hard", "semi_hard", "all_pairs"]


@pytest.mark.slow
@pytest.mark.parametrize("fn,naive", IN_BATCH, ids=IDS)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_in_batch_matches_naive(fn, naive, distance, chunk_size):
  emb, labels = _emb(13, 6), jnp.asarray(RNG.integers(0, 4, size=13), jnp.int32)
  out = fn(emb, labels, margin=0.8, distance=distance, chunk_size=chunk_size)
  assert out.shape == (13,)
  np.testing.assert_allclose(out, naive(emb, labels, 0.8, distance), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fn,naive", IN_BATCH, ids=IDS)
def test_in_batch_gradient_matches_naive(fn, naive):
  emb, labels = _emb(12, 4), _labels(12, 3)
  g = jax.jit(jax.grad(lambda e: jnp.mean(fn(e, labels, chunk_size=5))))(emb)
  g_ref = jax.jit(jax.grad(lambda e: jnp.mean(naive(e, labels))))(emb)
  np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("fn,naive", IN_BATCH, ids=IDS)
def test_in_batch_check_grads(fn, naive):
  del naive
  with jax.enable_x64(True):
    emb = jnp.asarray(RNG.normal(size=(8, 3)) * 2.0)
    labels = _labels(8, 3)
    check_grads(lambda e: fn(e, labels, margin=0.5, chunk_size=3), (emb,), order=1, eps=1e-6,
                modes=("rev",))


@pytest.mark.slow
@pytest.mark.parametrize("fn,naive", IN_BATCH + [(L.ntxent_loss, None),
                                                 (L.in_batch_softmax_loss, None)],
                         ids=IDS + ["ntxent", "softmax"])
def test_in_batch_finite_gradients_with_duplicate_embeddings(fn, naive):
  del naive
  emb = jnp.concatenate([_emb(4, 3)] * 2)  # every embedding appears twice: distance 0
  labels = jnp.asarray([0, 1, 0, 1, 0, 1, 0, 1], jnp.int32)
  g = jax.grad(lambda e: jnp.mean(fn(e, labels)))(emb)
  assert np.all(np.isfinite(g))


def test_hand_computed_in_batch_constants():
  emb = jnp.array([[0.0], [0.5], [1.0], [3.0]])
  labels = jnp.array([0, 0, 1, 1])
  np.testing.assert_allclose(L.batch_all_triplet_loss(emb, labels), [0.25, 0.5, 2.25, 0.25])
  np.testing.assert_allclose(L.batch_hard_triplet_loss(emb, labels), [0.5, 1.0, 2.5, 0.5])
  np.testing.assert_allclose(L.semi_hard_triplet_loss(emb, labels), [0.5, 0.0, 2.0, 0.5])
  np.testing.assert_allclose(L.batch_hard_triplet_loss(emb, labels, soft=True),
                             np.log1p(np.exp([-0.5, 0.0, 1.5, -0.5])), rtol=1e-6)


def test_anchors_without_partner_get_zero_and_are_flagged():
  emb = _emb(5, 3)
  labels = jnp.array([0, 0, 1, 2, 2])  # anchor 2 has no positive
  for fn, _ in IN_BATCH[:3]:
    assert float(fn(emb, labels)[2]) == 0.0
  np.testing.assert_array_equal(L.valid_anchors(labels), [True, True, False, True, True])
  single_class = jnp.zeros(4, jnp.int32)  # no negatives anywhere
  np.testing.assert_array_equal(L.batch_hard_triplet_loss(emb[:4], single_class), 0.0)


@pytest.mark.parametrize("fn", [f for f, _ in IN_BATCH] + [L.ntxent_loss, L.in_batch_softmax_loss],
                         ids=IDS + ["ntxent", "softmax"])
def test_in_batch_jit_vmap_and_no_retrace(fn):
  emb, labels = _emb(10, 4), _labels(10, 3)
  chex.clear_trace_counter()  # the counter is keyed by code, shared across parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(e, l):
    return fn(e, l, chunk_size=4)

  first = step(emb, labels)
  np.testing.assert_allclose(first, fn(emb, labels, chunk_size=4), rtol=1e-6, atol=1e-7)
  step(emb * 2, labels)  # second call, same shapes: no retrace
  stacked = jnp.stack([emb, emb * 0.5])
  vm = jax.vmap(lambda e: fn(e, labels, chunk_size=4))(stacked)
  np.testing.assert_allclose(vm[1], fn(stacked[1], labels, chunk_size=4), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 0], ids=["default", "chunked"])
@pytest.mark.parametrize("fn", [L.batch_all_triplet_loss, L.batch_hard_triplet_loss,
                                L.semi_hard_triplet_loss])
def test_in_batch_memory_is_linear_in_batch_for_b4096_d4096(fn, budget, monkeypatch):
  """B = 4096, D = 4096: the naive [B, B, D] tensor alone would be 256 GiB. With the
  default L.FULL_BLOCK_BYTES the [B, B] Gram block is kept whole (64 MiB); with 0 every
  chunk forms its own rows."""
  if budget is not None:
    monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
  b, d = 4096, 4096
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  loss_and_grad = jax.jit(jax.value_and_grad(lambda e, l: jnp.mean(fn(e, l, chunk_size=256))))
  stats = loss_and_grad.lower(emb, labels).compile().memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no memory analysis")
  total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  assert total < 0.5 * 2**30, f"{total / 2**30:.2f} GiB"


@pytest.mark.parametrize("fn", [f for f, _ in IN_BATCH] + [L.ntxent_loss, L.in_batch_softmax_loss],
                         ids=IDS + ["ntxent", "softmax"])
def test_in_batch_bad_input(fn):
  emb, labels = _emb(6, 3), _labels(6, 2)
  with pytest.raises(ValueError, match="embeddings must have a floating dtype"):
    fn(jnp.ones((6, 3), jnp.int32), labels)
  with pytest.raises(ValueError, match="embeddings must have rank 2"):
    fn(emb[None], labels)
  with pytest.raises(ValueError, match="embeddings is empty"):
    fn(jnp.ones((0, 3)), jnp.ones((0,), jnp.int32))
  with pytest.raises(ValueError, match="labels must be integer"):
    fn(emb, labels.astype(jnp.float32))
  with pytest.raises(ValueError, match="labels has 5 entries but the embeddings have 6"):
    fn(emb, labels[:5])
  with pytest.raises(ValueError, match="chunk_size"):
    fn(emb, labels, chunk_size=0)
  if fn is not L.ntxent_loss:
    with pytest.raises(ValueError, match="distance must be"):
      fn(emb, labels, distance="manhattan")
  else:
    with pytest.raises(ValueError, match="temperature"):
      fn(emb, labels, temperature=0.0)


ALL_IN_BATCH = [L.batch_all_triplet_loss, L.batch_hard_triplet_loss, L.semi_hard_triplet_loss,
                L.all_pairs_contrastive_loss, L.ntxent_loss, L.in_batch_softmax_loss]


@pytest.mark.slow
@pytest.mark.parametrize("fn", ALL_IN_BATCH, ids=lambda f: f.__name__)
def test_valid_mask_equals_dropping_the_rows(fn):
  emb, labels = _emb(11, 4), jnp.asarray(RNG.integers(0, 3, size=11), jnp.int32)
  valid = jnp.asarray(RNG.random(11) < 0.7)
  keep = np.flatnonzero(np.asarray(valid))
  out = fn(emb, labels, valid=valid, chunk_size=4)
  np.testing.assert_allclose(out[keep], fn(emb[keep], labels[keep]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[~np.asarray(valid)], 0.0)
  g = jax.jit(jax.grad(lambda e: jnp.sum(fn(e, labels, valid=valid))))(emb)
  np.testing.assert_array_equal(g[~np.asarray(valid)], 0.0)


@pytest.mark.parametrize("fn", ALL_IN_BATCH, ids=lambda f: f.__name__)
def test_reference_set_partners_are_exactly_the_reference_rows(fn):
  # Anchor i against a reference set R equals the in-batch loss of anchor 0 in the batch
  # [a_i; R] (self excluded, every row of R a partner), so a copy of a_i in R is a positive.
  emb, labels = _emb(5, 4), jnp.asarray([0, 1, 2, 0, 1], jnp.int32)
  ref, ref_labels = jnp.concatenate([_emb(6, 4), emb[:2]]), jnp.asarray([0, 0, 1, 1, 2, 1, 0, 1])
  ref_valid = jnp.asarray([True] * 5 + [False, True, True])
  out = fn(emb, labels, ref_embeddings=ref, ref_labels=ref_labels, ref_valid=ref_valid,
           chunk_size=2)
  keep = np.flatnonzero(np.asarray(ref_valid))
  want = [fn(jnp.concatenate([emb[i:i + 1], ref[keep]]),
             jnp.concatenate([labels[i:i + 1], ref_labels[keep]]),
             anchor_indices=jnp.array([0]))[0] for i in range(5)]
  # atol: the copy's Gram-matrix distance is sqrt(rounding) ~ 1e-3, not exactly 0
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def _naive_ref_exclude_loss(fn, emb, labels, ref, ref_labels, ref_valid, ref_exclude):
  """Anchor by anchor: the reference set with that anchor's excluded row masked out."""
  idx = jnp.arange(ref.shape[0])
  return jnp.stack([
      fn(emb[i:i + 1], labels[i:i + 1], ref_embeddings=ref, ref_labels=ref_labels,
         ref_valid=ref_valid & (idx != ref_exclude[i]))[0] for i in range(emb.shape[0])])


@pytest.mark.slow
@pytest.mark.parametrize("fn", ALL_IN_BATCH + [L.multi_similarity_loss, L.circle_loss,
                                               L.lifted_structure_loss],
                         ids=lambda f: f.__name__)
def test_ref_exclude_equals_a_per_anchor_reference_mask(fn):
  # float64: the one call centres on the mean of all valid rows, the naive one on each
  # anchor's own; distances agree up to rounding of the Gram products only
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(size=(6, 3)))
    labels = jnp.asarray([0, 1, 2, 0, 1, 1], jnp.int32)
    ref = jnp.concatenate([jnp.asarray(rng.normal(size=(5, 3))), emb])  # copies at 5..10
    ref_labels = jnp.concatenate([jnp.asarray([0, 0, 1, 2, 1], jnp.int32), labels])
    ref_valid = jnp.asarray([True, True, False] + [True] * 8)
    ref_exclude = jnp.asarray([5, 6, -1, 8, 2, 10], jnp.int32)  # own copies, none, invalid
    kw = dict(ref_embeddings=ref, ref_labels=ref_labels, ref_valid=ref_valid)

    def total(e, **extra):
      return fn(e, labels, **kw, ref_exclude=ref_exclude, chunk_size=4, **extra)

    want = _naive_ref_exclude_loss(fn, emb, labels, ref, ref_labels, ref_valid, ref_exclude)
    np.testing.assert_allclose(total(emb), want, rtol=1e-9, atol=1e-12)
    g_want = jax.grad(lambda e: jnp.sum(_naive_ref_exclude_loss(
        fn, e, labels, ref, ref_labels, ref_valid, ref_exclude)))(emb)
    np.testing.assert_allclose(jax.grad(lambda e: jnp.sum(total(e)))(emb), g_want,
                               rtol=1e-8, atol=1e-10)
    # indexed like embeddings: anchor k drops ref_exclude[anchor_indices[k]]
    rows = jnp.asarray([4, 0, 4])
    np.testing.assert_allclose(jax.jit(lambda e: total(e, anchor_indices=rows))(emb),
                               want[rows], rtol=1e-9, atol=1e-12)
    # and valid_anchors agrees on which anchors carry a loss
    need = {L.in_batch_softmax_loss: "positive", L.all_pairs_contrastive_loss: "any",
            L.multi_similarity_loss: "any", L.lifted_structure_loss: "any"}.get(fn, "both")
    carry = L.valid_anchors(labels, need=need, ref_labels=ref_labels, ref_valid=ref_valid,
                            ref_exclude=ref_exclude)
    idx = jnp.arange(ref.shape[0])
    for i in range(6):
      one = L.valid_anchors(labels[i:i + 1], need=need, ref_labels=ref_labels,
                            ref_valid=ref_valid & (idx != ref_exclude[i]))
      assert bool(carry[i]) == bool(one[0])


def test_ref_exclude_drops_the_named_row_only():
  # anchor 0's copy is reference row 1: excluded, it is no longer a zero-distance positive
  emb = jnp.array([[0.0], [2.0]])
  ref, ref_labels = jnp.array([[1.0], [0.0], [2.0]]), jnp.array([0, 0, 1])
  out = L.all_pairs_contrastive_loss(emb, jnp.array([0, 1]), ref_embeddings=ref,
                                     ref_labels=ref_labels, ref_exclude=jnp.array([1, -1]),
                                     margin=1.5)
  # anchor 0: positive at d = 1 (1/2 d^2), negative at d = 2 (0), its copy left out;
  # anchor 1: negatives at d = 1 (1/2 (1.5 - 1)^2) and d = 2 (0), its copy (0), all in
  np.testing.assert_allclose(out, [0.5 / 2, 0.125 / 3], rtol=1e-6)
  np.testing.assert_array_equal(
      L.valid_anchors(jnp.array([0, 1, 2]), ref_labels=jnp.array([0, 0, 1, 3]),
                      ref_exclude=jnp.array([0, 2, -1])), [True, False, False])


@pytest.mark.parametrize("fn", ALL_IN_BATCH + [L.multi_similarity_loss, L.circle_loss,
                                               L.lifted_structure_loss],
                         ids=lambda f: f.__name__)
def test_ref_exclude_bad_input(fn):
  emb, labels = _emb(4, 3), _labels(4, 2)
  kw = dict(ref_embeddings=_emb(5, 3), ref_labels=_labels(5, 2))
  with pytest.raises(ValueError, match="ref_exclude was given without ref_embeddings"):
    fn(emb, labels, ref_exclude=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="ref_exclude must be integer"):
    fn(emb, labels, **kw, ref_exclude=jnp.zeros(4))
  with pytest.raises(ValueError, match="ref_exclude has 3 entries but there are 4 rows"):
    fn(emb, labels, **kw, ref_exclude=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="ref_exclude must have rank 1"):
    fn(emb, labels, **kw, ref_exclude=jnp.zeros((4, 1), jnp.int32))
  for bad in (5, -2):
    with pytest.raises(ValueError, match=rf"rows in \[0, 5\) or -1 for none, found \[{bad}\]"):
      fn(emb, labels, **kw, ref_exclude=jnp.asarray([0, bad, -1, 4], jnp.int32))


def test_valid_anchors_ref_exclude_bad_input():
  labels = jnp.array([0, 1])
  with pytest.raises(ValueError, match="ref_valid/ref_exclude were given without ref_labels"):
    L.valid_anchors(labels, ref_exclude=jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"rows in \[0, 3\) or -1 for none, found \[3\]"):
    L.valid_anchors(labels, ref_labels=jnp.array([0, 1, 1]), ref_exclude=jnp.array([3, 0]))


ALL_WITH_NEW = ALL_IN_BATCH + [L.multi_similarity_loss, L.circle_loss, L.lifted_structure_loss]


ON_DISTANCE = [f for f in ALL_WITH_NEW if f not in (L.ntxent_loss, L.circle_loss)]


@pytest.mark.slow
@pytest.mark.parametrize("fn", ALL_WITH_NEW, ids=lambda f: f.__name__)
def test_every_loss_is_finite_in_float16_up_to_1e4(fn):
  emb = jnp.asarray(RNG.uniform(-1e4, 1e4, size=(12, 4)), jnp.float16)
  labels = _labels(12, 3)
  for distance in (["euclidean", "squared_euclidean", "cosine"] if fn in ON_DISTANCE
                   else [None]):
    kw = {} if distance is None else {"distance": distance}
    out = fn(emb, labels, **kw)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    want = fn(emb.astype(jnp.float32), labels, **kw)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    if distance != "squared_euclidean":  # its true gradient (~1e5) exceeds float16's range
      g = jax.grad(lambda e: jnp.sum(fn(e, labels, **kw)))(emb)  # noqa: B023
      assert g.dtype == jnp.float16 and np.all(np.isfinite(g.astype(np.float32)))


def test_batch_hard_is_accurate_with_a_large_shared_offset():
  u = RNG.normal(size=16)
  x = 1e3 * u / np.linalg.norm(u) + RNG.normal(size=(24, 16))
  labels = _labels(24, 6)
  with jax.enable_x64(True):
    want = naive_batch_hard(jnp.asarray(x), labels)  # float64, the direct formula
  out = L.batch_hard_triplet_loss(jnp.asarray(x, jnp.float32), labels, chunk_size=5)
  np.testing.assert_allclose(out, want, atol=1e-3)  # was off by 0.04


@pytest.mark.slow
@pytest.mark.parametrize("fn", ALL_WITH_NEW, ids=lambda f: f.__name__)
def test_anchor_indices_out_of_range_raise(fn):
  emb, labels = _emb(6, 3), _labels(6, 2)
  for bad in ([0, 6], [-1, 2]):  # used to be clamped: row 6 became row 5, its own positive
    with pytest.raises(ValueError, match=r"anchor_indices must be rows in \[0, 6\)"):
      fn(emb, labels, anchor_indices=jnp.array(bad))
  out = fn(emb, labels, anchor_indices=np.array([5, 0]))
  np.testing.assert_allclose(out, fn(emb, labels)[np.array([5, 0])], rtol=1e-6)


@pytest.mark.parametrize("fn", ALL_WITH_NEW, ids=lambda f: f.__name__)
def test_chunk_size_accepts_numpy_integers(fn):
  emb, labels = _emb(9, 3), _labels(9, 3)
  np.testing.assert_allclose(fn(emb, labels, chunk_size=np.int64(4)),
                             fn(emb, labels, chunk_size=4), rtol=1e-6)
  for bad in (True, 2.0, np.int64(0)):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
      fn(emb, labels, chunk_size=bad)


NEEDS = [(L.batch_all_triplet_loss, "both"), (L.batch_hard_triplet_loss, "both"),
         (L.semi_hard_triplet_loss, "both"), (L.ntxent_loss, "both"), (L.circle_loss, "both"),
         (L.in_batch_softmax_loss, "positive"), (L.all_pairs_contrastive_loss, "any"),
         (L.multi_similarity_loss, "any"), (L.lifted_structure_loss, "any")]


@pytest.mark.parametrize("fn,need", NEEDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("labels", [[0, 0, 0, 0, 0], [0, 0, 1, 2, 2], [0, 1, 2, 3, 4]],
                         ids=["one_class", "mixed", "all_singletons"])
def test_valid_anchors_recipe_counts_exactly_the_anchors_with_a_loss(fn, need, labels):
  # The module docstring's sum(loss) / sum(valid_anchors(labels, need=...)) is the mean over
  # the anchors that carry a loss only if every anchor outside the mask has loss 0 (it used
  # to fail for all_pairs_contrastive_loss and, with one class, in_batch_softmax_loss).
  emb, labels = 0.3 * _emb(5, 3), jnp.asarray(labels, jnp.int32)  # within the margins
  mask = np.asarray(L.valid_anchors(labels, need=need))
  out = np.asarray(fn(emb, labels))
  np.testing.assert_array_equal(out[~mask], 0.0)
  valid = jnp.asarray([True, True, False, True, True])
  mask = np.asarray(L.valid_anchors(labels, need=need, valid=valid))
  np.testing.assert_array_equal(np.asarray(fn(emb, labels, valid=valid))[~mask], 0.0)


@pytest.mark.parametrize("fn", [L.multi_similarity_loss, L.circle_loss, L.lifted_structure_loss,
                                L.batch_hard_triplet_loss], ids=lambda f: f.__name__)
def test_memory_stays_linear_with_a_reference_set(fn):
  """B = 4096 anchors against R = 8192 reference rows (a cross-batch memory), D = 1024."""
  b, r, d = 4096, 8192, 1024
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  ref = jax.ShapeDtypeStruct((r, d), jnp.float32)
  ref_labels = jax.ShapeDtypeStruct((r,), jnp.int32)

  def loss(e, lab, m, m_lab):
    return jnp.mean(fn(e, lab, ref_embeddings=jax.lax.stop_gradient(m), ref_labels=m_lab))

  stats = jax.jit(jax.value_and_grad(loss)).lower(emb, labels, ref, ref_labels).compile()
  stats = stats.memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no memory analysis")
  total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  assert total < 0.25 * 2**30, f"{total / 2**30:.2f} GiB"  # [B, R] alone would be 0.125 GiB


@pytest.mark.parametrize("fn", ALL_WITH_NEW, ids=lambda f: f.__name__)
def test_mask_and_reference_bad_input(fn):
  emb, labels = _emb(6, 3), _labels(6, 2)
  with pytest.raises(ValueError, match="valid must be a bool mask"):
    fn(emb, labels, valid=jnp.ones(6, jnp.int32))
  with pytest.raises(ValueError, match="valid has 5 entries but there are 6 rows"):
    fn(emb, labels, valid=jnp.ones(5, bool))
  with pytest.raises(ValueError, match="ref_labels is required"):
    fn(emb, labels, ref_embeddings=emb)
  with pytest.raises(ValueError, match="without ref_embeddings"):
    fn(emb, labels, ref_labels=labels)
  with pytest.raises(ValueError, match="ref_embeddings must have the embeddings' size D = 3"):
    fn(emb, labels, ref_embeddings=_emb(4, 2), ref_labels=labels[:4])
  with pytest.raises(ValueError, match="ref_labels has 5 entries but the embeddings have 4"):
    fn(emb, labels, ref_embeddings=_emb(4, 3), ref_labels=labels[:5])
  with pytest.raises(ValueError, match="ref_valid has 3 entries but there are 4 rows"):
    fn(emb, labels, ref_embeddings=_emb(4, 3), ref_labels=labels[:4],
       ref_valid=jnp.ones(3, bool))


def test_valid_anchors_with_a_reference_set():
  labels = jnp.array([0, 1, 2])
  ref_labels = jnp.array([0, 0, 1, 3])
  np.testing.assert_array_equal(L.valid_anchors(labels, ref_labels=ref_labels),
                                [True, True, False])
  np.testing.assert_array_equal(
      L.valid_anchors(labels, ref_labels=ref_labels, ref_valid=jnp.array([1, 1, 0, 1], bool)),
      [True, False, False])
  np.testing.assert_array_equal(L.valid_anchors(labels, need="positive", ref_labels=ref_labels),
                                [True, True, False])
  np.testing.assert_array_equal(L.valid_anchors(labels, need="any", ref_labels=ref_labels),
                                [True, True, True])
