"""The bounds on their own: closed forms, and on simulated audits of mechanisms with a known epsilon each bound
exceeds the truth no more often than its confidence allows.

Each coverage test runs ``N`` independent simulated audits at confidence ``1 - alpha`` and counts the audits whose
bound exceeds the true epsilon. A valid bound exceeds it with probability at most ``alpha`` per audit, so the
count is at most ``Binomial(N, alpha)`` and exceeds ``binom.ppf(1 - 1e-4, N, alpha)`` with probability below
1e-4: that is the false-failure rate of each coverage test. The mechanisms are chosen so that the bounds are
nearly tight (a bound without its confidence correction, the point estimate, exceeds the truth in about half of
the audits and would fail), and each test also checks that the bounds are not vacuous.
"""

import math

import numpy as np
import pytest
from scipy import stats

from persample.audit import clopper_pearson_bound, gaussian_bound, gdp_epsilon, one_run_bound
from persample.audit._bounds import epsilon_from_rates, gdp_mu, one_run_p_value

DELTA = 1e-5
FALSE_FAILURE = 1e-4


def randomized_response(rng, m: int, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an ``(epsilon, 0)``-DP mechanism that is tight at one threshold: each canary's score is its
    true membership with probability ``e^eps / (1 + e^eps)``, flipped otherwise."""
    inserted = rng.random(m) < 0.5
    keep = rng.random(m) < 1 / (1 + math.exp(-epsilon))
    return np.where(keep, inserted, ~inserted).astype(float), inserted


def gaussian_scores(rng, m: int, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a ``mu``-GDP mechanism: ``N(mu, 1)`` for inserted canaries, ``N(0, 1)`` for the others."""
    inserted = rng.random(m) < 0.5
    return rng.normal(mu * inserted), inserted


def most_exceedances(audits: int, alpha: float) -> int:
    return int(stats.binom.ppf(1 - FALSE_FAILURE, audits, alpha))


def test_gdp_epsilon_solves_the_gdp_delta():
    for mu in (0.3, 1.0, 3.0):
        eps = gdp_epsilon(mu, DELTA)
        delta = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        assert delta == pytest.approx(DELTA, rel=1e-6)
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-3)
    assert gdp_epsilon(0.0, DELTA) == 0.0


def test_rates_to_epsilon_and_mu():
    assert epsilon_from_rates(0.01, 0.5, 0.0) == pytest.approx(math.log(50))
    assert epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(math.log(50))  # the mirrored test
    assert epsilon_from_rates(0.6, 0.6, 0.0) == 0.0
    assert gdp_mu(stats.norm.sf(1.0), stats.norm.cdf(-1.0)) == pytest.approx(2.0)


def test_one_run_p_value_without_delta_is_the_binomial_tail():
    p = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, p))
    assert one_run_p_value(100, 50, 40, 1.0, 1e-3) > one_run_p_value(100, 50, 40, 1.0, 0.0)


@pytest.mark.parametrize("bound", [clopper_pearson_bound, one_run_bound])
def test_assumption_free_bounds_cover_randomized_response(bound):
    rng = np.random.default_rng(1)
    epsilon, alpha, audits = 1.0, 0.1, 200
    found = np.array([bound(*randomized_response(rng, 2000, epsilon), delta=DELTA, confidence=1 - alpha).epsilon
                      for _ in range(audits)])
    assert (found > epsilon).sum() <= most_exceedances(audits, alpha)
    assert found.mean() > 0.5 * epsilon


def test_gaussian_bound_covers_a_gaussian_mechanism():
    rng = np.random.default_rng(2)
    mu, alpha, audits = 1.0, 0.1, 200
    truth = gdp_epsilon(mu, DELTA)
    found = np.array([gaussian_bound(*gaussian_scores(rng, 2000, mu), delta=DELTA, confidence=1 - alpha).epsilon
                      for _ in range(audits)])
    assert (found > truth).sum() <= most_exceedances(audits, alpha)
    assert found.mean() > 0.6 * truth


def test_point_estimate_would_fail_the_coverage_test():
    # The same count on the uncorrected rates (confidence -> 0): a bound without its correction is caught.
    rng = np.random.default_rng(3)
    alpha, audits = 0.1, 200
    found = np.array([clopper_pearson_bound(*randomized_response(rng, 2000, 1.0), delta=DELTA,
                                            confidence=1e-6).epsilon for _ in range(audits)])
    assert (found > 1.0).sum() > most_exceedances(audits, alpha)


@pytest.mark.parametrize("bound", [clopper_pearson_bound, gaussian_bound, one_run_bound])
def test_bad_input(bound):
    scores, inserted = gaussian_scores(np.random.default_rng(0), 100, 1.0)
    with pytest.raises(ValueError, match="delta must be in"):
        bound(scores, inserted, delta=0.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        bound(scores, inserted, delta=DELTA, confidence=1.0)
    with pytest.raises(ValueError, match="same length"):
        bound(scores[:-1], inserted, delta=DELTA)
    with pytest.raises(ValueError, match="finite"):
        bound(np.full(100, np.nan), inserted, delta=DELTA)
    with pytest.raises(ValueError, match="at least 2 inserted"):
        bound(scores, np.ones(100, dtype=bool), delta=DELTA)
