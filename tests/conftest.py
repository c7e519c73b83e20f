"""Test setup: 4 virtual CPU devices so that pmap and sharding run on a CPU machine, unoptimised
code generation, one compilation cache for the whole run, and the slow tests first.

Many tests compile the same programs: a train step in every resume test, each
experiment again in every process it starts. JAX's persistent compilation cache,
in a fresh folder that the pytest-xdist workers and every process they start
share, compiles each program once per run. It is removed at the end of the run;
a JAX_COMPILATION_CACHE_DIR already set is used as it is and kept.
"""

import importlib.metadata
import os
import shutil
import tempfile

# Must happen before JAX is imported (it reads its configuration then) and initialises its backends.
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# The tests compile far more than they compute, and check results, not speed: LLVM's
# optimisation of the generated code is skipped (about a sixth of the suite's CPU time) where
# JAX has no CUDA plugin (on a GPU machine the GPU tests run as compiled for use).
_HAS_CUDA_PLUGIN = any(
    (dist.metadata["Name"] or "").lower().startswith("jax-cuda") for dist in importlib.metadata.distributions()
)
if not _HAS_CUDA_PLUGIN and "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Set here in the controlling process; the workers inherit it and find it set.
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddf_jax_tests_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402

from tests.utils import has_gpu  # noqa: E402

HAS_GPU = has_gpu()


def pytest_collection_modifyitems(config, items):
    """Skips tests marked `gpu` when no GPU is present, and puts the tests marked `slow` first.

    Slow first, so that pytest-xdist hands them out at the start: started last, a
    long test keeps one worker busy while the others have nothing left to run.
    The order is otherwise unchanged.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    """Removes the compilation cache this process created (the workers' runs have ended by then)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
