import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny linear-algebra problems: extra OpenMP threads only add contention on a shared 2-core
    box (a 512-example vmap(grad) took 10 s with 2 threads under load vs 0.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
