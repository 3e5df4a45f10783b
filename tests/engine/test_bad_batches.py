"""The engine (persample/engine/ghost_clipping.py) on batches that would break a DP run: examples whose gradient
or loss is not finite, modules that mix examples, empty batches. Values against the float64 materialized
reference of tests/engine/reference.py on the examples that count."""

import warnings

import pytest
import torch
from torch import nn

import persample
from persample.engine import GhostClipping, per_sample_grad_norms_fast, recording
from tests.engine.models import SmallCNN, TinyGPT
from tests.engine.reference import lm_loss, norms_and_clipped_sum, per_example_grads

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

NAN, INF = float("nan"), float("inf")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(kind: str, B: int = 6):
    if kind == "mlp":
        return _mlp(), torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
    return SmallCNN().double(), torch.randn(B, 3, 7, 7, dtype=torch.float64), torch.randint(0, 5, (B,))


def _assert_sums_of(out, model, inputs, targets, keep, max_grad_norm, loss_fn=lm_loss):
    """``out.grads`` are the float64 clipped sums over the examples ``keep`` alone."""
    _, expected = norms_and_clipped_sum(per_example_grads(model, inputs[keep], targets[keep], loss_fn),
                                        max_grad_norm)
    for name, g in expected.items():
        assert torch.isfinite(out.grads[name]).all(), name
        torch.testing.assert_close(out.grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_nonfinite_examples_contribute_zero_and_are_reported(kind, strategy):
    model, inputs, targets = _batch(kind)
    inputs[1].view(-1)[0] = NAN
    inputs[4].view(-1)[3] = INF
    engine = GhostClipping(model, max_grad_norm=0.5, strategy=strategy)
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"2 of 6 examples .* positions \[1, 4\]"):
        out = engine.clipped_grad_sum(inputs, targets)
    assert out.nonfinite == 2
    assert (~torch.isfinite(out.norms)).nonzero().flatten().tolist() == [1, 4]  # reported as computed
    _assert_sums_of(out, model, inputs, targets, [0, 2, 3, 5], 0.5)
    assert torch.isnan(per_sample_grad_norms_fast(model, inputs, targets, strategy=strategy)[[1, 4]]).all()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "apart"])
@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_nonfinite_examples_on_the_triton_path(strategy, packed, triton_device, monkeypatch):
    """Where the Triton kernels run, the engine zeroes a dropped example's rows in place
    (kernels/zero_rows.py): in the stacks of same-shaped layers (ghost), in the packed block of materialized
    gradients, and in materialized gradients kept apart (``PACK_ELEMENTS = 0``)."""
    if not packed:
        monkeypatch.setattr(recording, "PACK_ELEMENTS", 0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3)).double().to(triton_device)
    inputs = torch.randn(6, 5, dtype=torch.float64, device=triton_device)
    targets = torch.randint(0, 3, (6,), device=triton_device)
    inputs[2, 1] = NAN
    before = inputs.clone()
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[2\]"):
        out = GhostClipping(model, max_grad_norm=0.5, strategy=strategy).clipped_grad_sum(inputs, targets)
    _assert_sums_of(out, model, inputs, targets, [0, 1, 3, 4, 5], 0.5)
    assert torch.equal(inputs.nan_to_num(7.0), before.nan_to_num(7.0))  # the caller's input is not zeroed


@pytest.mark.parametrize("strategy", ["auto", "ghost"])
def test_nonfinite_examples_of_conv_and_linear_factors_on_the_triton_path(strategy, triton_device):
    """The forms that keep a layer's input and output gradient (a convolution's Implicit form, a Linear's factors
    kept apart): the output gradient is zeroed in place on the Triton path, the input copied, the caller's input
    unchanged; the sums are those of the finite examples alone."""
    model = SmallCNN().double().to(triton_device)
    inputs = torch.randn(6, 3, 7, 7, dtype=torch.float64, device=triton_device)
    targets = torch.randint(0, 5, (6,), device=triton_device)
    inputs[4, 1, 2, 3] = NAN
    before = inputs.clone()
    engine = GhostClipping(model, max_grad_norm=0.5, strategy=strategy)
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[4\]"):
        out = engine.clipped_grad_sum(inputs, targets)
    _assert_sums_of(out, model, inputs, targets, [0, 1, 2, 3, 5], 0.5)
    assert torch.equal(inputs.nan_to_num(7.0), before.nan_to_num(7.0))


def test_nonfinite_leaves_the_inputs_unchanged_and_needs_no_warning_when_all_finite(recwarn):
    model, inputs, targets = _batch("cnn")
    inputs[2, 0, 0, 0] = NAN
    before = inputs.clone()
    with pytest.warns(persample.NonFiniteGradientWarning):
        GhostClipping(model, max_grad_norm=0.5).clipped_grad_sum(inputs, targets)
    assert torch.equal(inputs.nan_to_num(7.0), before.nan_to_num(7.0))  # the zeroed factors are copies
    out = GhostClipping(model, max_grad_norm=0.5).clipped_grad_sum(inputs[3:], targets[3:])
    assert out.nonfinite == 0 and not recwarn.list


def test_an_example_whose_loss_is_not_finite_contributes_zero_even_with_a_finite_gradient():
    model, idx = TinyGPT(layers=2).double(), torch.randint(0, 24, (5, 6))
    targets = torch.randint(0, 24, (5, 6))

    def loss_fn(output, targets):
        # Example 3's loss is lm_loss + inf: its gradient is lm_loss's, finite; example 0's is NaN throughout.
        return lm_loss(output, targets) + torch.tensor([NAN, 0, 0, INF, 0], dtype=output.dtype)

    engine = GhostClipping(model, max_grad_norm=0.3, loss_fn=loss_fn)
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[0, 3\]"):
        out = engine.clipped_grad_sum(idx, targets)
    assert out.nonfinite == 2 and torch.isfinite(out.norms[3]) and out.losses[3] == INF
    _assert_sums_of(out, model, idx, targets, [1, 2, 4], 0.3)


def test_nonfinite_raise_names_the_positions():
    model, inputs, targets = _batch("mlp")
    inputs[3, 0] = NAN
    engine = GhostClipping(model, max_grad_norm=1.0, nonfinite="raise")
    with pytest.raises(ValueError, match=r"1 of 6 examples .* positions \[3\].*nonfinite='raise'"):
        engine.clipped_grad_sum(inputs, targets)
    inputs[3, 0] = 0.0
    assert engine.clipped_grad_sum(inputs, targets).nonfinite == 0  # usable after the error
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        GhostClipping(model, max_grad_norm=1.0, nonfinite="skip")


def test_issue_17_a_nan_example_through_the_engine_and_the_optimizer_leaves_the_parameters_finite():
    model, inputs, targets = _batch("cnn", B=8)
    inputs[5] = NAN
    optimizer = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                      noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8,
                                      sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    with pytest.warns(persample.NonFiniteGradientWarning):
        out = GhostClipping(model, max_grad_norm=1.0).clipped_grad_sum(inputs, targets)
    optimizer.accumulate(out.grads, len(targets))
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Counted(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(8), nn.BatchNorm1d(8, track_running_stats=False),
                                  nn.SyncBatchNorm(8)])
def test_batch_norm_with_batch_statistics_is_refused_before_any_computation(norm):
    model = _Counted(nn.Sequential(nn.Linear(5, 8), norm, nn.Linear(8, 3)))
    x, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    for eval_mode in (False, True):
        model.train(not eval_mode)
        if eval_mode and norm.track_running_stats:
            continue  # running statistics: per example, allowed (below)
        with pytest.raises(ValueError, match=r"module 'model.1' is (Sync)?BatchNorm(1d)?: .*GroupNorm"):
            GhostClipping(model, max_grad_norm=1.0).clipped_grad_sum(x, y)
        with pytest.raises(ValueError, match="GroupNorm"):
            per_sample_grad_norms_fast(model, x, y)
    assert model.calls == 0
    with pytest.raises(ValueError, match="GroupNorm"):  # the vmap pipeline says the same
        persample.per_sample_grads(model, x, y)


def test_batch_norm_in_eval_mode_with_running_statistics_is_per_example():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    model(torch.randn(32, 5, dtype=torch.float64))  # running statistics that are not the defaults
    model.eval()
    inputs, targets = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    out = GhostClipping(model, max_grad_norm=0.5).clipped_grad_sum(inputs, targets)
    _assert_sums_of(out, model, inputs, targets, list(range(6)), 0.5)


def test_a_module_the_fallback_cannot_run_per_example_is_a_clear_error():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)  # an in-place update of a buffer: no per-example re-run under vmap
            return x * self.scale

    model = nn.Sequential(Counting(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="Counting cannot be run one example at a time under torch.func.vmap"):
        GhostClipping(model, max_grad_norm=1.0).clipped_grad_sum(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def _assert_empty_result(out, model, dtype):
    assert out.grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in out.grads.items():
        p = model.get_parameter(name)
        assert g.shape == p.shape and g.dtype == p.dtype and not g.any()
    assert out.norms.shape == out.losses.shape == (0,)
    assert out.norms.dtype == out.losses.dtype == dtype and out.nonfinite == 0


@pytest.mark.parametrize("cuda_graph", [None, "post", "step"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt"])
def test_an_empty_batch_gives_zero_sums_and_empty_norms_and_losses(kind, cuda_graph):
    if kind == "gpt":
        model, inputs, targets = TinyGPT(layers=2).double(), torch.zeros(0, 6, dtype=torch.long), torch.zeros(0, 6)
    else:
        model, inputs, targets = _batch(kind, B=0)
    model.requires_grad_(True)
    next(model.parameters()).requires_grad_(False)  # a frozen parameter gets no entry
    engine = GhostClipping(model, max_grad_norm=1.0, cuda_graph=cuda_graph)
    _assert_empty_result(engine.clipped_grad_sum(inputs, targets), model, torch.float64)
    assert engine.per_sample_grad_norms(inputs, targets).shape == (0,)
    model.float()
    _assert_empty_result(persample.clipped_grad_sum(model, inputs.float() if inputs.is_floating_point() else inputs,
                                                    targets, max_grad_norm=1.0), model, torch.float32)
    with pytest.raises(ValueError, match="batch size 0 but targets have 3"):
        engine.clipped_grad_sum(inputs, torch.zeros(3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [None, "post", "step"])
def test_cuda_nonfinite_and_empty_batches(cuda_graph, monkeypatch):
    """On CUDA, eager and through both graphs: a NaN example contributes zero and is reported (the mask read after
    the step's work), replays report each step's own examples, and an empty batch captures nothing."""
    # Full float32 convolutions: in TF32 (cuDNN's default) the sums over 6 and over the kept examples round apart
    # by about 2e-4, above the tolerance below.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = SmallCNN().cuda()
    engine = GhostClipping(model, max_grad_norm=0.5, cuda_graph=cuda_graph)
    reference = GhostClipping(model, max_grad_norm=0.5)
    for bad in ([1], [], [0, 3], [2]):
        inputs, targets = torch.randn(6, 3, 7, 7, device="cuda"), torch.randint(0, 5, (6,), device="cuda")
        inputs[bad] = NAN
        keep = [b for b in range(6) if b not in bad]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = engine.clipped_grad_sum(inputs, targets)
        # Only the engine's own warnings: on CUDA the first step can also warn from torch (a backend's notice).
        reported = [str(w.message).split("positions ")[1].split("]")[0] + "]" for w in caught
                    if issubclass(w.category, persample.NonFiniteGradientWarning)]
        assert reported == ([str(bad)] if bad else []), [str(w.message) for w in caught]
        assert out.nonfinite == len(bad)
        expected = reference.clipped_grad_sum(inputs[keep], targets[keep])
        for name, g in expected.grads.items():
            torch.testing.assert_close(out.grads[name], g, rtol=1e-4, atol=1e-5)
    empty = torch.zeros(0, 3, 7, 7, device="cuda"), torch.zeros(0, dtype=torch.long, device="cuda")
    _assert_empty_result(engine.clipped_grad_sum(*empty), model, torch.float32)
    if cuda_graph is not None:  # one batch size captured; the empty batch captured nothing
        assert len((engine._graphed if cuda_graph == "post" else engine._graphed_step)._captured) == 1
