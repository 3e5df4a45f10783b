"""One DP-SGD step across the ranks of ``torchrun``: a normal DDP step, persample's (fast engine or vmap pipeline
with :class:`persample.DistributedDPOptimizer`) and Opacus's DPDDP, each also in one process on the same model
and per-rank batch.

    torchrun --nproc-per-node 2 benchmarks/dp_step_distributed.py --quick    # CPU (gloo), tiny models: a check
    torchrun --nproc-per-node 8 benchmarks/dp_step_distributed.py            # CUDA (nccl), dp_step.py's models

Each rank's batch is its part of one :class:`persample.DistributedPoissonSampler` batch (expected size the
config's batch per rank); the one-process rows run rank 0's part on rank 0 alone while the others wait, with
:class:`persample.DPOptimizer` (no collective) or Opacus's ``make_private`` without DPDDP. Times are medians
over the timed steps of the slowest rank (each step ends with a barrier-free device sync; the ranks' medians
are reduced with MAX). Peak memory (CUDA only) is ``max_memory_allocated`` during the variant, the largest
over the ranks.

Overlap of the clipped sums' all-reduce: :class:`persample.DistributedDPOptimizer` reduces the sums in
``step()``, after the backward, in flat buckets sent asynchronously so that packing and noising a bucket
overlaps the transfer of the ones before; nothing of it overlaps the backward. Measured here as: the exposed
communication (the distributed fast-engine step minus the same step with :class:`persample.DPOptimizer` on the
rank's own sums, both under the same ranks at once), and that step with the async buckets (``bucket_cap_mb``
1) against one bucket (everything in one collective, nothing to overlap).
"""

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from results import add_save_flag, header, publish
from steps import FULL, MAX_GRAD_NORM, NOISE_MULTIPLIER, QUICK, adamw, build_model, make_batch, on_device
from torch.nn.parallel import DistributedDataParallel

import persample

SAMPLE_RATE = 0.25


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_of(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def normal(model, ddp, x, y, global_batch):
    wrapped = DistributedDataParallel(model) if ddp else model
    opt = adamw(model)

    def step():
        loss_of(wrapped(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def persample_step(model, ddp, x, y, global_batch, pipeline="fast", bucket_cap_mb=25.0, own_sums=False):
    """The fast engine or the vmap pipeline, then DistributedDPOptimizer (``ddp``) or DPOptimizer: under DDP the
    engines run on the wrapper (its own gradient all-reduce never fires: no ``.backward()`` on the loss)."""
    wrapped = DistributedDataParallel(model) if ddp else model
    inner = wrapped.module if ddp else model
    options = {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
               "expected_batch_size": float(global_batch if ddp and not own_sums else len(y)),
               "sample_rate": SAMPLE_RATE}
    if ddp and not own_sums:
        dp = persample.DistributedDPOptimizer(adamw(inner), inner.named_parameters(), bucket_cap_mb=bucket_cap_mb,
                                              **options)
    else:
        dp = persample.DPOptimizer(adamw(inner), inner.named_parameters(), **options)
    engine = persample.GhostClipping(wrapped, max_grad_norm=MAX_GRAD_NORM) if pipeline == "fast" else None

    def step():
        if engine is not None:
            sums = engine.clipped_grad_sum(x, y).grads
        else:
            sums = persample.clip_per_sample(persample.per_sample_grads(wrapped, x, y), MAX_GRAD_NORM)
        dp.accumulate(sums, len(y))
        dp.step()
        dp.zero_grad()

    return step


def opacus(model, ddp, x, y, global_batch):
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

    wrapped = DifferentiallyPrivateDistributedDataParallel(model) if ddp else model
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=len(y))
    module, opt, _ = PrivacyEngine().make_private(module=wrapped, optimizer=adamw(model), data_loader=loader,
                                                  noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                                  poisson_sampling=False)

    def step():
        loss_of(module(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


VARIANTS = {
    "normal step (DDP)": normal,
    "fast engine (GhostClipping)": persample_step,
    "vmap pipeline": lambda m, d, x, y, b: persample_step(m, d, x, y, b, pipeline="vmap"),
    "Opacus (DPDDP, make_private)": opacus,
}
# The overlap measurement: distributed only.
OVERLAP = {
    "fast engine, DPOptimizer on the rank's own sums (no all-reduce)":
        lambda m, d, x, y, b: persample_step(m, d, x, y, b, own_sums=True),
    "fast engine, async buckets of 1 MiB": lambda m, d, x, y, b: persample_step(m, d, x, y, b, bucket_cap_mb=1.0),
    "fast engine, one bucket (no overlap)": lambda m, d, x, y, b: persample_step(m, d, x, y, b, bucket_cap_mb=1e6),
}


def timed(build, cfg, ddp, x, y, global_batch, device, warmup, iters):
    """(median seconds per step, peak bytes or None), or the exception's name; the same answer on every rank."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds, peak = float("nan"), 0.0
    try:
        step = build(build_model(cfg).to(device), ddp, x, y, global_batch)
        times = []
        for i in range(warmup + iters):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        if device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(device))
        failed = 0.0
    except Exception as error:  # a variant that fails is a row that says so
        failed, crash = 1.0, f"crash: {type(error).__name__}"
    if not ddp:
        return (seconds, peak or None) if not failed else crash
    everyone = torch.tensor([seconds if not failed else 0.0, peak, failed], dtype=torch.float64, device=device)
    dist.all_reduce(everyone, op=dist.ReduceOp.MAX)
    if everyone[2] > 0:
        return crash if failed else "crash on another rank"
    return float(everyone[0]), float(everyone[1]) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (CPU and gloo work)")
    parser.add_argument("--models", type=int, nargs="*", help="indices into the model list (default: all)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    add_save_flag(parser)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    configs = [on_device(cfg, device) for cfg in (QUICK if args.quick else FULL)]
    configs = [configs[i] for i in args.models] if args.models else configs
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (5 if args.quick else 20)

    rows = []
    for cfg in configs:
        # This rank's part of one global Poisson batch of expected size cfg.batch per rank.
        n = round(cfg.batch * world / SAMPLE_RATE)
        idx = next(iter(persample.DistributedPoissonSampler(n, SAMPLE_RATE, steps=1,
                                                            generator=torch.Generator().manual_seed(0))))
        x, y = make_batch(cfg, max(len(idx), 1), device)
        global_batch = SAMPLE_RATE * n
        results = {}
        for name, build in VARIANTS.items():
            if rank == 0:
                results[(name, False)] = timed(build, cfg, False, x, y, global_batch, device, warmup, iters)
            dist.barrier()
            results[(name, True)] = timed(build, cfg, True, x, y, global_batch, device, warmup, iters)
        for name, build in OVERLAP.items():
            results[(name, True)] = timed(build, cfg, True, x, y, global_batch, device, warmup, iters)
        rows.append((cfg, results))

    if rank == 0:
        lines = [header("dp_step_distributed", device, f"{world} ranks ({'nccl' if cuda else 'gloo'})",
                        f"{warmup} warm-up and {iters} timed steps, the slowest rank's median"), ""]
        for cfg, results in rows:
            baseline = results[("normal step (DDP)", True)]
            base = baseline[0] if isinstance(baseline, tuple) else float("nan")
            lines += [f"### {cfg.name} per rank", "",
                      f"| variant | {world} ranks ms/step | x normal DDP step | one process ms/step |"
                      + (" peak MB (ranks) |" if cuda else ""),
                      "|---|---:|---:|---:|" + ("---:|" if cuda else "")]
            for name in [*VARIANTS, *OVERLAP]:
                multi, single = results[(name, True)], results.get((name, False))
                cells = ([f"{multi[0] * 1e3:.2f}", f"{multi[0] / base:.2f}"] if isinstance(multi, tuple)
                         else [multi, ""])
                cells.append("" if single is None else f"{single[0] * 1e3:.2f}" if isinstance(single, tuple)
                             else single)
                if cuda:
                    cells.append(f"{multi[1] / 2**20:.0f}" if isinstance(multi, tuple) and multi[1] else "")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            own, bucketed = (results[(k, True)] for k in list(OVERLAP)[:2])
            fast = results[("fast engine (GhostClipping)", True)]
            if all(isinstance(r, tuple) for r in (own, fast)):
                lines += ["", f"Exposed communication of the fast engine's step: {(fast[0] - own[0]) * 1e3:.2f} ms "
                          f"({(fast[0] - own[0]) / fast[0]:.0%} of the step; the all-reduce runs after the "
                          "backward, none of it overlaps it)."]
            lines.append("")
        publish("dp_step_distributed", "\n".join(lines), args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
