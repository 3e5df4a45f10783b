"""kernels/conv_weight_grads.py: each example's weight gradient of a 2-D convolution against a float64 reference
(``vmap(grad)`` of ``F.conv2d``), over dtypes, odd sizes, strides, dilations, groups and a non-contiguous output
gradient; and its refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from persample.kernels import conv_weight_grads
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"

# (C_in, C_out, kernel, stride, padding, dilation, groups, H, W)
CASES = [
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 7, 6),
    (4, 6, (3, 2), (2, 1), (1, 0), (2, 1), 2, 9, 7),
    (6, 4, (1, 1), (2, 2), (0, 0), (1, 1), 1, 5, 5),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, 5, 4),
    (5, 33, (2, 3), (1, 2), (0, 1), (1, 1), 1, 6, 11),  # more output channels than one tile
    (17, 3, (3, 3), (1, 1), (2, 2), (2, 2), 1, 5, 5),  # more (channel, tap) columns than one tile
]


def _reference(x, G, stride, dilation, groups, weight_shape):
    """Each example's weight gradient in float64 of ``sum(conv2d(x_b, w) * G_b)`` (``x`` padded already)."""
    def one(w, xb, gb):
        return (F.conv2d(xb[None], w, None, stride, 0, dilation, groups) * gb[None]).sum()

    w = torch.zeros(weight_shape, dtype=torch.float64)
    return vmap(grad(one), in_dims=(None, 0, 0))(w, x.double().cpu(), G.double().cpu())


@pytest.mark.parametrize("padded_by", ["caller", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case, dtype, padded_by):
    """The padding applied before the call, or read as zeros by the kernel's masks (given as ``padding``): the
    reference always gets the padded input."""
    C_in, C_out, kernel, stride, padding, dilation, groups, H, W = case
    gen = torch.Generator().manual_seed(C_in * 100 + C_out)
    raw = torch.randn(3, C_in, H, W, generator=gen).to(dtype)
    x = F.pad(raw, [padding[1]] * 2 + [padding[0]] * 2)
    H_out = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    W_out = (x.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    G = torch.randn(3, C_out, H_out, W_out, generator=gen).to(dtype)
    given, pads = (x, ((0, 0), (0, 0))) if padded_by == "caller" else (raw, ((padding[0],) * 2, (padding[1],) * 2))
    out = conv_weight_grads.conv2d_weight_grads(given.to(DEVICE), G.to(DEVICE), kernel, stride, dilation, groups,
                                                tf32=False, padding=pads)
    assert out.dtype == torch.float32 and out.shape == (3, C_out, C_in // groups, *kernel)
    expected = _reference(x, G, stride, dilation, groups, (C_out, C_in // groups, *kernel))
    # The inputs' own values, their products exact in float32: the tolerance is the float32 accumulation's,
    # relative to the sum of |G x| over the positions.
    scale = _reference(x.abs(), G.abs(), stride, dilation, groups, (C_out, C_in // groups, *kernel))
    assert ((out.double().cpu() - expected).abs() <= 1e-5 * scale + 1e-30).all()


@pytest.mark.cuda
def test_tf32_products():
    """float32 inputs with ``tf32=True`` (what the engine asks for while cuDNN's convolutions run in TF32, PyTorch's
    default): each product rounded to TF32's 10-bit mantissa, so within about 2 * 2^-11 of the sum of |G x|, and
    not the float32 result (the flag reaches the GEMM)."""
    gen = torch.Generator().manual_seed(5)
    x, G = torch.randn(4, 16, 12, 12, generator=gen), torch.randn(4, 32, 10, 10, generator=gen)
    out = conv_weight_grads.conv2d_weight_grads(x.cuda(), G.cuda(), (3, 3), (1, 1), (1, 1), 1, tf32=True)
    exact = conv_weight_grads.conv2d_weight_grads(x.cuda(), G.cuda(), (3, 3), (1, 1), (1, 1), 1, tf32=False)
    expected = _reference(x, G, (1, 1), (1, 1), 1, (32, 16, 3, 3))
    scale = _reference(x.abs(), G.abs(), (1, 1), (1, 1), 1, (32, 16, 3, 3))
    assert ((out.double().cpu() - expected).abs() <= 2 ** -10 * scale).all()
    assert not torch.equal(out, exact)


def test_uneven_padding_read_by_the_kernel():
    """Padding that differs on each side ('same' with an even kernel span pads one more below and right): read by
    the kernel's masks, it gives what the padded copy gives."""
    gen = torch.Generator().manual_seed(3)
    raw, G = torch.randn(2, 3, 5, 6, generator=gen), torch.randn(2, 4, 6, 7, generator=gen)
    padding = ((1, 2), (0, 3))  # (above, below), (left, right): a 3x3 input span on an 8x9 padded input
    x = F.pad(raw, [0, 3, 1, 2])
    out = conv_weight_grads.conv2d_weight_grads(raw.to(DEVICE), G.to(DEVICE), (3, 3), (1, 1), (1, 1), 1, tf32=False,
                                                padding=padding)
    expected = _reference(x, G, (1, 1), (1, 1), 1, (4, 3, 3, 3))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding of at least 0"):
        conv_weight_grads.conv2d_weight_grads(raw.to(DEVICE), G.to(DEVICE), (3, 3), (1, 1), (1, 1), 1,
                                              padding=((-1, 2), (0, 3)))


def test_a_non_contiguous_output_gradient():
    x = torch.randn(2, 3, 6, 6)
    G = torch.randn(2, 6, 6, 4).transpose(2, 3)[:, ::2]  # (2, 3, 4, 6) with odd strides
    out = conv_weight_grads.conv2d_weight_grads(x.to(DEVICE), G.to(DEVICE), (3, 1), (1, 1), (1, 1), 1, tf32=False)
    expected = _reference(x, G, (1, 1), (1, 1), 1, (3, 3, 3, 1))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_an_empty_batch():
    out = conv_weight_grads.conv2d_weight_grads(torch.randn(0, 2, 5, 5, device=DEVICE),
                                                torch.randn(0, 3, 3, 3, device=DEVICE), (3, 3), (1, 1), (1, 1), 1)
    assert out.shape == (0, 3, 2, 3, 3)


def test_refusals():
    x, G = torch.randn(2, 4, 6, 6, device=DEVICE), torch.randn(2, 4, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        conv_weight_grads.conv2d_weight_grads(x.double(), G.double(), (3, 3), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="of one dtype"):
        conv_weight_grads.conv2d_weight_grads(x, G.half(), (3, 3), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="groups do not divide"):
        conv_weight_grads.conv2d_weight_grads(x, G, (3, 3), (1, 1), (1, 1), 3)
    with pytest.raises(ValueError, match="does not fit"):
        conv_weight_grads.conv2d_weight_grads(x, G, (5, 5), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="tensors of one batch"):
        conv_weight_grads.conv2d_weight_grads(x, G[:1], (3, 3), (1, 1), (1, 1), 1)
