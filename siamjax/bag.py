"""A bag-of-n-grams text encoder as pure functions over a parameter dict.

* :func:`init_bag` and :func:`bag_embed`: each title's embedding is the mean of its
  n-grams' rows (padding, and tokens outside a view, ignored).
* :func:`embed_all`: many rows embedded in chunks by one jitted ``lax.map``.

Its self-supervised pre-training pairs two disjoint views of one title
(:func:`siamjax.sampling.split_views`); the THUCNews recipe
(:mod:`siamjax.recipes.thucnews`) trains it through :func:`siamjax.train.run`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["init_bag", "bag_embed", "embed_all"]

Params = Any


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
