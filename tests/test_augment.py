"""Koch's affine distortions and image resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import augment


def test_affine_parameter_statistics():
  p = augment.sample_affine(jax.random.key(3), 20000)
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
  return augment.AffineParams(*(jnp.array([v], jnp.float32) for v in base.values()))


def test_warp_identity_shift_rotation():
  img = jnp.zeros((1, 21, 21)).at[0, 10, 14].set(1.0)
  np.testing.assert_allclose(augment.affine_warp(img, _params()), img, atol=1e-6)
  shifted = augment.affine_warp(img, _params(shift_x=2.0, shift_y=-3.0))
  assert np.argwhere(np.asarray(shifted[0]) > 0.99).tolist() == [[7, 16]]
  # 90 degrees about the centre (10, 10): (x, y) = (14, 10) -> (10, 14).
  rot = augment.affine_warp(img, _params(theta=90.0))
  assert np.argwhere(np.asarray(rot[0]) > 0.99).tolist() == [[14, 10]]
  big = augment.affine_warp(img, _params(scale_x=2.0, scale_y=2.0))
  assert float(big[0, 10, 18]) > 0.99  # 4 px from the centre becomes 8


def test_augment_keeps_shape_and_range():
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28))
  y = jax.jit(augment.augment)(jax.random.key(1), x)
  assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_translations_move_content_and_fill_with_background():
  from siamjax.augment import translations
  x = jax.random.uniform(jax.random.key(0), (2, 6, 5, 1))
  t = np.asarray(translations(x, 2))
  assert t.shape == (25, 2, 6, 5, 1)
  k = 0
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      want = np.zeros_like(np.asarray(x))
      src = np.asarray(x)[:, max(0, -dy):6 - max(0, dy), max(0, -dx):5 - max(0, dx)]
      want[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
      np.testing.assert_array_equal(t[k], want)
      k += 1
  with pytest.raises(ValueError, match="max_shift"):
    translations(x, 5)
