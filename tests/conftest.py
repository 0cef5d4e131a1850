import os

import pytest

# The suite runs tiny models on a small shared machine: one thread each is fastest there and keeps runs
# predictable (set before torch is imported, so subprocesses inherit it too).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Nothing in the test suite may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every test (tiny models on a shared machine: a second thread only adds
    contention), restored afterwards so no test leaks a `--threads` setting into the next."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
