"""Optional oneDNN kernel for bf16 matrix products on the CPU (AVX512-BF16 / AMX).

XLA:CPU (jaxlib 0.10) with :data:`siamjax.xla.FAST_CPU_FLAGS` converts both operands of
a bf16 ``dot`` to float32 and multiplies in float32, so a bf16 Koch network trains no
faster than a float32 one, while PyTorch's bf16 products (oneDNN) run on the CPU's bf16
instructions at about twice the float32 rate on CPUs with AVX512-BF16
(``benchmarks/results/cpu-amd-epyc-2core-profile.md``). This module calls oneDNN's
matmul primitive (bf16 inputs, float32 accumulation and output) from a jitted function
through an XLA FFI custom call, with its own VJP whose two gradient products are again
bf16 x bf16 -> float32 oneDNN products.

The kernel needs a C++17 compiler and oneDNN's headers and library. On x86-64 Linux,
oneDNN (``onednn-cpu-gomp``, ``onednn-devel-cpu-gomp``) is a dependency of the plain
``pip install -e .``; elsewhere the ``onednn`` extra, ``pip install --target DIR
onednn-cpu-gomp onednn-devel-cpu-gomp`` or a system oneDNN provides it. The first
process that needs the kernel builds it (about 3 s, once) into a cache directory
(``$SIAMJAX_CACHE_DIR``, default ``~/.cache/siamjax``; one file per source version and
oneDNN folder) when none is built for this source version, or the one built no longer
loads, and oneDNN's headers are found (``$SIAMJAX_ONEDNN=DIR``, or oneDNN installed in
this environment). To build it ahead of time, or against another oneDNN::

    python -m siamjax.cpu_kernels build --onednn DIR   # DIR holds include/ and lib/

Where the kernel could run (the CPU backend, a CPU with AVX512-BF16 or AMX) but cannot be
built or loaded (no C++ compiler, no oneDNN), one line on standard error says that bf16
runs on XLA and how to get the fast route; ``python -m siamjax.cpu_kernels route``
prints the route and why. With the kernel, :func:`matmul_route` returns ``"onednn-bf16"``, and
:class:`siamjax.encoders.Koch` in bf16 with ``conv="auto"`` sends its matrix work through
it: its convolutional blocks as oneDNN bf16 convolutions fused with their ReLU and
pooling (:func:`bf16_conv_relu_pool`, :func:`bf16_conv2d`; forward, weight and input
gradients) on CPUs with AMX, elsewhere conv1 so and conv2-4 as the DFT transforms
(:func:`bf16_transform`) and Fourier-domain products of :mod:`siamjax.fourier`; and the
dense layer.
Everywhere else -- no compiler, no oneDNN, no bf16 instructions, a GPU backend, or
``SIAMJAX_ONEDNN=0`` -- :func:`matmul_route` returns ``"xla"`` and nothing else changes:
the same functions run as XLA products and convolutions, and nothing is built on a GPU
backend.
"""

from siamjax.cpu_kernels._library import (build, library_path, matmul_route, onednn_amx,
                                          route_info)
from siamjax.cpu_kernels._ops import (bf16_conv2d, bf16_conv_relu_pool, bf16_matmul,
                                      bf16_transform, conv_general_dilated,
                                      dense_dot_general)

__all__ = ["matmul_route", "route_info", "onednn_amx", "bf16_matmul", "bf16_transform", "dense_dot_general",
           "bf16_conv2d", "bf16_conv_relu_pool", "conv_general_dilated", "build",
           "library_path"]
