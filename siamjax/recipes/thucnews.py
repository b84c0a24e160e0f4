"""Few-shot 14-way THUCNews title classification: the seed's Siamese TextCNN, a TF-IDF
baseline, and n-gram bags with split-view pre-training, over several draws.

For each of ``num_draws`` draws (seeds ``seed, seed + 1, ...``), :func:`train_and_evaluate`
draws ``shots`` labelled, up to ``max_test`` test and ``val_per_class`` validation titles per
class (vocabularies and unlabelled text from non-test titles only) and trains each model
through :func:`siamjax.train.run` as a sub-run in ``workdir/seed<k>/<model>/`` (a killed run
resumes in the model it was training): ``seed_baseline``, the seed's TextCNN on contrastive
pairs; ``bag_scratch``, an n-gram bag trained on the labelled titles; ``splitview``, the bag
pre-trained on unlabelled titles; ``splitview_finetune``, that tuned like ``bag_scratch``. It
scores the :data:`VARIANTS` on validation and test titles: nearest class prototypes (cosine;
for the TextCNN the seed's Euclidean ``1 / (1 + d)``, sum and mean support), :func:`tfidf_lr`
(refitted on every run) and ``splitview_finetune+tfidf_lr`` (both probabilities summed). The
best variant, highest in mean validation accuracy (never test), has its test confusion in
``confusion_best.png``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siamjax import (bag, distances, encoders, fewshot, inference, losses, parallel,
                     plotting, sampling, train)
from siamjax import results as results_lib
from siamjax.data import thucnews
from siamjax.index import Metric
from siamjax.recipes import cli

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "VARIANTS", "pair_loss_fn",
           "pair_prepare", "split_view_loss_fn", "in_batch_loss_fn", "steps_per_call_for",
           "tfidf_lr", "summarize", "train_and_evaluate", "summary",
           "load_model", "VOCAB_FILE", "MODELS"]

NAME = "thucnews_fewshot"
# No faster with siamjax.xla.FAST_CPU_FLAGS (the n-gram bag's split-view step 0.90-1.28x, the
# seed TextCNN 0.94-1.66x over five rounds; benchmarks/results/xla-flags-*.json): XLA's own.
FAST_CPU = False
RESUMABLE = frozenset({"num_draws", "checkpoint_every"})  # may change when a run resumes

#: Each draw's folder keeps its vocabularies here (n-gram and character ids).
VOCAB_FILE = "vocab.json"
#: The embedding models each draw trains (sub-runs ``seed<k>/<model>/``).
MODELS = ("splitview_finetune", "splitview", "bag_scratch", "seed_baseline")

#: The models compared on every draw.
VARIANTS = ("tfidf_lr", "seed_baseline_sum", "seed_baseline_mean", "bag_scratch",
            "splitview", "splitview_finetune", "splitview_finetune+tfidf_lr")

@dataclasses.dataclass
class Config:
  """Every knob of the recipe; the defaults are the committed 5-draw run."""

  preset: str = "custom"
  seed: int = 0  # draw k (0 .. num_draws - 1) uses seed + k for its split and its keys
  num_draws: int = 5
  shots: int = 50  # the split: siamjax.data.thucnews.draw_split
  max_test: int = 3000
  val_per_class: int = 300
  min_count: int = 5  # the bags' n-grams: characters, bigrams seen min_count times
  max_len: int = 64
  dim: int = 128
  temperature: float = 0.1  # every in-batch loss, and the ensemble's prototype softmax
  pretrain_steps: int = 1000  # split-view pre-training (all optimisers: Adam)
  pretrain_batch: int = 512  # unlabelled titles drawn every step
  pretrain_lr: float = 2e-3
  finetune_steps: int = 100  # supervised in-batch fine-tuning, all labelled titles a step
  finetune_lr: float = 1e-3
  keep_prob: float = 0.5  # per-step token keep probability (fine-tuning and bag_scratch)
  scratch_steps: int = 300  # bag_scratch: the fine-tuning loss from a random bag
  scratch_lr: float = 1e-2
  seed_len: int = 32  # the seed's TextCNN pair model: seed_len characters per title
  seed_epochs: int = 2
  seed_batch: int = 32
  seed_margin: float = 2.0
  seed_lr: float = 1e-3
  tfidf_c: float = 10.0  # TF-IDF + logistic regression: inverse regularisation
  steps_per_call: int = 50  # most updates per call (a divisor of the steps) for the bags
  seed_steps_per_call: int = 9  # for the TextCNN (unrolled on the CPU: compiles grow)
  checkpoint_every: int = 500  # rounded down to a multiple of a sub-run's steps per call
  log_every: int = 1
  devices: int = 1  # sampled batches are split over the devices (siamjax.parallel)
  synthetic_per_class: int = 0  # > 0: this many generated titles per class (smoke)
  data_dir: str | None = None  # holds thucnews_titles/ (default: $SIAMJAX_DATA_DIR)


# default: python experiments/thucnews_fewshot.py --data-dir ../shared/data: splitview_finetune
#   78.2 +- 0.3% test over 5 draws, TF-IDF + LR 69.8 +- 0.6%, the seed's 24.3% (mean) / 6.6%
#   (sum) (experiments/results/thucnews_fewshot.json). smoke (--smoke):
#   generated titles, one draw, seconds.
PRESETS = {
    "default": lambda: Config(preset="default"),
    "smoke": lambda: Config(
        preset="smoke", num_draws=1, synthetic_per_class=60, shots=10, max_test=30,
        val_per_class=10, pretrain_steps=30, pretrain_batch=64, finetune_steps=10,
        scratch_steps=10, seed_epochs=1, steps_per_call=10, checkpoint_every=6),
}


def _check(cfg: Config) -> None:
  """Raises ValueError for the fields that nothing downstream checks clearly."""
  least = dict(seed=0, num_draws=1, pretrain_steps=1, finetune_steps=1, scratch_steps=1,
               seed_len=9, seed_epochs=1, seed_batch=1, steps_per_call=1,
               seed_steps_per_call=1, checkpoint_every=0, log_every=1)
  for name, low in least.items():  # seed_len: the TextCNN's two strided convolutions
    if type(getattr(cfg, name)) is not int or getattr(cfg, name) < low:
      raise ValueError(f"{name} must be an int >= {low}, got {getattr(cfg, name)!r}")
  for name in ("temperature", "pretrain_lr", "finetune_lr", "scratch_lr", "seed_lr",
               "tfidf_c", "seed_margin", "keep_prob"):
    v, top = getattr(cfg, name), 1 if name == "keep_prob" else float("inf")
    if not isinstance(v, (int, float)) or not 0 < v <= top:
      raise ValueError(f"{name} must be a number in (0, {top}], got {v!r}")


def pair_loss_fn(embed_fn, *, margin: float):
  """The seed model's loss: mean :func:`siamjax.losses.contrastive_loss` of pair distances.

  Args:
    embed_fn: ``(params, tokens [N, L]) -> [N, D]``.
    margin: the contrastive margin (the seed: 2; Hadsell, Chopra, LeCun, CVPR 2006).

  Returns:
    ``loss_fn(params, model_state, data, key, rows_B)`` over ``data["tokens"] [S, L]``,
    ``["pairs"] [P, 2]`` and ``["similar"] [P]``; ``rows_B`` from :func:`pair_prepare`.
  """

  def loss_fn(params, model_state, data, key, rows_B):
    del key
    pair_Bx2, similar_B = parallel.shard_batch((data["pairs"][rows_B], data["similar"][rows_B]))
    b = pair_Bx2.shape[0]  # both sides in one interleaved 2B batch: each device its pairs
    emb_Bx2xD = embed_fn(params, data["tokens"][pair_Bx2.reshape(-1)]).reshape(b, 2, -1)
    d_B = distances.euclidean(emb_Bx2xD[:, 0], emb_Bx2xD[:, 1])
    loss = jnp.mean(losses.contrastive_loss(d_B, similar_B, margin=margin))
    return loss, (model_state, {})

  return loss_fn


def pair_prepare(batch_size: int):
  """:func:`pair_loss_fn`'s ``prepare``: :func:`siamjax.sampling.epoch_batches` of pairs."""

  def prepare(data, key, step, num_steps):
    return sampling.epoch_batches(key, data["pairs"].shape[0], batch_size, step, num_steps)

  return prepare


def split_view_loss_fn(*, batch_size: int, temperature: float):
  """Split-view pre-training's ``loss_fn(params, model_state, data, key)``: ``batch_size``
  titles of ``data["tokens"] [N, L]`` a step, each split into two disjoint views that must
  find each other in the batch (:func:`siamjax.losses.ntxent_loss`; SimCLR, ICML 2020)."""
  ids_2B = jnp.repeat(jnp.arange(batch_size), 2)  # views 2i and 2i + 1 are title i's

  def loss_fn(params, model_state, data, key):
    k_rows, k_view = jax.random.split(key)
    rows_B = parallel.shard_batch(sampling.sample_rows(k_rows, data["tokens"].shape[0], batch_size))
    tok_BxL = data["tokens"][rows_B]
    keep_a, keep_b = sampling.split_views(k_view, tok_BxL)
    tok_2BxL = jnp.repeat(tok_BxL, 2, axis=0)
    keep_2BxL = jnp.stack([keep_a, keep_b], axis=1).reshape(tok_2BxL.shape)
    emb_2BxD = bag.bag_embed(params, tok_2BxL, keep_2BxL)
    loss = jnp.mean(losses.ntxent_loss(emb_2BxD, ids_2B, temperature=temperature))
    return loss, (model_state, {})

  return loss_fn


def in_batch_loss_fn(*, temperature: float, keep_prob: float):
  """Supervised fine-tuning's ``loss_fn(params, model_state, data, key)``: NT-Xent over all
  labelled titles ``data["tokens"] [S, L]`` and ``["labels"] [S]``, each title a random
  ``keep_prob`` subset of its n-grams (SupCon, Khosla et al., NeurIPS 2020)."""

  def loss_fn(params, model_state, data, key):
    keep_SxL = jax.random.bernoulli(key, keep_prob, data["tokens"].shape)
    emb_SxD = bag.bag_embed(params, data["tokens"], keep_SxL)
    loss = jnp.mean(losses.ntxent_loss(emb_SxD, data["labels"], temperature=temperature))
    return loss, (model_state, {})

  return loss_fn


def steps_per_call_for(num_steps: int, most: int) -> int:
  """The largest divisor of ``num_steps`` that is at most ``most`` (updates per call).

  >>> steps_per_call_for(2142, 9), steps_per_call_for(1000, 50), steps_per_call_for(39, 9)
  (9, 50, 3)
  """
  return max(d for d in range(1, min(most, num_steps) + 1) if num_steps % d == 0)


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
  clf = LogisticRegression(C=c, max_iter=2000).fit(vec.fit_transform(train_text), train_y)
  return [clf.predict_proba(vec.transform(t)) for t in eval_texts]


def summarize(variants: dict) -> dict:
  """Mean/std test accuracy per variant and the best variant chosen by validation accuracy.

  Args:
    variants: ``{name: {"test": [accuracy per draw], "val": [...]}}``.

  Returns:
    ``<variant>_accuracy_mean``, ``_accuracy_std`` (``ddof=0``), ``_val_accuracy_mean``
    and ``best_variant``, ``best_accuracy_mean``, ``_std``, ``best_selected_by``.

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


def _draw(cfg: Config, seed: int, titles, labels, where: Path, out: dict, **kw):
  """One draw, appended to ``out``'s ``variants``, ``confusion``, ``draws``, ``training``."""
  num_classes = int(labels.max()) + 1
  split = thucnews.draw_split(labels, seed, shots=cfg.shots, max_test=cfg.max_test,
                              val_per_class=cfg.val_per_class)
  if len(split.val) == 0:
    raise ValueError(f"val_per_class={cfg.val_per_class} leaves no title for validation")
  out["draws"].append({"seed": seed, "train": len(split.train), "val": len(split.val),
                       "test": len(split.test), "unlabelled": len(split.unlabelled)})
  if jax.process_index() == 0:
    print(f"draw seed={seed}: {out['draws'][-1]}", file=sys.stderr, flush=True)
  nontest = np.concatenate([split.train, split.val, split.unlabelled])
  text = {part: [titles[i] for i in idx] for part, idx in (
      ("train", split.train), ("test", split.test), ("val", split.val), ("nontest", nontest))}
  y_tr, y_te, y_val = labels[split.train], labels[split.test], labels[split.val]

  def score(name, p_te, p_val, seconds):
    r = out["variants"][name]
    r["test"].append(fewshot.accuracy(p_te, y_te))
    r["val"].append(fewshot.accuracy(p_val, y_val))
    r["time_s"].append(round(seconds, 2))
    out["confusion"][name] += fewshot.confusion_matrix(np.asarray(p_te), y_te, num_classes)
    if jax.process_index() == 0:
      print(f"  {name:28s} test {r['test'][-1]:.4f}  val {r['val'][-1]:.4f}  "
            f"({seconds:.1f} s)", file=sys.stderr, flush=True)

  k_seed, k_pairs, k_scratch, k_pre, k_ft, k_init = jax.random.split(jax.random.key(seed), 6)
  t0 = time.perf_counter()  # refitted on every run: it keeps no state
  prob_te, prob_val = tfidf_lr(text["train"], y_tr, [text["test"], text["val"]], cfg.tfidf_c)
  t_tfidf = time.perf_counter() - t0
  score("tfidf_lr", prob_te.argmax(1), prob_val.argmax(1), t_tfidf)
  cvocab = thucnews.build_vocab(text["nontest"], chars_only=True)
  chars = [thucnews.encode(text[p], cvocab, max_len=cfg.seed_len, chars_only=True)
           for p in ("train", "test", "val")]
  vocab = thucnews.build_vocab(text["nontest"], min_count=cfg.min_count)
  if jax.process_index() == 0:  # what a loaded model encodes new titles with
    results_lib.write_json(where / VOCAB_FILE, {"bags": vocab.ids, "chars": cvocab.ids},
                           indent=0)
  bags = [thucnews.encode(text[p], vocab, max_len=cfg.max_len)
          for p in ("train", "test", "val", "nontest")]
  net, params = encoders.TextCNN(vocab_size=cvocab.size), None

  def cnn_embed(params, tokens):
    return net.apply({"params": params}, tokens)

  pairs, similar = sampling.exhaustive_pairs(k_pairs, y_tr)
  if pairs.shape[0] < cfg.seed_batch:
    raise ValueError(f"seed_batch={cfg.seed_batch} exceeds the {pairs.shape[0]} seed pairs")
  k_seed_init, k_seed_run = jax.random.split(k_seed)
  # On the host: each sub-run puts its own copy on the device (train.run donates it).
  init = jax.device_get(bag.init_bag(k_init, vocab.size, cfg.dim))
  tune = in_batch_loss_fn(temperature=cfg.temperature, keep_prob=cfg.keep_prob)
  labelled = {"tokens": bags[0], "labels": y_tr}
  runs = (  # (name, loss, Adam's lr, initial params (None: the last run's), key, data, steps)
      ("seed_baseline", pair_loss_fn(cnn_embed, margin=cfg.seed_margin), cfg.seed_lr,
       net.init(k_seed_init, jnp.asarray(chars[0][:2]))["params"], k_seed_run,
       {"tokens": chars[0], "pairs": pairs, "similar": similar},
       cfg.seed_epochs * (pairs.shape[0] // cfg.seed_batch)),
      ("bag_scratch", tune, cfg.scratch_lr, init, k_scratch, labelled, cfg.scratch_steps),
      ("splitview", split_view_loss_fn(batch_size=cfg.pretrain_batch, temperature=cfg.temperature),
       cfg.pretrain_lr, init, k_pre, {"tokens": bags[3]}, cfg.pretrain_steps),
      ("splitview_finetune", tune, cfg.finetune_lr, None, k_ft, labelled, cfg.finetune_steps))
  for name, loss_fn, lr, start, key, data, num_steps in runs:
    cnn = name == "seed_baseline"  # the others are bags
    opt = optax.adam(lr)
    spc = steps_per_call_for(num_steps, cfg.seed_steps_per_call if cnn else cfg.steps_per_call)
    state = train.init_state(jax.device_get(params) if start is None else start, opt, key=key)
    state, fit = train.run(
        loss_fn, opt, state, data, num_steps=num_steps, steps_per_call=spc, devices=cfg.devices,
        prepare=pair_prepare(cfg.seed_batch) if cnn else None, workdir=where / name,
        examples_per_step={"seed_baseline": cfg.seed_batch,
                           "splitview": cfg.pretrain_batch}.get(name, len(split.train)),
        checkpoint_every=cfg.checkpoint_every and max(cfg.checkpoint_every // spc, 1) * spc,
        log_every=cfg.log_every, unit="pairs" if cnn else "titles", desc=f"{where.name} {name}",
        **kw)
    params = state["params"]
    seconds = (fit["train_time_s"] or 0.0) + (fit["compile_time_s"] or 0.0)
    out["training"][f"{where.name}/{name}"] = {
        "steps": fit["steps"], "steps_per_call": spc, "final_loss": fit["final_loss"],
        "time_s": seconds, "compile_time_s": fit["compile_time_s"],
        "examples_per_s": fit["examples_per_s"]}
    if name == "splitview_finetune":  # its time includes the pre-training's
      seconds = out["training"][f"{where.name}/splitview"]["time_s"] + seconds
    # Nearest prototype: cosine to the mean; the seed's 1 / (1 + d) (Euclidean), sum and mean.
    embed_fn, toks = (cnn_embed, chars) if cnn else (bag.bag_embed, bags)
    e_tr, e_te, e_val = (bag.embed_all(embed_fn, params, t) for t in toks[:3])
    for reduce in ("sum", "mean") if cnn else ("mean",):
      protos = fewshot.prototypes(e_tr, jnp.asarray(y_tr), num_classes, reduce=reduce)
      (p_te, d_te), (p_val, d_val) = (
          fewshot.nearest_prototype(e, protos, distance="euclidean" if cnn else "cosine")
          for e in (e_te, e_val))
      score(f"{name}_{reduce}" if cnn else name, p_te, p_val, seconds)
  # The loop ends with splitview_finetune: its prototype softmax plus the TF-IDF LR's.
  mix = [np.argmax(np.asarray(jax.nn.softmax(-d / cfg.temperature, axis=1)) + prob, 1)
         for d, prob in ((d_te, prob_te), (d_val, prob_val))]
  score("splitview_finetune+tfidf_lr", *mix, seconds + t_tfidf)


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Runs every variant over ``cfg.num_draws`` draws; returns the results dict.

  Args:
    cfg: the :class:`Config`.
    workdir: ``seed<k>/<model>/`` sub-runs (re-running resumes) and ``confusion_best.png``.
    progress: show the progress bars.
    hooks: passed to every sub-run's :func:`siamjax.train.fit`.
    eval_only: train nothing; evaluate the checkpoints already in ``workdir``.

  Returns:
    :func:`summarize`'s figures, ``variants`` (``{name: {"test": [accuracy per draw],
    "val", "time_s"}}``), ``draws``, ``confusion_best`` (``[C, C]`` test counts, rows =
    true class), ``class_names(_en)``, ``training`` (per sub-run) and ``plots``.
  """
  _check(cfg)
  workdir = Path(workdir)
  if cfg.synthetic_per_class:
    titles, labels = thucnews.synthetic_titles(per_class=cfg.synthetic_per_class)
    source = f"generated titles (thucnews.synthetic_titles, {cfg.synthetic_per_class} per class)"
    names = names_en = [f"class {c}" for c in range(int(labels.max()) + 1)]
  else:
    titles, labels = thucnews.load_thucnews14(cfg.data_dir)
    source = f"THUCNews titles ({len(titles)} distinct titles)"
    names, names_en = list(thucnews.CLASS_NAMES), list(thucnews.CLASS_NAMES_EN)
  num_classes = int(labels.max()) + 1
  out = {"variants": {name: {"test": [], "val": [], "time_s": []} for name in VARIANTS},
         "confusion": {name: np.zeros((num_classes,) * 2, np.int64) for name in VARIANTS},
         "draws": [], "training": {}}
  for seed in range(cfg.seed, cfg.seed + cfg.num_draws):
    _draw(cfg, seed, titles, labels, workdir / f"seed{seed}", out, progress=progress,
          hooks=hooks, restore_only=eval_only)
  figures = summarize(out["variants"])
  best = figures["best_variant"]
  task = f"{num_classes}-way {cfg.shots}-shot title classification, {cfg.num_draws} draw(s)"
  results = {"task": task, "data": source, **figures, "draws": out["draws"],
             "variants": out["variants"], "confusion_best": out["confusion"][best],
             "class_names": names, "class_names_en": names_en, "training": out["training"],
             "device": str(jax.devices()[0]), "plots": []}
  if jax.process_index() == 0:
    plotting.save_confusion_png(out["confusion"][best], names_en, workdir / "confusion_best.png",
                       title=f"{best}: {figures['best_accuracy_mean']:.1%} over "
                             f"{len(out['draws'])} draw(s)")
    results["plots"] = ["confusion_best.png"]
  return results


def summary(results: dict) -> str:
  """One line: the best variant (chosen on validation) and the baselines' test accuracy."""
  keys = ("best_variant", "best_accuracy_mean", "best_accuracy_std", "tfidf_lr_accuracy_mean",
          "seed_baseline_mean_accuracy_mean", "seed_baseline_sum_accuracy_mean")
  line = {k: round(results[k], 4) if isinstance(results[k], float) else results[k] for k in keys}
  return json.dumps({"preset": results.get("preset"), **line, "draws": len(results["draws"]),
                     "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})


@inference.register_loader(NAME)
def load_model(config: dict, workdir, *, which: str = "best",
               variant: str | None = None) -> inference.Model:
  """One embedding model of a ``thucnews_fewshot`` work directory.

  ``variant`` is one of :data:`MODELS`, optionally as ``seed<k>/<model>`` for draw
  ``k`` (default: ``splitview_finetune`` of the first draw). Inputs are titles
  (strings), encoded with the draw's saved vocabulary as in training: character and
  bigram ids for the bags (compared by cosine similarity, as the prototypes are), the
  characters only for the seed's TextCNN (Euclidean distance).
  """
  cfg = cli.config_from_dict(Config, config)
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  draw, _, name = (variant or "splitview_finetune").rpartition("/")
  draw = draw or f"seed{cfg.seed}"
  draws = [f"seed{s}" for s in range(cfg.seed, cfg.seed + cfg.num_draws)]
  if name not in MODELS or draw not in draws:
    raise ValueError(f"variant must be a model of {list(MODELS)}, optionally as "
                     f"'<draw>/<model>' with a draw of {draws}; got {variant!r}")
  workdir = Path(workdir)
  folder = workdir / draw
  params, _, step, kind = train.restore_variables(folder / name, which="latest")
  if not (folder / VOCAB_FILE).is_file():
    raise train.RunError(f"{folder} has no {VOCAB_FILE} (a run of an older siamjax): re-run "
                         f"its command with --eval-only to write it")
  vocabs = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
  cnn = name == "seed_baseline"
  vocab = thucnews.Vocab(vocabs["chars" if cnn else "bags"])
  length = cfg.seed_len if cnn else cfg.max_len
  net = encoders.TextCNN(vocab_size=vocab.size)

  def apply(variables, tokens):
    return (net.apply(variables, tokens) if cnn
            else bag.bag_embed(variables["params"], tokens))

  def prepare(raw):
    texts = [raw] if isinstance(raw, str) else list(raw)
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t.strip():
        raise ValueError(f"text {i}: {t!r} is not a non-empty string")
    tokens = thucnews.encode(texts, vocab, max_len=length, chars_only=cnn)
    empty = np.flatnonzero(~tokens.any(axis=1))
    if empty.size:
      raise ValueError(f"text {int(empty[0])}: none of {texts[empty[0]]!r}'s characters is in "
                       f"the model's vocabulary, so it has no embedding")
    return tokens

  describe = {"input": "a title (a string)", "array": f"[N, {length}] int32 token ids, 0 = pad",
              "network_input": ("its first characters' ids" if cnn else
                                "its characters' then its bigrams' ids") +
                               f" in the vocabulary (out-of-vocabulary dropped), the first "
                               f"{length} kept", "vocabulary": vocab.ids}
  return inference.Model(
      recipe=NAME, variant=f"{draw}/{name}", workdir=workdir, step=step, checkpoint=kind,
      variables={"params": params}, apply=apply,
      metric=Metric("euclidean" if cnn else "cosine"),
      inputs=inference.Inputs("text", (length,), "int32", describe), prepare=prepare,
      batch_size=2048)
