"""The loss's argument checks and its target check, shared by the cross-entropy and the fused linear head.

Arguments are checked once, at the public boundary; the range of the class indices is checked on the kernel
path by the first kernel that reads the targets, whose verdict the host reads later (see
:mod:`persample.loss._verdicts`), and elsewhere by a plain check before the loss runs.
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from persample.backend import transforms_active, use_triton
from persample.loss import _cross_entropy_ops as _ops
from persample.loss import _verdicts

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS = ("none", "mean", "sum")


def unwrapped_data(t: Tensor) -> Tensor | None:
    """The plain tensor under torch.func wrappers (its batch dimensions included), or None if it has no
    data (fake/meta tensors, tracing)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    if t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t):
        return None
    return t


def check_options(reduction, label_smoothing, softcap, z_loss) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def check_target(target, V, device, weight, ignore_index, mask, weight_name="weight", scores_name="logits",
                  check_range=True):
    """Checks ``target``, the class ``weight`` (V,) and ``mask`` against scores with V classes on ``device``;
    returns (target (N,) int64 with masked rows set to ``ignore_index``, weight_sum (1,) or None).
    ``check_range=False`` leaves the range of the class indices to :func:`check_target_range`."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype} "
                        "(class-probability targets are not supported)")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {scores_name} are on {device}")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"{weight_name} must be a floating-point tensor, got {getattr(weight, 'dtype', weight)}")
        if tuple(weight.shape) != (V,):
            raise ValueError(f"{weight_name} must have shape ({V},) (one per class), got {tuple(weight.shape)}")
        if weight.device != device:
            raise ValueError(f"{weight_name} is on {weight.device} but {scores_name} are on {device}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match target shape {tuple(target.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but {scores_name} are on {device}")

    if target.dtype != torch.int64:
        target = target.long()
    if mask is not None:
        target = torch.where(mask, target, ignore_index)
    weight_sum = weight.sum(dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64).reshape(
        1) if weight is not None else None
    if target.ndim != 1:
        target = target.reshape(-1)
    if check_range:
        check_target_range(target, V, ignore_index, scores_name)
    return target, weight_sum


def check_target_range(target: Tensor, V: int, ignore_index: int, scores_name: str = "logits") -> None:
    """Raises ValueError for a class index outside ``[0, V)`` that is not ``ignore_index``.

    A host sync on CUDA. Callers place it after the small ops that prepare a launch (they run on the GPU
    while the host waits) and right before the kernel, which then has only its own launch latency exposed.
    Skipped while tracing (no data), where the kernel's NaN rows are the fallback."""
    if torch.compiler.is_compiling() or (concrete := unwrapped_data(target)) is None:
        return
    bad = (concrete != ignore_index) & ((concrete < 0) | (concrete >= V))
    if bool(bad.any()):
        raise out_of_range(int(concrete[bad].reshape(-1)[0]), V, ignore_index, scores_name)


def out_of_range(value: int, V: int, ignore_index: int, scores_name: str = "logits") -> ValueError:
    return ValueError(f"target contains class index {value}, outside [0, {V}) for {scores_name} with V={V} "
                      f"classes (and not ignore_index={ignore_index})")


def verdict_for(scores2d: Tensor, target1d: Tensor, V: int, ignore_index: int, scores_name: str = "logits",
                 ) -> tuple[Tensor, Callable[[], None]]:
    """``(word, finish)`` for a kernel that checks the range of ``target1d`` against V classes: the kernel
    writes its verdict to ``word`` and ``finish()`` waits for that verdict alone (see
    :mod:`persample.loss._verdicts`) and raises ValueError for a class index outside ``[0, V)``. Until then a bad
    target's rows hold NaN; the kernel touches nothing outside them."""
    if scores2d.is_cuda and torch.cuda.is_current_stream_capturing():
        # A CUDA graph being captured cannot wait: as under torch.compile, a bad target's rows hold NaN, and
        # whoever replays the graph checks the targets (see engine/graphed.py).
        return torch.empty(1, dtype=torch.int64, device=scores2d.device), no_check
    verdict = _verdicts.take(scores2d.device)

    def finish() -> None:
        row = verdict.wait()
        if row is not None:
            raise out_of_range(int(target1d[row]), V, ignore_index, scores_name)

    return verdict.word, finish


def no_check() -> None:
    pass


def prepare(scores2d, V, target1d, weight, ignore_index, reduction,
             scores_name="logits") -> tuple[Tensor, Callable[[], None]]:
    """The reduction's scale pair (1, 2) (see :func:`reduction_scale`) and the target range check, returned as
    ``(scale, finish)``: ``finish()`` raises ValueError for a class index outside ``[0, V)``. ``scores2d``
    (the logits, or the hidden states of a fused head) gives the device and the accumulation dtype.

    On the kernel path (plain eager, CUDA or the interpreter) one small kernel computes the scale and the
    check (see :func:`verdict_for`): the GPU starts the main kernel without waiting for the host, and a bad
    target still raises before anything is returned. Elsewhere: PyTorch ops and a plain check.
    """
    if transforms_active() or not use_triton(scores2d):
        scale = reduction_scale(scores2d, target1d, weight, ignore_index, reduction)
        check_target_range(target1d, V, ignore_index, scores_name)
        return scale, no_check
    word, finish = verdict_for(scores2d, target1d, V, ignore_index, scores_name)
    scale = _ops.target_stats(target1d, V, weight, ignore_index, reduction == "mean",
                              torch.float64 if scores2d.dtype == torch.float64 else torch.float32, word)
    return scale, finish


def check_targets_later(target: Tensor, V: int, ignore_index: int) -> Callable[[], None]:
    """``finish()`` raising the ValueError of a class index in ``target`` (any shape, integer) outside ``[0, V)``
    that is not ``ignore_index``: on CUDA one small kernel now and, in ``finish()``, a wait for that kernel only
    (see :func:`prepare`), so the caller can queue more work in between."""
    target1d = target.reshape(-1).long()
    # The targets stand in for the scores: prepare takes only their device from them here.
    return prepare(target1d, V, target1d, None, ignore_index, "none")[1]


_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _kernel_weight(value) -> float:
    """A nonnegative option that the kernels take as a float32 scalar: 0 below float32's smallest normal, where
    the kernels would see a subnormal (flushed to zero on GPUs, and mis-rounded by Triton's interpreter)."""
    value = float(value)
    return value if value >= _FLOAT32_TINY else 0.0


def kernel_options(ignore_index, label_smoothing, softcap, z_loss):
    return int(ignore_index), _kernel_weight(label_smoothing), float(softcap or 0.0), _kernel_weight(z_loss)


def reduction_scale(scores2d, target, weight, ignore_index, reduction) -> Tensor:
    """What the rows' cross-entropy and z-loss terms are multiplied by before they are summed, shape (1, 2): for
    "mean" 1 / (sum of the target weights over counted rows) and 1 / (number of counted rows), each 0 when its
    denominator is; otherwise 1 and 1. The z-loss's mean thus does not depend on the weights' scale."""
    acc = torch.float64 if scores2d.dtype == torch.float64 else torch.float32
    if reduction != "mean":
        return torch.ones(1, 2, dtype=acc, device=scores2d.device)
    counted = target != ignore_index
    count = counted.sum(dtype=acc)
    if weight is None:
        denom = torch.stack([count, count])
    else:
        denom = torch.stack([torch.where(counted, weight.to(acc)[torch.where(counted, target, 0)], 0.0).sum(), count])
    return torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0).reshape(1, 2)
