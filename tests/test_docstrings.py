"""The ``Examples:`` of the public entry points' docstrings run, on the CPU through PyTorch (not the Triton
interpreter), and each entry point has them."""

import doctest

import pytest

import persample
import persample.models

ENTRY_POINTS = {
    "cross_entropy": persample.cross_entropy,
    "cross_entropy_with_grad": persample.cross_entropy_with_grad,
    "linear_cross_entropy": persample.linear_cross_entropy,
    "models.GPT": persample.models.GPT,
    "models.CNN": persample.models.CNN,
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_examples_run(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path: fast, and the same results
    tests = [t for t in doctest.DocTestFinder().find(ENTRY_POINTS[name], name) if t.examples]
    assert tests, f"{name} has no Examples"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
