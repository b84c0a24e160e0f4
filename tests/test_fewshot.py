"""Tests for siamjax.fewshot: prototypes and nearest-prototype classification.

The training that uses them (the THUCNews recipe's loss functions through train.run) is
tested in tests/test_thucnews_recipe.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import fewshot


def test_prototypes_match_naive_mean_and_sum():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(12, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 12).astype(np.int32)
  labels[:3] = [0, 1, 2]  # class 3 may be empty: it must get zeros
  for reduce, fn in (("mean", np.mean), ("sum", np.sum)):
    got = fewshot.prototypes(jnp.asarray(emb), jnp.asarray(labels), 5, reduce=reduce)
    want = np.stack([fn(emb[labels == c], axis=0) if np.any(labels == c) else np.zeros(3)
                     for c in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prototypes_reject_bad_input():
  with pytest.raises(ValueError, match="reduce"):
    fewshot.prototypes(jnp.ones((2, 2)), jnp.array([0, 1]), 2, reduce="max")
  with pytest.raises(ValueError, match="labels"):
    fewshot.prototypes(jnp.ones((2, 2)), jnp.array([0.0, 1.0]), 2)
  with pytest.raises(ValueError, match="embeddings"):
    fewshot.prototypes(jnp.ones(2), jnp.array([0, 1]), 2)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
def test_nearest_prototype_matches_naive(distance):
  rng = np.random.default_rng(1)
  q, p = rng.normal(size=(20, 4)), rng.normal(size=(5, 4))
  pred, dist = fewshot.nearest_prototype(jnp.asarray(q, jnp.float32),
                                         jnp.asarray(p, jnp.float32), distance=distance)
  if distance == "cosine":
    naive = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        p / np.linalg.norm(p, axis=1, keepdims=True)).T
  else:
    naive = np.sum((q[:, None] - p[None]) ** 2, axis=-1)
    naive = naive if distance == "squared_euclidean" else np.sqrt(naive)
  np.testing.assert_allclose(dist, naive, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(pred, np.argmin(naive, axis=1))
  with pytest.raises(ValueError, match="dim"):
    fewshot.nearest_prototype(jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_accuracy_and_confusion():
  assert fewshot.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
  cm = fewshot.confusion_matrix([0, 1, 2, 2], [0, 1, 1, 2], 3)
  assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
  with pytest.raises(ValueError, match="differ"):
    fewshot.accuracy([0, 1], [0])
