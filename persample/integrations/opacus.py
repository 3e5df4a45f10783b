"""Hand per-sample gradients to Opacus: its optimizers read ``p.grad_sample``, ``(B, *p.shape)``."""

from collections.abc import Mapping

from torch import Tensor, nn


def set_grad_sample(model: nn.Module, grads: Mapping[str, Tensor]) -> None:
    """Sets ``p.grad_sample = grads[name]`` on every trainable parameter of ``model``, so that
    :class:`opacus.optimizers.DPOptimizer` can clip, noise and step with gradients from
    :func:`persample.per_sample_grads` (no ``GradSampleModule`` needed).

    Raises:
        ValueError: ``grads`` does not have exactly the trainable parameters' names, or a shape is not
            ``(B, *param.shape)``.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(grads) != set(params):
        raise ValueError(f"grads must have one entry per trainable parameter: expected {sorted(params)}, "
                         f"got {sorted(grads)}")
    for name, p in params.items():
        if tuple(grads[name].shape[1:]) != tuple(p.shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(grads[name].shape)}, expected (B, "
                             f"*{tuple(p.shape)})")
        p.grad_sample = grads[name]
