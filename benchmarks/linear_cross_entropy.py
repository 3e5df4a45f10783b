"""Benchmark: persample's chunked linear cross-entropy against plain PyTorch, torch.compile and Liger-Kernel.

Each variant computes ``cross_entropy(hidden @ weight.T, target)`` (mean over counted tokens) and its gradients
w.r.t. ``hidden`` and ``weight``. Reported per variant: the error against a float32 reference, the median time
of forward + backward, and the extra peak memory: the peak during forward + backward minus the inputs already
allocated and minus the gradients returned (``N x d`` and ``V x d``), also as a share of what the full
``N x V`` logits take in the input dtype. A second table times ``linear_cross_entropy_head_grad_norms``.

    python benchmarks/linear_cross_entropy.py                 # CUDA: N=8192 d=4096 V=128256 bfloat16
    python benchmarks/linear_cross_entropy.py --quick         # tiny shapes, any device: checks the script
    python benchmarks/linear_cross_entropy.py --chunk-sizes 256,512   # also persample at these chunk sizes

Prints markdown tables and saves them with the date, device and git commit (``results.py``: the
linear_cross_entropy section of RESULTS.md, appended to HISTORY.md).
Targets (issue 5): extra memory <= 5% of the full logits; time <= Liger's and <= 1.3x plain PyTorch.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from results import add_save_flag, header, publish
from tqdm import tqdm

from persample import linear_cross_entropy, linear_cross_entropy_head_grad_norms

IGNORE = -100


def plain(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target, ignore_index=IGNORE)


def make_variants(chunk_sizes):
    variants = {"persample (default chunk)": lambda h, w, t: linear_cross_entropy(h, w, t)}
    for c in chunk_sizes:
        variants[f"persample (chunk {c})"] = lambda h, w, t, c=c: linear_cross_entropy(h, w, t, chunk_size=c)
    variants["plain F.linear + F.cross_entropy"] = plain
    variants["torch.compile(plain)"] = torch.compile(plain)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        variants["Liger fused linear CE"] = lambda h, w, t: liger(w, h, t)
    except Exception as exc:  # recorded in the table, not fatal
        variants["Liger fused linear CE"] = exc
    return variants


def step(fn, hidden, weight, target):
    loss = fn(hidden, weight, target)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def median_ms(fn, cuda: bool, reps: int) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=100, rep=max(reps * 50, 500), return_mode="median"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_peak_bytes(fn, cuda: bool):
    """Peak allocated during ``fn`` minus what was allocated before and minus what ``fn`` returns."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kept = sum(t.numel() * t.element_size() for t in out)
    del out
    return peak - base - kept


def problem(N, d, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, d, device=device, dtype=dtype, generator=g) / d**0.5).requires_grad_()
    target = torch.randint(0, V, (N,), device=device, generator=g)
    target[::17] = IGNORE  # some padding, as in real batches
    return hidden, weight, target


def reference(hidden, weight, target):
    """float32 loss and gradients of the plain composition."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    out = step(plain, h, w, target)
    return out


def fmt_mib(b):
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def bench_loss(args, device, dtype, cuda):
    N, d, V = args.N, args.d, args.V
    hidden, weight, target = problem(N, d, V, dtype, device)
    logits_bytes = N * V * hidden.element_size()
    ref = reference(hidden, weight, target)
    if cuda:
        torch.cuda.empty_cache()
    rows = []
    plain_ms = liger_ms = None
    for name, fn in tqdm(make_variants(args.chunk_sizes).items(), desc="variants"):
        if isinstance(fn, Exception):
            rows.append((name, f"not available: {type(fn).__name__}: {fn}"[:120], "", "", "", ""))
            continue
        run = lambda fn=fn: step(fn, hidden, weight, target)  # noqa: E731
        try:
            out = run()
            errors = [rel_err(a, b) for a, b in zip(out, ref, strict=True)]
            del out
            ms = median_ms(run, cuda, args.reps)
            extra = extra_peak_bytes(run, cuda)
        except Exception as exc:  # a crashing variant is a result, not a reason to stop
            rows.append((name, f"crash: {type(exc).__name__}: {exc}"[:120], "", "", "", ""))
            if cuda:
                torch.cuda.empty_cache()
            continue
        share = "n/a" if extra is None else f"{100 * extra / logits_bytes:.1f}%"
        rows.append((name, "/".join(f"{e:.1e}" for e in errors), f"{ms:.2f}", fmt_mib(extra), share, ""))
        if name.startswith("plain"):
            plain_ms = ms
        if name.startswith("Liger"):
            liger_ms = ms
        if cuda:
            torch.cuda.empty_cache()
    rows = [(n, e, t, m, s, f"{float(t) / plain_ms:.2f}x" if t and plain_ms else "") for n, e, t, m, s, _ in rows]
    table = ["| variant | rel. error loss/grad_h/grad_W vs fp32 | fwd+bwd ms (median) | extra peak MiB | "
             "extra / full logits | time / plain |", "|---|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    ours = next(r for r in rows if r[0] == "persample (default chunk)")
    verdict = []
    if ours[2]:
        t = float(ours[2])
        if ours[4] != "n/a":
            verdict.append(f"extra memory {ours[4]} of full logits (target <= 5%)")
        if plain_ms:
            verdict.append(f"time {t / plain_ms:.2f}x plain (target <= 1.3x)")
        if liger_ms:
            verdict.append(f"time {t / liger_ms:.2f}x Liger (target <= 1x)")
    return table, "; ".join(verdict), logits_bytes


def bench_norms(args, device, dtype, cuda):
    N, d, V = args.N, args.d, args.V
    B = max(1, N // args.T)
    hidden, weight, target = problem(B * args.T, d, V, dtype, device, seed=1)
    hidden, weight = hidden.detach().view(B, args.T, d), weight.detach()
    target = target.view(B, args.T)
    run = lambda: tuple(linear_cross_entropy_head_grad_norms(hidden, weight, target)[:2])  # noqa: E731
    norms = run()[1]
    # float32 reference for the first two examples, from their materialized gradients.
    errors = []
    for i in range(min(2, B)):
        w = weight.float().requires_grad_()
        loss = F.cross_entropy(F.linear(hidden[i].float(), w), target[i], ignore_index=IGNORE)
        (grad,) = torch.autograd.grad(loss, w)
        errors.append(abs(float(norms[i]) - float(grad.norm())) / float(grad.norm()))
        del grad, w
    ms = median_ms(run, cuda, args.reps)
    extra = extra_peak_bytes(run, cuda)
    return ["| B x T | rel. error of norms vs fp32 | ms (median) | extra peak MiB |", "|---|---|---|---|",
            f"| {B} x {args.T} | {max(errors):.1e} | {ms:.2f} | {fmt_mib(extra)} |"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any device, to check the script")
    parser.add_argument("--N", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--T", type=int, default=1024, help="tokens per example for the grad-norm table")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--chunk-sizes", default="", help="comma-separated extra chunk sizes for persample")
    parser.add_argument("--reps", type=int, default=5)
    add_save_flag(parser)
    args = parser.parse_args()
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    cuda = torch.cuda.is_available()
    if args.quick:
        args.N, args.d, args.V, args.T, args.reps = 96, 32, 1000, 24, 3
        args.dtype = "bfloat16" if cuda else "float32"
    elif not cuda:
        parser.error("the full benchmark needs a CUDA GPU; use --quick on the CPU")
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)

    loss_table, verdict, logits_bytes = bench_loss(args, device, dtype, cuda)
    try:
        norm_table = bench_norms(args, device, dtype, cuda)
    except Exception as exc:  # reported, so that the loss table above still lands in RESULTS.md
        norm_table = [f"crash: {type(exc).__name__}: {exc}"]

    context = header("linear_cross_entropy", device,
                     f"N={args.N} tokens, d={args.d}, V={args.V}, {args.dtype}",
                     f"full logits: {logits_bytes / 2**20:,.0f} MiB")
    text = "\n".join([context, "", *loss_table, "", f"Targets: {verdict or 'n/a'}", "",
                      "Per-example head gradient norms (`linear_cross_entropy_head_grad_norms`, mean per example):",
                      "", *norm_table])
    publish("linear_cross_entropy", text, args)

if __name__ == "__main__":
    main()
