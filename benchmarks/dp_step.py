"""One DP-SGD step, side by side: time per step and peak memory of a normal training step, the per-sample
``vmap`` pipeline, the fast engine (``persample.GhostClipping``) and Opacus (hooks, functorch, ghost
clipping), on GPT-style language models, a small CNN and a WRN-16-4 with GroupNorm, in fp32 and bf16 autocast.

    python benchmarks/dp_step.py                 # CUDA, the real sizes (about 5 minutes on an H100)
    python benchmarks/dp_step.py --max-batch     # also the largest batch each fits (doubling search)
    python benchmarks/dp_step.py --models 1      # only GPT-2-small (indices into the model list)
    python benchmarks/dp_step.py --quick         # tiny sizes, runs anywhere (a check of the script)
    python benchmarks/dp_step.py --device cpu --models 0 2 3 --precisions fp32 --iters 3 --warmup 1

Every DP variant clips each example's gradient (the loss of an example is its mean cross-entropy over its
tokens), adds Gaussian noise, averages by the batch size and takes an AdamW step; the normal step is
forward, ``F.cross_entropy`` (mean), backward, AdamW step. A variant that fails is recorded as a crash
with the exception's name (``OOM`` for out of memory). Opacus is tried with the positional embedding
indexed by ``arange(T)``, and if that crashes by ``arange(T).expand(B, T)``, by ``arange(T).repeat(B, 1)``,
then the same with an untied LM head (the label says which ran).
Times are medians over timed steps after warm-up (CUDA events on a GPU, from an idle GPU each); for every
model the normal step and the fast engine are also timed in alternation (the lent machines' host speed
drifts), per round one step each from an idle GPU and then five steps each back to back, as a training loop
runs them; the medians of the per-round ratios are quoted next to the target. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (model, optimizer state and all), absolute and
relative to the normal step, and next to it ``max_memory_reserved``: a CUDA graph keeps its private pool
reserved between replays without counting its free blocks as allocated, so for the graphed variants the
reserved figure is the one to compare (the allocator's cache is emptied after the warm-up, so that it counts
what the timed steps hold, not what the warm-up and the capture left cached). On the CPU it is the peak of the
tensor storage one more step allocates and holds (``cpu_memory.py``: the model and optimizer state, made before
it, are left out). The CUDA-graph
variants (``cuda_graph='step'`` and the normal step captured the same way, its like-for-like baseline) run on
CUDA only. The variants are in ``steps.py``. The table is printed and saved (``results.py``: the dp_step
section of ``RESULTS.md``, dp_step_cpu for the CPU, appended to ``HISTORY.md``).
"""

import argparse
import copy
import gc
import statistics
import sys
import time

import torch
from cpu_memory import step_peak
from results import add_save_flag, header, publish, size
from steps import (
    BASELINES,
    CUDA_ONLY,
    FAST_VARIANTS,
    FULL,
    LAYOUTS,
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    QUICK,
    VARIANTS,
    Config,
    build_model,
    make_batch,
    on_device,
    time_step,
)
from torch.func import functional_call, grad, vmap

import persample

# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "OOM"
    if isinstance(error, ImportError):
        return "not installed"
    return f"crash: {type(error).__name__}"


def run_once(cfg, variant, layout, device, precision, batch, warmup, iters):
    """(median seconds per step, (peak bytes allocated, peak bytes reserved) or None); raises what the variant
    raises. The peaks count from what was held before the variant started: an earlier variant's CUDA graph
    leaves memory behind that no later one should be charged for (cuBLAS keeps the workspace it allocated in
    the graph's pool during the capture)."""
    held = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device.type == "cuda" else None
    base = build_model(cfg, layout)
    model = copy.deepcopy(base).to(device)
    del base
    step = VARIANTS[variant](model, device, precision, batch)
    x, y = make_batch(cfg, batch, device)
    for _ in range(warmup):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
        # The warm-up's cached blocks go back: what stays reserved is what the timed steps hold (a CUDA graph's
        # pool, the eager steps' blocks), not what the warm-up and capture left cached beside them.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = [time_step(step, x, y, device) for _ in range(iters)]
    # Reserved as well: a CUDA graph's pool stays reserved between replays, its blocks not counted as allocated.
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - held[0], torch.cuda.max_memory_reserved() - held[1])
    else:  # one more step, counting the tensor storage it allocates (cpu_memory.py); no allocator, no reserve
        peak = (step_peak(lambda: step(x, y)).peak, None)
    return statistics.median(times), peak


BURST = 5  # steps back to back per round of the alternating timing


def paired_ratios(cfg, device, precision, variants: list[str], warmup: int, rounds: int) -> dict:
    """``{(variant, reference): ((median, lowest, highest) of the per-round ratios variant / reference for one step
    from an idle GPU, the same for BURST steps back to back)}``, with the normal step as the reference of every
    variant and, for a variant in BASELINES, its baseline too. The steps are built side by side and timed in
    alternation, so that a change in the host's speed during the run (on the lent machines it can change by half
    within minutes) hits all alike. One step from an idle GPU exposes all of a step's host time that the GPU
    does not cover; back to back, as in a training loop, the host's work on a step's start overlaps the GPU's on
    the previous step's end."""
    names = list(dict.fromkeys(["normal step", *variants]))
    steps = {name: VARIANTS[name](build_model(cfg).to(device), device, precision, cfg.batch) for name in names}
    x, y = make_batch(cfg, cfg.batch, device)
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    pairs = [(v, "normal step") for v in variants if v != "normal step"]
    pairs += [(v, BASELINES[v]) for v in variants if BASELINES.get(v) in steps]
    ratios = {pair: ([], []) for pair in pairs}
    for _ in range(rounds):
        for kind, burst in enumerate((1, BURST)):
            seconds = {name: time_step(step, x, y, device, burst) for name, step in steps.items()}
            for variant, reference in pairs:
                ratios[(variant, reference)][kind].append(seconds[variant] / seconds[reference])
    del steps
    release(device)
    return {pair: tuple((statistics.median(r), min(r), max(r)) for r in kinds) for pair, kinds in ratios.items()}


def layout_label(layout: tuple[str, bool]) -> str:
    positions = {"arange": [], "expand": ["positions arange(T).expand(B, T)"],
                 "repeat": ["positions arange(T).repeat(B, 1)"]}
    notes = positions[layout[0]] + ([] if layout[1] else ["untied head"])
    return f" [{', '.join(notes)}]" if notes else ""


def measure(cfg, variant, device, precision, warmup, iters):
    """(label, layout, seconds, peak) or (label, None, error string, None); Opacus is tried with each GPT
    layout in turn until one runs."""
    tries = LAYOUTS if variant.startswith("Opacus") and cfg.kind == "gpt" else LAYOUTS[:1]
    first_error = None
    for layout in tries:
        label = variant + layout_label(layout)
        try:
            seconds, peak = run_once(cfg, variant, layout, device, precision, cfg.batch, warmup, iters)
            release(device)
            return label, layout, seconds, peak
        except Exception as error:  # a crash is a result
            message = str(error).strip().splitlines()
            print(f"    {label}: {type(error).__name__}: {message[0][:200] if message else ''}", file=sys.stderr)
            first_error = first_error or failure(error)
            if isinstance(error, ImportError | torch.OutOfMemoryError):
                break
        finally:
            release(device)
    return variant, None, first_error, None


def largest_batch(cfg, variant, layout, device, precision, cap: int, deadline: float) -> str:
    """The largest batch (doubling from the configured one, up to ``cap`` times it) with one step that fits."""
    best, batch = None, cfg.batch
    while batch <= cap * cfg.batch and time.perf_counter() < deadline:
        try:
            run_once(cfg, variant, layout, device, precision, batch, warmup=1, iters=1)
            best = batch
        except Exception:
            break
        finally:
            release(device)
        batch *= 2
    if best is None:
        return "–"
    return f"≥{best}" if best >= cap * cfg.batch else str(best)


def norm_check(cfg: Config, device: torch.device) -> str:
    """The engine's per-example norms against the vmap pipeline's, fp32, on 4 examples."""
    model = build_model(cfg).to(device)
    x, y = make_batch(cfg, 4, device)
    fast = persample.per_sample_grad_norms_fast(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one_loss(params, xb, yb):
        return persample.cross_entropy(functional_call(model, params, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    grads = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, x, y)
    exact = torch.stack([g.flatten(1).double().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    return f"{float(((fast.double() - exact).abs() / exact).max()):.1e}"


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def alternation(ratios: tuple, reference: str) -> str:
    (median, low, high), (burst, burst_low, burst_high) = ratios
    return (f"in alternation with {reference}: {median:.2f}x one step from idle, {low:.2f}-{high:.2f}; "
            f"{burst:.2f}x {BURST} steps back to back, {burst_low:.2f}-{burst_high:.2f}")


FUSED_LOSS = "normal step, persample.cross_entropy"


def time_target(config: str, device: torch.device) -> float:
    """The fast engine's target time as a multiple of the normal step's (issues 18 and 22): on the GPU 1.2x for
    GPT-2-small, 1.3x otherwise; on the CPU 1.5x for the convolutional networks, 1.3x for the GPTs."""
    if device.type == "cuda":
        return 1.2 if "GPT-2-small" in config else 1.3
    return 1.3 if "GPT" in config else 1.5


def targets(rows, paired: dict, device: torch.device) -> list[str]:
    """The issues' targets for the fast engine: at most :func:`time_target` a normal step's time and 1.2x its
    peak memory, faster than Opacus hooks and as lean as Opacus ghost clipping. ``paired``: ``{(config,
    precision): {(variant, reference): ...}}`` from :func:`paired_ratios`."""
    lines = []
    for (config, precision) in dict.fromkeys((r["config"], r["precision"]) for r in rows):
        group = {r["variant"].split(" [")[0]: r for r in rows if (r["config"], r["precision"]) == (config, precision)}
        measured = paired.get((config, precision), {})
        fused = group.get(FUSED_LOSS)
        if fused and not isinstance(fused["seconds"], str) and fused["normal"]:
            line = (f"{config}, {precision}: a normal step with persample.cross_entropy "
                    f"{fused['seconds'] / fused['normal'][0]:.2f}x the time of one with F.cross_entropy")
            if (FUSED_LOSS, "normal step") in measured:
                line += f" ({alternation(measured[(FUSED_LOSS, 'normal step')], 'it')})"
            lines.append(line + " (target on the CPU <= 1.05x)")
        hooks, ghost = group.get("Opacus hooks"), group.get("Opacus ghost clipping")
        for variant in FAST_VARIANTS:
            fast = group.get(variant)
            if fast is None or isinstance(fast["seconds"], str) or not fast["normal"]:
                continue
            normal_s, normal_peak = fast["normal"]
            line = f"{config}, {precision}: {variant} {fast['seconds'] / normal_s:.2f}x time"
            if (variant, "normal step") in measured:
                line += f" ({alternation(measured[(variant, 'normal step')], 'the normal step')})"
            line += f" (target <= {time_target(config, device)}x)"
            if fast["peak"] is not None and normal_peak is not None:
                line += f", {fast['peak'][0] / normal_peak[0]:.2f}x memory"
                line += (f" (target <= 1.2x; reserved {fast['peak'][1] / normal_peak[1]:.2f}x)"
                         if fast["peak"][1] is not None else " (of the step's own tensor storage, cpu_memory.py)")
            vmap = group.get("vmap pipeline")
            if vmap and not isinstance(vmap["seconds"], str):
                line += f"; {fast['seconds'] / vmap['seconds']:.2f}x the time of the vmap pipeline"
            baseline = group.get(BASELINES.get(variant))
            if baseline and not isinstance(baseline["seconds"], str) and baseline["peak"]:
                line += f"; against the {baseline['variant']}: {fast['seconds'] / baseline['seconds']:.2f}x time"
                if (variant, baseline["variant"]) in measured:
                    line += f" ({alternation(measured[(variant, baseline['variant'])], 'it')})"
                line += f" and {fast['peak'][0] / baseline['peak'][0]:.2f}x memory"
                if fast["peak"][1] is not None:
                    line += f" (reserved {fast['peak'][1] / baseline['peak'][1]:.2f}x)"
            if hooks and not isinstance(hooks["seconds"], str):
                line += f"; {fast['seconds'] / hooks['seconds']:.2f}x the time of Opacus hooks"
            if ghost and not isinstance(ghost["seconds"], str) and ghost["peak"]:
                line += f"; {fast['peak'][0] / ghost['peak'][0]:.2f}x the memory of Opacus ghost clipping"
            lines.append(line)
    return lines


def table(rows, with_batch: bool) -> str:
    head = "| model | precision | variant | time / step | × normal | peak memory | × normal | reserved | × normal |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if with_batch:
        head, rule = head + " largest batch |", rule + "---|"
    lines = [head, rule]
    for r in rows:
        if isinstance(r["seconds"], str):
            cells = [r["seconds"], "", "", "", "", ""]
        else:
            ms = r["seconds"] * 1e3
            base = r["normal"]
            cells = [f"{ms:.1f} ms", f"{r['seconds'] / base[0]:.2f}x" if base else ""]
            if r["peak"] is None:
                cells += ["n/a", "", "", ""]
            else:
                for i in range(2):
                    if r["peak"][i] is None:
                        cells += ["n/a", ""]
                        continue
                    cells += [size(r["peak"][i]),
                              f"{r['peak'][i] / base[1][i]:.2f}x" if base and base[1] and base[1][i] else ""]
        line = f"| {r['config']} | {r['precision']} | {r['variant']} | " + " | ".join(cells) + " |"
        if with_batch:
            line += f" {r.get('max_batch', '')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on any machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--models", type=int, nargs="+", metavar="INDEX",
                        help="which models, by index into the list above (default: all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--paired-rounds", type=int, default=20,
                        help="rounds of the alternating normal / fast engine timing (0: skip)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits")
    parser.add_argument("--max-batch-cap", type=int, default=16, help="search up to this multiple of the batch")
    parser.add_argument("--max-batch-budget-s", type=float, default=240.0,
                        help="stop the largest-batch search after this many seconds in all")
    add_save_flag(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    configs = QUICK if args.quick else FULL
    if args.models is not None:
        configs = [configs[i] for i in args.models]
    configs = [on_device(cfg, device) for cfg in configs]
    if args.quick:
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    deadline = time.perf_counter() + args.max_batch_budget_s
    rows, checks, paired = [], [], {}
    for cfg in configs:
        checks.append(f"{cfg.name}: fast engine norms vs vmap(grad), largest relative difference "
                      f"{norm_check(cfg, device)}")
        release(device)
        for precision in args.precisions:
            normal = None
            print(f"{cfg.name}, {precision}", file=sys.stderr)
            for variant in args.variants:
                if variant in CUDA_ONLY and device.type != "cuda":
                    rows.append(dict(config=cfg.name, precision=precision, variant=variant, seconds="CUDA only",
                                     peak=None, normal=normal))
                    continue
                label, layout, seconds, peak = measure(cfg, variant, device, precision, args.warmup, args.iters)
                if variant == "normal step" and not isinstance(seconds, str):
                    normal = (seconds, peak)
                row = dict(config=cfg.name, precision=precision, variant=label, seconds=seconds, peak=peak,
                           normal=normal)
                if args.max_batch and not isinstance(seconds, str):
                    row["max_batch"] = largest_batch(cfg, variant, layout, device, precision, args.max_batch_cap,
                                                     deadline)
                rows.append(row)
                shown = seconds if isinstance(seconds, str) else f"{seconds * 1e3:.1f} ms"
                print(f"  {label}: {shown}" + (f", {peak[0] / 2**30:.2f} GiB" if peak else ""), file=sys.stderr)

    # After every table row, so that the side-by-side steps (CUDA graphs' pools included) weigh on no row's
    # peak memory.
    fast = [v for v in (*FAST_VARIANTS, FUSED_LOSS) if v in args.variants]
    fast += [BASELINES[v] for v in fast if BASELINES.get(v) in args.variants]
    if device.type != "cuda":
        fast = [v for v in fast if v not in CUDA_ONLY]
    if args.paired_rounds and "normal step" in args.variants and fast:
        for cfg in configs:
            for precision in args.precisions:
                paired[(cfg.name, precision)] = paired_ratios(cfg, device, precision, fast, args.warmup,
                                                              args.paired_rounds)
    notes = targets(rows, paired, device) + checks
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = "not installed"
    section = "dp_step" if device.type == "cuda" else "dp_step_cpu"  # a CPU run keeps the GPU table
    context = header(section, device, f"opacus {opacus_version}",
                     f"max_grad_norm={MAX_GRAD_NORM}, noise_multiplier={NOISE_MULTIPLIER}, AdamW")
    publish(section, f"{context}\n\n{table(rows, args.max_batch)}\n\n" + "\n".join(f"- {n}" for n in notes), args)


if __name__ == "__main__":
    main()
