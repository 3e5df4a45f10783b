"""benchmarks/cpu_memory.py counts what a step allocates and holds at once on the CPU: exact bytes, views and
in-place ops not counted twice, freed storage given back, what existed before the step left out."""

import sys

import pytest
import torch

from tests.torchrun import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_memory import step_peak  # noqa: E402

MiB = 1 << 20


def test_peak_counts_what_is_alive_at_once():
    before = torch.ones(MiB // 4)  # 1 MiB of float32, made before the step: not counted

    def step():
        a = torch.zeros(MiB // 4)  # 1 MiB
        b = a.view(2, -1).t()  # a view: no new storage
        b.add_(1)  # in place: no new storage
        c = torch.ones(MiB // 2)  # 2 MiB: 3 alive
        del a, b, c
        d = torch.empty(MiB // 8, dtype=torch.float64)  # 1 MiB alone
        return before + 1, d  # 1 MiB more: 2 alive at the end

    memory = step_peak(step, frames=True)
    assert memory.peak == 3 * MiB
    assert sum(memory.at_peak.values()) == 3 * MiB
    assert any(where.startswith("ones @") for where in memory.at_peak)


def test_autograd_storage_of_the_backward_is_counted():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)

    def step():
        (x @ w).relu().sum().backward()  # the product and relu's output, then their gradients

    memory = step_peak(step)
    assert memory.peak >= 2 * x.numel() * 4  # the (256, 64) product and its relu at least
    assert memory.current == w.numel() * 4  # at the end: w.grad alone


@pytest.mark.parametrize("frames", [False, True])
def test_nothing_is_left_counted_after_a_step_whose_outputs_died(frames):
    memory = step_peak(lambda: [torch.randn(1000) for _ in range(3)], frames)
    assert memory.peak == 3 * 4000 and memory.current == 0
