"""siamjax: Siamese networks and metric learning as pure JAX functions.

Modules (one concept each):

* :mod:`siamjax.distances`: distances and similarity maps between embeddings.
* :mod:`siamjax.losses`: contrastive, pair BCE, triplet and in-batch mining losses.
* :mod:`siamjax.memory`: cross-batch memory (XBM), a ring buffer of past embeddings
  that in-batch losses use as their reference set.
* :mod:`siamjax.encoders`: Flax encoders (Koch 2015 convnet, MLP, SmallCNN, TextCNN).
* :mod:`siamjax.fourier`: 'valid' convolutions as DFT matrix products (Koch's fast CPU path).
* :mod:`siamjax.models`: Siamese networks built from an encoder and a pair head.
* :mod:`siamjax.parallel`: data-parallel meshes, shardings and cross-device losses.
* :mod:`siamjax.sampling`: on-device pair, group and one-shot trial sampling.
* :mod:`siamjax.augment`: Koch's random affine distortions and image resizing.
* :mod:`siamjax.train`: the fused, jitted train step and the resumable training loop.
* :mod:`siamjax.evaluation`: one-shot tasks and verification metrics.
* :mod:`siamjax.data`, :mod:`siamjax.recipes`, :mod:`siamjax.fewshot`,
  :mod:`siamjax.bag`: datasets, end-to-end recipes, few-shot classification by
  prototypes and a bag-of-n-grams text encoder; import them explicitly.
"""

from siamjax import (augment, distances, encoders, evaluation, fourier, losses, memory, models,
                     parallel, sampling, train)
from siamjax.distances import (
    cosine_distance,
    cosine_similarity,
    euclidean,
    exp_similarity,
    inverse_distance_similarity,
    l1,
    pairwise_distances,
    squared_euclidean,
)
from siamjax.encoders import MLP, Koch, SmallCNN, TextCNN
from siamjax.losses import (
    all_pairs_contrastive_loss,
    arcface_loss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    circle_loss,
    contrastive_loss,
    cosface_loss,
    in_batch_softmax_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    ntxent_loss,
    pair_bce_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    semi_hard_triplet_loss,
    triplet_margin_loss,
    valid_anchors,
)
from siamjax.models import SiameseNet, koch_siamese

__version__ = "0.1.0"

__all__ = [
    "augment", "distances", "encoders", "evaluation", "fourier", "losses", "memory", "models",
    "parallel", "sampling", "train",
    "l1", "euclidean", "squared_euclidean", "cosine_similarity", "cosine_distance",
    "inverse_distance_similarity", "exp_similarity", "pairwise_distances",
    "contrastive_loss", "pair_bce_loss", "triplet_margin_loss", "batch_all_triplet_loss",
    "batch_hard_triplet_loss", "semi_hard_triplet_loss", "all_pairs_contrastive_loss",
    "multi_similarity_loss", "circle_loss", "lifted_structure_loss",
    "ntxent_loss", "in_batch_softmax_loss", "valid_anchors",
    "proxy_nca_loss", "proxy_anchor_loss", "arcface_loss", "cosface_loss",
    "Koch", "MLP", "SmallCNN", "TextCNN",
    "SiameseNet", "koch_siamese",
]
