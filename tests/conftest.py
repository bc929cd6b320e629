"""Session fixtures (small embedded datasets, the real samples' location) for every test module."""

from __future__ import annotations

from .data_helpers import (  # noqa: F401 (fixtures are found by name)
    cache_dir,
    sample,
    small_kitti,
    small_s3dis,
    small_scannet,
    small_sunrgbd,
)


def pytest_configure(config):
    """One torch thread: the tests' tensors are small, and intra-op threads only add
    synchronisation cost (and, on a loaded machine, heavy contention)."""
    import torch

    torch.set_num_threads(1)
