import pytest
import torch
from torch import nn

from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Normed(nn.Module):
    def __init__(self, norm: nn.Module, d: int):
        super().__init__()
        self.lin, self.norm = nn.Linear(d, d), norm

    def forward(self, x):
        return self.norm(self.lin(x)) * 2.0


NORMS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "layernorm-no-bias": lambda: nn.LayerNorm(6, bias=False),
    "layernorm-2d-shape": lambda: nn.LayerNorm((3, 6)),
    "rmsnorm": lambda: nn.RMSNorm(6),
    "rmsnorm-eps": lambda: nn.RMSNorm(6, eps=1e-3),
}


@pytest.fixture(params=["pytorch", "triton"])
def device(request) -> str:
    """Where the rule runs: its PyTorch ops, or its Triton kernel (see ``triton_device``)."""
    return "cpu" if request.param == "pytorch" else request.getfixturevalue("triton_device")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", [(5, 3, 6), (5, 2, 3, 6)], ids=["3d", "4d"])
def test_norm_scales(norm, shape, device):
    model = Normed(NORMS[norm](), 6).double().to(device)
    with torch.no_grad():
        for p in model.norm.parameters():
            p.normal_()  # not the all-ones / all-zeros initialization
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    y = torch.randn(*shape, dtype=torch.float64, device=device)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_norm_on_2d_input(device):
    model = Normed(nn.LayerNorm(6), 6).double().to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    y = torch.randn(5, 6, dtype=torch.float64, device=device)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


class Stack(nn.Module):
    """Norm layers of two widths, both kinds, two eps, and one LayerNorm called twice (a parameter with two
    uses): the held calls fall into several groups of one launch each."""

    def __init__(self):
        super().__init__()
        self.inp, self.wide = nn.Linear(6, 6), nn.Linear(6, 10)
        self.norms = nn.ModuleList([nn.LayerNorm(6), nn.LayerNorm(6), nn.RMSNorm(6), nn.LayerNorm(6, eps=1e-3)])
        self.wide_norm, self.out = nn.LayerNorm(10), nn.Linear(10, 6)

    def forward(self, x):
        h = self.inp(x)
        for norm in self.norms:
            h = h + norm(h).tanh()
        h = h + self.norms[0](h * 0.5)
        return self.out(self.wide_norm(self.wide(h)))


@pytest.mark.parametrize("held_bytes", [1 << 28, 1], ids=["one-release", "release-every-call"])
def test_held_norm_calls_are_batched(held_bytes, triton_device, monkeypatch):
    """On the Triton path the engine holds the norm calls to the end of the backward and computes them in one
    launch per group of one shape, kind and eps (here four groups, for six calls); with a tiny memory bound each call
    is computed as soon as it is held. Either way the norms and sums equal the float64 reference."""
    from persample.engine import recording
    from persample.engine.rules import layernorm
    from persample.kernels import norm_affine_grads

    launches = []
    grouped = norm_affine_grads.norm_affine_grads_grouped
    monkeypatch.setattr(norm_affine_grads, "norm_affine_grads_grouped",
                        lambda xs, *args, **kwargs: launches.append(len(xs)) or grouped(xs, *args, **kwargs))
    monkeypatch.setattr(layernorm._kernel, "norm_affine_grads_grouped", norm_affine_grads.norm_affine_grads_grouped)
    monkeypatch.setattr(recording, "HELD_BYTES", held_bytes)
    model = Stack().double().to(triton_device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(4, 3, 6, dtype=torch.float64, device=triton_device)
    y = torch.randn(4, 3, 6, dtype=torch.float64, device=triton_device)
    assert_matches_reference(model, x, y, loss_fn=squared_error)
    if held_bytes == 1:
        assert launches == [1] * 6
    else:  # norms[0] twice and norms[1]; the RMSNorm, the other eps and the wider rows apart
        assert sorted(launches) == [1, 1, 1, 3]


def test_batched_groups_by_shape_kind_and_eps(triton_device):
    """:func:`batched` puts calls together only where one launch serves them: the same rows, kind and eps."""
    from persample.engine.registry import Call
    from persample.engine.rules.layernorm import batched

    def call(module, x):
        return Call(module, (x,), {}, dict(module.named_parameters()), None), torch.randn_like(x)

    x6, x10 = (torch.randn(3, 2, d, dtype=torch.float64, device=triton_device) for d in (6, 10))
    modules = [nn.LayerNorm(6), nn.LayerNorm(6), nn.RMSNorm(6), nn.LayerNorm(6, eps=0.1), nn.LayerNorm(10)]
    calls = [call(m.double().to(triton_device), x10 if m.normalized_shape == (10,) else x6) for m in modules]
    for (c, g), forms in zip(calls, batched(calls), strict=True):
        assert set(forms) == set(c.params)
        x = c.args[0]
        x_hat = nn.functional.layer_norm(x, c.module.normalized_shape, eps=c.module.eps) \
            if isinstance(c.module, nn.LayerNorm) else nn.functional.rms_norm(x, c.module.normalized_shape)
        torch.testing.assert_close(forms["weight"].g, (g * x_hat).sum(1))
