"""End-to-end recipes: a config in, a trained model and a results record out.

Every recipe trains through :func:`siamjax.train.run` (the one loop: checkpoints,
resume, ``metrics.jsonl``, progress bar, transfer guard, ``--devices``) and draws its
batches with :mod:`siamjax.sampling`. A recipe is an object (a module, or a namespace
for a module that holds two) with:

* ``NAME``: the script's name (work directories default to ``runs/<NAME>_<preset>``);
* ``Config``: a dataclass of every knob, including ``seed``, ``devices`` and ``data_dir``;
* ``PRESETS``: ``{name: () -> Config}``, at least ``"default"`` and ``"smoke"``;
* ``RESUMABLE``: config fields that may change between runs of one work directory;
* ``train_and_evaluate(cfg, workdir, *, progress, hooks, eval_only) -> dict``: trains
  (or, with ``eval_only``, restores) and evaluates; writes plots into ``workdir``;
  returns the JSON-ready results (:mod:`siamjax.recipes.cli` writes ``results.json``);
* ``summary(results) -> str``: the line a script prints at the end.

Modules (one per task):

* :mod:`siamjax.recipes.omniglot_koch`: Koch et al. (2015) on Omniglot, Lake's protocol.
* :mod:`siamjax.recipes.mnist`: the Keras MNIST Siamese example (``mnist.contrastive``)
  and in-batch triplet mining on its tower (``mnist.triplet``).
* :mod:`siamjax.recipes.vector_pairs`: two Siamese heads over a CSV of vector pairs.
* :mod:`siamjax.recipes.image_folder`: a Siamese SmallCNN on class-named image folders.
* :mod:`siamjax.recipes.thucnews`: few-shot 14-way THUCNews titles (n-gram bags,
  split-view pre-training, the seed's TextCNN, TF-IDF).
* :mod:`siamjax.recipes.cli`: the command line every ``experiments/`` script shares.

Import the one you need (``from siamjax.recipes import mnist``); this package imports
none of them, so ``import siamjax`` stays light.
"""
