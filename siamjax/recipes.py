"""The classic small Siamese recipes, trained on the device.

Each recipe keeps its whole dataset on the device, builds or samples its pairs
(triplets, P x K batches) there with ``jax.random``, and runs one jitted epoch as a
``lax.scan`` over steps; the host fetches the epoch's mean metrics once per epoch.

* :func:`keras_pairs`: the pairs of the Keras MNIST Siamese example, made on the device.
* :func:`make_train_epoch` and :func:`fit`: the shared epoch and loop (optax, early
  stopping on a validation loss).
* :func:`mnist_contrastive`: the Keras example end to end.

Every recipe returns a plain ``dict`` of results (JSON-ready floats) and the trained
parameters; ``experiments/`` scripts only parse flags, load data and write JSON.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import distances, encoders, losses
from siamjax.evaluation import verification

__all__ = [
    "TrainState", "class_index_table", "keras_pairs", "make_train_epoch", "fit",
    "machine_info", "mnist_contrastive",
]


# ---------------------------------------------------------------------------------
# Pairs on the device
# ---------------------------------------------------------------------------------


def class_index_table(labels: np.ndarray, num_classes: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Host-side index table: row ``c`` lists the positions of class ``c`` in file order.

  Args:
    labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes (``labels.max() + 1`` when ``None``).

  Returns:
    ``(table [C, M] int32, counts [C] int32)`` with ``M`` the largest class; row ``c``
    holds its ``counts[c]`` positions, then repeats its first position as padding.

  >>> table, counts = class_index_table(np.array([1, 0, 1, 1]))
  >>> table.tolist(), counts.tolist()
  ([[1, 1, 1], [0, 2, 3]], [1, 3])
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a non-empty [N] integer array, got {labels.dtype} "
                     f"{labels.shape}")
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
  c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  if labels.max() >= c:
    raise ValueError(f"labels hold class {int(labels.max())} but num_classes is {c}")
  counts = np.bincount(labels, minlength=c).astype(np.int32)
  if (counts == 0).any():
    raise ValueError(f"labels: classes {np.flatnonzero(counts == 0).tolist()[:5]} have no example")
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  m = int(counts.max())
  j = np.minimum(np.arange(m)[None, :], counts[:, None] - 1)
  j = np.where(np.arange(m)[None, :] < counts[:, None], j, 0)
  return order[starts[:, None] + j].astype(np.int32), counts


def keras_pairs(key: jax.Array, table: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The pairs of the Keras MNIST Siamese example (``create_pairs``), made on the device.

  For every class ``d`` and ``i < n``: the positive pair ``(x[d][i], x[d][i + 1])`` and
  the negative pair ``(x[d][i], x[d'][i])`` with ``d' = (d + u) % C``, ``u`` uniform in
  ``[1, C)``; pairs alternate positive, negative. ``n`` is the smallest class size
  minus one in the example (5,420 for MNIST train: 108,400 pairs; 891 for test: 17,820).

  Args:
    key: a ``jax.random`` key (the example uses Python's ``random.randrange``).
    table: ``[C, M]`` int32 positions per class, from :func:`class_index_table`.
    n: pairs per class and sign; needs ``n + 1 <= `` the smallest class size.

  Returns:
    ``(pairs [2 C n, 2] int32 positions into the images, similar [2 C n] int32)``, with
    ``similar = 1`` for a same-class pair, as the example's labels (and Hadsell et al.).

  >>> import jax, jax.numpy as jnp
  >>> table = jnp.array([[0, 2, 4], [1, 3, 5]])
  >>> pairs, similar = keras_pairs(jax.random.key(0), table, 2)
  >>> pairs[::2].tolist(), similar.tolist()
  ([[0, 2], [2, 4], [1, 3], [3, 5]], [1, 0, 1, 0, 1, 0, 1, 0])
  >>> pairs[1::2].tolist()
  [[0, 1], [2, 3], [1, 0], [3, 2]]
  """
  table = jnp.asarray(table)
  if table.ndim != 2 or table.shape[0] < 2:
    raise ValueError(f"table must be [C, M] with C >= 2 classes, got shape {table.shape}")
  if not 1 <= n < table.shape[1]:
    raise ValueError(f"n must be in [1, {table.shape[1] - 1}] for a table of shape "
                     f"{table.shape}, got {n}")
  c = table.shape[0]
  d_Cx1 = jnp.arange(c)[:, None]
  i_1xN = jnp.arange(n)[None, :]
  anchor_CxN = table[:, :n]
  positive_CxN = table[:, 1:n + 1]
  other_CxN = (d_Cx1 + jax.random.randint(key, (c, n), 1, c)) % c
  negative_CxN = table[other_CxN, jnp.broadcast_to(i_1xN, (c, n))]
  pos_CxNx2 = jnp.stack([anchor_CxN, positive_CxN], axis=-1)
  neg_CxNx2 = jnp.stack([anchor_CxN, negative_CxN], axis=-1)
  pairs = jnp.stack([pos_CxNx2, neg_CxNx2], axis=2).reshape(-1, 2)
  similar = jnp.tile(jnp.array([1, 0], jnp.int32), c * n)
  return pairs.astype(jnp.int32), similar


# ---------------------------------------------------------------------------------
# The shared epoch and loop
# ---------------------------------------------------------------------------------


class TrainState(NamedTuple):
  """Parameters and optimiser state, a plain pytree (donated to each epoch)."""
  params: Any
  opt_state: Any


def make_train_epoch(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    sample: Callable,
    prepare: Callable | None = None,
) -> Callable:
  """One jitted epoch: ``steps`` optimiser steps in a ``lax.scan``, nothing leaves the device.

  Args:
    loss_fn: ``(params, batch, dropout_key) -> (loss scalar, aux dict of scalars)``.
    optimizer: an optax transformation.
    steps: steps per epoch.
    sample: ``(key, epoch_data, step) -> batch``: draws or slices one batch on the device.
    prepare: ``(key, data) -> epoch_data`` run once per epoch (e.g. a shuffle of the
      pairs); ``None`` passes ``data`` through.

  Returns:
    ``epoch(state, key, data) -> (state, metrics)``, jitted with ``state`` donated;
    ``metrics`` holds the epoch means of ``loss`` and of every ``aux`` entry.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")

  def epoch(state: TrainState, key: jax.Array, data: Any):
    prep_key, key = jax.random.split(key)
    epoch_data = data if prepare is None else prepare(prep_key, data)

    def step(state, s):
      sample_key, dropout_key = jax.random.split(jax.random.fold_in(key, s))
      batch = sample(sample_key, epoch_data, s)
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, batch, dropout_key)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      return TrainState(optax.apply_updates(state.params, updates), opt_state), {
          "loss": loss, **aux}

    state, metrics = jax.lax.scan(step, state, jnp.arange(steps))
    return state, jax.tree.map(jnp.mean, metrics)

  return jax.jit(epoch, donate_argnums=0)


def fit(
    epoch_fn: Callable,
    state: TrainState,
    key: jax.Array,
    data: Any,
    *,
    epochs: int,
    val_loss: Callable | None = None,
    patience: int | None = None,
    log: Callable | None = None,
) -> tuple[TrainState, list[dict]]:
  """Runs ``epochs`` epochs of ``epoch_fn``; optional early stopping on a validation loss.

  Args:
    epoch_fn: from :func:`make_train_epoch`.
    state: the initial :class:`TrainState` (donated: do not reuse it afterwards).
    key: root key; epoch ``e`` uses ``fold_in(key, e)``.
    data: the on-device dataset pytree passed to every epoch.
    epochs: maximum number of epochs.
    val_loss: ``params -> scalar``, evaluated after every epoch; with ``patience``,
      training stops after ``patience`` epochs without improvement and the best
      parameters are returned.
    patience: epochs without improvement before stopping (``None``: never stop early).
    log: ``dict -> None`` called with each epoch's metrics (e.g. ``print``).

  Returns:
    ``(state, history)``: the final (or best) state and one metrics dict per epoch.
  """
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be a positive int, got {epochs!r}")
  if patience is not None and (val_loss is None or patience < 1):
    raise ValueError(f"patience needs val_loss and must be >= 1, got {patience!r}")
  history: list[dict] = []
  best, best_loss, since_best = None, np.inf, 0
  for e in range(epochs):
    state, metrics = epoch_fn(state, jax.random.fold_in(key, e), data)
    record = {"epoch": e + 1, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    if val_loss is not None:
      record["val_loss"] = float(val_loss(state.params))
      if record["val_loss"] < best_loss:
        best_loss, since_best = record["val_loss"], 0
        best = jax.tree.map(jnp.copy, state)
      else:
        since_best += 1
    history.append(record)
    if log is not None:
      log(record)
    if patience is not None and since_best >= patience:
      break
  if patience is not None and best is not None:
    state = best
  return state, history


# ---------------------------------------------------------------------------------
# Helpers for results
# ---------------------------------------------------------------------------------


def machine_info() -> dict:
  """The machine a result was measured on: processor, cores, JAX devices, versions."""
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "nproc": os.cpu_count(),
      "jax_devices": [str(d) for d in jax.devices()],
      "jax_version": jax.__version__,
      "python": sys.version.split()[0],
  }


def _init_state(net, optimizer, key, x) -> TrainState:
  params = net.init(key, x)
  return TrainState(params, optimizer.init(params))


def _pair_distances(emb_NxD: jax.Array, pairs_Px2: jax.Array) -> jax.Array:
  return distances.euclidean(emb_NxD[pairs_Px2[:, 0]], emb_NxD[pairs_Px2[:, 1]])


# ---------------------------------------------------------------------------------
# MNIST contrastive: the Keras example
# ---------------------------------------------------------------------------------


def _pair_epoch_data(pairs_Px2, similar_P, batch_size):
  """Data, ``prepare`` and ``sample`` for epochs over a fixed pair set, shuffled each epoch."""
  steps = pairs_Px2.shape[0] // batch_size

  def prepare(key, data):
    perm = jax.random.permutation(key, data["pairs"].shape[0])[:steps * batch_size]
    return {**data, "order": perm.reshape(steps, batch_size)}

  def sample(key, data, step):
    del key
    idx_B = data["order"][step]
    p_Bx2 = data["pairs"][idx_B]
    return {"x1": data["x"][p_Bx2[:, 0]], "x2": data["x"][p_Bx2[:, 1]],
            "similar": data["similar"][idx_B]}

  return steps, prepare, sample


def mnist_contrastive(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    margin: float = 1.0,
    threshold: float = 0.5,
    seed: int = 0,
    resample_negatives: bool = False,
    log: Callable | None = None,
) -> tuple[dict, Any]:
  """The Keras MNIST Siamese example (``mnist_siamese.py``), trained on the device.

  MLP tower 784-128-128-128 with dropout 0.1 (:class:`siamjax.encoders.MLP`), Euclidean
  distance, contrastive loss with margin 1 in the example's scale
  (``mean(y d^2 + (1 - y) max(margin - d, 0)^2)``, twice
  :func:`siamjax.losses.contrastive_loss`), RMSprop (learning rate 1e-3, rho 0.9,
  eps 1e-7 outside the square root, as Keras), batch 128, the example's alternating
  pairs (:func:`keras_pairs`) made once on the device and shuffled each epoch, and
  pair accuracy at distance ``< threshold``. Labels: ``similar = 1`` for a same-digit
  pair, as the example's ``create_pairs``.

  Args:
    x_train, x_test: ``[N, 28, 28]`` uint8 images (scaled to [0, 1] on the device).
    y_train, y_test: ``[N]`` integer digits.
    epochs, batch_size, learning_rate, margin: the example's settings by default.
    threshold: distance below which a pair is predicted "same".
    seed: root seed (init, pairs, dropout, shuffles).
    resample_negatives: draw fresh negative partners each epoch instead of once (not
      in the example).
    log: called with each epoch's metrics.

  Returns:
    ``(results, params)``; ``results`` holds ``train_pair_accuracy``,
    ``test_pair_accuracy`` (fractions, at ``threshold``), ``test_verification``
    (:func:`siamjax.evaluation.verification.verification_report` of the test pairs),
    ``test_recall_at_1``, ``history``, ``train_time_s`` (including compilation), the
    pair counts and ``_roc_curves`` (arrays for :func:`verification.save_roc_png`; pop it
    before writing JSON). The last partial batch of each epoch is dropped (112 of 108,400 pairs).

  References:
    Keras examples, ``mnist_siamese.py`` (published: 97.30% test, 99.59% train pair
    accuracy after 20 epochs); R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006.
  """
  key = jax.random.key(seed)
  k_init, k_train_pairs, k_test_pairs, k_fit = jax.random.split(key, 4)
  table_tr, counts_tr = class_index_table(y_train)
  table_te, counts_te = class_index_table(y_test)
  net = encoders.MLP(features=(128, 128, 128), dropout_rate=0.1)
  x_tr = jnp.asarray(x_train, jnp.float32).reshape(x_train.shape[0], -1) / 255.0
  x_te = jnp.asarray(x_test, jnp.float32).reshape(x_test.shape[0], -1) / 255.0
  make_pairs = jax.jit(keras_pairs, static_argnums=2)
  pairs_tr, similar_tr = make_pairs(k_train_pairs, jnp.asarray(table_tr), int(counts_tr.min()) - 1)
  pairs_te, similar_te = make_pairs(k_test_pairs, jnp.asarray(table_te), int(counts_te.min()) - 1)

  def loss_fn(params, batch, dropout_key):
    x = jnp.concatenate([batch["x1"], batch["x2"]], axis=0)  # one 2B batch
    h = net.apply(params, x, train=True, rngs={"dropout": dropout_key})
    b = batch["x1"].shape[0]
    d = distances.euclidean(h[:b], h[b:])
    loss = 2.0 * jnp.mean(losses.contrastive_loss(d, batch["similar"], margin=margin))
    acc = jnp.mean(((d < threshold).astype(jnp.int32) == batch["similar"]).astype(jnp.float32))
    return loss, {"accuracy": acc}

  optimizer = optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, eps_in_sqrt=False)
  state = jax.jit(lambda k, x: _init_state(net, optimizer, k, x))(k_init, x_tr[:1])
  steps, prepare, sample = _pair_epoch_data(pairs_tr, similar_tr, batch_size)
  if resample_negatives:
    n_tr = int(counts_tr.min()) - 1
    table_dev = jnp.asarray(table_tr)

    def prepare(key, data, _shuffle=prepare):  # noqa: F811 - fresh pairs, then shuffle
      k_pairs, k_shuffle = jax.random.split(key)
      pairs, _ = keras_pairs(k_pairs, table_dev, n_tr)
      return _shuffle(k_shuffle, {**data, "pairs": pairs})

  data = {"x": x_tr, "pairs": pairs_tr, "similar": similar_tr}
  epoch_fn = make_train_epoch(loss_fn, optimizer, steps=steps, sample=sample, prepare=prepare)
  t0 = time.perf_counter()
  state, history = fit(epoch_fn, state, k_fit, data, epochs=epochs, log=log)
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t0

  @jax.jit
  def evaluate(params, x_tr, x_te, pairs_tr, similar_tr, pairs_te, similar_te, y_te):
    emb_tr, emb_te = net.apply(params, x_tr), net.apply(params, x_te)
    d_tr = _pair_distances(emb_tr, pairs_tr)
    d_te = _pair_distances(emb_te, pairs_te)
    acc = lambda d, y: jnp.mean(((d < threshold).astype(jnp.int32) == y).astype(jnp.float32))
    return (acc(d_tr, similar_tr), acc(d_te, similar_te), d_te,
            verification.recall_at_1(emb_te, y_te))

  train_acc, test_acc, d_te, recall = jax.device_get(evaluate(
      state.params, x_tr, x_te, pairs_tr, similar_tr, pairs_te, similar_te, jnp.asarray(y_test)))
  report = verification.verification_report(np.asarray(d_te), np.asarray(similar_te))
  results = {
      "train_pair_accuracy": float(train_acc),
      "test_pair_accuracy": float(test_acc),
      "threshold": threshold,
      "test_verification": report,
      "test_recall_at_1": float(recall),
      "train_pairs": int(pairs_tr.shape[0]),
      "test_pairs": int(pairs_te.shape[0]),
      "steps_per_epoch": steps,
      "epochs": len(history),
      "train_time_s": train_time,
      "history": history,
      "_roc_curves": {"test pairs": (np.asarray(d_te), np.asarray(similar_te))},
  }
  return results, state.params
