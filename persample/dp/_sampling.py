"""Poisson sampling for DP-SGD: every example joins every batch independently with probability ``sample_rate``.

The accountants (:mod:`persample.dp._accounting`) assume exactly this sampling, so batches have a random size
``Binomial(n, sample_rate)`` and can be empty. Index in-memory tensors with the yielded indices
(``x[idx]`` handles an empty ``idx``); split a large batch into physical batches with
``idx.split(max_physical_batch_size)`` and accumulate them into one :class:`persample.DPOptimizer` step.

The accountant's amplification by subsampling assumes that nobody can tell which examples were in a batch. A
seeded ``torch.Generator`` (or the global one) makes the batches reproducible, and predictable to whoever knows
the seed or the state; ``secure_mode=True`` draws every inclusion from the operating system's CSPRNG instead
(``os.urandom``, 53 bits per example and step, as the noise in secure mode), as Opacus's ``secure_mode`` does.
Example ``i`` joins when its uniform ``u_i`` on ``(0, 1]`` is below ``sample_rate``: a probability within
``2**-53`` of ``sample_rate``.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

from persample.checks import check_sample_rate
from persample.dp._noise import os_uniform


class PoissonSampler:
    """Yields ``steps`` batches of example indices, each a sorted ``int64`` tensor ``(batch_size,)``.

    Args:
        num_examples: dataset size ``n`` >= 1.
        sample_rate: inclusion probability in (0, 1]; the expected batch size is ``sample_rate * n``.
        steps: batches per pass; default ``round(1 / sample_rate)``, one epoch in expectation.
        generator: seeded ``torch.Generator`` for reproducible batches (not secret: see the module docstring).
        secure_mode: draw the batches from the OS CSPRNG (not reproducible, not predictable).

    Raises:
        ValueError: ``num_examples`` < 1, ``sample_rate`` outside (0, 1], ``steps`` < 1, ``generator`` together
            with ``secure_mode``.

    Examples:
        >>> sampler = PoissonSampler(1000, 0.01, steps=3, secure_mode=True)
        >>> [len(batch) for batch in sampler]  # Binomial(1000, 0.01) each, different every run
        [12, 7, 9]

    References:
        Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019 (the
        sampling the accountants assume).
    """

    def __init__(self, num_examples: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False):
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
        check_sample_rate(sample_rate)
        steps = round(1 / sample_rate) if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True draws the batches from the OS CSPRNG: pass generator=None")
        self.num_examples = num_examples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator
        self.secure_mode = secure_mode

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.steps):
            if self.secure_mode:
                included = os_uniform(self.num_examples) < self.sample_rate
            else:
                included = torch.rand(self.num_examples, generator=self.generator) < self.sample_rate
            yield included.nonzero().flatten()
