import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process work with one torch thread: on a shared 2-core machine, 2 threads that compete with
    other processes can be 10x slower than one. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
