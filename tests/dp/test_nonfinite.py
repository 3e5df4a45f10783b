"""A non-finite example never reaches the parameters: issue 17's first row end to end (per_sample_grads ->
clip_per_sample -> DPOptimizer.accumulate -> step), and DPOptimizer.accumulate refusing a non-finite sum."""

import pytest
import torch
from torch import nn

import persample


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


def _setup():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model.named_parameters(),
                               noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6.0, sample_rate=0.1)
    return model, dp, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_poisoned_example_is_dropped_and_the_step_is_that_of_the_others(poison):
    model, dp, x, y = _setup()
    clean = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    clean.load_state_dict(model.state_dict())
    x[2, 1] = poison
    grads = persample.per_sample_grads(model, x, y)
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[2\]"):
        summed = persample.clip_per_sample(grads, 0.5)
    assert summed.nonfinite == 1
    dp.accumulate(summed, len(y))
    dp.step()
    # The same step without example 2 (noise 0, the same expected batch size).
    keep = [0, 1, 3, 4, 5]
    reference = torch.optim.SGD(clean.parameters(), lr=0.5)
    ref_sum = persample.clip_per_sample(persample.per_sample_grads(clean, x[keep], y[keep]), 0.5)
    for name, p in clean.named_parameters():
        p.grad = ref_sum[name] / 6.0
    reference.step()
    for (name, p), q in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_accumulate_refuses_a_nonfinite_sum_and_keeps_what_it_had(poison):
    model, dp, x, y = _setup()
    good = persample.clip_per_sample(persample.per_sample_grads(model, x, y), 0.5)
    dp.accumulate(good, len(y))
    bad = {name: g.clone() for name, g in good.items()}
    bad["2.bias"][1] = poison
    with pytest.raises(ValueError, match=r"NaN or inf values in \['2.bias'\].*nothing was accumulated"):
        dp.accumulate(bad, len(y))
    assert dp.num_examples == 6
    before = [p.clone() for p in model.parameters()]
    dp.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(b - p, 0.5 * good[next(n for n, q in model.named_parameters() if q is p)] / 6.0)


def test_clipped_sums_skip_the_finiteness_sync_only_where_their_bound_fits_the_dtype(monkeypatch):
    """``_add(clipped=True)`` (make_private's engine sums) looks at the sums only when ``num_examples *
    max_grad_norm`` could overflow a dtype involved: float16 parameters with a large enough batch."""
    from persample.dp import _optimizer

    calls = []
    real = _optimizer._nonfinite
    monkeypatch.setattr(_optimizer, "_nonfinite", lambda *a: calls.append(1) or real(*a))
    for dtype, num_examples, looked in [(torch.float32, 1000, False), (torch.float16, 100, False),
                                        (torch.float16, 200_000, True)]:
        model = nn.Linear(3, 2).to(dtype)
        dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8.0, sample_rate=0.1)
        calls.clear()
        dp._add({n: torch.zeros_like(p) for n, p in model.named_parameters()}, num_examples, owned=True, clipped=True)
        assert bool(calls) == looked, (dtype, num_examples)
    bad = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN or inf"):
        dp._add(bad, 200_000, owned=True, clipped=True)
    with pytest.raises(ValueError, match="NaN or inf"):  # the public accumulate always looks
        persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                              noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8.0,
                              sample_rate=0.1).accumulate(bad, 4)
