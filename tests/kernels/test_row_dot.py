"""kernels/row_dot.py: each row's dot product against a float64 reference, over dtypes, odd sizes, rows split
between several programs, non-finite entries, and the engine's batched_dot taking it on the Triton path."""

import pytest
import torch

from persample.engine import forms
from persample.kernels import row_dot
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.double() * y.double()).reshape(x.shape[0], -1).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1025), (2, 3, 5, 7), (7,), (4, 2049), (130, 9), (67, 33)])
def test_matches_float64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    y = torch.randn(shape, generator=gen).to(dtype)
    out = row_dot.row_dots(x.to(DEVICE), y.to(DEVICE))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (shape[0],)
    # The inputs' own values, products and sums exact to the accumulation's rounding: the tolerance is relative
    # to the sum of |x y|, the scale of that rounding.
    scale = (x.double() * y.double()).abs().reshape(shape[0], -1).sum(1)
    assert ((out.cpu().double() - _reference(x, y)).abs() <= TOL[dtype] * scale + 1e-30).all()


@pytest.mark.parametrize("pieces", [2, 3, 5])
def test_rows_split_between_programs(monkeypatch, pieces):
    """Rows longer than one program's share: partial sums per piece, added in order; the last piece short."""
    monkeypatch.setattr(row_dot, "BLOCK", 16)
    monkeypatch.setattr(row_dot, "row_pieces", lambda programs, K, block, device, per_sm: pieces)
    gen = torch.Generator().manual_seed(pieces)
    x, y = torch.randn(3, 101, generator=gen, dtype=torch.float64), torch.randn(3, 101, generator=gen,
                                                                                 dtype=torch.float64)
    out = row_dot.row_dots(x.to(DEVICE), y.to(DEVICE))
    torch.testing.assert_close(out.cpu(), _reference(x, y), rtol=1e-12, atol=1e-12)


def test_non_finite_entries_propagate_like_the_product():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), 0.0], [0.0, float("inf"), 1.0]])
    y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    out = row_dot.row_dots(x.to(DEVICE), y.to(DEVICE)).cpu()
    assert out[0].isnan() and out[1] == float("inf") and out[2].isnan()  # inf * 0 is NaN, as in (x * y).sum()


def test_empty():
    assert row_dot.row_dots(torch.ones(0, 3, device=DEVICE), torch.ones(0, 3, device=DEVICE)).shape == (0,)
    out = row_dot.row_dots(torch.ones(2, 0, device=DEVICE), torch.ones(2, 0, device=DEVICE))
    assert out.tolist() == [0.0, 0.0]


def test_bad_input():
    a = torch.ones(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        row_dot.row_dots(a.t(), a.t())
    with pytest.raises(ValueError, match="one shape and dtype"):
        row_dot.row_dots(a, a.double())
    with pytest.raises(ValueError, match="one shape and dtype"):
        row_dot.row_dots(a, torch.ones(4, 2, device=DEVICE))
    with pytest.raises(ValueError, match="floating-point"):
        row_dot.row_dots(a.long(), a.long())


def test_batched_dot_takes_the_kernel(monkeypatch):
    """The engine's batched_dot: the kernel for contiguous operands on the Triton path (its result in the
    operands' dtype, equal to the product and sum's), the product and sum for strided ones."""
    monkeypatch.setattr(forms, "_DOT_BY_KERNEL", 0)  # every size (the engine's threshold: 2^23 elements)
    calls = []
    real = row_dot.row_dots
    monkeypatch.setattr(row_dot, "row_dots", lambda x, y: calls.append(x.shape) or real(x, y))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 5, generator=gen).to(DEVICE), torch.randn(4, 3, 5, generator=gen).to(DEVICE)
    out = forms.batched_dot(x, y)
    assert calls == [x.shape] and out.dtype == x.dtype
    torch.testing.assert_close(out, (x * y).sum((1, 2)))
    strided = forms.batched_dot(x.transpose(1, 2), y.transpose(1, 2))
    assert len(calls) == 1
    torch.testing.assert_close(strided, out)
    assert forms.batched_dot(x, x) is not None and len(calls) == 1  # squared norms: one reduction
    monkeypatch.setattr(forms, "_DOT_BY_KERNEL", x.numel())
    torch.testing.assert_close(forms.batched_dot(x, y), out)  # not larger than the threshold: product and sum
    assert len(calls) == 1
