"""Tests for siamjax.fewshot: prototypes, classification, encoders and training steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import fewshot
from siamjax.data import thucnews


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


def test_bag_embed_masks_padding_and_views():
  params = fewshot.init_bag(jax.random.key(0), 10, 4)
  tok = jnp.array([[3, 5, 0, 0], [7, 0, 0, 0]])
  emb = fewshot.bag_embed(params, tok)
  e = params["embed"]
  np.testing.assert_allclose(emb[0], (e[3] + e[5]) / 2, rtol=1e-6)
  np.testing.assert_allclose(emb[1], e[7], rtol=1e-6)
  keep = jnp.array([[False, True, True, True], [False, True, True, True]])
  view = fewshot.bag_embed(params, tok, keep)
  np.testing.assert_allclose(view[0], e[5], rtol=1e-6)
  np.testing.assert_allclose(view[1], 0.0)  # nothing kept -> zeros, not NaN
  with pytest.raises(ValueError, match="vocab_size"):
    fewshot.init_bag(jax.random.key(0), 1, 4)


def test_split_views_are_disjoint_and_cover():
  tok = jnp.ones((64, 30), jnp.int32)
  a, b = fewshot.split_views(jax.random.key(3), tok)
  assert not bool(jnp.any(a & b)) and bool(jnp.all(a | b))
  assert 0.4 < float(jnp.mean(a)) < 0.6


def test_embed_all_matches_direct_call():
  params = fewshot.init_bag(jax.random.key(0), 50, 8)
  tok = np.random.default_rng(0).integers(0, 50, (37, 6)).astype(np.int32)
  np.testing.assert_allclose(fewshot.embed_all(fewshot.bag_embed, params, tok, chunk=16),
                             fewshot.bag_embed(params, jnp.asarray(tok)), rtol=1e-6)


def test_seed_pairs_positives_and_negatives():
  labels = np.repeat(np.arange(4), [5, 3, 4, 2]).astype(np.int32)
  pairs, similar = fewshot.seed_pairs(jax.random.key(0), labels)
  pairs, similar = np.asarray(pairs), np.asarray(similar)
  n_pos = 10 + 3 + 6 + 1
  assert pairs.shape == (2 * n_pos, 2) and similar.sum() == n_pos
  same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
  np.testing.assert_array_equal(same, similar == 1)
  assert np.all(pairs[similar == 1, 0] < pairs[similar == 1, 1])
  # Negatives reach every other class.
  neg_classes = labels[pairs[similar == 0, 1]]
  assert set(neg_classes.tolist()) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="two examples"):
    fewshot.seed_pairs(jax.random.key(0), np.arange(3))


def _synthetic(num_classes=4, per_class=40, max_len=24):
  titles, labels = thucnews.synthetic_titles(num_classes=num_classes, per_class=per_class)
  vocab = thucnews.build_vocab(titles, min_count=2)
  return jnp.asarray(thucnews.encode(titles, vocab, max_len=max_len)), labels, vocab


def _proto_accuracy(params, tok, labels, shots=5):
  emb = fewshot.bag_embed(params, tok)
  train = np.concatenate([np.flatnonzero(labels == c)[:shots] for c in np.unique(labels)])
  protos = fewshot.prototypes(emb[train], jnp.asarray(labels[train]), int(labels.max()) + 1)
  return fewshot.accuracy(fewshot.nearest_prototype(emb, protos)[0], labels)


def test_pretrain_split_view_learns_and_compiles_once():
  tok, labels, vocab = _synthetic()
  params = fewshot.init_bag(jax.random.key(0), vocab.size, 16)
  before = _proto_accuracy(params, tok, labels)
  trained, losses = fewshot.pretrain_split_view(params, tok, jax.random.key(1), steps=150,
                                                batch=32, temperature=0.1, lr=1e-2)
  assert losses.shape == (150,) and bool(jnp.all(jnp.isfinite(losses)))
  assert float(jnp.mean(losses[-20:])) < float(jnp.mean(losses[:20]))
  assert _proto_accuracy(trained, tok, labels) > max(before, 0.6)
  size = fewshot.pretrain_split_view._cache_size()
  fewshot.pretrain_split_view(params, tok, jax.random.key(2), steps=150, batch=32,
                              temperature=0.1, lr=1e-2)
  assert fewshot.pretrain_split_view._cache_size() == size  # no retrace


def test_finetune_in_batch_separates_labelled_classes():
  tok, labels, vocab = _synthetic()
  params = fewshot.init_bag(jax.random.key(0), vocab.size, 16)
  trained, losses = fewshot.finetune_in_batch(params, tok, jnp.asarray(labels),
                                              jax.random.key(1), steps=60, lr=1e-2)
  assert float(losses[-1]) < float(losses[0])
  assert _proto_accuracy(trained, tok, labels) > 0.9


def test_train_pair_contrastive_pulls_pairs_apart():
  tok, labels, vocab = _synthetic(per_class=12)
  params = fewshot.init_bag(jax.random.key(0), vocab.size, 8)
  pairs, similar = fewshot.seed_pairs(jax.random.key(1), labels)
  trained, losses = fewshot.train_pair_contrastive(
      fewshot.bag_embed, params, tok, pairs, similar, jax.random.key(2), epochs=2,
      batch=32, margin=2.0, lr=1e-2)
  assert losses.shape == (2 * (pairs.shape[0] // 32),)
  assert float(jnp.mean(losses[-10:])) < float(jnp.mean(losses[:10]))
  chex.assert_trees_all_equal_shapes(params, trained)
  with pytest.raises(ValueError, match="batch"):
    fewshot.train_pair_contrastive(fewshot.bag_embed, params, tok, pairs[:4], similar[:4],
                                   jax.random.key(2), batch=32)


def test_summarize_picks_best_by_validation_not_test():
  out = {"variants": {"a": {"test": [0.9, 0.9], "val": [0.5, 0.5]},
                      "b": {"test": [0.6, 0.8], "val": [0.7, float("nan")]}}}
  s = fewshot.summarize(out)
  assert s["best_variant"] == "b"
  assert s["best_accuracy_mean"] == pytest.approx(0.7)
  assert s["best_accuracy_std"] == pytest.approx(0.1)
  assert s["a_accuracy_mean"] == pytest.approx(0.9)


@pytest.mark.slow
def test_run_thucnews_reports_every_variant_on_generated_titles():
  pytest.importorskip("sklearn")
  titles, labels = thucnews.synthetic_titles(num_classes=4, per_class=40)
  out = fewshot.run_thucnews(titles, labels, seeds=(0,), shots=5, max_test=20,
                             val_per_class=5, pretrain_steps=20, pretrain_batch=32,
                             finetune_steps=5, scratch_steps=5, seed_epochs=1,
                             log=lambda _: None)
  names = {"tfidf_lr", "seed_baseline_sum", "seed_baseline_mean", "bag_scratch",
           "splitview", "splitview_finetune", "splitview_finetune+tfidf_lr"}
  assert set(out["variants"]) == names and set(out["confusion"]) == names
  for r in out["variants"].values():
    assert len(r["test"]) == 1 and 0.0 <= r["test"][0] <= 1.0
  assert np.sum(out["confusion"]["tfidf_lr"]) == 4 * 20
  assert out["draws"] == [{"seed": 0, "train": 20, "val": 20, "test": 80, "unlabelled": 40}]
  summary = fewshot.summarize(out)
  assert summary["best_variant"] in names
