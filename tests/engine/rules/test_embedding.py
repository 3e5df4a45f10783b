import pytest
import torch
from torch import nn

from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Lookup(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb = nn.Embedding(7, 4, **options)
        self.lin = nn.Linear(4, 4)

    def forward(self, idx):
        return self.lin(self.emb(idx))


@pytest.mark.parametrize("shape", [(6,), (6, 5), (6, 2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("options", [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True}],
                         ids=["plain", "padding_idx", "scale_grad_by_freq"])
@pytest.mark.parametrize("strategy", ["auto", "materialize"])
def test_embedding(shape, options, strategy):
    idx = torch.randint(0, 7, shape)  # repeated rows within examples
    y = torch.randn(*shape, 4, dtype=torch.float64)
    assert_matches_reference(Lookup(**options).double(), idx, y, loss_fn=squared_error, strategy=strategy)


@pytest.mark.parametrize("positions", ["arange", "expand"])
@pytest.mark.parametrize("T", [4, 6])  # T == B is the ambiguous case for an unbatched arange(T)
def test_positional_embedding_with_and_without_batch_dimension(positions, T):
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(8, 4), nn.Linear(4, 3)

        def forward(self, idx):
            B, T = idx.shape
            pos = torch.arange(T)
            return self.out(self.tok(idx) + self.pos(pos if positions == "arange" else pos.expand(B, T)))

    idx = torch.randint(0, 7, (4, T))
    assert_matches_reference(Positions().double(), idx, torch.randn(4, T, 3, dtype=torch.float64),
                             loss_fn=squared_error)
