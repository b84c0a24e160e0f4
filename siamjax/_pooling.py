"""Pooling shared by the encoders and the CPU kernels' fused block (private)."""

from __future__ import annotations

import jax


def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 of ``[B, H, W, C]`` with even ``H`` and ``W``.

  The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, as a reshape and a
  max, which XLA:CPU differentiates faster than ``reduce_window``.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
