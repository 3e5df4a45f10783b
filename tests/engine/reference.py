"""Float64 references for the engine: materialized per-example gradients from ``vmap(grad)``."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def lm_loss(output: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """``(B,)`` each example's mean cross-entropy over its counted targets (0 if none): the engine's default."""
    B, V = output.shape[0], output.shape[-1]
    rows = F.cross_entropy(output.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index, reduction="none")
    counted = (targets != ignore_index).reshape(B, -1).sum(1)
    return rows.reshape(B, -1).sum(1) / counted.clamp_min(1)


def per_example_grads(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn=lm_loss) -> dict[str, Tensor]:
    """``{name: (B, *shape)}`` for the trainable parameters: ``vmap(grad)`` of one example's loss."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(params, x, y):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)


def norms_and_clipped_sum(grads: dict[str, Tensor], max_grad_norm: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example norms over all parameters and ``sum_b min(1, C / (norm_b + 1e-6)) grad_b``."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return norms, {n: torch.einsum("b,b...->...", factors, g) for n, g in grads.items()}


def assert_matches_reference(model: nn.Module, inputs: Tensor, targets: Tensor, *, loss_fn=None,
                             strategy: str = "auto", rtol: float = 1e-9) -> None:
    """The engine's norms and clipped sums on ``model`` equal the float64 materialized ones, with a bound that
    clips some examples and not others."""
    from persample.engine import GhostClipping

    reference = per_example_grads(model, inputs, targets, loss_fn or lm_loss)
    norms, _ = norms_and_clipped_sum(reference, 1.0)
    max_grad_norm = float(norms.median()) if float(norms.median()) > 0 else 1.0
    _, summed = norms_and_clipped_sum(reference, max_grad_norm)
    engine = GhostClipping(model, max_grad_norm=max_grad_norm, loss_fn=loss_fn, strategy=strategy)
    out = engine.clipped_grad_sum(inputs, targets)
    torch.testing.assert_close(out.norms.to(norms.dtype), norms, rtol=rtol, atol=rtol * float(norms.max()))
    assert set(out.grads) == set(summed)
    for name, expected in summed.items():
        assert out.grads[name].dtype == model.get_parameter(name).dtype
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(out.grads[name].to(expected.dtype), expected, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_autocast_close_to_float32(engine, inputs: Tensor, targets: Tensor) -> None:
    """Under CPU bf16 autocast the engine's norms and clipped sums stay close to its float32 ones (bf16
    tolerances), and the sums keep the float32 parameters' dtype."""
    exact = engine.clipped_grad_sum(inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = engine.clipped_grad_sum(inputs, targets)
    torch.testing.assert_close(mixed.norms, exact.norms, rtol=3e-2, atol=3e-2 * float(exact.norms.max()))
    for name, g in exact.grads.items():
        assert mixed.grads[name].dtype == torch.float32
        assert float((mixed.grads[name] - g).norm() / g.norm()) < 5e-2, name
