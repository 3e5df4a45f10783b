"""Our per-sample gradients against Opacus's GradSampleModule, and handed to Opacus's DPOptimizer."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
from torch import nn

import persample

VOCAB = 11


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


class Mixed(nn.Module):
    """Embedding -> Conv2d -> GroupNorm -> LayerNorm -> Linear: tokens (B, 3, 3) -> logits (B, 5)."""

    def __init__(self, dim=4, channels=6):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.conv = nn.Conv2d(dim, channels, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, channels)
        self.layer_norm = nn.LayerNorm(channels * 9)
        self.fc = nn.Linear(channels * 9, 5)

    def forward(self, tokens):
        # contiguous(): Opacus 1.6's Conv2d rule returns wrong per-sample gradients for a permuted
        # (channels-last strided) input; ours are right either way (tests/test_per_sample_grads.py).
        x = self.embed(tokens).permute(0, 3, 1, 2).contiguous()
        x = torch.tanh(self.group_norm(self.conv(x)))
        return self.fc(self.layer_norm(x.flatten(1)))


def _batch(B=6):
    return torch.randint(0, VOCAB, (B, 3, 3)), torch.randint(0, 5, (B,))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # integer inputs: no input gradient
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equal_to_opacus_grad_sample_module(dtype):
    model = Mixed().to(dtype)
    x, y = _batch()
    ours = persample.per_sample_grads(model, x, y)
    opacus_model = GradSampleModule(model)
    F.cross_entropy(opacus_model(x), y).backward()
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for name, p in model.named_parameters():
        assert p.grad_sample.shape == ours[name].shape
        torch.testing.assert_close(ours[name], p.grad_sample, **tolerance, msg=name)
    opacus_model._close()


def test_opacus_dp_optimizer_takes_our_per_sample_grads():
    ours_model, opacus_model = Mixed().double(), Mixed().double()
    opacus_model.load_state_dict(ours_model.state_dict())
    x, y = _batch(8)

    ours = persample.DPOptimizer(torch.optim.SGD(ours_model.parameters(), lr=0.1), ours_model.named_parameters(),
                                 noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=8, sample_rate=0.5)
    ours.accumulate(persample.clip_per_sample(persample.per_sample_grads(ours_model, x, y), 0.3), 8)
    ours.step()

    theirs = OpacusDPOptimizer(torch.optim.SGD(opacus_model.parameters(), lr=0.1), noise_multiplier=0.0,
                               max_grad_norm=0.3, expected_batch_size=8)
    persample.set_grad_sample(opacus_model, persample.per_sample_grads(opacus_model, x, y))
    theirs.step()

    for (name, p), q in zip(ours_model.named_parameters(), opacus_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14, msg=name)


def test_set_grad_sample_checks_names_and_shapes():
    model = Mixed()
    x, y = _batch(3)
    grads = persample.per_sample_grads(model, x, y)
    with pytest.raises(ValueError, match="one entry per trainable parameter"):
        persample.set_grad_sample(model, {k: v for k, v in grads.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="expected"):
        persample.set_grad_sample(model, {**grads, "fc.bias": grads["fc.weight"]})
