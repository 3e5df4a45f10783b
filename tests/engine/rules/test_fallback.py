import pytest
import torch
import torch.nn.functional as F
from torch import nn

from persample.engine.rules import fallback
from tests.engine.reference import assert_matches_reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Scale(nn.Module):
    """A custom module with a direct parameter: no rule, so the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.gain + self.shift)


class TwoOutputs(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ self.weight, (x * x) @ self.weight  # a tuple output; only the first is used below


def test_custom_module_and_group_norm():
    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.GroupNorm(2, 6), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_tuple_output_with_an_unused_part():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.two = TwoOutputs(4)

        def forward(self, x):
            return self.two(x)[0]

    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    assert_matches_reference(Net().double(), x, y, loss_fn=squared_error)


def test_multihead_attention_uses_a_child_parameter_directly():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 5)

        def forward(self, x):
            return self.out(self.mha(x, x, x, need_weights=False)[0])

    x = torch.randn(3, 4, 8, dtype=torch.float64)
    assert_matches_reference(Attention().double(), x, torch.randint(0, 5, (3, 4)))


def test_subclass_of_a_ruled_type_goes_to_the_fallback():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, 2 * self.weight, self.bias)

    model = nn.Sequential(ScaledLinear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_fallback_returns_dense_forms_per_parameter():
    from persample.engine.registry import Call

    module = Scale(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64)]
    forms = fallback.per_example_grads(Call(module, (x,), {}, dict(module.named_parameters()), None), grads,
                                       lambda t: t.shape[0] == 4)
    for b in range(4):
        (gain, shift) = torch.autograd.grad((module(x[b:b + 1]) * grads[0][b:b + 1]).sum(),
                                            [module.gain, module.shift])
        torch.testing.assert_close(forms["gain"].g[b], gain)
        torch.testing.assert_close(forms["shift"].g[b], shift)
