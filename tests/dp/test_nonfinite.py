"""A non-finite example never reaches the parameters: issue 17's first row end to end (per_sample_grads ->
clip_per_sample -> DPOptimizer.accumulate -> step), and DPOptimizer.accumulate refusing a non-finite sum."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import persample


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


def _setup():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model.named_parameters(),
                               noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6.0, sample_rate=0.1)
    return model, dp, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_poisoned_example_is_dropped_and_the_step_is_that_of_the_others(poison):
    model, dp, x, y = _setup()
    clean = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    clean.load_state_dict(model.state_dict())
    x[2, 1] = poison
    grads = persample.per_sample_grads(model, x, y)
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[2\]"):
        summed = persample.clip_per_sample(grads, 0.5)
    assert summed.nonfinite == 1
    dp.accumulate(summed, len(y))
    dp.step()
    # The same step without example 2 (noise 0, the same expected batch size).
    keep = [0, 1, 3, 4, 5]
    reference = torch.optim.SGD(clean.parameters(), lr=0.5)
    ref_sum = persample.clip_per_sample(persample.per_sample_grads(clean, x[keep], y[keep]), 0.5)
    for name, p in clean.named_parameters():
        p.grad = ref_sum[name] / 6.0
    reference.step()
    for (name, p), q in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_accumulate_refuses_a_nonfinite_sum_and_keeps_what_it_had(poison):
    model, dp, x, y = _setup()
    good = persample.clip_per_sample(persample.per_sample_grads(model, x, y), 0.5)
    dp.accumulate(good, len(y))
    bad = {name: g.clone() for name, g in good.items()}
    bad["2.bias"][1] = poison
    with pytest.raises(ValueError, match=r"NaN or inf values in \['2.bias'\].*nothing was accumulated"):
        dp.accumulate(bad, len(y))
    assert dp.num_examples == 6
    before = [p.clone() for p in model.parameters()]
    dp.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(b - p, 0.5 * good[next(n for n, q in model.named_parameters() if q is p)] / 6.0)


def test_clipped_sums_skip_the_finiteness_sync_only_where_their_bound_fits_the_dtype(monkeypatch):
    """``_add(clipped_to=...)`` (make_private's engine sums) looks at the sums only when ``num_examples *
    max_grad_norm`` could overflow a dtype involved: float16 parameters with a large enough batch."""
    from persample.dp import _optimizer

    calls = []
    real = _optimizer._nonfinite
    monkeypatch.setattr(_optimizer, "_nonfinite", lambda *a: calls.append(1) or real(*a))
    for dtype, num_examples, looked in [(torch.float32, 1000, False), (torch.float16, 100, False),
                                        (torch.float16, 200_000, True)]:
        model = nn.Linear(3, 2).to(dtype)
        dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8.0, sample_rate=0.1)
        calls.clear()
        dp._add({n: torch.zeros_like(p) for n, p in model.named_parameters()}, num_examples, owned=True,
                clipped_to=0.5)
        assert bool(calls) == looked, (dtype, num_examples)
    bad = {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN or inf"):
        dp._add(bad, 200_000, owned=True, clipped_to=0.5)
    with pytest.raises(ValueError, match="NaN or inf"):  # the public accumulate looks at a plain dict
        persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                              noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8.0,
                              sample_rate=0.1).accumulate(bad, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_accumulate_trusts_the_engines_sums_where_their_bound_fits(monkeypatch, dtype):
    """The engine's ``grads`` (a ClippedGrads: a dict that knows its clipping bound) skip accumulate's finiteness
    sync where ``num_examples * clipped_to`` fits every dtype; a plain dict of the same sums is looked at, and
    so are the engine's sums where the bound could overflow (float16 and a bound past 65504)."""
    from persample.dp import _optimizer

    calls = []
    real = _optimizer._nonfinite
    monkeypatch.setattr(_optimizer, "_nonfinite", lambda *a: calls.append(1) or real(*a))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(6, 5, dtype=dtype), torch.randint(0, 3, (6,))
    engine = persample.GhostClipping(model, max_grad_norm=1.0)
    dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                               noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=6.0, sample_rate=0.1)
    out = engine.clipped_grad_sum(x, y)
    assert isinstance(out.grads, persample.ClippedGrads) and out.grads.clipped_to == 1.0
    dp.accumulate(out.grads, 6)
    assert calls == []
    dp.accumulate(dict(out.grads), 6)
    assert calls == [1]
    calls.clear()
    dp.zero_grad()
    dp.accumulate(persample.GhostClipping(model, max_grad_norm=20_000.0).clipped_grad_sum(x, y).grads, 6)
    assert bool(calls) == (dtype == torch.float16)  # 6 * 20000 > 65504
    # What accumulate added is the engine's sums, whichever way it went.
    dp.zero_grad()
    dp.accumulate(out.grads, 6)
    torch.testing.assert_close(dp._summed, dict(out.grads))


def test_the_engine_queues_the_mask_copy_before_the_clipped_sums(monkeypatch):
    """The host waits for the mask of finite examples; its copy is queued right after the norms, before the
    clipped sums, so that the wait is for the norms alone (the direct API and make_private's recording)."""
    from persample.engine import ghost_clipping

    order = []
    read_later, sums = ghost_clipping._read_later, ghost_clipping.GhostClipping._clipped_sums
    monkeypatch.setattr(ghost_clipping, "_read_later", lambda finite: order.append("mask") or read_later(finite))
    monkeypatch.setattr(ghost_clipping.GhostClipping, "_clipped_sums",
                        staticmethod(lambda *a: order.append("sums") or sums(*a)))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    engine = persample.GhostClipping(model, max_grad_norm=1.0)
    engine.clipped_grad_sum(x, y)
    assert order == ["mask", "sums"]
    order.clear()
    with engine.recording((x,)) as rec:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    rec.clipped_grad_sum(1.0 / 6)
    assert order == ["mask", "sums"]


class _FakeEvent:
    """A CUDA event as the mask's copy records it: done or not, and the waits asked of it."""

    def __init__(self, done: bool):
        self.done, self.waits = done, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


@pytest.mark.parametrize("landed", [False, True])
def test_the_mask_on_its_way_to_the_host_is_read_without_a_wait_only_once_landed(landed):
    """``ready()`` gives the non-finite positions only when the copy has landed, and never waits; calling it waits."""
    from persample.engine.ghost_clipping import _MaskOnHost

    event = _FakeEvent(landed)
    mask = _MaskOnHost(torch.tensor([True, False, True, False]), event)
    assert mask.ready() == ([1, 3] if landed else None)
    assert event.waits == 0
    assert mask() == [1, 3] and event.waits == 1
    assert mask.ready() == [1, 3]
    assert _MaskOnHost(torch.tensor([True, True]), _FakeEvent(True)).ready() == []


def test_zeroing_is_skipped_only_when_every_example_is_known_finite():
    """The CPU knows the mask at once; elsewhere the skip needs the landed copy to say all finite."""
    from persample.engine.ghost_clipping import _all_finite_known, _MaskOnHost

    assert _all_finite_known(torch.tensor([True, True]), None)
    assert not _all_finite_known(torch.tensor([True, False]), None)
    # Off the CPU only the copy on the host is read (a stand-in with is_cuda for the mask on the GPU).
    on_gpu = SimpleNamespace(is_cuda=True)
    all_finite = torch.tensor([True, True])
    assert not _all_finite_known(on_gpu, _MaskOnHost(all_finite, _FakeEvent(False)))
    assert _all_finite_known(on_gpu, _MaskOnHost(all_finite, _FakeEvent(True)))
    assert not _all_finite_known(on_gpu, _MaskOnHost(torch.tensor([True, False]), _FakeEvent(True)))
    assert not _all_finite_known(on_gpu, None)

