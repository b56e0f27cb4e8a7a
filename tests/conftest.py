import os

import pytest
import torch

# keep the suite friendly to a shared 2-core machine
torch.set_num_threads(1)
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_system")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DIFFSWARM_CACHE", str(d))
    return d
