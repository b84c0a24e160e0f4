"""Cross-batch memory (XBM): a ring buffer of past embeddings used as a reference set.

Wang et al. (2020) observe that embeddings drift slowly once training warms up, so the
embeddings of the last few thousand examples, computed in earlier steps and stored
without gradient, are almost as good as fresh ones as positives and negatives. A memory
of ``S`` rows lets an in-batch loss mine over ``S`` partners for the price of a
``[B, S]`` distance matrix, far more than a batch of ``B`` could hold.

Everything here is a pure function over a :class:`Memory` pytree, so the memory lives
in the train state, is donated and updated inside the one jitted step, and never
crosses the host boundary:

* :func:`init` makes an empty memory of ``size`` rows;
* :func:`push` writes a batch into the next slots (wrapping around, oldest first),
  under ``stop_gradient``;
* :func:`reference` gives the memory as the ``ref_embeddings=, ref_labels=,
  ref_valid=`` keywords of the in-batch losses in :mod:`siamjax.losses` (empty slots
  are not valid); nothing is excluded, so a copy of an anchor in the memory is a
  positive at distance 0;
* :func:`cross_batch_loss` evaluates a loss for the batch's anchors against the memory
  *after* the batch was pushed, leaving out each anchor's own copy: the rule of
  pytorch-metric-learning's ``CrossBatchMemory``.

Two ways to use it in a step (``emb`` carries the gradient, ``loss_fn`` is an in-batch
loss such as :func:`siamjax.losses.all_pairs_contrastive_loss`):

.. code-block:: python

    # pytorch-metric-learning's CrossBatchMemory: enqueue, then the loss against the
    # whole memory (the current batch included) without self-comparisons
    mem = memory.push(mem, emb, labels)
    per_anchor = memory.cross_batch_loss(loss_fn, mem, emb, labels, margin=0.5)

    # Wang et al.'s training code: the in-batch loss plus the loss against the memory
    per_anchor = loss_fn(emb, labels) + loss_fn(emb, labels, **memory.reference(mem))
    mem = memory.push(mem, emb, labels)

Gradients reach the anchors only: memory rows are constants, as in the paper and in
pytorch-metric-learning. For data parallelism keep the memory replicated, push the
global batch, and wrap ``functools.partial(cross_batch_loss, loss_fn, mem)`` in
:func:`siamjax.parallel.cross_device_loss` (see :func:`cross_batch_loss`).

References:
  X. Wang, H. Zhang, W. Huang, M. R. Scott, "Cross-Batch Memory for Embedding
  Learning", CVPR 2020.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from siamjax import _checks

__all__ = ["Memory", "init", "push", "reference", "last_slots", "cross_batch_loss"]


class Memory(NamedTuple):
  """The state of a cross-batch memory (a pytree; every field is an array).

  Attributes:
    embeddings: ``[S, D]`` stored embeddings (zeros in slots never written).
    labels: ``[S]`` integer labels of the stored rows.
    valid: ``[S]`` bool, True for slots that hold a pushed (and valid) row.
    index: ``[]`` int32, the slot the next push writes first (pytorch-metric-learning's
      ``queue_idx``).
  """

  embeddings: jax.Array
  labels: jax.Array
  valid: jax.Array
  index: jax.Array

  @property
  def size(self) -> int:
    """``S``, the number of slots."""
    return self.embeddings.shape[0]


def init(size: int, dim: int, dtype=jnp.float32, *, label_dtype=jnp.int32) -> Memory:
  """An empty memory of ``size`` slots for ``dim``-dimensional embeddings.

  Args:
    size: ``S``, the number of embeddings kept (the paper uses about the size of the
      training set on small benchmarks, e.g. 5,000-25,000 rows).
    dim: ``D``, the embedding size.
    dtype: storage dtype of the embeddings (pushed rows are cast to it; bfloat16
      halves the memory).
    label_dtype: integer dtype of the stored labels.

  Returns:
    a :class:`Memory` with no valid slot.

  References:
    Wang et al., CVPR 2020 (see the module docstring).

  >>> mem = init(4, 2)
  >>> mem.embeddings.shape, mem.valid.tolist(), int(mem.index)
  ((4, 2), [False, False, False, False], 0)
  """
  size, dim = _checks.positive_int("size", size), _checks.positive_int("dim", dim)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
  if not jnp.issubdtype(label_dtype, jnp.integer):
    raise ValueError(f"label_dtype must be an integer dtype, got {jnp.dtype(label_dtype)}")
  return Memory(jnp.zeros((size, dim), dtype), jnp.zeros((size,), label_dtype),
                jnp.zeros((size,), bool), jnp.zeros((), jnp.int32))


def push(mem: Memory, embeddings: jax.Array, labels: jax.Array,
         valid: jax.Array | None = None) -> Memory:
  """Writes a batch into the next ``B`` slots (ring order), without gradient.

  Row ``i`` goes to slot ``(index + i) % S``, overwriting the oldest rows once the
  memory is full; ``index`` advances by ``B``. This is pytorch-metric-learning's
  ``CrossBatchMemory.add_to_memory``.

  Args:
    mem: the memory.
    embeddings: ``[B, D]`` embeddings, ``B <= S`` (stored under ``stop_gradient``, in
      the memory's dtype).
    labels: ``[B]`` integer labels.
    valid: optional ``[B]`` bool; rows that are False still take a slot but are not
      valid references (e.g. padding), so the ring order does not depend on the data.

  Returns:
    the updated memory.

  References:
    Wang et al., CVPR 2020, section 3 (the queue of the last ``M`` embeddings).

  >>> import jax.numpy as jnp
  >>> mem = push(init(3, 1), jnp.array([[1.0], [2.0]]), jnp.array([7, 8]))
  >>> mem = push(mem, jnp.array([[3.0], [4.0]]), jnp.array([9, 9]))
  >>> mem.embeddings[:, 0].tolist(), mem.labels.tolist(), int(mem.index)
  ([4.0, 2.0, 3.0], [9, 8, 9], 1)
  """
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[B, D]")
  _checks.nonempty("embeddings", emb)
  b, d = emb.shape
  size, dim = mem.embeddings.shape
  if d != dim:
    raise ValueError(f"embeddings have D = {d} but the memory stores D = {dim}")
  if b > size:
    raise ValueError(f"embeddings has {b} rows, more than the memory's {size} slots; "
                     f"make the memory at least as large as the batch")
  labels = _checks.class_labels("labels", labels, b)
  if valid is None:
    valid = jnp.ones((b,), bool)
  else:
    valid = _checks.as_array("valid", valid)
    if valid.dtype != jnp.bool_ or valid.shape != (b,):
      raise ValueError(f"valid must be a [B] = ({b},) bool mask, got {valid.dtype} "
                       f"{valid.shape}")
  slots = (mem.index + jnp.arange(b, dtype=jnp.int32)) % size
  return Memory(
      mem.embeddings.at[slots].set(jax.lax.stop_gradient(emb).astype(mem.embeddings.dtype),
                                   unique_indices=True),
      mem.labels.at[slots].set(labels.astype(mem.labels.dtype), unique_indices=True),
      mem.valid.at[slots].set(valid, unique_indices=True),
      ((mem.index + b) % size).astype(jnp.int32),
  )


def reference(mem: Memory) -> dict:
  """The memory as the reference-set keywords of an in-batch loss.

  Args:
    mem: the memory.

  Returns:
    ``{"ref_embeddings": [S, D], "ref_labels": [S], "ref_valid": [S]}``, to pass as
    ``loss_fn(embeddings, labels, **reference(mem))``. Slots never written are not
    valid. Nothing else is excluded: call it before :func:`push` for the previous
    batches only, or use :func:`cross_batch_loss` after it.

  References:
    pytorch-metric-learning's ``ref_emb`` / ``ref_labels`` arguments.

  >>> sorted(reference(init(2, 3)))
  ['ref_embeddings', 'ref_labels', 'ref_valid']
  """
  return {"ref_embeddings": mem.embeddings, "ref_labels": mem.labels,
          "ref_valid": mem.valid}


def last_slots(mem: Memory, n: int) -> jax.Array:
  """``[n]`` slots that the last :func:`push` of ``n`` rows wrote, in row order.

  >>> import jax.numpy as jnp
  >>> last_slots(push(init(3, 1), jnp.zeros((2, 1)), jnp.zeros(2, int)), 2).tolist()
  [0, 1]
  """
  return (mem.index - n + jnp.arange(n, dtype=jnp.int32)) % mem.size


def cross_batch_loss(
    loss_fn: Callable,
    mem: Memory,
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    exclude_self: bool = True,
    anchor_indices: jax.Array | None = None,
    valid: jax.Array | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> jax.Array:
  """An in-batch loss for the batch's anchors against the memory, without self-pairs.

  Call it after ``mem = push(mem, embeddings, labels)`` with the same rows: the memory
  then holds a copy of every anchor, and anchor ``i`` is compared with every valid slot
  except the one its own copy went to (:func:`last_slots`). Copies of the batch's other
  rows stay in, as partners. This is exactly what pytorch-metric-learning's
  ``CrossBatchMemory(loss, embedding_size, memory_size=S)`` computes (it enqueues the
  batch before the loss and drops self-comparisons), per anchor; and, like it, the
  gradient reaches the anchors only.

  It is one ordinary call of ``loss_fn`` against the memory with
  ``ref_exclude=last_slots(mem, B)`` (each anchor's own slot is not its partner), so it
  costs what ``loss_fn(embeddings, labels, **reference(mem))`` costs: ``O(B S D)`` FLOPs
  and ``O(chunk_size * S)`` temporaries for loss and gradient, with any distance.

  Args:
    loss_fn: an in-batch loss of :mod:`siamjax.losses` (or any function with its
      ``(embeddings, labels, *, ref_embeddings, ref_labels, ref_valid, ref_exclude,
      **kwargs) -> [B]`` signature whose per-anchor value depends only on the anchor and
      the reference; ``valid=`` and ``chunk_size=`` are passed only when given here).
    mem: the memory, after the batch was pushed.
    embeddings: ``[B, D]`` the rows just pushed, carrying the gradient.
    labels: ``[B]`` their labels.
    exclude_self: leave out each anchor's own slot (True); False evaluates
      ``loss_fn(embeddings, labels, **reference(mem))`` in one call, nothing excluded.
    anchor_indices: optional ``[A]`` rows of ``embeddings`` to use as anchors; the
      result is then ``[A]``. :func:`siamjax.parallel.cross_device_loss` passes each
      device's rows of the all-gathered batch here. (With ``exclude_self`` the anchors'
      rows are gathered here and ``loss_fn`` never sees ``anchor_indices``.)
    valid: optional ``[B]`` bool; rows that are False get 0 (passed on to ``loss_fn``
      as ``valid=``).
    chunk_size: anchors evaluated at once, passed on to ``loss_fn``; ``None`` leaves
      the loss's default (256 for :mod:`siamjax.losses`).
    **kwargs: hyper-parameters for ``loss_fn`` (``margin=``, ``distance=``, ...).

  Returns:
    ``[B]`` (or ``[A]``) per-anchor losses, reduced as ``loss_fn`` documents.

  References:
    Wang et al., CVPR 2020; pytorch-metric-learning ``losses.CrossBatchMemory``.

  Data parallelism (memory replicated, the global batch pushed, each device its own
  anchors; the values and gradients equal the single-device ones):

  .. code-block:: python

      def local(emb, labels, mem):
        loss = parallel.cross_device_loss(
            functools.partial(memory.cross_batch_loss, loss_fn, mem))
        return jax.lax.pmean(jnp.mean(loss(emb, labels)), "data")
      value = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                            out_specs=P())(emb, labels, memory.push(mem, emb, labels))

  >>> import jax.numpy as jnp
  >>> from siamjax import losses
  >>> emb = jnp.array([[0.0], [0.5], [3.0]]); labels = jnp.array([0, 0, 1])
  >>> mem = push(init(4, 1), emb, labels)  # the memory now holds the batch only
  >>> cross_batch_loss(losses.all_pairs_contrastive_loss, mem, emb, labels).tolist()
  [0.0625, 0.0625, 0.0]
  """
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[B, D]")
  _checks.nonempty("embeddings", emb)
  b = emb.shape[0]
  labels = _checks.class_labels("labels", labels, b)
  if emb.shape[1] != mem.embeddings.shape[1]:
    raise ValueError(f"embeddings have D = {emb.shape[1]} but the memory stores "
                     f"D = {mem.embeddings.shape[1]}")
  extra = {}
  if chunk_size is not None:
    extra["chunk_size"] = _checks.positive_int("chunk_size", chunk_size)
  if not exclude_self:
    if valid is not None:
      extra["valid"] = valid
    if anchor_indices is not None:
      extra["anchor_indices"] = anchor_indices
    return loss_fn(emb, labels, **reference(mem), **extra, **kwargs)
  if b > mem.size:
    raise ValueError(f"embeddings has {b} rows, more than the memory's {mem.size} slots")
  own = last_slots(mem, b)
  if valid is not None:
    valid = _checks.row_mask("valid", valid, b)
  if anchor_indices is not None:
    rows = _checks.anchor_rows(anchor_indices, b)
    # the anchors are independent given the memory: evaluate only theirs
    emb, labels, own = emb[rows], labels[rows], own[rows]
    valid = None if valid is None else valid[rows]
  if valid is not None:
    extra["valid"] = valid
  return loss_fn(emb, labels, **reference(mem), ref_exclude=own, **extra, **kwargs)
