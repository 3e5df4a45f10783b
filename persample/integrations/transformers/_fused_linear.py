"""A causal LM's training loss without the ``(B, T, V)`` logits: the model stops at its last hidden states and
:func:`persample.linear_cross_entropy` computes the head and the loss together."""

import functools
import inspect

import torch
from torch import Tensor

from persample.integrations.transformers._loss import FusedLossHandle, shift_labels_left

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
        shift_labels = shift_labels_left(labels, ignore_index)
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
        >>> import torch
        >>> import transformers
        >>> from persample.integrations.transformers import apply_fused_linear_cross_entropy
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> reference = model(input_ids=ids, labels=ids).loss
        >>> with apply_fused_linear_cross_entropy(model, chunk_size=4):
        ...     out = model(input_ids=ids, labels=ids)
        ...     out.loss.backward()
        >>> out.logits is None, torch.allclose(out.loss, reference, rtol=1e-5)
        (True, True)

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (losses without logits);
        Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (fused linear cross-entropy).
    """
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
    forward._persample_chunk_size = chunk_size  # DPTrainer's engine computes the head's logits in the same chunks
    inner.forward = forward

    def undo():
        if state.get("forward") is forward:
            if had:
                state["forward"] = previous
            else:
                del state["forward"]

    return FusedLossHandle(undo)
