"""Activation checkpointing and modules run with gradients off: the engine records each call of a module with
trainable parameters and the gradient of its output, which neither allows. A clear ValueError names the fix (not
an AttributeError from the recording, nor torch's recomputation mismatch), and the engine stays usable."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import persample


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Linear(4, 5)
        self.mode = None  # None, "reentrant", "non-reentrant" or "no_grad"

    def body(self, x):
        return torch.relu(self.norm(self.conv(x)))

    def forward(self, x):
        if self.mode in ("reentrant", "non-reentrant"):
            h = checkpoint(self.body, x, use_reentrant=self.mode == "reentrant")
        elif self.mode == "no_grad":
            with torch.no_grad():
                h = self.body(x)
        else:
            h = self.body(x)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode, message", [("reentrant", "gradients off"), ("non-reentrant", "checkpointing"),
                                           ("no_grad", "gradients off")])
def test_refused_with_the_fix_named_and_the_engine_usable_after(mode, message):
    torch.manual_seed(0)
    model = Net()
    engine = persample.GhostClipping(model, max_grad_norm=1.0)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    expected = engine.clipped_grad_sum(x, y)
    model.mode = mode
    with warnings.catch_warnings():  # reentrant checkpointing warns that no input requires a gradient
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            engine.clipped_grad_sum(x, y)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    model.mode = None
    again = engine.clipped_grad_sum(x, y)
    torch.testing.assert_close(again.norms, expected.norms)
    for name in expected.grads:
        torch.testing.assert_close(again.grads[name], expected.grads[name])



def test_saved_tensor_hooks_other_than_checkpointing_are_allowed():
    """save_on_cpu (and a user's own saved-tensor hooks) change where saved tensors live, not the forward: the
    recording tells them apart from checkpointing's, and the step equals one without them."""
    torch.manual_seed(0)
    model = Net()
    engine = persample.GhostClipping(model, max_grad_norm=1.0)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    expected = engine.clipped_grad_sum(x, y)
    packed = []
    for hooks in (torch.autograd.graph.save_on_cpu(),
                  torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t)):
        with hooks:
            got = engine.clipped_grad_sum(x, y)
        torch.testing.assert_close(got.norms, expected.norms)
        for name in expected.grads:
            torch.testing.assert_close(got.grads[name], expected.grads[name])
    assert packed  # the user's hooks did run


@pytest.mark.parametrize("mode, message", [("reentrant", "gradients off"), ("non-reentrant", "checkpointing")])
def test_make_private_loop_refuses_and_recovers(mode, message):
    """Under make_private the error comes from the user's forward (not from their loss.backward(), where torch's
    recomputation mismatch would name no fix), and the next step runs as if it had not."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with warnings.catch_warnings():  # the accountant's note on poisson_sampling=False
        warnings.simplefilter("ignore")
        model, optimizer, loader = persample.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
            poisson_sampling=False)
    x, y = next(iter(loader))
    model.mode = mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            model(x)
    assert all(p.requires_grad for p in model.parameters())
    model.mode = None
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
