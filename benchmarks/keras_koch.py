"""A Keras 3 reference of the Koch et al. (2015) Siamese network, as Keras users write it.

The well-known Keras reimplementation of the paper: a ``Sequential`` convolutional
tower ::

    Conv2D 64@10x10 relu -> MaxPool 2 -> Conv2D 128@7x7 relu -> MaxPool 2 ->
    Conv2D 128@4x4 relu -> MaxPool 2 -> Conv2D 256@4x4 relu -> Flatten ->
    Dense 4096 sigmoid

called on both inputs (the shared-weight twin), the two encodings joined by an
absolute-difference (L1) ``Lambda`` layer and ``Dense(1, sigmoid)``, trained with binary
cross-entropy on that probability. 38,951,745 parameters, like
:func:`siamjax.models.koch_siamese` and :mod:`torch_koch` (checked by
:func:`koch_siamese`). Initialisers are the paper's (weights ``N(0, 1e-2)`` in the
convolutions, ``N(0, 2e-1)`` in the dense layers, biases ``N(0.5, 1e-2)``), as in the
other two implementations; the L2 weight penalties of the popular Keras version are left
out, as they are from the others.

Two things differ from siamjax and torch, both Keras' own idiom, kept on purpose: the
tower is called once per input (two ``B`` batches, not one ``2B`` batch), and the loss is
Keras' ``binary_crossentropy`` on the sigmoid output rather than on logits.

The backend is picked before keras is imported (:func:`select_backend`):
``$KERAS_BACKEND`` when set, else ``jax`` (always present with siamjax), else ``torch``.

Used only by ``benchmarks/pairs_per_sec.py``; needs ``keras>=3`` (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("jax", "torch")
KOCH_PARAMS = 38_951_745


def select_backend() -> str:
  """Sets ``KERAS_BACKEND`` if unset and returns it; call before ``import keras``.

  Returns:
    ``$KERAS_BACKEND`` when set; else the first of :data:`BACKENDS` that is importable,
    which is then written to ``os.environ["KERAS_BACKEND"]``.

  Raises:
    ImportError: none of :data:`BACKENDS` is installed and ``KERAS_BACKEND`` is unset.
  """
  name = os.environ.get("KERAS_BACKEND")
  if not name:
    name = next((b for b in BACKENDS if importlib.util.find_spec(b) is not None), None)
    if name is None:
      raise ImportError(f"Keras needs a backend and none of {BACKENDS} is installed")
    os.environ["KERAS_BACKEND"] = name
  return name


select_backend()
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

# Keras' dtype policy of each benchmark dtype: parameters stay float32 in both.
DTYPE_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def koch_siamese(dtype: str = "float32", *, seed: int = 0) -> keras.Model:
  """The Keras Koch Siamese model: ``model([x1, x2]) -> [B, 1]`` probabilities.

  Args:
    dtype: ``"float32"`` or ``"bfloat16"`` (Keras' ``"mixed_bfloat16"`` policy: bf16
      compute, float32 parameters).
    seed: seed of the initialisers (each layer gets its own, derived from it).

  Returns:
    An uncompiled ``keras.Model`` on inputs ``[B, 105, 105, 1]`` x 2 (channels last);
    the tower is ``model.get_layer("tower")`` and the final dense layer
    ``model.get_layer("score")``.

  Raises:
    ValueError: unknown ``dtype``.
    RuntimeError: the parameter count is not 38,951,745.
  """
  if dtype not in DTYPE_POLICY:
    raise ValueError(f"dtype must be one of {sorted(DTYPE_POLICY)}, got {dtype!r}")
  policy = DTYPE_POLICY[dtype]
  seeds = iter(range(seed, seed + 100))

  def normal(mean, std):
    return keras.initializers.RandomNormal(mean, std, seed=next(seeds))

  def conv(filters, kernel):
    return layers.Conv2D(filters, kernel, activation="relu", dtype=policy,
                         kernel_initializer=normal(0.0, 1e-2), bias_initializer=normal(0.5, 1e-2))

  tower = keras.Sequential([
      keras.Input((105, 105, 1)),
      conv(64, 10), layers.MaxPooling2D(dtype=policy),
      conv(128, 7), layers.MaxPooling2D(dtype=policy),
      conv(128, 4), layers.MaxPooling2D(dtype=policy),
      conv(256, 4), layers.Flatten(dtype=policy),
      layers.Dense(4096, activation="sigmoid", dtype=policy,
                   kernel_initializer=normal(0.0, 2e-1), bias_initializer=normal(0.5, 1e-2)),
  ], name="tower")
  left, right = keras.Input((105, 105, 1)), keras.Input((105, 105, 1))
  l1 = layers.Lambda(lambda t: ops.abs(t[0] - t[1]), name="l1_distance",
                     dtype=policy)([tower(left), tower(right)])
  prob = layers.Dense(1, activation="sigmoid", dtype=policy, name="score",
                      kernel_initializer=normal(0.0, 2e-1),
                      bias_initializer=normal(0.5, 1e-2))(l1)
  model = keras.Model([left, right], prob, name="koch_siamese")
  n = model.count_params()
  if n != KOCH_PARAMS:
    raise RuntimeError(f"Keras Koch model has {n} parameters, expected {KOCH_PARAMS}")
  return model


def compile_sgd(model: keras.Model, *, learning_rate: float = 1e-3,
                momentum: float = 0.9) -> keras.Model:
  """Compiles ``model`` with SGD + momentum and binary cross-entropy (Keras' default
  ``jit_compile="auto"``: XLA on the jax backend). Returns ``model``."""
  model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                loss="binary_crossentropy")
  return model
