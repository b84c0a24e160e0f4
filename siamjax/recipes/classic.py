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

import functools
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import distances, encoders, losses
from siamjax.evaluation import verification
from siamjax.machine import machine_info

__all__ = [
    "TrainState", "class_index_table", "keras_pairs", "random_pairs", "make_train_epoch", "fit",
    "machine_info", "mnist_contrastive", "split_indices", "vector_pairs", "pk_batch",
    "mnist_triplet", "MINING", "split_per_class", "sample_pairs", "image_folder",
    "contact_sheet",
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


def random_pairs(key: jax.Array, table: jax.Array, counts: jax.Array, n: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Fresh balanced pairs over every image: the layout of :func:`keras_pairs`, random members.

  For every class ``d`` and ``i < n``: an anchor drawn uniformly from class ``d``, a
  positive drawn from the *other* members of ``d`` and a negative drawn from a class
  ``d' = (d + u) % C``, ``u`` uniform in ``[1, C)``; pairs alternate positive,
  negative. Unlike the example's pairs, which use only the first ``n + 1`` images of
  each class, these reach every image; draw them anew each epoch.

  Args:
    key: a ``jax.random`` key.
    table: ``[C, M]`` positions per class, from :func:`class_index_table`.
    counts: ``[C]`` class sizes (each >= 2).
    n: pairs per class and sign.

  Returns:
    ``(pairs [2 C n, 2] int32, similar [2 C n] int32)``, ``similar = 1`` for same class.

  >>> import jax, jax.numpy as jnp
  >>> table = jnp.array([[0, 2, 4], [1, 3, 3]]); counts = jnp.array([3, 2])
  >>> pairs, similar = random_pairs(jax.random.key(0), table, counts, 4)
  >>> bool(jnp.all((pairs[:, 0] % 2 == pairs[:, 1] % 2) == (similar == 1)))
  True
  """
  table = jnp.asarray(table)
  counts = jnp.asarray(counts)
  if table.ndim != 2 or table.shape[0] < 2 or counts.shape != table.shape[:1]:
    raise ValueError(f"table must be [C, M] with C >= 2 and counts [C], got {table.shape} "
                     f"and {counts.shape}")
  c = table.shape[0]
  k_a, k_p, k_c, k_n = jax.random.split(key, 4)
  d_CxN = jnp.broadcast_to(jnp.arange(c)[:, None], (c, n))
  count_CxN = counts[d_CxN]
  a_CxN = jax.random.randint(k_a, (c, n), 0, count_CxN)
  p_CxN = (a_CxN + jax.random.randint(k_p, (c, n), 1, count_CxN)) % count_CxN
  other_CxN = (d_CxN + jax.random.randint(k_c, (c, n), 1, c)) % c
  n_CxN = jax.random.randint(k_n, (c, n), 0, counts[other_CxN])
  anchor = table[d_CxN, a_CxN]
  pos_CxNx2 = jnp.stack([anchor, table[d_CxN, p_CxN]], axis=-1)
  neg_CxNx2 = jnp.stack([anchor, table[other_CxN, n_CxN]], axis=-1)
  pairs = jnp.stack([pos_CxNx2, neg_CxNx2], axis=2).reshape(-1, 2)
  return pairs.astype(jnp.int32), jnp.tile(jnp.array([1, 0], jnp.int32), c * n)


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
    loop: str = "scan",
) -> Callable:
  """One epoch of ``steps`` optimiser steps that keeps everything on the device.

  Args:
    loss_fn: ``(params, batch, dropout_key) -> (loss scalar, aux dict of scalars)``.
    optimizer: an optax transformation.
    steps: steps per epoch.
    sample: ``(key, epoch_data, step) -> batch``: draws or slices one batch on the device.
    prepare: ``(key, data) -> epoch_data`` run once per epoch (e.g. a shuffle of the
      pairs); ``None`` passes ``data`` through.
    loop: ``"scan"``: the whole epoch is one jitted ``lax.scan`` (best for small dense
      models, where per-step dispatch would dominate); ``"python"``: a Python loop over
      one jitted, donated step whose step counter and metric sums stay on the device
      (best for convolutional encoders on XLA:CPU, where convolutions inside a loop
      body ran about 10x slower than in a plain jitted step in our measurements).
      Both give the same result for the same key.

  Returns:
    ``epoch(state, key, data) -> (state, metrics)`` with ``state`` donated; ``metrics``
    holds the epoch means of ``loss`` and of every ``aux`` entry.
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if loop not in ("scan", "python"):
    raise ValueError(f"loop must be 'scan' or 'python', got {loop!r}")

  def step(state, key, epoch_data, s):
    sample_key, dropout_key = jax.random.split(jax.random.fold_in(key, s))
    batch = sample(sample_key, epoch_data, s)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, dropout_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), {
        "loss": loss, **aux}

  def start(key, data):
    prep_key, key = jax.random.split(key)
    return key, (data if prepare is None else prepare(prep_key, data))

  if loop == "scan":
    def epoch(state: TrainState, key: jax.Array, data: Any):
      key, epoch_data = start(key, data)
      state, metrics = jax.lax.scan(lambda st, s: step(st, key, epoch_data, s), state,
                                    jnp.arange(steps))
      return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(epoch, donate_argnums=0)

  @jax.jit
  def begin(state, key, data):
    key, epoch_data = start(key, data)
    s = jnp.zeros((), jnp.int32)
    shapes = jax.eval_shape(step, state, key, epoch_data, s)[1]
    return key, epoch_data, s, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_and_sum(state, sums, s, key, epoch_data):
    state, metrics = step(state, key, epoch_data, s)
    return state, jax.tree.map(jnp.add, sums, metrics), s + 1

  mean = jax.jit(lambda sums: jax.tree.map(lambda v: v / steps, sums))

  def epoch(state: TrainState, key: jax.Array, data: Any):
    key, epoch_data, s, sums = begin(state, key, data)
    for _ in range(steps):
      state, sums, s = step_and_sum(state, sums, s, key, epoch_data)
    return state, mean(sums)

  return epoch


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


def _mnist_setup(x_train, y_train, x_test, y_test, seed: int):
  """What both MNIST recipes start from: keys, the example's MLP, flat [0, 1] images and
  the Keras example's alternating pairs of the train and test sets (made on the device)."""
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
  return (k_init, k_fit, net, x_tr, x_te, table_tr, counts_tr, pairs_tr, similar_tr, pairs_te,
          similar_te)


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
    pairing: str = "keras",
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
    pairing: ``"keras"``: the example's pairs, drawn once (faithful); ``"keras_fresh"``:
      the example's pairs with fresh negative partners every epoch; ``"random"``: fresh
      :func:`random_pairs` over all training images every epoch (same count). The last
      two are not in the example. Test pairs are always the example's.
    log: called with each epoch's metrics.

  Returns:
    ``(results, params)``; ``results`` holds ``train_pair_accuracy``,
    ``test_pair_accuracy`` (fractions, at ``threshold``), ``test_verification``
    (:func:`siamjax.evaluation.verification.verification_report` of the test pairs),
    ``test_recall_at_1``, ``history``, ``train_time_s`` (including compilation), the
    pair counts and ``_roc_curves`` (arrays for :func:`verification.save_roc_png`; pop it
    before writing JSON). The last partial batch of each epoch is dropped (112 of 108,400 pairs).

  References:
    Keras examples, ``mnist_siamese.py``: its docstring says "Gets to 97.2% test
    accuracy after 20 epochs"; issue 6 quotes a run at 97.30% test, 99.59% train.
    R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006.
  """
  (k_init, k_fit, net, x_tr, x_te, table_tr, counts_tr, pairs_tr, similar_tr, pairs_te,
   similar_te) = _mnist_setup(x_train, y_train, x_test, y_test, seed)

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
  if pairing not in ("keras", "keras_fresh", "random"):
    raise ValueError(f"pairing must be 'keras', 'keras_fresh' or 'random', got {pairing!r}")
  if pairing != "keras":
    n_tr = int(counts_tr.min()) - 1
    table_dev, counts_dev = jnp.asarray(table_tr), jnp.asarray(counts_tr)

    def prepare(key, data, _shuffle=prepare):  # noqa: F811 - fresh pairs, then shuffle
      k_pairs, k_shuffle = jax.random.split(key)
      if pairing == "keras_fresh":
        pairs, _ = keras_pairs(k_pairs, table_dev, n_tr)
      else:
        pairs, _ = random_pairs(k_pairs, table_dev, counts_dev, n_tr)
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
      "pairing": pairing,
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


# ---------------------------------------------------------------------------------
# Vector pairs: two heads, early stopping, threshold chosen on validation pairs
# ---------------------------------------------------------------------------------


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
  """Shuffles ``range(n)`` (NumPy ``Generator(seed)``) and cuts it by ``fractions``.

  The last part takes the rest. Every part must be non-empty.

  >>> [p.size for p in split_indices(10, (0.6, 0.2), seed=0)]
  [6, 2, 2]
  """
  if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
    raise ValueError(f"fractions must be positive with a sum below 1, got {fractions}")
  perm = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions])
  parts = np.split(perm, cuts)
  if any(p.size == 0 for p in parts):
    raise ValueError(f"n={n} is too small to split into {len(parts)} non-empty parts "
                     f"with fractions {fractions}")
  return parts


class _PairScorer:
  """Encoder + head for pairs of vectors: ``"contrastive"`` or ``"bce"``.

  ``scores(params, a, b, train, key)`` returns ``[P]`` scores, higher = more similar:
  ``-euclidean`` for the contrastive head, the logit for the BCE head (L1 difference,
  then one linear unit, as Koch et al.).
  """

  def __init__(self, head: str, encoder):
    from siamjax import models
    if head not in ("contrastive", "bce"):
      raise ValueError(f"head must be 'contrastive' or 'bce', got {head!r}")
    self.head = head
    self.net = models.SiameseNet(encoder=encoder) if head == "bce" else encoder

  def init(self, key, a, b):
    return self.net.init(key, a, b) if self.head == "bce" else self.net.init(key, a)

  def scores(self, params, a, b, *, train=False, key=None):
    rngs = {"dropout": key} if train else None
    if self.head == "bce":
      return self.net.apply(params, a, b, train=train, rngs=rngs)
    h = self.net.apply(params, jnp.concatenate([a, b], axis=0), train=train, rngs=rngs)
    return -distances.euclidean(h[:a.shape[0]], h[a.shape[0]:])

  def loss(self, scores, similar, margin):
    if self.head == "bce":
      return losses.pair_bce_loss(scores, similar)
    return losses.contrastive_loss(-scores, similar, margin=margin)


def vector_pairs(
    left: np.ndarray,
    right: np.ndarray,
    similar: np.ndarray,
    *,
    head: str = "contrastive",
    hidden: tuple[int, ...] = (128, 128, 64),
    dropout_rate: float = 0.1,
    epochs: int = 100,
    patience: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    margin: float = 1.0,
    fractions: tuple[float, float] = (0.7, 0.15),
    seed: int = 0,
    log: Callable | None = None,
) -> tuple[dict, Any]:
  """A Siamese network over pairs of feature vectors, with early stopping.

  Rows are split into train / validation / test (``fractions``, rest to test);
  features are standardised with the training rows' mean and deviation. Both vectors
  go through one shared MLP (:class:`siamjax.encoders.MLP`; left and right must have
  the same width). Heads:

  * ``"contrastive"``: Euclidean distance, contrastive loss with ``margin``;
  * ``"bce"``: ``|h1 - h2|``, one linear unit, sigmoid cross-entropy on the logit.

  Adam; each epoch is one pass over the shuffled training rows in one jitted scan;
  training stops after ``patience`` epochs without a lower validation loss and keeps
  the best parameters. The accept threshold is the best-accuracy threshold on the
  validation pairs, then applied to the test pairs.

  Args:
    left, right: ``[P, D]`` feature vectors.
    similar: ``[P]`` 0/1 labels (1 = same class).
    head: ``"contrastive"`` or ``"bce"``.
    hidden: MLP widths (the last one is the embedding size).
    dropout_rate, epochs, patience, batch_size, learning_rate, margin: training settings.
    fractions: train and validation fractions of the rows.
    seed: root seed (split, init, shuffles, dropout).
    log: called with each epoch's metrics.

  Returns:
    ``(results, params)``; ``results`` holds ``val_best_accuracy``,
    ``val_best_threshold`` (a score: distance thresholds are negated, logits as is),
    ``test_accuracy`` at that threshold, ``test_verification``, ``history``,
    ``epochs_run``, ``best_epoch`` and ``_roc_curves`` (pop before writing JSON).
  """
  left = np.asarray(left, np.float32)
  right = np.asarray(right, np.float32)
  similar = np.asarray(similar, np.int32)
  if left.ndim != 2 or left.shape != right.shape:
    raise ValueError(f"left and right must be [P, D] with the same shape (one shared "
                     f"encoder), got {left.shape} and {right.shape}")
  if similar.shape != (left.shape[0],):
    raise ValueError(f"similar must be [P] = [{left.shape[0]}], got {similar.shape}")
  tr, va, te = split_indices(left.shape[0], fractions, seed)
  if tr.size < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {tr.size} training rows")
  both = np.concatenate([left[tr], right[tr]])
  mean, std = both.mean(0), both.std(0) + 1e-6
  norm = lambda v: jnp.asarray((v - mean) / std)  # noqa: E731
  data = {"a": norm(left[tr]), "b": norm(right[tr]), "similar": jnp.asarray(similar[tr])}
  val = {"a": norm(left[va]), "b": norm(right[va]), "similar": jnp.asarray(similar[va])}
  test = {"a": norm(left[te]), "b": norm(right[te]), "similar": jnp.asarray(similar[te])}

  model = _PairScorer(head, encoders.MLP(features=tuple(hidden), dropout_rate=dropout_rate))
  optimizer = optax.adam(learning_rate)
  key = jax.random.key(seed)
  k_init, k_fit = jax.random.split(key)

  def init(k, a, b):
    params = model.init(k, a, b)
    return TrainState(params, optimizer.init(params))

  state = jax.jit(init)(k_init, data["a"][:1], data["b"][:1])
  steps = tr.size // batch_size

  def prepare(k, data):
    order = jax.random.permutation(k, data["a"].shape[0])[:steps * batch_size]
    return {**data, "order": order.reshape(steps, batch_size)}

  def sample(k, data, step):
    idx = data["order"][step]
    return {"a": data["a"][idx], "b": data["b"][idx], "similar": data["similar"][idx]}

  def loss_fn(params, batch, dropout_key):
    s = model.scores(params, batch["a"], batch["b"], train=True, key=dropout_key)
    return jnp.mean(model.loss(s, batch["similar"], margin)), {}

  @jax.jit
  def eval_scores(params, split):
    return model.scores(params, split["a"], split["b"])

  @jax.jit
  def val_loss(params, split):
    return jnp.mean(model.loss(model.scores(params, split["a"], split["b"]), split["similar"],
                               margin))

  epoch_fn = make_train_epoch(loss_fn, optimizer, steps=steps, sample=sample, prepare=prepare)
  t0 = time.perf_counter()
  state, history = fit(epoch_fn, state, k_fit, data, epochs=epochs,
                       val_loss=lambda p: val_loss(p, val), patience=patience, log=log)
  train_time = time.perf_counter() - t0
  s_val = np.asarray(eval_scores(state.params, val))
  s_te = np.asarray(eval_scores(state.params, test))
  val_acc, val_t = verification.best_threshold_accuracy(s_val, similar[va])
  best_epoch = int(np.argmin([h["val_loss"] for h in history])) + 1
  results = {
      "head": head,
      "val_best_accuracy": val_acc,
      "val_best_threshold": val_t,
      "test_accuracy": verification.accuracy_at(s_te, similar[te], val_t),
      "test_verification": verification.verification_report(-s_te, similar[te]),
      "threshold_units": ("distance (same when <= threshold)" if head == "contrastive" else
                          "negated logit (same when -logit <= threshold)"),
      "rows": {"train": int(tr.size), "val": int(va.size), "test": int(te.size)},
      "epochs_run": len(history),
      "best_epoch": best_epoch,
      "train_time_s": train_time,
      "history": history,
      "_roc_curves": {f"{head} (test)": (-s_te, similar[te])},
  }
  return results, state.params


# ---------------------------------------------------------------------------------
# MNIST triplet: the same tower trained with in-batch mining
# ---------------------------------------------------------------------------------

MINING = {
    "batch_all": losses.batch_all_triplet_loss,
    "batch_hard": losses.batch_hard_triplet_loss,
    "semi_hard": losses.semi_hard_triplet_loss,
}


def pk_batch(key: jax.Array, table: jax.Array, counts: jax.Array, classes: int, per_class: int
             ) -> tuple[jax.Array, jax.Array]:
  """Samples a P x K batch on the device: ``classes`` distinct classes, ``per_class`` each.

  Args:
    key: a ``jax.random`` key.
    table: ``[C, M]`` positions per class, from :func:`class_index_table`.
    counts: ``[C]`` class sizes.
    classes: P, distinct classes per batch (``<= C``).
    per_class: K, members drawn per class (uniformly, with replacement).

  Returns:
    ``(positions [P K] int32, labels [P K] int32)``.

  >>> import jax, jax.numpy as jnp
  >>> table = jnp.array([[0, 2, 4], [1, 3, 3]]); counts = jnp.array([3, 2])
  >>> pos, lab = pk_batch(jax.random.key(0), table, counts, 2, 3)
  >>> bool(jnp.all(pos % 2 == lab)), pos.shape
  (True, (6,))
  """
  table = jnp.asarray(table)
  if not 1 <= classes <= table.shape[0] or per_class < 1:
    raise ValueError(f"classes must be in [1, {table.shape[0]}] and per_class >= 1, got "
                     f"{classes} and {per_class}")
  k_c, k_m = jax.random.split(key)
  c_P = jax.random.choice(k_c, table.shape[0], (classes,), replace=False)
  c_PxK = jnp.broadcast_to(c_P[:, None], (classes, per_class))
  m_PxK = jax.random.randint(k_m, (classes, per_class), 0, jnp.asarray(counts)[c_PxK])
  return table[c_PxK, m_PxK].reshape(-1).astype(jnp.int32), c_PxK.reshape(-1).astype(jnp.int32)


def mnist_triplet(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    mining: str = "batch_hard",
    epochs: int = 20,
    classes_per_batch: int = 10,
    per_class: int = 16,
    steps_per_epoch: int | None = None,
    learning_rate: float = 1e-3,
    margin: float = 1.0,
    normalize: bool = False,
    seed: int = 0,
    log: Callable | None = None,
) -> tuple[dict, Any]:
  """The Keras example's MLP tower trained with an in-batch triplet loss and mining.

  Every step samples a P x K batch on the device (:func:`pk_batch`), embeds it once and
  applies :func:`siamjax.losses.batch_all_triplet_loss`, ``batch_hard_triplet_loss`` or
  ``semi_hard_triplet_loss`` (Euclidean, ``margin``), averaged over anchors; RMSprop as
  the contrastive recipe. Evaluation uses the example's test pairs
  (:func:`keras_pairs`, the same key as :func:`mnist_contrastive` with the same seed),
  a threshold chosen for best accuracy on the example's *training* pairs (the
  contrastive example fixes 0.5 instead; a triplet embedding has no fixed scale), and
  recall@1 over the test images.

  Args:
    x_train, x_test: ``[N, 28, 28]`` uint8 images.
    y_train, y_test: ``[N]`` integer digits.
    mining: ``"batch_all"``, ``"batch_hard"`` or ``"semi_hard"``.
    epochs: passes of ``steps_per_epoch`` steps.
    classes_per_batch, per_class: P and K.
    steps_per_epoch: default ``N // (P K)`` (one epoch sees about N images).
    learning_rate, margin, seed: training settings.
    normalize: scale embeddings to unit length before the loss and at evaluation. The
      tower ends in a ReLU, so an unnormalised embedding can collapse to 0, a fixed
      point with zero gradient; batch-hard mining falls into it on MNIST (use
      ``normalize=True`` with a margin of about 0.2 there).
    log: called with each epoch's metrics.

  Returns:
    ``(results, params)``: ``test_pair_accuracy`` (at the train-chosen threshold),
    ``threshold``, ``test_best_accuracy`` (oracle threshold on test, for reference),
    ``test_verification``, ``test_recall_at_1``, ``history``, ``train_time_s`` and
    ``_roc_curves``.
  """
  if mining not in MINING:
    raise ValueError(f"mining must be one of {sorted(MINING)}, got {mining!r}")
  loss_per_anchor = MINING[mining]
  (k_init, k_fit, net, x_tr, x_te, table_tr, counts_tr, pairs_tr, similar_tr, pairs_te,
   similar_te) = _mnist_setup(x_train, y_train, x_test, y_test, seed)
  batch = classes_per_batch * per_class
  steps = steps_per_epoch or max(1, x_train.shape[0] // batch)

  def sample(key, data, step):
    del step
    positions, labels = pk_batch(key, data["table"], data["counts"], classes_per_batch, per_class)
    return {"x": data["x"][positions], "labels": labels}

  def embed(params, x, **kwargs):
    emb = net.apply(params, x, **kwargs)
    if normalize:
      emb = emb / jnp.maximum(distances.safe_sqrt(jnp.sum(jnp.square(emb), -1, keepdims=True)),
                              1e-6)
    return emb

  def loss_fn(params, batch, dropout_key):
    emb = embed(params, batch["x"], train=True, rngs={"dropout": dropout_key})
    per_anchor = loss_per_anchor(emb, batch["labels"], margin=margin)
    active = jnp.mean((per_anchor > 0).astype(jnp.float32))
    return jnp.mean(per_anchor), {"active_anchors": active}

  optimizer = optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, eps_in_sqrt=False)
  state = jax.jit(lambda k, x: _init_state(net, optimizer, k, x))(k_init, x_tr[:1])
  data = {"x": x_tr, "table": jnp.asarray(table_tr), "counts": jnp.asarray(counts_tr)}
  epoch_fn = make_train_epoch(loss_fn, optimizer, steps=steps, sample=sample)
  t0 = time.perf_counter()
  state, history = fit(epoch_fn, state, k_fit, data, epochs=epochs, log=log)
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t0

  @jax.jit
  def evaluate(params, x_tr, x_te, pairs_tr, pairs_te, y_te):
    emb_tr, emb_te = embed(params, x_tr), embed(params, x_te)
    return (_pair_distances(emb_tr, pairs_tr), _pair_distances(emb_te, pairs_te),
            verification.recall_at_1(emb_te, y_te))

  d_tr, d_te, recall = jax.device_get(evaluate(state.params, x_tr, x_te, pairs_tr, pairs_te,
                                               jnp.asarray(y_test)))
  similar_tr, similar_te = np.asarray(similar_tr), np.asarray(similar_te)
  _, t_score = verification.best_threshold_accuracy(-d_tr, similar_tr)
  report = verification.verification_report(d_te, similar_te)
  results = {
      "mining": mining,
      "test_pair_accuracy": verification.accuracy_at(-d_te, similar_te, t_score),
      "threshold": -t_score,
      "test_best_accuracy": report["best_accuracy"],
      "test_verification": report,
      "test_recall_at_1": float(recall),
      "batch": {"classes": classes_per_batch, "per_class": per_class},
      "steps_per_epoch": steps,
      "epochs": len(history),
      "margin": margin,
      "normalize": normalize,
      "learning_rate": learning_rate,
      "train_time_s": train_time,
      "history": history,
      "_roc_curves": {mining: (d_te, similar_te)},
  }
  return results, state.params


# ---------------------------------------------------------------------------------
# Image folders: SmallCNN pairs, N-way one-shot on held-out images, hardest mistakes
# ---------------------------------------------------------------------------------


def split_per_class(labels: np.ndarray, val_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Splits images by image, class by class: about ``val_fraction`` of each class held out.

  Every class keeps at least one training and one held-out image (classes need two).

  >>> tr, va = split_per_class(np.array([0, 0, 0, 0, 1, 1]), 0.5, seed=0)
  >>> sorted(tr.tolist() + va.tolist()), len(va)
  ([0, 1, 2, 3, 4, 5], 3)
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if members.size < 2:
      raise ValueError(f"labels: class {int(c)} has {members.size} image; each class needs two")
    k = min(max(1, int(round(val_fraction * members.size))), members.size - 1)
    val.append(members[:k])
    train.append(members[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def sample_pairs(key: jax.Array, table: jax.Array, counts: jax.Array, n_pairs: int
                 ) -> tuple[jax.Array, jax.Array]:
  """``n_pairs`` random pairs, alternating same-class and different-class, on the device.

  Anchor classes are uniform; members uniform within a class; a positive is another
  member of the anchor's class (classes need two members).

  Args:
    key: a ``jax.random`` key.
    table, counts: from :func:`class_index_table`.
    n_pairs: number of pairs (even).

  Returns:
    ``(pairs [n_pairs, 2] int32, similar [n_pairs] int32)``.
  """
  if n_pairs < 2 or n_pairs % 2:
    raise ValueError(f"n_pairs must be an even number >= 2, got {n_pairs}")
  table = jnp.asarray(table)
  counts = jnp.asarray(counts)
  c = table.shape[0]
  h = n_pairs // 2
  k_d, k_a, k_p, k_o, k_n = jax.random.split(key, 5)
  d_H = jax.random.randint(k_d, (h,), 0, c)
  a_H = jax.random.randint(k_a, (h,), 0, counts[d_H])
  p_H = (a_H + jax.random.randint(k_p, (h,), 1, jnp.maximum(counts[d_H], 2))) % counts[d_H]
  o_H = (d_H + jax.random.randint(k_o, (h,), 1, c)) % c
  n_H = jax.random.randint(k_n, (h,), 0, counts[o_H])
  anchor = table[d_H, a_H]
  pos = jnp.stack([anchor, table[d_H, p_H]], axis=-1)
  neg = jnp.stack([anchor, table[o_H, n_H]], axis=-1)
  pairs = jnp.stack([pos, neg], axis=1).reshape(-1, 2)
  return pairs.astype(jnp.int32), jnp.tile(jnp.array([1, 0], jnp.int32), h)


def _one_shot_trials(key, y_query, table_sup, counts_sup, n_way):
  """Per query: its class and ``n_way - 1`` other classes, one support member each.

  Returns ``support [Q, n_way]`` positions (column 0 is the true class).
  """
  c = table_sup.shape[0]
  k_cls, k_mem = jax.random.split(key)
  noise_QxC = jax.random.uniform(k_cls, (y_query.shape[0], c))
  noise_QxC = jnp.where(jnp.arange(c)[None, :] == y_query[:, None], jnp.inf, noise_QxC)
  others = jnp.argsort(noise_QxC, axis=1)[:, :n_way - 1]
  classes_QxN = jnp.concatenate([y_query[:, None], others], axis=1)
  members = jax.random.randint(k_mem, classes_QxN.shape, 0, counts_sup[classes_QxN])
  return table_sup[classes_QxN, members]


def image_folder(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    val_fraction: float = 0.3,
    epochs: int = 10,
    steps_per_epoch: int = 100,
    batch_pairs: int = 32,
    learning_rate: float = 1e-3,
    n_way: int = 5,
    eval_pairs: int = 2000,
    seed: int = 0,
    log: Callable | None = None,
) -> tuple[dict, Any]:
  """A Siamese SmallCNN on a folder of class-named images, split by image.

  :class:`siamjax.encoders.SmallCNN` towers sharing weights, the weighted-L1 logit head
  of :class:`siamjax.models.SiameseNet`, sigmoid cross-entropy, Adam. Each step draws
  ``batch_pairs`` balanced pairs among the training images on the device
  (:func:`sample_pairs`). Evaluation on held-out images, each encoded once:

  * pair accuracy at logit 0 (probability 0.5) over ``eval_pairs`` pairs whose first
    image is held out and whose second is any other image;
  * ``n_way``-way one-shot accuracy: each held-out image against one training image
    of its class and of ``n_way - 1`` other classes;
  * the hardest mistakes (highest-loss wrong pairs) for a contact sheet.

  Args:
    images: ``[N, H, W, C]`` uint8 images (scaled to [0, 1] on the device).
    labels: ``[N]`` integer classes (each with at least two images).
    val_fraction: held-out fraction of each class.
    epochs, steps_per_epoch, batch_pairs, learning_rate: training settings.
    n_way: classes per one-shot trial (capped at the number of classes).
    eval_pairs: held-out pairs to score.
    seed: root seed (split, init, pairs, dropout).
    log: called with each epoch's metrics.

  Returns:
    ``(results, params)``: ``val_pair_accuracy``, ``val_one_shot_accuracy``, ``n_way``,
    ``val_verification``, ``history``, ``train_time_s``, the split sizes, and
    ``_mistakes`` (``[(left position, right position, similar, probability)]``, worst
    first) and ``_roc_curves`` for the script (pop both before writing JSON).
  """
  from siamjax import models

  images = np.asarray(images)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"images must be [N, H, W, C] with N = labels' length, got "
                     f"{images.shape} and {labels.shape}")
  tr, va = split_per_class(labels, val_fraction, seed)
  c = int(labels.max()) + 1
  n_way = min(n_way, c)
  table_tr, counts_tr = class_index_table(labels[tr], c)
  table_all, counts_all = class_index_table(labels, c)
  x = jnp.asarray(images)
  net = models.SiameseNet(encoder=encoders.SmallCNN())
  optimizer = optax.adam(learning_rate)
  key = jax.random.key(seed)
  k_init, k_fit, k_eval_pairs, k_shot = jax.random.split(key, 4)
  scale = lambda u8: u8.astype(jnp.float32) / 255.0  # noqa: E731

  def init(k, x1):
    params = net.init(k, x1, x1)
    return TrainState(params, optimizer.init(params))

  state = jax.jit(init)(k_init, scale(x[:1]))
  data = {"x": x, "train": jnp.asarray(tr, jnp.int32), "table": jnp.asarray(table_tr),
          "counts": jnp.asarray(counts_tr)}

  def sample(key, data, step):
    del step
    pairs, similar = sample_pairs(key, data["table"], data["counts"], batch_pairs)
    pos = data["train"][pairs]  # table positions index the training subset
    return {"x1": scale(data["x"][pos[:, 0]]), "x2": scale(data["x"][pos[:, 1]]),
            "similar": similar}

  def loss_fn(params, batch, dropout_key):
    logits = net.apply(params, batch["x1"], batch["x2"], train=True,
                       rngs={"dropout": dropout_key})
    acc = jnp.mean(((logits > 0).astype(jnp.int32) == batch["similar"]).astype(jnp.float32))
    return jnp.mean(losses.pair_bce_loss(logits, batch["similar"])), {"accuracy": acc}

  epoch_fn = make_train_epoch(loss_fn, optimizer, steps=steps_per_epoch, sample=sample,
                              loop="python")
  t0 = time.perf_counter()
  state, history = fit(epoch_fn, state, k_fit, data, epochs=epochs, log=log)
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t0

  # Held-out pairs: first image held out, second any other image of the same / another class.
  n_pairs = max(2, eval_pairs - eval_pairs % 2)
  va_dev = jnp.asarray(va, jnp.int32)

  @jax.jit
  def evaluate(params, x, key_pairs, key_shot):
    emb = net.apply(params, scale(x), method=net.embed)  # every image once
    k_q, k_p, k_o, k_n = jax.random.split(key_pairs, 4)
    h = n_pairs // 2
    q = va_dev[jax.random.randint(k_q, (h,), 0, va_dev.shape[0])]
    yq = jnp.asarray(labels)[q]
    cnt = jnp.asarray(counts_all)
    tab = jnp.asarray(table_all)
    # a positive partner other than q itself: draw among the class's other members
    rank_q = jnp.argmax(tab[yq] == q[:, None], axis=1)
    p_rank = (rank_q + jax.random.randint(k_p, (h,), 1, cnt[yq])) % cnt[yq]
    other = (yq + jax.random.randint(k_o, (h,), 1, c)) % c
    n_rank = jax.random.randint(k_n, (h,), 0, cnt[other])
    right = jnp.stack([tab[yq, p_rank], tab[other, n_rank]], axis=1).reshape(-1)
    left = jnp.repeat(q, 2)
    similar = jnp.tile(jnp.array([1, 0], jnp.int32), h)
    logits = net.apply(params, emb[left], emb[right], method=net.head)
    # One-shot: held-out queries against one training image per class.
    support = _one_shot_trials(key_shot, jnp.asarray(labels)[va_dev], jnp.asarray(table_tr),
                               jnp.asarray(counts_tr), n_way)
    support = data["train"][support]
    shot_logits = net.apply(params, emb[va_dev][:, None, :], emb[support], method=net.head)
    shot_acc = jnp.mean((jnp.argmax(shot_logits, axis=1) == 0).astype(jnp.float32))
    return left, right, similar, logits, shot_acc

  left, right, similar, logits, shot_acc = jax.device_get(
      evaluate(state.params, x, k_eval_pairs, k_shot))
  prob = 1.0 / (1.0 + np.exp(-logits))
  wrong = np.flatnonzero((logits > 0).astype(np.int32) != similar)
  pair_loss = np.asarray(losses.pair_bce_loss(jnp.asarray(logits), jnp.asarray(similar)))
  worst = wrong[np.argsort(-pair_loss[wrong])]
  results = {
      "val_pair_accuracy": float(np.mean((logits > 0).astype(np.int32) == similar)),
      "val_one_shot_accuracy": float(shot_acc),
      "n_way": n_way,
      "val_verification": verification.verification_report(-logits, similar),
      "threshold_units": "negated logit (same when -logit <= threshold)",
      "images": {"train": int(tr.size), "val": int(va.size), "classes": c},
      "image_shape": list(images.shape[1:]),
      "epochs": len(history),
      "steps_per_epoch": steps_per_epoch,
      "batch_pairs": batch_pairs,
      "train_time_s": train_time,
      "history": history,
      "_mistakes": _unique_pairs([(int(left[i]), int(right[i]), int(similar[i]),
                                   float(prob[i])) for i in worst]),
      "_roc_curves": {"held-out pairs": (-logits, similar)},
  }
  return results, state.params


def _unique_pairs(mistakes: list) -> list:
  """Keeps the first occurrence of each unordered image pair (eval pairs may repeat)."""
  seen, out = set(), []
  for m in mistakes:
    key = (min(m[0], m[1]), max(m[0], m[1]))
    if key not in seen:
      seen.add(key)
      out.append(m)
  return out


def contact_sheet(path: str | os.PathLike, images: np.ndarray, mistakes: list, *,
                  class_names: list[str] | None = None, labels: np.ndarray | None = None,
                  max_pairs: int = 12, cell: int = 64) -> int:
  """Writes a PNG of mistaken pairs, one row per pair: left, right, and a caption.

  Args:
    path: the PNG to write.
    images: ``[N, H, W, C]`` uint8 images.
    mistakes: ``(left, right, similar, probability)`` tuples, worst first
      (``results["_mistakes"]`` of :func:`image_folder`).
    class_names, labels: to caption each image with its class.
    max_pairs: rows in the sheet.
    cell: pixel size of each image in the sheet.

  Returns:
    The number of pairs drawn.
  """
  from PIL import Image, ImageDraw

  rows = mistakes[:max_pairs]
  text_w = 190
  sheet = Image.new("RGB", (2 * cell + text_w, max(1, len(rows)) * cell), "white")
  draw = ImageDraw.Draw(sheet)
  if not rows:
    draw.text((4, 4), "no mistakes", fill="black")
  for r, (i, j, same, p) in enumerate(rows):
    for k, idx in enumerate((i, j)):
      im = images[idx]
      im = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
      sheet.paste(im.resize((cell, cell)), (k * cell, r * cell))
    name = (lambda idx: class_names[labels[idx]] if class_names is not None
            and labels is not None else "")
    caption = (f"{'same' if same else 'different'}, p(same)={p:.2f}\n"
               f"{name(i)[:14]} | {name(j)[:14]}")
    draw.text((2 * cell + 6, r * cell + 6), caption, fill="black")
  sheet.save(path)
  return len(rows)
