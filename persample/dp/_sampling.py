"""Poisson sampling for DP-SGD: every example joins every batch independently with probability ``sample_rate``.

The accountants (:mod:`persample.dp._accounting`) assume exactly this sampling, so batches have a random size
``Binomial(n, sample_rate)`` and can be empty. Index in-memory tensors with the yielded indices
(``x[idx]`` handles an empty ``idx``); split a large batch into physical batches with
``idx.split(max_physical_batch_size)`` and accumulate them into one :class:`persample.DPOptimizer` step.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

from persample.checks import check_sample_rate


class PoissonSampler:
    """Yields ``steps`` batches of example indices, each a sorted ``int64`` tensor ``(batch_size,)``.

    Args:
        num_examples: dataset size ``n`` >= 1.
        sample_rate: inclusion probability in (0, 1]; the expected batch size is ``sample_rate * n``.
        steps: batches per pass; default ``round(1 / sample_rate)``, one epoch in expectation.
        generator: seeded ``torch.Generator`` for reproducible batches.

    Raises:
        ValueError: ``num_examples`` < 1, ``sample_rate`` outside (0, 1], ``steps`` < 1.
    """

    def __init__(self, num_examples: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None):
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
        check_sample_rate(sample_rate)
        steps = round(1 / sample_rate) if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.num_examples = num_examples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.steps):
            included = torch.rand(self.num_examples, generator=self.generator) < self.sample_rate
            yield included.nonzero().flatten()
