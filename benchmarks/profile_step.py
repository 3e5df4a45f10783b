"""Where the time of one DP step goes: the normal step and the fast engine's step side by side, under the
PyTorch profiler, on one of the models ``dp_step.py`` times.

    python benchmarks/profile_step.py                        # GPT-2-small, bf16 autocast, CUDA
    python benchmarks/profile_step.py --model 0 --precision fp32
    python benchmarks/profile_step.py --quick                # tiny model, CPU, a check of the script
    python benchmarks/profile_step.py --model 3 --cprofile 30  # also the host's 30 costliest Python functions
    python benchmarks/profile_step.py --cprofile 40 --cprofile-sort cumulative  # ... by time including callees

For each step it prints the wall time per step, the GPU (or CPU) time summed over kernels, the number of
kernel launches, and the kernels that take the most time. A step whose wall time is well above its kernel
time is bound by the host (Python and launches), not by the GPU. The steps are ``steps.py``'s. The summary
table is saved (``results.py``: the profile_step section of ``RESULTS.md``, appended to ``HISTORY.md``).

``--cprofile N`` also runs each step under Python's own profiler (``cProfile``) and prints its ``N`` costliest
functions by their own time: on a GPU, where the engine's eager steps are bound by the host, that is where the
host's time goes (printed only, not saved; cProfile's own cost inflates the times, the ranking stands). With
``--cprofile-sort cumulative`` they are ranked by their time including what they call: the step's phases (the
forward with the engine's hooks, the backward with its rules, the norms, the clipped sums, the optimizer).

``--by-source`` also charges each step's device time to the persample source line that caused it, and saves
those tables too. On a GPU every kernel is found from its launch (the CUDA runtime call carrying the kernel's
correlation id in the profiler's trace) and charged to the innermost Python frame under ``persample/`` around
that launch (the engine's rules, forms and stacks; the model's forward in ``persample/models.py``) and to the
innermost aten op there; a kernel launched from no persample frame (autograd's backward ops, the optimizer) gets
``-`` as its source. On the CPU each aten op's own time (its child ops' excluded) is charged the same way.
"""

import argparse
import collections
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time

import torch
from results import add_save_flag, header, publish
from steps import FULL, QUICK, build_model, fast_step, make_batch, normal_step
from torch.profiler import ProfilerActivity, profile


def wall_ms(step, x, y, device, iters: int) -> float:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _source(name: str) -> str | None:
    """``file.py(line): function`` under ``persample/`` (or its kernels) for a Python frame's event name, else
    None."""
    for root in ("/persample/", "/kernels/"):
        if root in name:
            tail = name.split(root)[-1]
            return ("kernels/" + tail) if root == "/kernels/" else tail
    return None


def _by_source_cuda(prof) -> collections.Counter:
    """``{(source, op): microseconds}`` of the GPU's kernels (and copies, memsets) over the profiled steps."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    frames = collections.defaultdict(list)  # thread -> Python frames and CPU ops, sorted below
    for e in events:
        if e.get("cat") in ("python_function", "cpu_op"):
            frames[e["tid"]].append(e)
    queries = collections.defaultdict(list)
    found = set()
    for k in device:
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is not None:
            queries[launch["tid"]].append((launch["ts"], k))
    spent: collections.Counter = collections.Counter()
    for tid, asks in queries.items():
        # A sweep over the thread's events in time order, keeping the stack of those open at each launch.
        ordered = sorted(frames[tid], key=lambda e: (e["ts"], -e["dur"]))
        i, stack = 0, []
        for ts, k in sorted(asks, key=lambda q: q[0]):
            while i < len(ordered) and ordered[i]["ts"] <= ts:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < ordered[i]["ts"]:
                    stack.pop()
                stack.append(ordered[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
                stack.pop()
            source = next((s for e in reversed(stack) if e["cat"] == "python_function"
                           and (s := _source(e["name"])) is not None), None)
            op = next((e["name"] for e in reversed(stack) if e["cat"] == "cpu_op"), k["name"][:60])
            spent[(source or "-", op)] += k["dur"]
            found.add(id(k))
    unfound = sum(k["dur"] for k in device if id(k) not in found)
    if unfound:
        spent[("-", "(kernels whose launch the trace does not show)")] += unfound
    return spent


def _by_source_cpu(prof) -> collections.Counter:
    """``{(source, op): microseconds}`` of the aten ops' own time (their children's excluded)."""
    spent: collections.Counter = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        parent, source = e.cpu_parent, None
        while parent is not None and source is None:
            source = _source(parent.name)
            parent = parent.cpu_parent
        spent[(source or "-", e.name)] += e.self_cpu_time_total
    return spent


def by_source_table(title: str, spent: collections.Counter, top: int) -> list[str]:
    """``spent`` (``{(source, op): ms per step}``) as a Markdown table of its ``top`` lines, the rest summed."""
    total = sum(spent.values())
    lines = [f"### {title}: {total:.2f} ms per step by source", "",
             "| source (innermost persample frame) | op | ms / step | share |", "|---|---|---|---|"]
    for (source, op), ms in spent.most_common(top):
        lines.append(f"| {source} | {op} | {ms:.3f} | {ms / total:.1%} |")
    rest = total - sum(ms for _, ms in spent.most_common(top))
    if rest > 0:
        lines.append(f"| (the other {max(0, len(spent) - top)} lines) |  | {rest:.3f} | {rest / total:.1%} |")
    return lines + [""]


def report(name: str, step, x, y, device, iters: int, top: int, by_source: bool = False
           ) -> tuple[float, float, float, collections.Counter | None]:
    """Prints the profile of ``step``; returns (wall ms, kernel ms, launches) per step (NaN on the CPU) and, with
    ``by_source``, ``{(source, op): ms per step}``."""
    for _ in range(3):
        step(x, y)
    wall = wall_ms(step, x, y, device, iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=by_source) as prof:
        for _ in range(iters):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / iters
        launches = sum(e.count for e in kernels) / iters
        sort = "self_cuda_time_total"
    else:
        kernel_ms, launches, sort = float("nan"), float("nan"), "self_cpu_time_total"
    print(f"\n## {name}: wall {wall:.2f} ms/step, kernels {kernel_ms:.2f} ms/step, {launches:.0f} launches/step")
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=70))
    spent = None
    if by_source:
        spent = _by_source_cuda(prof) if device.type == "cuda" else _by_source_cpu(prof)
        spent = collections.Counter({key: us / 1e3 / iters for key, us in spent.items()})
    return wall, kernel_ms, launches, spent


def host_profile(name: str, step, x, y, device, iters: int, top: int, sort: str = "tottime") -> None:
    """Prints the ``top`` Python functions of ``iters`` steps of ``step`` (warmed up by :func:`report`) under
    cProfile, by their own time (``sort="tottime"``) or including their callees' (``"cumulative"``)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    by = "own time" if sort == "tottime" else "time including callees"
    print(f"\n## {name}: Python functions by {by} over {iters} steps (cProfile)")
    pstats.Stats(profiler).sort_stats(sort).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=int, default=1, help="index into the model list of steps.py (default 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--by-source", action="store_true",
                        help="also charge each step's device time to the persample source lines that launched it")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print each step's N costliest Python functions (cProfile, by own time)")
    parser.add_argument("--cprofile-sort", choices=("tottime", "cumulative"), default="tottime",
                        help="rank --cprofile's functions by own time or by time including callees")
    parser.add_argument("--quick", action="store_true")
    add_save_flag(parser)
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    cfg = (QUICK if args.quick else FULL)[args.model if not args.quick else 0]
    x, y = make_batch(cfg, cfg.batch, device)
    print(f"# {cfg.name}, {args.precision}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    lines = [header("profile_step", device, f"{cfg.name}, {args.precision}"), "",
             "| step | wall ms / step | kernel ms / step | launches / step |", "|---|---|---|---|"]
    sources = []
    for name, make in (("normal step", normal_step), ("fast engine", fast_step)):
        step = make(build_model(cfg).to(device), device, args.precision, cfg.batch)
        wall, kernel_ms, launches, spent = report(name, step, x, y, device, args.iters, args.top, args.by_source)
        lines.append(f"| {name} | {wall:.2f} | {kernel_ms:.2f} | {launches:.0f} |")
        if spent is not None:
            sources += by_source_table(name, spent, args.top)
        if args.cprofile:
            host_profile(name, step, x, y, device, args.iters, args.cprofile, args.cprofile_sort)
    publish("profile_step", "\n".join([*lines, "", *sources]).rstrip(), args)


if __name__ == "__main__":
    main()
