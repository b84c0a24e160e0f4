"""The on-device recipe trainer and the Keras MNIST pairs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamjax import recipes


def _naive_keras_pairs(table, n, other):
  """The example's create_pairs loop, with the random class offsets given."""
  pairs, labels = [], []
  c = table.shape[0]
  for d in range(c):
    for i in range(n):
      pairs.append((table[d, i], table[d, i + 1]))
      pairs.append((table[d, i], table[other[d, i], i]))
      labels += [1, 0]
  return np.array(pairs), np.array(labels)


def test_class_index_table_lists_positions_in_order():
  labels = np.array([2, 0, 2, 1, 0, 2])
  table, counts = recipes.class_index_table(labels)
  assert counts.tolist() == [2, 1, 3]
  for c in range(3):
    assert table[c, :counts[c]].tolist() == np.flatnonzero(labels == c).tolist()
  with pytest.raises(ValueError, match="no example"):
    recipes.class_index_table(np.array([0, 2]))
  with pytest.raises(ValueError, match="labels"):
    recipes.class_index_table(np.array([0.5, 1.0]))


def test_keras_pairs_match_the_example_loop():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 200)
  table, counts = recipes.class_index_table(labels)
  n = int(counts.min()) - 1
  key = jax.random.key(3)
  pairs, similar = recipes.keras_pairs(key, jnp.asarray(table), n)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  # Recover the drawn class offsets from the negatives, then replay the example's loop.
  neg_class = labels[pairs[1::2, 1]].reshape(5, n)
  offset = (neg_class - np.arange(5)[:, None]) % 5
  assert ((offset >= 1) & (offset <= 4)).all()  # never the anchor's own class
  ref_pairs, ref_labels = _naive_keras_pairs(table, n, neg_class)
  np.testing.assert_array_equal(pairs, ref_pairs)
  np.testing.assert_array_equal(similar, ref_labels)
  assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).tolist() == (similar == 1).tolist()
  # Offsets are roughly uniform over 1..4 and change with the key.
  assert len(np.unique(offset)) == 4
  other, _ = recipes.keras_pairs(jax.random.key(4), jnp.asarray(table), n)
  assert not np.array_equal(np.asarray(other), pairs)


def test_keras_pairs_rejects_bad_n():
  table = jnp.zeros((3, 4), jnp.int32)
  with pytest.raises(ValueError, match="n must be"):
    recipes.keras_pairs(jax.random.key(0), table, 4)


def _toy_problem():
  """Linear regression: the epoch must drive the loss down."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 3)).astype(np.float32)
  w = np.array([1.0, -2.0, 0.5], np.float32)
  data = {"x": jnp.asarray(x), "y": jnp.asarray(x @ w)}

  def sample(key, data, step):
    idx = jax.random.randint(key, (32,), 0, data["x"].shape[0])
    return {"x": data["x"][idx], "y": data["y"][idx]}

  def loss_fn(params, batch, dropout_key):
    del dropout_key
    err = batch["x"] @ params - batch["y"]
    return jnp.mean(err ** 2), {"abs_err": jnp.mean(jnp.abs(err))}

  return data, sample, loss_fn


def test_train_epoch_learns_and_does_not_retrace():
  data, sample, loss_fn = _toy_problem()
  opt = optax.adam(0.1)
  traced = chex.assert_max_traces(loss_fn, n=1)
  epoch = recipes.make_train_epoch(traced, opt, steps=20, sample=sample)
  params = jnp.zeros(3)
  state = recipes.TrainState(params, opt.init(params))
  state, history = recipes.fit(epoch, state, jax.random.key(0), data, epochs=5)
  assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
  assert history[-1]["loss"] < 0.1 * history[0]["loss"]
  assert set(history[0]) == {"epoch", "loss", "abs_err"}


def test_fit_early_stopping_returns_the_best_state():
  data, sample, loss_fn = _toy_problem()
  opt = optax.sgd(0.0)  # nothing changes: the validation loss never improves after epoch 1
  epoch = recipes.make_train_epoch(loss_fn, opt, steps=2, sample=sample)
  state = recipes.TrainState(jnp.ones(3), opt.init(jnp.ones(3)))
  state, history = recipes.fit(epoch, state, jax.random.key(0), data, epochs=10,
                               val_loss=lambda p: jnp.sum(p), patience=2)
  assert len(history) == 3
  np.testing.assert_array_equal(state.params, jnp.ones(3))
  with pytest.raises(ValueError, match="patience"):
    recipes.fit(epoch, state, jax.random.key(0), data, epochs=1, patience=2)


def _synthetic_digits(n, seed):
  """Ten well-separated 28x28 'digits': a class-specific bright stripe plus noise."""
  rng = np.random.default_rng(seed)
  labels = np.tile(np.arange(10), n // 10)
  images = rng.integers(0, 60, (labels.size, 28, 28))
  for c in range(10):
    images[labels == c, 2 * c + 3, :] = 255
  return images.astype(np.uint8), labels.astype(np.int32)


def test_mnist_contrastive_learns_synthetic_digits():
  x_tr, y_tr = _synthetic_digits(300, 0)
  x_te, y_te = _synthetic_digits(100, 1)
  results, params = recipes.mnist_contrastive(x_tr, y_tr, x_te, y_te, epochs=2, batch_size=32)
  assert results["train_pairs"] == 2 * 10 * 29 and results["test_pairs"] == 2 * 10 * 9
  assert results["steps_per_epoch"] == 580 // 32
  assert results["test_pair_accuracy"] > 0.9
  assert results["test_verification"]["auc"] > 0.95
  assert results["test_recall_at_1"] > 0.9
  assert len(results["history"]) == 2


def test_python_loop_matches_scan():
  data, sample, loss_fn = _toy_problem()
  opt = optax.adam(0.1)
  out = {}
  for loop in ("scan", "python"):
    epoch = recipes.make_train_epoch(loss_fn, opt, steps=7, sample=sample, loop=loop)
    state = recipes.TrainState(jnp.zeros(3), opt.init(jnp.zeros(3)))
    out[loop] = recipes.fit(epoch, state, jax.random.key(1), data, epochs=2)
  np.testing.assert_allclose(out["scan"][0].params, out["python"][0].params, rtol=1e-5)
  for a, b in zip(out["scan"][1], out["python"][1]):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
  with pytest.raises(ValueError, match="loop"):
    recipes.make_train_epoch(loss_fn, opt, steps=1, sample=sample, loop="while")


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_epoch_moves_nothing_between_host_and_device(loop):
  data, sample, loss_fn = _toy_problem()
  opt = optax.adam(0.1)
  epoch = recipes.make_train_epoch(loss_fn, opt, steps=5, sample=sample, loop=loop)
  state = recipes.TrainState(jnp.zeros(3), opt.init(jnp.zeros(3)))
  key = jax.random.key(0)
  state, _ = epoch(state, key, data)  # compile outside the guard
  with jax.transfer_guard("disallow"):
    state, metrics = epoch(state, key, data)
    jax.block_until_ready((state, metrics))
