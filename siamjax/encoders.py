"""Encoders: Flax (linen) modules mapping one input to one embedding.

Use them as pure functions over plain parameter pytrees::

    enc = Koch()
    params = enc.init(jax.random.key(0), jnp.zeros((1, 105, 105, 1)))
    emb_BxD = enc.apply(params, images_BxHxWx1)

Every encoder takes ``dtype`` (the computation dtype, e.g. ``jnp.bfloat16``) and keeps
its parameters in ``param_dtype`` (float32 by default). Encoders with dropout take
``train=True`` and then need a ``"dropout"`` RNG: ``apply(params, x, train=True,
rngs={"dropout": key})``. Image encoders take NHWC arrays ``[B, H, W, C]`` or
``[B, H, W]`` (one channel), floating values (scale ``uint8`` images to [0, 1] first).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from siamjax import _checks
from siamjax._pooling import max_pool2
from siamjax import cpu_kernels
from siamjax import fourier

__all__ = ["Koch", "MLP", "SmallCNN", "TextCNN", "ConvNet4", "normal_init"]

Dtype = Any


def normal_init(mean: float = 0.0, stddev: float = 1.0) -> Callable:
  """Initializer drawing from ``N(mean, stddev^2)`` (Koch et al. 2015 use mean 0.5 for biases).

  Args:
    mean: mean of the normal distribution.
    stddev: its standard deviation.

  Returns:
    a Flax initializer ``init(key, shape, dtype) -> array``.

  References:
    Koch, Zemel & Salakhutdinov (2015), section 4.2 (weight initialisation).

  >>> import jax
  >>> w = normal_init(0.5, 1e-2)(jax.random.key(0), (1000,))
  >>> bool(abs(float(w.mean()) - 0.5) < 0.01)
  True
  """

  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)

  return init


def _images(x, name: str = "x") -> jax.Array:
  x = _checks.floating(name, x)
  if x.ndim == 3:
    x = x[..., None]
  _checks.rank(name, x, 4, "[B, H, W, C] or [B, H, W] images")
  _checks.nonempty(name, x)
  return x


@jax.custom_vjp
def _add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
  """``y + b`` over the last axis, whose bias gradient is one product with a ones vector.

  XLA:CPU splits the plain bias gradient (a sum over every position of a
  ``[B, H, W, O]`` gradient) into a slow windowed reduction. The product is in full
  float32 precision (no TF32 or bf16 passes).
  """
  return y + b.astype(y.dtype).reshape((1,) * (y.ndim - 1) + b.shape)


def _add_bias_fwd(y, b):
  return _add_bias(y, b), b


def _add_bias_bwd(b, dy):
  rows = dy.reshape(-1, dy.shape[-1])
  db = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows, precision=lax.Precision.HIGHEST)
  return dy, db.astype(b.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class _ConvParams(nn.Module):
  """nn.Conv's parameters: ``kernel`` ``[kh, kw, C, O]``, then ``bias`` ``[O]``, made in
  that order with the same initialisers, so the parameter tree and its values are those
  of ``nn.Conv(features, kernel_size, ...)``; subclasses say what to compute with them."""

  features: int
  kernel_size: tuple[int, int]
  kernel_init: Callable
  bias_init: Callable
  param_dtype: Dtype = jnp.float32

  def kernel_and_bias(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    return kernel, self.param("bias", self.bias_init, (self.features,), self.param_dtype)


class _ConvBias(_ConvParams):
  """``nn.Conv(..., padding="VALID", dtype=float32, conv_general_dilated=...)`` with
  :func:`_add_bias`'s bias gradient."""

  conv_general_dilated: Callable = lax.conv_general_dilated

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.kernel_and_bias(x)
    y = self.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1),
                                  "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _add_bias(y, bias.astype(jnp.float32))


class _ConvReluPool(_ConvParams):
  """``max_pool2(relu(nn.Conv(..., padding="VALID")(x)))`` with the oneDNN bf16 block,
  :func:`siamjax.cpu_kernels.bf16_conv_relu_pool` (fused on oneDNN, forward and
  gradient)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return cpu_kernels.bf16_conv_relu_pool(x, *self.kernel_and_bias(x))


class Koch(nn.Module):
  """The convolutional tower of Koch, Zemel & Salakhutdinov (2015).

  ``105x105x1 -> conv 64@10x10, ReLU, max-pool 2 -> conv 128@7x7, ReLU, pool ->
  conv 128@4x4, ReLU, pool -> conv 256@4x4, ReLU -> flatten 9216 -> dense 4096, sigmoid``;
  38,947,648 parameters. Initialisation as in the paper: convolution weights
  ``N(0, 1e-2)``, dense weights ``N(0, 2e-1)``, all biases ``N(0.5, 1e-2)`` (standard
  deviations). Layers are named ``conv1 .. conv4`` and ``dense`` so per-layer
  optimiser settings can address them.

  Attributes:
    dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
    param_dtype: parameter dtype.
    conv: how conv2 .. conv4 are computed: ``"direct"`` (``lax.conv_general_dilated``),
      ``"dft"`` (:func:`siamjax.fourier.dft_conv2d`: the same function with about 4x
      fewer FLOPs for these layers, equal to float32 rounding) or ``"auto"`` (default:
      ``"dft"`` on the CPU backend in float32, where it trains about twice as fast; in
      bf16 where :func:`siamjax.cpu_kernels.matmul_route` is ``"onednn-bf16"``,
      ``"direct"`` on CPUs with AMX, whose bf16 tiles run oneDNN's direct convolutions
      faster than the DFT route's fewer but smaller products, and ``"dft"`` on the
      others; ``"direct"`` elsewhere, e.g. cuDNN on GPUs). conv1 (one input channel) is
      always direct. The parameters are the same either way. In bf16 on the
      ``"onednn-bf16"`` route the matrix work runs on oneDNN's bf16 kernels with float32
      accumulation (:mod:`siamjax.cpu_kernels`): conv1, its ReLU and pooling as one
      oneDNN block, :func:`siamjax.cpu_kernels.bf16_conv_relu_pool`, forward and weight
      gradient, which never stores conv1's full-size output; conv2 .. conv4 as oneDNN
      bf16 convolutions (``"direct"``: conv2 and conv3 with their ReLU and pooling as
      the same block, conv4 as :func:`siamjax.cpu_kernels.bf16_conv2d`) or as DFT
      convolutions whose transforms and frequency-wise products are bf16 x bf16 ->
      float32 products (``"dft"``: ``fourier.dft_conv2d(..., products="bf16",
      transforms="bf16")``), and the dense
      layer; the activations between them (ReLU, pooling) stay float32, as PyTorch's
      bf16 autocast does (bf16 elementwise work is slower than float32 on XLA:CPU); the
      output is bf16.
      :meth:`route` says which path a call takes.

  Max-pooling is a reshape and a max over each 2x2 block (every pooled size is even);
  its gradient splits evenly between exactly tied maxima, where ``nn.max_pool``'s picks
  one, and after a ReLU such ties are zeros whose gradient is zero either way.

  Input ``[B, 105, 105, 1]`` (or ``[B, 105, 105]``) floating images; output ``[B, 4096]``
  in ``dtype``.

  References:
    G. Koch, R. Zemel, R. Salakhutdinov, "Siamese Neural Networks for One-shot Image
    Recognition", ICML Deep Learning Workshop 2015, figure 4 and section 4.

  >>> import jax, jax.numpy as jnp
  >>> shapes = jax.eval_shape(Koch().init, jax.random.key(0), jnp.zeros((1, 105, 105, 1)))
  >>> sum(p.size for p in jax.tree.leaves(shapes))  # parameters, without computing them
  38947648
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: str = "auto"

  def conv_impl(self) -> str:
    """The implementation ``conv`` resolves to here: ``"direct"`` or ``"dft"``."""
    if self.conv not in ("auto", "direct", "dft"):
      raise ValueError(f"conv must be 'auto', 'direct' or 'dft', got {self.conv!r}")
    if self.conv != "auto":
      return self.conv
    if jax.default_backend() != "cpu":
      return "direct"
    if jnp.dtype(self.dtype) == jnp.float32:
      return "dft"
    if self._onednn():
      return "direct" if cpu_kernels.onednn_amx() else "dft"
    return "direct"

  def _onednn(self) -> bool:
    return (jnp.dtype(self.dtype) == jnp.bfloat16
            and cpu_kernels.matmul_route() == "onednn-bf16")

  def route(self) -> str:
    """The path the matrix work takes: ``conv_impl()``, plus ``"+onednn-bf16"`` on that route.

    >>> Koch(conv="direct").route()
    'direct'
    """
    impl = self.conv_impl()
    return f"{impl}+onednn-bf16" if self._onednn() else impl

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _images(x)
    if x.shape[1:] != (105, 105, 1):
      raise ValueError(f"x must be [B, 105, 105, 1] Omniglot-size images, got {x.shape}")
    bias = normal_init(0.5, 1e-2)
    onednn = self._onednn()
    work = jnp.float32 if onednn else self.dtype  # onednn: bf16 products only
    if jnp.dtype(work) == jnp.float32 and jax.default_backend() == "cpu":  # see _add_bias
      conv = functools.partial(_ConvBias, kernel_init=normal_init(0.0, 1e-2), bias_init=bias,
                               param_dtype=self.param_dtype)
    else:
      conv = functools.partial(
          nn.Conv, padding="VALID", kernel_init=normal_init(0.0, 1e-2), bias_init=bias,
          dtype=work, param_dtype=self.param_dtype)
    if self.conv_impl() == "dft":  # conv2 .. conv4 (on oneDNN: bf16 transforms and products)
      big = {"conv_general_dilated": functools.partial(
          fourier.conv_general_dilated, products="bf16", transforms="bf16")
             if onednn else fourier.conv_general_dilated}
    else:
      big = {"conv_general_dilated": cpu_kernels.conv_general_dilated} if onednn else {}
    x = x.astype(work)
    if onednn:  # conv1, ReLU and pooling as one oneDNN block
      x = _ConvReluPool(64, (10, 10), normal_init(0.0, 1e-2), bias,
                        param_dtype=self.param_dtype, name="conv1")(x)  # 96 -> 48
    else:
      x = max_pool2(nn.relu(conv(64, (10, 10), name="conv1")(x)))  # 96 -> 48
    if onednn and self.conv_impl() == "direct":  # conv, ReLU and pooling fused both ways
      block = functools.partial(_ConvReluPool, kernel_init=normal_init(0.0, 1e-2),
                                bias_init=bias, param_dtype=self.param_dtype)
    else:
      block = lambda *a, **kw: lambda x: max_pool2(nn.relu(conv(*a, **big, **kw)(x)))  # noqa: E731
    x = block(128, (7, 7), name="conv2")(x)  # 42 -> 21
    x = block(128, (4, 4), name="conv3")(x)  # 18 -> 9
    x = nn.relu(conv(256, (4, 4), name="conv4", **big)(x))  # 6x6x256 = 9216
    x = x.reshape(x.shape[0], -1)
    fast = {"dot_general": cpu_kernels.dense_dot_general} if onednn else {}
    x = nn.Dense(4096, kernel_init=normal_init(0.0, 2e-1), bias_init=bias, dtype=work,
                 param_dtype=self.param_dtype, name="dense", **fast)(x)
    return nn.sigmoid(x).astype(self.dtype)


class MLP(nn.Module):
  """The tower of the Keras MNIST Siamese example: dense 128-128-128, ReLU, dropout 0.1.

  Flattens ``[B, ...]`` inputs to ``[B, F]``. Dropout follows the first two layers.

  Attributes:
    features: widths of the dense layers.
    dropout_rate: dropout after every layer but the last.
    dtype, param_dtype: computation and parameter dtypes.

  References:
    Keras examples, "Train a Siamese MLP on pairs of digits from the MNIST dataset"
    (``mnist_siamese.py``).

  >>> import jax, jax.numpy as jnp
  >>> mlp = MLP(); params = mlp.init(jax.random.key(0), jnp.zeros((2, 28, 28)))
  >>> mlp.apply(params, jnp.ones((2, 28, 28))).shape
  (2, 128)
  """

  features: Sequence[int] = (128, 128, 128)
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = _checks.floating("x", x)
    _checks.min_rank("x", x, 2, "[B, ...] inputs")
    _checks.nonempty("x", x)
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"dense{i + 1}")(x))
      if i < len(self.features) - 1:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class SmallCNN(nn.Module):
  """The "deeper network" of the image-folder Siamese example.

  ``conv 32@3x3, conv 32@3x3, max-pool 2, conv 64@3x3, conv 64@3x3, max-pool 2,
  flatten, dense 512, dropout 0.4``, ReLU after every convolution and the dense layer
  ('valid' padding as in Keras' default).

  Attributes:
    features: output width of the dense layer.
    dropout_rate: dropout after the dense layer.
    dtype, param_dtype: computation and parameter dtypes.

  References:
    The Keras "deeper network" Siamese example on folders of class images (Keras
    ``cifar10_cnn``-style blocks); also Chollet, *Deep Learning with Python*, ch. 5.

  >>> import jax, jax.numpy as jnp
  >>> cnn = SmallCNN(); params = cnn.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> cnn.apply(params, jnp.ones((2, 32, 32, 3))).shape
  (2, 512)
  """

  features: int = 512
  dropout_rate: float = 0.4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = _images(x).astype(self.dtype)
    if min(x.shape[1:3]) < 16:  # 3x3, 3x3, pool 2, 3x3, 3x3, pool 2: 16 -> 1
      raise ValueError(f"x: SmallCNN needs images of at least 16x16 pixels, got "
                       f"{x.shape[1]}x{x.shape[2]}; resize them (image_folder: --size 16 or more)")
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="VALID", dtype=self.dtype,
                             param_dtype=self.param_dtype)
    pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(conv(32, name="conv1")(x))
    x = pool(nn.relu(conv(32, name="conv2")(x)))
    x = nn.relu(conv(64, name="conv3")(x))
    x = pool(nn.relu(conv(64, name="conv4")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="dense")(x))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class TextCNN(nn.Module):
  """Conv1D text tower: embedding, two strided convolutions and a dense stack.

  ``embedding -> Conv1D 128@4 stride 2, ReLU -> Conv1D 64@3 stride 2, ReLU -> pool ->
  dense 64, ReLU -> 32, ReLU -> 16, sigmoid``. ``pooling="flatten"`` (the original model,
  fixed sequence length) keeps every position; ``"max"`` and ``"mean"`` pool over
  positions, ignoring padding (token id ``pad_id``), and accept any length.

  Attributes:
    vocab_size: number of token ids (ids must be in ``[0, vocab_size)``).
    embed_dim: embedding width.
    pooling: ``"flatten"``, ``"max"`` or ``"mean"``.
    pad_id: the padding token id (masked out by ``"max"``/``"mean"`` pooling).
    dtype, param_dtype: computation and parameter dtypes.

  Input ``[B, L]`` integer token ids; output ``[B, 16]`` in ``(0, 1)``.

  References:
    Y. Kim, "Convolutional Neural Networks for Sentence Classification", EMNLP 2014;
    the Siamese Conv1D title classifier on THUCNews (``experiments/thucnews_fewshot.py``).

  >>> import jax, jax.numpy as jnp
  >>> enc = TextCNN(vocab_size=100); tokens = jnp.ones((2, 30), jnp.int32)
  >>> params = enc.init(jax.random.key(0), tokens)
  >>> enc.apply(params, tokens).shape
  (2, 16)
  """

  vocab_size: int
  embed_dim: int = 128
  pooling: str = "flatten"
  pad_id: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    tokens = _checks.as_array("tokens", tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    _checks.rank("tokens", tokens, 2, "[B, L] token ids")
    _checks.nonempty("tokens", tokens)
    if self.pooling not in ("flatten", "max", "mean"):
      raise ValueError(f"pooling must be 'flatten', 'max' or 'mean', got {self.pooling!r}")
    if tokens.shape[1] < 9:
      raise ValueError(f"tokens must have length >= 9 for the two strided convolutions, "
                       f"got {tokens.shape}")
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="embed")(tokens)
    conv = functools.partial(nn.Conv, padding="VALID", dtype=self.dtype,
                             param_dtype=self.param_dtype)
    x = nn.relu(conv(128, (4,), strides=(2,), name="conv1")(x))
    x = nn.relu(conv(64, (3,), strides=(2,), name="conv2")(x))
    if self.pooling == "flatten":
      x = x.reshape(x.shape[0], -1)
    else:
      # A conv output position is padding when its whole receptive field is padding.
      keep = (tokens != self.pad_id).astype(x.dtype)[..., None]
      keep = nn.max_pool(nn.max_pool(keep, (4,), (2,)), (3,), (2,))
      if self.pooling == "max":
        x = jnp.max(jnp.where(keep > 0, x, 0.0), axis=1)
      else:
        x = jnp.sum(x * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1.0)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(dense(64, name="dense1")(x))
    x = nn.relu(dense(32, name="dense2")(x))
    return nn.sigmoid(dense(16, name="dense3")(x))


class ConvNet4(nn.Module):
  """Four ``conv 3x3 -> batch norm -> ReLU -> max-pool 2`` blocks, flattened.

  The small few-shot backbone (Vinyals et al. 2016; Snell et al. 2017). On ``28x28``
  inputs with 4 blocks the embedding is ``channels``-dimensional (28 -> 14 -> 7 -> 3 -> 1);
  without the last block's pooling it is the ``3 x 3 x channels`` map.
  Batch norm needs ``train=True`` and ``mutable=["batch_stats"]`` while training.

  Attributes:
    channels: filters per block.
    blocks: number of blocks.
    pool_last: max-pool after the last block too (False keeps its spatial map).
    dtype, param_dtype: computation and parameter dtypes.

  >>> import jax, jax.numpy as jnp
  >>> net = ConvNet4(); v = net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> net.apply(v, jnp.ones((2, 28, 28, 1))).shape
  (2, 32)
  >>> ConvNet4(pool_last=False).apply(v, jnp.ones((2, 28, 28, 1))).shape
  (2, 288)
  """

  channels: int = 32
  blocks: int = 4
  pool_last: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = _images(x).astype(self.dtype)
    for i in range(self.blocks):
      x = nn.Conv(self.channels, (3, 3), padding="SAME", dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
      if self.pool_last or i < self.blocks - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x.reshape(x.shape[0], -1)
