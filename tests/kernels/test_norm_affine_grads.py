"""kernels/norm_affine_grads.py against a float64 PyTorch reference: each example's gradients of a LayerNorm's
or RMSNorm's scale and shift."""

import pytest
import torch

from persample.kernels import norm_affine_grads as kernels
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _expected(x, g, eps, center):
    x, g = x.double(), g.double()
    if center:
        x = x - x.mean(-1, keepdim=True)
    x_hat = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return torch.stack([(g * x_hat).sum(1), g.sum(1)])


def _check(x, g, eps, center, runs=None, tol=None):
    out = kernels.norm_affine_grads(x, g, eps, center, runs=runs)
    expected = _expected(x, g, eps, center)
    assert out.shape == expected.shape
    assert out.dtype == (torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32)
    tol = tol or (1e-12 if out.dtype == torch.float64 else 2e-5)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B, P, D", [(1, 1, 1), (3, 5, 7), (2, 9, 33), (4, 3, 128), (2, 4, 1000)])
def test_matches_float64(B, P, D, dtype, center):
    gen = torch.Generator().manual_seed(B * 1000 + P * 10 + D)
    x = (torch.randn(B, P, D, generator=gen) * 3 + 1).to(dtype).to(DEVICE)
    g = torch.randn(B, P, D, generator=gen).to(dtype).to(DEVICE)
    _check(x, g, 1e-5, center)


@pytest.mark.parametrize("runs", [1, 2, 3, 7, 50])
def test_positions_split_into_runs(runs):
    """Each example's positions split over several programs (uneven runs, more runs than positions)."""
    x, g = torch.randn(3, 7, 20, device=DEVICE), torch.randn(3, 7, 20, device=DEVICE)
    _check(x, g, 1e-6, True, runs=runs)


def test_mixed_dtypes_strided_views_and_a_large_offset():
    """x float32 and g bfloat16 (autocast's LayerNorm), rows that are strided views, a last dimension that is
    not contiguous, and inputs around 1e4, where the mean must be subtracted before squaring."""
    base = torch.randn(4, 10, 48, device=DEVICE) + 1e4
    x = base[:, ::2, :40]  # row stride 96, batch stride 480
    g = torch.randn(4, 40, 5, device=DEVICE).to(torch.bfloat16).transpose(1, 2)  # last-dim stride != 1
    # Around 1e4, float32 holds x to about 1e-3: the bar is PyTorch's own float32 LayerNorm on the same values.
    x_hat = torch.native_layer_norm(x, (40,), None, None, 1e-5)[0]
    torch_sums = torch.stack([(g.float() * x_hat).sum(1), g.float().sum(1)]).double().cpu()
    expected = _expected(x, g, 1e-5, True).cpu()
    torch_error = float((torch_sums - expected).abs().max() / expected.abs().max())
    _check(x, g, 1e-5, True, runs=2, tol=max(2 * torch_error, 2e-5))
    _check(x - 1e4, g, 0.5, False)


def test_empty():
    out = kernels.norm_affine_grads(torch.randn(2, 0, 4, device=DEVICE), torch.randn(2, 0, 4, device=DEVICE),
                                    1e-5, True)
    assert out.shape == (2, 2, 4) and not out.any()


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.float64, torch.float64)],
                         ids=["fp32", "fp32-bf16", "fp16", "fp64"])
@pytest.mark.parametrize("B, P, D, N, runs", [(1, 1, 1, 1, None), (3, 5, 7, 4, None), (2, 9, 33, 3, 4),
                                              (2, 4, 130, 2, 3)])
def test_grouped_matches_float64(B, P, D, N, runs, dtypes, center):
    """N layers in one launch, each with its own inputs (separate allocations, strided views of a wider tensor):
    each layer's sums equal its own float64 reference."""
    gen = torch.Generator().manual_seed(B * 1000 + P * 10 + D + N)
    xs = [(torch.randn(B, P, D + 3, generator=gen) * 3 + i)[..., 1:D + 1].to(dtypes[0]).to(DEVICE) for i in range(N)]
    gs = [torch.randn(B, P, D, generator=gen).to(dtypes[1]).to(DEVICE) for _ in range(N)]
    out = kernels.norm_affine_grads_grouped(xs, gs, 1e-5, center, runs=runs)
    acc = torch.float64 if dtypes[0] == torch.float64 else torch.float32
    assert out.shape == (N, 2, B, D) and out.dtype == acc
    tol = 1e-12 if acc == torch.float64 else 2e-5
    for layer, x, g in zip(out, xs, gs, strict=True):
        expected = _expected(x, g, 1e-5, center).cpu()
        torch.testing.assert_close(layer.double().cpu(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_grouped_empty():
    xs = [torch.randn(2, 0, 4, device=DEVICE)] * 3
    out = kernels.norm_affine_grads_grouped(xs, xs, 1e-5, True)
    assert out.shape == (3, 2, 2, 4) and not out.any()
