"""kernels/launch.py: the launch cache and the Launchers that op launchers keep as plans."""

import pytest
import torch

from persample.kernels import cross_entropy as kernels
from persample.kernels.launch import Launcher, Plans, aligned, launch
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _scale(x, factor):
    return launch(kernels._scale_kernel, (2,), x, torch.tensor([factor], device=DEVICE), x.numel(), BLOCK=16,
                  ACC=kernels.acc_dtype(x.dtype), num_warps=1)


def test_a_launcher_launches_again_with_new_arguments():
    x = torch.arange(40, dtype=torch.float32, device=DEVICE)
    launcher = _scale(x, 2.0)
    assert isinstance(launcher, Launcher)
    y = torch.ones(37, dtype=torch.float32, device=DEVICE)
    launcher((3,), y, torch.tensor([0.5], device=DEVICE), y.numel())
    assert torch.equal(x, 2 * torch.arange(40, dtype=torch.float32, device=DEVICE))
    assert torch.equal(y, torch.full_like(y, 0.5))


@pytest.mark.skipif(not interpreting(), reason="the check runs in the interpreter only (compiled launches skip it)")
@pytest.mark.parametrize("change", ["dtype", "alignment", "int class"])
def test_a_launcher_refuses_arguments_of_another_specialization(change):
    # What makes a plan whose key misses part of the specialization fail the CPU tests.
    x = torch.ones(48, dtype=torch.float32, device=DEVICE)
    launcher = _scale(x, 2.0)
    y = {"dtype": torch.ones(48, dtype=torch.bfloat16, device=DEVICE),
         "alignment": torch.ones(49, dtype=torch.float32, device=DEVICE)[1:],
         "int class": torch.ones(47, dtype=torch.float32, device=DEVICE)}[change]
    with pytest.raises(AssertionError, match="plan's key missed"):
        launcher((2,), y, torch.tensor([2.0], device=DEVICE), 1 if change == "int class" else y.numel())


def test_aligned_and_plans():
    x = torch.zeros(8, device=DEVICE)
    assert aligned(x, None, x[4:]) and not aligned(x, x[1:])
    plans = Plans(limit=2)
    for i in range(3):
        plans.keep(i, str(i))
    assert dict(plans) == {2: "2"}  # emptied when full


@pytest.mark.skipif(not interpreting(), reason="records the interpreter's launches")
def test_every_kernel_compiles_for_a_gpu():
    """Every kernel that persample launches, in the specializations that a few calls of each op launch (both loss
    directions over the loss's options, float32 and bfloat16; the engine's kernels), compiles to an H100's machine
    code here (:mod:`tests.kernels.gpu_compile`): the interpreter runs kernels as Python and would not catch what
    only a GPU's compiler rejects."""
    import persample
    from persample.kernels import conv_weight_grads, group_norm_affine_grads, norm_affine_grads, row_dot, zero_rows
    from tests.kernels.gpu_compile import compile_for_gpu, recorded_launches

    gen = torch.Generator().manual_seed(0)
    with recorded_launches() as launched:
        for dtype in (torch.float32, torch.bfloat16):
            for options in ({"reduction": "mean"}, {"reduction": "sum", "label_smoothing": 0.1},
                            {"reduction": "none", "softcap": 5.0, "z_loss": 1e-3},
                            {"reduction": "mean", "weight": torch.rand(7, generator=gen)}):
                logits = torch.randn(5, 7, generator=gen).to(dtype).requires_grad_()
                loss = persample.cross_entropy(logits, torch.randint(0, 7, (5,), generator=gen), **options)
                loss.sum().backward()
            x = torch.randn(2, 3, 8, generator=gen).to(dtype)
            norm_affine_grads.norm_affine_grads(x, x, 1e-5, True)
            norm_affine_grads.norm_affine_grads_grouped([x, x], [x, x], 1e-5, False)
            y, stats = torch.randn(2, 4, 3000, generator=gen).to(dtype), torch.rand(2, 2, generator=gen)
            for pieces in (1, 3):
                group_norm_affine_grads.group_norm_affine_grads(y, y, stats, stats, pieces=pieces)
                group_norm_affine_grads.group_norm_affine_grads_grouped([y, y], [y, y], [stats] * 2, [stats] * 2,
                                                                        pieces=pieces)
            row_dot.row_dots(y, y)
            zero_rows.zero_rows_(y.float(), torch.tensor([True, False]))
            images = torch.randn(2, 4, 6, 6, generator=gen).to(dtype)
            conv_weight_grads.conv2d_weight_grads(images, torch.randn(2, 4, 6, 6, generator=gen).to(dtype), (3, 3),
                                                  (1, 1), (1, 1), 2, tf32=False, padding=((1, 1), (1, 1)))
    kernels_launched = {name for _, name, _, _ in launched.values()}
    assert {"_norm_affine_grads_grouped_kernel", "_group_norm_affine_grads_grouped_kernel", "_row_dot_kernel",
            "_zero_rows_kernel", "_conv_weight_grads_kernel"} <= kernels_launched, kernels_launched
    printed = compile_for_gpu(list(launched.values()))
    assert len(printed.splitlines()) == len(launched)
