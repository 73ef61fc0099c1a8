import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the training tests single-threaded.

    The models here are tiny: on a CPU shared with other jobs, OpenMP threads waiting for each other cost far more
    than they gain (a backward pass measured 45x slower with 2 threads on a loaded 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
