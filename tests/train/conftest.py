"""Fixtures shared by the training-job tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second
    # thread makes step times swing 10x; restore the setting afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
