"""Property-based tests of the fast engine (persample.GhostClipping) against the vmap pipeline.

Hypothesis draws small float64 models: MLPs (on features or on token sequences, with an embedding), CNNs
(Conv1d or Conv2d stacks of random channels, kernels, strides, paddings, dilations and groups) and transformers
(tests/engine/models.py's TinyGPT: depth, heads, norms, positions, a tied or untied head), with random frozen
modules, batch sizes, sequence lengths and ignored tokens. On each, the engine's per-example norms and clipped
sum must equal those of ``persample.per_sample_grads`` followed by ``per_sample_norms`` and ``clip_per_sample``,
to 1e-9 relative (float64 throughout; the two compute the same sums in other orders), with a clipping bound
that clips some examples and not others. Budget and CI behaviour: tests/properties.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import persample
from persample.engine import GhostClipping
from tests.engine.models import TinyGPT
from tests.properties import budget

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
RTOL = 1e-9


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class SequenceMLP(nn.Module):
    """Tokens -> embedding -> Linear stack -> class scores per token: (B, T) -> (B, T, V)."""

    def __init__(self, vocab: int, widths: list[int], bias: bool, activation: type[nn.Module]):
        super().__init__()
        self.emb = nn.Embedding(vocab, widths[0])
        layers = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b, bias=bias), activation()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], vocab, bias=bias)

    def forward(self, idx):
        return self.head(self.body(self.emb(idx)))


# A model is drawn as plain data (so that a failing example can be kept as an explicit @example) and built by
# _build.
mlps = st.fixed_dictionaries(dict(
    kind=st.just("mlp"), sequence=st.booleans(), d_in=st.integers(1, 5),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), bias=st.booleans(),
    activation=st.sampled_from(sorted(ACTIVATIONS)), classes=st.integers(1, 7)))


@st.composite
def cnns(draw):
    two_d = draw(st.booleans())
    size = draw(st.integers(4, 7))
    channels, length, convs = [draw(st.sampled_from([1, 2, 3, 4]))], size, []
    for _ in range(draw(st.integers(1, 2))):
        kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        padding, dilation = draw(st.integers(0, 1)), draw(st.integers(1, 2))
        out_length = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        if out_length < 1:
            break
        out = draw(st.sampled_from([1, 2, 4, 6]))
        groups = 2 if channels[-1] % 2 == 0 and out % 2 == 0 and draw(st.booleans()) else 1
        convs.append(dict(in_channels=channels[-1], out_channels=out, kernel_size=kernel, stride=stride,
                          padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans())))
        channels.append(out)
        length = out_length
    return dict(kind="cnn", two_d=two_d, size=size, convs=convs, flat=channels[-1] * length ** (1 + two_d),
                classes=draw(st.integers(1, 5)))


@st.composite
def transformers(draw):
    heads = draw(st.integers(1, 2))
    return dict(kind="transformer", vocab=draw(st.integers(2, 12)), d=heads * draw(st.sampled_from([2, 4])),
                layers=draw(st.integers(1, 2)), heads=heads,
                positions=draw(st.sampled_from(["arange", "expand", "broadcast"])), tied=draw(st.booleans()),
                norm=draw(st.sampled_from(sorted(NORMS))))


problems = st.fixed_dictionaries(dict(
    model=st.one_of(mlps, cnns(), transformers()), batch=st.integers(1, 5), length=st.integers(1, 6),
    ignored=st.sets(st.integers(0, 29), max_size=8), frozen=st.sets(st.integers(0, 9), max_size=3),
    seed=st.integers(0, 2**16)))


def _build(spec) -> tuple[nn.Module, int | None, tuple[int, ...], int]:
    """(model, vocabulary of its token inputs or None, feature shape of its float inputs, classes)."""
    if spec["kind"] == "transformer":
        options = {k: v for k, v in spec.items() if k not in ("kind", "norm")}
        return TinyGPT(**options, max_len=8, norm=NORMS[spec["norm"]]), spec["vocab"], (), spec["vocab"]
    if spec["kind"] == "cnn":
        conv = nn.Conv2d if spec["two_d"] else nn.Conv1d
        layers = []
        for options in spec["convs"]:
            layers += [conv(**options), nn.ReLU()]
        channels = spec["convs"][0]["in_channels"] if spec["convs"] else 1
        if not spec["convs"]:
            spec = {**spec, "flat": spec["size"] ** (1 + spec["two_d"])}
        shape = (channels, spec["size"], spec["size"]) if spec["two_d"] else (channels, spec["size"])
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(spec["flat"], spec["classes"])), None, shape, \
            spec["classes"]
    activation, widths, classes = ACTIVATIONS[spec["activation"]], spec["widths"], spec["classes"]
    if spec["sequence"]:
        return SequenceMLP(classes, widths, spec["bias"], activation), classes, (), classes
    dims, layers = [spec["d_in"], *widths], []
    for a, b in zip(dims, dims[1:], strict=False):
        layers += [nn.Linear(a, b, bias=spec["bias"]), activation()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], classes, bias=spec["bias"])), None, (spec["d_in"],), classes


def _instance(p):
    """The model (float64, some of its modules frozen), inputs and targets of problem ``p``."""
    torch.manual_seed(p["seed"])
    model, vocab, features, classes = _build(p["model"])
    model = model.double()
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for i in sorted(p["frozen"]):
        if i < len(owners):
            owners[i].requires_grad_(False)
    if not any(q.requires_grad for q in model.parameters()):
        owners[-1].requires_grad_(True)
    B = p["batch"]
    if vocab is not None:  # tokens, with some targets ignored
        inputs = torch.randint(0, vocab, (B, p["length"]))
        targets = torch.randint(0, classes, (B, p["length"]))
    else:
        inputs = torch.randn(B, *features, dtype=torch.float64)
        targets = torch.randint(0, classes, (B,))
    flat = targets.view(-1)
    for i in p["ignored"]:
        if i < flat.numel():
            flat[i] = -100
    return model, inputs, targets


@budget(25)
@given(p=problems)
def test_engine_matches_the_vmap_pipeline(p):
    model, inputs, targets = _instance(p)
    grads = persample.per_sample_grads(model, inputs, targets)
    norms = persample.per_sample_norms(grads)
    positive = norms[norms > 0]
    max_grad_norm = float(positive.median()) if len(positive) else 1.0
    summed = persample.clip_per_sample(grads, max_grad_norm, norms=norms)

    out = GhostClipping(model, max_grad_norm=max_grad_norm).clipped_grad_sum(inputs, targets)
    torch.testing.assert_close(out.norms.double(), norms, rtol=RTOL, atol=RTOL * float(norms.max()))
    assert set(out.grads) == set(summed) == {n for n, q in model.named_parameters() if q.requires_grad}
    for name, expected in summed.items():
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(out.grads[name], expected, rtol=RTOL, atol=RTOL * scale,
                                   msg=lambda m, name=name: f"{p['model']['kind']} {name}: {m}")
