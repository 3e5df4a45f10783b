"""Empirical privacy auditing: lower bounds on the epsilon a DP-SGD run really has, from canaries that go
through the library's own training path.

* :mod:`~persample.audit._bounds` — :func:`clopper_pearson_bound`, :func:`gaussian_bound`,
  :func:`one_run_bound` (each with the assumption it needs), :func:`gdp_epsilon`, :class:`Bound`.
* :mod:`~persample.audit._canaries` — :class:`CanaryModel` (a parameter block only the canaries use),
  :class:`CanaryScores` (the likelihood-ratio score of each canary).
* :mod:`~persample.audit._run` — :func:`audit_dp_sgd`, :class:`AuditResult`.
"""

from persample.audit._bounds import Bound, clopper_pearson_bound, gaussian_bound, gdp_epsilon, one_run_bound
from persample.audit._canaries import CanaryModel, CanaryScores
from persample.audit._run import AuditResult, audit_dp_sgd, bounds, largest_clopper_pearson_bound

__all__ = [
    "AuditResult",
    "Bound",
    "CanaryModel",
    "CanaryScores",
    "audit_dp_sgd",
    "bounds",
    "clopper_pearson_bound",
    "gaussian_bound",
    "gdp_epsilon",
    "largest_clopper_pearson_bound",
    "one_run_bound",
]
