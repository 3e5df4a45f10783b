"""persample.PoissonSampler: independent inclusion with probability sample_rate; empty batches happen."""

import pytest
import torch

import persample


def test_batches_are_poisson_samples():
    # Total inclusions over 400 batches of 50 examples at q = 0.1 is Binomial(20000, 0.1): mean 2000, sd 42.4.
    # |total - 2000| < 5 sd fails a correct sampler with probability < 6e-7.
    sampler = persample.PoissonSampler(50, 0.1, steps=400, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(sampler) == len(batches) == 400
    assert sampler.expected_batch_size == pytest.approx(5.0)
    total = sum(len(b) for b in batches)
    assert abs(total - 2000) < 5 * (20000 * 0.1 * 0.9) ** 0.5
    for batch in batches:
        assert batch.dtype == torch.int64 and batch.ndim == 1
        assert torch.equal(batch, batch.unique(sorted=True))
        assert len(batch) == 0 or (batch.min() >= 0 and batch.max() < 50)
    assert len({len(b) for b in batches}) > 3, "batch sizes vary"
    assert any(len(b) == 0 for b in batches), "P(empty) = 0.9**50 = 0.5%: about 2 of 400"


def test_default_steps_is_one_epoch_and_seed_reproduces():
    assert len(persample.PoissonSampler(100, 0.03)) == 33
    draw = lambda: [b.tolist() for b in persample.PoissonSampler(30, 0.2, generator=torch.Generator().manual_seed(4))]
    assert draw() == draw()


@pytest.mark.parametrize("arguments, match", [
    ((0, 0.1), "num_examples"),
    ((10, 0.0), "sample_rate"),
    ((10, 1.5), "sample_rate"),
])
def test_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        persample.PoissonSampler(*arguments)
    with pytest.raises(ValueError, match="steps"):
        persample.PoissonSampler(10, 0.1, steps=0)


def test_secure_mode_draws_from_the_os_not_from_a_seed():
    # Two secure samplers with PyTorch's generators seeded alike: 20 batches of 1000 examples at q = 0.1 would be
    # equal with probability far below 1e-100 if the draws were independent.
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append([b.tolist() for b in persample.PoissonSampler(1000, 0.1, steps=20, secure_mode=True)])
    assert draws[0] != draws[1]
    with pytest.raises(ValueError, match="secure_mode=True draws the batches from the OS CSPRNG"):
        persample.PoissonSampler(10, 0.1, generator=torch.Generator(), secure_mode=True)


def test_secure_mode_inclusion_is_bernoulli():
    """200 examples, 500 batches at q = 0.1. The total is Binomial(100000, 0.1): |z| < 5 fails a correct sampler
    with probability 5.7e-7. Each example's count is Binomial(500, 0.1) (variance 45), independent across
    examples: the sum of their squared z-scores, about chi-square with 200 degrees of freedom, has a p-value
    below 1e-6 with probability 1e-6. Together: false failure below 2e-6."""
    from scipy import stats as scipy_stats
    n, q, steps = 200, 0.1, 500
    counts = torch.zeros(n, dtype=torch.float64)
    for batch in persample.PoissonSampler(n, q, steps=steps, secure_mode=True):
        counts[batch] += 1
    total = n * steps
    assert abs(float(counts.sum()) - q * total) < 5 * (total * q * (1 - q)) ** 0.5
    chi2 = float(((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum())
    assert scipy_stats.chi2.sf(chi2, n) > 1e-6
