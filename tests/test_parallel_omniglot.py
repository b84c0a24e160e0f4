"""The Omniglot train step on 1, 4 and 8 (fake CPU) devices: same global batch, same result.

Fake devices check correctness only; they say nothing about speed. The step uses SGD:
Adam's first update is ``lr * sign(g)``, so parameters whose gradient is zero up to float
noise (a bias before batch norm) move by ``+-lr`` on noise of either sign and cannot be
compared across reduction orders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import parallel, train
from siamjax.recipes import omniglot_koch as ok


def _setup(loss):
  cfg = ok.Config(model="conv4", channels=4, image_size=28, loss=loss, n_chars=16,
                  n_per_char=2, chars_per_alphabet=4, batch_pairs=16, optimizer="sgd",
                  learning_rate=1e-2)
  rng = np.random.default_rng(0)
  images = (rng.integers(0, 2, size=(24, 20, 28, 28)) * 255).astype(np.uint8)
  data = ok.training_data(images, np.repeat(np.arange(4), 6), cfg)
  model = ok.Model(cfg)
  return model, ok.optimizer(cfg), ok.init_state(model, cfg), data


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "pair_bce"])
def test_sharded_step_equals_single_device(loss):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest makes 8 fake CPU devices)")
  model, opt, state, data = _setup(loss)
  results = {}
  for n in (1, 4, 8):
    mesh = None if n == 1 else parallel.make_mesh(n)
    step = train.make_train_step(ok.make_loss_fn(model), opt, steps_per_call=1, mesh=mesh)
    s, d = parallel.replicate((state, data), mesh) if mesh is not None else (state, data)
    s = jax.tree.map(jnp.copy, s)  # the step donates its state
    new, metrics = step(s, d)
    results[n] = (float(metrics["loss"]), jax.device_get(new["params"]),
                  jax.device_get(new["model_state"]))
  loss1, params1, ms1 = results[1]
  for n in (4, 8):
    loss_n, params_n, ms_n = results[n]
    np.testing.assert_allclose(loss_n, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_n), jax.tree.leaves(params1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(ms_n), jax.tree.leaves(ms1)):  # batch-norm statistics
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

