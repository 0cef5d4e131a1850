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
