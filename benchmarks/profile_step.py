"""Where the time of one DP step goes: the normal step and the fast engine's step side by side, under the
PyTorch profiler, on one of the models ``dp_step.py`` times.

    python benchmarks/profile_step.py                        # GPT-2-small, bf16 autocast, CUDA
    python benchmarks/profile_step.py --model 0 --precision fp32
    python benchmarks/profile_step.py --quick                # tiny model, CPU, a check of the script

For each step it prints the wall time per step, the GPU (or CPU) time summed over kernels, the number of
kernel launches, and the kernels that take the most time. A step whose wall time is well above its kernel
time is bound by the host (Python and launches), not by the GPU. The steps are ``steps.py``'s. The summary
table is saved (``results.py``: the profile_step section of ``RESULTS.md``, appended to ``HISTORY.md``).
"""

import argparse
import statistics
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


def report(name: str, step, x, y, device, iters: int, top: int) -> tuple[float, float, float]:
    """Prints the profile of ``step``; returns (wall ms, kernel ms, launches) per step (NaN on the CPU)."""
    for _ in range(3):
        step(x, y)
    wall = wall_ms(step, x, y, device, iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
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
    return wall, kernel_ms, launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=int, default=1, help="index into the model list of steps.py (default 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quick", action="store_true")
    add_save_flag(parser)
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    cfg = (QUICK if args.quick else FULL)[args.model if not args.quick else 0]
    x, y = make_batch(cfg, cfg.batch, device)
    print(f"# {cfg.name}, {args.precision}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    lines = [header("profile_step", device, f"{cfg.name}, {args.precision}"), "",
             "| step | wall ms / step | kernel ms / step | launches / step |", "|---|---|---|---|"]
    for name, make in (("normal step", normal_step), ("fast engine", fast_step)):
        model = build_model(cfg).to(device)
        wall, kernel_ms, launches = report(name, make(model, device, args.precision, cfg.batch), x, y, device,
                                           args.iters, args.top)
        lines.append(f"| {name} | {wall:.2f} | {kernel_ms:.2f} | {launches:.0f} |")
    publish("profile_step", "\n".join(lines), args)


if __name__ == "__main__":
    main()
