import os

import pytest
import torch

# Read at import, before the autouse fixture below sets it to 0: Triton fixes the mode when the kernels are first
# defined, so the interpreter can only run them if TRITON_INTERPRET=1 from the start (as in CI).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    """The engine's tests are not about the Triton kernel: its PyTorch path keeps them fast under CI's
    TRITON_INTERPRET=1 (one test in test_ghost_clipping.py runs the kernel on purpose)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Where the engine's Triton kernels run: ``"cuda"`` when there is a GPU, else ``"cpu"`` through the
    interpreter (switched back on for the test); skips when neither can run them."""
    if torch.cuda.is_available():
        return "cuda"
    if not INTERPRETING:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 when the tests start (as in CI)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
