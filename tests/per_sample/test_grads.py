"""persample.per_sample_grads against a loop of ordinary autograd, one example at a time, in float64."""

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

VOCAB = 13
# Triton picks the interpreter when its kernels are defined, so only a run started with it can use it.
TRITON_AT_START = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.norm(self.conv(x))), 2).flatten(1))


class TinyLM(nn.Module):
    """One pre-norm transformer block with causal attention: tokens (B, T) -> logits (B, T, VOCAB)."""

    def __init__(self, dim=8, heads=2, max_len=6):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.tok(tokens) + self.pos[:T]
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + self.proj(attended)
        return self.head(x + self.mlp(self.ln2(x)))


def _batch(kind, B):
    if kind == "mlp":
        return MLP(), torch.randn(B, 5), torch.randint(0, 4, (B,))
    if kind == "cnn":
        return SmallCNN(), torch.randn(B, 1, 6, 6), torch.randint(0, 4, (B,))
    tokens = torch.randint(0, VOCAB, (B, 6))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100  # no next token
    targets[0, :3] = -100  # padding: uncounted positions
    targets[-1, :] = -100  # an example with no counted token: loss 0, gradient 0
    return TinyLM(), tokens, targets


def _loop_reference(model, inputs, targets):
    """Per-example gradients the slow way: F.cross_entropy (mean over counted positions) and backward."""
    grads = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    for i in range(len(inputs)):
        model.zero_grad()
        logits = model(inputs[i:i + 1])
        target = targets[i:i + 1].reshape(-1)
        if (target == -100).all():
            for name in grads:
                grads[name].append(torch.zeros_like(dict(model.named_parameters())[name]))
            continue
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name].append(p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def _assert_close(ours, reference):
    assert list(ours) == list(reference)
    for name in reference:
        assert ours[name].shape == reference[name].shape, name
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_matches_per_example_autograd(kind, chunk_size):
    model, inputs, targets = _batch(kind, B=5)
    model.double()
    if inputs.is_floating_point():
        inputs = inputs.double()
    ours = persample.per_sample_grads(model, inputs, targets, chunk_size=chunk_size)
    _assert_close(ours, _loop_reference(model, inputs, targets))
    if kind == "lm":
        assert all(g[-1].abs().max() == 0 for g in ours.values()), "an example with no counted token has no gradient"


def test_sequence_mask_is_respected():
    model, tokens, targets = _batch("lm", B=4)
    model.double()
    mask = torch.rand(targets.shape) < 0.6
    ours = persample.per_sample_grads(model, tokens, targets, mask=mask)
    _assert_close(ours, _loop_reference(model, tokens, torch.where(mask, targets, -100)))


@pytest.mark.skipif(not (TRITON_AT_START or torch.cuda.is_available()),
                    reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1 set before Triton is imported")
def test_matches_through_the_triton_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    model, inputs, targets = _batch("mlp", B=3)
    model.double()
    _assert_close(persample.per_sample_grads(model, inputs.double(), targets),
                  _loop_reference(model, inputs.double(), targets))


def test_norms_are_the_norms_of_the_gradients():
    model, inputs, targets = _batch("cnn", B=4)
    model.double()
    grads = persample.per_sample_grads(model, inputs.double(), targets)
    flat = torch.cat([g.reshape(4, -1) for g in grads.values()], dim=1)
    norms = persample.per_sample_grad_norms(model, inputs.double(), targets)
    assert norms.shape == (4,)
    torch.testing.assert_close(norms, flat.norm(dim=1))


def test_frozen_parameters_are_skipped_and_buffers_used():
    class Scaled(MLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(3.0))

        def forward(self, x):
            return super().forward(x) * self.scale

    model = Scaled().double()
    model.net[0].weight.requires_grad_(False)
    inputs, targets = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    ours = persample.per_sample_grads(model, inputs, targets)
    assert list(ours) == ["net.0.bias", "net.2.weight", "net.2.bias"]
    _assert_close(ours, _loop_reference(model, inputs, targets))


def test_dropout_draws_per_example():
    model = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 3)).double().train()
    inputs = torch.randn(1, 5, dtype=torch.float64).expand(6, 5)
    targets = torch.zeros(6, dtype=torch.long)
    first = persample.per_sample_grads(model, inputs, targets)["2.weight"]
    masks = (first != 0).any(dim=1)  # which hidden units survived dropout, per example
    assert len({tuple(m.tolist()) for m in masks}) == 6, "every example should get its own dropout mask"
    model.eval()
    evaluated = persample.per_sample_grads(model, inputs, targets)["2.weight"]
    torch.testing.assert_close(evaluated, evaluated[:1].expand_as(evaluated))


def test_empty_batch():
    model, inputs, targets = _batch("cnn", B=0)
    grads = persample.per_sample_grads(model, inputs, targets)
    assert {name: tuple(g.shape) for name, g in grads.items()} == {
        name: (0, *p.shape) for name, p in model.named_parameters()}
    assert persample.per_sample_grad_norms(model, inputs, targets).shape == (0,)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(8), nn.SyncBatchNorm(8)])
def test_batch_norm_is_refused(norm):
    model = nn.Sequential(nn.Linear(5, 8), norm, nn.Linear(8, 3))
    with pytest.raises(ValueError, match="GroupNorm"):
        persample.per_sample_grads(model, torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_forward_that_mixes_examples_is_refused():
    class Centered(MLP):
        def forward(self, x):
            return super().forward(x - x.mean(dim=0, keepdim=True))

    with pytest.raises(ValueError, match="mixes examples"):
        persample.per_sample_grads(Centered(), torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_model_that_cannot_be_vmapped_is_explained():
    class DataDependent(MLP):
        def forward(self, x):
            return super().forward(x) * (2.0 if x.sum().item() > 0 else 1.0)

    with pytest.raises(ValueError, match="vmap"):
        persample.per_sample_grads(DataDependent(), torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_loss_must_be_one_value_per_example():
    model, inputs, targets = _batch("lm", B=3)
    with pytest.raises(ValueError, match="one value per example"):
        persample.per_sample_grads(model, inputs, targets,
                                   loss_fn=functools.partial(persample.cross_entropy, reduction="none"))


@pytest.mark.parametrize("targets_batch", [3, 5])
def test_batch_sizes_must_match(targets_batch):
    with pytest.raises(ValueError, match="same batch size"):
        persample.per_sample_grads(MLP(), torch.randn(4, 5), torch.zeros(targets_batch, dtype=torch.long))


def test_double_log_softmax_warns():
    model = nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=-1))
    with pytest.warns(UserWarning, match="log_softmax is applied twice"):
        persample.per_sample_grads(model, torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_raw_logits_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        persample.per_sample_grads(MLP(), torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
        # A loss on log-probabilities is the right pairing for log_softmax outputs: no warning either.
        model = nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=-1))
        persample.per_sample_grads(model, torch.randn(4, 5), torch.zeros(4, dtype=torch.long), loss_fn=F.nll_loss)


def test_conv_on_a_permuted_input():
    # Channels-last strides reach the convolution (Opacus 1.6's Conv2d rule gets these wrong).
    class ChannelsLast(SmallCNN):
        def forward(self, x):
            return super().forward(x.permute(0, 3, 1, 2))

    model = ChannelsLast().double()
    model.conv = nn.Conv2d(2, 4, 3, padding=1).double()
    inputs, targets = torch.randn(4, 6, 6, 2, dtype=torch.float64), torch.randint(0, 4, (4,))
    _assert_close(persample.per_sample_grads(model, inputs, targets), _loop_reference(model, inputs, targets))


def test_each_module_keeps_its_training_mode():
    """The check's eval-mode forward restores every module's own mode: a model held in eval mode inside a wrapper
    left in train mode keeps its dropout off (model.train(flag) would have switched it on)."""
    inner = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).eval()
    model = nn.Sequential(inner)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    grads = persample.per_sample_grads(model, x, y)
    assert model.training and not inner.training and not inner[1].training
    torch.testing.assert_close(grads, persample.per_sample_grads(model, x, y))  # no dropout: the same gradients twice
