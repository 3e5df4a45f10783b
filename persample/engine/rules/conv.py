"""nn.Conv1d, nn.Conv2d, nn.Conv3d: a Linear over unfolded patches.

With ``A_b`` example ``b``'s input patches ``(L, n)`` (``L`` output positions, ``n = C_in / groups * prod(kernel)``)
and ``G_b`` its output gradients ``(L, m)`` (``m = C_out``), each example's weight gradient is ``G_b^T A_b``, one
such product per group for a grouped convolution; the bias gradient is ``G_b`` summed over positions.

Each layer keeps whichever form is smaller to hold until the clipping, in bytes per example: the materialized
gradient (``C_out * n`` float32 elements: :class:`~persample.engine.forms.Dense`; early layers on large maps with few
channels), or the layer's input and output gradient as they are, 16-bit under autocast
(:class:`~persample.engine.forms.Implicit`, with :class:`ConvGrad`; deep layers on small maps with many channels). The
input is held by the backward anyway until the layer's gradient is computed, and neither is the patches
(``prod(kernel) / prod(stride)`` times the input), which factors like a Linear's would keep. An Implicit weight's

* squared norms are computed over chunks of examples, by whichever of three ways measured fastest among those
  whose multiply-adds (:func:`_norm_costs`) are not far above the fewest: the ghost norm
  ``<A_b A_b^T, G_b G_b^T>`` per group from the patches (the ``L x L`` Gram matrices, ``L^2 (m + n)``; Goodfellow
  2015, Li et al. 2022); for a stride-1 convolution, the same ghost norm with ``A_b A_b^T`` summed from the padded
  input's own Gram matrix over the taps' diagonal shifts (no patches, :meth:`ConvGrad._shifted_gram`); or the
  chunk's materialized gradients (``m n L``);
* clipped sum is one weight gradient of the convolution, the backend's own kernel, with each example's output
  gradient scaled by its clip factor: what the normal step's backward computes, once.

The materialized gradients are made one of four ways, whichever measured fastest for the layer's shapes, dtype and
device (timed once, on the first step that meets them, outside any CUDA graph capture):

* ``"grouped"``: one weight gradient of a convolution with the batch as groups, input ``(1, B C_in, ...)``,
  output gradient ``(1, B C_out, ...)``, ``B * groups`` groups (Rochette et al., 2019). The backend's own
  weight-gradient kernel (oneDNN, cuDNN) runs, the patches are never copied out, and on large maps it costs
  about what the normal step's weight gradient does.
* ``"unfold"``: the patches as above and one batched product per chunk of examples.
* ``"shifted"`` (stride 1): one batched product per kernel tap over the whole batch, whose input operand is a
  view of the padded input: on a frame as wide as the padded input, each tap's inputs are one slice of it, so no
  patches are copied out, at the cost of a few extra positions between rows whose output gradient is zero.
* ``"kernel"`` (1-D and 2-D, on a GPU): one Triton kernel, a GEMM per example that loads its patches from the
  input by their addresses, zero padding read as zeros by its masks (:mod:`persample.kernels.conv_weight_grads`):
  no patches and no padded input copied, one launch.

Padding of any mode (``'same'`` included) is applied with ``F.pad``; the patches are then strided views of the
padded input (``Tensor.unfold`` per spatial dimension, every ``dilation``-th tap). Materializing runs over the
batch in chunks: a chunk's patches are copied into a buffer of at most ``_CPU_CHUNK`` / ``_CUDA_CHUNK`` elements
and multiplied straight into the result, so the whole batch's patches (``prod(kernel) / prod(stride)`` times the
input) never exist at once. On the CPU small chunks are faster as well: a large fresh allocation costs more in
page faults than the product, and small buffers are reused and stay in cache; on a GPU, launches cost, so
chunks are large.
"""

import contextlib
import functools
import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persample.backend import use_triton
from persample.engine.forms import Dense, Form, Implicit, acc_dtype, batched_dot, bmm_acc, bmm_into
from persample.engine.registry import Call, register_rule
from persample.kernels import conv_weight_grads

_CPU_CHUNK = 1 << 20
_CUDA_CHUNK = 1 << 25

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d

METHOD: str | None = None  # "grouped", "unfold", "shifted" or "kernel" forces one way of materializing (tests); None:
# the fastest measured
NORMS: str | None = None  # "gram", "shifted" or "grads" forces one way of an Implicit weight's norms (tests; "shifted"
# needs stride 1 and falls back to "gram"); None: the fastest measured of those _norm_costs finds cheap enough
_FASTEST: dict[tuple, str] = {}  # the measured choice per layer configuration, shapes, dtypes and device
_FASTEST_NORMS: dict[tuple, str] = {}  # the same for an Implicit weight's squared norms
_PRUNE = 4  # ways of the norms costing more than this many times the fewest multiply-adds are not timed
TAPS_IN_ONE_VIEW: bool | None = None  # forces how the shifted Gram sums its taps' windows (tests); None: by device


def _explicit_padding(module: _Conv) -> list[int]:
    """F.pad's ``[last dim left, last dim right, ..., first spatial dim left, right]`` for the module's padding."""
    if module.padding == "valid":
        return [0] * (2 * len(module.kernel_size))
    pads = []
    if module.padding == "same":
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    for p in reversed(module.padding):
        pads += [p, p]
    return pads


def _padded(module: _Conv, x: Tensor) -> Tensor:
    """``x`` padded as the module pads it (any mode, ``'same'`` included); ``x`` itself without padding."""
    pads = _explicit_padding(module)
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)


def _windows(module: _Conv, x: Tensor) -> Tensor:
    """``(B, C, *L_dims, *kernel)``: views of the padded input, the taps of output position ``l`` at ``[:, :, l]``."""
    x = _padded(module, x)
    for i, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride, strict=True)):
        # A window spanning d * (k - 1) + 1 inputs, of which every d-th is a tap: views only.
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    return x


def _patch_columns(module: _Conv, x: Tensor) -> Tensor:
    """``(B, C_in * prod(kernel), L)`` each example's input patches, copied out channels then taps (the order of
    ``weight.reshape(C_out, -1)``), positions last: the windows of the padded input in one copy. (``F.unfold``,
    im2col, which reads the padding as zeros, took 2-3x as long on the CPU.)"""
    dims = len(module.kernel_size)
    # (B, C, *kernel, *L_dims): channels then taps.
    order = (0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    windows = _windows(module, x).permute(order)
    return windows.reshape(x.shape[0], windows.shape[1:2 + dims].numel(), -1)


def _cudnn_tf32() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 (PyTorch's default), by whichever API the user set it."""
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the user set the new per-operator API, which the legacy flag refuses to summarize
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


@contextlib.contextmanager
def _as_convolution(x: Tensor):
    """float32 GEMMs on a GPU run at the precision of the layer's own convolution: in TF32 where cuDNN's are
    (PyTorch's default for convolutions, not for matmuls), else in full float32. Where the two settings differ
    (by default), the matmul precision is switched for the block and restored."""
    if not (x.is_cuda and x.dtype == torch.float32):
        yield
        return
    want, have = "high" if _cudnn_tf32() else "highest", torch.get_float32_matmul_precision()
    if want == have:
        yield
        return
    torch.set_float32_matmul_precision(want)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(have)


def _chunk(x: Tensor) -> int:
    return _CUDA_CHUNK if x.is_cuda else _CPU_CHUNK


def _materialized(module: _Conv, x: Tensor, G: Tensor) -> Tensor:
    """``(B, *weight.shape)`` each example's weight gradient in float32 (float64), ``G (B, C_out, L)``: one chunk
    of examples at a time, its patches copied out (:func:`_patch_columns`) and multiplied into the result."""
    B = G.shape[0]
    g, m, L = module.groups, G.shape[1], G.shape[2]
    n = module.weight.numel() // module.out_channels  # per group: C_in / g * prod(kernel)
    out = torch.empty(B, *module.weight.shape, dtype=acc_dtype(G), device=G.device)
    step = max(1, _chunk(G) // (g * n * L))
    for i in range(0, B, step):
        b = min(step, B - i)
        A = _patch_columns(module, x[i:i + b]).reshape(b * g, n, L).to(G.dtype)
        Gc = G[i:i + b].reshape(b * g, m // g, L)
        target = out[i:i + b].view(b * g, m // g, n)
        bmm_into(Gc, A.transpose(1, 2), target)
        # Freed before the next chunk's patches are copied out: kept to the next assignment, two chunks' patches
        # would be alive at once (on a GPU, 2 x 128 MiB in float32).
        del A
    return out


def _weight_grad(module: _Conv, x: Tensor, grad_output: Tensor, per_example: bool) -> Tensor:
    """The weight gradient of the convolution from its input ``x`` and ``grad_output``, in ``grad_output``'s dtype:
    summed over the batch (``(C_out, C_in / groups, *kernel)``), or with ``per_example`` each example's
    (``(B, ...)`` that shape), from one convolution whose groups are the batch's examples times the module's
    groups."""
    B, dims = x.shape[0], len(module.kernel_size)
    pads = _explicit_padding(module)
    before, after = pads[0::2][::-1], pads[1::2][::-1]
    if module.padding_mode == "zeros" and before == after:
        padding = before
    else:  # asymmetric ('same' with an even span) or not zeros: padded here, as the module's forward does
        x = _padded(module, x)
        padding = [0] * dims
    x = x.to(grad_output.dtype)
    groups = module.groups
    if per_example:
        grad_output, x = grad_output.reshape(1, -1, *grad_output.shape[2:]), x.reshape(1, -1, *x.shape[2:])
        groups *= B
    weight = _shape_only((grad_output.shape[1], *module.weight.shape[1:]), grad_output.dtype, grad_output.device)
    _, grad, _ = torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, list(module.stride), padding, list(module.dilation), False, [0] * dims,
        groups, [False, True, False])
    return grad.view(B, *module.weight.shape) if per_example else grad


@functools.lru_cache(maxsize=256)
def _shape_only(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of ``shape`` for an argument of which only the shape is read (the weight of a weight gradient's
    ``convolution_backward``): one broadcast scalar, left unset and never written, kept per shape so that a step
    makes none (two ops' host time per layer)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def _grouped(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    """``(B, *weight.shape)`` each example's weight gradient in float32 (float64), from the weight gradient of
    one convolution whose groups are the batch's examples (times the module's groups)."""
    return _weight_grad(module, x, grad_output, per_example=True).to(acc_dtype(grad_output))


def _unfolded(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    return _materialized(module, x, grad_output.reshape(x.shape[0], module.out_channels, -1))


def _frame(module: _Conv, spatial) -> tuple[list[int], int]:
    """``(P, frame)`` for an input of spatial shape ``spatial``: the spatial shape of the input padded as the module
    pads it plus one row at the end of the first spatial dimension (so that the last tap's slice of the frame stays
    inside its channel), and the frame's size ``L_0 * P_1 * ... * P_k`` (stride 1)."""
    pads = _explicit_padding(module)
    P = [size + pads[-2 - 2 * i] + pads[-1 - 2 * i] for i, size in enumerate(spatial)]
    P[0] += 1
    L0 = P[0] - 1 - module.dilation[0] * (module.kernel_size[0] - 1)
    return P, math.prod((L0, *P[1:]))


def _framed(module: _Conv, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor, int, list[int]]:
    """The operands of :func:`_shifted` and :meth:`ConvGrad._shifted_gram` (stride 1): the padded input (plus the
    extra row of :func:`_frame`) ``(B, C_in, P_0 * ... * P_k)`` in ``grad_output``'s dtype, the output gradient on
    the frame ``(B * groups, C_out / groups, frame)`` (zeros at the frame's extra positions), the frame's size, and
    per spatial dimension ``i`` how far one tap along it moves into a flattened channel, ``d_i * P_{i+1} ... P_k``
    (:func:`_tap_offsets`)."""
    B, dims, g = x.shape[0], len(module.kernel_size), module.groups
    P, frame = _frame(module, x.shape[2:])
    if module.padding_mode == "zeros":
        pads = _explicit_padding(module)
        x = F.pad(x, [*pads[:-1], pads[-1] + 1])
    else:
        x = F.pad(_padded(module, x), [0, 0] * (dims - 1) + [0, 1])
    L = grad_output.shape[2:]
    extra = [pad for i in reversed(range(1, dims)) for pad in (0, P[i] - L[i])]
    G = F.pad(grad_output, extra) if any(extra) else grad_output
    steps = [d * math.prod(P[i + 1:]) for i, d in enumerate(module.dilation)]
    return (x.to(grad_output.dtype).reshape(B, module.in_channels, -1),
            G.reshape(B * g, module.out_channels // g, frame), frame, steps)


def _tap_offsets(kernel_size: tuple[int, ...], steps: list[int]) -> list[int]:
    """Each tap's offset into a flattened channel of the frame, ``sum_i t_i steps[i]``, taps in the weight's
    order."""
    return [sum(t * step for t, step in zip(tap, steps, strict=True))
            for tap in itertools.product(*map(range, kernel_size))]


def _norm_costs(module: _Conv, spatial: torch.Size, L_dims: torch.Size) -> dict[str, tuple[int, int]]:
    """``{way: (multiply-adds, elements held)}`` per example of an Implicit weight's squared norm, for an input of
    spatial shape ``spatial`` and output ``L_dims``: ``"gram"`` (the patches' and output gradients' ``L x L`` Gram
    matrices, and the patches copied out), ``"shifted"`` (stride 1 only: the padded input's Gram matrix, the
    output gradient's on the frame, and the sum of the taps' windows) and ``"grads"`` (the gradient itself)."""
    g, m, n = module.groups, module.out_channels // module.groups, module.weight.numel() // module.out_channels
    L = math.prod(L_dims)
    costs = {"gram": (g * L * L * (n + m) + g * L * n, g * L * (n + 2 * L)),
             "grads": (g * m * n * L, module.weight.numel())}
    if all(s == 1 for s in module.stride):
        P, frame = _frame(module, spatial)
        side = math.prod(P)
        taps = math.prod(module.kernel_size)
        costs["shifted"] = (side * side * module.in_channels + frame * frame * (module.out_channels + g * taps),
                            g * (side * side + 2 * frame * frame) + module.in_channels * side)
    return costs


def _diagonal_windows_sum(gx: Tensor, frame: int, kernel_size: tuple[int, ...], steps: list[int], one_view: bool
                          ) -> Tensor:
    """``sum_t gx[:, s_t : s_t + frame, s_t : s_t + frame]`` for contiguous ``gx (N, S, S)``, over the taps ``t`` of
    ``kernel_size``, tap ``t`` at its offset ``s_t`` (:func:`_tap_offsets`) down the diagonal. ``one_view``: one
    reduction over a strided view of every tap's window (overlapping reads, one launch: on a GPU, where launches
    cost); else one tap at a time (on two CPU cores the strided reduction took 2.5x longer)."""
    side = gx.shape[1]
    if one_view:
        diagonal = side + 1  # one step down the diagonal, in elements
        windows = gx.as_strided((gx.shape[0], *kernel_size, frame, frame),
                                (side * side, *[step * diagonal for step in steps], side, 1), gx.storage_offset())
        return windows.sum(tuple(range(1, 1 + len(kernel_size))))
    total = None
    for s in _tap_offsets(kernel_size, steps):
        window = gx[:, s:s + frame, s:s + frame]
        total = window.clone() if total is None else total.add_(window)
    return total


def _shifted(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    """``(B, *weight.shape)`` each example's weight gradient in float32 (float64) of a convolution with stride 1,
    from one batched product per kernel tap, whose operands are views: no patches are copied out.

    With the padded input ``P`` (its spatial dimensions ``P_0, ..., P_k``) flattened per channel, tap ``t``'s
    inputs for output positions laid out on the frame ``(L_0, P_1, ..., P_k)`` are one contiguous slice of it,
    starting at the tap's offset. The output gradient is padded with zeros to that frame, so the frame's extra
    positions (``P_1 ... P_k / (L_1 ... L_k) - 1`` of the output's, at the end of each row; none in 1-D) add
    nothing. One extra zero row at the end of the first spatial dimension keeps the last tap's slice inside its
    channel."""
    if any(s != 1 for s in module.stride):
        raise NotImplementedError("the shifted views need stride 1")
    B, g = x.shape[0], module.groups
    flat, G, frame, steps = _framed(module, x, grad_output)
    offsets = _tap_offsets(module.kernel_size, steps)
    C = module.in_channels // g
    taps = torch.empty(len(offsets), B * g, module.out_channels // g, C, dtype=acc_dtype(G), device=G.device)
    for t, start in enumerate(offsets):
        inputs = flat[:, :, start:start + frame].reshape(B * g, C, frame)  # a view: examples and groups evenly apart
        bmm_into(G, inputs.transpose(1, 2), taps[t])
    return taps.permute(1, 2, 3, 0).reshape(B, *module.weight.shape)


def _kernel(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    """``(B, *weight.shape)`` each example's weight gradient in float32 of a 1-D or 2-D convolution, from one
    Triton kernel that reads the patches from the input in place, its zero padding by masks
    (:mod:`persample.kernels.conv_weight_grads`): on a GPU, for float16, bfloat16 and float32 inputs. In the
    interpreter only when :data:`METHOD` forces it (its timing there says nothing about a GPU, and the tests would
    pay for it on every configuration)."""
    dims = len(module.kernel_size)
    if (dims > 2 or grad_output.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not use_triton(x)
            or (not x.is_cuda and METHOD != "kernel")):
        raise NotImplementedError("the conv kernel runs 1-D and 2-D convolutions of 16- and 32-bit floats on a GPU")
    # Zero padding is read as zeros by the kernel's loads (no padded copy of the input); other modes are applied.
    if module.padding_mode == "zeros":
        pads = _explicit_padding(module)
    else:
        x, pads = _padded(module, x), [0] * (2 * dims)
    x = x.to(grad_output.dtype)
    padding = ((0, 0), (pads[0], pads[1])) if dims == 1 else ((pads[2], pads[3]), (pads[0], pads[1]))
    kernel_size, stride, dilation = module.kernel_size, module.stride, module.dilation
    if dims == 1:
        x, grad_output = x.unsqueeze(2), grad_output.unsqueeze(2)
        kernel_size, stride, dilation = (1, *kernel_size), (1, *stride), (1, *dilation)
    try:
        grads = conv_weight_grads.conv2d_weight_grads(x, grad_output, kernel_size, stride, dilation, module.groups,
                                                      tf32=x.is_cuda and _cudnn_tf32(), padding=padding)
    except Exception as error:  # Triton's compiler or resource errors are not RuntimeErrors: the other ways remain
        if METHOD == "kernel":
            raise
        raise NotImplementedError(f"the conv kernel cannot run here: {type(error).__name__}: {error}") from error
    return grads.view(x.shape[0], *module.weight.shape)


_WAYS = {"grouped": _grouped, "unfold": _unfolded, "shifted": _shifted, "kernel": _kernel}


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _timed(way, module: _Conv, x: Tensor, grad_output: Tensor) -> tuple[float, Tensor | None]:
    """The faster of two timed runs after a warm-up, and the last result (inf and None if the backend refuses)."""
    try:
        best, out = float("inf"), way(module, x, grad_output)
        for _ in range(2):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            out = way(module, x, grad_output)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            best = min(best, time.perf_counter() - start)
        return best, out
    except (RuntimeError, NotImplementedError):
        return float("inf"), None


def per_example_grads(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    """``(B, *weight.shape)`` each example's weight gradient in float32 (float64): by the way that measured
    fastest for this configuration (:data:`METHOD` forces one)."""
    with _as_convolution(x):
        return _per_example_grads(module, x, grad_output)


def _per_example_grads(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    if METHOD is not None:
        return _WAYS[METHOD](module, x, grad_output)
    key = (x.device, x.dtype, grad_output.dtype, tuple(x.shape), tuple(grad_output.shape), module.kernel_size,
           module.stride, module.dilation, module.groups, str(module.padding), module.padding_mode)
    way = _FASTEST.get(key)
    if way is None:
        if _capturing(x):  # no timing inside a CUDA graph capture (the warm-up steps before it measure)
            return _unfolded(module, x, grad_output)
        timings = {name: _timed(fn, module, x, grad_output) for name, fn in _WAYS.items()}
        way = _FASTEST[key] = min(timings, key=lambda name: timings[name][0])
        if timings[way][1] is not None:
            return timings[way][1]
    return _WAYS[way](module, x, grad_output)


def _patches(module: _Conv, x: Tensor) -> Tensor:
    """``(B, L, C_in * prod(kernel))`` each example's input patches, position-major, copied out."""
    B, dims = x.shape[0], len(module.kernel_size)
    # (B, *L_dims, C, *kernel) -> (B, L, n): channels then taps, the order of weight.reshape(C_out, -1).
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    windows = _windows(module, x).permute(order)
    return windows.reshape(B, windows.shape[1:1 + dims].numel(), -1)


def _per_example(terms: Tensor, B: int, groups: int) -> Tensor:
    """``(B,)`` each example's sum of its groups' terms ``(B * groups,)``; the terms themselves for one group (no
    reduction to launch)."""
    return terms if groups == 1 else terms.view(B, groups).sum(1)


@dataclass(frozen=True)
class ConvGrad:
    """:class:`~persample.engine.forms.ImplicitOps` of a convolution's weight: equal for the same module."""

    module: _Conv

    def sq_norms(self, x: Tensor, G: Tensor) -> Tensor:
        """Over chunks of examples: the ghost norm ``<A_b A_b^T, G_b G_b^T>`` (per group) from the patches or, with
        stride 1, from the shifted Gram matrix of the padded input; or the chunk's gradients themselves. Of the
        ways within :data:`_PRUNE` times the fewest multiply-adds (:func:`_norm_costs`), the one that measured
        fastest for this configuration (timed once, like the gradients' ways); :data:`NORMS` forces one."""
        module = self.module
        costs = _norm_costs(module, x.shape[2:], G.shape[2:])
        if NORMS is not None:
            return self._norms_by("gram" if NORMS == "shifted" and "shifted" not in costs else NORMS, x, G, costs)
        fewest = min(cost for cost, _ in costs.values())
        candidates = [name for name, (cost, _) in costs.items() if cost <= _PRUNE * fewest]
        if len(candidates) == 1:
            return self._norms_by(candidates[0], x, G, costs)
        key = ("norms", x.device, x.dtype, G.dtype, tuple(x.shape), tuple(G.shape), module.kernel_size,
               module.stride, module.dilation, module.groups, str(module.padding), module.padding_mode,
               module.out_channels)
        way = _FASTEST_NORMS.get(key)
        if way is None:
            if _capturing(x):  # no timing inside a CUDA graph capture: the fewest multiply-adds
                return self._norms_by(min(candidates, key=lambda name: costs[name][0]), x, G, costs)
            timings = {name: _timed(lambda _, x, G, name=name: self._norms_by(name, x, G, costs), module, x, G)
                       for name in candidates}
            way = _FASTEST_NORMS[key] = min(timings, key=lambda name: timings[name][0])
            if timings[way][1] is not None:
                return timings[way][1]
        return self._norms_by(way, x, G, costs)

    def _norms_by(self, way: str, x: Tensor, G: Tensor, costs: dict) -> Tensor:
        step = max(1, _chunk(G) // costs[way][1])
        norms = {"gram": self._gram, "shifted": self._shifted_gram, "grads": self._squares}[way]
        B = x.shape[0]
        with _as_convolution(x):
            if step >= B:  # one chunk: the whole batch, not a slice of it (an op's host time)
                return norms(x, G)
            return torch.cat([norms(x[i:i + step], G[i:i + step]) for i in range(0, B, step)])

    def _gram(self, x: Tensor, G: Tensor) -> Tensor:
        module = self.module
        B, g, acc = x.shape[0], module.groups, acc_dtype(G)
        A = _patches(module, x).to(G.dtype)  # (B, L, g n): group-major columns
        L = A.shape[1]
        A = A.view(B, L, g, -1).transpose(1, 2).reshape(B * g, L, -1)
        G = G.reshape(B * g, -1, L)  # (B g, m, L)
        dots = batched_dot(bmm_acc(A, A.transpose(1, 2), acc), bmm_acc(G.transpose(1, 2), G, acc))
        return _per_example(dots, B, g)

    def _shifted_gram(self, x: Tensor, G: Tensor) -> Tensor:
        """The ghost norm of a stride-1 convolution without its patches. On the frame of :func:`_shifted` (output
        positions laid out as wide as the padded input, the extra ones with a zero output gradient), tap ``t``'s
        inputs are the padded input's positions shifted by the tap's offset ``s_t``, so
        ``A_b A_b^T = sum_t X_b^T X_b [s_t : s_t + F, s_t : s_t + F]``: one Gram matrix of the padded input
        (``P x P`` over its ``C_in / groups`` channels) and the sum of its taps' diagonal windows
        (:func:`_diagonal_windows_sum`)."""
        module = self.module
        B, g = x.shape[0], module.groups
        flat, G, frame, steps = _framed(module, x, G)
        X = flat.reshape(B * g, module.in_channels // g, -1)
        acc = acc_dtype(G)
        gx = bmm_acc(X.transpose(1, 2), X, acc)  # (B g, P_all, P_all)
        one_view = TAPS_IN_ONE_VIEW if TAPS_IN_ONE_VIEW is not None else x.is_cuda
        aa = _diagonal_windows_sum(gx, frame, module.kernel_size, steps, one_view)
        gg = bmm_acc(G.transpose(1, 2), G, acc)
        return _per_example(batched_dot(aa, gg), B, g)

    def _squares(self, x: Tensor, G: Tensor) -> Tensor:
        grads = self.per_example(x, G)
        return batched_dot(grads, grads)

    def weighted_sum(self, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
        """One weight gradient of the convolution, from the output gradients scaled by ``c``, in the weight's
        memory layout, as autograd's gradient accumulation would hand it on: a backend may return another layout
        than the weight's (cuDNN's channels-last), and an optimizer's multi-tensor ops leave their fast path for a
        list whose strides differ from the parameters'."""
        grad = _weight_grad(self.module, x, G * c.view(-1, *[1] * (G.ndim - 1)), per_example=False)
        weight = self.module.weight
        return grad if grad.stride() == weight.stride() else torch.empty_like(weight, dtype=grad.dtype).copy_(grad)

    def per_example(self, x: Tensor, G: Tensor) -> Tensor:
        return per_example_grads(self.module, x, G)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, params=("weight", "bias"), cast_input=True)
def conv(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module, x = call.module, call.args[0]
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        # Whichever is smaller to hold until the clipping, in bytes: every example's gradient (float32 whatever
        # the input), or what the Implicit form keeps (the input, which the backward held anyway until this
        # layer, and the output gradient, in their own dtypes: 16-bit under autocast).
        kept = math.prod(x.shape[1:]) * x.element_size() + math.prod(grad_output.shape[1:]) * grad_output.element_size()
        dense = module.weight.numel() * acc_dtype(grad_output).itemsize
        if strategy == "materialize" or (strategy == "auto" and dense <= kept):
            forms["weight"] = Dense(per_example_grads(module, x, grad_output))
        else:
            forms["weight"] = Implicit(x, grad_output, ConvGrad(module))
    if "bias" in call.params:
        forms["bias"] = Dense(grad_output.sum(tuple(range(2, grad_output.ndim)), dtype=acc_dtype(grad_output)))
    return forms

