"""persample/_verdicts.py: the words a kernel writes its target check's verdict into, and the host's wait."""

import time

import pytest
import torch

import persample
from persample.kernels.target_stats import FIRST_BAD, IN_RANGE, PENDING
from persample.loss import _verdicts


def test_a_written_verdict_is_read_and_the_word_reused():
    device = torch.device("cpu")
    verdict = _verdicts.take(device)
    assert verdict.word.item() == PENDING and verdict.word.data_ptr() % 16 == 0
    verdict.word.fill_(IN_RANGE)
    assert verdict.wait() is None
    again = _verdicts.take(device)
    assert again is verdict and again.word.item() == PENDING  # handed out again, reset
    again.word.fill_(FIRST_BAD + 7)
    assert again.wait() == 7


def test_words_are_distinct_and_equally_aligned():
    device = torch.device("cpu")
    taken = [_verdicts.take(device) for _ in range(3 * _verdicts._BLOCK // 2)]  # spans two allocations
    pointers = {v.word.data_ptr() for v in taken}
    assert len(pointers) == len(taken) and all(p % 16 == 0 for p in pointers)
    for v in taken:
        v.word.fill_(IN_RANGE)
        v.wait()


def test_a_verdict_that_never_comes_raises_instead_of_hanging():
    # Nothing will write this word (as after a failed launch): once the device has nothing left to run,
    # the wait gives up with an error.
    verdict = _verdicts.take(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="without writing its verdict"):
        verdict.wait()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_words_are_pinned_and_the_kernels_write_them():
    verdict = _verdicts.take(torch.device("cuda", torch.cuda.current_device()))
    assert verdict.word.is_pinned() and not verdict.word.is_cuda
    verdict.word.fill_(IN_RANGE)
    assert verdict.wait() is None
    x = torch.randn(4, 10, device="cuda", requires_grad=True)
    for _ in range(3):
        persample.cross_entropy(x, torch.tensor([1, 2, 3, 4], device="cuda")).backward()
        with pytest.raises(ValueError, match="class index 10"):
            persample.cross_entropy(x, torch.tensor([1, 10, 3, 4], device="cuda"))
    assert torch.isfinite(x.grad).all()


def _long_queue():
    """Tens of milliseconds of GPU work queued on the current stream (torch.cuda._sleep is far shorter on an
    H100 than its cycle count says)."""
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a
        a /= a.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stream", ["default", "side"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_verdict_behind_a_long_queue(reduction, stream):
    # The kernel that checks the targets starts only after tens of ms of work queued before it, on the default
    # stream or another one: the host polls past its first millisecond of spinning and still gets the verdict,
    # not an error.
    with torch.cuda.stream(torch.cuda.Stream() if stream == "side" else torch.cuda.default_stream()):
        _check_behind_a_long_queue(reduction)


def _check_behind_a_long_queue(reduction):
    x = torch.randn(4, 10, device="cuda", requires_grad=True)
    for targets, raises in (([1, 2, 3, 4], False), ([1, 2, 3, 44], True)):
        _long_queue()
        start = time.perf_counter()
        if raises:
            with pytest.raises(ValueError, match="class index 44"):
                persample.cross_entropy(x, torch.tensor(targets, device="cuda"), reduction=reduction)
        else:
            persample.cross_entropy(x, torch.tensor(targets, device="cuda"), reduction=reduction).sum().backward()
        assert time.perf_counter() - start > 2e-3  # the queue was long enough to leave the first spin
    _long_queue()
    with pytest.raises(ValueError, match="class index 10"):
        persample.cross_entropy_with_grad(x, torch.tensor([10, 2, 3, 4], device="cuda"))
    torch.cuda.current_stream().synchronize()
    assert torch.isfinite(x.grad).all()
