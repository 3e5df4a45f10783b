"""Data loading for DP-SGD: Poisson-sampled logical batches over any map-style dataset, and physical batches.

:class:`DPDataLoader` is a ``torch.utils.data.DataLoader`` whose batch sampler includes every example in every
batch independently with probability ``sample_rate`` (what the accountants assume; see
:class:`persample.PoissonSampler`), with the dataset's own ``collate_fn``. Such a batch can be empty, where
``default_collate`` (and most collate functions) fail on an empty list; the loader then collates example 0
once (and twice, to tell per-example lists from structure) and keeps each tensor's first zero rows and none of
a per-example list's items, so an empty batch has the structure, dtypes and trailing shapes of a real one.

:class:`BatchMemoryManager` splits each logical batch into physical batches of at most
``max_physical_batch_size`` examples and tells the optimizer which physical batch ends a logical one, so the
optimizer steps (and adds noise) once per logical batch. The signal travels with the batch itself: the
splitting sampler queues one flag per physical batch and the iterator pops it as it hands that batch out,
so prefetching workers (which run the sampler ahead) cannot shift it.
"""

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from persample.checks import check_sample_rate
from persample.dp._sampling import PoissonSampler


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` Poisson-sampled batches of indices into ``range(num_examples)`` as sorted lists.

    Args:
        num_examples: dataset size ``n`` >= 1.
        sample_rate: inclusion probability in (0, 1].
        steps: batches per pass (default ``round(1 / sample_rate)``).
        generator: seeded ``torch.Generator`` (None: PyTorch's global generator).
        secure_mode: draw the inclusions from the OS CSPRNG (``os.urandom``), never from a seedable generator.

    Raises:
        ValueError: as :class:`persample.PoissonSampler`, or ``generator`` with ``secure_mode``.
    """

    def __init__(self, num_examples: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False):
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True samples from the OS CSPRNG: pass generator=None")
        self.sampler = PoissonSampler(num_examples, sample_rate, steps=steps, generator=generator)
        self.secure_mode = secure_mode

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def generator(self) -> torch.Generator | None:
        return self.sampler.generator

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.secure_mode:
            for idx in self.sampler:
                yield idx.tolist()
            return
        n, rate = self.sampler.num_examples, self.sampler.sample_rate
        for _ in range(len(self.sampler)):
            bits = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
            uniform = ((bits >> 11) & ((1 << 53) - 1)).double() * 2.0 ** -53  # 53 random bits, in [0, 1)
            yield (uniform < rate).nonzero().flatten().tolist()


class _EmptySafeCollate:
    """``collate_fn`` that gives an empty batch the structure of a real one (see the module docstring)."""

    def __init__(self, collate_fn: Callable[[list], Any], dataset: Dataset):
        self.collate_fn, self.dataset = collate_fn, dataset
        self._empty = None

    def __call__(self, batch: list):
        if batch:
            return self.collate_fn(batch)
        if self._empty is None:
            example = self.dataset[0]
            self._empty = _emptied(self.collate_fn([example]), self.collate_fn([example, example]))
        return self._empty


def _emptied(one, two):
    """The batch of one example with no example left: tensors cut to 0 rows, and lists that hold one item per
    example (those of twice the length in the batch of two) emptied."""
    if isinstance(one, Tensor):
        return one[:0]
    if isinstance(one, dict):
        return type(one)({key: _emptied(value, two[key]) for key, value in one.items()})
    if isinstance(one, (list, tuple)):
        if len(one) == 1 and len(two) == 2:
            return type(one)()
        items = [_emptied(a, b) for a, b in zip(one, two, strict=True)]
        return type(one)(*items) if hasattr(one, "_fields") else type(one)(items)
    return one


class DPDataLoader(DataLoader):
    """A ``DataLoader`` over a map-style ``dataset`` with Poisson sampling (variable, possibly empty batches).

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
        sample_rate: inclusion probability in (0, 1]; the expected batch size is ``sample_rate * len(dataset)``.
        steps: batches per epoch (default ``round(1 / sample_rate)``).
        collate_fn: the dataset's collate function (default ``default_collate``).
        generator: seeded ``torch.Generator`` for the sampling.
        secure_mode: sample from the OS CSPRNG.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> import persample
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> loader = persample.DPDataLoader(data, sample_rate=16 / 64, generator=torch.Generator().manual_seed(0))
        >>> len(loader), loader.expected_batch_size
        (4, 16.0)
        >>> for xb, yb in loader:  # len(xb) ~ Binomial(64, 1/4) each, possibly 0
        ...     assert xb.shape[1:] == (4,) and len(xb) == len(yb)
        >>> empty = persample.DPDataLoader(data, sample_rate=1e-9, steps=1, generator=torch.Generator().manual_seed(0))
        >>> [(tuple(xb.shape), yb.dtype) for xb, yb in empty]  # the structure of a real batch, zero rows
        [((0, 4), torch.int64)]

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD with Poisson sampling).
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, steps: int | None = None,
                 collate_fn: Callable[[list], Any] | None = None, generator: torch.Generator | None = None,
                 secure_mode: bool = False, **kwargs):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a map-style dataset (__getitem__ and __len__), got "
                            f"{type(dataset).__name__}; Poisson sampling needs random access to every example")
        check_sample_rate(sample_rate)
        batch_sampler = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, generator=generator,
                                            secure_mode=secure_mode)
        collate = collate_fn.collate_fn if isinstance(collate_fn, _EmptySafeCollate) else collate_fn
        super().__init__(dataset, batch_sampler=batch_sampler,
                         collate_fn=_EmptySafeCollate(collate or default_collate, dataset), **kwargs)
        self.sample_rate = float(sample_rate)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator: torch.Generator | None = None,
                         secure_mode: bool = False) -> "DPDataLoader":
        """The Poisson-sampled counterpart of ``data_loader``: the same dataset, collate function and worker
        settings, as many steps per epoch as ``data_loader`` has batches and ``sample_rate = 1 /
        len(data_loader)``, so that an epoch is one pass over the data in expectation (Opacus's convention;
        the expected batch size is ``len(dataset) / len(data_loader)``, the batch size when it divides the
        dataset).

        Raises:
            ValueError: ``data_loader`` has no batches (an empty dataset).
        """
        if isinstance(data_loader, DPDataLoader):
            return data_loader
        dataset = data_loader.dataset
        if len(data_loader) == 0:
            raise ValueError("data_loader has no batches (an empty dataset?)")
        return cls(dataset, sample_rate=1 / len(data_loader), steps=len(data_loader),
                   collate_fn=data_loader.collate_fn,
                   generator=None if secure_mode else (generator or data_loader.generator),
                   secure_mode=secure_mode, num_workers=data_loader.num_workers,
                   pin_memory=data_loader.pin_memory, timeout=data_loader.timeout,
                   worker_init_fn=data_loader.worker_init_fn,
                   multiprocessing_context=data_loader.multiprocessing_context,
                   prefetch_factor=data_loader.prefetch_factor, persistent_workers=data_loader.persistent_workers)


class StepSignal(Protocol):
    """What :class:`BatchMemoryManager` needs of the optimizer."""

    def signal_skip_step(self, do_skip: bool = True) -> None: ...


class _SplittingSampler(Sampler[list[int]]):
    def __init__(self, sampler: Sampler, max_size: int, flags: deque):
        self.sampler, self.max_size, self.flags = sampler, max_size, flags

    def __len__(self) -> int:
        if isinstance(self.sampler, PoissonBatchSampler):
            expected = self.sampler.sample_rate * self.sampler.sampler.num_examples
            return len(self.sampler) * max(1, math.ceil(expected / self.max_size))
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.sampler:
            chunks: Sequence[list[int]] = [indices[i:i + self.max_size] for i in range(0, len(indices),
                                                                                        self.max_size)] or [[]]
            for i, chunk in enumerate(chunks):
                self.flags.append(i == len(chunks) - 1)
                yield chunk


class _PhysicalBatches:
    def __init__(self, loader: DataLoader, flags: deque, optimizer: StepSignal):
        self.loader, self.flags, self.optimizer = loader, flags, optimizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.flags.clear()
        for batch in self.loader:
            self.optimizer.signal_skip_step(not self.flags.popleft())
            yield batch


class BatchMemoryManager:
    """Context whose loader yields physical batches of at most ``max_physical_batch_size`` examples, the
    optimizer stepping once per logical (Poisson) batch: ``optimizer.step()`` and ``optimizer.zero_grad()``
    after a physical batch that does not end its logical batch only keep the clipped sum accumulating.
    Accumulation is exact: the step is the same as for the whole logical batch at once. An empty logical
    batch is one empty physical batch (the step then adds noise only).

    Args:
        data_loader: the loader returned by :meth:`persample.PrivacyEngine.make_private` (any loader with a
            ``batch_sampler``).
        max_physical_batch_size: the largest physical batch (>= 1).
        optimizer: the optimizer returned by ``make_private``.

    Raises:
        ValueError: ``max_physical_batch_size`` not an int >= 1; a loader without a batch sampler.
        TypeError: an optimizer without ``signal_skip_step``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import persample
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> model = torch.nn.Linear(4, 3)
        >>> model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
        ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     data_loader=DataLoader(data, batch_size=32), criterion=torch.nn.CrossEntropyLoss(),
        ...     noise_multiplier=1.0, max_grad_norm=1.0)
        >>> sizes = []
        >>> with persample.BatchMemoryManager(data_loader=loader, max_physical_batch_size=8,
        ...                                   optimizer=optimizer) as batches:
        ...     for x, y in batches:  # the step of the last physical batch of each logical batch takes effect
        ...         optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
        ...         sizes.append(len(x))
        >>> max(sizes) <= 8, optimizer.accountant.steps  # 2 logical batches (64 / 32 in expectation)
        (True, 2)

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (a "lot", the unit of noise and
        accounting, computed in smaller batches).
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: StepSignal):
        if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        if data_loader.batch_sampler is None:
            raise ValueError("data_loader has no batch_sampler to split")
        if not callable(getattr(optimizer, "signal_skip_step", None)):
            raise TypeError(f"optimizer must be the one make_private returned (it needs signal_skip_step), got "
                            f"{type(optimizer).__name__}")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> _PhysicalBatches:
        loader, flags = self.data_loader, deque()
        split = DataLoader(loader.dataset, batch_sampler=_SplittingSampler(loader.batch_sampler,
                                                                            self.max_physical_batch_size, flags),
                           collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                           pin_memory=loader.pin_memory, timeout=loader.timeout,
                           worker_init_fn=loader.worker_init_fn,
                           multiprocessing_context=loader.multiprocessing_context,
                           prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
        return _PhysicalBatches(split, flags, self.optimizer)

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(False)
