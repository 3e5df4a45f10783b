import pytest
import torch
from torch import nn

from persample.engine.uses import parameter_uses


def uses_of(model, *args):
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    found = parameter_uses(model, lambda: model(*args), trainable)
    return {type(m).__name__: sorted(used) for m, used in found.items()}


def test_uses_are_attributed_to_the_innermost_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    found = uses_of(model, torch.randn(3, 4))
    assert found == {"Linear": ["bias", "weight"]}


def test_a_child_parameter_used_directly_belongs_to_the_parent():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 3, 4)
    assert uses_of(mha, x, x, x) == {
        "MultiheadAttention": ["in_proj_bias", "in_proj_weight", "out_proj.bias", "out_proj.weight"]}


def test_reading_shape_or_dtype_is_not_a_use():
    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x.to(self.lin.weight.dtype).reshape(-1, self.lin.weight.shape[1]))

    assert uses_of(Reader(), torch.randn(3, 4)) == {"Linear": ["bias", "weight"]}


def test_the_trace_leaves_the_random_stream_alone():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), torch.randn(3, 4)
    state = torch.get_rng_state()
    uses_of(model, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_parameter_of_another_module():
    class Borrow(nn.Module):
        def forward(self, x, weight):
            return x @ weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.borrow = Borrow()

        def forward(self, x):
            return self.borrow(x, self.w)

    with pytest.raises(ValueError, match="Borrow 'borrow', which does not own it"):
        uses_of(Net(), torch.randn(3, 4))
