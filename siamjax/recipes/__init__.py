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

Modules:

* :mod:`siamjax.recipes.omniglot_koch`: Koch et al. (2015) on Omniglot, Lake's protocol.
* :mod:`siamjax.recipes.cli`: the command line every ``experiments/`` script shares.
* :mod:`siamjax.recipes.classic`: the classic small recipes (being moved to one module
  per task on :mod:`siamjax.train`).
"""

from siamjax.recipes.classic import (
    MINING,
    TrainState,
    class_index_table,
    contact_sheet,
    fit,
    image_folder,
    keras_pairs,
    machine_info,
    make_train_epoch,
    mnist_contrastive,
    mnist_triplet,
    pk_batch,
    random_pairs,
    sample_pairs,
    split_indices,
    split_per_class,
    vector_pairs,
)

__all__ = [
    "MINING", "TrainState", "class_index_table", "contact_sheet", "fit", "image_folder",
    "keras_pairs", "machine_info", "make_train_epoch", "mnist_contrastive", "mnist_triplet",
    "pk_batch", "random_pairs", "sample_pairs", "split_indices", "split_per_class",
    "vector_pairs",
]
