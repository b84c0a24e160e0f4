"""Cross-device losses equal the single-device loss on the concatenated batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from siamjax import losses as L
from siamjax import parallel

RNG = np.random.default_rng(3)
IN_BATCH = [L.batch_hard_triplet_loss, L.batch_all_triplet_loss, L.semi_hard_triplet_loss,
            L.all_pairs_contrastive_loss, L.ntxent_loss, L.in_batch_softmax_loss,
            L.multi_similarity_loss, L.circle_loss, L.lifted_structure_loss]


def _needs(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (conftest makes 8 fake CPU devices)")


def test_make_mesh_and_errors():
  _needs(4)
  mesh = parallel.make_mesh(4)
  assert mesh.shape == {"data": 4}
  assert parallel.batch_sharding(mesh).spec == P("data")
  assert parallel.replicated_sharding(mesh).spec == P()
  with pytest.raises(ValueError, match="num_devices must be between 1 and"):
    parallel.make_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(0)


# Every loss on one mesh, the meshes taken in turn: the gather does not depend on the loss.
@pytest.mark.slow
@pytest.mark.parametrize("fn,n_devices", [(f, (4, 8)[i % 2]) for i, f in enumerate(IN_BATCH)],
                         ids=lambda x: getattr(x, "__name__", x))
def test_cross_device_loss_and_gradient_equal_single_device(fn, n_devices):
  _needs(n_devices)
  b = 32
  emb = jnp.asarray(RNG.normal(size=(b, 6)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 5, size=b), jnp.int32)
  mesh = parallel.make_mesh(n_devices)
  gathered = parallel.cross_device_loss(fn)

  def sharded_mean(e, l):
    def local(e_loc, l_loc):
      per_anchor = gathered(e_loc, l_loc, chunk_size=3)
      return jax.lax.pmean(jnp.mean(per_anchor), "data"), per_anchor
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                         out_specs=(P(), P("data")))(e, l)

  (loss, per_anchor), grad = jax.jit(jax.value_and_grad(sharded_mean, has_aux=True))(emb, labels)
  ref_per_anchor = fn(emb, labels)
  ref_loss, ref_grad = jax.value_and_grad(lambda e: jnp.mean(fn(e, labels)))(emb)
  np.testing.assert_allclose(per_anchor, ref_per_anchor, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # float32 sums taken in another order: an element much smaller than the largest one
  # carries the rounding of the largest, so the absolute tolerance scales with max |g|
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=5e-5 * float(jnp.max(jnp.abs(ref_grad))))


@pytest.mark.parametrize("fn", [L.batch_hard_triplet_loss, L.ntxent_loss, L.circle_loss],
                         ids=lambda f: f.__name__)
def test_cross_device_loss_gathers_valid(fn):
  # valid= is per row: each device passes its own rows, and padding on one device must
  # not be a partner of another device's anchors (it used to reach loss_fn unshaped)
  _needs(4)
  b = 16
  emb = jnp.asarray(RNG.normal(size=(b, 5)), jnp.float32)
  labels = jnp.asarray(np.arange(b) % 3, jnp.int32)
  valid = jnp.asarray(RNG.random(b) < 0.7)
  mesh = parallel.make_mesh(4)
  gathered = parallel.cross_device_loss(fn)

  def sharded_mean(e):
    def local(e_loc, l_loc, v_loc):
      per_anchor = gathered(e_loc, l_loc, valid=v_loc, chunk_size=3)
      return jax.lax.psum(jnp.sum(per_anchor), "data"), per_anchor
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                         out_specs=(P(), P("data")))(e, labels, valid)

  (total, per_anchor), grad = jax.jit(jax.value_and_grad(sharded_mean, has_aux=True))(emb)
  ref_per_anchor = fn(emb, labels, valid=valid)
  ref_total, ref_grad = jax.jit(jax.value_and_grad(
      lambda e: jnp.sum(fn(e, labels, valid=valid))))(emb)
  np.testing.assert_allclose(per_anchor, ref_per_anchor, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(per_anchor)[~np.asarray(valid)])
  with pytest.raises(ValueError, match="this device's"):
    jax.shard_map(lambda e, l: gathered(e, l, valid=valid), mesh=mesh,
                  in_specs=(P("data"), P("data")), out_specs=P("data"))(emb, labels)


@pytest.mark.slow
def test_anchor_indices_select_rows():
  emb = jnp.asarray(RNG.normal(size=(10, 3)), jnp.float32)
  labels = jnp.asarray(np.arange(10) % 3, jnp.int32)
  full = L.batch_hard_triplet_loss(emb, labels)
  rows = jnp.array([7, 2, 9])
  np.testing.assert_allclose(L.batch_hard_triplet_loss(emb, labels, anchor_indices=rows),
                             full[rows], rtol=1e-6)
  with pytest.raises(ValueError, match="anchor_indices must be integer"):
    L.batch_hard_triplet_loss(emb, labels, anchor_indices=jnp.array([1.0]))


def test_initialize_distributed_is_a_no_op_on_one_machine(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize_distributed() is False


def _toy_step():
  import optax
  opt = optax.sgd(0.1)

  def loss(params, key):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (32, 6))
    y = jax.random.randint(k2, (32,), 0, 4)
    x, y = parallel.shard_batch((x, y))
    emb = jnp.tanh(x @ params["w"])
    return jnp.mean(L.batch_hard_triplet_loss(emb, y))

  def step(state, key):
    params, opt_state = state
    value, grads = jax.value_and_grad(loss)(params, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), value

  # its own generator: drawn from the module's RNG, the parameters depended on which
  # tests ran before in the same pytest-xdist worker
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)}
  return step, (params, opt.init(params))


@pytest.mark.parametrize("n_devices", [4, 8])
def test_data_parallel_step_is_independent_of_device_count(n_devices):
  _needs(n_devices)
  step, state = _toy_step()
  key = jax.random.key(5)
  (p1, _), l1 = jax.jit(step)(state, key)
  mesh = parallel.make_mesh(n_devices)
  (pn, _), ln = parallel.data_parallel(step, mesh)(state, key)
  assert pn["w"].sharding.mesh.shape["data"] == n_devices
  np.testing.assert_allclose(float(ln), float(l1), rtol=1e-5)
  # The sharded step sums the gradient in another order; through batch-hard's distances
  # (a square root of Gram-form squares) float32 reordering moves the updated parameters
  # by up to ~6e-6 (max over 12 parameter seeds, the same before and after siamjax's
  # one-block Gram change), so the bound is absolute at 1e-5 on parameters of size ~1.
  np.testing.assert_allclose(np.asarray(pn["w"]), np.asarray(p1["w"]), rtol=1e-5, atol=1e-5)
  hlo = parallel.data_parallel(step, mesh).lower(state, key).compile().as_text()
  assert "all-reduce" in hlo or "all-gather" in hlo  # the work really is split


def test_shard_batch_rejects_indivisible_batch():
  _needs(4)
  mesh = parallel.make_mesh(4)
  f = parallel.data_parallel(lambda x: parallel.shard_batch(x * 2), mesh)
  with pytest.raises(ValueError, match="multiple of the device count"):
    f(jnp.ones((6, 2)))
