"""Siamese networks: an encoder applied to both inputs and a head that scores the pair.

A :class:`SiameseNet` with ``shared=True`` (the default) holds one encoder parameter tree,
``params["params"]["encoder"]``, and runs both inputs through it as one ``2B`` batch, so each image is encoded once per
step and the scores are symmetric: ``apply(params, x1, x2) == apply(params, x2, x1)``.
With ``shared=False`` it is a pseudo-Siamese network: two towers, ``tower1`` and
``tower2``, with separate parameters, through the same API.

The pair head is the weighted L1 head of Koch et al. (2015): the logit
``sum_j alpha_j |h1_j - h2_j| + b`` whose sigmoid is the probability that the two inputs
show the same class. It runs in float32 whatever the encoder's ``dtype``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from siamjax import _checks
from siamjax.encoders import Koch, normal_init

__all__ = ["SiameseNet", "koch_siamese"]


class SiameseNet(nn.Module):
  """An encoder applied to both inputs and a weighted-L1 logit head.

  Attributes:
    encoder: any module mapping ``[B, ...] -> [B, D]`` (e.g. :class:`siamjax.encoders.Koch`).
    shared: one parameter tree for both inputs (Siamese) or two (pseudo-Siamese).
    head_kernel_init: initialiser of the head's ``alpha``.
    head_bias_init: initialiser of the head's ``b``.

  ``__call__(x1, x2, **kwargs)`` returns ``[B]`` float32 logits; ``kwargs`` (e.g.
  ``train=True``) go to the encoder. ``embed(x, tower=1)`` returns the encoder's
  ``[B, D]`` embeddings, so evaluation can encode each image once and score with
  ``head``.

  References:
    J. Bromley et al., "Signature Verification using a Siamese Time Delay Neural
    Network", NIPS 1993; Koch, Zemel & Salakhutdinov (2015) for the weighted L1 head.

  >>> import jax, jax.numpy as jnp
  >>> from siamjax.encoders import MLP
  >>> net = SiameseNet(encoder=MLP()); x1, x2 = jnp.ones((3, 8)), jnp.zeros((3, 8))
  >>> params = net.init(jax.random.key(0), x1, x2)
  >>> net.apply(params, x1, x2).shape
  (3,)
  >>> bool(jnp.allclose(net.apply(params, x1, x2), net.apply(params, x2, x1)))
  True
  """

  encoder: nn.Module
  shared: bool = True
  head_kernel_init: Any = nn.initializers.lecun_normal()
  head_bias_init: Any = nn.initializers.zeros_init()

  def setup(self):
    if self.shared:
      self.tower1 = self.encoder
    else:
      self.tower1 = self.encoder.clone(parent=None)
      self.tower2 = self.encoder.clone(parent=None)
    self.head_dense = nn.Dense(1, kernel_init=self.head_kernel_init,
                               bias_init=self.head_bias_init, dtype=jnp.float32,
                               param_dtype=jnp.float32, name="head")

  def embed(self, x: jax.Array, *, tower: int = 1, **kwargs) -> jax.Array:
    """Encodes ``x`` with ``tower`` (1 or 2; the same tower when ``shared``)."""
    if tower not in (1, 2):
      raise ValueError(f"tower must be 1 or 2, got {tower!r}")
    if tower == 2 and not self.shared:
      return self.tower2(x, **kwargs)
    return self.tower1(x, **kwargs)

  def head(self, h1: jax.Array, h2: jax.Array) -> jax.Array:
    """Logits ``[...]`` of the weighted L1 head for embeddings ``h1, h2`` of shape ``[..., D]``."""
    diff = jnp.abs(h1.astype(jnp.float32) - h2.astype(jnp.float32))
    return self.head_dense(diff)[..., 0]

  def __call__(self, x1: jax.Array, x2: jax.Array, **kwargs) -> jax.Array:
    x1 = _checks.as_array("x1", x1)
    x2 = _checks.as_array("x2", x2)
    _checks.same_shape("x1", x1, "x2", x2)
    _checks.min_rank("x1", x1, 1, "[B, ...] inputs")
    _checks.nonempty("x1", x1)
    b = x1.shape[0]
    if self.shared:
      h = self.tower1(jnp.concatenate([x1, x2], axis=0), **kwargs)  # one 2B batch
      h1, h2 = h[:b], h[b:]
    else:
      h1, h2 = self.tower1(x1, **kwargs), self.tower2(x2, **kwargs)
    return self.head(h1, h2)


def koch_siamese(*, dtype: Any = jnp.float32, shared: bool = True,
                 conv: str = "auto") -> SiameseNet:
  """The Siamese network of Koch, Zemel & Salakhutdinov (2015): 38,951,745 parameters.

  Two :class:`siamjax.encoders.Koch` towers sharing weights, joined by the weighted L1
  head (weights ``N(0, 2e-1)``, bias ``N(0.5, 1e-2)`` as the paper's dense layers).
  Train it with :func:`siamjax.losses.pair_bce_loss` on the returned logits.

  Args:
    dtype: computation dtype of the towers; ``jnp.bfloat16`` computes in bf16 while
      parameters, the head and the logits stay float32.
    shared: ``False`` gives the pseudo-Siamese variant (two towers, twice the tower
      parameters).
    conv: ``"auto"``, ``"direct"`` or ``"dft"``: how the towers compute conv2 .. conv4
      (see :class:`siamjax.encoders.Koch`; same parameters and results either way).

  Returns:
    A :class:`SiameseNet`; ``init(key, x1, x2)`` and ``apply(params, x1, x2) -> [B]``
    logits for ``[B, 105, 105, 1]`` images in [0, 1].

  References:
    G. Koch, R. Zemel, R. Salakhutdinov, ICML Deep Learning Workshop 2015.

  >>> import jax, jax.numpy as jnp
  >>> net = koch_siamese(); x = jnp.zeros((1, 105, 105, 1))
  >>> shapes = jax.eval_shape(net.init, jax.random.key(0), x, x)
  >>> sum(p.size for p in jax.tree.leaves(shapes))  # parameters, without computing them
  38951745
  """
  return SiameseNet(
      encoder=Koch(dtype=dtype, conv=conv),
      shared=shared,
      head_kernel_init=normal_init(0.0, 2e-1),
      head_bias_init=normal_init(0.5, 1e-2),
  )
