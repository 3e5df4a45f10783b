"""The user's own training loop made private, side by side: time per logical step and peak memory of a normal
step, Opacus 1.6's ``PrivacyEngine.make_private`` (hooks, and ghost clipping with its criterion) and
``persample.PrivacyEngine.make_private`` (the fast engine; with and without the criterion) and, for what
``make_private`` adds, the engine in its own loop (``GhostClipping`` + ``DPOptimizer``), on the digits CNN, a
small GPT and (CUDA only) a GPT-2-small-sized model, in fp32 and bf16 autocast.

    python benchmarks/make_private.py                 # CUDA if present, else the CPU sizes
    python benchmarks/make_private.py --device cpu    # the CPU sizes
    python benchmarks/make_private.py --quick         # tiny sizes, a check of the script

Every variant runs the same loop body on the same fixed batch (the loaders' Poisson batches vary in size, which
would only add spread): ``optimizer.zero_grad(); loss = criterion(model(x), y); loss.backward();
optimizer.step()`` with AdamW, noise_multiplier 1 and max_grad_norm 1 for the private ones; a GPT's loss is the
cross-entropy of the logits flattened to ``(B * T, V)``. The GPTs index their positional table with
``arange(T).expand(B, T)`` and tie the head to the token table, the layout Opacus's hooks accept; Opacus's ghost
clipping refuses tied weights, so it also runs with an untied head (a model with ``V * d`` more parameters) and
the positions as a contiguous ``arange(T).repeat(B, 1)`` (it fails on the expanded one). Times
are medians of the timed steps after warm-up, the variants built side by side and timed in alternation, one step
each per round (CUDA synchronized around each step), so that a change in the host's speed hits all alike. On the
CPU the time is the process's CPU time with one thread (``time.process_time``): on a shared machine, wall time
measures the other jobs as much as the step. Peak memory is ``torch.cuda.max_memory_allocated`` over one step after
a warm-up step with the variant alone on the GPU (model, optimizer state and all); on the CPU, the peak of the
tensor storage that one step after a warm-up step allocates and holds (``cpu_memory.py``: the model and the
optimizer's state, made before the step, are left out, so its ratios are larger than a GPU's). A variant that fails
is recorded with the exception's name (``OOM`` for out of memory). Prints a table and saves it
(``results.py``: the make_private section of RESULTS.md, make_private_cpu for the CPU; ``--no-save``: do not).
"""

import argparse
import gc
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from cpu_memory import StepMemory, step_peak
from results import add_save_flag, header, publish, size
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import persample
from persample.app.digits import DigitsCNN
from persample.models import GPT

MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-4


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "cnn" (digits, 1x8x8) or "gpt"
    batch: int
    seq: int = 0
    vocab: int = 0
    d: int = 0
    layers: int = 0
    heads: int = 0


DIGITS = Config("digits CNN B=64", "cnn", batch=64)
CUDA = [DIGITS,
        Config("GPT d=384 L=4 V=8192 B=32 T=128", "gpt", batch=32, seq=128, vocab=8192, d=384, layers=4, heads=6),
        Config("GPT-2-small d=768 L=12 V=32000 B=16 T=256", "gpt", batch=16, seq=256, vocab=32000, d=768, layers=12,
               heads=12)]
CPU = [DIGITS, Config("GPT d=128 L=2 V=2048 B=8 T=64", "gpt", batch=8, seq=64, vocab=2048, d=128, layers=2, heads=4)]
QUICK = [Config("digits CNN B=16", "cnn", batch=16),
         Config("tiny GPT d=32 L=2 V=128 B=4 T=16", "gpt", batch=4, seq=16, vocab=128, d=32, layers=2, heads=2)]


def build(cfg: Config, tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if cfg.kind == "cnn":
        return DigitsCNN()
    # Opacus's ghost norm of an embedding views its indices, which needs them contiguous: "repeat", not "expand".
    return GPT(cfg.vocab, cfg.d, cfg.layers, cfg.heads, cfg.seq, positions="expand" if tied else "repeat", tied=tied)


def batch_of(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if cfg.kind == "cnn":
        x, y = torch.randn(cfg.batch, 1, 8, 8, generator=g), torch.randint(0, 10, (cfg.batch,), generator=g)
    else:
        x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
        y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    return x.to(device), y.to(device)


def loader_of(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    """A loader whose batch size is the benchmark's: ``make_private`` reads its sample rate from it."""
    return DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))


def flat_loss(criterion, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_loop(variant: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``(model, optimizer, criterion)`` of the variant, ready for the user's loop body."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    options = dict(module=model, optimizer=optimizer, data_loader=loader_of(x, y), noise_multiplier=NOISE_MULTIPLIER,
                   max_grad_norm=MAX_GRAD_NORM)
    if variant == "normal step":
        return model, optimizer, criterion
    if variant.startswith("Opacus"):
        from opacus import PrivacyEngine

        if variant == "Opacus make_private, hooks":
            model, optimizer, _ = PrivacyEngine().make_private(**options)
            return model, optimizer, criterion
        model, optimizer, criterion, _ = PrivacyEngine().make_private(**options, criterion=criterion,
                                                                      grad_sample_mode="ghost")
        # Opacus's criterion takes the logits' shape to average a sequence's tokens per sequence.
        ghost = criterion
        criterion = (lambda logits, y: ghost(logits, y, shape=(len(x), y.numel() // len(x))) if y.ndim == 1 and
                     len(y) != len(x) else ghost(logits, y))
        return model, optimizer, criterion
    if variant == "persample make_private, criterion":
        model, optimizer, criterion, _ = persample.PrivacyEngine().make_private(**options, criterion=criterion)
        return model, optimizer, criterion
    model, optimizer, _ = persample.PrivacyEngine().make_private(**options)
    return model, optimizer, criterion


VARIANTS = ["normal step", "Opacus make_private, hooks", "Opacus make_private, ghost",
            "Opacus make_private, ghost, untied head", "persample make_private, criterion",
            "persample make_private, loss_reduction", "persample GhostClipping, its own loop"]
UNTIED = "Opacus make_private, ghost, untied head"  # GPTs only: Opacus's ghost clipping refuses tied weights


def engine_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, context):
    """The engine and ``persample.DPOptimizer`` called directly (README's loop): what ``make_private`` costs on
    top of them."""
    engine = persample.GhostClipping(model, max_grad_norm=MAX_GRAD_NORM)
    dp = persample.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model.named_parameters(),
                               noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                               expected_batch_size=len(x), sample_rate=0.01)

    def step():
        with context:
            out = engine.clipped_grad_sum(x, y)
        dp.accumulate(out.grads, len(x))
        dp.step()

    return step


def prepare(cfg: Config, variant: str, device: torch.device, precision: str):
    """The variant's loop body on the benchmark's batch, as a function of no arguments."""
    x, y = batch_of(cfg, device)
    model = build(cfg, tied=variant != UNTIED).to(device)
    context = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if variant == "persample GhostClipping, its own loop":
        return engine_loop(model, x, y, context)
    model, optimizer, criterion = make_loop(variant.removesuffix(", untied head"), model, x, y)

    def step():
        optimizer.zero_grad()
        with context:
            loss = flat_loss(criterion, model(x), y)
        loss.backward()
        optimizer.step()

    return step


def timed(step, device: torch.device) -> float:
    """Wall seconds of one step on CUDA; on the CPU the process's CPU seconds (one thread, see ``main``)."""
    if device.type != "cuda":
        start = time.process_time()
        step()
        return time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(cfg: Config, variant: str, device: torch.device, precision: str) -> int:
    """Peak bytes allocated over one step after a warm-up step, the variant alone on the GPU (its model,
    optimizer state and all)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = prepare(cfg, variant, device, precision)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def peak_memory_cpu(cfg: Config, variant: str, precision: str, frames: bool = False) -> StepMemory:
    """The tensor storage one step allocates and holds on the CPU, after a warm-up step (the model and the
    optimizer's state, made before it, left out): ``.peak`` in bytes (see ``cpu_memory.py``)."""
    gc.collect()
    step = prepare(cfg, variant, torch.device("cpu"), precision)
    step()
    return step_peak(step, frames)


def in_alternation(cfg: Config, variants: list[str], device: torch.device, precision: str, warmup: int,
                   rounds: int) -> dict[str, float | str]:
    """``{variant: median seconds per step, or the failure}``: every variant built side by side and timed one
    step each per round, so that a change of the host's speed (other jobs on the machine) hits all alike."""
    steps, results = {}, {}
    for variant in [v for v in variants if v != UNTIED or cfg.kind == "gpt"]:
        try:
            steps[variant] = prepare(cfg, variant, device, precision)
            for _ in range(warmup):
                steps[variant]()
        except Exception as error:  # noqa: BLE001 (a variant's failure is a result)
            steps.pop(variant, None)
            results[variant] = failure(error)
    times = {variant: [] for variant in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            times[variant].append(timed(step, device))
    results.update({variant: statistics.median(t) for variant, t in times.items()})
    return results


def table(rows: list[dict]) -> str:
    lines = ["| model | precision | variant | time / step | × normal | peak memory | × normal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if isinstance(r["seconds"], str):
            cells = [r["seconds"], "", "", ""]
        else:
            base = r["normal"]
            cells = [f"{r['seconds'] * 1e3:.1f} ms", f"{r['seconds'] / base[0]:.2f}x" if base else ""]
            if r["peak"] is None:
                cells += ["n/a", ""]
            else:
                cells += [size(r["peak"], 3), f"{r['peak'] / base[1]:.2f}x" if base and base[1] else ""]
        lines.append(f"| {r['config']} | {r['precision']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failure(error: BaseException) -> str:
    return "OOM" if isinstance(error, torch.OutOfMemoryError) else f"crash: {type(error).__name__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on any machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="rounds of timed steps, one step per variant each")
    parser.add_argument("--models", nargs="+", type=int, metavar="I",
                        help="indices into the device's model list (default: all; CUDA: 0 digits CNN, 1 small GPT, "
                             "2 GPT-2-small)")
    add_save_flag(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        # One thread and CPU time: on a shared machine, wall time measures the other jobs as much as the step.
        torch.set_num_threads(1)
    configs = QUICK if args.quick else CUDA if device.type == "cuda" else CPU
    if args.quick:
        args.warmup, args.iters = 1, 2
    if args.models is not None:
        configs = [configs[i] for i in args.models]
    rows = []
    for cfg in configs:
        for precision in args.precisions:
            print(f"{cfg.name}, {precision}", file=sys.stderr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus's secure-mode and hook warnings, every run
                seconds = in_alternation(cfg, args.variants, device, precision, args.warmup, args.iters)
                peaks = {}
                for variant in seconds:
                    if not isinstance(seconds[variant], str):
                        try:
                            peaks[variant] = (peak_memory(cfg, variant, device, precision) if device.type == "cuda"
                                              else peak_memory_cpu(cfg, variant, precision).peak)
                        except Exception as error:  # noqa: BLE001
                            seconds[variant] = failure(error)
            gc.collect()
            normal = seconds.get("normal step")
            normal = None if normal is None or isinstance(normal, str) else (normal, peaks.get("normal step"))
            for variant in [v for v in args.variants if v in seconds]:
                rows.append(dict(config=cfg.name, precision=precision, variant=variant, seconds=seconds[variant],
                                 peak=peaks.get(variant), normal=normal))
                shown = seconds[variant] if isinstance(seconds[variant], str) else f"{seconds[variant] * 1e3:.1f} ms"
                print(f"  {variant}: {shown}", file=sys.stderr)
    import opacus

    section = "make_private" if device.type == "cuda" else "make_private_cpu"  # a CPU run keeps the GPU table
    context = header(section, device, f"opacus {opacus.__version__}",
                     f"max_grad_norm={MAX_GRAD_NORM}, noise_multiplier={NOISE_MULTIPLIER}, AdamW, the same fixed batch "
                     "every step" + ("; CPU time per step, one thread; peak memory: the step's own tensor storage "
                                     "(cpu_memory.py)" if device.type == "cpu" else ""))
    publish(section, f"{context}\n\n{table(rows)}", args)

if __name__ == "__main__":
    main()
