"""Peak memory of one step on the CPU, where PyTorch keeps no allocator statistics: the most bytes of tensor storage
that the step itself allocated and held at once, counted by a ``TorchDispatchMode`` that sees every op's outputs.

A storage counts from the op that first returns it until the last tensor that the step saw on it dies; the model,
the optimizer's state and anything else made before the step are left out (a parameter's storage only counts if
an op of the step returned a view of it, as ``t()`` of a weight does, alike in every variant). The figure is
exact for what it counts and has none of an allocator's rounding or caching, so it compares variants, not
processes: the engine against the normal step, on the same model and batch.

Used by ``make_private.py`` and ``dp_step.py`` for their CPU rows. Run on its own, it measures ``make_private.py``'s
loop bodies on one of its models (GPT-2-small-sized by default, several minutes on two cores) and saves the table
(``results.py``: the cpu_memory section of RESULTS.md); ``--frames`` also lists the largest storages alive at each
peak by the line that allocated them:

    python benchmarks/cpu_memory.py              # the GPT-2-small-sized step: normal, make_private, own loop
    python benchmarks/cpu_memory.py --model 1 --precision bf16 --frames --no-save
"""

import collections
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StepMemory(TorchDispatchMode):
    """Live bytes of the storages the ops under it returned, and their peak (``peak``). With ``frames``, the storages
    alive at the peak by allocating line (``at_peak``: ``{where: bytes}``), at the cost of a stack walk per new
    storage."""

    def __init__(self, frames: bool = False):
        super().__init__()
        self.frames = frames
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, tensors alive, where]
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = {}

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:  # empty
                continue
            entry = self.live.get(key)
            if entry is None:
                where = _where(func) if self.frames else ""
                entry = self.live[key] = [storage.nbytes(), 0, where]
                self.current += entry[0]
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        if self.current > self.peak:
            self.peak = self.current
            if self.frames:
                grouped = collections.Counter()
                for nbytes, _, where in self.live.values():
                    grouped[where] += nbytes
                self.at_peak = dict(grouped)
        return out


def _where(func) -> str:
    """The op and the innermost lines of persample or of a benchmark that called it."""
    frames = [f for f in traceback.extract_stack() if ("/persample/" in f.filename or "/benchmarks/" in f.filename)
              and not f.filename.endswith("cpu_memory.py")]
    lines = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
    return f"{func.overloadpacket.__name__} @ {lines}"


def step_peak(step, frames: bool = False) -> StepMemory:
    """Runs ``step()`` once under :class:`StepMemory` and returns it (``.peak`` in bytes)."""
    with StepMemory(frames) as memory:
        step()
    return memory


def main() -> None:
    import argparse
    import sys

    import make_private
    from results import add_save_flag, header, publish

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=int, default=2, help="index into make_private.CUDA (default: GPT-2-small)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=["normal step", "persample make_private, criterion",
                                                          "persample GhostClipping, its own loop"],
                        choices=make_private.VARIANTS, metavar="VARIANT")
    parser.add_argument("--frames", action="store_true", help="also list the storages alive at each peak")
    add_save_flag(parser)
    args = parser.parse_args()

    cfg = make_private.CUDA[args.model]
    rows, listings, normal = [], [], None
    for variant in args.variants:
        print(f"{cfg.name}, {args.precision}, {variant}", file=sys.stderr)
        memory = make_private.peak_memory_cpu(cfg, variant, args.precision, args.frames)
        normal = memory.peak if variant == "normal step" else normal
        ratio = f"{memory.peak / normal:.2f}x" if normal else ""
        rows.append(f"| {variant} | {memory.peak / 2**20:.1f} MiB | {ratio} |")
        if args.frames:
            listings.append(f"{variant}, at the peak:\n" + "\n".join(
                f"- {nbytes / 2**20:.1f} MiB {where}"
                for where, nbytes in sorted(memory.at_peak.items(), key=lambda kv: -kv[1])[:10]))
    context = header("cpu_memory", "cpu", f"{cfg.name}, {args.precision}, make_private.py's loop bodies; the peak "
                     "of the tensor storage one step allocates and holds, after a warm-up step")
    table = "\n".join(["| variant | peak of the step's own storage | × normal |", "|---|---|---|", *rows])
    publish("cpu_memory", "\n\n".join([context, table, *listings]), args)


if __name__ == "__main__":
    main()
