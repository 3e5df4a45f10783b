import os

import pytest
import torch

from persample.kernels import cross_entropy as ce_kernels
from persample.kernels.launch import Plans

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's intra-op threads get an equal share of the cores (and so do the processes
    that tests start, through ``OMP_NUM_THREADS``). Left at their default, every worker's torch uses every core: on
    CI's two cores, a CPU training run measured 2.2 s alone and 12.6 s beside another worker's."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores()


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
