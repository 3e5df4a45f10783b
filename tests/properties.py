"""Hypothesis settings shared by the property-based suites (``test_*_properties.py``).

Each suite runs a fixed number of examples, so that CI time stays bounded: the suite's own default, or
``PERSAMPLE_HYPOTHESIS_EXAMPLES`` when set (a larger budget for a longer search, e.g. before a release). With
``CI`` set the examples are derandomized (the same every run, so a red CI is reproducible and never flaky) and
nothing is written to hypothesis's example database.
"""

import os

from hypothesis import HealthCheck, settings


def budget(default: int) -> settings:
    """Settings for a suite whose examples cost enough that ``default`` of them is its CI budget."""
    in_ci = bool(os.environ.get("CI"))
    return settings(
        max_examples=int(os.environ.get("PERSAMPLE_HYPOTHESIS_EXAMPLES", default)),
        derandomize=in_ci,
        database=None if in_ci else settings.default.database,
        deadline=None,  # the interpreter's first launch of a kernel compiles nothing but still takes seconds
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
