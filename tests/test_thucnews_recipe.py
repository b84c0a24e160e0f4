"""The THUCNews few-shot recipe: its loss functions trained through train.run, the
variant summary, and the whole protocol's sub-runs (resume included) on generated titles."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siamjax import bag, distances, fewshot, losses, results, sampling, train
from siamjax.data import thucnews
from siamjax.recipes import thucnews as recipe


def _synthetic(num_classes=4, per_class=40, max_len=24):
  titles, labels = thucnews.synthetic_titles(num_classes=num_classes, per_class=per_class)
  vocab = thucnews.build_vocab(titles, min_count=2)
  return jnp.asarray(thucnews.encode(titles, vocab, max_len=max_len)), labels, vocab


def _proto_accuracy(params, tok, labels, shots=5):
  emb = bag.bag_embed(params, tok)
  train_rows = np.concatenate([np.flatnonzero(labels == c)[:shots] for c in np.unique(labels)])
  protos = fewshot.prototypes(emb[train_rows], jnp.asarray(labels[train_rows]),
                              int(labels.max()) + 1)
  return fewshot.accuracy(fewshot.nearest_prototype(emb, protos)[0], labels)


def _mean_loss(loss_fn, params, data, *args, n=8):
  f = jax.jit(loss_fn)
  return float(np.mean([f(params, {}, data, jax.random.key(100 + i), *args)[0]
                        for i in range(n)]))


def _run(loss_fn, params, data, *, lr, num_steps, steps_per_call, prepare=None, **kw):
  opt = optax.adam(lr)
  state = train.init_state(params, opt, key=jax.random.key(1))
  return train.run(loss_fn, opt, state, data, num_steps=num_steps,
                   steps_per_call=steps_per_call, prepare=prepare, progress=False, **kw)


@pytest.mark.parametrize("name", ["default", "smoke"])
def test_presets_are_valid(name):
  cfg = recipe.PRESETS[name]()
  assert cfg.preset == name
  recipe._check(cfg)
  for f in ("seed", "devices", "data_dir"):
    assert hasattr(cfg, f)
  if name == "default":  # the committed protocol
    assert (cfg.shots, cfg.max_test, cfg.num_draws, cfg.seed_batch, cfg.seed_margin,
            cfg.seed_lr, cfg.seed_epochs) == (50, 3000, 5, 32, 2.0, 1e-3, 2)
    assert cfg.synthetic_per_class == 0
  else:
    assert cfg.synthetic_per_class > 0 and cfg.num_draws == 1


@pytest.mark.parametrize("field,value", [("num_draws", 0), ("keep_prob", 1.5),
                                         ("seed_len", 8), ("pretrain_lr", 0.0),
                                         ("checkpoint_every", -1)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    recipe._check(dataclasses.replace(recipe.Config(), **{field: value}))


def test_steps_per_call_divides():
  for n in (1, 7, 39, 100, 2142):
    for most in (1, 9, 50):
      k = recipe.steps_per_call_for(n, most)
      assert n % k == 0 and 1 <= k <= most
      assert not any(n % j == 0 for j in range(k + 1, min(most, n) + 1))


def test_split_view_loss_matches_the_concatenated_layout():
  """The interleaved views give the loss of [all views a; all views b] (ntxent is
  equivariant to permuting the batch)."""
  tok, _, vocab = _synthetic()
  params = bag.init_bag(jax.random.key(0), vocab.size, 16)
  b, key = 16, jax.random.key(5)
  loss_fn = recipe.split_view_loss_fn(batch_size=b, temperature=0.1)
  got = jax.jit(loss_fn)(params, {}, {"tokens": tok}, key)[0]

  @jax.jit
  def concatenated(params, key):
    k_rows, k_view = jax.random.split(key)
    t = tok[sampling.sample_rows(k_rows, tok.shape[0], b)]
    a, c = sampling.split_views(k_view, t)
    emb = bag.bag_embed(params, jnp.concatenate([t, t]), jnp.concatenate([a, c]))
    ids = jnp.concatenate([jnp.arange(b), jnp.arange(b)])
    return jnp.mean(losses.ntxent_loss(emb, ids, temperature=0.1))

  np.testing.assert_allclose(got, concatenated(params, key), rtol=1e-5)


@pytest.mark.slow
def test_split_view_pretraining_learns_and_traces_once():
  tok, labels, vocab = _synthetic()
  params = bag.init_bag(jax.random.key(0), vocab.size, 16)
  base = recipe.split_view_loss_fn(batch_size=32, temperature=0.1)
  traces = [0]

  def loss_fn(*args):
    traces[0] += 1
    return base(*args)

  data = {"tokens": tok}
  before, acc_before = _mean_loss(base, params, data), _proto_accuracy(params, tok, labels)
  state, fit = _run(loss_fn, jax.tree.map(jnp.copy, params), data, lr=1e-2, num_steps=100,
                    steps_per_call=25)
  assert fit["steps"] == 100 and np.isfinite(fit["final_loss"])
  assert _mean_loss(base, state["params"], data) < before
  assert _proto_accuracy(state["params"], tok, labels) > max(acc_before, 0.6)
  chex.assert_trees_all_equal_shapes(params, state["params"])
  many = traces[0]
  traces[0] = 0
  _run(loss_fn, jax.tree.map(jnp.copy, params), data, lr=1e-2, num_steps=25,
       steps_per_call=25)
  assert traces[0] == many  # 4 calls traced as often as one: no retrace per call


def test_in_batch_finetuning_separates_labelled_classes():
  tok, labels, vocab = _synthetic()
  params = bag.init_bag(jax.random.key(0), vocab.size, 16)
  loss_fn = recipe.in_batch_loss_fn(temperature=0.1, keep_prob=0.5)
  data = {"tokens": tok, "labels": jnp.asarray(labels)}
  before = _mean_loss(loss_fn, params, data)
  state, _ = _run(loss_fn, jax.tree.map(jnp.copy, params), data, lr=1e-2, num_steps=60,
                  steps_per_call=20)
  assert _mean_loss(loss_fn, state["params"], data) < before
  assert _proto_accuracy(state["params"], tok, labels) > 0.9


def test_pair_loss_matches_naive_contrastive():
  tok, labels, vocab = _synthetic(per_class=6)
  params = bag.init_bag(jax.random.key(0), vocab.size, 8)
  pairs, similar = sampling.exhaustive_pairs(jax.random.key(1), labels)
  rows = jnp.array([0, 3, len(pairs) - 1, len(pairs) // 2 + 2])
  data = {"tokens": tok, "pairs": pairs, "similar": similar}
  got = recipe.pair_loss_fn(bag.bag_embed, margin=2.0)(params, {}, data, None, rows)[0]
  e = np.asarray(bag.bag_embed(params, tok), np.float64)
  p, y = np.asarray(pairs)[rows], np.asarray(similar)[rows]
  d = np.linalg.norm(e[p[:, 0]] - e[p[:, 1]], axis=1)
  want = np.mean(0.5 * y * d ** 2 + 0.5 * (1 - y) * np.maximum(2.0 - d, 0) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pair_training_pulls_pairs_apart_over_shuffled_epochs():
  tok, labels, vocab = _synthetic(per_class=12)
  params = bag.init_bag(jax.random.key(0), vocab.size, 8)
  pairs, similar = sampling.exhaustive_pairs(jax.random.key(1), labels)
  data = {"tokens": tok, "pairs": pairs, "similar": similar}
  loss_fn, prepare = recipe.pair_loss_fn(bag.bag_embed, margin=2.0), recipe.pair_prepare(32)
  per_epoch = pairs.shape[0] // 32

  def gap(p):  # mean distance of negative pairs minus that of positive pairs
    e = bag.bag_embed(p, tok)
    d = distances.euclidean(e[pairs[:, 0]], e[pairs[:, 1]])
    return float(jnp.mean(d[similar == 0]) - jnp.mean(d[similar == 1]))

  spc = recipe.steps_per_call_for(2 * per_epoch, 9)
  state, fit = _run(loss_fn, jax.tree.map(jnp.copy, params), data, lr=1e-2,
                    num_steps=2 * per_epoch, steps_per_call=spc, prepare=prepare)
  assert fit["steps"] == 2 * per_epoch
  assert gap(state["params"]) > gap(params) + 0.1
  chex.assert_trees_all_equal_shapes(params, state["params"])
  small = {"tokens": tok, "pairs": pairs[:4], "similar": similar[:4]}
  with pytest.raises(ValueError, match="batch_size"):
    _run(loss_fn, jax.tree.map(jnp.copy, params), small, lr=1e-2, num_steps=1,
         steps_per_call=1, prepare=prepare)


def test_summarize_picks_best_by_validation_not_test():
  variants = {"a": {"test": [0.9, 0.9], "val": [0.5, 0.5]},
              "b": {"test": [0.6, 0.8], "val": [0.7, float("nan")]}}
  s = recipe.summarize(variants)
  assert s["best_variant"] == "b"
  assert s["best_accuracy_mean"] == pytest.approx(0.7)
  assert s["best_accuracy_std"] == pytest.approx(0.1)
  assert s["a_accuracy_mean"] == pytest.approx(0.9)


def _tiny():
  return dataclasses.replace(
      recipe.PRESETS["smoke"](), synthetic_per_class=30, shots=5, max_test=10,
      val_per_class=5, pretrain_steps=20, pretrain_batch=32, finetune_steps=4,
      scratch_steps=4, steps_per_call=4, seed_steps_per_call=4, checkpoint_every=8)


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_train_and_evaluate_every_variant_and_resume_in_the_killed_sub_run(tmp_path):
  pytest.importorskip("sklearn")
  cfg = _tiny()
  splitview = tmp_path / "seed0" / "splitview"

  def stop_after_first_splitview_checkpoint(step, state):
    if train.checkpoint_steps(splitview):
      raise _Stop

  with pytest.raises(_Stop):
    recipe.train_and_evaluate(cfg, tmp_path, progress=False,
                              hooks=(stop_after_first_splitview_checkpoint,))
  assert train.checkpoint_steps(splitview) == [8]
  assert not (tmp_path / "seed0" / "splitview_finetune").exists()

  calls = []
  out = recipe.train_and_evaluate(cfg, tmp_path, progress=False,
                                  hooks=(lambda step, state: calls.append(step),))
  # The finished seed_baseline and bag_scratch are restored; splitview resumes at step 8.
  assert calls == [12, 16, 20, 4]
  for run in ("seed_baseline", "bag_scratch", "splitview", "splitview_finetune"):
    assert train.checkpoint_steps(tmp_path / "seed0" / run), run
  assert set(out["variants"]) == set(recipe.VARIANTS)
  for r in out["variants"].values():
    assert len(r["test"]) == 1 and 0.0 <= r["test"][0] <= 1.0
  assert out["draws"] == [{"seed": 0, "train": 70, "val": 70, "test": 140,
                           "unlabelled": 140}]
  assert np.sum(out["confusion_best"]) == 140
  assert out["best_variant"] in recipe.VARIANTS
  assert out["training"]["seed0/splitview"]["steps"] == 20
  assert (tmp_path / "confusion_best.png").exists()
  json.dumps(results.finite(out), allow_nan=False)  # what the CLI writes

  again = recipe.train_and_evaluate(cfg, tmp_path, progress=False, eval_only=True)
  for name in recipe.VARIANTS:
    assert again["variants"][name]["test"] == out["variants"][name]["test"], name
