"""Launching a jitted Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds its arguments anew on every call: it derives each argument's
specialization (a tensor's dtype and 16-byte alignment, an integer's width, divisibility by 16 and equality
to 1), builds a cache key from them and the options, and only then finds the compiled kernel. That costs
more host time than launching the compiled kernel itself, and the cross-entropy launches two or three kernels
per training step (the figures: benchmarks/RESULTS.md, "Figures quoted from code").

:func:`launch` keeps its own cache from a key that holds everything Triton specializes on (and a little
more, which only costs an extra compilation), so a hit launches the compiled kernel directly; building the key
from every argument is then most of what remains above the launch itself. It returns a :class:`Launcher`,
which an op's launcher may keep under a key of its own inputs, a few of them and cheap to build, and call
again, which skips that key as well. A kernel that Triton's interpreter runs (``TRITON_INTERPRET=1`` when it
was defined) is called the ordinary way, through a Launcher as well, so that the tests run the same paths.

The small helpers below serve every op file's launcher: block sizes, grid sizes and the accumulation dtype.
"""

import os

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

_compiled: dict[tuple, "Launcher"] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    # triton.next_power_of_2 and triton.cdiv are jitted functions: a few µs of host time per call.
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """The multiprocessor count of a CUDA ``device``, looked up once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def row_tile(K: int, elements: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)``: the tile of a program that sums rows of length ``K``, ``BLOCK`` columns (up to
    ``elements``, the row's length rounded up to a power of two) of ``ROWS`` rows, about ``elements`` in all: short
    rows (a GroupNorm's ``H W`` on small maps) are summed several to a program instead of leaving most of a block
    masked."""
    block = min(elements, max(16, next_power_of_2(K)))
    return max(1, elements // block), block


def row_pieces(programs: int, K: int, block: int, device: torch.device, per_sm: int) -> int:
    """How many programs share a row of length ``K`` when ``programs`` tiles of rows are summed: enough for
    ``per_sm`` programs per multiprocessor in all, each at least a ``block`` long (one in the interpreter, where
    programs run one after another, and off CUDA)."""
    if interpreting() or device.type != "cuda":
        return 1
    wanted = cdiv(per_sm * sm_count(device), programs)
    return max(1, min(wanted, cdiv(K, block)))


def acc_dtype(dtype: torch.dtype):
    """The Triton dtype kernels accumulate in for tensors of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                  torch.float64: tl.float64}


def triton_dtype(dtype: torch.dtype):
    """The Triton dtype of floating ``dtype``, for a kernel that casts an address it loads to a pointer of it."""
    return _TRITON_DTYPES[dtype]


def address_table(layers, device: torch.device) -> torch.Tensor:
    """``(N * k,)`` int64 on ``device``: the addresses of each layer's ``k`` tensors, layer after layer, for a
    kernel that serves ``N`` layers in one launch and loads each layer's pointers from it (with its
    :func:`triton_dtype`). The copy from the host is queued on the current stream, ahead of the launch."""
    addresses = [t.data_ptr() for tensors in layers for t in tensors]
    return torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None skipped) starts on a 16-byte boundary, the alignment Triton specializes
    a pointer on. Plans (see :class:`Launcher`) serve such inputs only: their keys then need no alignment,
    and other inputs take :func:`launch`'s full key."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits % 16 == 0


class Plans(dict):
    """An op launcher's kept launches (see :class:`Launcher`) by a key of its inputs, None for inputs that no
    plan serves. Emptied when it holds ``limit`` of them, so that inputs of ever new sizes cannot grow it
    without bound."""

    def __init__(self, limit: int = 256):
        super().__init__()
        self.limit = limit

    def keep(self, key, plan) -> None:
        if key is None:
            return
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan


_FLOAT_KEY = (float,)


def _arg_key(arg) -> tuple:
    """What Triton's specialization of one non-tensor argument depends on (a superset of it). Floats, the
    commonest after ints, are tested by exact type first: this runs for most arguments of every launch."""
    if type(arg) is float:
        return _FLOAT_KEY
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, -(2**63) <= arg < 2**63
    return type(arg), arg


class Launcher:
    """A kernel compiled for one specialization of its arguments: ``launcher(grid, *args)`` launches it again,
    ``args`` being the kernel's leading parameters as for :func:`launch`, with the same specialization as those
    it was made for (the same dtypes, alignments and integer classes). :func:`launch` returns one; callers that
    keep it (cross_entropy.py's plans) key it by everything that decides that specialization, and so skip the
    key that :func:`launch` builds from every argument.

    In the interpreter it calls the kernel the ordinary way, after checking that the arguments' specialization
    is the one it was made for: a plan whose key misses something fails the CPU tests instead of launching a
    kernel specialized for other arguments."""

    __slots__ = ("_compiled", "_consts", "_kernel", "_constexprs", "_num_warps", "_spec")

    def __init__(self, compiled, consts: tuple, kernel=None, constexprs: dict | None = None, num_warps: int = 0,
                 spec: tuple = ()):
        self._compiled, self._consts = compiled, consts
        self._kernel, self._constexprs, self._num_warps, self._spec = kernel, constexprs, num_warps, spec

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        if self._compiled is None:
            if _specialization(args) != self._spec:
                raise AssertionError(f"a plan's key missed part of its launch's specialization: {self._kernel} "
                                     f"was made for {self._spec}, now given {_specialization(args)}")
            self._kernel[grid](*args, num_warps=self._num_warps, **self._constexprs)
            return
        self.run(grid, [arg.data_ptr() if isinstance(arg, torch.Tensor) else arg for arg in args])

    def run(self, grid: tuple[int, ...], values: list) -> None:
        """Launches with ``values``: the arguments with tensors already given as addresses."""
        # The runner takes exactly 3 grid dims; given the stream, it skips looking up the device again.
        self._compiled[(*grid, 1, 1)[:3]](*values, *self._consts,
                                          stream=torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()))


def _specialization(args: tuple) -> tuple:
    """What a launch with ``args`` specializes on (:func:`launch` inlines this for speed)."""
    return tuple((arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor) else _arg_key(arg)
                 for arg in args)


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int, **constexprs) -> Launcher:
    """``kernel[grid](*args, num_warps=num_warps, **constexprs)``, on the current CUDA device and stream; returns
    the :class:`Launcher` that launched it.

    ``args`` are the kernel's leading parameters, in order; ``constexprs`` name all the others. Tensors among
    them must be on the current device, or in pinned host memory: a launch from the cache passes their
    addresses as plain integers, which spares the launcher a driver query per pointer (and with it the check
    that the memory is reachable, which the callers' own device checks stand for)."""
    if not isinstance(kernel, JITFunction):
        launcher = Launcher(None, (), kernel, constexprs, num_warps, _specialization(args))
        launcher(grid, *args)
        return launcher
    device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its Python wrapper
    key = [kernel, device, num_warps, *constexprs.items()]
    values = list(args)
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            values[i] = pointer = arg.data_ptr()
            key.append((arg.dtype, pointer % 16 == 0))
        else:
            key.append(_arg_key(arg))
    key = tuple(key)
    launcher = _compiled.get(key)
    if launcher is None:
        compiled = kernel[grid](*args, num_warps=num_warps, **constexprs)
        launcher = _compiled[key] = Launcher(compiled, tuple(constexprs[name] for name in kernel.arg_names[len(args):]))
        return launcher
    launcher.run(grid, values)
    return launcher
