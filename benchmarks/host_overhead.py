"""The host side of a DP step, on the CPU: how many ops and how much Python a normal step and the fast
engine's step cost on tiny models of the benchmark's structures, where the arithmetic is negligible.

    python benchmarks/host_overhead.py                 # GPT, WRN and CNN, fp32 and bf16 autocast
    python benchmarks/host_overhead.py --models wrn    # one of them
    python benchmarks/host_overhead.py --cprofile 25   # also the engine's 25 costliest Python functions
    python benchmarks/host_overhead.py --quick         # a few steps, fp32: a check of the script
    TRITON_INTERPRET=1 python benchmarks/host_overhead.py   # the GPU's code path: Triton kernels counted

The models: the GPT d=64 L=12 of ``dp_step.py``'s GPT-2-small structure (12 blocks), WRN-16-2 on 20x20 images
and the CNN at width 8 on 16x16 images: sizes at which each convolution keeps the form (materialized or
factored, :mod:`persample.engine.rules.conv`) it keeps in ``dp_step.py``'s WRN-16-4 and CNN on 32x32 images
(``tests/test_benchmarks.py`` checks it), so that the engine runs the same code per layer.

On a GPU a step of small kernels is bound by the host: each op is one launch and a few microseconds of
Python and dispatch. Here each CPU aten op that computes (a leaf of the op tree that is not a view or an
allocation) stands for one kernel launch. Two steps are compared: ``grad`` — forward and backward
(``loss.backward()`` against ``GhostClipping.clipped_grad_sum``), and ``step`` — the whole DP step of
``dp_step.py`` (the normal one with AdamW; the engine's with noise and AdamW). Times are medians of
``time.perf_counter`` over single-threaded steps, taken in turns. The steps are ``steps.py``'s. Prints a table
and saves it (``results.py``: the host_overhead section of ``RESULTS.md``, appended to ``HISTORY.md``).

With ``TRITON_INTERPRET=1`` the engine takes the code path it takes on a GPU (its Triton kernels, run by the
interpreter): each Triton launch counts as one op (the interpreter's own copies around it do not), and the time
spent inside the launches, the interpreter's, is left out of the times (so is a real launch's own host cost,
a few microseconds each): what remains is the step's Python and its PyTorch ops on the GPU's path (section
host_overhead_triton). Where no GPU is lent, these are how a change to the engine's host cost is measured.
"""

import argparse
import cProfile
import pstats
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from results import add_save_flag, header, publish
from steps import Config, build_model, fast_step, make_batch, normal_step
from torch.profiler import ProfilerActivity, profile, record_function

import persample
from persample.kernels.launch import Launcher, interpreting

MODELS = {
    "gpt": Config("GPT d=64 L=12 V=256 B=4 T=16", "gpt", batch=4, seq=16, vocab=256, d=64, layers=12, heads=2),
    "wrn": Config("WRN-16-2 GroupNorm B=4 20x20", "wrn", batch=4, size=20, depth=16, widen=2),
    "cnn": Config("CNN width 8 B=4 16x16", "cnn", batch=4, size=16, width=8),
}

# Ops that launch no kernel on a GPU: views, metadata and allocations.
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided",
    "aten::expand", "aten::expand_as", "aten::transpose", "aten::t", "aten::permute", "aten::squeeze",
    "aten::unsqueeze", "aten::select", "aten::slice", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::chunk", "aten::narrow", "aten::detach", "aten::detach_", "aten::alias", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh", "aten::result_type",
    "aten::flatten", "aten::view_as", "aten::numpy_T", "aten::matrix_H", "aten::set_", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::type_as", "aten::requires_grad_", "aten::_has_compatible_shallow_copy_type", "aten::size",
    "aten::stride", "aten::dim", "aten::resolve_conj", "aten::resolve_neg", "aten::conj", "aten::_conj",
}


def grad_steps(model, precision: str):
    """``(normal, engine)``: forward and backward only, no optimizer."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    engine = persample.GhostClipping(model, max_grad_norm=1.0)

    def normal(x, y):
        with amp:
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def fast(x, y):
        with amp:
            engine.clipped_grad_sum(x, y)

    return normal, fast


_in_launches = [0.0]  # seconds spent inside Triton launches so far (the interpreter's)


def _record_triton_launches() -> None:
    """Under the interpreter, every Triton launch becomes one profiler event ``triton::<kernel>``, around the
    interpreter's work (which is not what a GPU would launch), and the time spent in it is added up."""
    launch = Launcher.__call__

    def recorded(self, grid, *args):
        start = time.perf_counter()
        try:
            with record_function(f"triton::{getattr(getattr(self._kernel, 'fn', None), '__name__', 'kernel')}"):
                return launch(self, grid, *args)
        finally:
            _in_launches[0] += time.perf_counter() - start

    Launcher.__call__ = recorded


def _kernels(event) -> int:
    """The launches an op stands for: a ``_foreach_`` op is one (a multi-tensor kernel on a GPU, a loop over
    the tensors here), and so is a ``persample::`` op (a Triton kernel on a GPU, its PyTorch formulas here) and
    a Triton launch in the interpreter; an op that calls no computing op is one, a composite is the sum of its
    parts."""
    if event.name.startswith(("aten::_foreach_", "persample::", "triton::")):
        return 1
    inner = sum(_kernels(c) for c in event.cpu_children)
    if inner == 0 and event.name.startswith("aten::") and event.name not in _NO_KERNEL:
        return 1
    return inner


def count_ops(step, x, y, iters: int) -> tuple[float, float]:
    """``(kernel ops, all aten ops)`` per step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step(x, y)
    events = prof.events()
    kernels = sum(_kernels(e) for e in events if e.cpu_parent is None)
    return kernels / iters, sum(e.name.startswith("aten::") for e in events) / iters


def time_ms(steps, x, y, iters: int) -> list[float]:
    """Median ms per step of each step, timed in turns so that a change in the machine's load hits all; the time
    inside Triton launches left out."""
    times = [[] for _ in steps]
    for _ in range(iters):
        for step, spent in zip(steps, times, strict=True):
            launched, start = _in_launches[0], time.perf_counter()
            step(x, y)
            spent.append((time.perf_counter() - start - (_in_launches[0] - launched)) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=tuple(MODELS))
    parser.add_argument("--iters", type=int, help="timed steps of each (default 50; 15 in the interpreter, where "
                        "each engine step runs its Triton kernels in Python)")
    parser.add_argument("--cprofile", type=int, default=0, help="print the engine's N costliest functions")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, fp32 only: a check of the script")
    add_save_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.iters, args.precision, args.models = min(args.iters or 3, 3), "fp32", args.models[:1]
    torch.set_num_threads(1)
    triton = interpreting()
    args.iters = args.iters or (15 if triton else 50)
    if triton:
        _record_triton_launches()
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    rows = []
    for cfg in (MODELS[name] for name in args.models):
        x, y = make_batch(cfg, cfg.batch, torch.device("cpu"))
        for precision in precisions:
            for kind in ("grad", "step"):
                if kind == "grad":
                    steps = grad_steps(build_model(cfg), precision)
                else:
                    steps = tuple(make(build_model(cfg), torch.device("cpu"), precision, cfg.batch)
                                  for make in (normal_step, fast_step))
                for step in steps:
                    for _ in range(5):
                        step(x, y)
                ops = [count_ops(step, x, y, 5) for step in steps]
                ms = time_ms(steps, x, y, args.iters)
                rows.append((cfg.name, precision, kind, *((*o, t) for o, t in zip(ops, ms, strict=True))))
                if args.cprofile and kind == "grad":
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(20):
                        steps[1](x, y)
                    profiler.disable()
                    print(f"\n## {cfg.name}: engine {precision} grad, 20 steps")
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    section = "host_overhead_triton" if triton else "host_overhead"
    path = (", the Triton path through the interpreter (the time inside Triton launches left out)" if triton
            else "")
    lines = [header(section, "cpu", f"1 thread{path}"), "",
             "| model | precision | what | normal ops | engine ops | ratio | normal ms | engine ms | ratio "
             "| normal aten | engine aten |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, precision, kind, (n_ops, n_aten, n_ms), (e_ops, e_aten, e_ms) in rows:
        lines.append(f"| {name} | {precision} | {kind} | {n_ops:.0f} | {e_ops:.0f} | {e_ops / n_ops:.2f}x "
                     f"| {n_ms:.2f} | {e_ms:.2f} | {e_ms / n_ms:.2f}x | {n_aten:.0f} | {e_aten:.0f} |")
    publish(section, "\n".join(lines), args)


if __name__ == "__main__":
    main()
