"""Fixtures several test files share."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the dense models here are small, and two threads spin-wait for each other
    many times over when the cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
