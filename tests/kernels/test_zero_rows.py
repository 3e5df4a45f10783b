"""kernels/zero_rows.py: the dropped examples' slices become zeros, every other element is left as it was (bits
included: NaN and inf in kept rows stay), over dtypes, odd sizes and the position of the example dimension."""

import pytest
import torch

from persample.kernels import zero_rows
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape, dim", [((5,), 0), ((3, 7), 0), ((4, 3, 5, 2), 1), ((2, 6, 1), 1), ((1, 3, 2100), 1),
                                        ((3, 2), 1)])
def test_zeroes_the_dropped_rows_only(shape, dim, dtype):
    gen = torch.Generator().manual_seed(len(shape) * 10 + dim)
    t = torch.randn(shape, generator=gen).to(dtype)
    t.view(-1)[:: 3] = float("nan")  # NaN and inf in every row, kept ones included
    t.view(-1)[1:: 7] = float("inf")
    B = shape[dim]
    keep = torch.rand(B, generator=gen) < 0.5
    keep[0] = not keep[-1] if B > 1 else False
    expected = t.clone()
    index = [slice(None)] * len(shape)
    index[dim] = ~keep
    expected[tuple(index)] = 0
    out = zero_rows.zero_rows_(t := t.to(DEVICE), keep.to(DEVICE), dim)
    assert out is t
    # Bit for bit: the kept rows' NaN, inf and values untouched, the dropped rows +0.
    assert torch.equal(_bits(t.cpu()), _bits(expected))


def test_all_kept_and_all_dropped():
    t = torch.full((2, 3, 4), float("nan"), device=DEVICE)
    zero_rows.zero_rows_(t, torch.ones(3, dtype=torch.bool, device=DEVICE), 1)
    assert t.isnan().all()
    zero_rows.zero_rows_(t, torch.zeros(3, dtype=torch.bool, device=DEVICE), 1)
    assert (t == 0).all()


def test_many_blocks_per_program(monkeypatch):
    """A row longer than MAX_PROGRAMS_PER_ROW blocks: each program writes several blocks."""
    monkeypatch.setattr(zero_rows, "BLOCK", 16)
    monkeypatch.setattr(zero_rows, "MAX_PROGRAMS_PER_ROW", 3)
    t = torch.ones(2, 3, 101, device=DEVICE)
    keep = torch.tensor([True, False, True], device=DEVICE)
    zero_rows.zero_rows_(t, keep, 1)
    assert (t[:, 1] == 0).all() and (t[:, [0, 2]] == 1).all()


def test_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        zero_rows.zero_rows_(torch.ones(4, 3, device=DEVICE).t(), torch.ones(3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="bool"):
        zero_rows.zero_rows_(torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        zero_rows.zero_rows_(torch.ones(4, device=DEVICE), torch.ones(3, dtype=torch.bool, device=DEVICE))
