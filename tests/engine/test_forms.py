import itertools

import pytest
import torch

from persample.engine import forms
from persample.engine.forms import Dense, Outer, Rows, clipped_sum, inner

B, M, N, R = 3, 5, 4, 6  # examples, parameter shape (M, N); Rows forms use an (R, N) table with R == M here


def materialize(x) -> torch.Tensor:
    """The ``(B, *shape)`` per-example gradients a form stands for, one example at a time."""
    if isinstance(x, Dense):
        return x.g
    if isinstance(x, Outer):
        return torch.stack([(x.G[b].T @ x.A[b]).reshape(x.shape) for b in range(x.G.shape[0])])
    out = torch.zeros(x.G.shape[0], *x.shape, dtype=x.G.dtype)
    for b in range(x.G.shape[0]):
        for t in range(x.G.shape[1]):
            out[b, x.index[b, t]] += x.G[b, t]
    return out


def make(kind: str, T: int, dtype=torch.float64):
    shape = torch.Size([M, N])
    if kind == "dense":
        return Dense(torch.randn(B, M, N, dtype=dtype))
    if kind == "outer":
        return Outer(torch.randn(B, T, M, dtype=dtype), torch.randn(B, T, N, dtype=dtype), shape)
    # Few distinct rows, so that positions share rows.
    return Rows(torch.randn(B, T, N, dtype=dtype), torch.randint(0, 3, (B, T)), shape)


KINDS = ["dense", "outer", "rows"]


@pytest.mark.parametrize("kx, ky", list(itertools.combinations_with_replacement(KINDS, 2)))
@pytest.mark.parametrize("chunked", [False, True])
def test_inner_products_equal_materialized(kx, ky, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(forms, "_CHUNK_ELEMENTS", 1)  # one example per chunk
    x, y = make(kx, T=4), make(ky, T=7)
    expected = (materialize(x) * materialize(y)).flatten(1).sum(1)
    torch.testing.assert_close(inner(x, y), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inner(y, x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inner(x, x), materialize(x).flatten(1).pow(2).sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clipped_sum_equals_materialized(kind, dtype):
    x = make(kind, T=5, dtype=dtype)
    c = torch.rand(B, dtype=torch.float64)
    expected = torch.einsum("b,b...->...", c, materialize(x).double())
    out = clipped_sum(x, c.to(dtype), dtype)
    assert out.dtype == dtype and out.shape == torch.Size([M, N])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy, T, expected", [
    ("auto", 1, Outer),  # T (m + n) = 9 < m n = 20
    ("auto", 4, Dense),  # 36 >= 20
    ("ghost", 4, Outer),
    ("materialize", 1, Dense),
])
def test_outer_or_dense_picks_the_cheaper_form(strategy, T, expected):
    G, A = torch.randn(B, T, M, dtype=torch.float64), torch.randn(B, T, N, dtype=torch.float64)
    x = forms.outer_or_dense(G, A, torch.Size([M, N]), strategy)
    assert isinstance(x, expected)
    torch.testing.assert_close(materialize(x), torch.einsum("btm,btn->bmn", G, A))


def test_mixed_precision_factors_give_float32_norms():
    x = Outer(torch.randn(B, 4, M, dtype=torch.bfloat16), torch.randn(B, 4, N, dtype=torch.bfloat16),
              torch.Size([M, N]))
    y = Rows(torch.randn(B, 3, N), torch.randint(0, M, (B, 3)), torch.Size([M, N]))
    assert inner(x, x).dtype == torch.float32 and inner(x, y).dtype == torch.float32
    expected = (materialize(x).double() * materialize(y).double()).flatten(1).sum(1)
    torch.testing.assert_close(inner(x, y).double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plus_one", [False, True])
def test_bmm_acc_gives_the_product_in_the_accumulation_dtype(plus_one, dtype, device):
    x = torch.randn(3, 7, 33, dtype=torch.float64).to(device, dtype)
    y = torch.randn(3, 33, 5, dtype=torch.float64).to(device, dtype)
    out = forms.bmm_acc(x, y, torch.float32, plus_one=plus_one)
    expected = torch.bmm(x.double(), y.double()) + (1.0 if plus_one else 0.0)
    assert out.dtype == torch.float32
    # On CUDA low precision comes out of the GEMM unrounded; elsewhere the product is rounded, then cast.
    tol = 1e-5 if dtype == torch.float32 or device == "cuda" else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (1, 1), (4,)])
@pytest.mark.parametrize("by_matmul", [False, True], ids=["mul-sum", "bmm"])
def test_batched_dot(dtype, shape, by_matmul, monkeypatch):
    """Squared norms (one reduction) and products of two tensors (a product and a sum, or on the CPU for large
    tensors one batched matmul), against float64."""
    from persample.engine.forms import batched_dot

    if by_matmul:
        monkeypatch.setattr(forms, "_DOT_BY_MATMUL", 0)

    x, y = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    for a, b in ((x, x), (x, y), (x, x.clone())):
        got = batched_dot(a, b)
        want = (a.double() * b.double()).reshape(shape[0], -1).sum(1)
        assert got.shape == (shape[0],)
        torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_batched_dot_of_channels_last_tensors():
    """A cuDNN weight gradient may come in channels-last: reduced as it is, the same values."""
    from persample.engine.forms import batched_dot

    x = torch.randn(3, 4, 5, 2).to(memory_format=torch.channels_last)
    y = torch.randn(3, 4, 5, 2)
    torch.testing.assert_close(batched_dot(x, x), (x * x).sum((1, 2, 3)))
    torch.testing.assert_close(batched_dot(x, y), (x * y).sum((1, 2, 3)))
