"""Cross-entropy fwd+bwd: persample vs F.cross_entropy (eager and compiled) vs Liger-Kernel.

For each shape it reports the time per call with calls queued back to back (as a training loop runs; the
median of several blocks of such calls, and the slowest block) and the median time of an isolated call (the
GPU idle before it, so the host's launch work shows), each as a fraction of the memory floor (reading the
logits once and writing their gradient once, timed as a device-to-device copy of the logits in the same run),
and the peak memory beyond the logits, in units of the logits' size. Prints a markdown table and saves it with
the date, GPU and commit (``results.py``: the cross_entropy section of RESULTS.md, or cross_entropy_cpu, appended
to HISTORY.md).

    python benchmarks/cross_entropy.py                 # the three shapes of issue 2, on CUDA
    python benchmarks/cross_entropy.py --device cpu    # the PyTorch path (no GPU, no interpreter), CPU shapes
    python benchmarks/cross_entropy.py --quick         # a small shape (CPU or GPU) to check the script

Each row also gives its time and peak memory as a multiple of ``F.cross_entropy``'s (eager) with the same
reduction, measured in the same run. On the CPU the peak memory is read off the profiler's allocation events
(there are no allocator statistics), and torch.compile and Liger (GPU kernels) are left out.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from results import add_save_flag, header, publish

import persample

SHAPES = [(8192, 32000, torch.bfloat16), (8192, 128256, torch.bfloat16), (4096, 128256, torch.float32)]
# The small GPT of dp_step.py (B=32, T=128, V=8192), a larger vocabulary, and bfloat16.
CPU_SHAPES = [(4096, 8192, torch.float32), (1024, 32000, torch.float32), (4096, 8192, torch.bfloat16)]


def one_call_ms(fn, cuda: bool) -> float:
    """Milliseconds of one fn() from an idle GPU (CUDA events), or of wall clock on the CPU."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench(fn, reps: int, cuda: bool = True) -> float:
    """Median milliseconds of one isolated fn() (the GPU idle before it), timed with CUDA events (wall clock
    on CPU): the host's work before the first kernel shows in full."""
    for _ in range(3):
        fn()
    return statistics.median(one_call_ms(fn, cuda) for _ in range(reps))


def bench_back_to_back(fn, reps: int, rounds: int = 1, cuda: bool = True) -> tuple[float, float]:
    """Milliseconds per fn() with ``reps`` calls queued back to back, as in a training loop where the host
    runs ahead of the GPU: launch latency hides behind the previous call's kernels, host syncs do not.
    Returns (the median over ``rounds`` such blocks, the slowest block): a block that a rare stall of the lent
    machine's host hit (a few ms now and then, seen in GPU timelines) shows in the second, not in the first.
    ``reps // 2`` calls first warm the host's path up, as the steps before it do in training: the same run timed
    ``persample mean`` at 72% of the floor after 3 warm-up calls and at 82-83% after hundreds."""
    if not cuda:
        ms = bench(fn, reps, cuda)
        return ms, ms
    for _ in range(max(3, reps // 2)):
        fn()
    blocks = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        blocks.append(start.elapsed_time(end) / reps)
    return statistics.median(blocks), max(blocks)


def alternating_ratio(fn, reference, reps: int, cuda: bool) -> float:
    """The median over ``reps`` rounds of the time of one ``fn()`` over that of one ``reference()``, timed one
    after the other: a change in the machine's speed (a shared host) hits both alike."""
    return statistics.median(one_call_ms(fn, cuda) / one_call_ms(reference, cuda) for _ in range(reps))


def peak_extra(fn, logits_bytes: int, cuda: bool = True) -> float:
    """Peak memory allocated during fn() beyond what was allocated before, in units of the logits."""
    if not cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        held = peak = 0
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        for event in sorted(events, key=lambda e: e.start_ns()):  # every allocation (+) and free (-)
            held += event.nbytes()
            peak = max(peak, held)
        return peak / logits_bytes
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / logits_bytes


def variants(x, target, upstream_rows):
    def autograd(loss_fn, upstream=None):
        def run():
            x.grad = None
            loss = loss_fn(x, target)
            loss.backward(upstream)
            x.grad = None  # dropped inside the timed region, as an optimizer step would consume it
        return run

    out = {
        "persample mean": autograd(lambda x, t: persample.cross_entropy(x, t)),
        "persample none (random upstream)": autograd(
            lambda x, t: persample.cross_entropy(x, t, reduction="none"), upstream_rows),
        "persample cross_entropy_with_grad": lambda: persample.cross_entropy_with_grad(x, target),
        "torch eager mean": autograd(lambda x, t: F.cross_entropy(x, t)),
        "torch eager none (random upstream)": autograd(
            lambda x, t: F.cross_entropy(x, t, reduction="none"), upstream_rows),
        "persample sum": autograd(lambda x, t: persample.cross_entropy(x, t, reduction="sum")),
        "torch eager sum": autograd(lambda x, t: F.cross_entropy(x, t, reduction="sum")),
    }
    if not x.is_cuda:
        return out
    compiled = torch.compile(lambda x, t: F.cross_entropy(x, t))
    compiled_none = torch.compile(lambda x, t: F.cross_entropy(x, t, reduction="none"))
    out["torch.compile mean"] = autograd(compiled)
    out["torch.compile none (random upstream)"] = autograd(compiled_none, upstream_rows)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger_mean, liger_none = LigerCrossEntropyLoss(), LigerCrossEntropyLoss(reduction="none")
        out["liger mean"] = autograd(lambda x, t: liger_mean(x, t))
        out["liger none (random upstream)"] = autograd(lambda x, t: liger_none(x, t), upstream_rows)
    except Exception as exc:  # recorded in the table, not fatal
        out[f"liger ({type(exc).__name__})"] = None
    return out


def check(x, target):
    """Relative error of persample vs float64 PyTorch on this shape (loss and gradient)."""
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, target)
    ref.backward()
    xp = x.detach().clone().requires_grad_()
    loss = persample.cross_entropy(xp, target)
    loss.backward()
    err_loss = abs(loss.double().item() - ref.item()) / abs(ref.item())
    err_grad = ((xp.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
    return err_loss, err_grad


def sweep(x, target, reps):
    """Times persample's forward kernel, with and without the gradient, over (block, warps, programs per SM,
    prefetch) and its elementwise backward over (chunk, warps), to tune launch_config and bwd_config."""
    from persample.kernels import cross_entropy as kernels

    scale = torch.ones(1, device=x.device)

    fwd_default, bwd_default = kernels.launch_config, kernels.bwd_config
    V = x.shape[-1]
    blocks = [b for b in (4096, 8192, 16384, 32768, 65536, 131072) if b // 2 < V * 2]
    for block in blocks:
        for warps in (8, 16, 32):
            for per_sm in (0, 1, 2, 4):
                for prefetch in (False, True) if block >= V and per_sm else (False,):
                    config = (block, warps, per_sm, prefetch)
                    kernels.launch_config = lambda V, size, with_grad=True, c=config: c
                    for with_grad in (True, False):
                        try:
                            ms = bench(lambda w=with_grad: kernels.cross_entropy_fwd(
                                x, target, None, None, scale if w else None, -100, 0.0, 0.0, 0.0, w), reps)
                            print(f"  sweep forward {config} with_grad={with_grad}: {ms:.3f} ms", flush=True)
                        except Exception as exc:
                            print(f"  sweep forward {config}: {type(exc).__name__}", flush=True)
    kernels.launch_config = fwd_default
    _, lse, _, _ = kernels.cross_entropy_fwd(x, target, None, None, None, -100, 0.0, 0.0, 0.0, False)
    upstream = torch.rand(x.shape[0], device=x.device)
    for chunk in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8):
            kernels.bwd_config = lambda V, size, c=(chunk, warps): c
            ms = bench(lambda: kernels.cross_entropy_bwd(x, target, None, None, lse, upstream, -100, 0.0, 0.0, 0.0),
                       reps)
            print(f"  sweep backward chunk={chunk} warps={warps}: {ms:.3f} ms", flush=True)
    kernels.bwd_config = bwd_default


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, to check the script")
    parser.add_argument("--reps", type=int, default=20, help="isolated calls timed per variant")
    parser.add_argument("--queued-reps", type=int, default=50,
                        help="calls queued back to back per block (the host's speed on the lent machines "
                             "varies from call to call: 20 calls gave ratios 20 points apart)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks of queued calls per variant")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's block size and warps")
    add_save_flag(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = args.device
    cuda = device == "cuda"
    shapes = [(256, 1000, torch.float32)] if args.quick else SHAPES if device == "cuda" else CPU_SHAPES

    rows = []
    for N, V, dtype in shapes:
        torch.manual_seed(0)
        x = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
        target = torch.randint(0, V, (N,), device=device)
        target[::17] = -100
        upstream_rows = torch.rand(N, device=device, dtype=dtype)
        logits_bytes = x.numel() * x.element_size()
        err_loss, err_grad = check(x, target)
        copy_ms, _ = bench_back_to_back(lambda x=x: torch.empty_like(x).copy_(x), args.queued_reps, args.rounds, cuda)
        bandwidth = 2 * logits_bytes / copy_ms / 1e6  # GB/s: read + write
        shape = f"{N}x{V} {str(dtype).removeprefix('torch.')}"
        print(f"{shape}: copy {copy_ms:.3f} ms ({bandwidth:.0f} GB/s); persample vs float64: loss rel err "
              f"{err_loss:.1e}, grad rel err {err_grad:.1e}", flush=True)
        if args.sweep:
            sweep(x.detach(), target, args.reps)
        fns = variants(x, target, upstream_rows)
        peaks = {}
        for name, fn in fns.items():
            if fn is None:
                rows.append([shape, name, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "", ""])
                continue
            try:
                ms, slowest = bench_back_to_back(fn, args.queued_reps, args.rounds, cuda)
                alone = bench(fn, args.reps, cuda)
                peaks[name] = extra = peak_extra(fn, logits_bytes, cuda)
                rows.append([shape, name, f"{ms:.3f}", f"{100 * copy_ms / ms:.0f}%", f"{100 * copy_ms / slowest:.0f}%",
                             f"{alone:.3f}", f"{100 * copy_ms / alone:.0f}%", f"{extra:.2f}x", "", ""])
            except Exception as exc:
                rows.append([shape, name, f"crash: {type(exc).__name__}", "", "", "", "", "", "", ""])
            print(" | ".join(rows[-1]), flush=True)
        for row in rows:
            name, reference = row[1], row[1].replace("persample", "torch eager")
            if row[0] == shape and name.startswith("persample ") and name in peaks and reference in peaks:
                time_ratio = alternating_ratio(fns[name], fns[reference], args.reps, cuda)
                # Peaks with the logits counted, as the whole step's memory counts them.
                row[8:] = [f"{time_ratio:.2f}x", f"{(1 + peaks[name]) / (1 + peaks[reference]):.2f}x"]
                print(f"{name} / {reference}: {row[8]} time, {row[9]} memory", flush=True)
        del x

    table = ["| shape | variant | fwd+bwd ms | % of memory floor | % of floor, slowest block | isolated call ms | "
             "% of floor, isolated | extra peak memory (x logits) | time x torch eager | memory x torch eager |",
             "|---|---|---|---|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    section = "cross_entropy" if device == "cuda" else "cross_entropy_cpu"  # a CPU run keeps the GPU table
    context = header(section, device,
                     "memory floor: one read of the logits and one write of the gradient, timed as a device copy "
                     f"of the logits in the same run; fwd+bwd ms: the median of {args.rounds} blocks of "
                     f"{args.queued_reps} calls queued back to back (as in training), next to the slowest block; "
                     "isolated call: the median of single calls with the GPU idle before each (host overhead in "
                     "full); x torch eager: the median ratio of single calls timed in alternation with "
                     "F.cross_entropy's of the same reduction, and the ratio of the peaks (the logits included)")
    publish(section, context + "\n\n" + "\n".join(table), args)

if __name__ == "__main__":
    main()
