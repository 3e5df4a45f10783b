"""The distributed audits of tests/audit/test_run.py, run on every rank of ``torchrun --nproc-per-node 4`` (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node 4 tests/audit/distributed_scenarios.py OUT`` audits two
4-rank runs of :class:`persample.DistributedDPOptimizer` through ``audit_dp_sgd(dp_optimizer=...)``: the
correct one, and one whose ranks split the noise wrongly. Rank 0 saves ``{run: result}`` to ``OUT`` with
``torch.save``, with every rank's bounds beside it (they must agree). The process group's timeout turns a hang
into an error here and a failed launch there.
"""

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

import persample
from persample.app.digits import DigitsCNN, digits_split
from persample.audit import audit_dp_sgd

# The full-batch run of tests/audit/test_run.py (sample_rate 1, one step: a Gaussian mechanism, so the Gaussian
# bound's assumption holds), at the same confidence.
SETTINGS = {"num_canaries": 4000, "max_grad_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1,
            "confidence": 1 - 1e-4, "engine": "fast", "progress": False}


class _NoiseDividedByW(persample.DistributedDPOptimizer):
    """The mistake to catch: every rank adds its own draw of std ``sigma C / W``, where ``W`` independent draws
    need ``sigma C / sqrt(W)`` each to sum to ``sigma C``; their sum has std ``sigma C / sqrt(W)``, half the claim
    on 4 ranks. Each rank's generator differs (same-seeded draws would add up to the full std by accident)."""

    def __init__(self, *args, generator: torch.Generator, **kwargs):
        super().__init__(*args, generator=generator, **kwargs)
        self.own = torch.Generator().manual_seed(generator.initial_seed() + 1000 * (1 + self.rank))

    def _all_reduce(self, sums, std):
        return super()._all_reduce(persample.add_noise(sums, std / self.world_size, generator=self.own), 0.0)


def audit(kind) -> dict:
    x, y, _, _ = digits_split()
    torch.manual_seed(0)  # the same initialization on every rank (DistributedDPOptimizer checks it)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="with .* canaries at confidence")
        result = audit_dp_sgd(DigitsCNN(), x[:64], y[:64], dp_optimizer=kind, **SETTINGS)
    return {"claimed": result.claimed_epsilon, "exceeded": result.exceeded(),
            "bounds": {name: bound.epsilon for name, bound in result.white_box.items()}}


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {"correct": audit(persample.DistributedDPOptimizer), "noise divided by W": audit(_NoiseDividedByW)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        torch.save({"rank 0": results, "by rank": everyone, "world_size": dist.get_world_size()}, out)
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
