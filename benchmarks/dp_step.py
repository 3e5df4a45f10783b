"""One DP-SGD step, side by side: time per step and peak memory of a normal training step, the per-sample
``vmap`` pipeline, the fast engine (``persample.GhostClipping``) and Opacus (hooks, functorch, ghost
clipping), on GPT-style language models in fp32 and bf16 autocast and on a small CNN.

    python benchmarks/dp_step.py                 # CUDA, the real sizes (about 5 minutes on an H100)
    python benchmarks/dp_step.py --max-batch     # also the largest batch each fits (doubling search)
    python benchmarks/dp_step.py --models 1      # only GPT-2-small (indices into the model list)
    python benchmarks/dp_step.py --quick         # tiny sizes, runs anywhere (a check of the script)

Every DP variant clips each example's gradient (the loss of an example is its mean cross-entropy over its
tokens), adds Gaussian noise, averages by the batch size and takes an AdamW step; the normal step is
forward, ``F.cross_entropy`` (mean), backward, AdamW step. A variant that fails is recorded as a crash
with the exception's name (``OOM`` for out of memory). Opacus is tried with the positional embedding
indexed by ``arange(T)``, and if that crashes by ``arange(T).expand(B, T)``, by ``arange(T).repeat(B, 1)``,
then the same with an untied LM head (the label says which ran).
Times are medians over timed steps after warm-up (CUDA events on a GPU, from an idle GPU each); on the GPT
models the normal step and the fast engine are also timed in alternation (the lent machines' host speed
drifts), per round one step each from an idle GPU and then five steps each back to back, as a training loop
runs them; the medians of the per-round ratios are quoted next to the target. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (model, optimizer state and all), absolute and
relative to the normal step, and next to it ``max_memory_reserved``: a CUDA graph keeps its private pool
reserved between replays without counting its free blocks as allocated, so for the graphed variants the
reserved figure is the one to compare. The CUDA-graph variants (``cuda_graph='step'`` and the normal step
captured the same way, its like-for-like baseline) run on CUDA only. The table is printed and appended to
``benchmarks/RESULTS.md``.
"""

import argparse
import copy
import gc
import os
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import CNN, GPT  # noqa: E402

import persample  # noqa: E402

MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-4


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "gpt" or "cnn"
    batch: int
    seq: int = 0  # GPT
    vocab: int = 0
    d: int = 0
    layers: int = 0
    heads: int = 0
    size: int = 0  # CNN image side
    classes: int = 10


FULL = [
    Config("GPT d=384 L=4 V=8192 B=32 T=128", "gpt", batch=32, seq=128, vocab=8192, d=384, layers=4, heads=6),
    Config("GPT-2-small d=768 L=12 V=32000 B=16 T=256", "gpt", batch=16, seq=256, vocab=32000, d=768, layers=12,
           heads=12),
    Config("CNN 3 conv B=256 32x32", "cnn", batch=256, size=32),
]
QUICK = [
    Config("tiny GPT d=32 L=2 V=128 B=4 T=16", "gpt", batch=4, seq=16, vocab=128, d=32, layers=2, heads=2),
    Config("tiny CNN B=8 16x16", "cnn", batch=8, size=16),
]


# How a GPT is built: (positions, tied). Ours always run the first; Opacus tries them in order.
LAYOUTS = [(positions, tied) for tied in (True, False) for positions in ("arange", "expand", "repeat")]


def build_model(cfg: Config, layout: tuple[str, bool] = LAYOUTS[0]) -> nn.Module:
    torch.manual_seed(0)
    if cfg.kind == "gpt":
        return GPT(cfg.vocab, cfg.d, cfg.layers, cfg.heads, cfg.seq, positions=layout[0], tied=layout[1])
    return CNN(cfg.classes)


def make_batch(cfg: Config, batch: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(1)
    if cfg.kind == "gpt":
        x = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
        y = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
    else:
        x = torch.randn(batch, 3, cfg.size, cfg.size, generator=g)
        y = torch.randint(0, cfg.classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)


def noisy_step(named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, summed: dict, batch: int) -> None:
    """Gaussian noise on the clipped sums, average by the (expected) batch size, AdamW step: one ``randn``
    for all parameters and ``foreach`` updates, so that the noise is a few kernels, not three per tensor.
    ``named`` is ``list(model.named_parameters())``, listed once per run rather than walked every step."""
    params = [p for name, p in named if name in summed]
    grads = [summed[name] for name, p in named if name in summed]
    noise = torch.randn(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
    noise = [n.view_as(g) for n, g in zip(noise.split([g.numel() for g in grads]), grads, strict=True)]
    torch._foreach_add_(grads, noise, alpha=NOISE_MULTIPLIER * MAX_GRAD_NORM)
    torch._foreach_div_(grads, batch)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------
# The variants: each builds its optimizer (and wrappers) around a fresh model and returns step(x, y).
# ---------------------------------------------------------------------------------------------------


def normal_step(model, device, precision, batch, fused=False):
    opt = adamw(model)

    def step(x, y):
        with autocast(device, precision):
            logits = model(x)
            if fused:
                loss = persample.cross_entropy(logits, y)
            else:
                loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def graphed_normal_step(model, device, precision, batch):
    """The normal step with its forward and backward captured once in a CUDA graph and replayed (PyTorch's
    partial-network capture: the gradients are the graph's static tensors, the AdamW step runs eagerly): the
    like-for-like baseline of the engine's ``cuda_graph="step"``."""
    opt = adamw(model)
    captured = {}

    def forward_backward(x, y):
        # No autocast cache: its casts would be allocated and freed inside the capture.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
        loss.backward()

    def step(x, y):
        if not captured:
            static = x.clone(), y.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    opt.zero_grad(set_to_none=True)
                    forward_backward(*static)
            torch.cuda.current_stream().wait_stream(side)
            opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward_backward(*static)
            captured.update(graph=graph, static=static)
        for buffer, value in zip(captured["static"], (x, y), strict=True):
            buffer.copy_(value)
        captured["graph"].replay()
        opt.step()  # no zero_grad: the replay writes the gradients anew

    return step


def vmap_step(model, device, precision, batch):
    """The per-sample pipeline: ``persample.per_sample_grads`` when present (issue 3), else the same
    ``functional_call`` + ``vmap(grad)`` recipe spelled here; then clip, sum, noise."""
    opt = adamw(model)
    named = list(model.named_parameters())
    pipeline = getattr(persample, "per_sample_grads", None)
    names = [n for n, p in named if p.requires_grad]

    def one_loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return persample.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def step(x, y):
        with autocast(device, precision):
            if pipeline is not None:
                grads = pipeline(model, x, y)
            else:
                grads = per_example({n: p.detach() for n, p in model.named_parameters() if n in names}, x, y)
        norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
        factors = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
        summed = {n: torch.einsum("b,b...->...", factors.to(g.dtype), g).to(torch.float32) for n, g in grads.items()}
        del grads
        noisy_step(named, opt, summed, batch)

    return step


def fast_step(model, device, precision, batch, cuda_graph=None):
    opt = adamw(model)
    named = list(model.named_parameters())
    engine = persample.GhostClipping(model, max_grad_norm=MAX_GRAD_NORM, cuda_graph=cuda_graph)

    def step(x, y):
        with autocast(device, precision):
            out = engine.clipped_grad_sum(x, y)
        noisy_step(named, opt, out.grads, batch)

    return step


def opacus_step(model, device, precision, batch, mode):
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    options = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=batch,
                   loss_reduction="mean")
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                       max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(adamw(model), **options)
        criterion = DPLossFastGradientClipping(wrapped, opt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def step(x, y):
            with autocast(device, precision):
                logits = wrapped(x)
                shape = logits.shape if logits.ndim == 3 else None
                loss = criterion(logits.flatten(0, -2), y.flatten(), shape=shape)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    opt = DPOptimizer(adamw(model), **options)

    def step(x, y):
        with autocast(device, precision):
            loss = F.cross_entropy(wrapped(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


VARIANTS = {
    "normal step": lambda m, d, p, b: normal_step(m, d, p, b),
    "normal step, persample.cross_entropy": lambda m, d, p, b: normal_step(m, d, p, b, fused=True),
    "vmap pipeline": vmap_step,
    "fast engine (GhostClipping)": fast_step,
    "fast engine, cuda_graph='post'": lambda m, d, p, b: fast_step(m, d, p, b, cuda_graph="post"),
    "normal step, CUDA graph": graphed_normal_step,
    "fast engine, cuda_graph='step'": lambda m, d, p, b: fast_step(m, d, p, b, cuda_graph="step"),
    "Opacus hooks": lambda m, d, p, b: opacus_step(m, d, p, b, "hooks"),
    "Opacus functorch": lambda m, d, p, b: opacus_step(m, d, p, b, "functorch"),
    "Opacus ghost clipping": lambda m, d, p, b: opacus_step(m, d, p, b, "ghost"),
}

FAST_VARIANTS = ("fast engine (GhostClipping)", "fast engine, cuda_graph='post'", "fast engine, cuda_graph='step'")
# Variants that run only on CUDA, and the like-for-like baseline of a fast variant besides the normal step.
CUDA_ONLY = ("normal step, CUDA graph", "fast engine, cuda_graph='step'")
BASELINES = {"fast engine, cuda_graph='step'": "normal step, CUDA graph"}


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
        torch.cuda.reset_peak_memory_stats()
    times = [time_step(step, x, y, device) for _ in range(iters)]
    # Reserved as well: a CUDA graph's pool stays reserved between replays, its blocks not counted as allocated.
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - held[0], torch.cuda.max_memory_reserved() - held[1])
    return statistics.median(times), peak


def time_step(step, x, y, device: torch.device, steps: int = 1) -> float:
    """Seconds per step of ``steps`` steps run back to back from an idle GPU (CUDA events), or of host time on
    the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        return (time.perf_counter() - start) / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step(x, y)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


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


def header(device: torch.device, quick: bool) -> str:
    """The section title and the run's context, in the format of the other sections of RESULTS.md."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git: the caller may name the commit
        commit = os.environ.get("PERSAMPLE_COMMIT", "unknown")
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = "not installed"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/dp_step.py", *sys.argv[1:]])
    title = f"## dp_step{' (quick: a check of the script, not a measurement)' if quick else ''}"
    return (f"{title} — {date} — {gpu} — commit {commit}\n\n`{command}`; torch {torch.__version__}, opacus "
            f"{opacus_version}; max_grad_norm={MAX_GRAD_NORM}, noise_multiplier={NOISE_MULTIPLIER}, AdamW.")


def alternation(ratios: tuple, reference: str) -> str:
    (median, low, high), (burst, burst_low, burst_high) = ratios
    return (f"in alternation with {reference}: {median:.2f}x one step from idle, {low:.2f}-{high:.2f}; "
            f"{burst:.2f}x {BURST} steps back to back, {burst_low:.2f}-{burst_high:.2f}")


def targets(rows, paired: dict) -> list[str]:
    """The issue's targets for the fast engine on the GPT models: <= 1.3x a normal step's time and <= 1.2x its
    peak memory, faster than Opacus hooks and as lean as Opacus ghost clipping. ``paired``: ``{(config,
    precision): {(variant, reference): ...}}`` from :func:`paired_ratios`."""
    lines = []
    for (config, precision) in dict.fromkeys((r["config"], r["precision"]) for r in rows if "GPT" in r["config"]):
        group = {r["variant"].split(" [")[0]: r for r in rows if (r["config"], r["precision"]) == (config, precision)}
        hooks, ghost = group.get("Opacus hooks"), group.get("Opacus ghost clipping")
        for variant in FAST_VARIANTS:
            fast = group.get(variant)
            if fast is None or isinstance(fast["seconds"], str) or not fast["normal"] or fast["peak"] is None:
                continue
            normal_s, normal_peak = fast["normal"]
            line = f"{config}, {precision}: {variant} {fast['seconds'] / normal_s:.2f}x time"
            measured = paired.get((config, precision), {})
            if (variant, "normal step") in measured:
                line += f" ({alternation(measured[(variant, 'normal step')], 'the normal step')})"
            line += (f" (target <= 1.3x), {fast['peak'][0] / normal_peak[0]:.2f}x memory (target <= 1.2x; reserved "
                     f"{fast['peak'][1] / normal_peak[1]:.2f}x)")
            baseline = group.get(BASELINES.get(variant))
            if baseline and not isinstance(baseline["seconds"], str) and baseline["peak"]:
                line += f"; against the {baseline['variant']}: {fast['seconds'] / baseline['seconds']:.2f}x time"
                if (variant, baseline["variant"]) in measured:
                    line += f" ({alternation(measured[(variant, baseline['variant'])], 'it')})"
                line += (f" and {fast['peak'][0] / baseline['peak'][0]:.2f}x memory (reserved "
                         f"{fast['peak'][1] / baseline['peak'][1]:.2f}x)")
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
                    cells += [f"{r['peak'][i] / 2**30:.2f} GiB",
                              f"{r['peak'][i] / base[1][i]:.2f}x" if base and base[1] else ""]
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
                        help="rounds of the alternating normal / fast engine timing on the GPT models (0: skip)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits")
    parser.add_argument("--max-batch-cap", type=int, default=16, help="search up to this multiple of the batch")
    parser.add_argument("--max-batch-budget-s", type=float, default=240.0,
                        help="stop the largest-batch search after this many seconds in all")
    parser.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--no-save", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    configs = QUICK if args.quick else FULL
    if args.models is not None:
        configs = [configs[i] for i in args.models]
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
    fast = [v for v in FAST_VARIANTS if v in args.variants]
    fast += [BASELINES[v] for v in fast if BASELINES.get(v) in args.variants]
    if device.type != "cuda":
        fast = [v for v in fast if v not in CUDA_ONLY]
    if args.paired_rounds and "normal step" in args.variants and fast:
        for cfg in configs:
            for precision in args.precisions if cfg.kind == "gpt" else ():
                paired[(cfg.name, precision)] = paired_ratios(cfg, device, precision, fast, args.warmup,
                                                              args.paired_rounds)
    notes = targets(rows, paired) + checks
    report = (f"{header(device, args.quick)}\n\n{table(rows, args.max_batch)}\n\n"
              + "\n".join(f"- {n}" for n in notes) + "\n")
    print(report)
    if not args.no_save:
        with open(args.results, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
