import pytest
import torch
from torch import nn

from persample.app.digits import DigitsCNN
from persample.engine import GhostClipping
from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Normed(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        # No bias: a per-channel shift before an instance norm has a gradient of rounding errors only.
        self.conv, self.norm = nn.Conv1d(6, 6, 1, bias=False), norm

    def forward(self, x):
        return self.norm(self.conv(x) if x.ndim == 3 else x) * 2.0


# (groups, eps, input shape); a (B, C) input with one channel per group would normalize single values to 0.
CASES = {"3-groups-3d": (3, 1e-5, (5, 6, 4)), "1-group-4d": (1, 1e-5, (5, 6, 2, 3)),
         "instance-eps-3d": (6, 1e-3, (5, 6, 4)), "3-groups-2d": (3, 1e-5, (5, 6))}


@pytest.mark.parametrize("case", list(CASES))
def test_group_norm(case):
    groups, eps, shape = CASES[case]
    model = Normed(nn.GroupNorm(groups, 6, eps=eps)).double()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.normal_()  # not the all-ones / all-zeros initialization
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_group_norm_without_affine_parameters_has_no_record():
    model = Normed(nn.GroupNorm(3, 6, affine=False)).double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 6, 4, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_digits_cnn_has_a_rule_for_every_layer():
    model = DigitsCNN().double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    assert_matches_reference(model, x, y)
    engine = GhostClipping(model, max_grad_norm=1.0)
    engine.clipped_grad_sum(x, y)
    assert all(hooked.rule is not None for hooked in engine._plan.modules.values())
