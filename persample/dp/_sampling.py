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
        >>> import torch
        >>> import persample
        >>> sampler = persample.PoissonSampler(1000, 0.01, generator=torch.Generator().manual_seed(0))
        >>> len(sampler), sampler.expected_batch_size  # round(1 / 0.01) batches: one epoch in expectation
        (100, 10.0)
        >>> sizes = [len(batch) for batch in sampler]  # each Binomial(1000, 0.01), possibly 0
        >>> 5 < sum(sizes) / len(sizes) < 15
        True
        >>> x = torch.randn(1000, 4)
        >>> batch = next(iter(persample.PoissonSampler(1000, 0.01, secure_mode=True)))  # from os.urandom
        >>> x[batch].shape[1:], batch.dtype
        (torch.Size([4]), torch.int64)

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


class DistributedPoissonSampler(PoissonSampler):
    """One Poisson sample of the whole dataset per step, each rank yielding its own part of it.

    The examples are partitioned by rank (``rank, rank + world_size, rank + 2 * world_size, ...``). Every
    rank draws the inclusion of all ``num_examples`` examples, exactly as :class:`PoissonSampler` does, and
    keeps those of its partition. An example is decided by its owner's draw only, so the union over ranks
    is a Poisson sample of the dataset whatever the ranks' generators are, and no example is on two ranks in
    one step. With the same seed on every rank the union is the very batch that :class:`PoissonSampler`
    with that seed yields in one process (the distributed run samples as the single-process run does). A
    rank draws ``num_examples`` values per step where its partition alone would need ``1 / world_size`` of
    them: a few milliseconds per step for a million examples, for that guarantee.

    Every rank yields ``steps`` batches (``round(1 / sample_rate)`` by default, the same on every rank), an
    empty ``(0,)`` tensor when none of its examples is in, so that all ranks take part in every step's
    collectives. The expected batch size (``sample_rate * num_examples``) is the global one, the divisor of
    :class:`persample.DistributedDPOptimizer`.

    Args:
        num_examples, sample_rate, steps, generator: as :class:`PoissonSampler`.
        rank, world_size: this process's place; default those of the default process group
            (``torch.distributed``), which must then be initialized.
        **options: further options of :class:`PoissonSampler`.

    Raises:
        ValueError: as :class:`PoissonSampler`; ``world_size`` < 1, ``rank`` outside ``[0, world_size)``, or
            no ``rank``/``world_size`` and no initialized process group.

    Examples:
        >>> import torch
        >>> import persample
        >>> rank0, rank1 = [list(persample.DistributedPoissonSampler(10, 0.5, rank=rank, world_size=2,
        ...                                                          generator=torch.Generator().manual_seed(0)))
        ...                 for rank in (0, 1)]  # as on two processes, the same seed on each
        >>> all(int(i) % 2 == 1 for batch in rank1 for i in batch)  # rank 1 owns the odd examples
        True
        >>> single = persample.PoissonSampler(10, 0.5, generator=torch.Generator().manual_seed(0))
        >>> all(torch.equal(torch.cat([a, b]).sort().values, whole) for a, b, whole in zip(rank0, rank1, single))
        True

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (Poisson-sampled lots).
    """

    def __init__(self, num_examples: int, sample_rate: float, *, rank: int | None = None,
                 world_size: int | None = None, **options):
        super().__init__(num_examples, sample_rate, **options)
        if rank is None or world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("give rank and world_size, or initialize the default process group "
                                 "(torch.distributed.init_process_group, as torchrun's scripts do) first")
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Tensor]:
        for idx in super().__iter__():
            yield idx[idx % self.world_size == self.rank]
