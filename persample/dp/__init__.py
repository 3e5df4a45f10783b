"""DP-SGD's parts: Poisson sampling, the Gaussian noise, the optimizer that adds it once per logical batch, and
the privacy accountant (Opacus's RDP and PRV accountants).

* :mod:`~persample.dp._sampling` — :class:`PoissonSampler`, :class:`DistributedPoissonSampler`.
* :mod:`~persample.dp._noise` — :func:`gaussian_noise`, :func:`add_noise` (secure mode included).
* :mod:`~persample.dp._optimizer` — :class:`DPOptimizer`.
* :mod:`~persample.dp._data_loader` — :class:`DPDataLoader` (Poisson batches of any map-style dataset),
  :class:`BatchMemoryManager` (physical batches).
* :mod:`~persample.dp._privacy_engine` — :class:`PrivacyEngine` (``make_private``: DP-SGD behind a user's own loop).
* :mod:`~persample.dp._distributed` — :class:`DistributedDPOptimizer` (DDP and FSDP2 over torch.distributed).
* :mod:`~persample.dp._accounting` — :class:`PrivacyAccountant`, :func:`epsilon_for`, :func:`noise_multiplier_for`.
"""

from persample.dp._accounting import Mechanism, PrivacyAccountant, epsilon_for, noise_multiplier_for
from persample.dp._data_loader import BatchMemoryManager, DPDataLoader, PoissonBatchSampler
from persample.dp._distributed import DistributedDPOptimizer
from persample.dp._noise import add_noise, gaussian_noise
from persample.dp._optimizer import DPOptimizer
from persample.dp._privacy_engine import PrivacyEngine, PrivateLoss, PrivateOptimizer
from persample.dp._sampling import DistributedPoissonSampler, PoissonSampler

__all__ = [
    "BatchMemoryManager",
    "DPDataLoader",
    "DPOptimizer",
    "DistributedDPOptimizer",
    "DistributedPoissonSampler",
    "Mechanism",
    "PoissonBatchSampler",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyEngine",
    "PrivateLoss",
    "PrivateOptimizer",
    "add_noise",
    "epsilon_for",
    "gaussian_noise",
    "noise_multiplier_for",
]
