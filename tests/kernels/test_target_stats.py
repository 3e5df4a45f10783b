"""kernels/target_stats.py against PyTorch: the reduction's scale and the verdict word of the range check."""

import pytest
import torch

from persample.kernels import target_stats as kernels
from tests.conftest import CUDA, interpreting

pytestmark = pytest.mark.skipif(not (CUDA or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _expected(target, V, weight, ignore_index, mean):
    kept = target != ignore_index
    in_range = (target >= 0) & (target < V)
    counted = kept & in_range
    w = weight.double()[target[counted]] if weight is not None else torch.ones(int(counted.sum()), dtype=torch.float64)
    total, count = w.sum().item(), int(counted.sum())
    # The pair: the cross-entropy's weighted mean, the z-loss's plain mean over the counted rows.
    scale = [1.0 / total if total > 0 else 0.0, 1.0 / count if count else 0.0] if mean else [1.0, 1.0]
    bad = (kept & ~in_range).nonzero()
    return scale, kernels.FIRST_BAD + int(bad[0, 0]) if len(bad) else kernels.IN_RANGE


def _stats(target, V, weight, ignore_index, mean, acc):
    verdict = torch.full((1,), kernels.PENDING, dtype=torch.int64, device=DEVICE)
    scale = kernels.target_stats(target.to(DEVICE), V, None if weight is None else weight.to(DEVICE), ignore_index,
                                 mean, acc, verdict)
    return scale, verdict.item()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("N", [0, 1, 5, 150])  # 150 spans three blocks of the interpreter's 64
def test_scale_and_verdict(N, bad, mean, weighted):
    g = torch.Generator().manual_seed(N)
    V = 11
    target = torch.randint(0, V, (N,), generator=g)
    target[::4] = -100
    if bad and N:
        target[N - 1 - N // 3] = V + N  # not counted in the scale either
    weight = torch.rand(V, generator=g, dtype=torch.float64).float() + 0.1 if weighted else None
    scale, verdict = _stats(target, V, weight, -100, mean, torch.float32)
    expected_scale, expected_verdict = _expected(target, V, weight, -100, mean)
    assert scale.shape == (1, 2)
    assert scale[0].tolist() == pytest.approx(expected_scale, rel=1e-6)
    assert verdict == expected_verdict
    assert (verdict == kernels.IN_RANGE) == (not bad or not N)


@pytest.mark.parametrize("bad", [11, 12345, -1, -7])
def test_first_bad_target_is_reported(bad):
    target = torch.tensor([3] * 70 + [bad, 99, -100, 2])  # the first bad one sits in the second block
    scale, verdict = _stats(target, 11, None, -100, True, torch.float32)
    assert verdict == kernels.FIRST_BAD + 70
    assert scale[0].tolist() == pytest.approx([1 / 71, 1 / 71])  # the bad rows (bad and 99) are not counted


def test_all_ignored_mean_scale_is_zero():
    target = torch.full((9,), 5)
    scale, verdict = _stats(target, 8, None, 5, True, torch.float64)
    assert scale.dtype == torch.float64 and scale[0].tolist() == [0.0, 0.0]
    assert verdict == kernels.IN_RANGE
