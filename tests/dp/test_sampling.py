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
