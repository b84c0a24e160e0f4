"""End-to-end recipes: a config in, a trained model and a results record out.

* :mod:`siamjax.recipes.classic`: the classic small Siamese recipes (MNIST contrastive and
  triplet, image folders, vector-pair CSVs) on an on-device epoch trainer; its public
  names are re-exported here (``recipes.mnist_contrastive(...)``).
* :mod:`siamjax.recipes.omniglot_koch`: Koch et al. (2015) on Omniglot, Lake's protocol.
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
