"""Few-shot 14-way THUCNews title classification: the seed's Siamese TextCNN, a TF-IDF
baseline, and n-gram bags with split-view pre-training, over several draws.

:func:`train_and_evaluate` takes a :class:`Config` and a work directory and, for each of
``num_draws`` draws (seeds ``seed, seed + 1, ...``):

1. draws the split (:func:`siamjax.data.thucnews.draw_split`): ``shots`` labelled titles
   per class, up to ``max_test`` test titles per class and ``val_per_class`` validation
   titles carved from the non-test pool. Vocabularies and all unlabelled text come from
   the non-test titles only; test titles are only ever encoded as queries;
2. trains every model through :func:`siamjax.train.run`, each one a sub-run with its own
   work directory ``workdir/seed<k>/<model>/`` (checkpoints, ``metrics.jsonl``), so that
   a killed run resumes in the model it was training and finished models are restored,
   not trained again:

   * ``seed_baseline``: the seed's TextCNN pair model, :func:`pair_loss_fn` (contrastive
     loss, margin 2, Adam 1e-3, batches of 32 pairs, 2 epochs over the fixed pairs of
     :func:`siamjax.sampling.exhaustive_pairs`, reshuffled every epoch by
     :func:`pair_prepare`);
   * ``bag_scratch``: an n-gram bag (:func:`siamjax.fewshot.bag_embed`) trained on the
     labelled titles only, :func:`in_batch_loss_fn` (full batch, supervised NT-Xent,
     random token dropout);
   * ``splitview``: the bag pre-trained on the unlabelled non-test titles,
     :func:`split_view_loss_fn` (a fresh batch every step, each title split into two
     disjoint views that must find each other in the batch);
   * ``splitview_finetune``: ``splitview``'s parameters fine-tuned on the labelled
     titles with :func:`in_batch_loss_fn`;

3. classifies by nearest class prototype (cosine for the bags; Euclidean, i.e. the
   seed's ``1 / (1 + d)`` score, for the TextCNN with sum and mean support vectors) and
   scores the variants ``tfidf_lr`` (:func:`tfidf_lr`), ``seed_baseline_sum``,
   ``seed_baseline_mean``, ``bag_scratch``, ``splitview``, ``splitview_finetune`` and
   ``splitview_finetune+tfidf_lr`` (the mean of the prototype softmax and the TF-IDF
   model's class probabilities) on the validation and test titles.

The best variant is the one with the highest mean validation accuracy (never test,
:func:`summarize`); its test confusion matrix summed over the draws is drawn in
``confusion_best.png`` (:func:`save_confusion_png`). The TF-IDF + LR baseline is not a
trained JAX model and keeps no state: it is fitted again on every run, a resumed or
``--eval-only`` one included (a few seconds, deterministic).

``experiments/thucnews_fewshot.py`` runs it from the command line
(:mod:`siamjax.recipes.cli` writes ``results.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import distances, encoders, fewshot, losses, parallel, sampling, train
from siamjax.data import thucnews

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "VARIANTS", "pair_loss_fn",
           "pair_prepare", "split_view_loss_fn", "in_batch_loss_fn", "steps_per_call_for",
           "tfidf_lr", "summarize", "save_confusion_png", "train_and_evaluate", "summary"]

NAME = "thucnews_fewshot"
# Config fields that may change between runs of one work directory: the draws are
# independent (adding draws keeps the finished ones), checkpoints only change how often
# a run saves.
RESUMABLE = frozenset({"num_draws", "checkpoint_every"})

VARIANTS = ("tfidf_lr", "seed_baseline_sum", "seed_baseline_mean", "bag_scratch",
            "splitview", "splitview_finetune", "splitview_finetune+tfidf_lr")

@dataclasses.dataclass
class Config:
  """Every knob of the recipe; the defaults are the committed 5-draw run."""

  preset: str = "custom"
  seed: int = 0  # draw k (0 .. num_draws - 1) uses seed + k for its split and its keys
  num_draws: int = 5
  # The split (siamjax.data.thucnews.draw_split).
  shots: int = 50
  max_test: int = 3000
  val_per_class: int = 300
  # The n-gram bags: characters and the bigrams seen min_count times in non-test text.
  min_count: int = 5
  max_len: int = 64
  dim: int = 128
  temperature: float = 0.1  # every in-batch loss, and the ensemble's prototype softmax
  # Split-view pre-training (Adam; pretrain_batch unlabelled titles drawn every step).
  pretrain_steps: int = 1000
  pretrain_batch: int = 512
  pretrain_lr: float = 2e-3
  # Supervised in-batch fine-tuning (Adam; every labelled title in every step).
  finetune_steps: int = 100
  finetune_lr: float = 1e-3
  keep_prob: float = 0.5  # per-step token keep probability (fine-tuning and bag_scratch)
  # bag_scratch: the fine-tuning loss from a random bag.
  scratch_steps: int = 300
  scratch_lr: float = 1e-2
  # The seed's TextCNN pair model (characters only, seed_len of them per title).
  seed_len: int = 32
  seed_epochs: int = 2
  seed_batch: int = 32
  seed_margin: float = 2.0
  seed_lr: float = 1e-3
  # TF-IDF + logistic regression: inverse regularisation.
  tfidf_c: float = 10.0
  # Loop. Each sub-run fuses the largest divisor of its step count that is at most
  # steps_per_call (bags) or seed_steps_per_call (the TextCNN: on the CPU its calls are
  # unrolled, see siamjax.train.make_train_step, so compilation grows with it; 9 of the
  # 2,142 steps per call measured 5-12 ms a step against 8 ms for one plain jitted step).
  steps_per_call: int = 50
  seed_steps_per_call: int = 9
  checkpoint_every: int = 500  # rounded down to a multiple of a sub-run's steps per call
  log_every: int = 1
  # Data parallelism: sampled batches are split over the devices (siamjax.parallel).
  devices: int = 1
  # Data: > 0 replaces the real pool by this many generated titles per class
  # (siamjax.data.thucnews.synthetic_titles; the smoke preset).
  synthetic_per_class: int = 0
  data_dir: str | None = None  # holds thucnews_titles/ (default: $SIAMJAX_DATA_DIR)


# default: python experiments/thucnews_fewshot.py --data-dir ../shared/data
#   expected: splitview_finetune (chosen on validation) 78.2 +- 0.3% test accuracy over 5
#   draws, TF-IDF + LR 69.8 +- 0.6%, the seed's model 23.5% (mean) / 9.4% (sum); about
#   80 s a draw on a 2-core CPU (experiments/results/thucnews_fewshot.json).
# smoke: python experiments/thucnews_fewshot.py --smoke --workdir /tmp/smoke
#   generated titles, one draw, about 25 s (mostly compilation); its first checkpoint
#   comes before the end of its first sub-run (the crash test of tests/test_scripts.py).
PRESETS = {
    "default": lambda: Config(preset="default"),
    "smoke": lambda: Config(
        preset="smoke", num_draws=1, synthetic_per_class=60, shots=10, max_test=30,
        val_per_class=10, pretrain_steps=30, pretrain_batch=64, finetune_steps=10,
        scratch_steps=10, seed_epochs=1, steps_per_call=10, seed_steps_per_call=9,
        checkpoint_every=6),
}


def _check(cfg: Config) -> None:
  ints = ("num_draws", "shots", "max_test", "val_per_class", "min_count", "max_len", "dim",
          "pretrain_steps", "pretrain_batch", "finetune_steps", "scratch_steps", "seed_len",
          "seed_epochs", "seed_batch", "steps_per_call", "seed_steps_per_call", "log_every")
  for name in ints:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  for name in ("seed", "checkpoint_every", "synthetic_per_class"):
    if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
      raise ValueError(f"{name} must be an int >= 0, got {getattr(cfg, name)!r}")
  for name in ("temperature", "pretrain_lr", "finetune_lr", "scratch_lr", "seed_lr",
               "tfidf_c", "seed_margin"):
    if not isinstance(getattr(cfg, name), (int, float)) or not getattr(cfg, name) > 0:
      raise ValueError(f"{name} must be a number > 0, got {getattr(cfg, name)!r}")
  if not isinstance(cfg.keep_prob, (int, float)) or not 0 < cfg.keep_prob <= 1:
    raise ValueError(f"keep_prob must be in (0, 1], got {cfg.keep_prob!r}")
  if cfg.seed_len < 9:
    raise ValueError(f"seed_len must be >= 9 (the TextCNN's two strided convolutions), got "
                     f"{cfg.seed_len}")


# ----------------------------------------------------------------------------- losses


def pair_loss_fn(embed_fn, *, margin: float):
  """The seed model's ``loss_fn(params, model_state, data, key, rows_B)``.

  ``data`` holds ``tokens [S, L]``, ``pairs [P, 2]`` (positions into ``tokens``) and
  ``similar [P]``; ``rows_B`` (from :func:`pair_prepare`) picks the step's pairs. Both
  sides of the ``B`` pairs are encoded as one ``2B`` batch (interleaved, so that every
  device of a data-parallel run encodes its own pairs) and the mean
  :func:`siamjax.losses.contrastive_loss` of their Euclidean distances is returned.

  Args:
    embed_fn: ``(params, tokens [N, L]) -> [N, D]``.
    margin: the contrastive margin (the seed: 2).

  References:
    R. Hadsell, S. Chopra, Y. LeCun, CVPR 2006.
  """

  def loss_fn(params, model_state, data, key, rows_B):
    del key
    pair_Bx2, similar_B = parallel.shard_batch((data["pairs"][rows_B],
                                                data["similar"][rows_B]))
    b = pair_Bx2.shape[0]
    emb_Bx2xD = embed_fn(params, data["tokens"][pair_Bx2.reshape(-1)]).reshape(b, 2, -1)
    d_B = distances.euclidean(emb_Bx2xD[:, 0], emb_Bx2xD[:, 1])
    loss = jnp.mean(losses.contrastive_loss(d_B, similar_B, margin=margin))
    return loss, (model_state, {})

  return loss_fn


def pair_prepare(batch_size: int):
  """The ``prepare`` of :func:`pair_loss_fn`: epoch-wise reshuffled passes over the pairs.

  Each call's rows come from :func:`siamjax.sampling.epoch_batches` over ``data["pairs"]``
  (a last partial batch of every epoch is dropped).
  """

  def prepare(data, key, step, num_steps):
    return sampling.epoch_batches(key, data["pairs"].shape[0], batch_size, step, num_steps)

  return prepare


def split_view_loss_fn(*, batch_size: int, temperature: float):
  """Split-view pre-training's ``loss_fn(params, model_state, data, key)`` for the bags.

  Every step draws ``batch_size`` titles of ``data["tokens"] [N, L]``
  (:func:`siamjax.sampling.sample_rows`), splits each one's n-grams at random into two
  disjoint views (:func:`siamjax.fewshot.split_views`), embeds the ``2 * batch_size``
  views at once (:func:`siamjax.fewshot.bag_embed`) and returns the mean
  :func:`siamjax.losses.ntxent_loss` with the two views of a title as its only positive
  pair (symmetric in-batch InfoNCE). Unlike SimCSE's dropout views, two disjoint halves
  of a bag cannot be matched by copying, so the task stays hard.

  References:
    T. Chen et al., SimCLR, ICML 2020; T. Gao et al., SimCSE, EMNLP 2021 (the dropout-view
    variant, which collapses for bags of n-grams).
  """
  ids_2B = jnp.repeat(jnp.arange(batch_size), 2)  # views 2i and 2i + 1 are title i's

  def loss_fn(params, model_state, data, key):
    k_rows, k_view = jax.random.split(key)
    rows_B = parallel.shard_batch(
        sampling.sample_rows(k_rows, data["tokens"].shape[0], batch_size))
    tok_BxL = data["tokens"][rows_B]
    keep_a, keep_b = fewshot.split_views(k_view, tok_BxL)
    tok_2BxL = jnp.repeat(tok_BxL, 2, axis=0)
    keep_2BxL = jnp.stack([keep_a, keep_b], axis=1).reshape(tok_2BxL.shape)
    emb_2BxD = fewshot.bag_embed(params, tok_2BxL, keep_2BxL)
    loss = jnp.mean(losses.ntxent_loss(emb_2BxD, ids_2B, temperature=temperature))
    return loss, (model_state, {})

  return loss_fn


def in_batch_loss_fn(*, temperature: float, keep_prob: float):
  """Supervised fine-tuning's full-batch ``loss_fn(params, model_state, data, key)``.

  Every step embeds all labelled titles ``data["tokens"] [S, L]``, each with a random
  ``keep_prob`` subset of its n-grams (augmentation against overfitting), and returns
  the mean :func:`siamjax.losses.ntxent_loss` over ``data["labels"] [S]`` (supervised
  contrastive: every same-class title is a positive).

  References:
    P. Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
  """

  def loss_fn(params, model_state, data, key):
    keep_SxL = jax.random.bernoulli(key, keep_prob, data["tokens"].shape)
    emb_SxD = fewshot.bag_embed(params, data["tokens"], keep_SxL)
    loss = jnp.mean(losses.ntxent_loss(emb_SxD, data["labels"], temperature=temperature))
    return loss, (model_state, {})

  return loss_fn


def steps_per_call_for(num_steps: int, most: int) -> int:
  """The largest divisor of ``num_steps`` that is at most ``most`` (updates per call).

  >>> steps_per_call_for(2142, 9), steps_per_call_for(1000, 50), steps_per_call_for(39, 9)
  (9, 50, 3)
  """
  return max(d for d in range(1, min(most, num_steps) + 1) if num_steps % d == 0)


# ----------------------------------------------------------------------------- baseline


def tfidf_lr(train_text, train_y, eval_texts, c: float) -> list[np.ndarray]:
  """Character 1-2-gram TF-IDF + logistic regression fitted on the labelled titles only.

  Args:
    train_text: the labelled titles; ``train_y``: their ``[S]`` class ids.
    eval_texts: lists of titles to score.
    c: inverse L2 regularisation of the logistic regression.

  Returns:
    One ``[n, C]`` class-probability array per list of ``eval_texts``.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer  # the "text" extra
  from sklearn.linear_model import LogisticRegression

  vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
  x = vec.fit_transform(train_text)
  clf = LogisticRegression(C=c, max_iter=2000).fit(x, train_y)
  return [clf.predict_proba(vec.transform(t)) for t in eval_texts]


# ----------------------------------------------------------------------------- results


def summarize(variants: dict) -> dict:
  """Mean/std test accuracy per variant and the best variant chosen by validation accuracy.

  Args:
    variants: ``{name: {"test": [accuracy per draw], "val": [...]}}``.

  Returns:
    ``{"<variant>_accuracy_mean", "<variant>_accuracy_std", "<variant>_val_accuracy_mean"
    for every variant, "best_variant", "best_accuracy_mean", "best_accuracy_std",
    "best_selected_by"}`` (fractions; std over draws, ``ddof=0``).

  >>> v = {"a": {"test": [0.5, 0.7], "val": [0.9, 0.9]}, "b": {"test": [0.8], "val": [0.1]}}
  >>> s = summarize(v); s["best_variant"], round(s["best_accuracy_mean"], 3)
  ('a', 0.6)
  """
  out = {}
  for name, r in variants.items():
    out[f"{name}_accuracy_mean"] = float(np.mean(r["test"]))
    out[f"{name}_accuracy_std"] = float(np.std(r["test"]))
    out[f"{name}_val_accuracy_mean"] = float(np.nanmean(r["val"]))
  best = max(variants, key=lambda n: out[f"{n}_val_accuracy_mean"])
  out.update(best_variant=best, best_accuracy_mean=out[f"{best}_accuracy_mean"],
             best_accuracy_std=out[f"{best}_accuracy_std"],
             best_selected_by="highest mean validation accuracy (never test)")
  return out


def save_confusion_png(confusion, class_names, path, *, title: str = "") -> None:
  """Writes a row-normalised confusion matrix (rows = true class) as a PNG."""
  import matplotlib
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


# ----------------------------------------------------------------------------- protocol


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _sub_run(ctx: dict, name: str, loss_fn, opt, state, data, *, num_steps: int,
             most_per_call: int, examples_per_step: int, unit: str, prepare=None):
  """Trains (or restores) one model in ``ctx["dir"] / name``; ``(params, record)``."""
  cfg = ctx["cfg"]
  spc = steps_per_call_for(num_steps, most_per_call)
  every = cfg.checkpoint_every and max(cfg.checkpoint_every // spc, 1) * spc
  state, fit = train.run(
      loss_fn, opt, state, data, num_steps=num_steps, steps_per_call=spc, prepare=prepare,
      devices=cfg.devices, workdir=ctx["dir"] / name, examples_per_step=examples_per_step,
      checkpoint_every=every, log_every=cfg.log_every, progress=ctx["progress"],
      hooks=ctx["hooks"], unit=unit, desc=f"{ctx['dir'].name} {name}",
      restore_only=ctx["eval_only"])
  seconds = (fit["train_time_s"] or 0.0) + (fit["compile_time_s"] or 0.0)
  record = {"steps": fit["steps"], "steps_per_call": spc, "final_loss": fit["final_loss"],
            "time_s": seconds, "compile_time_s": fit["compile_time_s"],
            "examples_per_s": fit["examples_per_s"]}
  return state["params"], record


def _draw(cfg: Config, seed: int, titles, labels, ctx: dict):
  """One draw: ``(split, sizes, {variant: (pred_test, pred_val, seconds)}, training)``."""
  num_classes = int(labels.max()) + 1
  split = thucnews.draw_split(labels, seed, shots=cfg.shots, max_test=cfg.max_test,
                              val_per_class=cfg.val_per_class)
  if len(split.val) == 0:
    raise ValueError(f"val_per_class={cfg.val_per_class}: no title is left for validation "
                     f"after shots={cfg.shots} and max_test={cfg.max_test}")
  sizes = {"seed": seed, "train": len(split.train), "val": len(split.val),
           "test": len(split.test), "unlabelled": len(split.unlabelled)}
  _log(f"draw seed={seed}: {sizes}")
  nontest = np.concatenate([split.train, split.val, split.unlabelled])

  def text(idx):
    return [titles[i] for i in idx]

  y_tr = labels[split.train]
  k_seed, k_pairs, k_scratch, k_pre, k_ft, k_init = jax.random.split(jax.random.key(seed), 6)
  out, training = {}, {}

  # The non-neural baseline (refitted on every run: it keeps no state).
  t0 = time.perf_counter()
  prob_te, prob_val = tfidf_lr(text(split.train), y_tr, [text(split.test), text(split.val)],
                               cfg.tfidf_c)
  t_tfidf = time.perf_counter() - t0
  out["tfidf_lr"] = (prob_te.argmax(1), prob_val.argmax(1), t_tfidf)

  # The seed's model: TextCNN + contrastive pairs, sum / mean support vectors.
  cvocab = thucnews.build_vocab(text(nontest), chars_only=True)

  def ctok(idx):
    return thucnews.encode(text(idx), cvocab, max_len=cfg.seed_len, chars_only=True)

  net = encoders.TextCNN(vocab_size=cvocab.size)

  def cnn_embed(params, tokens):
    return net.apply({"params": params}, tokens)

  c_tr = ctok(split.train)
  pairs, similar = sampling.exhaustive_pairs(k_pairs, y_tr)
  if pairs.shape[0] < cfg.seed_batch:
    raise ValueError(f"seed_batch={cfg.seed_batch} exceeds the {pairs.shape[0]} seed pairs")
  k_seed_init, k_seed_run = jax.random.split(k_seed)
  opt = optax.adam(cfg.seed_lr)
  state = train.init_state(net.init(k_seed_init, jnp.asarray(c_tr[:2]))["params"], opt,
                           key=k_seed_run)
  params, training["seed_baseline"] = _sub_run(
      ctx, "seed_baseline", pair_loss_fn(cnn_embed, margin=cfg.seed_margin), opt, state,
      {"tokens": c_tr, "pairs": pairs, "similar": similar},
      num_steps=cfg.seed_epochs * (pairs.shape[0] // cfg.seed_batch),
      most_per_call=cfg.seed_steps_per_call, examples_per_step=cfg.seed_batch, unit="pairs",
      prepare=pair_prepare(cfg.seed_batch))
  emb = functools.partial(fewshot.embed_all, cnn_embed, params)
  e_tr, e_te, e_val = emb(c_tr), emb(ctok(split.test)), emb(ctok(split.val))
  for reduce in ("sum", "mean"):
    protos = fewshot.prototypes(e_tr, jnp.asarray(y_tr), num_classes, reduce=reduce)
    out[f"seed_baseline_{reduce}"] = (  # score 1 / (1 + d): the nearest prototype wins
        fewshot.nearest_prototype(e_te, protos, distance="euclidean")[0],
        fewshot.nearest_prototype(e_val, protos, distance="euclidean")[0],
        training["seed_baseline"]["time_s"])

  # n-gram bags: the vocabulary from non-test text.
  vocab = thucnews.build_vocab(text(nontest), min_count=cfg.min_count)

  def tok(idx):
    return thucnews.encode(text(idx), vocab, max_len=cfg.max_len)

  t_tr, t_te, t_val = tok(split.train), tok(split.test), tok(split.val)
  labelled = {"tokens": t_tr, "labels": y_tr}
  # On the host: each sub-run puts its own copy on the device (train.run donates it).
  init = jax.device_get(fewshot.init_bag(k_init, vocab.size, cfg.dim))
  tune = in_batch_loss_fn(temperature=cfg.temperature, keep_prob=cfg.keep_prob)
  n_lab = len(split.train)

  def evaluate(name, params, seconds, ensemble=False):
    emb = functools.partial(fewshot.embed_all, fewshot.bag_embed, params)
    protos = fewshot.prototypes(emb(t_tr), jnp.asarray(y_tr), num_classes)
    p_te, d_te = fewshot.nearest_prototype(emb(t_te), protos)
    p_val, d_val = fewshot.nearest_prototype(emb(t_val), protos)
    out[name] = (p_te, p_val, seconds)
    if ensemble:  # the prototype softmax (cosine / temperature) plus the TF-IDF LR's
      def mix(d, prob):
        return np.argmax(np.asarray(jax.nn.softmax(-d / cfg.temperature, axis=1)) + prob, 1)
      out[f"{name}+tfidf_lr"] = (mix(d_te, prob_te), mix(d_val, prob_val), seconds + t_tfidf)

  opt = optax.adam(cfg.scratch_lr)
  scratch, training["bag_scratch"] = _sub_run(
      ctx, "bag_scratch", tune, opt, train.init_state(init, opt, key=k_scratch), labelled,
      num_steps=cfg.scratch_steps, most_per_call=cfg.steps_per_call, examples_per_step=n_lab,
      unit="titles")
  evaluate("bag_scratch", scratch, training["bag_scratch"]["time_s"])

  opt = optax.adam(cfg.pretrain_lr)
  pre, training["splitview"] = _sub_run(
      ctx, "splitview",
      split_view_loss_fn(batch_size=cfg.pretrain_batch, temperature=cfg.temperature), opt,
      train.init_state(init, opt, key=k_pre), {"tokens": tok(nontest)},
      num_steps=cfg.pretrain_steps, most_per_call=cfg.steps_per_call,
      examples_per_step=cfg.pretrain_batch, unit="titles")
  t_pre = training["splitview"]["time_s"]
  evaluate("splitview", pre, t_pre)

  opt = optax.adam(cfg.finetune_lr)
  tuned, training["splitview_finetune"] = _sub_run(
      ctx, "splitview_finetune", tune, opt,
      train.init_state(jax.device_get(pre), opt, key=k_ft), labelled,
      num_steps=cfg.finetune_steps, most_per_call=cfg.steps_per_call,
      examples_per_step=n_lab, unit="titles")
  evaluate("splitview_finetune", tuned, t_pre + training["splitview_finetune"]["time_s"],
           ensemble=True)
  return split, sizes, out, training


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Runs every variant over ``cfg.num_draws`` draws; returns the results dict.

  Re-running with the same ``workdir`` resumes the sub-run that was interrupted; the
  finished ones are restored without training (:func:`siamjax.train.fit`).

  Args:
    cfg: the :class:`Config`.
    workdir: output folder: ``seed<k>/<model>/`` sub-runs and ``confusion_best.png``.
    progress: show the progress bars.
    hooks: passed to every sub-run's :func:`siamjax.train.fit`.
    eval_only: train nothing; evaluate the checkpoints already in ``workdir``.

  Returns:
    :func:`summarize`'s figures plus ``variants`` (``{name: {"test": [accuracy per
    draw], "val": [...], "time_s": [...]}}``; ``time_s``: the training time of the
    variant's models, compilation included, as recorded when they were trained, or the
    TF-IDF fit's), ``draws`` (split sizes), ``confusion_best`` (the best variant's
    ``[C, C]`` test counts summed over draws, rows = true class), ``class_names``,
    ``training`` (per sub-run: steps, steps per call, final loss, times) and ``plots``.
  """
  _check(cfg)
  workdir = Path(workdir)
  if cfg.synthetic_per_class:
    titles, labels = thucnews.synthetic_titles(per_class=cfg.synthetic_per_class)
    source = (f"generated titles (thucnews.synthetic_titles, {cfg.synthetic_per_class} per "
              f"class)")
  else:
    titles, labels = thucnews.load_thucnews14(cfg.data_dir)
    source = f"THUCNews titles ({len(titles)} distinct titles)"
  num_classes = int(labels.max()) + 1
  variants = {name: {"test": [], "val": [], "time_s": []} for name in VARIANTS}
  confusion = {name: np.zeros((num_classes, num_classes), np.int64) for name in VARIANTS}
  draws, training = [], {}
  for k in range(cfg.num_draws):
    seed = cfg.seed + k
    ctx = {"cfg": cfg, "dir": workdir / f"seed{seed}", "progress": progress, "hooks": hooks,
           "eval_only": eval_only}
    split, sizes, out, runs = _draw(cfg, seed, titles, labels, ctx)
    draws.append(sizes)
    training.update({f"seed{seed}/{name}": r for name, r in runs.items()})
    y_te, y_val = labels[split.test], labels[split.val]
    for name in VARIANTS:
      p_te, p_val, seconds = out[name]
      r = variants[name]
      r["test"].append(fewshot.accuracy(p_te, y_te))
      r["val"].append(fewshot.accuracy(p_val, y_val))
      r["time_s"].append(round(seconds, 2))
      confusion[name] += fewshot.confusion_matrix(np.asarray(p_te), y_te, num_classes)
      _log(f"  {name:28s} test {r['test'][-1]:.4f}  val {r['val'][-1]:.4f}  "
           f"({seconds:.1f} s)")
  figures = summarize(variants)
  best = figures["best_variant"]
  if cfg.synthetic_per_class:
    names = names_en = [f"class {c}" for c in range(num_classes)]
  else:
    names, names_en = list(thucnews.CLASS_NAMES), list(thucnews.CLASS_NAMES_EN)
  task = (f"{num_classes}-way title classification, {cfg.shots} labelled titles per class, "
          f"up to {cfg.max_test} test titles per class, up to {cfg.val_per_class} validation "
          f"titles per class from the non-test pool, {cfg.num_draws} draw(s) (one per "
          f"seed); vocabulary and unlabelled text from non-test titles only (not "
          f"transductive)")
  results = {"task": task, "data": source, **figures, "draws": draws, "variants": variants,
             "confusion_best": confusion[best], "class_names": names,
             "class_names_en": names_en, "training": training,
             "device": str(jax.devices()[0]), "plots": []}
  if jax.process_index() == 0:
    save_confusion_png(confusion[best], names_en, workdir / "confusion_best.png",
                       title=f"{best}: {figures['best_accuracy_mean']:.1%} over "
                             f"{len(draws)} draw(s)")
    results["plots"] = ["confusion_best.png"]
  return results


def summary(results: dict) -> str:
  """One line: the best variant (chosen on validation) and the baselines' test accuracy."""
  keys = ("best_variant", "best_accuracy_mean", "best_accuracy_std", "tfidf_lr_accuracy_mean",
          "seed_baseline_mean_accuracy_mean", "seed_baseline_sum_accuracy_mean")
  line = {"preset": results.get("preset"),
          **{k: round(results[k], 4) if isinstance(results[k], float) else results[k]
             for k in keys},
          "draws": len(results["draws"]),
          "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)}
  return json.dumps(line)
