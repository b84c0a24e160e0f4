"""Few-shot classification with Siamese embeddings: prototypes, training steps, protocol.

* Prototypes and nearest-prototype classification (:func:`prototypes`,
  :func:`nearest_prototype`).
* A bag-of-n-grams text encoder as a pure function over a parameter dict
  (:func:`init_bag`, :func:`bag_embed`).
* Split-view self-supervised pre-training (:func:`pretrain_split_view`): each title's
  n-grams are split at random into two disjoint views, and the two views of a title are
  pulled together against the rest of the batch with :func:`siamjax.losses.ntxent_loss`
  (symmetric in-batch InfoNCE). Unlike SimCSE-style dropout views, two disjoint halves
  of a bag of n-grams cannot be matched by copying, so the task stays hard.
* Supervised fine-tuning on the few labelled examples with the same in-batch loss over
  class labels (:func:`finetune_in_batch`).
* The seed's pair model (:func:`seed_pairs`, :func:`train_pair_contrastive`): a
  TextCNN trained with :func:`siamjax.losses.contrastive_loss` on within-class positive
  pairs and about as many sampled negatives.

Every training function is one jitted ``lax.scan`` over steps: batches are sampled on
the device with ``fold_in(key, step)``, and only the per-step losses come back, once,
at the end.

:func:`run_thucnews` runs the whole THUCNews 14-way protocol (used by
``experiments/thucnews_fewshot.py``).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import _checks
from siamjax import distances as _distances
from siamjax import losses as _losses

__all__ = [
    "prototypes",
    "nearest_prototype",
    "accuracy",
    "confusion_matrix",
    "init_bag",
    "bag_embed",
    "split_views",
    "pretrain_split_view",
    "finetune_in_batch",
    "seed_pairs",
    "train_pair_contrastive",
    "embed_all",
    "run_thucnews",
]

Params = Any


# ---------------------------------------------------------------------------------
# Prototypes and classification
# ---------------------------------------------------------------------------------


def prototypes(embeddings: jax.Array, labels: jax.Array, num_classes: int, *,
               reduce: str = "mean") -> jax.Array:
  """Class support vectors: the mean (or sum) of each class's embeddings.

  Args:
    embeddings: ``[N, D]`` support embeddings.
    labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    reduce: ``"mean"`` (prototypical networks) or ``"sum"`` (the seed's support vector).

  Returns:
    ``[C, D]`` prototypes (a class without support gets zeros).

  References:
    J. Snell, K. Swersky, R. Zemel, "Prototypical Networks for Few-shot Learning",
    NeurIPS 2017.

  >>> emb = jnp.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
  >>> prototypes(emb, jnp.array([0, 0, 1]), 2).tolist()
  [[1.0, 1.0], [4.0, 4.0]]
  """
  emb = _checks.floating("embeddings", embeddings)
  _checks.rank("embeddings", emb, 2, "[N, D]")
  labels = _checks.class_labels("labels", labels, emb.shape[0])
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
  total = jax.ops.segment_sum(emb, labels, num_segments=num_classes)
  if reduce == "sum":
    return total
  count = jax.ops.segment_sum(jnp.ones_like(labels, emb.dtype), labels,
                              num_segments=num_classes)
  return total / jnp.maximum(count, 1.0)[:, None]


def nearest_prototype(queries: jax.Array, protos: jax.Array, *,
                      distance: str = "cosine") -> tuple[jax.Array, jax.Array]:
  """Classifies each query by its nearest prototype.

  Args:
    queries: ``[Q, D]`` query embeddings (each encoded once).
    protos: ``[C, D]`` prototypes.
    distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

  Returns:
    ``(predictions [Q] int32, distances [Q, C])``.

  >>> q = jnp.array([[0.9, 0.1], [0.0, 1.0]]); p = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  >>> nearest_prototype(q, p)[0].tolist()
  [0, 1]
  """
  q = _checks.floating("queries", queries)
  _checks.rank("queries", q, 2, "[Q, D]")
  p = _checks.floating("protos", protos)
  _checks.rank("protos", p, 2, "[C, D]")
  if q.shape[1] != p.shape[1]:
    raise ValueError(f"queries have dim {q.shape[1]} but protos have dim {p.shape[1]}")
  dist_QxC = _distances.pairwise_distances(q, p, distance=distance)
  return jnp.argmin(dist_QxC, axis=1).astype(jnp.int32), dist_QxC


def accuracy(predictions, labels) -> float:
  """Fraction of ``predictions`` equal to ``labels`` (host-side, both ``[Q]``)."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
  return float(np.mean(predictions == labels))


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
  """``[C, C]`` counts: row = true class, column = predicted class.

  >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
  [[1, 1], [0, 1]]
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, predictions), 1)
  return out


# ---------------------------------------------------------------------------------
# Bag-of-n-grams encoder (pure function over a parameter dict)
# ---------------------------------------------------------------------------------


def init_bag(key: jax.Array, vocab_size: int, dim: int = 128) -> Params:
  """Parameters of :func:`bag_embed`: ``{"embed": [vocab_size, dim]}`` (row 0 = padding)."""
  if vocab_size < 2 or dim < 1:
    raise ValueError(f"vocab_size must be >= 2 and dim >= 1, got {vocab_size}, {dim}")
  return {"embed": 0.1 * jax.random.normal(key, (vocab_size, dim), jnp.float32)}


def bag_embed(params: Params, tokens: jax.Array, keep: jax.Array | None = None) -> jax.Array:
  """Mean of the n-gram embeddings of each title (padding and ``~keep`` ignored).

  Args:
    params: from :func:`init_bag`.
    tokens: ``[B, L]`` int ids, 0 = padding.
    keep: optional ``[B, L]`` bool mask of the tokens to use (a view).

  Returns:
    ``[B, D]`` embeddings (zeros for a title with no token kept).

  >>> p = {"embed": jnp.array([[9.0], [1.0], [3.0]])}
  >>> bag_embed(p, jnp.array([[1, 2, 0]])).tolist()
  [[2.0]]
  """
  mask_BxL = tokens > 0
  if keep is not None:
    mask_BxL = mask_BxL & keep
  w_BxL = mask_BxL.astype(jnp.float32)
  emb_BxLxD = jnp.take(params["embed"], tokens, axis=0)
  total_BxD = jnp.einsum("bl,bld->bd", w_BxL, emb_BxLxD)
  return total_BxD / jnp.maximum(jnp.sum(w_BxL, axis=1, keepdims=True), 1.0)


def embed_all(embed_fn: Callable, params: Params, tokens: np.ndarray, *,
              chunk: int = 2048) -> jax.Array:
  """Embeds ``[N, L]`` tokens in chunks of ``chunk`` rows with one jitted ``lax.map``."""
  n = tokens.shape[0]
  n_chunks = -(-n // chunk)
  padded = np.zeros((n_chunks * chunk, tokens.shape[1]), tokens.dtype)
  padded[:n] = tokens

  @jax.jit
  def run(params, tok):
    out = jax.lax.map(lambda t: embed_fn(params, t), tok.reshape(n_chunks, chunk, -1))
    return out.reshape(n_chunks * chunk, -1)

  return run(params, jnp.asarray(padded))[:n]


# ---------------------------------------------------------------------------------
# Split-view pre-training and in-batch fine-tuning
# ---------------------------------------------------------------------------------


def split_views(key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits each title's tokens at random into two disjoint views.

  Args:
    key: PRNG key.
    tokens: ``[B, L]`` token ids.

  Returns:
    ``(keep_a, keep_b)``, ``[B, L]`` bool masks with ``keep_a & keep_b`` all False.
  """
  coin_BxL = jax.random.bernoulli(key, 0.5, tokens.shape)
  return coin_BxL, ~coin_BxL


def _scan_train(loss_fn, params, opt, steps, key):
  """Runs ``steps`` optimiser steps of ``loss_fn(params, step_key)`` in one lax.scan."""
  def step(carry, i):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, i))
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
  return params, losses


@functools.partial(jax.jit, static_argnames=("steps", "batch", "temperature", "lr"))
def pretrain_split_view(params: Params, tokens: jax.Array, key: jax.Array, *,
                        steps: int = 2000, batch: int = 256, temperature: float = 0.1,
                        lr: float = 1e-3) -> tuple[Params, jax.Array]:
  """Self-supervised split-view pre-training of :func:`bag_embed` on unlabelled titles.

  Each step draws ``batch`` titles, splits each one's tokens into two disjoint random
  views (:func:`split_views`), embeds the ``2 * batch`` views at once and minimises
  :func:`siamjax.losses.ntxent_loss` with the two views of a title as the only
  positive pair (symmetric in-batch InfoNCE).

  Args:
    params: from :func:`init_bag`.
    tokens: ``[N, L]`` unlabelled (non-test) titles.
    key: PRNG key.
    steps: optimiser steps (Adam).
    batch: titles per step.
    temperature: InfoNCE temperature.
    lr: Adam learning rate.

  Returns:
    ``(params, losses [steps])``.

  References:
    T. Chen et al., SimCLR, ICML 2020; T. Gao et al., SimCSE, EMNLP 2021 (the
    dropout-view variant that collapses for bags of n-grams).
  """
  n = tokens.shape[0]
  ids_2B = jnp.concatenate([jnp.arange(batch), jnp.arange(batch)])

  def loss_fn(p, k):
    k_idx, k_view = jax.random.split(k)
    tok_BxL = tokens[jax.random.randint(k_idx, (batch,), 0, n)]
    keep_a, keep_b = split_views(k_view, tok_BxL)
    tok_2BxL = jnp.concatenate([tok_BxL, tok_BxL])
    emb_2BxD = bag_embed(p, tok_2BxL, jnp.concatenate([keep_a, keep_b]))
    return jnp.mean(_losses.ntxent_loss(emb_2BxD, ids_2B, temperature=temperature))

  return _scan_train(loss_fn, params, optax.adam(lr), steps, key)


@functools.partial(jax.jit, static_argnames=("steps", "temperature", "lr", "keep_prob"))
def finetune_in_batch(params: Params, tokens: jax.Array, labels: jax.Array, key: jax.Array,
                      *, steps: int = 100, temperature: float = 0.1, lr: float = 1e-3,
                      keep_prob: float = 0.5) -> tuple[Params, jax.Array]:
  """Supervised fine-tuning of :func:`bag_embed` on the few labelled titles.

  Every step embeds all labelled titles, each with a random ``keep_prob`` subset of its
  tokens (augmentation against overfitting), and minimises
  :func:`siamjax.losses.ntxent_loss` over the class labels (supervised contrastive: all
  same-class titles are positives).

  Args:
    params: from :func:`init_bag` or :func:`pretrain_split_view`.
    tokens: ``[S, L]`` labelled titles.
    labels: ``[S]`` int class ids.
    key: PRNG key.
    steps: Adam steps (full batch).
    temperature: softmax temperature.
    lr: Adam learning rate.
    keep_prob: probability that a token is kept in a step (1 = no augmentation).

  Returns:
    ``(params, losses [steps])``.

  References:
    P. Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
  """
  def loss_fn(p, k):
    keep = jax.random.bernoulli(k, keep_prob, tokens.shape)
    emb_SxD = bag_embed(p, tokens, keep)
    return jnp.mean(_losses.ntxent_loss(emb_SxD, labels, temperature=temperature))

  return _scan_train(loss_fn, params, optax.adam(lr), steps, key)


# ---------------------------------------------------------------------------------
# The seed's pair model
# ---------------------------------------------------------------------------------


def seed_pairs(key: jax.Array, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The seed's training pairs: every within-class pair plus as many sampled negatives.

  Each positive ``(i, j)`` (``i < j``, same class) gets a negative ``(i, k)`` with ``k``
  drawn uniformly from the other classes' examples.

  Args:
    key: PRNG key for the negatives.
    labels: ``[S]`` host int class ids.

  Returns:
    ``(pairs [P, 2] int32, similar [P] int32)`` with ``P = 2 * #positives``.

  >>> pairs, sim = seed_pairs(jax.random.key(0), np.array([0, 0, 1, 1]))
  >>> pairs.shape, sim.tolist()
  ((4, 2), [1, 1, 0, 0])
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a [S] integer array, got {labels.dtype} {labels.shape}")
  i, j = np.triu_indices(len(labels), k=1)
  same = labels[i] == labels[j]
  pos_Px2 = np.stack([i[same], j[same]], axis=1).astype(np.int32)
  if len(pos_Px2) == 0:
    raise ValueError("labels must have a class with at least two examples")
  # A uniform other-class partner: the r-th example among those not in the anchor's class.
  order = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[order], labels[pos_Px2[:, 0]])
  counts = np.bincount(labels)[labels[pos_Px2[:, 0]]]
  r = jax.random.randint(key, (len(pos_Px2),), 0, len(labels) - counts)
  r = np.asarray(r)
  neg = order[np.where(r < starts, r, r + counts)].astype(np.int32)
  neg_Px2 = np.stack([pos_Px2[:, 0], neg], axis=1)
  pairs = np.concatenate([pos_Px2, neg_Px2])
  similar = np.concatenate([np.ones(len(pos_Px2), np.int32), np.zeros(len(neg_Px2), np.int32)])
  return jnp.asarray(pairs), jnp.asarray(similar)


@functools.lru_cache(maxsize=None)
def _pair_step(apply_fn: Callable, batch: int, margin: float, lr: float):
  """The jitted contrastive pair step (state donated) and its optimiser, cached."""
  opt = optax.adam(lr)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, tokens, pairs, similar, order):
    params, opt_state, s = state
    rows = jax.lax.dynamic_slice_in_dim(order, s * batch, batch)
    pair_Bx2 = pairs[rows]
    tok_2BxL = tokens[jnp.concatenate([pair_Bx2[:, 0], pair_Bx2[:, 1]])]

    def loss(p):
      emb_2BxD = apply_fn(p, tok_2BxL)
      d_B = _distances.euclidean(emb_2BxD[:batch], emb_2BxD[batch:])
      return jnp.mean(_losses.contrastive_loss(d_B, similar[rows], margin=margin))

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, s + 1), value

  return step, opt


def train_pair_contrastive(apply_fn: Callable, params: Params, tokens: jax.Array,
                           pairs: jax.Array, similar: jax.Array, key: jax.Array, *,
                           epochs: int = 2, batch: int = 32, margin: float = 2.0,
                           lr: float = 1e-3) -> tuple[Params, jax.Array]:
  """Trains a Siamese encoder with the contrastive loss on fixed pairs (the seed's recipe).

  Pairs are reshuffled every epoch; each step encodes both sides of ``batch`` pairs as
  one ``2 * batch`` batch and minimises :func:`siamjax.losses.contrastive_loss` of their
  Euclidean distance. The steps are dispatched from a Python loop over one jitted,
  donated step (no host sync; losses are fetched once at the end): XLA:CPU runs the
  TextCNN's convolutions about 20x slower inside a ``lax.scan`` body (0.23 s against
  11 ms per step, measured on a 2-core CPU).

  Args:
    apply_fn: ``apply_fn(params, tokens [B, L]) -> [B, D]`` (hashable, e.g. a module's
      ``apply``).
    params: its parameters.
    tokens: ``[S, L]`` titles.
    pairs: ``[P, 2]`` indices into ``tokens``.
    similar: ``[P]`` 1 for a same-class pair.
    key: PRNG key (shuffling).
    epochs: passes over the pairs (a last partial batch is dropped).
    batch: pairs per step.
    margin: contrastive margin.
    lr: Adam learning rate.

  Returns:
    ``(params, losses [steps])``.

  References:
    R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006.
  """
  per_epoch = pairs.shape[0] // batch
  if per_epoch < 1:
    raise ValueError(f"pairs has {pairs.shape[0]} rows, fewer than batch={batch}")
  order = jnp.concatenate([
      jax.random.permutation(jax.random.fold_in(key, e), pairs.shape[0])[:per_epoch * batch]
      for e in range(epochs)])
  step, opt = _pair_step(apply_fn, batch, float(margin), float(lr))
  params = jax.tree.map(jnp.array, params)  # a copy: the step donates its state
  state = (params, opt.init(params), jnp.zeros((), jnp.int32))
  losses = []
  for _ in range(epochs * per_epoch):  # dispatch only: the step counter lives on device
    state, loss = step(state, tokens, pairs, similar, order)
    losses.append(loss)
  return state[0], jnp.stack(losses)


# ---------------------------------------------------------------------------------
# The THUCNews 14-way protocol
# ---------------------------------------------------------------------------------


def _tfidf_lr(train_text, train_y, eval_texts, c: float):
  """Character 1-2-gram TF-IDF + logistic regression fitted on the labelled titles only."""
  from sklearn.feature_extraction.text import TfidfVectorizer  # optional dependency
  from sklearn.linear_model import LogisticRegression

  vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
  x = vec.fit_transform(train_text)
  clf = LogisticRegression(C=c, max_iter=2000).fit(x, train_y)
  return [clf.predict_proba(vec.transform(t)) for t in eval_texts]


def run_thucnews(titles: list[str], labels: np.ndarray, *, seeds=(0, 1, 2, 3, 4),
                 shots: int = 50, max_test: int = 3000, val_per_class: int = 300,
                 min_count: int = 5, max_len: int = 64, dim: int = 128,
                 pretrain_steps: int = 1000, pretrain_batch: int = 512,
                 temperature: float = 0.1, pretrain_lr: float = 2e-3,
                 finetune_steps: int = 100, finetune_lr: float = 1e-3,
                 keep_prob: float = 0.5, scratch_steps: int = 300,
                 seed_len: int = 32, seed_epochs: int = 2, tfidf_c: float = 10.0,
                 log: Callable[[str], None] = print) -> dict:
  """Runs every variant of the few-shot title protocol over several draws.

  Per draw (seed): :func:`siamjax.data.thucnews.draw_split` gives ``shots`` labelled
  titles per class, up to ``max_test`` test titles per class and ``val_per_class``
  validation titles carved from the non-test pool. Vocabularies and all unlabelled
  text come from the non-test titles only; test titles are only ever encoded as
  queries. Variants (all classify by nearest class support vector unless named):

  * ``tfidf_lr``: char 1-2-gram TF-IDF + logistic regression on the labelled titles.
  * ``seed_baseline_sum`` / ``seed_baseline_mean``: the seed's TextCNN pair model
    (contrastive loss, margin 2, Adam 1e-3, batch 32, 2 epochs); support vector =
    sum / mean of the class's embeddings, score ``1 / (1 + d)``.
  * ``bag_scratch``: n-gram bag trained on the labelled titles only (in-batch loss).
  * ``splitview``: split-view pre-training, mean prototypes, cosine.
  * ``splitview_finetune``: the same, then in-batch fine-tuning on the labelled titles.
  * ``splitview_finetune+tfidf_lr``: the mean of its prototype softmax (negative
    cosine distance / ``temperature``) and the TF-IDF model's class probabilities.

  Args:
    titles, labels: the pool (``[N]`` int class ids).
    seeds: one draw per seed.
    shots, max_test, val_per_class: the split (see ``draw_split``).
    min_count, max_len: vocabulary and tokenising (see ``build_vocab``/``encode``).
    dim: bag embedding width.
    pretrain_steps, pretrain_batch, temperature, pretrain_lr: :func:`pretrain_split_view`.
    finetune_steps, finetune_lr, keep_prob: :func:`finetune_in_batch` (also used,
      with ``scratch_steps``, for ``bag_scratch``).
    seed_len, seed_epochs: the seed model's title length and epochs.
    tfidf_c: inverse regularisation of the logistic regression.
    log: progress printer.

  Returns:
    A dict: ``variants`` -> ``{"test": [acc per draw], "val": [...], "time_s": [...]}``,
    ``confusion`` -> variant -> ``[C, C]`` test counts summed over draws, ``draws`` ->
    split sizes, and ``num_classes``.
  """
  from siamjax import encoders
  from siamjax.data import thucnews

  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  results: dict = {}
  confusion: dict = {}
  draws = []

  def record(name, seconds, preds_test, preds_val, y_test, y_val):
    r = results.setdefault(name, {"test": [], "val": [], "time_s": []})
    r["test"].append(accuracy(preds_test, y_test))
    r["val"].append(accuracy(preds_val, y_val) if len(y_val) else float("nan"))
    r["time_s"].append(round(seconds, 2))
    confusion[name] = confusion.get(name, 0) + confusion_matrix(preds_test, y_test, num_classes)
    log(f"  {name:22s} test {r['test'][-1]:.4f}  val {r['val'][-1]:.4f}  ({seconds:.1f} s)")

  for seed in seeds:
    t_draw = time.perf_counter()
    split = thucnews.draw_split(labels, seed, shots=shots, max_test=max_test,
                                val_per_class=val_per_class)
    nontest = np.concatenate([split.train, split.val, split.unlabelled])
    draws.append({"seed": int(seed), "train": len(split.train), "val": len(split.val),
                  "test": len(split.test), "unlabelled": len(split.unlabelled)})
    log(f"draw seed={seed}: {draws[-1]}")
    text = lambda idx: [titles[i] for i in idx]  # noqa: E731
    y_tr, y_val, y_te = labels[split.train], labels[split.val], labels[split.test]
    key = jax.random.key(seed)
    k_seed, k_pairs, k_scratch, k_pre, k_ft, k_init = jax.random.split(key, 6)

    # Non-neural baseline.
    t0 = time.perf_counter()
    prob_te, prob_val = _tfidf_lr(text(split.train), y_tr,
                                  [text(split.test), text(split.val)], tfidf_c)
    t_tfidf = time.perf_counter() - t0
    record("tfidf_lr", t_tfidf, prob_te.argmax(1), prob_val.argmax(1), y_te, y_val)

    # The seed's model: TextCNN + contrastive pairs, sum / mean support vectors.
    t0 = time.perf_counter()
    cvocab = thucnews.build_vocab(text(nontest), chars_only=True)
    ctok = lambda idx: thucnews.encode(text(idx), cvocab, max_len=seed_len,  # noqa: E731
                                       chars_only=True)
    net = encoders.TextCNN(vocab_size=cvocab.size)
    c_tr = jnp.asarray(ctok(split.train))
    params = net.init(k_seed, c_tr[:2])
    pairs, similar = seed_pairs(k_pairs, y_tr)
    params, _ = train_pair_contrastive(net.apply, params, c_tr, pairs, similar, k_seed,
                                       epochs=seed_epochs)
    e_tr = embed_all(net.apply, params, np.asarray(c_tr))
    e_te = embed_all(net.apply, params, ctok(split.test))
    e_val = embed_all(net.apply, params, ctok(split.val))
    t_seed = time.perf_counter() - t0
    for reduce in ("sum", "mean"):
      protos = prototypes(e_tr, jnp.asarray(y_tr), num_classes, reduce=reduce)
      # Score 1 / (1 + d): the largest similarity is the smallest distance.
      p_te = nearest_prototype(e_te, protos, distance="euclidean")[0]
      p_val = nearest_prototype(e_val, protos, distance="euclidean")[0]
      record(f"seed_baseline_{reduce}", t_seed, p_te, p_val, y_te, y_val)

    # n-gram bags: vocabulary from non-test text.
    vocab = thucnews.build_vocab(text(nontest), min_count=min_count)
    tok = lambda idx: thucnews.encode(text(idx), vocab, max_len=max_len)  # noqa: E731
    t_tr, t_te, t_val = tok(split.train), tok(split.test), tok(split.val)
    t_unl = jnp.asarray(tok(nontest))
    init = init_bag(k_init, vocab.size, dim)

    def evaluate(name, params, seconds, ensemble=False):
      emb = functools.partial(embed_all, bag_embed, params)
      protos = prototypes(emb(t_tr), jnp.asarray(y_tr), num_classes)
      p_te, d_te = nearest_prototype(emb(t_te), protos)
      p_val, d_val = nearest_prototype(emb(t_val), protos)
      record(name, seconds, p_te, p_val, y_te, y_val)
      if ensemble:
        # Average the prototype softmax (cosine / temperature) with the TF-IDF LR's.
        mix = lambda d, prob: np.argmax(  # noqa: E731
            np.asarray(jax.nn.softmax(-d / temperature, axis=1)) + prob, axis=1)
        record(f"{name}+tfidf_lr", seconds + t_tfidf, mix(d_te, prob_te),
               mix(d_val, prob_val), y_te, y_val)

    t0 = time.perf_counter()
    scratch, _ = finetune_in_batch(init, jnp.asarray(t_tr), jnp.asarray(y_tr), k_scratch,
                                   steps=scratch_steps, temperature=temperature,
                                   lr=finetune_lr * 10, keep_prob=keep_prob)
    evaluate("bag_scratch", scratch, time.perf_counter() - t0)

    t0 = time.perf_counter()
    pre, pre_losses = pretrain_split_view(init, t_unl, k_pre, steps=pretrain_steps,
                                          batch=pretrain_batch, temperature=temperature,
                                          lr=pretrain_lr)
    pre_losses = np.asarray(pre_losses)
    t_pre = time.perf_counter() - t0
    log(f"  pre-training loss {pre_losses[0]:.3f} -> {pre_losses[-50:].mean():.3f} "
        f"({t_pre:.1f} s)")
    evaluate("splitview", pre, t_pre)

    t0 = time.perf_counter()
    tuned, _ = finetune_in_batch(pre, jnp.asarray(t_tr), jnp.asarray(y_tr), k_ft,
                                 steps=finetune_steps, temperature=temperature,
                                 lr=finetune_lr, keep_prob=keep_prob)
    evaluate("splitview_finetune", tuned, t_pre + time.perf_counter() - t0, ensemble=True)
    log(f"  draw done in {time.perf_counter() - t_draw:.1f} s")

  return {"variants": results, "confusion": {k: v.tolist() for k, v in confusion.items()},
          "draws": draws, "num_classes": num_classes}


def summarize(out: dict) -> dict:
  """Mean/std test accuracy per variant and the best variant chosen by validation accuracy.

  Args:
    out: the dict returned by :func:`run_thucnews`.

  Returns:
    ``{"<variant>_accuracy_mean": .., "<variant>_accuracy_std": ..,
    "<variant>_val_accuracy_mean": .., "best_variant": .., "best_accuracy_mean": ..,
    "best_accuracy_std": .., "best_selected_by": ..}`` (fractions; std over draws,
    ``ddof=0``).

  >>> v = {"a": {"test": [0.5, 0.7], "val": [0.9, 0.9]}, "b": {"test": [0.8], "val": [0.1]}}
  >>> s = summarize({"variants": v}); s["best_variant"], round(s["best_accuracy_mean"], 3)
  ('a', 0.6)
  """
  summary = {}
  for name, r in out["variants"].items():
    summary[f"{name}_accuracy_mean"] = float(np.mean(r["test"]))
    summary[f"{name}_accuracy_std"] = float(np.std(r["test"]))
    summary[f"{name}_val_accuracy_mean"] = float(np.nanmean(r["val"]))
  best = max(out["variants"], key=lambda n: summary[f"{n}_val_accuracy_mean"])
  summary.update(best_variant=best, best_accuracy_mean=summary[f"{best}_accuracy_mean"],
                 best_accuracy_std=summary[f"{best}_accuracy_std"],
                 best_selected_by="highest mean validation accuracy (never test)")
  return summary


def save_confusion_png(confusion: np.ndarray, class_names, path: str, *, title: str = "") -> None:
  """Writes a row-normalised confusion matrix (rows = true class) as a PNG."""
  import matplotlib  # optional dependency
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  confusion = np.asarray(confusion, np.float64)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
  fig, ax = plt.subplots(figsize=(8, 7))
  im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  ticks = np.arange(len(class_names))
  ax.set_xticks(ticks, class_names, rotation=60, ha="right")
  ax.set_yticks(ticks, class_names)
  for i, j in zip(*np.nonzero(rates >= 0.005)):
    ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
            color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
