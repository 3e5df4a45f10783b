"""persample.DistributedPoissonSampler and persample.DistributedDPOptimizer.

The sampler is tested in one process (it takes ``rank``/``world_size``). The optimizer's tests read the results of
one ``torchrun --nproc-per-node 2`` launch of :mod:`tests.dp.distributed_scenarios` (gloo, CPU): DDP and FSDP2
(``fully_shard``) against one process, the noise, an empty part, ranks that disagree. The launch has a timeout
and the process group one of 30 s, so a hang fails the tests instead of stalling CI.
"""

import re
from pathlib import Path

import pytest
import torch

import persample
from tests.dp.test_noise import assert_gaussian
from tests.torchrun import torchrun

SCENARIOS = Path(__file__).with_name("distributed_scenarios.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    torchrun(SCENARIOS, str(out), nproc=2, timeout=300)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", ["ddp fast", "ddp vmap", "fsdp fast"])
def test_two_ranks_take_the_steps_of_one_process_on_the_union(launched, case):
    # Noise off, AdamW, 4 steps in physical batches of 3: float64 round-off only.
    ranks = [results[f"equivalence {case}"] for results in launched["by rank"]]
    union = sum(len(b) for b in persample.PoissonSampler(40, 0.25, steps=4, generator=torch.Generator().manual_seed(7)))
    assert sum(r["examples"] for r in ranks) == union
    assert all(r["examples"] > 0 for r in ranks)
    for r in ranks:
        assert r["error"] < 1e-12
        assert r["moved"] > 1e-2, "the parameters moved: the comparison is not of two untouched models"


def test_the_vmap_pipeline_under_fully_shard_is_a_clear_error(launched):
    for results in launched["by rank"]:
        assert re.search(r"cannot run a model sharded by fully_shard .* Use the fast engine, persample.GhostClipping",
                         results["fsdp vmap"])


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_a_rank_with_an_empty_part_still_steps(launched, wrapper):
    # One example, two ranks: rank 1's partition is empty; it joins every collective and ends where rank 0 does.
    ranks = [results[f"empty part {wrapper}"] for results in launched["by rank"]]
    assert ranks[1]["examples"] == 0
    for r in ranks:
        assert r["error"] < 1e-12 and r["moved"] > 1e-2


@pytest.mark.parametrize("case", ["ddp", "ddp secure", "fsdp", "fsdp secure"])
def test_noise_has_std_sigma_c_once(launched, case):
    # 20200 coordinates of (noise of std sigma * C = 1) / expected batch size 1. assert_gaussian fails a correct
    # sample with probability <= 3e-6; W = 2 ranks each adding the noise give variance 2 (z about +100), none 0.
    result = launched["rank 0"][f"noise {case}"]
    assert result["noise"].numel() == 20200
    assert_gaussian(result["noise"], 1.0)
    assert all(results[f"noise {case}"]["spread"] == 0 for results in launched["by rank"]), \
        "every rank steps with the same noisy gradient"


@pytest.mark.parametrize("mistake", ["noise on every rank", "no noise"])
def test_the_noise_check_fails_when_noise_is_added_on_every_rank_or_none(launched, mistake):
    with pytest.raises(AssertionError):
        assert_gaussian(launched["rank 0"][mistake]["noise"], 1.0)


def test_every_rank_reports_the_epsilon_of_one_process(launched):
    for results in launched["by rank"]:
        for case in ("ddp", "fsdp"):
            assert results[f"noise {case}"]["steps"] == 4
            assert results[f"noise {case}"]["epsilon"] == pytest.approx(launched["epsilon one process"], rel=1e-12)


@pytest.mark.parametrize("setting, match", [
    ("noise_multiplier", r"disagree on noise_multiplier: \[1.0, 2.0\]"),
    ("max_grad_norm", r"disagree on max_grad_norm: \[1.0, 2.0\]"),
    ("sample_rate", r"disagree on sample_rate: \[0.1, 0.2\]"),
    ("expected_batch_size", r"disagree on expected_batch_size: \[4.0, 8.0\]"),
    ("parameters", "disagree on replicated parameter values"),
    ("seeds", r"seeds \[5, 5\] \(by rank\) repeat"),
])
def test_ranks_that_disagree_fail_at_the_start(launched, setting, match):
    for results in launched["by rank"]:
        assert results[f"disagree {setting}"] != "no error"
        assert re.search(match, results[f"disagree {setting}"])


def _parts(num_examples, sample_rate, steps, world_size, seeds):
    samplers = [persample.DistributedPoissonSampler(num_examples, sample_rate, steps=steps, rank=rank,
                                                    world_size=world_size,
                                                    generator=torch.Generator().manual_seed(seeds[rank]))
                for rank in range(world_size)]
    return [list(batches) for batches in zip(*samplers, strict=True)]


@pytest.mark.parametrize("seeds", [(3, 3, 3), (3, 4, 5)], ids=["same seed", "own seeds"])
def test_the_union_of_the_ranks_parts_is_a_poisson_sample(seeds):
    # 60 examples, 3 ranks, q = 0.3, 1000 steps. Each example's inclusion count is Binomial(1000, 0.3); their
    # sum of squared z-scores is about chi-square with 60 degrees of freedom, > 120 with probability 5e-6.
    # Examples 0 and 1 (ranks 0 and 1) are both in with probability q**2: 90 +- 9.1 of 1000 steps; a sampler
    # whose ranks reused one stream on their partitions would have them together about 300 times.
    n, q, steps = 60, 0.3, 1000
    counts = torch.zeros(n)
    together = 0
    for parts in _parts(n, q, steps, 3, seeds):
        union = torch.cat(parts)
        assert len(union) == len(union.unique()), "no example on two ranks in one step"
        for rank, part in enumerate(parts):
            assert bool((part % 3 == rank).all())
        counts[union] += 1
        together += int(0 in union and 1 in union)
    z = (counts - steps * q) / (steps * q * (1 - q)) ** 0.5
    assert float(z.square().sum()) < 120
    assert abs(together - steps * q * q) < 5 * (steps * q * q * (1 - q * q)) ** 0.5


def test_with_one_seed_the_union_is_the_single_process_batch():
    single = persample.PoissonSampler(50, 0.2, steps=30, generator=torch.Generator().manual_seed(9))
    for batch, parts in zip(single, _parts(50, 0.2, 30, 2, (9, 9)), strict=True):
        assert torch.equal(batch, torch.cat(parts).sort().values)


def test_an_empty_partition_yields_empty_batches_for_every_step():
    parts = _parts(2, 0.5, 20, 4, (0, 1, 2, 3))
    assert len(parts) == 20
    assert all(len(p[2]) == 0 and len(p[3]) == 0 and p[2].dtype == torch.int64 for p in parts)
    sampler = persample.DistributedPoissonSampler(2, 0.5, rank=3, world_size=4)
    assert len(sampler) == 2 and sampler.expected_batch_size == pytest.approx(1.0)


@pytest.mark.parametrize("options, match", [
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"rank": -1, "world_size": 2}, "rank"),
    ({"rank": 0, "world_size": 0}, "world_size"),
    ({}, "process group"),
])
def test_bad_ranks(options, match):
    with pytest.raises(ValueError, match=match):
        persample.DistributedPoissonSampler(10, 0.1, **options)


def test_the_optimizer_needs_a_process_group():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="process group"):
        persample.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                         noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2.0,
                                         sample_rate=0.1)
