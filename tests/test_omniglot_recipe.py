"""The Omniglot recipe's pieces: presets build, the in-batch loss, the paper optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamjax import losses
from siamjax.recipes import omniglot_koch as ok

def _preset(name):  # the presets experiments/omniglot_koch.py offers
  return ok.PRESETS[name]()


@pytest.mark.parametrize("name", ["smoke", "quick", "cpu", "paper", "paper_fast"])
def test_presets_build(name):
  cfg = _preset(name)
  assert cfg.preset == name
  assert cfg.num_steps % cfg.steps_per_call == 0
  assert cfg.eval_every % cfg.steps_per_call == 0
  assert cfg.checkpoint_every % cfg.steps_per_call == 0
  model = ok.Model(cfg)
  x = jax.ShapeDtypeStruct((2, cfg.image_size, cfg.image_size, 1), jnp.float32)
  variables = jax.eval_shape(lambda a, b: model.net.init(jax.random.key(0), a, b,
                                                         **model.eval_kw), x, x)
  opt = ok.optimizer(cfg)
  jax.eval_shape(opt.init, variables["params"])  # every parameter has a layer (paper)


def test_paper_preset_is_koch():
  cfg = _preset("paper")
  assert (cfg.model, cfg.loss, cfg.image_size, cfg.batch_pairs) == ("koch", "pair_bce", 105, 128)
  assert (cfg.rotation, cfg.shear, tuple(cfg.scale), cfg.translation, cfg.augment_prob) == (
      10.0, 0.3, (0.8, 1.2), 2.0, 0.5)
  assert len(cfg.train_drawers) == 12 and not set(cfg.train_drawers) & set(cfg.val_drawers)


def test_paper_fast_preset_is_koch_in_bf16_within_its_budget():
  cfg = _preset("paper_fast")
  assert (cfg.model, cfg.loss, cfg.image_size, cfg.dtype) == ("koch", "pair_bce", 105,
                                                              "bfloat16")
  assert (cfg.rotation, cfg.shear, tuple(cfg.scale), cfg.translation, cfg.augment_prob) == (
      10.0, 0.3, (0.8, 1.2), 2.0, 0.5) and cfg.augment
  # All 20 drawers of the background alphabets; validation draws other (evaluation) alphabets.
  assert cfg.train_drawers == tuple(range(20)) and cfg.val_tasks == 20
  assert cfg.train_time_limit_s == 300
  # No evaluation inside the window, at most two checkpoints in it (< 3% of the budget).
  assert cfg.eval_every == 0 and cfg.patience == 0 and not cfg.extra_evals
  assert 0 < cfg.checkpoint_every and cfg.num_steps // cfg.checkpoint_every <= 2
  model = ok.Model(cfg)
  x = jax.ShapeDtypeStruct((2, 105, 105, 1), jnp.float32)
  params = jax.eval_shape(lambda a, b: model.net.init(jax.random.key(0), a, b), x, x)["params"]
  leaves = jax.tree.leaves(params)
  assert sum(int(np.prod(p.shape)) for p in leaves) == 38_951_745
  assert {p.dtype for p in leaves} == {jnp.dtype(jnp.float32)}  # bf16 compute only
  lr = ok.learning_rate(cfg)
  assert float(lr(0)) == 0.0 and float(lr(cfg.warmup_steps)) == pytest.approx(cfg.learning_rate)
  assert float(lr(cfg.num_steps)) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_rejects_bad_schedules():
  with pytest.raises(ValueError, match="lr_schedule"):
    ok.learning_rate(ok.Config(lr_schedule="linear"))
  with pytest.raises(ValueError, match="warmup_steps"):
    ok.learning_rate(ok.Config(lr_schedule="cosine", warmup_steps=10, num_steps=10))


def test_in_batch_softmax_matches_naive():
  e = jax.random.normal(jax.random.key(0), (8, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2, 2, 3])
  got = np.asarray(losses.in_batch_softmax_loss(e, labels))
  en, ln = np.asarray(e, np.float64), np.asarray(labels)
  want = np.zeros(8)
  for i in range(8):
    others = [j for j in range(8) if j != i]
    logits = np.array([-np.sum((en[i] - en[j]) ** 2) for j in others])
    logp = logits - np.log(np.sum(np.exp(logits)))
    pos = [k for k, j in enumerate(others) if ln[j] == ln[i]]
    want[i] = -np.mean(logp[pos]) if pos else 0.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda x: jnp.mean(losses.in_batch_softmax_loss(x, labels)))(e)
  assert np.isfinite(np.asarray(g)).all()


def test_early_stopping(tmp_path):
  from siamjax import train
  opt = optax.sgd(0.0)

  def loss_fn(params, ms, data, key):
    return jnp.sum(params["w"] ** 2), (ms, {})

  step = train.make_train_step(loss_fn, opt, steps_per_call=1)
  scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])
  state = train.init_state({"w": jnp.ones(2)}, opt, key=jax.random.key(0))
  _, res = train.fit(state, step, {}, num_steps=10, steps_per_call=1, workdir=tmp_path,
                     eval_fn=lambda s: {"val_accuracy": next(scores)}, eval_every=1,
                     patience=3, progress=False)
  assert res["stopped_early"] and res["steps"] == 5
  assert res["best"] == 0.6 and res["best_step"] == 2


def test_rotated_classes_are_new_characters_of_new_alphabets():
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 28, 28), dtype=np.uint8)
  ids = np.array([0, 1, 1])
  cfg = ok.Config(rotate_classes=True, chars_per_alphabet=1, train_drawers=(0, 2))
  data = ok.training_data(images, ids, cfg)
  assert data["images"].shape == (48, 28, 28)
  table, counts = np.asarray(data["classes"].table), np.asarray(data["classes"].counts)
  assert table.shape == (12, 2) and (counts == 2).all()
  for k in range(4):
    for c in range(3):
      for slot, d in enumerate((0, 2)):  # only the training drawers are sampled
        np.testing.assert_array_equal(data["images"][table[3 * k + c, slot]],
                                      np.rot90(images[c, d], k))
  groups = data["groups"]
  members = [set(np.asarray(groups.table)[a, :int(n)].tolist())
             for a, n in enumerate(np.asarray(groups.counts))]
  # Alphabet a turned by k quarter turns is alphabet a + 2k, holding those characters.
  assert members == [{0}, {1, 2}, {3}, {4, 5}, {6}, {7, 8}, {9}, {10, 11}]
  plain = ok.training_data(images, ids, cfg.replace(rotate_classes=False))
  np.testing.assert_array_equal(plain["images"], data["images"][:12])


def test_temperature_divides_the_softmax_distances():
  cfg = ok.PRESETS["smoke"]().replace(temperature=2.0, augment=False)
  model = ok.Model(cfg)
  images = np.random.default_rng(1).integers(0, 256, (30, 20, 28, 28), dtype=np.uint8)
  data = ok.training_data(images, np.repeat(np.arange(2), 15), cfg)
  state = ok.init_state(model, cfg)
  params, ms = state["params"], state["model_state"]
  key = jax.random.key(3)
  loss_t, _ = ok.make_loss_fn(model)(params, ms, data, key)
  # The same batch with embeddings scaled by 1/sqrt(2) at temperature 1.
  plain = ok.Model(cfg.replace(temperature=1.0))
  apply = plain.train_apply
  plain.train_apply = lambda *a, **k: (lambda o: (o[0] / np.sqrt(2.0), o[1]))(apply(*a, **k))
  loss_1, _ = ok.make_loss_fn(plain)(params, ms, data, key)
  np.testing.assert_allclose(float(loss_t), float(loss_1), rtol=1e-5)


def test_test_time_shifts_average_the_plain_embeddings_of_each_image_alone():
  cfg = ok.PRESETS["smoke"]().replace(tta_shift=1)
  model = ok.Model(cfg)
  state = ok.init_state(model, cfg)
  variables = {"params": state["params"], **state["model_state"]}
  images = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
  shifted = [padded[:, 1 - dy:29 - dy, 1 - dx:29 - dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
  want = np.mean([np.asarray(model.embed_plain(variables, s)) for s in shifted], axis=0)
  got = np.asarray(model.embed(variables, images))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # One image alone gets the embedding it gets among others (no transduction).
  np.testing.assert_allclose(np.asarray(model.embed(variables, images[1:2]))[0], got[1],
                             rtol=1e-5, atol=1e-6)
  plain = ok.Model(cfg.replace(tta_shift=0))
  np.testing.assert_array_equal(np.asarray(plain.embed(variables, images)),
                                np.asarray(model.embed_plain(variables, images)))
