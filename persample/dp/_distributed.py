"""DP-SGD over ``W`` processes of ``torch.distributed``: one global Poisson batch, one noise draw per coordinate.

Each rank forms the clipped sum of its own examples (its part of a
:class:`~persample.dp._sampling.DistributedPoissonSampler` batch, by :class:`persample.GhostClipping` or the
vmap pipeline, over as many physical batches as it needs) and accumulates it as :class:`DPOptimizer` does.
:meth:`DistributedDPOptimizer.step` then finishes the chain over all ranks::

    p.grad = (sum over ranks of the clipped sums + N(0, (noise_multiplier * max_grad_norm)**2)) / expected_batch_size

with ``expected_batch_size`` the global ``sample_rate * dataset size``; every rank steps with that gradient
and records the step, at the global sample rate, with its accountant, so every rank reports the same epsilon.

Where the noise is drawn, so that each coordinate gets exactly one draw of std ``sigma * C``:

* **Replicated parameters** (plain tensors: no wrapper, or ``DistributedDataParallel``): rank 0 adds the noise
  to its own clipped sum, then the sums are all-reduced (summed) into every rank. One draw of the full std,
  not ``W`` draws of ``sigma C / sqrt(W)``: the noise is one sample from one source, as in one process, so
  secure mode's construction (:mod:`persample.dp._noise`: the OS CSPRNG, four draws summed against the
  floating-point attack) applies to it unchanged, the guarantee does not rest on every rank's generator
  being independent of the others, and the other ranks draw nothing. Every rank receives the same reduced
  sum, so the replicas stay equal.
* **Sharded parameters** (DTensors sharded on dim 0 over a 1-D mesh, as ``fully_shard`` (FSDP2) makes them):
  the clipped sums are reduce-scattered, so that each rank holds the global sum of its own shard, and each
  rank adds noise to its shard only. Shards are disjoint, so each coordinate is drawn once, by its owner,
  from its owner's source: in secure mode every rank's OS CSPRNG; with seeded generators, the ranks' seeds
  must differ (they are checked to), or the shards would carry the same noise and their differences none.

The sums travel in flat buckets of at most ``bucket_cap_mb``, each sent asynchronously (``async_op=True``) as
soon as it is packed, so the packing and noise of a bucket overlap the transfer of the ones before.

At construction the ranks compare their settings (noise multiplier, clipping bound, sample rate, expected
batch size, accountant, secure mode, the parameters' names and shapes, and the replicated parameters'
values) in one collective, and all raise the same ``ValueError`` if they differ: a mismatch would otherwise
show up as a hang in the first reduce or as replicas that silently drift apart.
"""

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from persample.backend import is_dtensor
from persample.dp._accounting import Mechanism, PrivacyAccountant
from persample.dp._noise import gaussian_noise
from persample.dp._optimizer import DPOptimizer, buckets


class DistributedDPOptimizer(DPOptimizer):
    """:class:`DPOptimizer` over the ranks of a process group: all-reduce (or reduce-scatter) of the clipped
    sums, noise once, the same step on every rank.

    Args:
        optimizer, named_parameters, noise_multiplier, max_grad_norm, sample_rate, accountant, generator,
            secure_mode: as :class:`DPOptimizer`, the same on every rank (checked). With
            ``DistributedDataParallel`` pass ``ddp.module.named_parameters()`` (the names the engines use).
        expected_batch_size: the *global* ``sample_rate * dataset size``.
        process_group: the group of the replicated parameters' all-reduce and of the settings check
            (default: the default group). Sharded parameters use their mesh's group.
        bucket_cap_mb: the largest flat bucket sent in one collective, in MiB (> 0).

    Raises:
        ValueError: as :class:`DPOptimizer`; no initialized process group; settings, parameters or replicated
            parameter values that differ across ranks; a sharded parameter that is not sharded on dim 0 of a
            1-D mesh; seeded generators with the same seed on every rank while some parameter is sharded.

    Examples:
        Under ``torchrun --nproc-per-node 2 train.py`` each process runs the same loop on its own part of every
        batch; here a process group of one, in this process, runs it:

        >>> import torch
        >>> import torch.distributed as dist
        >>> import persample
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torchrun: env://
        >>> model = torch.nn.Linear(4, 3)  # with DDP: ddp = DistributedDataParallel(model), then ddp.module
        >>> n, q = 32, 0.25
        >>> x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
        >>> engine = persample.GhostClipping(model, max_grad_norm=1.0)
        >>> dp = persample.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                       model.named_parameters(), noise_multiplier=1.0,
        ...                                       max_grad_norm=1.0, expected_batch_size=q * n, sample_rate=q)
        >>> for idx in persample.DistributedPoissonSampler(n, q, steps=2):  # this rank's examples of each batch
        ...     for part in idx.split(4):  # physical batches
        ...         dp.accumulate(engine.clipped_grad_sum(x[part], y[part]).grads, len(part))
        ...     dp.step()  # the sums reduced over the ranks, noise drawn once
        >>> dp.world_size, dp.accountant.steps
        (1, 2)
        >>> dist.destroy_process_group()

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
        Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        sample_rate: float,
        accountant: Mechanism | PrivacyAccountant = "rdp",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
    ):
        super().__init__(optimizer, named_parameters, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                         sample_rate=sample_rate, accountant=accountant, generator=generator,
                         secure_mode=secure_mode)
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DistributedDPOptimizer needs an initialized process group: call "
                             "torch.distributed.init_process_group first (torchrun sets its environment)")
        if not (isinstance(bucket_cap_mb, (int, float)) and math.isfinite(bucket_cap_mb) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        # Where this rank's collectives of small values live (NCCL takes CUDA tensors only).
        self._device = _local(next(iter(self.params.values()))).device
        for name, p in self.params.items():
            if not is_dtensor(p):
                continue
            from torch.distributed.tensor import Shard  # imported by now: p is a DTensor

            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(f"parameter {name!r} is a DTensor placed {tuple(p.placements)} on a "
                                 f"{p.device_mesh.ndim}-D mesh: only dim-0 sharding over a 1-D mesh (fully_shard's) "
                                 "is supported")
        self._check_agreement()

    def physical_batches(self, idx: Tensor, max_physical_batch_size: int) -> list[Tensor]:
        """This rank's ``idx`` in chunks of at most ``max_physical_batch_size``, as many chunks on every rank:
        the most any rank needs (one all-reduce of a count), the ones a rank lacks empty.

        Under ``fully_shard`` every forward and backward gathers weights with collectives, so every rank must
        run a pass per chunk: on an empty chunk, run the engine on any one example with every target set to
        its ``ignore_index`` (the example's loss and gradient are then exactly zero) and accumulate nothing.
        Replicated models (DDP) have no collective before :meth:`step` and may simply skip empty chunks.

        Raises:
            ValueError: ``max_physical_batch_size`` not an int >= 1.
        """
        if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        chunks = list(idx.split(max_physical_batch_size))
        count = torch.tensor([len(chunks)], device=self._device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.process_group)
        return chunks + [idx[:0]] * (int(count) - len(chunks))

    def _check_agreement(self) -> None:
        """One ``all_gather_object`` of this rank's settings; every rank raises the same error on a mismatch."""
        replicated = [p for p in self.params.values() if not is_dtensor(p)]
        sharded = len(replicated) < len(self.params)
        mine = {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "accountant": self.accountant.mechanism,
            "secure_mode": self.secure_mode,
            "parameters": [(name, tuple(p.shape), str(p.dtype)) for name, p in self.params.items()],
            # Sums and sums of squares in float64: equal replicas give equal values, bit for bit.
            "replicated parameter values": [(float(p.detach().double().sum()),
                                             float(p.detach().double().square().sum())) for p in replicated],
        }
        everyone: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        for key in mine:
            values = [theirs[key] for theirs in everyone]
            if any(v != values[0] for v in values):
                shown = values if key not in ("parameters", "replicated parameter values") else "(differ)"
                hint = (" (wrap the model in DistributedDataParallel, which broadcasts rank 0's, or seed the "
                        "initialization the same on every rank)" if key == "replicated parameter values" else "")
                raise ValueError(f"the ranks disagree on {key}: {shown} by rank{hint}; every rank of a DP-SGD run "
                                 "must use the same settings and parameters")
        if sharded and self.generator is not None:
            seeds: list[int | None] = [None] * self.world_size
            dist.all_gather_object(seeds, self.generator.initial_seed(), group=self.process_group)
            if len(set(seeds)) < len(seeds):
                raise ValueError(f"the generators' seeds {seeds} (by rank) repeat: each rank draws the noise of its "
                                 "own shard, so seed each rank's generator differently (e.g. seed + rank), or use "
                                 "secure_mode")

    def step(self) -> None:
        """Reduces the accumulated sums over the ranks (zeros where a rank accumulated nothing), adds the noise
        once, divides by ``expected_batch_size``, writes ``p.grad``, steps the wrapped optimizer, records the
        step for accounting and clears the accumulation. Every rank must call it, once per logical step."""
        summed = self._summed or {name: torch.zeros(p.shape, dtype=p.dtype, device=_local(p).device)
                                  for name, p in self.params.items()}
        std = self.noise_multiplier * self.max_grad_norm
        replicated = {name: summed[name] for name, p in self.params.items() if not is_dtensor(p)}
        sharded = {name: summed[name] for name, p in self.params.items() if is_dtensor(p)}
        grads = self._all_reduce(replicated, std) if replicated else {}
        if sharded:
            grads.update(self._reduce_scatter(sharded, std))
            from torch.distributed.tensor import DTensor  # imported by now: some parameters are DTensors
        for name, p in self.params.items():
            grad = (grads[name] / self.expected_batch_size).to(p.dtype)
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride()) if is_dtensor(p) else grad
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._clear()

    def _buckets(self, sums: Mapping[str, Tensor], row_numel) -> list[list[str]]:
        """Names in order, grouped by dtype and device, cut where a bucket would pass ``bucket_cap_mb``."""
        return buckets(sums, self.bucket_bytes, lambda name, g: row_numel(name, g) * g.element_size())

    def _all_reduce(self, sums: Mapping[str, Tensor], std: float) -> dict[str, Tensor]:
        sent = []
        for names in self._buckets(sums, lambda name, g: g.numel()):
            flat = torch.cat([sums[name].reshape(-1) for name in names])
            if self.rank == 0:
                flat += gaussian_noise(flat.shape, std, device=flat.device, dtype=flat.dtype,
                                       generator=self.generator, secure_mode=self.secure_mode)
            sent.append((names, flat, dist.all_reduce(flat, group=self.process_group, async_op=True)))
        grads = {}
        for names, flat, work in sent:
            work.wait()
            grads.update(zip(names, flat.split([sums[name].numel() for name in names]), strict=True))
        return {name: grads[name].view(sums[name].shape) for name in sums}

    def _reduce_scatter(self, sums: Mapping[str, Tensor], std: float) -> dict[str, Tensor]:
        """Each rank gets its shard's global sum: rows ``[r * ceil(d0 / W), ...)`` of every parameter, as
        ``fully_shard`` cuts them (``torch.chunk`` on dim 0)."""
        mesh = next(p.device_mesh for name, p in self.params.items() if name in sums)
        group, world = mesh.get_group(), mesh.size()

        def rows(name: str) -> int:
            return -(-sums[name].shape[0] // world)

        def row_numel(name: str, g: Tensor) -> int:
            return rows(name) * (g.numel() // max(g.shape[0], 1))

        sent = []
        for names in self._buckets(sums, row_numel):
            parts = []
            for name in names:
                g = sums[name]
                padded = g.new_zeros(world * rows(name), *g.shape[1:])
                padded[:g.shape[0]] = g
                parts.append(padded.reshape(world, -1))
            full = torch.cat(parts, dim=1)
            shard = full.new_empty(full.shape[1])
            sent.append((names, shard, dist.reduce_scatter_tensor(shard, full.reshape(-1), group=group,
                                                                  async_op=True)))
        grads = {}
        for names, shard, work in sent:
            work.wait()
            # After the reduce, so that each coordinate of this shard is drawn once, here.
            shard += gaussian_noise(shard.shape, std, device=shard.device, dtype=shard.dtype,
                                    generator=self.generator, secure_mode=self.secure_mode)
            for name, part in zip(names, shard.split([row_numel(name, sums[name]) for name in names]), strict=True):
                local_rows = _local(self.params[name]).shape[0]
                grads[name] = part.view(rows(name), *sums[name].shape[1:])[:local_rows]
        return grads


def _local(p: Tensor) -> Tensor:
    return p.to_local() if is_dtensor(p) else p
