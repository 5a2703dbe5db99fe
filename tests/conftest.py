import os

import pytest
import torch
from hypothesis import settings

# The suite (and CI, a fresh clone each time) draws the same property-test examples on every run:
# a search that finds a new case on one run in ten is a flaky CI, not a test. HYPOTHESIS_PROFILE=explore
# searches afresh (random examples, more of them) when hunting for cases.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny linear-algebra problems: extra OpenMP threads only add contention on a shared 2-core
    box (a 512-example vmap(grad) took 10 s with 2 threads under load vs 0.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
