"""kernels/group_norm_affine_grads.py against float64 PyTorch: each example's gradients of a GroupNorm's scale and
shift, from ``torch.func.vmap(grad)`` of ``F.group_norm`` with non-uniform output gradients, over dtypes, odd sizes,
group counts, rows split between programs and several rows to a program."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from persample.kernels import group_norm_affine_grads as kernels
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5


def _stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's ``(mean, rstd)`` ``(B, groups)`` as PyTorch's GroupNorm kernel returns them, in float32 (float64
    for float64)."""
    B, C, S = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, mean, rstd = torch.ops.aten.native_group_norm(x.to(acc).cpu().contiguous(), None, None, B, C, S, groups, EPS)
    return mean.view(B, groups), rstd.view(B, groups)


def _expected(x: torch.Tensor, g: torch.Tensor, groups: int) -> torch.Tensor:
    """``(2, B, C)`` per-example gradients of the scale and shift in float64: ``vmap(grad)`` of ``<g_b, GN(x_b)>``."""
    C = x.shape[1]

    def loss(weight, bias, x_b, g_b):
        return (F.group_norm(x_b[None], groups, weight, bias, EPS)[0] * g_b).sum()

    ones, zeros = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    d_scale, d_shift = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        ones, zeros, x.double().cpu(), g.double().cpu())
    return torch.stack([d_scale, d_shift])


def _check(x, g, groups, pieces=None):
    mean, rstd = _stats(x, groups)
    out = kernels.group_norm_affine_grads(x.to(DEVICE), g.to(DEVICE), mean.to(DEVICE), rstd.to(DEVICE),
                                          pieces=pieces)
    expected = _expected(x, g, groups)
    assert out.shape == expected.shape
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    # The inputs are taken as they are (bfloat16 values exact in float32): only the accumulation rounds.
    tol = 1e-10 if x.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B, C, S, groups", [(1, 2, 3, 1), (3, 6, 7, 2), (2, 6, 33, 3), (5, 4, 1, 2),
                                             (2, 8, 1030, 1), (3, 9, 64, 9)])
def test_matches_float64(B, C, S, groups, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + C * 10 + S)
    x = (torch.randn(B, C, S, generator=gen) * 3 + 1).to(dtype)
    g = torch.randn(B, C, S, generator=gen).to(dtype)
    _check(x, g, groups)


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_rows_split_between_programs(pieces):
    """Rows summed in pieces (the last one short) whose partial sums are added and finished after the kernel."""
    gen = torch.Generator().manual_seed(pieces)
    x, g = torch.randn(2, 6, 3000, generator=gen, dtype=torch.float64), torch.randn(2, 6, 3000, generator=gen,
                                                                                      dtype=torch.float64)
    _check(x, g, 3, pieces=pieces)


def test_non_contiguous_inputs_and_empty():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 4, generator=gen, dtype=torch.float64).transpose(1, 2)  # (3, 4, 17), strided
    g = torch.randn(3, 4, 17, generator=gen, dtype=torch.float64)
    _check(x, g, 2)
    empty = torch.zeros(0, 4, 5, device=DEVICE)
    out = kernels.group_norm_affine_grads(empty, empty, torch.zeros(0, 2, device=DEVICE),
                                          torch.zeros(0, 2, device=DEVICE))
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, C, S, groups, N, pieces", [(1, 2, 3, 1, 1, None), (3, 6, 7, 2, 3, None),
                                                        (2, 4, 1030, 2, 2, None), (2, 6, 3000, 3, 3, 3)])
def test_grouped_matches_float64(B, C, S, groups, N, pieces, dtype):
    """N layers in one launch, each with its own inputs and statistics, finished in the kernel (one piece per row)
    or after it (rows in pieces): each layer's gradients equal its own float64 reference."""
    gen = torch.Generator().manual_seed(B * 1000 + C * 10 + S + N)
    xs = [(torch.randn(B, C, S, generator=gen) * 3 + i).to(dtype) for i in range(N)]
    gs = [torch.randn(B, C, S, generator=gen).to(dtype) for _ in range(N)]
    stats = [_stats(x, groups) for x in xs]
    out = kernels.group_norm_affine_grads_grouped([x.to(DEVICE) for x in xs], [g.to(DEVICE) for g in gs],
                                                  [m.to(DEVICE) for m, _ in stats], [r.to(DEVICE) for _, r in stats],
                                                  pieces=pieces)
    assert out.shape == (N, 2, B, C) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for layer, x, g in zip(out, xs, gs, strict=True):
        expected = _expected(x, g, groups)
        torch.testing.assert_close(layer.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)])
def test_grouped_takes_any_spatial_shape(spatial):
    """A GroupNorm's input ``(B, C, *spatial)`` goes in as it is, its positions read by address: the same gradients
    as with the positions flattened into one dimension."""
    gen = torch.Generator().manual_seed(len(spatial))
    B, C, groups, N = 3, 4, 2, 2
    xs = [torch.randn(B, C, *spatial, generator=gen, dtype=torch.float64) + i for i in range(N)]
    gs = [torch.randn(B, C, *spatial, generator=gen, dtype=torch.float64) for _ in range(N)]
    stats = [_stats(x.reshape(B, C, -1), groups) for x in xs]
    out = kernels.group_norm_affine_grads_grouped([x.to(DEVICE) for x in xs], [g.to(DEVICE) for g in gs],
                                                  [m.to(DEVICE) for m, _ in stats], [r.to(DEVICE) for _, r in stats])
    assert out.shape == (N, 2, B, C)
    for layer, x, g in zip(out, xs, gs, strict=True):
        expected = _expected(x.reshape(B, C, -1), g.reshape(B, C, -1), groups)
        torch.testing.assert_close(layer.cpu(), expected, rtol=1e-10, atol=1e-10)
