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

* :class:`DPTrainer` (:mod:`._trainer`) fine-tunes with DP-SGD: Poisson sampling, the fast engine's per-sequence
  clipping, noise once per logical step, the accountant's epsilon logged and checkpointed.

transformers is imported by this package, never by ``import persample``.
"""

from persample.integrations.transformers._fused_linear import (
    FUSED_LINEAR_ARCHITECTURES,
    apply_fused_linear_cross_entropy,
)
from persample.integrations.transformers._loss import (
    FusedLossHandle,
    apply_fused_loss,
    apply_fused_loss_to_class,
    causal_lm_loss,
    per_sequence_loss,
    sequence_classification_loss,
    shift_labels_left,
)
from persample.integrations.transformers._trainer import DPTrainer, DPTrainingArguments

__all__ = [
    "DPTrainer",
    "DPTrainingArguments",
    "FUSED_LINEAR_ARCHITECTURES",
    "FusedLossHandle",
    "apply_fused_linear_cross_entropy",
    "apply_fused_loss",
    "apply_fused_loss_to_class",
    "causal_lm_loss",
    "per_sequence_loss",
    "sequence_classification_loss",
    "shift_labels_left",
]
