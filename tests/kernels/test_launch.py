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
