"""Lower bounds on epsilon from a membership test on canaries, each with the confidence it holds at.

An audit inserts ``m`` canaries, each independently with probability 1/2, and scores each one from what the
training released; a higher score says "inserted". A mechanism that is ``(eps, delta)``-DP limits every
test's false positive rate ``FPR`` and false negative rate ``FNR`` (Kairouz et al. 2015)::

    1 - FNR <= e^eps * FPR + delta        and        1 - FPR <= e^eps * FNR + delta,

so measured rates give ``eps >= log((1 - delta - FNR) / FPR)``. Three bounds, from the weakest assumption up:

* :func:`clopper_pearson_bound` (Nasr et al. 2023, section 3): upper confidence bounds on FPR and FNR
  (Clopper-Pearson, exact binomial) put into the inequality. Assumes only that the canaries' (inserted,
  score) pairs are independent and identically distributed, which holds for the white-box audit (each canary
  owns a coordinate, its own noise and its own coin). The threshold is chosen on one half of the canaries and
  the bound computed on the other, so that choosing the best threshold does not overstate the bound (taking
  the best of many thresholds on the same data does, as TensorFlow Privacy's bound does).
* :func:`gaussian_bound` (Nasr et al. 2023, section 5): the same upper bounds on FPR and FNR, read under the
  assumption that the mechanism's trade-off curve is Gaussian, ``FNR = Phi(Phi^-1(1 - FPR) - mu)`` (Dong, Roth
  and Su 2019, mu-GDP): then ``mu >= Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub)``, and the smallest epsilon a mu-GDP
  mechanism can claim at ``delta`` is the bound. Tighter, and exact for DP-SGD without subsampling (the noisy
  sum of a Gaussian mechanism), approximate (central limit) with it: a claim that passes this bound can still
  be wrong for a mechanism whose curve is not Gaussian.
* :func:`one_run_bound` (Steinke, Nasr and Jagielski 2023, Theorem 5.2): the auditor guesses "in" for the
  ``k`` highest scores and "out" for the ``k`` lowest and abstains on the rest; under ``(eps, delta)``-DP the
  number of right guesses is dominated by a binomial with success rate ``e^eps / (1 + e^eps)``, plus a term
  ``2 m delta`` (times a factor < 1). Needs no independence between canaries (it was made for canaries that
  share a model), only that each is inserted by its own fair coin; ``k`` is chosen from a fixed grid with a
  Bonferroni correction.

All three hold with probability at least ``confidence`` over the canaries' coins and the training's noise.
"""

import math
from typing import NamedTuple

import numpy as np

# Thresholds tried on the choosing half: its score quantiles at these levels, dense towards both tails where
# the bounds live. Fewer candidates than scores keep the choice from fitting the noise of a few extreme scores.
_QUANTILES = np.unique(np.concatenate([np.geomspace(1e-4, 0.5, 40), 1 - np.geomspace(1e-4, 0.5, 40)]))

# Guess counts k tried by the one-run bound (as fractions of the canaries), with a Bonferroni correction.
_GUESS_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5)


class Bound(NamedTuple):
    """One lower bound: ``epsilon`` >= 0 holds with probability ``confidence``; ``detail`` says how it was
    reached (threshold, rates or guesses), for the report."""

    epsilon: float
    confidence: float
    detail: dict


def check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def clopper_pearson_upper(errors: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """The exact one-sided upper ``1 - alpha`` confidence bound on a rate from ``errors`` of ``trials``."""
    errors, trials = np.asarray(errors, dtype=float), np.asarray(trials, dtype=float)
    from scipy import stats  # here, not at import: SciPy's stats is most of a second of `import persample`

    with np.errstate(invalid="ignore"):
        upper = stats.beta.ppf(1 - alpha, errors + 1, trials - errors)
    return np.where(errors >= trials, 1.0, upper)


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """``max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR), 0)``: the epsilon that a test with
    these error rates shows at ``delta`` (both directions of the test)."""
    fpr, fnr = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.maximum(1 - delta - fnr, 0) / fpr)
        other = np.log(np.maximum(1 - delta - fpr, 0) / fnr)
    return np.nan_to_num(np.maximum(np.maximum(one, other), 0.0), nan=0.0, posinf=0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon of a ``mu``-GDP mechanism at ``delta`` (Dong, Roth and Su 2019, Corollary 2.13):
    the root of ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta``; 0 when ``mu`` is that small."""
    if mu <= 0:
        return 0.0
    from scipy import optimize, stats

    def excess(eps: float) -> float:
        return (stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-10))


def gdp_mu(fpr: np.ndarray, fnr: np.ndarray) -> np.ndarray:
    """``Phi^-1(1 - FPR) - Phi^-1(FNR)`` (and the mirrored test), at least 0: the smallest mu of a Gaussian
    trade-off curve that a test with these error rates lies on or under."""
    from scipy import stats

    fpr, fnr = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    with np.errstate(invalid="ignore"):
        one = stats.norm.isf(fpr) - stats.norm.ppf(fnr)
        other = stats.norm.isf(fnr) - stats.norm.ppf(fpr)
    return np.nan_to_num(np.maximum(np.maximum(one, other), 0.0), nan=0.0, posinf=0.0)


def _check_scores(scores, inserted) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float).ravel()
    inserted = np.asarray(inserted).ravel()
    if scores.shape != inserted.shape:
        raise ValueError(f"scores and inserted must have the same length, got {scores.shape[0]} scores and "
                         f"{inserted.shape[0]} flags")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite, got NaN or inf")
    if inserted.dtype != bool and not np.isin(inserted, (0, 1)).all():
        raise ValueError("inserted must hold booleans (or 0/1): was each canary inserted")
    inserted = inserted.astype(bool)
    if inserted.sum() < 2 or (~inserted).sum() < 2:
        raise ValueError(f"need at least 2 inserted and 2 left-out canaries, got {int(inserted.sum())} and "
                         f"{int((~inserted).sum())}")
    return scores, inserted


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random half of ``range(n)`` to choose the threshold on, and the other half to bound with. The
    halves depend on ``n`` and ``seed`` only, never on the scores or on which canaries were inserted."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2:]


def _rates_at(scores: np.ndarray, inserted: np.ndarray, thresholds: np.ndarray):
    """``(false positives, false negatives, negatives, positives)`` of the test ``score >= threshold`` for
    every threshold, by sorting once."""
    neg, pos = np.sort(scores[~inserted]), np.sort(scores[inserted])
    false_pos = len(neg) - np.searchsorted(neg, thresholds, side="left")
    false_neg = np.searchsorted(pos, thresholds, side="left")
    return false_pos, false_neg, len(neg), len(pos)


def _threshold_bound(scores, inserted, delta, confidence, seed, rate_bound) -> Bound:
    """Chooses on the first half the threshold whose bound ``rate_bound(FPR_ub, FNR_ub)`` is largest there, and
    evaluates the bound at that threshold on the second half, ``1 - confidence`` split between FPR and FNR."""
    scores, inserted = _check_scores(scores, inserted)
    check_delta(delta)
    check_confidence(confidence)
    choose, evaluate = _split(len(scores), seed)
    alpha = (1 - confidence) / 2
    candidates = np.unique(np.quantile(scores[choose], _QUANTILES))
    fp, fn, n_neg, n_pos = _rates_at(scores[choose], inserted[choose], candidates)
    if n_neg == 0 or n_pos == 0:
        raise ValueError("the half used to choose the threshold holds only inserted or only left-out canaries: "
                         "use more canaries")
    # Scored as if every candidate had to hold at once (Bonferroni), which penalizes a threshold that looks good
    # on a few extreme scores only; the evaluating half's bound keeps its own level.
    strict = alpha / len(candidates)
    chosen = rate_bound(clopper_pearson_upper(fp, n_neg, strict), clopper_pearson_upper(fn, n_pos, strict))
    threshold = float(candidates[int(np.argmax(chosen))])
    fp, fn, n_neg, n_pos = _rates_at(scores[evaluate], inserted[evaluate], np.array([threshold]))
    if n_neg == 0 or n_pos == 0:
        raise ValueError("the half used for the bound holds only inserted or only left-out canaries: use more "
                         "canaries")
    fpr_ub = float(clopper_pearson_upper(fp, n_neg, alpha)[0])
    fnr_ub = float(clopper_pearson_upper(fn, n_pos, alpha)[0])
    detail = {"threshold": threshold, "false_positives": int(fp[0]), "negatives": n_neg,
              "false_negatives": int(fn[0]), "positives": n_pos, "fpr_upper": fpr_ub, "fnr_upper": fnr_ub}
    return Bound(float(rate_bound(np.array([fpr_ub]), np.array([fnr_ub]))[0]), float(confidence), detail)


def clopper_pearson_bound(scores, inserted, *, delta: float, confidence: float = 0.95, seed: int = 0) -> Bound:
    """The assumption-free lower bound ``log((1 - delta - FNR_ub) / FPR_ub)`` (see the module docstring).

    Args:
        scores: ``(m,)`` one score per canary, higher meaning "inserted".
        inserted: ``(m,)`` bool, whether each canary was inserted.
        delta: the delta of the claim, in (0, 1).
        confidence: the probability in (0, 1) that the bound holds.
        seed: picks the half of the canaries that chooses the threshold (not secret; any fixed value).

    Returns:
        :class:`Bound`, with ``detail`` holding the threshold, the counts and the rate bounds.

    Raises:
        ValueError: lengths that differ, non-finite scores, fewer than 2 canaries on either side, ``delta`` or
            ``confidence`` outside (0, 1).

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> inserted = rng.random(10_000) < 0.5
        >>> bound = clopper_pearson_bound(rng.normal(2.0 * inserted), inserted, delta=1e-5)
        >>> 0 < bound.epsilon < gdp_epsilon(2.0, 1e-5)  # the truth for these Gaussian scores
        True

    References:
        Nasr, Hayes, Steinke, Balle, Tramer, Jagielski, Carlini and Terzis, "Tight auditing of differentially
        private machine learning", USENIX Security 2023.
    """
    return _threshold_bound(scores, inserted, delta, confidence, seed,
                            lambda fpr, fnr: epsilon_from_rates(fpr, fnr, delta))


def gaussian_bound(scores, inserted, *, delta: float, confidence: float = 0.95, seed: int = 0) -> Bound:
    """The lower bound under a Gaussian trade-off curve: ``mu_lb`` from the FPR and FNR upper bounds, then the
    smallest epsilon of a ``mu_lb``-GDP mechanism at ``delta``. Arguments, result and errors as
    :func:`clopper_pearson_bound`; ``detail["mu"]`` is ``mu_lb``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> inserted = rng.random(10_000) < 0.5
        >>> bound = gaussian_bound(rng.normal(1.0 * inserted), inserted, delta=1e-5)
        >>> round(gdp_epsilon(1.0, 1e-5), 2), 3.0 < bound.epsilon < gdp_epsilon(1.0, 1e-5)
        (4.38, True)

    References:
        Nasr et al. 2023 (above), section 5; Dong, Roth and Su, "Gaussian differential privacy", JRSS B 2022.
    """
    bound = _threshold_bound(scores, inserted, delta, confidence, seed, gdp_mu)
    mu = bound.epsilon
    return Bound(gdp_epsilon(mu, delta), bound.confidence, {**bound.detail, "mu": mu})


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under ``(epsilon, delta)``-DP, of at least ``correct`` right guesses out of ``guesses``
    on ``m`` canaries (Steinke, Nasr and Jagielski 2023, Theorem 5.2)::

        P[Binom(r, p) >= v] + 2 m delta max_{i = 1..v} P[v - i <= Binom(r, p) < v] / i,   p = e^eps / (1 + e^eps)
    """
    from scipy import stats

    p = 1 / (1 + math.exp(-epsilon))
    tail = stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(tail)
    i = np.arange(1, correct + 1)
    below = stats.binom.cdf(correct - 1, guesses, p) - stats.binom.cdf(correct - 1 - i, guesses, p)
    return float(min(1.0, tail + 2 * m * delta * np.max(below / i)))


def one_run_epsilon(m: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """The largest epsilon whose p-value (:func:`one_run_p_value`) is still <= ``alpha``: every larger one is
    rejected at level ``alpha``. 0 when none is rejected."""
    if guesses == 0 or one_run_p_value(m, guesses, correct, 0.0, delta) > alpha:
        return 0.0
    high = 1.0
    while one_run_p_value(m, guesses, correct, high, delta) <= alpha:
        if high > 100:
            return math.inf
        high *= 2
    low = high / 2 if high > 1 else 0.0
    from scipy import optimize

    return float(optimize.brentq(lambda eps: one_run_p_value(m, guesses, correct, eps, delta) - alpha,
                                 low, high, xtol=1e-6))


def one_run_bound(scores, inserted, *, delta: float, confidence: float = 0.95) -> Bound:
    """The one-run lower bound of Steinke, Nasr and Jagielski (see the module docstring): guesses on the ``k``
    highest ("in") and ``k`` lowest ("out") scores, ``k`` from a fixed grid of fractions of ``m`` with a
    Bonferroni correction. Arguments, result and errors as :func:`clopper_pearson_bound`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> inserted = rng.random(10_000) < 0.5
        >>> 0 < one_run_bound(rng.normal(3.0 * inserted), inserted, delta=1e-6).epsilon < gdp_epsilon(3.0, 1e-6)
        True

    References:
        Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023.
    """
    scores, inserted = _check_scores(scores, inserted)
    check_delta(delta)
    check_confidence(confidence)
    m = len(scores)
    ks = sorted({max(1, int(f * m)) for f in _GUESS_FRACTIONS if 2 * max(1, int(f * m)) <= m})
    alpha = (1 - confidence) / len(ks)
    order = np.argsort(scores, kind="stable")
    best = Bound(0.0, float(confidence), {"guesses": 0, "correct": 0, "m": m})
    for k in ks:
        correct = int(inserted[order[-k:]].sum() + (~inserted[order[:k]]).sum())
        epsilon = one_run_epsilon(m, 2 * k, correct, delta, alpha)
        if epsilon > best.epsilon:
            best = Bound(epsilon, float(confidence), {"guesses": 2 * k, "correct": correct, "m": m})
    return best
