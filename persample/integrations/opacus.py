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

    Examples:
        >>> import torch
        >>> from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
        >>> import persample
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> persample.set_grad_sample(model, persample.per_sample_grads(model, x, y))
        >>> model.weight.grad_sample.shape
        torch.Size([8, 3, 4])
        >>> optimizer = OpacusDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
        ...                               max_grad_norm=1.0, expected_batch_size=8)
        >>> optimizer.step()  # Opacus clips, sums, noises and steps
        >>> model.weight.grad.shape
        torch.Size([3, 4])

    References:
        Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021 (the
        ``grad_sample`` convention).
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
