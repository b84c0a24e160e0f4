"""On-device sampler statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import sampling

C, D = 12, 20  # classes x members of a grid bank


ALPHABETS = np.array([0] * 4 + [1] * 3 + [2] * 5)


def _cls(pos):
  """Class and member of grid positions (``c * D + d``)."""
  pos = np.asarray(pos)
  return pos // D, pos % D


def test_index_table_lists_positions_in_order():
  labels = np.array([2, 0, 2, 1, 0, 2])
  t = sampling.index_table(labels)
  assert t.counts.tolist() == [2, 1, 3]
  for c in range(3):
    assert t.table[c, :t.counts[c]].tolist() == np.flatnonzero(labels == c).tolist()
  with pytest.raises(ValueError, match="no member"):
    sampling.index_table(np.array([0, 2]))
  with pytest.raises(ValueError, match="labels"):
    sampling.index_table(np.array([0.5, 1.0]))
  with pytest.raises(ValueError, match="class 1 has 1 member"):
    sampling.index_table(np.array([0, 0, 1]), min_size=2)
  with pytest.raises(ValueError, match="num_classes is 2"):
    sampling.index_table(np.array([0, 2]), num_classes=2)


def test_grid_table():
  t = sampling.grid_table(3, 5, members=(0, 4))
  assert t.table.tolist() == [[0, 4], [5, 9], [10, 14]] and t.counts.tolist() == [2, 2, 2]
  with pytest.raises(ValueError, match="members"):
    sampling.grid_table(3, 5, members=(0, 5))


def test_pairs_half_positive_distinct_members():
  pairs, sim = jax.jit(sampling.sample_pairs, static_argnums=2)(
      jax.random.key(0), sampling.grid_table(C, D), 512)
  (c1, d1), (c2, d2) = _cls(pairs[:, 0]), _cls(pairs[:, 1])
  sim = np.asarray(sim)
  assert sim.mean() == 0.5 and (sim[:256] == 1).all()
  assert (c1[sim == 1] == c2[sim == 1]).all() and (c1[sim == 0] != c2[sim == 0]).all()
  assert (d1[sim == 1] != d2[sim == 1]).all()  # a positive never pairs an image with itself
  assert len(np.unique(c1)) == C  # every class gets drawn


def test_pairs_member_subset_and_within_group():
  groups = sampling.index_table(ALPHABETS)
  pairs, sim = sampling.sample_pairs(jax.random.key(1), sampling.grid_table(C, D, range(12)),
                                     400, groups=groups)
  (c1, d1), (c2, d2) = _cls(pairs[:, 0]), _cls(pairs[:, 1])
  assert d1.max() < 12 and d2.max() < 12
  neg = np.asarray(sim) == 0
  assert (ALPHABETS[c1[neg]] == ALPHABETS[c2[neg]]).all() and (c1[neg] != c2[neg]).all()
  assert len(np.unique(ALPHABETS[c1[neg]])) == 3


def test_pairs_with_partners_cross_two_sets():
  labels = np.array([0, 0, 1, 1, 2, 2])
  probe = sampling.IndexTable(np.array([[0], [2], [4]]), np.array([1, 1, 1]))
  gallery = sampling.IndexTable(np.array([[1], [3], [5]]), np.array([1, 1, 1]))
  pairs, sim = sampling.sample_pairs(jax.random.key(2), probe, 64, partners=gallery)
  pairs, sim = np.asarray(pairs), np.asarray(sim)
  assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] % 2 == 1).all()
  assert ((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == (sim == 1)).all()


def test_pairs_bad_input():
  t = sampling.grid_table(C, D)
  with pytest.raises(ValueError, match="n_pairs"):
    sampling.sample_pairs(jax.random.key(0), t, 3)
  with pytest.raises(ValueError, match="two members"):
    sampling.sample_pairs(jax.random.key(0), sampling.index_table(np.array([0, 1, 1])), 4)
  with pytest.raises(ValueError, match="IndexTable"):
    sampling.sample_pairs(jax.random.key(0), np.zeros((3, 2)), 4)
  with pytest.raises(ValueError, match="two classes"):
    sampling.sample_pairs(jax.random.key(0), t, 4, groups=sampling.index_table(np.arange(C)))


def test_oneshot_trials_hold_the_query_class_once_at_a_uniform_column():
  labels = np.repeat(np.arange(6), 3)
  gallery = sampling.index_table(labels)
  queries = jnp.asarray(np.tile(np.arange(6), 100))
  support, answers = jax.jit(sampling.sample_oneshot_trials, static_argnums=3)(
      jax.random.key(0), queries, gallery, 4)
  support, answers = np.asarray(support), np.asarray(answers)
  assert support.shape == (600, 4) and answers.shape == (600,)
  cls = labels[support]
  assert (cls[np.arange(600), answers] == np.asarray(queries)).all()
  assert all(len(set(row)) == 4 for row in cls.tolist())  # distinct classes per trial
  assert np.bincount(answers, minlength=4).min() > 100  # about 150 each: not a fixed column
  assert np.bincount(cls.reshape(-1), minlength=6).min() > 300  # every class a candidate
  with pytest.raises(ValueError, match="n_way"):
    sampling.sample_oneshot_trials(jax.random.key(0), queries, gallery, 7)
  with pytest.raises(ValueError, match="query_classes"):
    sampling.sample_oneshot_trials(jax.random.key(0), jnp.array([0, 6]), gallery, 2)
  with pytest.raises(ValueError, match="query_classes"):
    sampling.sample_oneshot_trials(jax.random.key(0), jnp.array([0.5]), gallery, 2)


def test_groups_within_group_distinct_members():
  groups = sampling.index_table(ALPHABETS, min_size=3)
  pos, labels = sampling.sample_groups(jax.random.key(2), sampling.grid_table(C, D), 6, 2,
                                       groups=groups, classes_per_group=3)
  chars, drawers = (a.reshape(6, 2) for a in _cls(pos))
  np.testing.assert_array_equal(chars, np.asarray(labels).reshape(6, 2))
  assert (chars[:, 0] == chars[:, 1]).all() and (drawers[:, 0] != drawers[:, 1]).all()
  assert len(set(chars[:, 0])) == 6
  alph = ALPHABETS[chars[:, 0]].reshape(2, 3)
  assert (alph == alph[:, :1]).all() and alph[0, 0] != alph[1, 0]
  with pytest.raises(ValueError, match="has 3 member"):
    sampling.index_table(ALPHABETS, min_size=4)


def test_groups_ragged_classes_with_and_without_replacement():
  labels = np.repeat(np.arange(5), [3, 9, 4, 6, 2])
  t = sampling.index_table(labels)
  pos, lab = sampling.sample_groups(jax.random.key(0), t, 5, 2)
  assert (labels[np.asarray(pos)] == np.asarray(lab)).all()
  assert sorted(set(np.asarray(lab).tolist())) == [0, 1, 2, 3, 4]
  pairs = np.asarray(pos).reshape(5, 2)
  assert (pairs[:, 0] != pairs[:, 1]).all()
  with pytest.raises(ValueError, match="fewer than per_class"):
    sampling.sample_groups(jax.random.key(0), t, 2, 3)
  pos, lab = sampling.sample_groups(jax.random.key(0), t, 5, 3, replace=True)
  assert (labels[np.asarray(pos)] == np.asarray(lab)).all()


def _naive_keras_pairs(table, n, other):
  """The example's create_pairs loop, with the random class offsets given."""
  pairs, labels = [], []
  for d in range(table.shape[0]):
    for i in range(n):
      pairs.append((table[d, i], table[d, i + 1]))
      pairs.append((table[d, i], table[other[d, i], i]))
      labels += [1, 0]
  return np.array(pairs), np.array(labels)


def test_keras_pairs_match_the_example_loop():
  labels = np.random.default_rng(0).integers(0, 5, 200)
  t = sampling.index_table(labels)
  n = int(t.counts.min()) - 1
  pairs, similar = sampling.keras_pairs(jax.random.key(3), t, n)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  neg_class = labels[pairs[1::2, 1]].reshape(5, n)
  offset = (neg_class - np.arange(5)[:, None]) % 5
  assert ((offset >= 1) & (offset <= 4)).all()  # never the anchor's own class
  ref_pairs, ref_labels = _naive_keras_pairs(t.table, n, neg_class)
  np.testing.assert_array_equal(pairs, ref_pairs)
  np.testing.assert_array_equal(similar, ref_labels)
  assert len(np.unique(offset)) == 4
  with pytest.raises(ValueError, match="n must be"):
    sampling.keras_pairs(jax.random.key(0), t, n + 1)


def test_epoch_batches_cover_each_epoch_once_and_resume():
  n, b = 23, 4  # 5 batches per epoch, 3 rows dropped
  whole = np.asarray(sampling.epoch_batches(jax.random.key(0), n, b, 0, 5))
  assert len(set(whole.reshape(-1).tolist())) == 20 and whole.max() < n
  # Any window of consecutive steps, across an epoch boundary too, sees the same rows.
  steps = np.concatenate([whole, np.asarray(sampling.epoch_batches(jax.random.key(0), n, b,
                                                                   5, 5))])
  for start in range(0, 6):
    got = np.asarray(jax.jit(sampling.epoch_batches, static_argnums=(1, 2, 4))(
        jax.random.key(0), n, b, start, 5))
    np.testing.assert_array_equal(got, steps[start:start + 5])
  assert not np.array_equal(steps[:5], steps[5:])  # a new order each epoch
  with pytest.raises(ValueError, match="one epoch"):
    sampling.epoch_batches(jax.random.key(0), n, b, 0, 6)


def test_sample_rows_uniform_in_range_and_checked():
  rows = np.asarray(jax.jit(sampling.sample_rows, static_argnums=(1, 2))(
      jax.random.key(0), 7, 7000))
  assert rows.dtype == np.int32 and rows.shape == (7000,)
  counts = np.bincount(rows, minlength=7)
  assert counts.size == 7 and counts.min() > 850 and counts.max() < 1150  # ~1000 each
  again = np.asarray(sampling.sample_rows(jax.random.key(0), 7, 7000))
  np.testing.assert_array_equal(rows, again)
  for bad in (dict(n_rows=0, batch_size=4), dict(n_rows=5, batch_size=0)):
    with pytest.raises(ValueError, match="n_rows" if bad["n_rows"] == 0 else "batch_size"):
      sampling.sample_rows(jax.random.key(0), **bad)


def test_exhaustive_pairs_positives_and_negatives():
  labels = np.repeat(np.arange(4), [5, 3, 4, 2]).astype(np.int32)
  pairs, similar = sampling.exhaustive_pairs(jax.random.key(0), labels)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  n_pos = 10 + 3 + 6 + 1
  assert pairs.shape == (2 * n_pos, 2) and similar.sum() == n_pos
  np.testing.assert_array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], similar == 1)
  assert np.all(pairs[similar == 1, 0] < pairs[similar == 1, 1])
  assert set(labels[pairs[similar == 0, 1]].tolist()) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="two examples"):
    sampling.exhaustive_pairs(jax.random.key(0), np.arange(3))


def test_split_views_are_disjoint_and_cover():
  tok = jnp.ones((64, 30), jnp.int32)
  a, b = sampling.split_views(jax.random.key(3), tok)
  assert not bool(jnp.any(a & b)) and bool(jnp.all(a | b))
  assert 0.4 < float(jnp.mean(a)) < 0.6
