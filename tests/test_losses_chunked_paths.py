"""The in-batch losses' two evaluation paths (``losses.FULL_BLOCK_BYTES``) agree.

Below the budget the ``[A, R]`` Gram block is formed once and kept for the backward pass;
above it every chunk forms its rows again in the backward pass. Both must give the same
values and gradients (float32 rounding apart) with every option of the losses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from siamjax import losses as L

RNG = np.random.default_rng(7)

IN_BATCH = [L.batch_all_triplet_loss, L.batch_hard_triplet_loss, L.semi_hard_triplet_loss,
            L.all_pairs_contrastive_loss, L.ntxent_loss, L.in_batch_softmax_loss,
            L.multi_similarity_loss, L.circle_loss, L.lifted_structure_loss]
WITH_DISTANCE = [L.batch_all_triplet_loss, L.batch_hard_triplet_loss, L.semi_hard_triplet_loss,
                 L.all_pairs_contrastive_loss, L.in_batch_softmax_loss,
                 L.multi_similarity_loss, L.lifted_structure_loss]


def _name(f):
  return f.__name__


def _both_paths(monkeypatch, fn, labels, emb, **kw):
  """``_weighted(fn, labels, **kw)(emb)`` with the one-block path forced, then with the
  chunked path forced. Each path gets a program of its own: a jitted function keeps the
  path of its first trace when the budget changes afterwards."""
  out = []
  for budget in (2**62, 0):
    monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
    out.append(_weighted(fn, labels, **kw)(emb))
  return out


def _weighted_sum(out):
  """``(sum w * out, out)`` with unequal weights per anchor: an objective whose gradient
  tells the anchors apart (``jax.value_and_grad(..., has_aux=True)``)."""
  return jnp.sum(out * jnp.arange(1.0, out.shape[0] + 1.0)), out


def _weighted(fn, labels, **kw):
  """``e -> (loss, d(sum w * loss)/de)``, jitted (:func:`_weighted_sum`).

  A new program on every call (a new function to trace), so it sees the current
  ``FULL_BLOCK_BYTES`` and ``POSITIVE_SLOTS``."""
  def objective(e):
    return _weighted_sum(fn(e, labels, **kw))
  return jax.jit(lambda e: jax.value_and_grad(objective, has_aux=True)(e))


def _assert_same(whole, chunked):
  (_, out_w), g_w = whole
  (_, out_c), g_c = chunked
  np.testing.assert_allclose(out_w, out_c, rtol=1e-5, atol=1e-6)
  # float32 rounding of sums whose terms reach max |g| (the weights go up to B)
  np.testing.assert_allclose(g_w, g_c, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(g_c).max()))


@pytest.mark.parametrize("fn", IN_BATCH, ids=_name)
@pytest.mark.parametrize("chunk_size", [5, 256])
def test_one_block_and_chunked_paths_agree(monkeypatch, fn, chunk_size):
  emb = jnp.asarray(RNG.normal(size=(13, 6)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 4, size=13), jnp.int32)
  _assert_same(*_both_paths(monkeypatch, fn, labels, emb, chunk_size=chunk_size))


@pytest.mark.parametrize("fn", WITH_DISTANCE, ids=_name)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_paths_agree_for_every_distance(monkeypatch, fn, distance):
  emb = jnp.asarray(RNG.normal(size=(12, 5)), jnp.float32)
  labels = jnp.asarray(np.arange(12) % 3, jnp.int32)
  _assert_same(*_both_paths(monkeypatch, fn, labels, emb, distance=distance, chunk_size=5))


@pytest.mark.slow
@pytest.mark.parametrize("fn", IN_BATCH, ids=_name)
def test_paths_agree_with_valid_anchor_indices_and_a_reference_set(monkeypatch, fn):
  emb = jnp.asarray(RNG.normal(size=(10, 4)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 3, size=10), jnp.int32)
  valid = jnp.asarray(RNG.random(10) < 0.8)
  rows = jnp.asarray([7, 1, 1, 4, 9, 0, 2], jnp.int32)
  _assert_same(*_both_paths(monkeypatch, fn, labels, emb, valid=valid, chunk_size=3))
  _assert_same(*_both_paths(monkeypatch, fn, labels, emb, anchor_indices=rows, chunk_size=3))
  ref = jnp.concatenate([emb, jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)])
  ref_labels = jnp.concatenate([labels, jnp.asarray(RNG.integers(0, 3, size=6), jnp.int32)])
  kw = dict(ref_embeddings=ref, ref_labels=ref_labels,
            ref_valid=jnp.asarray(RNG.random(16) < 0.9), ref_exclude=jnp.arange(10),
            chunk_size=4)
  _assert_same(*_both_paths(monkeypatch, fn, labels, emb, **kw))


@pytest.mark.parametrize("fn", [L.batch_hard_triplet_loss, L.ntxent_loss, L.circle_loss,
                                L.in_batch_softmax_loss], ids=_name)
def test_paths_agree_at_distance_zero(monkeypatch, fn):
  base = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  emb = jnp.concatenate([base, base])  # every embedding twice: distances of exactly 0
  labels = jnp.asarray([0, 1, 2, 0, 0, 1, 2, 1], jnp.int32)
  whole, chunked = _both_paths(monkeypatch, fn, labels, emb, chunk_size=3)
  assert bool(jnp.all(jnp.isfinite(whole[1])))
  _assert_same(whole, chunked)


# circle_loss holds its weights constant (stop_gradient), so its gradient is by design not
# the numerical derivative; the agreement tests above cover it. The paths taken in turn:
# each loss's two paths agree in values and gradients (above), so either one's check holds
# for both.
@pytest.mark.parametrize("fn,budget", [
    (f, (2**62, 0)[i % 2]) for i, f in enumerate(f for f in IN_BATCH if f is not L.circle_loss)],
    ids=lambda x: getattr(x, "__name__", {2**62: "one_block", 0: "chunked"}.get(x)))
def test_check_grads_on_both_paths_float64(monkeypatch, fn, budget):
  monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
  with jax.enable_x64(True):
    emb = jnp.asarray(RNG.normal(size=(8, 3)) * 1.5)
    labels = jnp.asarray(np.arange(8) % 3, jnp.int32)
    check_grads(lambda e: fn(e, labels, chunk_size=3), (emb,), order=1, eps=1e-6,
                modes=("rev",))


@pytest.mark.parametrize("budget", [2**62, 0], ids=["one_block", "chunked"])
def test_check_grads_float32_with_coincident_rows(monkeypatch, budget):
  """float32 and two rows at distance 0 from each other (a smooth loss there)."""
  monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
  base = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)
  emb = jnp.concatenate([base, base[:1]])
  labels = jnp.asarray([0, 1, 2, 0], jnp.int32)
  check_grads(lambda e: L.in_batch_softmax_loss(e, labels, chunk_size=3), (emb,), order=1,
              eps=1e-2, atol=2e-2, rtol=2e-2, modes=("rev",))


def _count_dots(fn, b, budget, monkeypatch, **kw):
  monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
  emb = jnp.zeros((b, 8), jnp.float32)
  labels = jnp.arange(b) // 2
  grad = jax.grad(lambda e: jnp.mean(fn(e, labels, **kw)))
  return str(jax.make_jaxpr(grad)(emb)).count("dot_general")


@pytest.mark.parametrize("fn", [L.circle_loss, L.ntxent_loss], ids=_name)
def test_one_block_path_forms_the_gram_block_once(monkeypatch, fn):
  """Three products for loss + gradient (one forward, two backward); the chunked path has
  a fourth, the forward product formed again in the backward pass."""
  assert _count_dots(fn, 32, 2**62, monkeypatch, chunk_size=8) == 3
  assert _count_dots(fn, 32, 0, monkeypatch, chunk_size=8) == 4
  assert _count_dots(fn, 32, 0, monkeypatch, chunk_size=32) == 3  # one chunk: no recompute


@pytest.mark.parametrize("kw", [{}, {"ref": True}, {"anchor_indices": True}],
                         ids=["batch", "reference", "anchor_indices"])
def test_batch_hard_gradient_needs_no_gram_product(monkeypatch, kw):
  """Batch-hard mines its two partners on undifferentiated distances: one product (the
  forward Gram block) on every path, none in the backward pass."""
  if kw.get("ref"):
    ref = jnp.ones((20, 8), jnp.float32)
    kw = dict(ref_embeddings=ref, ref_labels=jnp.arange(20) // 2)
  elif kw:
    kw = dict(anchor_indices=jnp.arange(0, 32, 3))
  for budget, chunk in ((2**62, 8), (0, 8), (0, 32)):
    assert _count_dots(L.batch_hard_triplet_loss, 32, budget, monkeypatch, chunk_size=chunk,
                       **kw) == 1


def test_default_budget_admits_b4096_float32_only():
  assert 4096 * 4096 * 4 <= L.FULL_BLOCK_BYTES < 4096 * 8192 * 4


# -------------------------------------------------------------------------------------
# max_positives: the direct O(P * B) path of batch-all and semi-hard
# -------------------------------------------------------------------------------------

MINED = [L.batch_all_triplet_loss, L.semi_hard_triplet_loss]


def _pk_batch(p=6, k=4, d=5, ties=False):
  emb = RNG.normal(size=(p * k, d))
  if ties:  # coincident rows: distances of 0 and tied negatives
    emb[1::4] = emb[0::4]
    emb[2] = emb[5]
  return jnp.asarray(emb, jnp.float32), jnp.asarray(np.arange(p * k) // k, jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("fn", MINED, ids=_name)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_positives_gives_the_sorting_paths_values_and_gradients(monkeypatch, fn,
                                                                   distance, ties):
  emb, labels = _pk_batch(ties=ties)
  monkeypatch.setattr(L, "POSITIVE_SLOTS", ())  # max_positives=None: always the sort
  sorting = _weighted(fn, labels, distance=distance, margin=0.7, chunk_size=7)(emb)
  for p in (3, 5):
    direct = _weighted(fn, labels, distance=distance, margin=0.7, chunk_size=7,
                       max_positives=p)(emb)
    _assert_same(sorting, direct)


@pytest.mark.slow
@pytest.mark.parametrize("fn", MINED, ids=_name)
def test_max_positives_with_masks_anchor_indices_and_reference_sets(monkeypatch, fn):
  monkeypatch.setattr(L, "POSITIVE_SLOTS", ())  # max_positives=None: always the sort
  emb, labels = _pk_batch(5, 3)
  valid = jnp.asarray(RNG.random(15) < 0.8)
  rows = jnp.asarray([3, 0, 14, 7, 7], jnp.int32)
  ref = jnp.concatenate([emb, jnp.asarray(RNG.normal(size=(5, 5)), jnp.float32)])
  ref_labels = jnp.concatenate([labels, jnp.arange(5, dtype=jnp.int32)])
  for kw in (dict(valid=valid), dict(anchor_indices=rows),
             dict(ref_embeddings=ref, ref_labels=ref_labels, ref_exclude=jnp.arange(15)),
             dict(ref_embeddings=ref, ref_labels=ref_labels)):
    # with a reference set: its own copy (unless excluded) and one extra row of its class
    p = 4 if "ref_labels" in kw else 2
    for budget in (2**62, 0):
      monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
      _assert_same(_weighted(fn, labels, chunk_size=4, **kw)(emb),
                   _weighted(fn, labels, chunk_size=4, max_positives=p, **kw)(emb))


def _irregular_batch(ties):
  """Classes of 2, 6 and 20 rows, shuffled: chunks of 9 anchors whose largest positive
  counts fall in each of POSITIVE_SLOTS' branches (1, 5 and 19 positives)."""
  labels = np.repeat(np.arange(3), [2, 6, 20])
  order = np.argsort(np.r_[np.arange(2), 2 + np.arange(6), 100 + np.arange(20)])
  emb = RNG.normal(size=(28, 4))
  if ties:
    emb[3] = emb[2]
    emb[10] = emb[20]
  return jnp.asarray(emb[order], jnp.float32), jnp.asarray(labels[order], jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("fn", MINED, ids=_name)
@pytest.mark.parametrize("ties,distance", [(False, "euclidean"), (True, "cosine")],
                         ids=["distinct-euclidean", "ties-cosine"])
def test_default_chooses_slots_per_chunk_under_jit_with_the_sorts_values_and_gradients(
    monkeypatch, fn, distance, ties):
  """max_positives=None: concrete labels choose once on the host (no switch); traced
  labels choose per chunk with lax.switch. Both equal the sort, values and gradients.

  The choice of slots reads the labels only: each distance and the ties are checked once
  here, and every distance with and without ties against the sort in
  test_max_positives_gives_the_sorting_paths_values_and_gradients."""
  emb, labels = _irregular_batch(ties)
  kw = dict(distance=distance, margin=0.7, chunk_size=9)

  def make_grad():  # a new function to trace: it sees the current budget and slots
    return jax.value_and_grad(lambda e, y: _weighted_sum(fn(e, y, **kw)), has_aux=True)
  grad = make_grad()
  traced = jax.jit(grad)(emb, labels)
  assert "cond" in str(jax.make_jaxpr(grad)(emb, labels))
  host = jax.jit(lambda e: grad(e, labels))(emb)  # labels concrete at trace time
  assert "cond" not in str(jax.make_jaxpr(lambda e: grad(e, labels))(emb))
  # traced took the one-block path (the default budget's, at this size); now the chunked one
  monkeypatch.setattr(L, "FULL_BLOCK_BYTES", 0)
  _assert_same(traced, jax.jit(make_grad())(emb, labels))
  monkeypatch.setattr(L, "POSITIVE_SLOTS", ())
  sorting = jax.jit(make_grad())(emb, labels)
  _assert_same(sorting, traced)
  _assert_same(sorting, host)


@pytest.mark.parametrize("fn", MINED, ids=_name)
def test_max_positives_too_small_raises_when_concrete_and_is_nan_under_jit(fn):
  emb, labels = _pk_batch(4, 4)  # 3 positives each
  with pytest.raises(ValueError, match="max_positives=2 but an anchor has 3"):
    fn(emb, labels, max_positives=2)
  with pytest.raises(ValueError, match="max_positives=2 but an anchor has 3"):
    jax.grad(lambda e: jnp.mean(fn(e, labels, max_positives=2)))(emb)  # labels concrete
  with pytest.raises(ValueError, match="max_positives=2 but an anchor has 3"):
    jax.jit(lambda e: fn(e, labels, max_positives=2))(emb)  # closed over: still concrete
  out = jax.jit(lambda e, y: fn(e, y, max_positives=2))(emb, labels)
  assert bool(jnp.all(jnp.isnan(out)))
  # only the anchors with too many positives: class 0 has one member less here
  valid = jnp.arange(16) != 0
  out = jax.jit(lambda e, y, v: fn(e, y, valid=v, max_positives=2))(emb, labels, valid)
  assert np.isnan(np.asarray(out)[4:]).all() and not np.isnan(np.asarray(out)[:4]).any()
  np.testing.assert_allclose(out[:4], fn(emb, labels, valid=valid)[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", MINED, ids=_name)
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_max_positives_bad_values(fn, bad):
  emb, labels = _pk_batch(2, 2)
  with pytest.raises(ValueError, match="max_positives"):
    fn(emb, labels, max_positives=bad)


@pytest.mark.slow
@pytest.mark.parametrize("fn", MINED, ids=_name)
def test_max_positives_check_grads_float64(fn):
  with jax.enable_x64(True):
    emb = jnp.asarray(RNG.normal(size=(9, 3)) * 1.5)
    labels = jnp.asarray(np.arange(9) // 3, jnp.int32)
    check_grads(lambda e: fn(e, labels, margin=0.5, chunk_size=4, max_positives=2), (emb,),
                order=1, eps=1e-6, modes=("rev",))


# -------------------------------------------------------------------------------------
# batch-hard: partners mined on undifferentiated distances, distances formed again
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_batch_hard_with_a_nan_row_is_nan_where_it_counts_not_silently_finite(distance):
  """A NaN embedding makes the hardest distance NaN for every anchor that sees it (as
  a max over the row does): the mined path must not fall back to another partner."""
  emb, labels = _pk_batch(3, 4)
  emb = emb.at[5].set(jnp.nan)
  out = np.asarray(L.batch_hard_triplet_loss(emb, labels, distance=distance))
  assert np.isnan(out).all()  # row 5 is every other anchor's positive or negative
  out = np.asarray(L.batch_hard_triplet_loss(emb, labels, distance=distance,
                                             valid=jnp.arange(12) != 5))
  assert np.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("fn", IN_BATCH, ids=_name)
@pytest.mark.parametrize("budget", [2**62, 0], ids=["one_block", "chunked"])
def test_nan_or_inf_padding_changes_no_value_or_gradient(monkeypatch, fn, budget):
  """Rows with valid (ref_valid) False take part in nothing, whatever they hold."""
  monkeypatch.setattr(L, "FULL_BLOCK_BYTES", budget)
  emb, labels = _pk_batch(3, 4)
  ref = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
  ref_labels = jnp.arange(6) % 3
  valid, ref_valid = jnp.arange(12) != 5, jnp.arange(6) != 2
  for kw in (dict(valid=valid),
             dict(valid=valid, ref_labels=ref_labels, ref_valid=ref_valid)):
    def objective(e, r, kw=kw):
      extra = {"ref_embeddings": r} if "ref_labels" in kw else {}
      return _weighted_sum(fn(e, labels, chunk_size=5, **extra, **kw))
    run = jax.jit(jax.value_and_grad(objective, has_aux=True))  # one program for both
    clean = run(emb, ref)
    dirty = run(emb.at[5].set(jnp.nan), ref.at[2].set(jnp.inf))
    _assert_same(clean, dirty)


def test_batch_hard_takes_array_likes_and_equals_the_full_reduction():
  """Reference sets as lists or numpy arrays; values and gradients equal the plain
  max / min over the distance matrix (no ties in random data)."""
  emb, labels = _pk_batch(4, 3)
  ref = RNG.normal(size=(7, 5)).astype(np.float32)
  ref_labels = np.arange(7) % 4
  kw = dict(ref_embeddings=ref.tolist(), ref_labels=ref_labels.tolist())
  np.testing.assert_allclose(L.batch_hard_triplet_loss(emb, labels, **kw),
                             L.batch_hard_triplet_loss(emb, labels, ref_embeddings=ref,
                                                       ref_labels=ref_labels), rtol=1e-6)

  def naive(e, r):
    d = jnp.sqrt(jnp.sum((e[:, None] - r[None]) ** 2, -1))
    same = labels[:, None] == jnp.asarray(ref_labels)[None]
    hp = jnp.max(jnp.where(same, d, -jnp.inf), 1)
    hn = jnp.min(jnp.where(~same, d, jnp.inf), 1)
    return jnp.maximum(hp - hn + 1.0, 0.0)
  w = jnp.arange(1.0, 13.0)
  mine = jax.grad(lambda e, r: jnp.sum(w * L.batch_hard_triplet_loss(
      e, labels, ref_embeddings=r, ref_labels=ref_labels)), argnums=(0, 1))(emb, ref)
  want = jax.grad(lambda e, r: jnp.sum(w * naive(e, r)), argnums=(0, 1))(emb, ref)
  for a, b in zip(mine, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
