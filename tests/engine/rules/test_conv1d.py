import pytest
import torch
from torch import nn

from persample.engine import GhostClipping
from persample.engine.registry import rule_for
from tests.engine.reference import assert_autocast_close_to_float32, assert_matches_reference

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class MLP(nn.Module):
    """GPT-2's MLP: two Conv1D of the same shapes in each of two blocks (their weights are stacked)."""

    def __init__(self, d: int, blocks: int = 2):
        super().__init__()
        self.fc = nn.ModuleList(pytorch_utils.Conv1D(3 * d, d) for _ in range(blocks))
        self.proj = nn.ModuleList(pytorch_utils.Conv1D(d, 3 * d) for _ in range(blocks))

    def forward(self, x):
        for fc, proj in zip(self.fc, self.proj, strict=True):
            x = x + proj(torch.tanh(fc(x)))
        return x


def test_the_rule_covers_conv1d():
    assert rule_for(pytorch_utils.Conv1D(3, 2), {"weight", "bias"}) is not None


@pytest.mark.parametrize("shape", [(5, 4), (5, 6, 4), (5, 2, 3, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_conv1d(shape, strategy):
    model = MLP(4).double()
    x = torch.randn(*shape, dtype=torch.float64)
    assert_matches_reference(model, x, torch.randn(*shape, dtype=torch.float64), loss_fn=squared_error,
                             strategy=strategy)


def test_frozen_bias():
    model = MLP(4).double()
    model.fc[0].bias.requires_grad_(False)
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    assert_matches_reference(model, x, torch.randn(5, 6, 4, dtype=torch.float64), loss_fn=squared_error,
                             strategy="ghost")


def test_bf16_autocast_is_close_to_float32():
    model = MLP(8)
    x, y = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    engine = GhostClipping(model, max_grad_norm=0.5, loss_fn=squared_error, strategy="ghost")
    assert_autocast_close_to_float32(engine, x, y)
