"""Hugging Face transformers: compute a model's loss with :func:`persample.cross_entropy`.

Since transformers 4.46, models do not build a ``CrossEntropyLoss`` in ``forward``: they call
``self.loss_function(logits=..., labels=..., vocab_size=..., num_items_in_batch=..., ...)``, a property that
resolves a function of ``transformers.loss.loss_utils`` (``ForCausalLMLoss``, ``ForSequenceClassificationLoss``,
...) from the model's class name, and that function shifts the labels. Swapping a module-level
``CrossEntropyLoss`` therefore does nothing; replacing ``loss_function`` does.

* :func:`apply_fused_loss` replaces it on one model instance, :func:`apply_fused_loss_to_class` on a class
  (every instance, present and future); both return a handle whose ``remove()`` undoes it.
* :func:`causal_lm_loss` and :func:`sequence_classification_loss` are the replacements: the same arguments
  and the same result as transformers' functions (label shift, ``ignore_index``, ``shift_labels``,
  ``num_items_in_batch`` for gradient accumulation), with the cross-entropy fused. One difference: a batch
  whose labels are all ``ignore_index`` gives loss 0 instead of NaN.
* :func:`apply_fused_linear_cross_entropy` goes further for causal LMs: the model stops at its last hidden states
  and :func:`persample.linear_cross_entropy` computes the head and the loss together, so a training step holds no
  ``(B, T, V)`` logits (transformers' own loss would upcast them to a float32 copy as well).
* :func:`per_sequence_loss` gives one loss per example (the mean over its counted tokens), what DP-SGD clips.

transformers is imported only when these functions run, never by ``import persample``.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from persample.loss import cross_entropy


def _fixed_cross_entropy(logits: Tensor, target: Tensor, num_items_in_batch, ignore_index: int) -> Tensor:
    """transformers' ``fixed_cross_entropy``: the mean over counted rows, or the sum divided by
    ``num_items_in_batch`` (the count over all gradient-accumulation steps) when it is given."""
    if num_items_in_batch is None:
        return cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")
    loss = cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _shift(labels: Tensor, ignore_index: int) -> Tensor:
    """Position t is scored against token t + 1; the last position has no next token."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Drop-in for ``transformers.loss.loss_utils.ForCausalLMLoss``.

    ``logits (B, T, V)``, ``labels (B, T)`` (or ``shift_labels (B, T)``, already shifted). The logits are upcast
    to float32 first, as transformers does, so that the loss and gradients match the unpatched model in every
    dtype. Other keyword arguments (attention kwargs that models forward along) are ignored, as there.
    """
    logits = logits.float()
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    logits = logits.reshape(-1, vocab_size)
    return _fixed_cross_entropy(logits, shift_labels.reshape(-1).to(logits.device), num_items_in_batch,
                                ignore_index)


def sequence_classification_loss(labels: Tensor, pooled_logits: Tensor, config, **kwargs) -> Tensor:
    """Drop-in for ``transformers.loss.loss_utils.ForSequenceClassificationLoss``.

    ``pooled_logits (B, num_labels)``, ``labels (B,)``. Single-label classification goes through the fused
    cross-entropy; regression and multi-label classification (``config.problem_type``, inferred exactly as
    transformers does when unset) are left to transformers' function.
    """
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type != "single_label_classification":
        return ForSequenceClassificationLoss(labels, pooled_logits, config, **kwargs)
    labels = labels.to(pooled_logits.device)
    return _fixed_cross_entropy(pooled_logits.reshape(-1, num_labels), labels.reshape(-1),
                                kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100))


def per_sequence_loss(logits: Tensor, labels: Tensor, *, shift: bool = True, ignore_index: int = -100) -> Tensor:
    """One loss per sequence: the mean cross-entropy over its counted tokens (0 if it has none).

    Args:
        logits: ``(..., T, V)`` a causal LM's logits (``model(input_ids).logits``).
        labels: ``(..., T)`` token ids, ``ignore_index`` at padding and at tokens not to be learnt.
        shift: score position ``t`` against ``labels[t + 1]``, as causal LMs do (False: labels already aligned).
        ignore_index: label value that is not counted.

    Returns:
        ``(...)`` in float32 (float64 for float64 logits). Its sum over a batch is the DP-SGD objective whose
        per-example gradients are clipped; it works under ``torch.func`` (``vmap``, ``grad``).
    """
    if shift:
        labels = _shift(labels, ignore_index)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").to(acc)
    counted = (labels != ignore_index).sum(-1).to(acc)
    return rows.sum(-1) / counted.clamp_min(1)


class FusedLossHandle:
    """Undoes :func:`apply_fused_loss` or :func:`apply_fused_loss_to_class`; also a context manager."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        """Restores the original loss; a second call does nothing."""
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __enter__(self) -> "FusedLossHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_FUSED = (causal_lm_loss, sequence_classification_loss)


def _fused_for(loss_function):
    """persample's replacement for one of transformers' loss functions, or None."""
    from transformers.loss import loss_utils

    return {loss_utils.ForCausalLMLoss: causal_lm_loss,
            loss_utils.ForSequenceClassificationLoss: sequence_classification_loss}.get(loss_function)


def _check_model_class(cls) -> None:
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(f"expected a transformers PreTrainedModel (instance or class), got {cls!r}")
    # A forward that builds its loss inline (e.g. GPT2ForSequenceClassification) would silently ignore us.
    if "loss_function" not in inspect.unwrap(cls.forward).__code__.co_names:
        raise ValueError(f"{cls.__name__}.forward computes its loss without self.loss_function, so replacing "
                         "the loss function would have no effect")


class _FusedLossProperty(property):
    """The ``loss_function`` property that :func:`apply_fused_loss_to_class` installs."""


def apply_fused_loss(model) -> FusedLossHandle:
    """Makes ``model`` compute its loss with persample's fused cross-entropy; returns a handle to undo it.

    Supported: causal LMs (their ``loss_function`` is ``ForCausalLMLoss``: ``*ForCausalLM``,
    ``*ForConditionalGeneration``) and sequence classifiers (``ForSequenceClassificationLoss``) whose
    ``forward`` calls ``self.loss_function``. The model's parameters and modules are untouched.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: its loss is another one, it computes its loss inline, or the fused loss is applied already.
    """
    cls = type(model)
    _check_model_class(cls)
    original = model.loss_function
    if original in _FUSED:
        raise ValueError(f"{cls.__name__} already computes its loss with persample ({original.__name__})")
    fused = _fused_for(original)
    if fused is None:
        raise ValueError(f"{cls.__name__} computes its loss with {getattr(original, '__name__', original)!r}; "
                         "persample replaces ForCausalLMLoss and ForSequenceClassificationLoss")
    prop = inspect.getattr_static(cls, "loss_function")
    if getattr(prop, "fset", None) is not None:
        # transformers >= 4.48 reads an instance's own ``_loss_function`` first (the property's setter).
        state = vars(model)
        had, previous = "_loss_function" in state, state.get("_loss_function")
        model.loss_function = fused

        def undo():
            if state.get("_loss_function") is fused:
                if had:
                    state["_loss_function"] = previous
                else:
                    del state["_loss_function"]
    else:
        # Older releases have a read-only property: give this one instance a subclass that overrides it,
        # named like its class so that saved configs and reprs are unchanged.
        patched = type(cls.__name__, (cls,), {"loss_function": property(lambda self: fused),
                                              "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        model.__class__ = patched

        def undo():
            if model.__class__ is patched:
                model.__class__ = cls

    return FusedLossHandle(undo)


def apply_fused_loss_to_class(cls) -> FusedLossHandle:
    """:func:`apply_fused_loss` for every instance of ``cls`` (and its subclasses), including those created
    later, e.g. by ``from_pretrained``. Instances whose loss is not supported keep their own; a loss set on an
    instance by hand (``model.loss_function = f``) is left alone.

    Raises:
        TypeError: ``cls`` is not a ``PreTrainedModel`` subclass.
        ValueError: ``cls.forward`` computes its loss inline, or the class is patched already.
    """
    _check_model_class(cls)
    base = inspect.getattr_static(cls, "loss_function")
    if isinstance(base, _FusedLossProperty):
        raise ValueError(f"{cls.__name__} already computes its loss with persample")
    own = cls.__dict__.get("loss_function")

    def getter(self):
        original = base.__get__(self, type(self))
        return _fused_for(original) or original

    setter = (lambda self, value: base.__set__(self, value)) if getattr(base, "fset", None) is not None else None
    installed = _FusedLossProperty(getter, setter)
    cls.loss_function = installed

    def undo():
        if cls.__dict__.get("loss_function") is installed:
            if own is not None:
                cls.loss_function = own
            else:
                delattr(cls, "loss_function")

    return FusedLossHandle(undo)


# Causal LMs whose forward is ``hidden = base_model(...)``, ``logits = lm_head(hidden)``, then
# ``ForCausalLMLoss``, with nothing applied to the logits in between (no softcap, scale or tensor-parallel
# split), in every transformers release persample supports.
FUSED_LINEAR_ARCHITECTURES = frozenset({
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
})


def _unwrap_peft(model):
    """The transformers model inside a ``peft.PeftModel`` (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _output_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not an nn.Linear "
                         "(a LoRA adapter on lm_head?): the fused linear loss needs the head's weight and bias")
    return head


def _identity(x: Tensor) -> Tensor:
    return x


def _head_loss(hidden: Tensor, head: torch.nn.Linear, labels, shift_labels, num_items_in_batch, ignore_index: int,
               chunk_size: int | None) -> Tensor:
    """``ForCausalLMLoss(head(hidden), labels, ...)`` by :func:`persample.linear_cross_entropy`, in float32."""
    from persample.loss import linear_cross_entropy

    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    # Autocast would run the head's matmul in its dtype: cast the operands as it would (the weight's copy is the
    # one ``F.linear`` makes under autocast), then keep it off so that nothing inside casts again.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    target = shift_labels.to(hidden.device)
    with torch.autocast(device, enabled=False):
        if num_items_in_batch is None:
            loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                        chunk_size=chunk_size)
        else:
            loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                        reduction="sum", chunk_size=chunk_size)
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss.float() / num_items_in_batch
    return loss.float()


def apply_fused_linear_cross_entropy(model, *, chunk_size: int | None = None) -> FusedLossHandle:
    """Makes a causal LM compute its training loss without ever holding the ``(B, T, V)`` logits.

    With ``labels``, the patched ``model(...)`` runs the model up to its last hidden
    states ``(B, T, d)`` and computes the loss of ``lm_head`` and cross-entropy together with
    :func:`persample.linear_cross_entropy`, chunk by chunk: no logits, no float32 copy of them, and the gradients
    of the hidden states and the head formed during the forward. The returned output has ``loss`` and
    ``logits=None``. Without labels the model runs unchanged (generation, evaluation of logits).

    The loss is transformers' ``ForCausalLMLoss`` (label shift, ``ignore_index``, ``shift_labels``,
    ``num_items_in_batch``), in float32; under ``torch.autocast`` the head runs in the autocast dtype, as
    unpatched. Same loss and gradients as the unpatched model up to the rounding of the logits' dtype
    (float32: ~1e-6 relative; bfloat16: the loss to ~1e-2 relative, since the chunks' logits are rounded to
    bfloat16 before the softmax as the unpatched logits are). One difference: a batch whose labels are all
    ``ignore_index`` gives loss 0 instead of NaN.

    Args:
        model: an instance of one of :data:`FUSED_LINEAR_ARCHITECTURES` (Llama, Mistral, Qwen2, Qwen3, GPT-2
            causal LMs), or a ``peft.PeftModel`` around one (its ``lm_head`` must stay an ``nn.Linear``).
        chunk_size: tokens per chunk of logits (see :func:`persample.linear_cross_entropy`); default about 4%
            of the batch's tokens.

    Returns:
        A handle whose ``remove()`` (or ``with`` block's end) restores the model's own ``forward``.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: its class is not supported (the message names it), its head is not an ``nn.Linear``, or it
            is patched already.

    Examples:
        >>> with apply_fused_linear_cross_entropy(model):  # doctest: +SKIP
        ...     model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (losses without logits);
        Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (fused linear cross-entropy).
    """
    import functools

    from transformers import PreTrainedModel

    inner = _unwrap_peft(model)
    cls = type(inner)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {cls.__name__}")
    if cls.__name__ not in FUSED_LINEAR_ARCHITECTURES:
        raise ValueError(f"{cls.__name__} is not supported by the fused linear cross-entropy (its forward may "
                         f"change the logits before the loss); supported: {sorted(FUSED_LINEAR_ARCHITECTURES)}")
    if getattr(inner.config, "pretraining_tp", 1) > 1:
        raise ValueError(f"{cls.__name__} with pretraining_tp={inner.config.pretraining_tp} splits its head "
                         "outside lm_head; set config.pretraining_tp = 1")
    if getattr(inner.forward, "_persample_fused_linear", False):
        raise ValueError(f"{cls.__name__} already computes its loss with the fused linear cross-entropy")
    _output_head(inner)
    state = vars(inner)
    had, previous = "forward" in state, state.get("forward")
    original = inner.forward
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        extra = bound.arguments.get(var_keyword, {}) if var_keyword else {}
        labels = bound.arguments.pop("labels", None)
        shift_labels = extra.pop("shift_labels", None)
        if labels is None:  # transformers computes no loss then, even with shift_labels
            return original(*args, **kwargs)
        head = _output_head(inner)
        head.forward = _identity  # the "logits" the model returns are then its last hidden states
        try:
            out = original(*bound.args, **bound.kwargs)
        finally:
            del head.forward
        hidden = out[0] if isinstance(out, tuple) else out.logits
        loss = _head_loss(hidden, head, labels, shift_labels, extra.get("num_items_in_batch"),
                          extra.get("ignore_index", -100), chunk_size)
        if isinstance(out, tuple):
            return (loss, *out[1:])
        return type(out)(loss=loss, **{key: value for key, value in out.items() if key != "logits"})

    forward._persample_fused_linear = True
    inner.forward = forward

    def undo():
        if state.get("forward") is forward:
            if had:
                state["forward"] = previous
            else:
                del state["forward"]

    return FusedLossHandle(undo)
