import pytest
import torch


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    """The engine's tests are not about the Triton kernel: its PyTorch path keeps them fast under CI's
    TRITON_INTERPRET=1 (one test in test_ghost_clipping.py runs the kernel on purpose)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
