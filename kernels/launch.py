"""Launching a jitted Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds its arguments anew on every call: it derives each argument's
specialization (a tensor's dtype and 16-byte alignment, an integer's width, divisibility by 16 and equality
to 1), builds a cache key from them and the options, and only then finds the compiled kernel. On the
lent H100 machines that costs about 30 µs of host time per launch, against about 9 µs for the launch of the
compiled kernel itself, and the cross-entropy launches two or three kernels per training step.

:func:`launch` keeps its own cache from a key that holds everything Triton specializes on (and a little
more, which only costs an extra compilation), so a hit launches the compiled kernel directly. A kernel
that Triton's interpreter runs (``TRITON_INTERPRET=1`` when it was defined) is called the ordinary way.

The small helpers below serve every op file's launcher: block sizes, grid sizes and the accumulation dtype.
"""

import os

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

_compiled: dict[tuple, tuple] = {}


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


def acc_dtype(dtype: torch.dtype):
    """The Triton dtype kernels accumulate in for tensors of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int, **constexprs) -> None:
    """``kernel[grid](*args, num_warps=num_warps, **constexprs)``, on the current CUDA device and stream.

    ``args`` are the kernel's leading parameters, in order; ``constexprs`` name all the others. Tensors among
    them must be on the current device, or in pinned host memory: a launch from the cache passes their
    addresses as plain integers, which spares the launcher a driver query per pointer (and with it the check
    that the memory is reachable, which the callers' own device checks stand for)."""
    if not isinstance(kernel, JITFunction):
        kernel[grid](*args, num_warps=num_warps, **constexprs)
        return
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
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, num_warps=num_warps, **constexprs)
        _compiled[key] = compiled, kernel.arg_names[len(args):]
        return
    compiled, names = entry
    # The runner takes exactly 3 grid dims; given the stream, it skips looking up the device again.
    compiled[(*grid, 1, 1)[:3]](*values, *(constexprs[name] for name in names),
                                stream=torch._C._cuda_getCurrentRawStream(device))
