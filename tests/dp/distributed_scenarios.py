"""The scenarios of tests/dp/test_distributed.py, run on every rank of ``torchrun --nproc-per-node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node 2 tests/dp/distributed_scenarios.py OUT`` runs them all in one
launch (starting processes costs more than the scenarios) and rank 0 saves ``{scenario: result}`` to ``OUT``
with ``torch.save``; the tests assert on that. Every collective has the process group's timeout, so a hang
becomes an error here and a failed launch there.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import persample

N, SAMPLE_RATE, STEPS, PHYSICAL, CLIP = 40, 0.25, 4, 3, 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _data(n: int = N):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator, dtype=torch.float64), torch.randint(0, 4, (n,), generator=generator)


def _clipped_sum(pipeline, engine, model, x, y):
    if pipeline == "fast":
        return engine.clipped_grad_sum(x, y).grads
    return persample.clip_per_sample(persample.per_sample_grads(model, x, y), CLIP)


def _full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _reference(n: int):
    """One process on the union of the ranks' examples: the same seeds, PoissonSampler, DPOptimizer."""
    model = _model()
    x, y = _data(n)
    dp = persample.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model.named_parameters(),
                               noise_multiplier=0.0, max_grad_norm=CLIP, expected_batch_size=SAMPLE_RATE * n,
                               sample_rate=SAMPLE_RATE)
    for idx in persample.PoissonSampler(n, SAMPLE_RATE, steps=STEPS, generator=torch.Generator().manual_seed(7)):
        if len(idx):
            dp.accumulate(_clipped_sum("vmap", None, model, x[idx], y[idx]), len(idx))
        dp.step()
    return {name: p.detach() for name, p in model.named_parameters()}


def equivalence(wrapper: str, pipeline: str, n: int = N) -> dict:
    """Noise off: W ranks, physical batches of PHYSICAL, AdamW, against one process on the union."""
    model = _model()
    if wrapper == "ddp":
        ddp = DistributedDataParallel(model)
        inner = ddp.module
        engine_model, per_sample_model = ddp, ddp
    else:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        inner = engine_model = per_sample_model = model
    x, y = _data(n)
    engine = persample.GhostClipping(engine_model, max_grad_norm=CLIP) if pipeline == "fast" else None
    dp = persample.DistributedDPOptimizer(torch.optim.AdamW(inner.parameters(), lr=0.05), inner.named_parameters(),
                                          noise_multiplier=0.0, max_grad_norm=CLIP,
                                          expected_batch_size=SAMPLE_RATE * n, sample_rate=SAMPLE_RATE)
    sampler = persample.DistributedPoissonSampler(n, SAMPLE_RATE, steps=STEPS, generator=torch.Generator().manual_seed(7))
    examples = 0
    for idx in sampler:
        examples += len(idx)
        for part in dp.physical_batches(idx, PHYSICAL):
            if len(part):
                dp.accumulate(_clipped_sum(pipeline, engine, per_sample_model, x[part], y[part]), len(part))
            elif wrapper == "fsdp":  # FSDP's gathers are collectives: a pass that contributes exactly zero
                engine.clipped_grad_sum(x[:1], torch.full_like(y[:1], -100))
        dp.step()
    reference = _reference(n)
    error = max(float((_full(p) - reference[name]).abs().max()) for name, p in inner.named_parameters())
    moved = max(float((_full(p) - _model().state_dict()[name]).abs().max()) for name, p in inner.named_parameters())
    return {"error": error, "moved": moved, "examples": examples}


class _NoiseOnEveryRank(persample.DistributedDPOptimizer):
    """The mistake the noise test must catch: every rank adds the full noise before the sum."""

    def _all_reduce(self, sums, std):
        if self.rank != 0:
            sums = persample.add_noise(sums, std)
        return super()._all_reduce(sums, std)


class _NoNoise(persample.DistributedDPOptimizer):
    """The other mistake: no rank adds noise."""

    def _all_reduce(self, sums, std):
        return super()._all_reduce(sums, 0.0)


def noise(wrapper: str, secure_mode: bool = False, kind=persample.DistributedDPOptimizer) -> dict:
    """Nothing accumulated, sigma * C = 1, expected batch size 1: each step's gradient is the noise alone.
    Returns rank 0's noise and the largest difference between the ranks' gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50)).double()
    if wrapper == "fsdp":
        fully_shard(model)
    else:
        model = DistributedDataParallel(model).module
    rank = dist.get_rank()
    generator = None if secure_mode else torch.Generator().manual_seed(100 + rank)
    dp = kind(torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(), noise_multiplier=2.0,
              max_grad_norm=0.5, expected_batch_size=1.0, sample_rate=0.01, generator=generator,
              secure_mode=secure_mode)
    drawn, spread = [], 0.0
    for _ in range(4):
        dp.step()
        grads = torch.cat([_full(p.grad).reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, grads)
        spread = max(spread, max(float((g - grads).abs().max()) for g in everyone))
        drawn.append(grads)
    return {"noise": torch.cat(drawn), "spread": spread, "epsilon": dp.epsilon(1e-5), "steps": dp.accountant.steps}


def disagreement(setting: str) -> str:
    """One rank differs in ``setting``: every rank must raise the same ValueError, none hang."""
    rank = dist.get_rank()
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1, "expected_batch_size": 4.0}
    if setting in settings:
        settings[setting] *= 1 + rank
    torch.manual_seed(rank if setting == "parameters" else 0)
    model = nn.Linear(3, 2)
    generator = None
    if setting == "seeds":
        fully_shard(model)
        generator = torch.Generator().manual_seed(5)
    try:
        persample.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                         generator=generator, **settings)
    except ValueError as error:
        return str(error)
    return "no error"


def fsdp_vmap() -> str:
    """The vmap pipeline on a fully_shard model: a clear error on every rank, naming the fast engine."""
    model = _model()
    fully_shard(model)
    x, y = _data()
    try:
        persample.per_sample_grads(model, x[:3], y[:3])
    except ValueError as error:
        return str(error)
    return "no error"


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    results = {}
    for wrapper, pipeline in (("ddp", "fast"), ("ddp", "vmap"), ("fsdp", "fast")):
        results[f"equivalence {wrapper} {pipeline}"] = equivalence(wrapper, pipeline)
    results["fsdp vmap"] = fsdp_vmap()
    results["empty part ddp"] = equivalence("ddp", "fast", n=1)
    results["empty part fsdp"] = equivalence("fsdp", "fast", n=1)
    for wrapper in ("ddp", "fsdp"):
        results[f"noise {wrapper}"] = noise(wrapper)
        results[f"noise {wrapper} secure"] = noise(wrapper, secure_mode=True)
    results["noise on every rank"] = noise("ddp", kind=_NoiseOnEveryRank)
    results["no noise"] = noise("ddp", kind=_NoNoise)
    for setting in ("noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size", "parameters", "seeds"):
        results[f"disagree {setting}"] = disagreement(setting)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: {**v, "noise": None} if isinstance(v, dict) and "noise" in v else v
                                      for k, v in results.items()})
    if dist.get_rank() == 0:
        torch.save({"rank 0": results, "by rank": everyone, "world_size": dist.get_world_size(),
                    "epsilon one process": persample.epsilon_for(2.0, 1e-5, 0.01, 4)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main(sys.argv[1])
    # The results are written and the process group destroyed. Under load, torch 2.13's interpreter teardown
    # after these scenarios sometimes aborts a rank ("terminate called without an active exception", no Python
    # frame left: a C++ thread destroyed while joinable), which would fail the run after its work is done; the
    # teardown is skipped.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
