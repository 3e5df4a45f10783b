import pytest
import torch
from torch import nn

from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Normed(nn.Module):
    def __init__(self, norm: nn.Module, d: int):
        super().__init__()
        self.lin, self.norm = nn.Linear(d, d), norm

    def forward(self, x):
        return self.norm(self.lin(x)) * 2.0


NORMS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "layernorm-no-bias": lambda: nn.LayerNorm(6, bias=False),
    "layernorm-2d-shape": lambda: nn.LayerNorm((3, 6)),
    "rmsnorm": lambda: nn.RMSNorm(6),
    "rmsnorm-eps": lambda: nn.RMSNorm(6, eps=1e-3),
}


@pytest.fixture(params=["pytorch", "triton"])
def device(request) -> str:
    """Where the rule runs: its PyTorch ops, or its Triton kernel (see ``triton_device``)."""
    return "cpu" if request.param == "pytorch" else request.getfixturevalue("triton_device")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", [(5, 3, 6), (5, 2, 3, 6)], ids=["3d", "4d"])
def test_norm_scales(norm, shape, device):
    model = Normed(NORMS[norm](), 6).double().to(device)
    with torch.no_grad():
        for p in model.norm.parameters():
            p.normal_()  # not the all-ones / all-zeros initialization
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    y = torch.randn(*shape, dtype=torch.float64, device=device)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_norm_on_2d_input(device):
    model = Normed(nn.LayerNorm(6), 6).double().to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    y = torch.randn(5, 6, dtype=torch.float64, device=device)
    assert_matches_reference(model, x, y, loss_fn=squared_error)
