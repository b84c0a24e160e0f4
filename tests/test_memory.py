"""Cross-batch memory: the ring buffer, and losses against it equal to PML's CrossBatchMemory."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from siamjax import losses as L
from siamjax import memory, parallel

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# -- naive in-batch losses with a reference set (the losses module's ref_* keywords) --------


def _euclidean(a, b):
  sq = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _partners(ref_valid, ref_exclude, b):
  """[B, R]: the valid reference rows, less each anchor's ref_exclude row (-1: none)."""
  keep = jnp.broadcast_to(ref_valid[None, :], (b, ref_valid.shape[0]))
  if ref_exclude is not None:
    keep = keep & (ref_exclude[:, None] != jnp.arange(ref_valid.shape[0])[None, :])
  return keep


def naive_contrastive(emb, labels, *, ref_embeddings, ref_labels, ref_valid, margin=1.0,
                      valid=None, chunk_size=None, ref_exclude=None):
  d = _euclidean(emb, ref_embeddings)
  same = labels[:, None] == ref_labels[None, :]
  per_pair = jnp.where(same, 0.5 * d**2, 0.5 * jnp.maximum(margin - d, 0.0) ** 2)
  keep = _partners(ref_valid, ref_exclude, emb.shape[0])
  n = jnp.sum(keep, axis=1)
  out = jnp.sum(jnp.where(keep, per_pair, 0.0), axis=1) / jnp.maximum(n, 1)
  return out if valid is None else jnp.where(valid, out, 0.0)


def naive_batch_all(emb, labels, *, ref_embeddings, ref_labels, ref_valid, margin=1.0,
                    ref_exclude=None, chunk_size=None):
  d = _euclidean(emb, ref_embeddings)
  same = labels[:, None] == ref_labels[None, :]
  keep = _partners(ref_valid, ref_exclude, emb.shape[0])
  pos = same & keep
  neg = ~same & keep
  trip = pos[:, :, None] & neg[:, None, :]
  per = jnp.maximum(d[:, :, None] - d[:, None, :] + margin, 0.0)
  n = jnp.sum(trip, axis=(1, 2))
  return jnp.where(n > 0, jnp.sum(jnp.where(trip, per, 0.0), axis=(1, 2)) / jnp.maximum(n, 1),
                   0.0)


def test_ref_exclude_of_the_losses_equals_the_naive_ones():
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    emb = jnp.asarray(rng.normal(size=(5, 3)))
    labels = jnp.asarray(rng.integers(0, 2, 5), jnp.int32)
    ref = jnp.asarray(rng.normal(size=(7, 3)))
    kw = dict(ref_labels=jnp.asarray(rng.integers(0, 2, 7), jnp.int32),
              ref_valid=jnp.asarray([True] * 6 + [False]),
              ref_exclude=jnp.asarray([0, 3, -1, 6, 3], jnp.int32), margin=1.3)
    for fast, naive in [(L.all_pairs_contrastive_loss, naive_contrastive),
                        (L.batch_all_triplet_loss, naive_batch_all)]:
      got, g = jax.value_and_grad(
          lambda e: jnp.sum(fast(e, labels, ref_embeddings=ref, **kw)))(emb)
      want, g_want = jax.value_and_grad(
          lambda e: jnp.sum(naive(e, labels, ref_embeddings=ref, **kw)))(emb)
      np.testing.assert_allclose(got, want, rtol=1e-10)
      np.testing.assert_allclose(g, g_want, rtol=1e-9, atol=1e-12)


# -- the ring buffer --------------------------------------------------------------------------


def test_push_fills_in_order_then_wraps_like_a_ring():
  mem = memory.init(5, 2)
  seen = []
  for step in range(4):
    rows = np.arange(3) + 3 * step
    seen.extend(rows.tolist())
    mem = memory.push(mem, jnp.asarray(np.stack([rows, -rows], 1), jnp.float32),
                      jnp.asarray(rows, jnp.int32))
    last5 = seen[-5:]
    expect = {i % 5: v for i, v in zip(range(len(seen) - len(last5), len(seen)), last5)}
    assert int(mem.index) == len(seen) % 5
    assert mem.valid.tolist() == [s in expect for s in range(5)]
    for slot, v in expect.items():
      assert int(mem.labels[slot]) == v and mem.embeddings[slot].tolist() == [v, -v]
    assert memory.last_slots(mem, 3).tolist() == [i % 5 for i in range(len(seen) - 3,
                                                                          len(seen))]


def test_push_under_jit_casts_stops_gradient_and_marks_invalid_rows():
  mem = memory.init(4, 3, jnp.bfloat16)
  emb = jnp.arange(6.0).reshape(2, 3)
  pushed = jax.jit(memory.push)(mem, emb, jnp.array([1, 2]), jnp.array([True, False]))
  assert pushed.embeddings.dtype == jnp.bfloat16 and pushed.labels.dtype == jnp.int32
  assert pushed.valid.tolist() == [True, False, False, False]
  grad = jax.grad(lambda e: jnp.sum(memory.push(mem, e, jnp.array([1, 2])).embeddings
                                    .astype(jnp.float32)))(emb)
  np.testing.assert_array_equal(grad, 0.0)
  leaves = jax.tree.leaves(pushed)
  assert len(leaves) == 4  # a plain pytree: donate it, checkpoint it, shard it
  assert memory.reference(pushed)["ref_valid"] is pushed.valid


def test_bad_inputs_raise_value_errors():
  mem = memory.init(4, 3)
  with pytest.raises(ValueError, match="size must be a positive int"):
    memory.init(0, 3)
  with pytest.raises(ValueError, match="dim must be a positive int"):
    memory.init(4, 2.0)
  with pytest.raises(ValueError, match="dtype must be a floating"):
    memory.init(4, 3, jnp.int32)
  with pytest.raises(ValueError, match="more than the memory's 4 slots"):
    memory.push(mem, jnp.zeros((5, 3)), jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="the memory stores D = 3"):
    memory.push(mem, jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="labels must be integer"):
    memory.push(mem, jnp.zeros((2, 3)), jnp.zeros(2))
  with pytest.raises(ValueError, match="valid must be a"):
    memory.push(mem, jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.ones(2))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    memory.cross_batch_loss(naive_contrastive, mem, jnp.zeros((2, 3)),
                            jnp.zeros(2, jnp.int32), chunk_size=0)
  with pytest.raises(ValueError, match=r"anchor_indices must be rows in \[0, 2\)"):
    memory.cross_batch_loss(naive_contrastive, mem, jnp.zeros((2, 3)),
                            jnp.zeros(2, jnp.int32), anchor_indices=jnp.array([2]))
  with pytest.raises(ValueError, match="the memory stores D = 3"):
    memory.cross_batch_loss(naive_contrastive, mem, jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32))


# -- cross_batch_loss against PML's CrossBatchMemory --------------------------------------------


def _batches(seed, n_steps, b, d, n_classes):
  rng = np.random.default_rng(seed)
  for _ in range(n_steps):
    # irregular counts: a skewed label distribution, so singletons and absent classes occur
    p = rng.dirichlet(np.full(n_classes, 0.7))
    yield rng.normal(size=(b, d)), rng.choice(n_classes, size=b, p=p).astype(np.int64)


def _pml_per_anchor(loss_dict, b, torch):
  """Per-anchor means of PML's un-reduced pair/triplet losses, in siamjax's form."""
  total = torch.zeros(b, dtype=torch.float64)
  count = torch.zeros(b, dtype=torch.float64)
  for name, info in loss_dict.items():
    losses, idx = info["losses"], info["indices"]
    if not torch.is_tensor(losses) or len(losses) == 0:
      continue
    if name in ("pos_loss", "neg_loss"):  # ContrastiveLoss: relu(d) and relu(m - d)
      losses = 0.5 * losses**2
    total = total.index_add(0, idx[0], losses.double())
    count = count.index_add(0, idx[0], torch.ones_like(losses, dtype=torch.float64))
  return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _pml_xbm(kind, d, size, margin):
  pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import distances, losses, miners, reducers
  dist = distances.LpDistance(normalize_embeddings=False)
  miner = None
  if kind == "contrastive":
    inner = losses.ContrastiveLoss(pos_margin=0, neg_margin=margin, distance=dist,
                                   reducer=reducers.DoNothingReducer())
  else:
    inner = losses.TripletMarginLoss(margin=margin, distance=dist,
                                     reducer=reducers.DoNothingReducer())
    if kind == "batch_hard":
      miner = miners.BatchHardMiner(distance=dist)
  return losses.CrossBatchMemory(inner, d, memory_size=size, miner=miner)


# kind -> the losses compared with PML: a naive one written here and siamjax's own
SIAMJAX = {"contrastive": [naive_contrastive, L.all_pairs_contrastive_loss],
           "triplet": [naive_batch_all, L.batch_all_triplet_loss],
           "batch_hard": [L.batch_hard_triplet_loss]}


@pytest.mark.parametrize("kind", list(SIAMJAX))
@pytest.mark.parametrize("b,size,seed", [(5, 12, 0), (4, 4, 1), (3, 7, 2)])
def test_cross_batch_loss_equals_pml_cross_batch_memory(kind, b, size, seed):
  """Values and gradients, step by step: before the memory fills, as it wraps, after."""
  torch = pytest.importorskip("torch")
  d, margin, n_steps = 3, 1.5, 6
  pml = _pml_xbm(kind, d, size, margin)
  fns = SIAMJAX[kind]
  with jax.enable_x64(True):
    mems = [memory.init(size, d, jnp.float64) for _ in fns]

    def step(fn, mem, x, y):
      mem = memory.push(mem, x, y)

      def mean_loss(e):
        per_anchor = memory.cross_batch_loss(fn, mem, e, y, margin=margin, chunk_size=2)
        return jnp.mean(per_anchor), per_anchor

      (_, per_anchor), grad = jax.value_and_grad(mean_loss, has_aux=True)(x)
      return mem, per_anchor, grad

    jitted = [jax.jit(functools.partial(step, fn)) for fn in fns]
    for x, y in _batches(seed, n_steps, b, d, n_classes=3):
      xt = torch.tensor(x, requires_grad=True)
      ref = _pml_per_anchor(pml(xt, torch.from_numpy(y)), b, torch)
      if ref.requires_grad:  # (not when PML found no pair or triplet at all)
        ref.mean().backward()
      ref_grad = np.zeros_like(x) if xt.grad is None else xt.grad.numpy()
      for i, f in enumerate(jitted):
        mems[i], per_anchor, grad = f(mems[i], jnp.asarray(x), jnp.asarray(y, jnp.int32))
        np.testing.assert_allclose(per_anchor, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
      # the memories agree too (PML's queue_idx, and its filled slots)
      assert int(mems[0].index) == pml.queue_idx
      filled = size if pml.has_been_filled else pml.queue_idx
      np.testing.assert_allclose(np.asarray(mems[0].embeddings)[:filled],
                                 pml.embedding_memory.numpy()[:filled])
      assert int(jnp.sum(mems[0].valid)) == filled


@pytest.mark.parametrize("fn", [L.all_pairs_contrastive_loss, L.batch_hard_triplet_loss],
                         ids=lambda f: f.__name__)
def test_compiled_memory_stays_chunked(fn):
  b, size, d = 64, 8192, 256
  mem = memory.Memory(jnp.zeros((size, d)), jnp.zeros(size, jnp.int32), jnp.ones(size, bool),
                      jnp.zeros((), jnp.int32))
  y = jnp.zeros(b, jnp.int32)
  f = jax.jit(jax.grad(lambda e: jnp.mean(memory.cross_batch_loss(fn, mem, e, y))))
  temp = f.lower(jnp.zeros((b, d))).compile().memory_analysis().temp_size_in_bytes
  # O(S D) for the centred copy of the memory (8 MiB) plus O(chunk * S) (2 MiB per
  # [64, 8192] array); a per-anchor O(chunk * S * D) would be 64 * 8192 * 256 floats, 512 MiB
  assert temp < 40 * 2**20


def test_multi_similarity_with_pml_default_reducer():
  """The same loss wrapped, PML's own reduction: jnp.mean equals PML's MeanReducer."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import losses
  b, size, d = 6, 10, 4
  pml = losses.CrossBatchMemory(losses.MultiSimilarityLoss(alpha=2, beta=10, base=0.5), d,
                                memory_size=size)
  with jax.enable_x64(True):
    mem = memory.init(size, d, jnp.float64)

    @jax.jit
    def step(mem, x, y):
      mem = memory.push(mem, x, y)
      value, grad = jax.value_and_grad(lambda e: jnp.mean(memory.cross_batch_loss(
          L.multi_similarity_loss, mem, e, y, alpha=2.0, beta=10.0, base=0.5)))(x)
      return mem, value, grad

    for x, y in _batches(7, 4, b, d, n_classes=3):
      xt = torch.tensor(x, requires_grad=True)
      ref = pml(xt, torch.from_numpy(y))
      ref.backward()
      mem, value, grad = step(mem, jnp.asarray(x), jnp.asarray(y, jnp.int32))
      np.testing.assert_allclose(float(value), ref.item(), rtol=1e-10)
      np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_check_grads_float32_and_vmap_over_memories():
  from jax.test_util import check_grads
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    mem = memory.push(memory.init(9, 3, jnp.float64), jnp.asarray(rng.normal(size=(5, 3))),
                      jnp.asarray(rng.integers(0, 2, 5), jnp.int32))
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(rng.integers(0, 2, 4), jnp.int32)
    mem = memory.push(mem, x, y)
    f64 = lambda e: jnp.mean(memory.cross_batch_loss(  # noqa: E731
        L.all_pairs_contrastive_loss, mem, e, y, margin=2.0))
    check_grads(f64, (x,), order=1, modes=("rev",))
    value64, grad64 = jax.value_and_grad(f64)(x)
  # float32 storage and compute agree with float64
  mem32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, mem)
  value32, grad32 = jax.value_and_grad(lambda e: jnp.mean(memory.cross_batch_loss(
      L.all_pairs_contrastive_loss, mem32, e, y, margin=2.0)))(x.astype(jnp.float32))
  assert value32.dtype == jnp.float32
  np.testing.assert_allclose(value32, value64, rtol=1e-5)
  np.testing.assert_allclose(grad32, grad64, rtol=1e-4, atol=1e-6)
  # vmap: independent memories (e.g. one per task) pushed in one call
  mems = jax.vmap(lambda e, l: memory.push(memory.init(4, 3), e, l))(
      jnp.ones((2, 3, 3)) * jnp.array([1.0, 2.0])[:, None, None], jnp.zeros((2, 3), jnp.int32))
  assert mems.embeddings.shape == (2, 4, 3) and mems.index.tolist() == [3, 3]
  np.testing.assert_array_equal(mems.embeddings[1, :3], 2.0)


def test_exclude_self_false_and_valid_rows():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  y = jnp.array([0, 0, 1, 1])
  mem = memory.push(memory.init(6, 2), x, y)
  xbl = jax.jit(functools.partial(memory.cross_batch_loss, naive_contrastive),
                static_argnames="exclude_self")
  plain = xbl(mem, x, y, exclude_self=False)
  np.testing.assert_allclose(plain, naive_contrastive(x, y, **memory.reference(mem)))
  # each anchor's own copy is a positive at distance 0: it adds a zero term to the mean
  excluded = xbl(mem, x, y)
  np.testing.assert_allclose(plain, excluded * 3 / 4, rtol=1e-6)
  keep = jnp.array([True, False, True, True])
  np.testing.assert_allclose(xbl(mem, x, y, valid=keep), jnp.where(keep, excluded, 0.0),
                             rtol=1e-6)
  rows = jnp.array([3, 0])
  np.testing.assert_allclose(xbl(mem, x, y, anchor_indices=rows), excluded[rows], rtol=1e-6)


def test_cross_batch_loss_shards_with_cross_device_loss():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (conftest makes 8 fake CPU devices)")
  fn = L.all_pairs_contrastive_loss
  rng = np.random.default_rng(6)
  mem = memory.init(10, 3)
  for _ in range(2):  # some history in the memory
    mem = memory.push(mem, jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                      jnp.asarray(rng.integers(0, 3, 6), jnp.int32))
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
  mem = memory.push(mem, x, y)  # wraps around
  mesh = parallel.make_mesh(2)

  def sharded(e):
    def local(e_loc, y_loc, m):
      loss = parallel.cross_device_loss(functools.partial(memory.cross_batch_loss, fn, m))
      per_anchor = loss(e_loc, y_loc, margin=0.8)
      return jax.lax.pmean(jnp.mean(per_anchor), "data"), per_anchor
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                         out_specs=(P(), P("data")))(e, y, mem)

  (value, per_anchor), grad = jax.jit(jax.value_and_grad(sharded, has_aux=True))(x)
  single = lambda e: jnp.mean(memory.cross_batch_loss(fn, mem, e, y, margin=0.8))  # noqa: E731
  ref_value, ref_grad = jax.value_and_grad(single)(x)
  np.testing.assert_allclose(per_anchor, memory.cross_batch_loss(fn, mem, x, y, margin=0.8),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_jitted_train_step_with_memory_runs_and_does_not_retrace():
  import chex
  import optax
  fn = L.all_pairs_contrastive_loss
  opt = optax.adam(1e-2)
  k_w, k_data = jax.random.split(jax.random.key(0))
  params = {"w1": 0.3 * jax.random.normal(k_w, (6, 8)), "w2": jnp.eye(8, 4)}

  def embed(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, opt_state, mem, x, y):
    def loss_fn(p):
      emb = embed(p, x)
      new_mem = memory.push(mem, emb, y)
      return jnp.mean(memory.cross_batch_loss(fn, new_mem, emb, y, margin=1.0)), new_mem
    (loss, mem), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mem, loss

  state = (params, opt.init(params), memory.init(32, 4))
  losses_seen = []
  for step in range(6):
    kx, ky = jax.random.split(jax.random.fold_in(k_data, step))
    x = jax.random.normal(kx, (12, 6))
    y = jax.random.randint(ky, (12,), 0, 4)
    *state, loss = train_step(*state, x, y)
    losses_seen.append(float(loss))
  assert np.all(np.isfinite(losses_seen))
  mem = state[2]
  assert int(mem.index) == 72 % 32 and bool(jnp.all(mem.valid))


def test_readme_xbm_example_runs():
  text = README.read_text()
  section = text[text.index("### Cross-batch memory"):]
  block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert np.isfinite(float(namespace["loss"]))
  assert int(namespace["mem"].index) > 0
