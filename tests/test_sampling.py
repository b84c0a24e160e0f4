"""On-device sampler statistics and Koch's affine distortions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import sampling

C, D = 12, 20


@pytest.fixture(scope="module")
def coded():
  """Images whose pixel [0, 0] holds the character and [0, 1] the drawer."""
  img = np.zeros((C, D, 6, 6), np.uint8)
  img[:, :, 0, 0] = np.arange(C)[:, None]
  img[:, :, 0, 1] = np.arange(D)[None, :]
  return jnp.asarray(img)


ALPHABETS = np.array([0] * 4 + [1] * 3 + [2] * 5)


def test_pairs_half_positive_distinct_drawers(coded):
  x1, x2, sim = jax.jit(sampling.sample_pairs, static_argnums=2)(jax.random.key(0), coded, 512)
  c1, c2 = np.asarray(x1[:, 0, 0]), np.asarray(x2[:, 0, 0])
  d1, d2 = np.asarray(x1[:, 0, 1]), np.asarray(x2[:, 0, 1])
  sim = np.asarray(sim)
  assert sim.mean() == 0.5
  assert (c1[sim == 1] == c2[sim == 1]).all() and (c1[sim == 0] != c2[sim == 0]).all()
  assert (d1 != d2).all()
  assert len(np.unique(c1)) == C  # every character gets drawn


def test_pairs_drawer_subset_and_within_alphabet(coded):
  table = sampling.alphabet_table(ALPHABETS)
  x1, x2, sim = sampling.sample_pairs(jax.random.key(1), coded, 400, drawers=range(12),
                                      alphabets=table, within_alphabet=True)
  c1, c2 = np.asarray(x1[:, 0, 0]), np.asarray(x2[:, 0, 0])
  assert np.asarray(x1[:, 0, 1]).max() < 12 and np.asarray(x2[:, 0, 1]).max() < 12
  neg = np.asarray(sim) == 0
  assert (ALPHABETS[c1[neg]] == ALPHABETS[c2[neg]]).all() and (c1[neg] != c2[neg]).all()


def test_pairs_bad_batch(coded):
  with pytest.raises(ValueError, match="batch"):
    sampling.sample_pairs(jax.random.key(0), coded, 3)


def test_groups_within_alphabet(coded):
  table = sampling.alphabet_table(ALPHABETS, min_size=3)
  x, labels = sampling.sample_groups(jax.random.key(2), coded, 6, 2, alphabets=table,
                                     chars_per_alphabet=3)
  chars = np.asarray(x[:, 0, 0]).reshape(6, 2)
  drawers = np.asarray(x[:, 0, 1]).reshape(6, 2)
  np.testing.assert_array_equal(chars, np.asarray(labels).reshape(6, 2))
  assert (chars[:, 0] == chars[:, 1]).all() and (drawers[:, 0] != drawers[:, 1]).all()
  assert len(set(chars[:, 0])) == 6
  alph = ALPHABETS[chars[:, 0]].reshape(2, 3)
  assert (alph == alph[:, :1]).all() and alph[0, 0] != alph[1, 0]
  with pytest.raises(ValueError, match="alphabet has 3"):
    sampling.alphabet_table(ALPHABETS, min_size=4)


def test_affine_parameter_statistics():
  p = sampling.sample_affine(jax.random.key(3), 20000)
  bounds = {"theta": (-10, 10, 0), "shear_x": (-0.3, 0.3, 0), "shear_y": (-0.3, 0.3, 0),
            "scale_x": (0.8, 1.2, 1), "scale_y": (0.8, 1.2, 1), "shift_x": (-2, 2, 0),
            "shift_y": (-2, 2, 0)}
  for name, (lo, hi, identity) in bounds.items():
    v = np.asarray(getattr(p, name))
    assert v.min() >= lo and v.max() <= hi, name
    applied = v != identity
    assert abs(applied.mean() - 0.5) < 0.02, name  # each component with probability 0.5
    assert v[applied].min() < lo + 0.05 * (hi - lo) and v[applied].max() > hi - 0.05 * (hi - lo)
  # Components are independent: all seven on together about 1/128 of the time.
  all_on = np.ones(20000, bool)
  for name, (_, _, identity) in bounds.items():
    all_on &= np.asarray(getattr(p, name)) != identity
  assert abs(all_on.mean() - 0.5 ** 7) < 0.005


def _params(**kw):
  base = dict(theta=0.0, shear_x=0.0, shear_y=0.0, scale_x=1.0, scale_y=1.0, shift_x=0.0,
              shift_y=0.0)
  base.update(kw)
  return sampling.AffineParams(*(jnp.array([v], jnp.float32) for v in base.values()))


def test_warp_identity_shift_rotation():
  img = jnp.zeros((1, 21, 21)).at[0, 10, 14].set(1.0)
  np.testing.assert_allclose(sampling.affine_warp(img, _params()), img, atol=1e-6)
  shifted = sampling.affine_warp(img, _params(shift_x=2.0, shift_y=-3.0))
  assert np.argwhere(np.asarray(shifted[0]) > 0.99).tolist() == [[7, 16]]
  # 90 degrees about the centre (10, 10): (x, y) = (14, 10) -> (10, 14).
  rot = sampling.affine_warp(img, _params(theta=90.0))
  assert np.argwhere(np.asarray(rot[0]) > 0.99).tolist() == [[14, 10]]
  big = sampling.affine_warp(img, _params(scale_x=2.0, scale_y=2.0))
  assert float(big[0, 10, 18]) > 0.99  # 4 px from the centre becomes 8


def test_augment_keeps_shape_and_range():
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28))
  y = jax.jit(sampling.augment)(jax.random.key(1), x)
  assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
