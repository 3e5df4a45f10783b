"""What the fast engine's two waits for the GPU cost a training step: its step as it is, against the same step
with both waits skipped, in alternation with the normal step, on the models of ``dp_step.py``.

    python benchmarks/engine_waits.py                         # CNN, WRN-16-4, GPT-2-small; fp32 and bf16; CUDA
    python benchmarks/engine_waits.py --models 2 --precisions fp32
    python benchmarks/engine_waits.py --quick                 # tiny models on this machine: a check of the script

Every eager step of ``GhostClipping.clipped_grad_sum`` ends with two waits: for the target check's verdict
(written by the loss kernel, early in the step) and for the copy of the mask of finite examples (queued after the
norms, before the clipped sums), so that a bad target raises and a non-finite example is reported before the call
returns. While the host waits it queues nothing, and the GPU has only what is left of the step to run. The
"no waits" step skips both (it neither checks the targets nor reports non-finite examples: a measurement only,
never a way to train). Its time against the step as it is says how much of the engine's step is spent waiting;
on the CPU both waits return at once. Each round times every step once from an idle GPU and ``BURST`` steps back
to back (as a training loop runs them); the table gives the median ratio to the normal step and its range over the
rounds. Saved with ``results.py`` (the engine_waits section of ``RESULTS.md``, appended to ``HISTORY.md``).
"""

import argparse
import statistics
import sys
from contextlib import contextmanager, nullcontext

import torch
from results import add_save_flag, header, publish
from steps import FULL, QUICK, build_model, fast_step, make_batch, normal_step, on_device, time_step

import persample.engine.ghost_clipping as ghost_clipping

BURST = 5


@contextmanager
def no_waits():
    """The engine's step without its two waits: the mask is never read and the target check never finished."""
    read_later, loss_and_output_grad = ghost_clipping._read_later, ghost_clipping.loss_and_output_grad

    def unchecked(*args, **kwargs):
        losses, output_grad, _ = loss_and_output_grad(*args, **kwargs)
        return losses, output_grad, lambda: None

    ghost_clipping._read_later = lambda finite: list
    ghost_clipping.loss_and_output_grad = unchecked
    try:
        yield
    finally:
        ghost_clipping._read_later, ghost_clipping.loss_and_output_grad = read_later, loss_and_output_grad


def timed(step, x, y, device: torch.device, steps: int, waits: bool) -> float:
    """``time_step`` of ``steps`` steps back to back, with the engine's waits or without them."""
    with nullcontext() if waits else no_waits():
        return time_step(step, x, y, device, steps)


def compare(cfg, device: torch.device, precision: str, warmup: int, rounds: int) -> dict[str, tuple]:
    """``{variant: ((median, lowest, highest) ratio to the normal step, one step from idle; the same, BURST steps
    back to back)}`` for the engine's step as it is and without its waits."""
    steps = {"normal step": (normal_step(build_model(cfg).to(device), device, precision, cfg.batch), True),
             "fast engine": (fast_step(build_model(cfg).to(device), device, precision, cfg.batch), True),
             "fast engine, no waits": (fast_step(build_model(cfg).to(device), device, precision, cfg.batch), False)}
    x, y = make_batch(cfg, cfg.batch, device)
    for step, waits in steps.values():
        timed(step, x, y, device, warmup, waits)
    ratios = {name: ([], []) for name in steps if name != "normal step"}
    for _ in range(rounds):
        for kind, burst in enumerate((1, BURST)):
            seconds = {name: timed(step, x, y, device, burst, waits) for name, (step, waits) in steps.items()}
            for name, kinds in ratios.items():
                kinds[kind].append(seconds[name] / seconds["normal step"])
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {name: tuple((statistics.median(r), min(r), max(r)) for r in kinds) for name, kinds in ratios.items()}


def cell(stats: tuple[float, float, float]) -> str:
    median, low, high = stats
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on this machine (checks the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=int, nargs="+", metavar="INDEX",
                        help="indices into dp_step.py's model list (default: the CNN, WRN-16-4 and GPT-2-small)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    add_save_flag(parser)
    args = parser.parse_args()

    device = torch.device(args.device)
    configs = QUICK if args.quick else FULL
    indices = args.models if args.models is not None else ([0, 1, 2] if args.quick else [2, 3, 1])
    if args.quick:
        args.precisions, args.warmup, args.rounds = ["fp32"], 1, 2
    rows = []
    for cfg in (on_device(configs[i], device) for i in indices):
        for precision in args.precisions:
            print(f"{cfg.name}, {precision}", file=sys.stderr)
            result = compare(cfg, device, precision, args.warmup, args.rounds)
            rows += [f"| {cfg.name} | {precision} | {name} | {cell(idle)} | {cell(burst)} |"
                     for name, (idle, burst) in result.items()]
    table = "\n".join(["| model | precision | step | × normal, one step from idle | × normal, "
                       f"{BURST} steps back to back |", "|---|---|---|---|---|", *rows])
    context = header("engine_waits", device, f"{args.rounds} rounds in alternation, medians (range)")
    publish("engine_waits", f"{context}\n\n{table}", args)


if __name__ == "__main__":
    main()
