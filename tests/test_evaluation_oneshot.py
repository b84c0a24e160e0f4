"""One-shot evaluator on tiny hand-built tasks with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax.evaluation import oneshot


def _embed(v, x):
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def test_hand_built_task_known_answer():
  # Task 0: supports at 0, 10, 20; queries near 19, 1, 11. Task 1: reversed supports.
  support = jnp.array([[[0.0], [10.0], [20.0]], [[20.0], [10.0], [0.0]]])
  query = jnp.array([[[19.0], [1.0], [11.0]], [[19.0], [1.0], [11.0]]])
  pred = oneshot.oneshot_predictions(_embed, oneshot.neg_squared_euclidean, None, support,
                                     query, chunk_size=4)  # chunks with padding
  assert pred.tolist() == [[2, 0, 1], [0, 2, 1]]
  r = oneshot.evaluate_oneshot(_embed, oneshot.neg_squared_euclidean, None, support, query,
                               jnp.array([[2, 0, 1], [0, 2, 0]]))
  assert (r.correct, r.trials) == (5, 6) and r.accuracy == 5 / 6
  assert r.low < 5 / 6 < r.high
  assert r.predictions.tolist() == pred.tolist()  # the predictions it counted


def test_score_fn_with_variables_head():
  """A learned head (here: negative weighted L1) gets the variables pytree."""
  def head(v, hq, hs):
    w = v["w"].reshape((1,) * (hq.ndim - 1) + (-1,))
    return -jnp.sum(w * jnp.abs(hq - hs), axis=-1)
  support = jnp.array([[[0.0, 0.0], [1.0, 5.0]]])
  query = jnp.array([[[1.0, 0.0]]])
  w_x = {"w": jnp.array([10.0, 0.0])}  # only x counts: query matches support 1
  w_y = {"w": jnp.array([0.0, 10.0])}  # only y counts: support 0
  assert oneshot.oneshot_predictions(_embed, head, w_x, support, query).tolist() == [[1]]
  assert oneshot.oneshot_predictions(_embed, head, w_y, support, query).tolist() == [[0]]


def test_pixels_on_near_copies_are_perfect():
  imgs = jax.random.randint(jax.random.key(0), (3, 5, 8, 8), 0, 250).astype(jnp.uint8)
  perm = jnp.array([[4, 3, 2, 1, 0], [0, 2, 4, 1, 3], [1, 0, 3, 2, 4]])
  query = jnp.take_along_axis(imgs, perm[:, :, None, None], axis=1)
  query = query.at[:, :, 0, 0].add(3)  # one pixel changed: no longer the same image
  r = oneshot.evaluate_oneshot(oneshot.pixel_embed, oneshot.neg_squared_euclidean, None,
                               imgs, query, perm)
  assert r.accuracy == 1.0 and r.trials == 15


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_a_query_that_is_its_own_support_image_is_refused(dtype):
  imgs = jax.random.randint(jax.random.key(0), (3, 5, 8, 8), 0, 250).astype(dtype)
  perm = jnp.array([[4, 3, 2, 1, 0], [0, 2, 4, 1, 3], [1, 0, 3, 2, 4]])
  query = jnp.take_along_axis(imgs, perm[:, :, None, None], axis=1) + 1
  query = query.at[2, 3].set(imgs[2, 2])  # task 2, query 3 is support image 2
  with pytest.raises(ValueError, match="query 3 of task 2 is the same image as support "
                                       "image 2"):
    oneshot.evaluate_oneshot(oneshot.pixel_embed, oneshot.neg_squared_euclidean, None,
                             imgs, query, perm)
  # The same image in another task's support is no copy of this task's support images.
  query = query.at[2, 3].set(imgs[0, 2])
  r = oneshot.evaluate_oneshot(oneshot.pixel_embed, oneshot.neg_squared_euclidean, None,
                               imgs, query, perm)
  assert r.trials == 15


def test_interval_and_bad_input():
  lo, hi = oneshot.accuracy_interval(200, 400)
  assert lo == pytest.approx(0.451, abs=1e-3) and hi == pytest.approx(0.549, abs=1e-3)
  with pytest.raises(ValueError, match="answers"):
    oneshot.evaluate_oneshot(_embed, oneshot.neg_squared_euclidean, None,
                             jnp.zeros((2, 3, 1)), jnp.zeros((2, 3, 1)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="trials"):
    oneshot.accuracy_interval(0, 0)


def test_sample_tasks_within_alphabet():
  c, d = 10, 6
  img = np.zeros((c, d, 2, 2), np.uint8)
  img[:, :, 0, 0] = np.arange(c)[:, None]
  img[:, :, 0, 1] = np.arange(d)[None, :]
  alph = np.array([0] * 5 + [1] * 5)
  s, q, a = oneshot.sample_oneshot_tasks(jax.random.key(0), jnp.asarray(img), alph, n_way=4,
                                         n_tasks=50, within_alphabet=True, drawers=(2, 3, 4))
  sc, qc = np.asarray(s[..., 0, 0]), np.asarray(q[..., 0, 0])
  np.testing.assert_array_equal(sc, qc)  # query i shows support class i
  assert (alph[sc] == alph[sc[:, :1]]).all()  # one alphabet per task
  assert all(len(set(row)) == 4 for row in sc)
  sd, qd = np.asarray(s[..., 0, 1]), np.asarray(q[..., 0, 1])
  assert (sd != qd).all() and set(np.unique(sd)) <= {2, 3, 4}
  np.testing.assert_array_equal(a, np.tile(np.arange(4), (50, 1)))
  # Perfect embedding of character identity: accuracy 1.
  r = oneshot.evaluate_oneshot(lambda v, x: x[:, 0, :1].astype(jnp.float32),
                               oneshot.neg_squared_euclidean, None, s, q, a)
  assert r.accuracy == 1.0
