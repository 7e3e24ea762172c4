"""Shared test settings."""

import pytest
import torch

from lightning_moe.parallel.mesh import _MESHES


@pytest.fixture(autouse=True)
def single_thread():
    """Test tensors are tiny: one intra-op thread is faster than two fighting over the CPU with the
    worker processes of multi-process tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_process_group_left():
    """MoEStrategy starts a process group in the test process even for one process: end it, and drop
    the EP meshes cached for it, so that later tests find none. It also ends most of their gloo and
    store threads, which every later fork (data-loader workers) would otherwise copy: in one CI run
    both workers of a loader segfaulted late in the suite, which 600 runs of that test beside live
    process groups did not reproduce; a fork with fewer threads is the one difference found."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _MESHES.clear()
