"""What holding the norm layers' calls to the end of the backward costs in memory, measured without a GPU: the engine
step's peak of tensor storage on the GPU's code path, run by Triton's interpreter on the CPU, under the two budgets
of :func:`persample.engine.recording.hold_budget`.

On the Triton path the LayerNorm/RMSNorm and GroupNorm rules hold each call's input and output gradient to the end
of the backward, so that one launch serves all calls of one shape. Held, those tensors outlive the moment autograd
would have freed them. Where the norm layers' inputs are most of the activations (a Wide-ResNet's GroupNorm), this
raises the step's peak. The budget is 256 MiB on the CPU, and on a GPU also a sixteenth of the memory allocated when
the first call is held. The CPU has no allocator to ask, so the GPU's budget is simulated here: the allocator's
answer is taken as the normal step's peak of tensor storage (``cpu_memory.py``), which is what the activations hold
at the start of the backward.

For each model and precision the table gives the normal step's peak and the engine step's under each budget, with
how many held calls each release computed. Each step runs once as a warm-up (the conv rule times its ways then), then
once counted.

    TRITON_INTERPRET=1 python benchmarks/held_norms.py           # WRN-16-4 at B=32 and a GPT (minutes)
    TRITON_INTERPRET=1 python benchmarks/held_norms.py --models gpt --precisions bf16
    TRITON_INTERPRET=1 python benchmarks/held_norms.py --quick   # a tiny WRN: a check of the script

The models: ``dp_step.py``'s WRN-16-4 at its CPU batch (its GroupNorm inputs and gradients are most of its
activations) and ``host_overhead.py``'s GPT d=64 L=12, GPT-2-small's structure at tiny sizes (its LayerNorm inputs
and gradients are a smaller part; the interpreter is too slow for ``dp_step.py``'s GPTs).

Saved with ``results.py`` (the held_norms section of ``RESULTS.md``, appended to ``HISTORY.md``).
"""

import argparse
import contextlib
import sys
from unittest import mock

import torch
from cpu_memory import step_peak
from host_overhead import MODELS as HOST_MODELS
from results import add_save_flag, header, publish, size
from steps import FULL, QUICK, build_model, fast_step, make_batch, normal_step, on_device

from persample.backend import use_triton
from persample.engine import recording


@contextlib.contextmanager
def budget_as_on_a_gpu(allocated: int | None):
    """The held calls' budget computed as on a GPU whose allocator answers ``allocated`` bytes (None: the CPU's,
    which has none), and the number of calls each release computes, appended to the yielded list."""
    releases: list[int] = []
    release = recording.Step.release_held

    def counted(step):
        if step.held:
            releases.append(sum(len(calls) for calls in step.held.values()))
        release(step)

    with mock.patch.object(recording, "allocated_bytes", lambda device: allocated), \
            mock.patch.object(recording.Step, "release_held", counted):
        yield releases


def peak(make, cfg, precision: str, x, y, releases: list[int] | None = None) -> int:
    """The peak of tensor storage of the step that ``make`` builds, after a warm-up step (whose releases are
    cleared from ``releases``)."""
    torch.manual_seed(0)
    step = make(build_model(cfg), x.device, precision, cfg.batch)
    step(x, y)
    if releases is not None:
        releases.clear()
    return step_peak(lambda: step(x, y)).peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny WRN, fp32 only: a check of the script")
    parser.add_argument("--models", nargs="+", choices=("wrn", "gpt"), default=("wrn", "gpt"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    add_save_flag(parser)
    args = parser.parse_args()

    device = torch.device("cpu")
    if not use_triton(torch.empty(0)):
        sys.exit("held_norms.py measures the GPU's code path: run it with TRITON_INTERPRET=1")
    models = {"wrn": on_device(FULL[3], device), "gpt": HOST_MODELS["gpt"]}
    configs = [QUICK[2]] if args.quick else [models[name] for name in args.models]
    if args.quick:
        args.precisions = ["fp32"]
    rows = []
    for cfg in configs:
        x, y = make_batch(cfg, cfg.batch, device)
        for precision in args.precisions:
            print(f"{cfg.name}, {precision}", file=sys.stderr)
            normal = peak(normal_step, cfg, precision, x, y)
            cells = []
            for allocated in (None, normal):
                with budget_as_on_a_gpu(allocated) as releases:
                    engine = peak(fast_step, cfg, precision, x, y, releases)
                    budget = recording.hold_budget(x)
                cells.append(f"{size(engine)} ({engine / normal:.2f}x) | {size(budget)}: "
                             f"{', '.join(map(str, releases)) or 'none held'}")
            rows.append(f"| {cfg.name} | {precision} | {size(normal)} | " + " | ".join(cells) + " |")
    table = "\n".join([
        "| model | precision | normal step | engine, budget as on the CPU | its budget: calls per release "
        "| engine, budget as on a GPU | its budget: calls per release |",
        "|---|---|---|---|---|---|---|", *rows])
    context = header("held_norms", device, "the GPU's code path through Triton's interpreter; peaks of the tensor "
                     "storage one step allocates and holds (cpu_memory.py), after a warm-up step; the GPU's budget "
                     "with the allocator's answer taken as the normal step's peak")
    publish("held_norms", f"{context}\n\n{table}", args)


if __name__ == "__main__":
    main()
