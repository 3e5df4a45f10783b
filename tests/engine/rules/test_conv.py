import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from persample.checks import NonFiniteGradientWarning
from persample.engine import GhostClipping
from persample.engine.forms import Dense, Implicit
from persample.engine.rules import conv as conv_rule
from tests.engine.reference import assert_matches_reference

CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "stride-padding": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "dilation-rect": dict(in_channels=3, out_channels=4, kernel_size=(3, 2), dilation=(2, 1), padding=(1, 0)),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise-stride": dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, stride=2, bias=False),
    "same-reflect": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", padding_mode="reflect"),
    "same-dilated": dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2),
    "replicate-stride-dilation": dict(in_channels=2, out_channels=3, kernel_size=2, stride=(2, 1), dilation=2,
                                      padding=2, padding_mode="replicate"),
    "circular-no-bias": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular",
                             bias=False),
    "wide-1x1": dict(in_channels=6, out_channels=8, kernel_size=1, stride=2),
}
SPATIAL = {nn.Conv1d: (9,), nn.Conv2d: (7, 6), nn.Conv3d: (5, 4, 6)}


class Net(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.fc = nn.LazyLinear(5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _options(name: str, cls: type[nn.Module]) -> dict:
    """The 2-D configuration adapted to ``cls``'s number of spatial dimensions (tuples cut or extended)."""
    dims = len(SPATIAL[cls])
    options = dict(CONVS[name])
    for key, value in options.items():
        if isinstance(value, tuple):
            options[key] = (value * dims)[:dims]
    return options


def _check(cls: type[nn.Module], options: dict, strategy: str, batch: int = 4) -> None:
    model = Net(cls(**options))
    x = torch.randn(batch, options["in_channels"], *SPATIAL[cls])
    model(x)  # materializes the lazy layer
    assert_matches_reference(model.double(), x.double(), torch.randint(0, 5, (batch,)), loss_fn=cross_entropy,
                             strategy=strategy)


@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_conv(cls, conv, strategy):
    _check(cls, _options(conv, cls), strategy)


@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("way", ["grouped", "unfold", "shifted"])
def test_every_way_of_materializing(cls, conv, way, monkeypatch):
    """The batch-as-groups convolution, the unfolded patches and (stride 1) the per-tap products of shifted views
    each give every example's gradient."""
    options = _options(conv, cls)
    if way == "shifted" and options.get("stride", 1) != 1:
        pytest.skip("the shifted views need stride 1")
    monkeypatch.setattr(conv_rule, "METHOD", way)
    _check(cls, options, "materialize")


def test_shifted_views_refuse_a_stride():
    with pytest.raises(NotImplementedError, match="stride 1"):
        conv_rule._shifted(nn.Conv2d(3, 4, 3, stride=(1, 2)), torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6, 3))


def test_the_faster_way_is_measured_once_per_configuration(monkeypatch):
    monkeypatch.setattr(conv_rule, "_FASTEST", {})
    calls = {"grouped": 0, "unfold": 0, "shifted": 0, "kernel": 0}
    for name, fn in list(conv_rule._WAYS.items()):
        def counted(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setitem(conv_rule._WAYS, name, counted)
    module = nn.Conv2d(3, 4, 3, padding=1)
    x, G = torch.randn(5, 3, 9, 9), torch.randn(5, 4, 9, 9)
    first = conv_rule.per_example_grads(module, x, G)
    # A warm-up and two timed runs each, the winner's result reused; the Triton kernel refuses a CPU tensor at once
    # outside the interpreter's forced runs.
    assert calls == {"grouped": 3, "unfold": 3, "shifted": 3, "kernel": 1}
    (way,) = conv_rule._FASTEST.values()
    second = conv_rule.per_example_grads(module, x, G)
    assert calls[way] == 4 and sum(calls.values()) == 11
    torch.testing.assert_close(first, second)
    for other in ("grouped", "unfold"):
        torch.testing.assert_close(conv_rule._WAYS[other](module, x, G), conv_rule._shifted(module, x, G))
    conv_rule.per_example_grads(module, torch.randn(6, 3, 9, 9), torch.randn(6, 4, 9, 9))  # a new batch size
    assert len(conv_rule._FASTEST) == 2
    # With a stride, the shifted views refuse at once (one call) and are never chosen.
    before = dict(calls)
    conv_rule.per_example_grads(nn.Conv2d(3, 4, 3, stride=2, padding=1), x, torch.randn(5, 4, 5, 5))
    assert calls["shifted"] == before["shifted"] + 1 and calls["unfold"] == before["unfold"] + 3
    assert len(conv_rule._FASTEST) == 3 and list(conv_rule._FASTEST.values())[-1] != "shifted"


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("cls", [nn.Conv1d, nn.Conv2d], ids=lambda c: c.__name__)
def test_the_kernel_way(cls, conv, triton_device, monkeypatch):
    """The Triton kernel that reads the patches in place gives every 1-D and 2-D configuration's per-example
    gradients (against the float64 reference through the engine) and equals the unfold way on the device. On a GPU
    with cuDNN's TF32 off: the reference's convolutions, the kernel and the unfold way's products all in float32
    (with it on, each rounds its products differently, by about 1e-3)."""
    monkeypatch.setattr(conv_rule, "METHOD", "kernel")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    options = _options(conv, cls)
    model = Net(cls(**options))
    x = torch.randn(3, options["in_channels"], *SPATIAL[cls])
    model(x)
    model = model.to(triton_device)
    assert_matches_reference(model, x.to(triton_device), torch.randint(0, 5, (3,), device=triton_device),
                             loss_fn=cross_entropy, strategy="materialize", rtol=1e-4)
    module = model.conv
    G = torch.randn_like(module(x.to(triton_device)))
    torch.testing.assert_close(conv_rule._kernel(module, x.to(triton_device), G),
                               conv_rule._unfolded(module, x.to(triton_device), G), rtol=1e-4, atol=1e-5)


def test_a_failing_kernel_leaves_the_other_ways(monkeypatch):
    """A compiler or launch error of the kernel (not a RuntimeError in Triton) is a refusal when the way is timed,
    and raised as it is when a test forces the kernel."""
    class CompilationError(Exception):
        pass

    def broken(*args, **kwargs):
        raise CompilationError("no")

    monkeypatch.setattr(conv_rule.conv_weight_grads, "conv2d_weight_grads", broken)
    monkeypatch.setattr(conv_rule, "use_triton", lambda t: True)
    module, x, G = nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5), torch.randn(2, 3, 3, 3)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(NotImplementedError, match="CompilationError: no"):
        conv_rule._kernel(module, x, G)
    monkeypatch.setattr(conv_rule, "METHOD", "kernel")
    with pytest.raises(CompilationError):
        conv_rule._kernel(module, x, G)


def test_the_kernel_way_refuses_what_it_cannot_run(monkeypatch):
    """3-D convolutions and float64 go to the other ways (the timing treats the refusal as never fastest)."""
    monkeypatch.setattr(conv_rule, "METHOD", "kernel")
    conv3 = nn.Conv3d(2, 3, 3)
    with pytest.raises(NotImplementedError, match="1-D and 2-D"):
        conv_rule._kernel(conv3, torch.randn(2, 2, 4, 4, 4), torch.randn(2, 3, 2, 2, 2))
    conv2 = nn.Conv2d(2, 3, 3).double()
    with pytest.raises(NotImplementedError, match="1-D and 2-D"):
        conv_rule._kernel(conv2, torch.randn(2, 2, 4, 4, dtype=torch.float64),
                          torch.randn(2, 3, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
def test_materialized_in_chunks(cls, monkeypatch):
    """Chunks of one and of several examples (the last one short) give the whole batch's gradients."""
    monkeypatch.setattr(conv_rule, "METHOD", "unfold")
    for chunk in (1, 3 * 4 * 3 * 3 * 40):
        monkeypatch.setattr(conv_rule, "_CPU_CHUNK", chunk)
        _check(cls, _options("groups", cls), "materialize", batch=5)
        _check(cls, _options("stride-padding", cls), "materialize", batch=5)


class _LiveStorage(TorchDispatchMode):
    """The peak of the bytes of storage that ops allocate while it is on and that are still referenced (a storage
    counted once, freed with the last tensor on it that the mode saw); views of ``inputs`` are not counted."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in inputs}
        self.live, self.now, self.peak = {}, 0, 0

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in self.outside:
                    continue
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += t.untyped_storage().nbytes()
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


def test_materialized_holds_one_chunk_of_patches_at_a_time(monkeypatch):
    """Materializing in chunks: at most one chunk's patches (and its padded input) are alive besides the result, not
    the last chunk's too while the next is copied out."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x, G = torch.randn(8, 4, 10, 10, dtype=torch.float64), torch.randn(8, 6, 10, 10, dtype=torch.float64)
    per_example = 4 * 9 * 100  # n * L patch elements
    monkeypatch.setattr(conv_rule, "_CPU_CHUNK", 2 * per_example)  # four chunks of two examples
    with _LiveStorage(x, G) as probe:
        grads = conv_rule._unfolded(conv, x, G)
    result, patches, padded = grads.numel() * 8, 2 * per_example * 8, 2 * 4 * 12 * 12 * 8
    assert result + patches <= probe.peak <= result + patches + padded
    expected = torch.einsum("bol,bnl->bon", G.flatten(2), F.unfold(x, 3, padding=1))
    torch.testing.assert_close(grads.flatten(2), expected)


@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("norms", ["gram", "shifted", "grads"])
def test_every_way_of_implicit_norms(cls, conv, norms, monkeypatch):
    """An Implicit weight's norms from the per-group Gram matrices of the patches and output gradients, from the
    shifted Gram matrix of the padded input (stride 1; the patches' Gram otherwise), and from the chunk's
    gradients; its clipped sum from one weight gradient of the convolution."""
    monkeypatch.setattr(conv_rule, "NORMS", norms)
    _check(cls, _options(conv, cls), "ghost")


@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
@pytest.mark.parametrize("norms", ["gram", "shifted", "grads"])
def test_implicit_norms_in_chunks(cls, norms, monkeypatch):
    """Chunks of one and of a few examples (the last one short) give the whole batch's norms."""
    monkeypatch.setattr(conv_rule, "NORMS", norms)
    for chunk in (1, 700):
        monkeypatch.setattr(conv_rule, "_CPU_CHUNK", chunk)
        _check(cls, _options("groups", cls), "ghost", batch=5)
        _check(cls, _options("stride-padding", cls), "ghost", batch=5)
        _check(cls, _options("same-dilated", cls), "ghost", batch=5)


@pytest.mark.parametrize("one_view", [True, False], ids=["taps-in-one-view", "tap-by-tap"])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("cls", list(SPATIAL), ids=lambda c: c.__name__)
def test_shifted_gram_equals_the_patches_gram(cls, conv, one_view, monkeypatch):
    """The shifted Gram's squared norms equal the patches' on every configuration with stride 1, per example
    and in float64 to rounding, with the taps' windows summed in one strided view (on a GPU) or one at a time;
    and the norms' way is only ever "shifted" with stride 1."""
    monkeypatch.setattr(conv_rule, "TAPS_IN_ONE_VIEW", one_view)
    options = _options(conv, cls)
    module = cls(**options).double()
    x = torch.randn(3, options["in_channels"], *SPATIAL[cls], dtype=torch.float64)
    G = torch.randn_like(module(x))
    ops = conv_rule.ConvGrad(module)
    costs = conv_rule._norm_costs(module, x.shape[2:], G.shape[2:])
    if any(s != 1 for s in module.stride):
        assert "shifted" not in costs
        return
    torch.testing.assert_close(ops._shifted_gram(x, G), ops._gram(x, G), rtol=1e-12, atol=0)


def test_the_norms_cost_model():
    """WRN-16-4's layers: a deep stride-1 layer on a small map costs the fewest multiply-adds by the shifted Gram
    (no patches), a shallow one on a large map by its gradients, a strided one by the patches' Gram; the ways
    far above the fewest are not candidates for the timing."""
    def costs(module, size):
        x = torch.empty(1, module.in_channels, size, size)
        return conv_rule._norm_costs(module, x.shape[2:], module(x).shape[2:])

    def way(module, size):
        c = costs(module, size)
        return min(c, key=lambda name: c[name][0])

    assert way(nn.Conv2d(256, 256, 3, padding=1), 8) == "shifted"
    assert way(nn.Conv2d(128, 128, 3, padding=1), 16) == "shifted"
    assert way(nn.Conv2d(64, 64, 3, padding=1), 32) == "grads"
    assert way(nn.Conv2d(128, 256, 3, stride=2, padding=1), 16) == "gram"
    assert way(nn.Conv2d(3, 16, 3, padding=1), 32) == "grads"
    early = costs(nn.Conv2d(64, 64, 3, padding=1), 32)
    assert early["gram"][0] > conv_rule._PRUNE * early["grads"][0]  # L^2 n at L = 1024: never timed


def test_the_norms_way_is_measured_once_per_configuration(monkeypatch):
    """The candidates are each timed once (a warm-up and two runs), the fastest is kept per configuration and its
    result returned; the next call runs it alone, a new shape is timed anew, and a strided layer never times the
    shifted Gram."""
    monkeypatch.setattr(conv_rule, "_FASTEST_NORMS", {})
    monkeypatch.setattr(conv_rule, "_PRUNE", 1e9)  # every way a candidate
    calls = {"gram": 0, "shifted": 0, "grads": 0}
    for name, attr in (("gram", "_gram"), ("shifted", "_shifted_gram"), ("grads", "_squares")):
        fn = getattr(conv_rule.ConvGrad, attr)

        def counted(self, x, G, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(self, x, G)
        monkeypatch.setattr(conv_rule.ConvGrad, attr, counted)
    module = nn.Conv2d(3, 4, 3, padding=1).double()
    x, G = torch.randn(5, 3, 9, 9, dtype=torch.float64), torch.randn(5, 4, 9, 9, dtype=torch.float64)
    ops = conv_rule.ConvGrad(module)
    first = ops.sq_norms(x, G)
    assert calls == {"gram": 3, "shifted": 3, "grads": 3}
    (way,) = conv_rule._FASTEST_NORMS.values()
    torch.testing.assert_close(ops.sq_norms(x, G), first)
    assert calls[way] == 4 and sum(calls.values()) == 10
    torch.testing.assert_close(first, ops._squares(x, G), rtol=1e-12, atol=0)
    ops.sq_norms(x[:3], G[:3])
    assert len(conv_rule._FASTEST_NORMS) == 2
    strided = conv_rule.ConvGrad(nn.Conv2d(3, 4, 3, stride=2, padding=1).double())
    before = calls["shifted"]
    strided.sq_norms(x, torch.randn(5, 4, 5, 5, dtype=torch.float64))
    assert calls["shifted"] == before and len(conv_rule._FASTEST_NORMS) == 3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_clipped_sum_has_the_weights_layout(layout, monkeypatch):
    """A weight gradient that the backend returns in another memory format (cuDNN's channels-last for a contiguous
    weight) is handed on in the weight's strides, values unchanged."""
    fmt = torch.channels_last if layout == "contiguous" else torch.contiguous_format  # the other one
    module = nn.Conv2d(8, 6, 3, padding=1)
    if layout == "channels_last":
        module = module.to(memory_format=torch.channels_last)
    real = conv_rule._weight_grad
    monkeypatch.setattr(conv_rule, "_weight_grad", lambda *a, **k: real(*a, **k).contiguous(memory_format=fmt))
    x, G, c = torch.randn(3, 8, 5, 5), torch.randn(3, 6, 5, 5), torch.rand(3)
    summed = conv_rule.ConvGrad(module).weighted_sum(x, G, c)
    assert summed.stride() == module.weight.stride()
    torch.testing.assert_close(summed, real(module, x, G * c.view(-1, 1, 1, 1), per_example=False))


def test_auto_keeps_the_smaller_form():
    """A wide layer on a small map keeps its input and output gradient (the very tensors: no patches copied), a
    narrow one on a large map its materialized gradients."""
    deep = nn.Conv2d(64, 64, 3, padding=1)
    x, grad = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
    forms = conv_rule.conv(conv_rule.Call(deep, (x,), {}, dict(deep.named_parameters()), None), grad, "auto")
    assert isinstance(forms["weight"], Implicit)
    assert forms["weight"].x is x and forms["weight"].G is grad
    early = nn.Conv2d(3, 8, 3, padding=1)
    call = conv_rule.Call(early, (torch.randn(2, 3, 16, 16),), {}, dict(early.named_parameters()), None)
    forms = conv_rule.conv(call, torch.randn(2, 8, 16, 16), "auto")
    assert isinstance(forms["weight"], Dense)



@pytest.mark.parametrize("dtype, form", [(torch.float32, Dense), (torch.bfloat16, Implicit), (torch.float16, Implicit)])
def test_auto_counts_bytes_not_elements(dtype, form):
    """The forms are compared in bytes: the materialized gradients are float32 whatever the input, so a layer whose
    gradient has fewer elements than its input and output gradient together (a stride-2 widening layer: 64 x 128 x
    9 = 73728 against 64 x 32 x 32 + 128 x 16 x 16 = 98304) holds those two in 16-bit floats, at 2 bytes each, and
    its gradient in float32."""
    widening = nn.Conv2d(64, 128, 3, stride=2, padding=1)
    x, grad = torch.randn(2, 64, 32, 32, dtype=dtype), torch.randn(2, 128, 16, 16, dtype=dtype)
    call = conv_rule.Call(widening, (x,), {}, dict(widening.named_parameters()), None)
    assert isinstance(conv_rule.conv(call, grad, "auto")["weight"], form)

class Twice(nn.Module):
    """One convolution applied twice: its weight's norm has a cross term between the two calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.conv(torch.tanh(self.conv(x))).flatten(1))


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_conv_called_twice(strategy):
    model = Twice().double()
    assert_matches_reference(model, torch.randn(4, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,)),
                             loss_fn=cross_entropy, strategy=strategy)


def test_nonfinite_example_drops_out_of_an_implicit_weight():
    """An example with a NaN input contributes nothing to the clipped sum of a weight kept Implicit (its input
    is zeroed too: 0 * NaN would be NaN)."""
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 2 * 2, 3))
    x, y = torch.randn(5, 16, 2, 2), torch.randint(0, 3, (5,))
    engine = GhostClipping(model, max_grad_norm=0.5, loss_fn=cross_entropy, strategy="ghost")
    clean = engine.clipped_grad_sum(x[[0, 2, 3, 4]], y[[0, 2, 3, 4]])
    x[1, 0, 0, 0] = float("nan")
    with pytest.warns(NonFiniteGradientWarning):
        dirty = engine.clipped_grad_sum(x, y)
    assert dirty.nonfinite == 1
    for name, grad in clean.grads.items():
        torch.testing.assert_close(dirty.grads[name], grad)


def test_conv_under_autocast_close_to_float32():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                          nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(6, 3, 8, 8)
    model(x)
    engine = GhostClipping(model, max_grad_norm=1.0, loss_fn=cross_entropy)
    from tests.engine.reference import assert_autocast_close_to_float32

    assert_autocast_close_to_float32(engine, x, torch.randint(0, 5, (6,)))


@pytest.mark.parametrize("cudnn_tf32", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemms_run_at_the_convolutions_precision(cudnn_tf32, dtype, monkeypatch):
    """float32 GEMMs on a GPU follow cuDNN's TF32 setting for the layer's convolutions, not matmul's, and the
    user's matmul precision is back afterwards, even after an error. (A stand-in for a CUDA tensor: only the flag
    handling runs here.)"""
    from types import SimpleNamespace

    monkeypatch.setattr(conv_rule, "_cudnn_tf32", lambda: cudnn_tf32)
    before = torch.get_float32_matmul_precision()
    cuda = SimpleNamespace(is_cuda=True, dtype=dtype)
    want = "high" if cudnn_tf32 else "highest"
    for user in ("highest", "high"):
        torch.set_float32_matmul_precision(user)
        try:
            with conv_rule._as_convolution(cuda):
                assert torch.get_float32_matmul_precision() == (want if dtype == torch.float32 else user)
            assert torch.get_float32_matmul_precision() == user
            with pytest.raises(ValueError), conv_rule._as_convolution(cuda):
                raise ValueError
            assert torch.get_float32_matmul_precision() == user
            with conv_rule._as_convolution(torch.zeros(1)):  # CPU tensors: untouched
                assert torch.get_float32_matmul_precision() == user
        finally:
            torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("way", ["grouped", "unfold", "shifted"])
@pytest.mark.parametrize("strategy", ["materialize", "ghost"])
def test_channels_last_input(way, strategy, monkeypatch):
    """A channels-last model and input (and so channels-last output gradients) give the same gradients."""
    monkeypatch.setattr(conv_rule, "METHOD", way)
    model = Net(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(4, 3, 7, 6)
    model(x)
    model = model.double().to(memory_format=torch.channels_last)
    assert_matches_reference(model, x.double().to(memory_format=torch.channels_last), torch.randint(0, 5, (4,)),
                             loss_fn=cross_entropy, strategy=strategy)
