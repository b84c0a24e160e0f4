"""Tests for siamjax.bag: the bag-of-n-grams encoder and chunked embedding.

Its training (the THUCNews recipe's loss functions through train.run) is tested in
tests/test_thucnews_recipe.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import bag


def test_bag_embed_masks_padding_and_views():
  params = bag.init_bag(jax.random.key(0), 10, 4)
  tok = jnp.array([[3, 5, 0, 0], [7, 0, 0, 0]])
  emb = bag.bag_embed(params, tok)
  e = params["embed"]
  np.testing.assert_allclose(emb[0], (e[3] + e[5]) / 2, rtol=1e-6)
  np.testing.assert_allclose(emb[1], e[7], rtol=1e-6)
  keep = jnp.array([[False, True, True, True], [False, True, True, True]])
  view = bag.bag_embed(params, tok, keep)
  np.testing.assert_allclose(view[0], e[5], rtol=1e-6)
  np.testing.assert_allclose(view[1], 0.0)  # nothing kept -> zeros, not NaN
  with pytest.raises(ValueError, match="vocab_size"):
    bag.init_bag(jax.random.key(0), 1, 4)


def test_embed_all_matches_direct_call():
  params = bag.init_bag(jax.random.key(0), 50, 8)
  tok = np.random.default_rng(0).integers(0, 50, (37, 6)).astype(np.int32)
  np.testing.assert_allclose(bag.embed_all(bag.bag_embed, params, tok, chunk=16),
                             bag.bag_embed(params, jnp.asarray(tok)), rtol=1e-6)
