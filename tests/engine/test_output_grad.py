import pytest
import torch

from persample.engine.output_grad import loss_and_output_grad
from tests.engine.reference import lm_loss


@pytest.mark.parametrize("shape", [(4, 7), (4, 5, 7), (4, 2, 3, 7)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_example_mean_losses_and_gradients(shape, dtype):
    logits = torch.randn(*shape, dtype=dtype)
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets[0] = -100  # nothing counted
    if len(shape) > 2:
        targets[1].view(-1)[:2] = -100
    losses, grad, finish = loss_and_output_grad(logits, targets, ignore_index=-100, loss_fn=None)
    finish()
    reference = logits.double().requires_grad_()
    expected = lm_loss(reference, targets)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=tol, atol=tol)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol)
    assert losses[0] == 0 and not grad[0].any()


def test_custom_loss_fn():
    out = torch.randn(3, 4, dtype=torch.float64)
    y = torch.randn(3, 4, dtype=torch.float64)
    losses, grad, finish = loss_and_output_grad(out, y, ignore_index=-100,
                                                loss_fn=lambda o, t: (o - t).pow(2).sum(1))
    finish()
    torch.testing.assert_close(losses, (out - y).pow(2).sum(1))
    torch.testing.assert_close(grad, 2 * (out - y))


@pytest.mark.parametrize("output, targets, loss_fn, error, match", [
    ((3, 4), (3, 5), None, ValueError, "targets must have shape"),
    ((3,), (3,), None, ValueError, "logits must have shape"),
    ((3, 4), (3,), lambda o, t: o.sum(), ValueError, "one loss per example"),
])
def test_errors(output, targets, loss_fn, error, match):
    with pytest.raises(error, match=match):
        loss_and_output_grad(torch.randn(*output), torch.zeros(*targets, dtype=torch.long), ignore_index=-100,
                             loss_fn=loss_fn)
    with pytest.raises(TypeError, match="floating-point tensor"):
        loss_and_output_grad((torch.randn(3, 4),), torch.zeros(3, dtype=torch.long), ignore_index=-100, loss_fn=None)


@pytest.mark.parametrize("bad", [7, -2])
def test_an_out_of_range_target_raises_by_finish(bad):
    targets = torch.randint(0, 7, (4, 5))
    targets[2, 1] = bad
    with pytest.raises(ValueError, match=f"class index {bad}, outside"):
        _, _, finish = loss_and_output_grad(torch.randn(4, 5, 7), targets, ignore_index=-100, loss_fn=None)
        finish()
