"""Strict test settings (after equinox's tests/conftest.py).

* Eight fake CPU devices, so sharded code paths run in CI (a correctness check only,
  never a speed claim). Must be set before JAX initialises its backends.
* XLA's backend (LLVM) optimisation off: the compile-heavy tests take about a third less
  time (see below). Tests that start processes with their own device count append it to
  these flags (the last value wins); the multi-process tests keep XLA's default level.
* Implicit rank promotion raises: a broadcasting bug fails loudly instead of silently
  building a ``[B, B]`` array.
* A test module's ``RNG`` (a numpy ``Generator`` at module level) is re-seeded before
  each test from the test's id, so every test draws the same numbers whatever ran before
  it: pytest-xdist spreads tests over workers in no fixed order.
* The fast set (``-m "not slow"``, the README's test command) keeps a few cases of each
  long parameter sweep, spread over the sweep, and a test's compile-heavy variants
  (:data:`FAST_CASES`); ``-m slow`` runs the rest, so the two sets together run every
  case.
* A persistent compilation cache in ``.jax_cache/tests``, of every program (see below).
* ``SIAMJAX_DATA_DIR`` made absolute: the script tests run their subprocesses in
  temporary folders, where a relative path (``SIAMJAX_DATA_DIR=../shared/data``) would
  point nowhere.
"""

import os
import zlib

if os.environ.get("SIAMJAX_DATA_DIR"):
  os.environ["SIAMJAX_DATA_DIR"] = os.path.abspath(os.environ["SIAMJAX_DATA_DIR"])

# One persistent compilation cache for the test runs and the processes their tests start
# (scripts killed and resumed, command-line runs), in the clone: every program, however
# quick to compile, is loaded, not compiled again, by a later test, worker or process.
# A script's smoke run compiles about a hundred small programs, and the slow tests start
# the same smoke runs many times; caching them all made no test measurably slower.
# JAX keys each entry by the program, the compile options, XLA's flags and the versions,
# so nothing stale is loaded; a fresh clone starts empty. Delete .jax_cache/ to start over.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.dirname(__file__),
                                                         ".jax_cache", "tests")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Compiling is most of the tests' time, and LLVM's optimisation of the compiled code most of
# that: tests compile with it off. XLA's own passes (fusion, layout, simplification) run
# as they do for a user, so the tests check the programs users run; only the generated
# machine code is slower. Set the flag yourself (3 is XLA's default) to test at another level.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_module_rng(request):
  """Re-seeds the test module's ``RNG`` from the test's id (see the module docstring)."""
  module = request.module
  if isinstance(getattr(module, "RNG", None), np.random.Generator):
    module.RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# How many cases of a test stay in the fast set, spread evenly over its parameter sweep;
# 0 moves the whole test to the slow set. Keys are node ids without the parameters.
FAST_CASES = {
    "siamjax/augment.py::siamjax.augment.affine_warp": 0,
    "siamjax/encoders.py::siamjax.encoders.ConvNet4": 0,
    "siamjax/encoders.py::siamjax.encoders.Koch": 0,
    "siamjax/encoders.py::siamjax.encoders.SmallCNN": 0,
    "siamjax/encoders.py::siamjax.encoders.TextCNN": 0,
    "siamjax/fourier.py::siamjax.fourier": 0,
    "siamjax/models.py::siamjax.models.koch_siamese": 0,
    "siamjax/parallel.py::siamjax.parallel.cross_device_loss": 0,
    "tests/test_cpu_kernels.py::test_bf16_conv2d_matches_rounded_reference": 1,
    "tests/test_cpu_kernels.py::test_bf16_conv_relu_pool_equals_the_unfused_block": 1,
    "tests/test_cpu_kernels.py::test_bf16_conv_relu_pool_grads_are_the_unfused_blocks": 0,
    "tests/test_cpu_kernels.py::test_dft_conv2d_bf16_matches_float32": 0,
    "tests/test_distances.py::test_broadcasting_and_vmap_agree": 2,
    "tests/test_distances.py::test_check_grads": 0,
    "tests/test_fourier.py::test_equals_naive_and_lax_float64": 2,
    "tests/test_fourier.py::test_flax_conv_drop_in_keeps_parameters_and_values": 0,
    "tests/test_imports.py::test_a_low_module_imports_alone_without_the_higher_ones": 1,
    "tests/test_index.py::test_search_equals_brute_force": 3,
    "tests/test_losses_chunked.py::test_batch_hard_is_accurate_with_a_large_shared_offset": 0,
    "tests/test_losses_chunked.py::test_chunk_size_accepts_numpy_integers": 2,
    "tests/test_losses_chunked.py::test_in_batch_check_grads": 0,
    "tests/test_losses_chunked.py::test_in_batch_jit_vmap_and_no_retrace": 1,
    "tests/test_losses_chunked.py::test_memory_stays_linear_with_a_reference_set": 1,
    "tests/test_losses_chunked.py::test_reference_set_partners_are_exactly_the_reference_rows": 0,
    "tests/test_losses_chunked.py::test_valid_anchors_recipe_counts_exactly_the_anchors_with_a_loss": 5,
    "tests/test_losses_chunked_paths.py::test_batch_hard_takes_array_likes_and_equals_the_full_reduction": 0,
    "tests/test_losses_chunked_paths.py::test_check_grads_float32_with_coincident_rows": 1,
    "tests/test_losses_chunked_paths.py::test_check_grads_on_both_paths_float64": 0,
    "tests/test_losses_chunked_paths.py::test_max_positives_too_small_raises_when_concrete_and_is_nan_under_jit": 0,
    "tests/test_losses_chunked_paths.py::test_one_block_and_chunked_paths_agree": 1,
    "tests/test_losses_chunked_paths.py::test_paths_agree_at_distance_zero": 0,
    "tests/test_losses_chunked_paths.py::test_paths_agree_for_every_distance": 0,
    "tests/test_losses_mining.py::test_mining_losses_match_naive_loops": 2,
    "tests/test_losses_pairs.py::test_triplet_margin_loss_is_finite_in_float16_up_to_1e4": 0,
    "tests/test_losses_pml.py::test_matches_pml_and_naive_values_and_grads": 2,
    "tests/test_losses_pml.py::test_matches_pml_in_float64": 0,
    "tests/test_losses_pml.py::test_new_losses_finite_at_distance_zero": 1,
    "tests/test_losses_pml.py::test_new_losses_jit_vmap_and_check_grads": 0,
    "tests/test_losses_proxy.py::test_arcface_fallback_branch_and_finite_gradient_at_zero_angle": 0,
    "tests/test_losses_proxy.py::test_matches_naive_reference_float64": 1,
    "tests/test_losses_proxy.py::test_per_anchor_shape_and_valid_mask_drops_rows": 1,
    "tests/test_losses_proxy.py::test_value_and_gradients_match_pytorch_metric_learning": 4,
    "tests/test_losses_softmax.py::test_ntxent_matches_optax": 1,
    "tests/test_memory.py::test_check_grads_float32_and_vmap_over_memories": 0,
    "tests/test_memory.py::test_cross_batch_loss_equals_pml_cross_batch_memory": 1,
    "tests/test_memory.py::test_cross_batch_loss_shards_with_cross_device_loss": 0,
    "tests/test_memory.py::test_ref_exclude_of_the_losses_equals_the_naive_ones": 0,
    "tests/test_models.py::test_koch_paper_initialisation": 0,
    "tests/test_models.py::test_koch_shared_gradient_is_finite_and_one_tree": 0,
    "tests/test_omniglot_recipe.py::test_in_batch_softmax_matches_naive": 0,
    "tests/test_parallel.py::test_cross_device_loss_gathers_valid": 1,
    "tests/test_parallel.py::test_data_parallel_step_is_independent_of_device_count": 1,
    "tests/test_retrieval.py::test_chunk_size_does_not_change_the_result": 0,
    "tests/test_retrieval.py::test_matches_pml_accuracy_calculator": 3,
    "tests/test_retrieval.py::test_self_retrieval_matches_naive": 3,
    "tests/test_retrieval.py::test_separate_reference_matches_naive": 2,
    "tests/test_retrieval.py::test_ties_rank_by_index_on_exact_integer_distances": 1,
    "tests/test_thucnews_recipe.py::test_in_batch_finetuning_separates_labelled_classes": 0,
    "tests/test_thucnews_recipe.py::test_pair_training_pulls_pairs_apart_over_shuffled_epochs": 0,
    "tests/test_xla_flags.py::test_flag_benchmark_steps_run": 0,
}


def pytest_collection_modifyitems(config, items):
  """Marks as slow the cases of :data:`FAST_CASES`' tests that the fast set leaves out."""
  sweeps = {}
  for item in items:
    sweeps.setdefault(item.nodeid.split("[")[0], []).append(item)
  for base, cases in sweeps.items():
    if base not in FAST_CASES:
      continue
    n = min(FAST_CASES[base], len(cases))
    keep = {i * len(cases) // n for i in range(n)} if n else set()
    for i, item in enumerate(cases):
      if i not in keep:
        item.add_marker(pytest.mark.slow)
