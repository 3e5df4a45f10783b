import os

import pytest
import torch

from persample.kernels import cross_entropy as ce_kernels
from persample.kernels.launch import Plans

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_launch_plans(monkeypatch):
    """Each test makes its own launch plans (see kernels/launch.py): a test that changes the launch
    configuration (``_grid``, ``launch_config``) must not be served a plan that an earlier test made."""
    monkeypatch.setattr(ce_kernels, "_plans", Plans())
