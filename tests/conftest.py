"""Test setup: 4 virtual CPU devices so that pmap and sharding run on a CPU machine."""

import os

# Must happen before JAX initialises its backends.
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # noqa: E402

from tests.utils import has_gpu  # noqa: E402

HAS_GPU = has_gpu()


def pytest_collection_modifyitems(config, items):
    """Skips tests marked `gpu` when no GPU is present."""
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
