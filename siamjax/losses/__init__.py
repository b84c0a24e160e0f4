"""Losses for Siamese networks and metric learning.

Reduction rule (the same for every function here): **a loss returns one value per
example and never reduces.** The example is

* the pair for pair losses (:func:`contrastive_loss`, :func:`pair_bce_loss`): ``[P]``;
* the triplet for :func:`triplet_margin_loss`: ``[P]``;
* the anchor for in-batch losses, which take embeddings ``[B, D]`` with integer labels
  ``[B]`` and form every pair or triplet on the device: ``[B]``, each anchor's *mean* over
  its own pairs/triplets (or its element loss, for the losses defined per anchor). An
  anchor without the partners its loss needs (for example the only member of its class)
  gets 0; :func:`valid_anchors` returns the mask of anchors that carry a loss. The
  exceptions, documented on each: :func:`multi_similarity_loss` and
  :func:`lifted_structure_loss` keep each anchor's positive and negative terms apart, so
  an anchor with only positives or only negatives still pays; so do
  :func:`all_pairs_contrastive_loss` (a mean over every pair) and
  :func:`in_batch_softmax_loss` (an anchor with two positives and no negative).

Reduce with ``jnp.mean(loss)``; on unbalanced batches
``jnp.sum(loss) / jnp.maximum(jnp.sum(valid_anchors(labels, need=NEED)), 1)`` averages
over the anchors that carry a loss, with ``NEED`` the loss's:

* ``"both"`` (a positive and a negative): :func:`batch_all_triplet_loss`,
  :func:`batch_hard_triplet_loss`, :func:`semi_hard_triplet_loss`, :func:`ntxent_loss`,
  :func:`circle_loss`;
* ``"positive"``: :func:`in_batch_softmax_loss`;
* ``"any"`` (any partner): :func:`all_pairs_contrastive_loss`,
  :func:`multi_similarity_loss`, :func:`lifted_structure_loss`

(pass ``valid``/``ref_labels``/``ref_valid`` to :func:`valid_anchors` as to the loss).
With the usual P x K batches (P classes, K samples each) every anchor has the same
number of pairs, so the mean over anchors equals the mean over all pairs/triplets.

Masks and reference sets: every in-batch loss takes ``valid`` (``[B]`` bool; False rows,
such as padding, are neither anchors nor partners and get 0) and a reference set
``ref_embeddings [R, D]``, ``ref_labels [R]``, ``ref_valid [R]``: anchors then come from
``embeddings`` and partners from the reference set, with pytorch-metric-learning's
``ref_emb`` semantics (nothing is excluded, so a copy of an anchor in the reference set
is a positive at distance 0). ``ref_exclude [B]`` (integer, with a reference set only)
names for each row of ``embeddings`` one reference row that is not its partner, ``-1``
for none; it is indexed like ``embeddings`` (with ``anchor_indices``, anchor ``k`` drops
``ref_exclude[anchor_indices[k]]``). A cross-batch memory is such a reference set, and
:func:`siamjax.memory.cross_batch_loss` drops each anchor's own copy this way.

Precision: float16/bfloat16 embeddings are computed in float32 and the in-batch losses
return float32 (a mixed-precision step wants its loss in float32; a squared distance of
embeddings near 1e4 does not fit in float16). The Euclidean distances are centred on the
partners' mean first, so a large offset shared by the embeddings costs no accuracy.

Label convention: ``similar = 1`` (or ``True``) marks a same-class pair, ``0`` a
different-class pair (as in the Keras ``mnist_siamese.py`` example and most libraries).
Hadsell, Chopra & LeCun (2006) write their loss with the opposite label, ``Y = 0`` for
similar pairs, and so do some tutorials (keras.io's "Image similarity estimation using a
Siamese Network with a contrastive loss"); convert with ``similar = 1 - Y``.

Memory and speed: in-batch losses never materialise ``[B, B, D]`` differences or
``[B, B, B]`` triplets; batch-all and semi-hard mining do ``O(P B)`` direct work per
anchor for its ``P`` positives (``max_positives=P``, or chosen from
:data:`POSITIVE_SLOTS`), and for anchors with more positives sort their negative distances
once and answer every positive with a binary search, ``O(B^2 log B)`` time besides the
``O(B^2 D)`` matmul FLOPs of the distances. When the
``[A, R]`` block of anchor-partner products fits :data:`FULL_BLOCK_BYTES` (64 MiB: up to
``B = 4096`` in float32), it is formed by one matrix product and kept for the backward
pass (loss and gradient cost three ``[B, D] x [D, B]``-sized products); the per-anchor work
runs on ``chunk_size`` rows of it at a time and is recomputed in the backward pass, which
keeps the other temporaries ``O(chunk_size * B)``. At ``B = 4096``, ``D = 512`` this
compiles to 0.14--0.21 GiB of temporaries for loss and gradient. Larger blocks are
processed in chunks of ``chunk_size`` anchors that form their own rows of the block, again
in the backward pass (four products), so memory stays ``O(chunk_size * B)`` besides the
embeddings: ``B = 4096`` with ``D = 4096`` and ``FULL_BLOCK_BYTES = 0`` compiles to
0.20--0.25 GiB of temporaries, 0.19--0.25 GiB with the default (``tests/test_losses.py``
checks the compiled memory). Batch-hard mining is cheaper still: its two partners are
chosen on undifferentiated distances and their distances formed again from the gathered
rows, so loss and gradient cost one product on either path (0.09 GiB of temporaries at
``B = 4096``, ``D = 512``).
"""


from __future__ import annotations

import sys
import types

from siamjax.losses import _chunked, _mining
from siamjax.losses._chunked import FULL_BLOCK_BYTES, valid_anchors
from siamjax.losses._mining import (
    POSITIVE_SLOTS,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    semi_hard_triplet_loss,
)
from siamjax.losses._pairs import (
    all_pairs_contrastive_loss,
    contrastive_loss,
    pair_bce_loss,
    triplet_margin_loss,
)
from siamjax.losses._proxy import arcface_loss, cosface_loss, proxy_anchor_loss, proxy_nca_loss
from siamjax.losses._softmax import in_batch_softmax_loss, ntxent_loss
from siamjax.losses._weighting import circle_loss, lifted_structure_loss, multi_similarity_loss

__all__ = [
    "contrastive_loss",
    "pair_bce_loss",
    "triplet_margin_loss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "semi_hard_triplet_loss",
    "all_pairs_contrastive_loss",
    "multi_similarity_loss",
    "circle_loss",
    "lifted_structure_loss",
    "ntxent_loss",
    "in_batch_softmax_loss",
    "valid_anchors",
    "proxy_nca_loss", "proxy_anchor_loss", "arcface_loss", "cosface_loss",
    "FULL_BLOCK_BYTES", "POSITIVE_SLOTS",
]


def _forward(module: types.ModuleType, name: str) -> property:
  return property(lambda _: getattr(module, name),
                  lambda _, value: setattr(module, name, value))


class _Losses(types.ModuleType):
  """This package's module type: its two tuning constants live in the modules that read
  them, so that ``siamjax.losses.FULL_BLOCK_BYTES = 0`` (or ``POSITIVE_SLOTS = ()``) takes
  effect at the next trace, as it did when the losses were one module."""

  FULL_BLOCK_BYTES = _forward(_chunked, "FULL_BLOCK_BYTES")
  POSITIVE_SLOTS = _forward(_mining, "POSITIVE_SLOTS")


sys.modules[__name__].__class__ = _Losses
