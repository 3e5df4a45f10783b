"""The fast per-sample engine: per-example gradient norms and the clipped, summed gradient without
materializing per-example gradients, from one forward and one backward.

* :mod:`~persample.engine.ghost_clipping` — the step (loss side, backward, norms, clipping).
* :mod:`~persample.engine.recording` — which module calls the step hooks, and what the hooks keep.
* :mod:`~persample.engine.forms` — per-example gradients in factored form; their inner products and sums.
* :mod:`~persample.engine.stacks` — the same for the same-shaped layers of many blocks, in one op each.
* :mod:`~persample.engine.registry` and :mod:`~persample.engine.rules` — one rule per layer type.
* :mod:`~persample.engine.uses` — which module call uses which parameter.
* :mod:`~persample.engine.output_grad` — per-example losses and output gradients from the fused kernel.
"""

from persample.engine.ghost_clipping import (
    ClippedGrads,
    ClippedGradSum,
    GhostClipping,
    Recording,
    clipped_grad_sum,
    per_sample_grad_norms_fast,
)
from persample.engine.registry import register_rule

__all__ = ["ClippedGradSum", "ClippedGrads", "GhostClipping", "Recording", "clipped_grad_sum",
           "per_sample_grad_norms_fast", "register_rule"]
