"""Per-sample gradients with ``torch.func``: ``vmap(grad(loss of one example))`` over the batch.

The privacy unit is the example. Each example goes through the model on its own, as a batch of one
(``inputs[i:i+1]``), and its loss is ``loss_fn(logits, target)`` with ``reduction="mean"`` over that
example's counted positions: one number for a classifier, the mean over the example's counted tokens for
a sequence model (``logits (1, T, V)``, ``target (1, T)``, ``ignore_index``/``mask`` respected).

Models must keep their output as raw logits: the default loss, :func:`persample.cross_entropy`, applies
``log_softmax`` itself, so a ``log_softmax`` at the end of ``forward`` applies it twice (the gradients
are then those of a different, flatter loss). A cheap check warns when that is detected.

Per-example computation is only meaningful when an example's output does not depend on the other
examples of the batch. BatchNorm breaks that and is refused; other forwards that mix examples are caught
by comparing a batched forward with per-example forwards on the first two examples.
"""

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel

from persample.backend import is_dtensor
from persample.checks import refuse_batch_norm
from persample.loss import cross_entropy
from persample.per_sample._clipping import per_sample_norms

LossFn = Callable[..., Tensor]

# Examples in the eval-mode check forward (batch mixing, log-probabilities): with two, the first
# example's output alone and within the batch differ if the forward mixes examples; two forwards of at
# most two examples stay a small fraction of the per-sample work.
_CHECK_EXAMPLES = 2


def per_sample_grads(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn = cross_entropy,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The gradient of every example's own loss w.r.t. every trainable parameter.

    Args:
        model: maps a batch ``inputs[i:i+1]`` to raw logits ``(1, ..., V)``. Buffers are used, not
            differentiated; parameters with ``requires_grad=False`` are skipped. Dropout and other random
            ops draw independently for each example. A ``DistributedDataParallel`` model is unwrapped (the
            names are those of its ``.module``).
        inputs: ``(B, ...)``, one example per row.
        targets: ``(B, ...)``: ``(B,)`` class indices for a classifier, ``(B, T)`` tokens for a sequence
            model (``ignore_index`` rows are not counted).
        loss_fn: ``loss_fn(logits (1, ...), target (1, ...)[, mask=...]) -> scalar``, the mean over the
            example's counted positions. Default :func:`persample.cross_entropy`.
        mask: optional bool ``(B, ...)`` like ``targets``, handed to ``loss_fn`` as ``mask=`` per example.
        chunk_size: examples processed at once (``vmap``'s ``chunk_size``): bounds memory, None = all.

    Returns:
        ``{name: (B, *param.shape)}`` for each trainable parameter, in ``model.named_parameters()`` order,
        in the parameters' dtype.

    Raises:
        ValueError: BatchNorm in the model, a forward that mixes examples, batch sizes that differ between
            ``inputs``/``targets``/``mask``, a loss that is not one value per example, a bad ``chunk_size``,
            a model that cannot run per example under ``vmap``, or a model sharded by ``fully_shard`` (FSDP2).
        TypeError: ``inputs``/``targets``/``mask`` that are not tensors.

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> grads = persample.per_sample_grads(model, x, y)  # one gradient per example and parameter
        >>> {name: tuple(g.shape) for name, g in grads.items()}
        {'0.weight': (5, 8, 4), '0.bias': (5, 8), '2.weight': (5, 3, 8), '2.bias': (5, 3)}
        >>> persample.cross_entropy(model(x[3:4]), y[3:4]).backward()  # example 3 alone, by autograd
        >>> torch.allclose(grads["0.weight"][3], model[0].weight.grad, atol=1e-6)
        True

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the per-example gradients that
        DP-SGD clips).
    """
    _check_arguments(inputs, targets, mask, chunk_size)
    # Its .module, so that DDP's forward (and its reducer) stays out of vmap; the names are the module's.
    model = model.module if isinstance(model, DistributedDataParallel) else model
    refuse_batch_norm(model.named_modules())
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    sharded = [name for name, p in params.items() if is_dtensor(p)]
    if sharded:
        # FSDP2's forward hooks gather and free the weights around each call, as collectives: under vmap the
        # per-example forwards would mix the sharded and gathered weights and run a number of collectives that
        # differs between ranks.
        raise ValueError(f"per_sample_grads cannot run a model sharded by fully_shard (FSDP2): its parameters "
                         f"{sharded[:3]}{'...' if len(sharded) > 3 else ''} are DTensors. Use the fast engine, "
                         "persample.GhostClipping(model, max_grad_norm=...).clipped_grad_sum(x, y), which works "
                         "under fully_shard, or wrap the model in DistributedDataParallel instead")
    if inputs.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    _check_forward(model, inputs, loss_fn)

    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor, m: Tensor | None) -> Tensor:
        logits = functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),))
        loss = loss_fn(logits, y.unsqueeze(0)) if m is None else loss_fn(logits, y.unsqueeze(0), mask=m.unsqueeze(0))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return one value per example (a scalar for a batch of one example, "
                             f"e.g. reduction='mean'), got {shape}")
        return loss.reshape(())

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, None if mask is None else 0),
                       randomness="different", chunk_size=chunk_size)
    try:
        return per_example(params, inputs, targets, mask)
    except RuntimeError as error:
        if not any(word in str(error) for word in ("vmap", "functorch", "transform")):
            raise
        raise ValueError(
            "the model cannot be run one example at a time under torch.func.vmap (data-dependent Python "
            "control flow, .item(), in-place updates of buffers, or an op without a batching rule); "
            f"torch said: {error}") from error


def per_sample_grad_norms(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn = cross_entropy,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The L2 norm of each example's gradient over all trainable parameters, shape ``(B,)``.

    Same arguments and errors as :func:`per_sample_grads`; the norms are those of :func:`per_sample_norms`
    (float32, float64 for float64 gradients).

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> norms = persample.per_sample_grad_norms(model, x, y)
        >>> norms.shape
        torch.Size([6])
        >>> grads = persample.per_sample_grads(model, x, y)
        >>> torch.allclose(norms, torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1))
        True

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the norms that DP-SGD clips).
    """
    grads = per_sample_grads(model, inputs, targets, loss_fn=loss_fn, mask=mask, chunk_size=chunk_size)
    return per_sample_norms(grads)


def _check_arguments(inputs, targets, mask, chunk_size) -> None:
    for name, value in (("inputs", inputs), ("targets", targets), ("mask", mask)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if inputs.ndim == 0 or targets.ndim == 0:
        raise ValueError(f"inputs and targets need a batch dimension, got shapes {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same batch size, got {inputs.shape[0]} inputs "
                         f"(shape {tuple(inputs.shape)}) and {targets.shape[0]} targets (shape "
                         f"{tuple(targets.shape)})")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must match targets shape {tuple(targets.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _check_forward(model: nn.Module, inputs: Tensor, loss_fn: LossFn) -> None:
    """Eval-mode forwards of the first examples together and of the first alone: refuses a forward that
    mixes examples and warns if the logits are already log-probabilities."""
    x = inputs[:_CHECK_EXAMPLES]
    # Each module's own mode is restored: model.train(flag) would set the whole tree to the top module's mode,
    # switching on the dropout of a model held in eval mode inside a wrapper left in train mode.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            batched = model(x)
            alone = model(x[:1]) if x.shape[0] > 1 else batched
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(batched, Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(batched).__name__}")
    if x.shape[0] > 1 and batched.ndim >= 1 and alone.shape == batched[:1].shape:
        tolerance = torch.finfo(batched.dtype).eps ** 0.5 if batched.is_floating_point() else 0.0
        reference = alone.double().norm()
        difference = (batched[:1].double() - alone.double()).norm()
        if difference > tolerance * (reference + 1):
            raise ValueError(
                "the model's forward mixes examples: its output for an example within a batch differs from its "
                f"output for the example alone (relative difference {float(difference / reference):.2e}), so "
                "per-example gradients would not be those of the batch loss. Remove batch-level operations "
                "(batch statistics, means or attention across the batch dimension).")
    if _is_cross_entropy(loss_fn) and batched.is_floating_point() and batched.ndim >= 1 and batched.shape[-1] > 1:
        _warn_if_log_probabilities(batched)


def _is_cross_entropy(loss_fn: LossFn) -> bool:
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return loss_fn in (cross_entropy, F.cross_entropy)


def _warn_if_log_probabilities(logits: Tensor) -> None:
    lse = torch.logsumexp(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    if bool((lse.abs() < 1e-3).all()):
        warnings.warn(
            "the model's outputs are already log-probabilities (every row's logsumexp is ~0): cross-entropy "
            "applies log_softmax itself, so log_softmax is applied twice. Return raw logits from forward "
            "(drop the final log_softmax) or use a loss on log-probabilities (F.nll_loss).",
            UserWarning, stacklevel=4)
