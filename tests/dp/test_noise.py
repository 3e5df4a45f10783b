"""persample.dp._noise: the Gaussian noise has mean 0 and the stated std, from a generator or the OS CSPRNG.

Statistical tests, with their false-failure rates (the chance that a correct sampler fails them):
for n draws x of N(0, s**2), sum(x**2) / s**2 is chi-square with n degrees of freedom and sum(x) / (s sqrt n)
is standard normal. With n = 200_000 the chi-square is normal to within 1e-3 in its tails, so each
two-sided z-test at |z| < 4.892 fails with probability 1e-6, and the Kolmogorov-Smirnov test at p > 1e-6
with probability 1e-6: at most 3e-6 per test function (union bound).
"""

import pytest
import torch
from scipy import stats

import persample

N = 200_000
Z_LIMIT = 4.892  # two-sided normal quantile for alpha = 1e-6
ALPHA = 1e-6


def assert_gaussian(x: torch.Tensor, std: float) -> None:
    """Fails a correct N(0, std**2) sample with probability <= 3e-6 (see the module docstring)."""
    x = x.double().reshape(-1)
    n = x.numel()
    z_variance = ((x / std).square().sum() - n) / (2 * n) ** 0.5
    z_mean = x.sum() / (std * n ** 0.5)
    assert abs(float(z_variance)) < Z_LIMIT, f"variance off: z = {float(z_variance):.2f}"
    assert abs(float(z_mean)) < Z_LIMIT, f"mean off: z = {float(z_mean):.2f}"
    assert stats.kstest((x / std).numpy(), "norm").pvalue > ALPHA


@pytest.mark.parametrize("secure_mode", [False, True])
@pytest.mark.parametrize("std", [0.3, 2.5])
def test_gaussian_noise_has_the_stated_std(secure_mode, std):
    generator = None if secure_mode else torch.Generator().manual_seed(1)
    x = persample.gaussian_noise((N,), std, dtype=torch.float64, generator=generator, secure_mode=secure_mode)
    assert x.shape == (N,) and x.dtype == torch.float64
    assert_gaussian(x, std)


def test_add_noise_keeps_shapes_dtypes_and_adds_independent_noise():
    grads = {"w": torch.ones(400, 500), "b": torch.zeros(3, dtype=torch.float64)}
    noisy = persample.add_noise(grads, 0.5, generator=torch.Generator().manual_seed(0))
    assert {k: (v.shape, v.dtype) for k, v in noisy.items()} == {k: (v.shape, v.dtype) for k, v in grads.items()}
    assert_gaussian(noisy["w"] - 1.0, 0.5)


def test_zero_std_is_exactly_zero_and_seeds_reproduce():
    assert persample.gaussian_noise((5,), 0.0).abs().max() == 0
    draw = lambda: persample.gaussian_noise((5,), 1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw(), draw())
    secure = persample.gaussian_noise((5,), 1.0, secure_mode=True)
    assert not torch.equal(secure, persample.gaussian_noise((5,), 1.0, secure_mode=True))


@pytest.mark.parametrize("std", [-1.0, float("inf"), float("nan")])
def test_bad_std(std):
    with pytest.raises(ValueError, match="std"):
        persample.gaussian_noise((3,), std)


def test_secure_mode_refuses_a_generator():
    with pytest.raises(ValueError, match="generator=None"):
        persample.gaussian_noise((3,), 1.0, generator=torch.Generator(), secure_mode=True)
