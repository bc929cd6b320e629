"""Session fixtures (small embedded datasets, the real samples' location) for every test module,
and the suite-wide settings below."""

from __future__ import annotations

import os

from .data_helpers import (  # noqa: F401 (fixtures are found by name)
    cache_dir,
    sample,
    small_kitti,
    small_s3dis,
    small_scannet,
    small_sunrgbd,
)

# ``backend: auto`` means the torch backend in tests (and in the jobs they launch, which inherit
# the environment), also where MinkowskiEngine is installed: only the tests written for ME use it.
os.environ.setdefault("HARNESS_AUTO_BACKEND", "torch")


def pytest_configure(config):
    """One torch thread: the tests' tensors are small, and intra-op threads only add
    synchronisation cost (and, on a loaded machine, heavy contention)."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """MinkowskiEngine tests run last: once ME has run, its OpenMP threads keep spinning and
    slow every later torch op of the process many times over (and a fork after it hangs)."""
    items.sort(key=lambda item: item.get_closest_marker("minkowski") is not None)
