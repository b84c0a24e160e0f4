"""Data parallelism over devices and hosts: meshes, shardings, cross-device in-batch losses.

Why not ``jax.pmap``: ``pmap`` is in maintenance mode and is itself implemented on top of
``jax.shard_map`` and ``jit`` shardings. siamjax builds on those directly: a 1-D
``Mesh`` named ``"data"`` over the devices, the batch sharded along it and the
parameters replicated. Inside ``jax.shard_map`` each device sees its local slice and
collectives (``lax.pmean``, ``lax.all_gather``) name the axis; outside it, plain ``jit``
with ``NamedSharding`` inputs lets XLA insert them.

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize()``) once
per process before any other JAX call; ``jax.devices()`` then lists every host's devices
and the same mesh code spans them.

Fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) run all of this
on one machine. They check correctness; they say nothing about speed.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "batch_sharding",
    "replicated_sharding",
    "shard_batch",
    "data_parallel",
    "replicate",
    "local",
    "cross_device_loss",
    "initialize_distributed",
]

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D data-parallel mesh over the first ``num_devices`` devices (all by default).

  Args:
    num_devices: how many devices to use; ``None`` for all of ``jax.devices()``.
    axis_name: the mesh axis name used by shardings and collectives.

  Returns:
    A ``jax.sharding.Mesh`` with one axis.

  Raises:
    ValueError: ``num_devices`` is not in ``[1, jax.device_count()]``.

  References:
    JAX documentation, "Distributed arrays and automatic parallelization" and
    "Manual parallelism with shard_map".

  >>> dict(make_mesh(1).shape)
  {'data': 1}
  """
  available = jax.devices()
  n = len(available) if num_devices is None else num_devices
  if not isinstance(n, int) or n < 1 or n > len(available):
    raise ValueError(
        f"num_devices must be between 1 and the {len(available)} available "
        f"{available[0].platform} device(s), got {num_devices!r}. On a CPU, "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts) "
        "makes N fake devices for correctness checks.")
  return Mesh(available[:n], (axis_name,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis across the mesh.

  Args:
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    ``NamedSharding(mesh, P(axis))``: each device holds ``B / n`` rows.

  References:
    JAX documentation, ``jax.sharding.NamedSharding``.

  >>> batch_sharding(make_mesh(1)).spec == P("data")
  True
  """
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device (parameters, optimiser state).

  Args:
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    ``NamedSharding(mesh, P())``.

  References:
    JAX documentation, ``jax.sharding.NamedSharding``.

  >>> replicated_sharding(make_mesh(1)).spec == P()
  True
  """
  return NamedSharding(mesh, P())


def shard_batch(tree):
  """Constrains a batch (any pytree, leading axis = batch) to be split over the data axis.

  Call it on the pairs a train step samples (inside ``jit``): XLA then partitions the
  sampling, augmentation, encoding and loss of each device's slice onto that device and
  inserts the gradient all-reduce. With JAX's partitionable Threefry RNG (the default)
  the random numbers do not depend on the sharding, so the global batch and the results
  are the same for any device count. Without an ambient mesh (``jax.set_mesh``, which
  :func:`data_parallel` sets) it returns ``tree`` unchanged, so the same loss function
  serves one device and many.

  Args:
    tree: a pytree of ``[B, ...]`` arrays; ``B`` must be divisible by the device count.

  Returns:
    the same pytree with a sharding constraint on every leaf.

  References:
    JAX documentation, "Distributed arrays and automatic parallelization"
    (``jax.lax.with_sharding_constraint``).

  >>> import jax.numpy as jnp
  >>> shard_batch({"x": jnp.ones((4, 2))})["x"].shape  # no mesh set: unchanged
  (4, 2)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree
  axis = mesh.axis_names[0]
  n = mesh.shape[axis]

  def constrain(x):
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f"batch of shape {x.shape} cannot be split over {n} devices: "
                       f"the batch size must be a multiple of the device count")
    return jax.lax.with_sharding_constraint(x, P(axis))

  return jax.tree.map(constrain, tree)


def data_parallel(fn: Callable, mesh: Mesh, *, donate_argnums=()) -> Callable:
  """``jit(fn)`` over ``mesh``: arguments and results replicated, batches sharded inside.

  Every argument (train state, the on-device training set, ...) is replicated on every
  device; inside ``fn``, :func:`shard_batch` splits what is sampled per step across the
  mesh, and XLA reduces the gradients. Calls run with ``mesh`` as the ambient mesh.

  Args:
    fn: the function to compile, e.g. a train step ``(state, data) -> (state, metrics)``.
    mesh: from :func:`make_mesh`.
    donate_argnums: as for ``jax.jit``.

  Returns:
    a callable with ``fn``'s signature.

  References:
    big_vision's ``train.py`` (a replicated state, a sharded batch, ``jit`` everywhere).
  """
  rep = replicated_sharding(mesh)
  compiled = jax.jit(fn, in_shardings=rep, out_shardings=rep, donate_argnums=donate_argnums)

  @functools.wraps(fn)
  def call(*args):
    with jax.set_mesh(mesh):
      return compiled(*args)

  call.lower = lambda *args: _lower_in(mesh, compiled, *args)
  return call


def replicate(tree, mesh: Mesh | None):
  """A full copy of ``tree`` on every device of ``mesh`` (``mesh=None``: ``tree`` unchanged).

  Works across processes: on a mesh that spans hosts, every process passes its own copy
  of the same values (host or single-device arrays) and gets one global array.

  >>> import jax.numpy as jnp
  >>> replicate({"w": jnp.ones(2)}, make_mesh(1))["w"].sharding.spec == P()
  True
  """
  if mesh is None:
    return tree
  sharding = replicated_sharding(mesh)
  if jax.process_count() > 1:  # device_put cannot move a committed array across hosts
    import numpy as np
    tree = jax.tree.map(np.asarray, tree)
  return jax.device_put(tree, sharding)


def local(tree):
  """This process's copy of a replicated ``tree``, on its first local device.

  Evaluation code that mixes a replicated train state with arrays on one device (or that
  runs on each host by itself) uses it; arrays on a single device pass through.

  >>> import jax.numpy as jnp
  >>> float(local(replicate(jnp.ones(2), make_mesh(1))).sum())
  2.0
  """
  def one(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      if not x.is_fully_replicated:
        raise ValueError(f"local() needs replicated arrays, got sharding {x.sharding}")
      return x.addressable_data(0)
    return x

  return jax.tree.map(one, tree)


def _lower_in(mesh, compiled, *args):
  with jax.set_mesh(mesh):
    return compiled.lower(*args)


# keyword arguments of the in-batch losses that hold one entry per row of embeddings
_ROW_ALIGNED = ("valid", "ref_exclude")


def cross_device_loss(loss_fn: Callable, *, axis_name: str = DATA_AXIS) -> Callable:
  """Makes an in-batch loss see the global batch from inside ``jax.shard_map``.

  The returned function takes each device's local ``embeddings [b, D]`` and ``labels [b]``,
  all-gathers both across ``axis_name`` and evaluates ``loss_fn`` for the local anchors
  against every embedding of the global batch. It returns the ``[b]`` per-anchor losses
  of this device's anchors, so the per-anchor values across devices are exactly those of
  ``loss_fn`` on the concatenated batch. Gradients flow through the gather (its
  transpose is a reduce-scatter), so a device's embeddings receive the gradient of the
  terms in which *other* devices use them as positives or negatives too.

  Args:
    loss_fn: an in-batch loss from :mod:`siamjax.losses` (``batch_hard_triplet_loss``,
      ``batch_all_triplet_loss``, ``semi_hard_triplet_loss``,
      ``all_pairs_contrastive_loss``, ``ntxent_loss``), or any function with the same
      ``(embeddings, labels, *, anchor_indices, **kwargs)`` signature.
    axis_name: the mesh axis the batch is sharded over.

  Keyword arguments that hold one entry per row of ``embeddings`` (``valid=``,
  ``ref_exclude=``) are this device's ``[b]`` rows and are all-gathered with them; the
  others (``margin=``, ``ref_embeddings=`` of a replicated memory, ...) pass unchanged.

  Returns:
    ``f(embeddings, labels, **kwargs) -> [b]``, to be called inside ``shard_map``.
    Average with ``lax.pmean(jnp.mean(f(...)), axis_name)`` for the global mean.

  References:
    pytorch-metric-learning's ``DistributedLossWrapper`` does the same with an
    all-gather whose gradient reaches only the local shard; here the gather's
    transpose returns every device's contribution.

  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import PartitionSpec as P
  >>> from siamjax.losses import batch_hard_triplet_loss
  >>> mesh = make_mesh(1); loss = cross_device_loss(batch_hard_triplet_loss)
  >>> f = jax.jit(jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P("data")),
  ...                           out_specs=P("data")))
  >>> f(jnp.array([[0.0], [0.5], [1.0], [3.0]]), jnp.array([0, 0, 1, 1])).tolist()
  [0.5, 1.0, 2.5, 0.5]
  """

  @functools.wraps(loss_fn)
  def gathered(embeddings: jax.Array, labels: jax.Array, **kwargs) -> jax.Array:
    b = embeddings.shape[0]
    emb_all = jax.lax.all_gather(embeddings, axis_name, tiled=True)
    labels_all = jax.lax.all_gather(labels, axis_name, tiled=True)
    for name in _ROW_ALIGNED:  # per-row arguments follow their rows into the global batch
      if kwargs.get(name) is not None:
        row_arg = jnp.asarray(kwargs[name])
        if row_arg.ndim != 1 or row_arg.shape[0] != b:
          raise ValueError(f"{name} has shape {row_arg.shape}; inside cross_device_loss it "
                           f"must be this device's [{b}] rows, like embeddings")
        kwargs[name] = jax.lax.all_gather(row_arg, axis_name, tiled=True)
    rows = jax.lax.axis_index(axis_name) * b + jnp.arange(b)
    return loss_fn(emb_all, labels_all, anchor_indices=rows, **kwargs)

  return gathered


def initialize_distributed(*, force: bool = False) -> bool:
  """Starts multi-host JAX (``jax.distributed.initialize()``) when running on a cluster.

  Call it once per process before any other JAX call. It runs when ``force`` is set, or
  when the environment names a coordinator (``JAX_COORDINATOR_ADDRESS``, with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` for a hand-made launch) or a launcher
  whose variables JAX detects itself (SLURM with more than one task, Open MPI). On a
  single machine it does nothing.

  Args:
    force: call ``jax.distributed.initialize()`` even when no cluster is detected
      (for launchers that pass the coordinator some other way).

  Returns:
    whether ``jax.distributed.initialize()`` was called.

  References:
    JAX documentation, "Running JAX on multi-host and multi-process environments".

  >>> initialize_distributed()  # a single machine: nothing to do
  False
  """
  env = os.environ
  cluster = (
      "JAX_COORDINATOR_ADDRESS" in env
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if not (force or cluster):
    return False
  kwargs = {}
  for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if var in env:
      kwargs[arg] = int(env[var])
  jax.distributed.initialize(**kwargs)
  return True
