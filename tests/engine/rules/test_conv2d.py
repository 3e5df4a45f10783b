import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.reference import assert_matches_reference

CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "stride-padding": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "dilation-rect": dict(in_channels=3, out_channels=4, kernel_size=(3, 2), dilation=(2, 1), padding=(1, 0)),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "same-reflect": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"),
    "circular-no-bias": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular",
                             bias=False),
}


class Net(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.fc = nn.LazyLinear(5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_conv2d(conv, strategy):
    options = CONVS[conv]
    model = Net(nn.Conv2d(**options))
    x = torch.randn(4, options["in_channels"], 7, 6)
    model(x)  # materializes the lazy layer
    assert_matches_reference(model.double(), x.double(), torch.randint(0, 5, (4,)), loss_fn=cross_entropy,
                             strategy=strategy)
