import pytest
import torch
from torch import nn

from tests.engine.reference import assert_matches_reference


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


class Normed(nn.Module):
    def __init__(self, norm: nn.GroupNorm, channels: int):
        super().__init__()
        # No bias before the norm: with one channel per group the norm cancels it, and its gradient is 0 up to
        # rounding, which no relative tolerance accepts.
        self.conv, self.norm = nn.Conv2d(channels, channels, 1, bias=False), norm

    def forward(self, x):
        return self.norm(self.conv(x) + 3.0) * 2.0  # an offset, so that the group means are not near 0


@pytest.fixture(params=["kernel", "var_mean", None], ids=["kernel", "var_mean", "forward"])
def stats(request, monkeypatch):
    """Both ways of recomputing the group statistics (the GroupNorm kernel's on the CPU, var_mean's on a GPU), and
    the forward's own, taken from the autograd node (None: the default)."""
    from persample.engine.rules import groupnorm

    monkeypatch.setattr(groupnorm, "STATS", request.param)
    return request.param


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [(), (4,), (3, 5)], ids=["0d", "1d", "2d"])
def test_group_norm(groups, affine, spatial, stats):
    if not spatial and groups == 6:
        pytest.skip("one value per group: GroupNorm itself refuses it")
    if not spatial:  # (B, C) inputs go through a Linear
        model = Normed(nn.GroupNorm(groups, 6, affine=affine), 6)
        model.conv = nn.Linear(6, 6, bias=False)
    else:
        model = Normed(nn.GroupNorm(groups, 6, eps=1e-3, affine=affine), 6)
        if len(spatial) == 1:
            model.conv = nn.Conv1d(6, 6, 1, bias=False)
    model = model.double()
    if affine:
        with torch.no_grad():
            model.norm.weight.normal_()  # not the all-ones / all-zeros initialization
            model.norm.bias.normal_()
    x = torch.randn(5, 6, *spatial, dtype=torch.float64)
    y = torch.randn(5, 6, *spatial, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_group_norm_over_chunks_of_examples(monkeypatch):
    """The PyTorch path forms ``sum G x`` over chunks of examples (here one example's 6 x 3 x 5 elements a chunk, and
    two examples, and three which do not divide the batch of 5): the same per-example gradients."""
    from persample.engine import recording
    from persample.engine.rules import groupnorm

    model = Normed(nn.GroupNorm(2, 6, eps=1e-3), 6).double()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x, y = torch.randn(5, 6, 3, 5, dtype=torch.float64), torch.randn(5, 6, 3, 5, dtype=torch.float64)
    # The PyTorch path, also under the interpreter: no call held for the kernel, none computed by it.
    monkeypatch.setattr(recording, "use_triton", lambda x: False)
    monkeypatch.setattr(groupnorm, "use_triton", lambda x: False)
    sums, real = [], groupnorm._sum_gx
    monkeypatch.setattr(groupnorm, "_sum_gx", lambda x, G, acc: sums.append(x.shape[0]) or real(x, G, acc))
    for chunk in (90, 180, 270):
        monkeypatch.setattr(groupnorm, "_CHUNK", chunk)
        assert_matches_reference(model, x, y, loss_fn=squared_error)
    assert sums and set(sums) == {5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sum_gx_in_float32_over_chunks(dtype, monkeypatch):
    """Each example's per-channel ``sum_s G x`` of 16-bit inputs is accumulated in float32 from their exact values
    (each chunk copied to float32, not multiplied in 16 bits), whatever the chunking."""
    from persample.engine.rules import groupnorm

    assert groupnorm._sum_gx(torch.zeros(0, 4, 300, dtype=dtype), torch.zeros(0, 4, 300, dtype=dtype),
                             torch.float32).shape == (0, 4)
    x, G = (torch.randn(7, 4, 300).to(dtype) for _ in range(2))
    reference = (x.double() * G.double()).sum(2)
    for chunk in (1, 1200, 4000, 1 << 20):
        monkeypatch.setattr(groupnorm, "_CHUNK", chunk)
        got = groupnorm._sum_gx(x, G, torch.float32)
        assert got.dtype == torch.float32 and got.shape == (7, 4)
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_group_norm_with_one_parameter_frozen(frozen, stats):
    """The scale alone (its own sums and the statistics) or the shift alone (one sum) trainable."""
    model = Normed(nn.GroupNorm(2, 6, eps=1e-3), 6).double()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    getattr(model.norm, frozen).requires_grad_(False)
    x, y = torch.randn(5, 6, 3, 5, dtype=torch.float64), torch.randn(5, 6, 3, 5, dtype=torch.float64)
    assert_matches_reference(model, x, y, loss_fn=squared_error)


def test_group_norm_has_a_rule():
    """GroupNorm goes through its rule, not the torch.func fallback."""
    from persample.engine.registry import rule_for

    assert rule_for(nn.GroupNorm(2, 4), {"weight", "bias"}) is not None


def test_input_cast_as_cuda_autocast_would(monkeypatch):
    """Under CUDA autocast GroupNorm runs in float32, so its input is cast to float32 before the call (the copy the
    op saves anyway is the one the rule gets); CPU autocast runs it in the input's dtype, so nothing is cast there.
    (The autocast state is stood in for: only the cast's decision runs here.)"""
    from persample.engine import recording
    from persample.engine.registry import rule_for

    assert rule_for(nn.GroupNorm(2, 4), {"weight", "bias"}).cast_input == "float32"
    x = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    monkeypatch.setattr(recording, "autocast_state", lambda t: ("cuda", torch.bfloat16))
    cast, rest = recording.cast_for_autocast((x, 2), "float32")
    assert cast.dtype == torch.float32 and torch.equal(cast, x.float()) and rest == 2
    assert recording.cast_for_autocast((x.float(),), "float32") is None
    assert recording.cast_for_autocast((x.float(),), True)[0].dtype == torch.bfloat16  # a matmul's input
    monkeypatch.setattr(recording, "autocast_state", lambda t: ("cpu", torch.bfloat16))
    assert recording.cast_for_autocast((x,), "float32") is None
    assert recording.cast_for_autocast((x.float(),), "float32") is None


def test_group_norm_on_channels_last_input(stats):
    """A channels-last input (and so a channels-last output gradient) gives the same gradients."""
    model = Normed(nn.GroupNorm(2, 6, eps=1e-3), 6).double().to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x = torch.randn(5, 6, 3, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_matches_reference(model, x, torch.randn(5, 6, 3, 4, dtype=torch.float64), loss_fn=squared_error)


def test_forward_statistics_reused(monkeypatch):
    """The rule takes the forward's mean and rstd from the GroupNorm's autograd node where it has one (here the
    second norm: the first one's input needs no gradient, so its output has no node) and recomputes them where
    not, with the same results as the reference either way."""
    from persample.engine.rules import groupnorm

    taken = []
    real = groupnorm._forward_stats

    def spy(saved, B, groups, acc):
        out = real(saved, B, groups, acc)
        taken.append(out[0] is not None)
        return out

    model = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv1d(4, 4, 1, bias=False), nn.GroupNorm(2, 4)).double()
    with torch.no_grad():
        for norm in (model[0], model[2]):
            norm.weight.normal_()
            norm.bias.normal_()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64) + 2.0, torch.randn(5, 4, 3, dtype=torch.float64)
    monkeypatch.setattr(groupnorm, "_forward_stats", spy)
    assert_matches_reference(model, x, y, loss_fn=squared_error)
    # A PyTorch that cannot tell whether saved-tensor hooks are on gets recomputed statistics only.
    assert (True in taken or groupnorm._saved_tensor_hooks_active()) and False in taken
    assert groupnorm._saved_stats(torch.ones(2, 4)) == {}  # no node: nothing taken


def test_no_statistics_taken_under_saved_tensor_hooks():
    """Under saved-tensor hooks (checkpointing, offloading) unpacking would run their unpack hook in the forward:
    nothing is taken there, and the rule recomputes."""
    from persample.engine.rules import groupnorm

    if groupnorm._saved_tensor_hooks_active():
        pytest.skip("this PyTorch cannot tell whether saved-tensor hooks are on")
    x = torch.randn(3, 4, 5, requires_grad=True)
    taken = groupnorm._saved_stats(nn.GroupNorm(2, 4)(x))
    assert set(taken) == {"mean", "rstd"} and taken["mean"].shape == (3, 2)
    torch.testing.assert_close(taken["mean"], x.detach().view(3, 2, -1).mean(2))
    unpacked = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(t) or t):
        assert groupnorm._saved_stats(nn.GroupNorm(2, 4)(x)) == {}
    assert not unpacked


class Stage(nn.Module):
    """GroupNorms of two shapes, one with its scale frozen, and one called twice: three launches' worth of
    groups and a call that takes the one-call path."""

    def __init__(self):
        super().__init__()
        self.conv, self.down = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.norms = nn.ModuleList([nn.GroupNorm(2, 4), nn.GroupNorm(2, 4), nn.GroupNorm(1, 4), nn.GroupNorm(3, 6)])
        self.norms[1].weight.requires_grad_(False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x)
        for norm in self.norms[:3]:
            h = h + norm(h).tanh()
        h = self.norms[0](h)
        return self.head(self.norms[3](self.down(h)).mean((2, 3)))


@pytest.mark.parametrize("allocated", [None, 1 << 40, 16], ids=["no-allocator", "large", "small"])
def test_held_group_norm_calls_are_batched(allocated, triton_device, monkeypatch):
    """On the Triton path the GroupNorm calls wait for the end of the backward; those with a trainable scale and one
    shape of inputs and statistics share a launch (norms[0] twice; GroupNorm(1, 4) has other statistics' shape;
    the 6-channel one is apart); the frozen scale's call is a sum. Where the allocator reports so little memory in
    use that a sixteenth of it holds no call (``allocated``: what it answers when the first call is held), each
    call is computed as it comes. The results equal the float64 reference."""
    from persample.engine import recording
    from persample.engine.rules import groupnorm

    monkeypatch.setattr(recording, "allocated_bytes", lambda device: allocated)

    launches = []
    grouped = groupnorm._kernel.group_norm_affine_grads_grouped
    monkeypatch.setattr(groupnorm._kernel, "group_norm_affine_grads_grouped",
                        lambda xs, *args, **kwargs: launches.append(len(xs)) or grouped(xs, *args, **kwargs))
    model = Stage().double().to(triton_device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, device=triton_device)
    assert_matches_reference(model, x, torch.randint(0, 3, (4,), device=triton_device))
    assert sorted(launches) == ([1, 1, 1, 1] if allocated == 16 else [1, 1, 2])


def test_hold_budget(monkeypatch):
    """256 MiB where no allocator can be asked (the CPU), else at most a sixteenth of what it has handed out."""
    from persample.engine import recording

    cpu = torch.zeros(1)
    assert recording.hold_budget(cpu) == recording.HELD_BYTES == 1 << 28
    monkeypatch.setattr(recording, "allocated_bytes", lambda device: 1 << 30)
    assert recording.hold_budget(cpu) == 1 << 26
    monkeypatch.setattr(recording, "allocated_bytes", lambda device: 1 << 40)
    assert recording.hold_budget(cpu) == 1 << 28
