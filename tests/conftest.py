"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Test tensors are tiny: one intra-op thread is faster than two fighting over the CPU with the
    worker processes of multi-process tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
