import pytest
import torch
from torch import nn

from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Head(nn.Module):
    def __init__(self, n, m, bias):
        super().__init__()
        self.inner = nn.Linear(n, n)
        self.outer = nn.Linear(n, m, bias=bias)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(x)))


@pytest.mark.parametrize("shape", [(5, 6), (5, 7, 6), (5, 2, 3, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_linear(shape, bias, strategy):
    model = Head(6, 4, bias).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error, strategy=strategy)


def test_non_contiguous_input():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):  # x (B, 6, T): the Linear sees a transposed view
            return self.lin(x.transpose(1, 2))

    x = torch.randn(4, 6, 5, dtype=torch.float64)
    assert not x.transpose(1, 2).is_contiguous()
    assert_matches_reference(Transposed().double(), x, torch.randn(4, 5, 3, dtype=torch.float64),
                             loss_fn=squared_error, strategy="ghost")


def test_frozen_bias_and_frozen_layer():
    model = Head(6, 4, True).double()
    model.outer.bias.requires_grad_(False)
    model.inner.requires_grad_(False)
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 4, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_module_called_twice_has_cross_terms():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    for strategy in ("ghost", "materialize"):
        assert_matches_reference(Twice().double(), x, y, loss_fn=squared_error, strategy=strategy)


def test_shared_call_without_batch_dimension():
    class Queries(nn.Module):
        """A Linear applied to parameter-free constant queries (no batch dimension), broadcast to the batch."""

        def __init__(self):
            super().__init__()
            self.register_buffer("queries", torch.randn(3, 4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x):  # x (B, 3, 4)
            return x * self.lin(self.queries)

    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    assert_matches_reference(Queries().double(), x, y, loss_fn=squared_error)
