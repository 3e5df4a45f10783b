"""Where a DP step's reserved GPU memory goes: for each step of ``dp_step.py`` (the normal step, the fast engine,
and both through CUDA graphs), the peaks of the memory its tensors hold and of the memory the caching allocator
keeps for it, how much of the reserve was split blocks that no request could use (fragmentation), and the reserve
by pool once the steps are done: PyTorch's own pool, and the private pool of each CUDA graph.

    python benchmarks/memory_pools.py                              # the CNN and WRN-16-4, bf16 and fp32; CUDA
    python benchmarks/memory_pools.py --models 3 --precisions bf16 --snapshots runs/pools
    python benchmarks/memory_pools.py --quick                      # tiny models: a check of the script (CUDA)

Why: ``dp_step.py`` measured the fast engine's CUDA-graph step (``cuda_graph="step"``) at or under the normal
step's peak of allocated memory on the conv nets, but its reserve at 1.36-2.40x the normal step's in three of
four configurations (H100, c0d1023), and the eager engine's reserve above its allocated peak by more than the
normal step's. A graph's pool is memory taken from every other use, whether or not its blocks count as allocated
between replays, so the reserve is the figure a user's out-of-memory error depends on. This script says which
pool holds the extra and whether it is fragmentation (``inactive_split_bytes``, the free parts of split blocks)
or blocks in use.

Each step is built on a fresh model, warmed up (the conv rule times its ways and a graph is captured then), the
cached blocks are released (``torch.cuda.empty_cache``) and the peaks reset, and ``--iters`` steps are run. The
peaks count from what was held before the step was built. ``--snapshots DIR`` also records the allocator's history
over two more steps of each and writes one ``torch.cuda.memory`` snapshot per step to DIR (pickles for
https://pytorch.org/memory_viz). Saved with ``results.py`` (the memory_pools section of ``RESULTS.md``, appended
to ``HISTORY.md``). Needs a CUDA device: the CPU has no caching allocator.
"""

import argparse
import collections
import gc
import re
import sys
from pathlib import Path

import torch
from results import add_save_flag, header, publish, size
from steps import FULL, QUICK, VARIANTS, build_model, make_batch, on_device

STEPS = ("normal step", "fast engine (GhostClipping)", "normal step, CUDA graph", "fast engine, cuda_graph='step'")


def by_pool() -> dict[str, tuple[int, int]]:
    """``{pool: (bytes reserved, bytes allocated)}`` over the allocator's segments now: ``"main"`` for PyTorch's
    own pool, ``"graph N"`` for the N-th private pool (a CUDA graph's) in the order of their ids."""
    totals: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for segment in torch.cuda.memory_snapshot():
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        totals[pool][0] += segment["total_size"]
        totals[pool][1] += segment["allocated_size"]
    names = {}
    for i, pool in enumerate(sorted(p for p in totals if p != (0, 0))):
        names[pool] = f"graph {i + 1}"
    return {names.get(pool, "main"): tuple(sizes) for pool, sizes in sorted(totals.items())}


def measure(cfg, variant: str, device: torch.device, precision: str, warmup: int, iters: int,
            snapshots: Path | None) -> dict:
    """The step's peaks and its reserve by pool (see the module docstring)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    step = VARIANTS[variant](build_model(cfg).to(device), device, precision, cfg.batch)
    x, y = make_batch(cfg, cfg.batch, device)
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize(device)
    warm_reserved = torch.cuda.memory_reserved(device) - held[1]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(iters):
        step(x, y)
    torch.cuda.synchronize(device)
    stats = torch.cuda.memory_stats(device)
    result = {"allocated": stats["allocated_bytes.all.peak"] - held[0],
              "reserved": stats["reserved_bytes.all.peak"] - held[1],
              "split": stats["inactive_split_bytes.all.peak"], "warm": warm_reserved, "pools": by_pool()}
    if snapshots is not None:
        snapshots.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        try:
            for _ in range(2):
                step(x, y)
            torch.cuda.synchronize(device)
            name = re.sub(r"[^A-Za-z0-9]+", "_", f"{cfg.name}_{precision}_{variant}").strip("_")
            torch.cuda.memory._dump_snapshot(str(snapshots / f"{name}.pickle"))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    del step, x, y
    return result


def pools_cell(pools: dict[str, tuple[int, int]]) -> str:
    return "; ".join(f"{name} {size(reserved)} ({size(allocated)} in use)" for name, (reserved, allocated)
                     in pools.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (checks the script on a CUDA machine)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", type=int, nargs="+", metavar="INDEX",
                        help="indices into dp_step.py's model list (default: the CNN and WRN-16-4)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=list(STEPS), choices=list(STEPS), metavar="VARIANT")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--snapshots", type=Path, metavar="DIR",
                        help="also write a torch.cuda.memory snapshot of two steps of each to DIR")
    add_save_flag(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit("memory_pools.py needs a CUDA device: it reads the CUDA caching allocator's statistics "
                 "(on the CPU, benchmarks/cpu_memory.py counts a step's tensor storage)")
    configs = QUICK if args.quick else FULL
    indices = args.models if args.models is not None else ([1, 2] if args.quick else [2, 3])
    if args.quick:
        args.precisions, args.warmup, args.iters = ["fp32"], 2, 1
    rows = []
    for cfg in (on_device(configs[i], device) for i in indices):
        for precision in args.precisions:
            base = None
            for variant in args.variants:
                print(f"{cfg.name}, {precision}, {variant}", file=sys.stderr)
                try:
                    m = measure(cfg, variant, device, precision, args.warmup, args.iters, args.snapshots)
                except torch.OutOfMemoryError:
                    rows.append(f"| {cfg.name} | {precision} | {variant} | OOM | | | | | |")
                    continue
                if variant == "normal step":
                    base = m
                ratio = f"{m['reserved'] / base['reserved']:.2f}x" if base else "-"
                rows.append(f"| {cfg.name} | {precision} | {variant} | {size(m['allocated'])} | {size(m['reserved'])} "
                            f"| {ratio} | {size(m['split'])} | {size(m['warm'])} | {pools_cell(m['pools'])} |")
    table = "\n".join([
        "| model | precision | step | peak allocated | peak reserved | reserved × normal | peak of split free "
        "blocks | reserved after warm-up | reserved by pool after the steps |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    context = header("memory_pools", device, f"{args.warmup} warm-up steps, then the cache emptied and "
                     f"{args.iters} steps measured")
    publish("memory_pools", f"{context}\n\n{table}", args)


if __name__ == "__main__":
    main()
