"""Shared fixtures. Tests run offline: a hub name fails at once instead of after ~49 s."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every test model is tiny: one thread is as fast, and two OpenMP threads competing with other jobs on
# a 2-core machine slow small ops down by 10-40x (measured: an adapt smoke run 0.3 s vs 11 s).
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test in float64 (finite-difference checks need it) and restore the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
