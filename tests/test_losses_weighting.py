"""Pair-weighting losses (multi-similarity, circle, lifted structure): hyper-parameter checks.

Their values and gradients are tested against pytorch-metric-learning in
``tests/test_losses_pml.py`` and through every in-batch test of ``tests/test_losses_chunked.py``.
"""


import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import losses as L

RNG = np.random.default_rng(42)


def _emb(b=12, d=5, dtype=np.float32):
  return jnp.asarray(RNG.normal(size=(b, d)).astype(dtype))


def _labels(b=12, classes=4):
  return jnp.asarray(np.arange(b) % classes, jnp.int32)


def test_new_losses_bad_hyper_parameters():
  emb, labels = _emb(6, 3), _labels(6, 2)
  for fn, kw, name in [(L.multi_similarity_loss, {"alpha": 0.0}, "alpha"),
                       (L.multi_similarity_loss, {"beta": -1.0}, "beta"),
                       (L.multi_similarity_loss, {"base": np.inf}, "base"),
                       (L.multi_similarity_loss, {"distance": "l1"}, "distance"),
                       (L.circle_loss, {"gamma": 0.0}, "gamma"),
                       (L.circle_loss, {"margin": np.nan}, "margin"),
                       (L.lifted_structure_loss, {"neg_margin": np.inf}, "neg_margin")]:
    with pytest.raises(ValueError, match=name):
      fn(emb, labels, **kw)
  with pytest.raises(ValueError, match="need must be"):
    L.valid_anchors(labels, need="all")
