"""The mining losses of the MNIST triplet recipe agree with naive triplet loops; P x K batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamjax import losses, sampling
from siamjax.recipes import mnist


def _naive(emb, labels, margin, rule):
  d = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
  out = np.zeros(len(labels))
  for a in range(len(labels)):
    pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
    neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
    if not pos or not neg:
      continue
    if rule == "batch_all":
      out[a] = np.mean([max(d[a, p] - d[a, n] + margin, 0) for p in pos for n in neg])
    elif rule == "batch_hard":
      out[a] = max(max(d[a, pos]) - min(d[a, neg]) + margin, 0)
    else:  # semi_hard: closest negative farther than the positive, else the farthest
      vals = []
      for p in pos:
        semi = [d[a, n] for n in neg if d[a, n] > d[a, p]]
        dn = min(semi) if semi else max(d[a, neg])
        vals.append(max(d[a, p] - dn + margin, 0))
      out[a] = np.mean(vals)
  return out


@pytest.mark.parametrize("rule", sorted(mnist.MINING))
@pytest.mark.parametrize("seed", [0, 1])
def test_mining_losses_match_naive_loops(rule, seed):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(24, 5)).astype(np.float32)
  labels = rng.integers(0, 4, 24).astype(np.int32)
  labels[0] = 9  # a class of one: no positive, loss 0
  got = mnist.MINING[rule](jnp.asarray(emb), jnp.asarray(labels), margin=0.7, chunk_size=5)
  np.testing.assert_allclose(np.asarray(got), _naive(emb.astype(np.float64), labels, 0.7, rule),
                             rtol=2e-4, atol=2e-5)
  assert float(got[0]) == 0.0


def test_pk_groups_draw_distinct_classes_and_their_members():
  """The triplet recipe's P x K batches: sampling.sample_groups with replacement."""
  labels = np.repeat(np.arange(7), [3, 5, 2, 8, 4, 6, 9]).astype(np.int32)
  table = sampling.index_table(labels)
  sample = jax.jit(sampling.sample_groups, static_argnums=(2, 3),
                   static_argnames="replace")
  seen = set()
  for i in range(20):
    positions, batch_labels = sample(jax.random.key(i), table, 4, 3, replace=True)
    positions, batch_labels = np.asarray(positions), np.asarray(batch_labels)
    assert positions.shape == (12,)
    np.testing.assert_array_equal(labels[positions], batch_labels)
    assert len(set(batch_labels.tolist())) == 4
    seen.update(positions.tolist())
  assert len(seen) > 30  # reaches most of the 37 images
  with pytest.raises(ValueError, match="n_classes"):
    sampling.sample_groups(jax.random.key(0), table, 8, 2, replace=True)


def test_in_batch_losses_used_are_per_anchor():
  emb = jnp.array([[0.0], [0.5], [1.0], [3.0]])
  labels = jnp.array([0, 0, 1, 1])
  assert losses.batch_hard_triplet_loss(emb, labels).shape == (4,)
