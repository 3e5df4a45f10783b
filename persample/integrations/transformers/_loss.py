"""transformers' loss functions replaced by persample's fused cross-entropy, and one loss per sequence."""

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


def shift_labels_left(labels: Tensor, ignore_index: int) -> Tensor:
    """``labels (..., T)`` -> ``(..., T)``: position t is scored against token t + 1, as causal LMs are; the last
    position has no next token and gets ``ignore_index``.

    Examples:
        >>> import torch
        >>> from persample.integrations.transformers import shift_labels_left
        >>> shift_labels_left(torch.tensor([[5, 6, 7, 8]]), -100)
        tensor([[   6,    7,    8, -100]])
    """
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

    Examples:
        >>> import torch
        >>> from transformers.loss.loss_utils import ForCausalLMLoss
        >>> from persample.integrations.transformers import causal_lm_loss
        >>> logits, labels = torch.randn(2, 6, 10), torch.randint(0, 10, (2, 6))
        >>> labels[1, 4:] = -100  # padding
        >>> torch.allclose(causal_lm_loss(logits, labels, 10), ForCausalLMLoss(logits, labels, 10))
        True
        >>> torch.allclose(causal_lm_loss(logits, labels, 10, num_items_in_batch=12),  # gradient accumulation
        ...                ForCausalLMLoss(logits, labels, 10, num_items_in_batch=12))
        True

    References:
        Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP 2020 (System
        Demonstrations) (the function replaced).
    """
    logits = logits.float()
    if shift_labels is None:
        shift_labels = shift_labels_left(labels, ignore_index)
    logits = logits.reshape(-1, vocab_size)
    return _fixed_cross_entropy(logits, shift_labels.reshape(-1).to(logits.device), num_items_in_batch,
                                ignore_index)


def sequence_classification_loss(labels: Tensor, pooled_logits: Tensor, config, **kwargs) -> Tensor:
    """Drop-in for ``transformers.loss.loss_utils.ForSequenceClassificationLoss``.

    ``pooled_logits (B, num_labels)``, ``labels (B,)``. Single-label classification goes through the fused
    cross-entropy; regression and multi-label classification (``config.problem_type``, inferred exactly as
    transformers does when unset) are left to transformers' function.

    Examples:
        >>> import torch
        >>> from transformers import PretrainedConfig
        >>> from transformers.loss.loss_utils import ForSequenceClassificationLoss
        >>> from persample.integrations.transformers import sequence_classification_loss
        >>> logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
        >>> ours = sequence_classification_loss(labels, logits, PretrainedConfig(num_labels=3))
        >>> torch.allclose(ours, ForSequenceClassificationLoss(labels, logits, PretrainedConfig(num_labels=3)))
        True

    References:
        Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP 2020 (System
        Demonstrations) (the function replaced).
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

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from persample.integrations.transformers import per_sequence_loss
        >>> logits, labels = torch.randn(2, 6, 10), torch.randint(0, 10, (2, 6))
        >>> labels[1, 3:] = -100  # the second sequence has 3 tokens: 2 next-token targets
        >>> losses = per_sequence_loss(logits, labels)
        >>> losses.shape
        torch.Size([2])
        >>> torch.allclose(losses[1], F.cross_entropy(logits[1, :2], labels[1, 1:3]))
        True

    References:
        Li, Tramèr, Liang and Hashimoto, "Large Language Models Can Be Strong Differentially Private Learners",
        ICLR 2022 (the sequence as the unit of privacy in DP fine-tuning).
    """
    if shift:
        labels = shift_labels_left(labels, ignore_index)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").to(acc)
    counted = (labels != ignore_index).sum(-1).to(acc)
    return rows.sum(-1) / counted.clamp_min(1)


class FusedLossHandle:
    """Undoes :func:`apply_fused_loss` or :func:`apply_fused_loss_to_class`; also a context manager.

    Examples:
        >>> import transformers
        >>> from persample.integrations.transformers import apply_fused_loss, causal_lm_loss
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> handle = apply_fused_loss(model)
        >>> model.loss_function is causal_lm_loss
        True
        >>> handle.remove(); handle.remove()  # the second call does nothing
        >>> model.loss_function is causal_lm_loss
        False
    """

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

    Examples:
        >>> import torch
        >>> import transformers
        >>> from persample.integrations.transformers import apply_fused_loss
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> reference = model(input_ids=ids, labels=ids).loss
        >>> with apply_fused_loss(model):  # or handle = apply_fused_loss(model); ...; handle.remove()
        ...     fused = model(input_ids=ids, labels=ids).loss
        >>> torch.allclose(fused, reference)
        True

    References:
        Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP 2020 (System
        Demonstrations) (its ``loss_function``).
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

    Examples:
        >>> import transformers
        >>> from persample.integrations.transformers import apply_fused_loss_to_class, causal_lm_loss
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2)
        >>> with apply_fused_loss_to_class(transformers.LlamaForCausalLM):
        ...     transformers.LlamaForCausalLM(config).loss_function is causal_lm_loss  # created after the patch
        True
        >>> transformers.LlamaForCausalLM(config).loss_function is causal_lm_loss
        False

    References:
        Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP 2020 (System
        Demonstrations) (its ``loss_function``).
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
