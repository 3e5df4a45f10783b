"""persample.DPOptimizer: clip -> sum -> noise -> scale, accumulation, empty batches, accounting, errors."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import persample
from tests.dp.test_noise import assert_gaussian


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)


def _model():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _dp(model, lr=1.0, **options):
    settings = {"noise_multiplier": 0.0, "max_grad_norm": 0.5, "expected_batch_size": 4.0, "sample_rate": 0.1}
    settings.update(options)
    return persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model.named_parameters(), **settings)


def _data(B):
    return torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,))


def _clipped_sum(model, x, y, max_grad_norm=0.5):
    return persample.clip_per_sample(persample.per_sample_grads(model, x, y), max_grad_norm)


def test_step_without_noise_is_the_clipped_sum_over_expected_batch_size():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = _data(6)
    summed = _clipped_sum(model, x, y)
    dp = _dp(model)
    dp.accumulate(summed, 6)
    dp.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, summed[name] / 4.0)
        torch.testing.assert_close(p.detach(), before[name] - summed[name] / 4.0)


def test_physical_batches_accumulate_into_one_logical_step():
    x, y = _data(7)
    one, split = _model(), _model()
    split.load_state_dict(one.state_dict())
    whole = _dp(one)
    whole.accumulate(_clipped_sum(one, x, y), 7)
    whole.step()
    parts = _dp(split)
    for chunk in torch.arange(7).split(3):
        parts.accumulate(_clipped_sum(split, x[chunk], y[chunk]), len(chunk))
    assert parts.num_examples == 7
    parts.step()
    for (name, p), q in zip(one.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert parts.accountant.steps == 1


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_has_std_noise_multiplier_times_max_grad_norm_over_expected_batch_size(secure_mode):
    # The statistical test fails a correct sampler with probability <= 3e-6 (see tests/test_noise.py).
    big = nn.Linear(500, 400, bias=False).double()
    generator = None if secure_mode else torch.Generator().manual_seed(0)
    dp = persample.DPOptimizer(torch.optim.SGD(big.parameters(), lr=0.0), big.named_parameters(),
                               noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=10.0, sample_rate=0.01,
                               generator=generator, secure_mode=secure_mode)
    signal = torch.full((400, 500), 3.0, dtype=torch.float64)
    dp.accumulate({"weight": signal}, 5)
    dp.step()
    assert_gaussian(big.weight.grad - signal / 10.0, 1.3 * 0.7 / 10.0)


def test_empty_batches_step_with_noise_only():
    model = _model()
    dp = _dp(model, lr=0.0)
    dp.step()  # nothing accumulated at all: an empty Poisson batch
    assert all(p.grad.abs().max() == 0 for p in model.parameters())
    x, y = _data(0)
    dp.accumulate(_clipped_sum(model, x, y), 0)
    dp.step()
    assert dp.accountant.steps == 2


def test_poisson_training_with_variable_and_empty_batches():
    model = _model()
    x, y = _data(20)
    sampler = persample.PoissonSampler(20, 0.05, steps=40, generator=torch.Generator().manual_seed(0))
    dp = _dp(model, lr=0.1, noise_multiplier=1.0, expected_batch_size=1.0, sample_rate=0.05,
             generator=torch.Generator().manual_seed(0))
    sizes = []
    for idx in sampler:
        sizes.append(len(idx))
        for part in idx.split(2):
            dp.accumulate(_clipped_sum(model, x[part], y[part]), len(part))
        dp.step()
    assert 0 in sizes and max(sizes) > 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert dp.accountant.steps == 40
    reference = RDPAccountant()
    for _ in range(40):
        reference.step(noise_multiplier=1.0, sample_rate=0.05)
    assert dp.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


def test_seeded_noise_reproduces():
    grads = []
    for _ in range(2):
        torch.manual_seed(1)
        model = _model()
        dp = _dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(5))
        dp.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def _bucket_noise(summed, buckets, std, seed):
    """The noise DPOptimizer.step draws: one gaussian_noise per bucket of names, split in their order."""
    generator = torch.Generator().manual_seed(seed)
    noise = {}
    for names in buckets:
        sizes = [summed[name].numel() for name in names]
        flat = persample.gaussian_noise((sum(sizes),), std, dtype=summed[names[0]].dtype, generator=generator)
        noise.update({name: n.view(summed[name].shape) for name, n in zip(names, flat.split(sizes), strict=True)})
    return noise


@pytest.mark.parametrize("cap", [1 << 24, 32, 1])
def test_step_draws_the_noise_bucket_by_bucket_and_copies_the_callers_sums_once(monkeypatch, cap):
    """The caller's sums are neither copied by accumulate nor modified: the step makes the gradients from them out
    of place (one copy, in the multi-tensor op that adds the noise), and draws the noise one bucket of parameters at
    a time, in their order, a bucket cut where it would pass NOISE_BUCKET_NUMEL elements (a larger parameter
    alone): seeded runs reproduce."""
    monkeypatch.setattr(persample.dp._optimizer, "NOISE_BUCKET_NUMEL", cap)
    torch.manual_seed(1)
    model = _model()  # parameters of 40, 8, 24 and 3 elements
    dp = _dp(model, noise_multiplier=0.7, generator=torch.Generator().manual_seed(5))
    x, y = _data(6)
    summed = _clipped_sum(model, x, y)
    before = {name: t.clone() for name, t in summed.items()}
    dp.accumulate(summed, 6)
    assert all(dp._summed[name].data_ptr() == summed[name].data_ptr() for name in summed)  # kept, not copied
    dp.step()
    names = [name for name, _ in model.named_parameters()]
    buckets = {1 << 24: [names], 32: [names[:1], names[1:3], names[3:]], 1: [[name] for name in names]}[cap]
    noise = _bucket_noise(summed, buckets, 0.7 * 0.5, seed=5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(summed[name], before[name], rtol=0, atol=0)  # the caller's, untouched
        assert p.grad.data_ptr() != summed[name].data_ptr()
        torch.testing.assert_close(p.grad, (summed[name] + noise[name]) / 4.0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("noise_multiplier", [0.7, 0.0])
def test_sums_given_to_the_optimizer_become_the_gradients_in_place(noise_multiplier):
    """Sums the caller gives away (``owned``, as make_private's engine does) are turned into the gradients in
    place: no second copy of the gradients at the step's peak; a second physical batch is added to them in
    place. Borrowed sums with a second batch: the first batch's tensors stay the caller's, unmodified."""
    torch.manual_seed(1)
    model = _model()
    x, y = _data(6)
    first, second = _clipped_sum(model, x[:3], y[:3]), _clipped_sum(model, x[3:], y[3:])
    expected = {name: first[name] + second[name] for name in first}
    results = {}
    for owned in (True, False):
        dp = _dp(model, noise_multiplier=noise_multiplier, generator=torch.Generator().manual_seed(5))
        given = {name: t.clone() for name, t in first.items()}
        pointers = {name: t.data_ptr() for name, t in given.items()}
        dp._add(given, 3, owned=owned)
        dp.accumulate(second, 3)
        dp.step()
        results[owned] = {name: p.grad.clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            if owned:
                assert p.grad.data_ptr() == pointers[name]
            else:
                assert p.grad.data_ptr() != pointers[name]
                torch.testing.assert_close(given[name], first[name], rtol=0, atol=0)
    noise = (_bucket_noise(expected, [list(expected)], noise_multiplier * 0.5, seed=5) if noise_multiplier else
             {name: torch.zeros_like(t) for name, t in expected.items()})
    for grads in results.values():
        for name, g in grads.items():
            torch.testing.assert_close(g, (expected[name] + noise[name]) / 4.0, rtol=1e-12, atol=1e-15)


def test_noise_buckets_keep_dtypes_and_devices_apart():
    """Parameters of another dtype go into their own bucket (one flat draw per dtype), each gradient in its own
    dtype."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[2].float()
    dp = _dp(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(2))
    summed = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    dp.accumulate(summed, 1)
    dp.step()
    noise = _bucket_noise(summed, [["0.weight", "0.bias"], ["2.weight", "2.bias"]], 0.5, seed=2)
    for name, p in model.named_parameters():
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, noise[name] / 4.0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_large_finite_sums_are_accepted(dtype):
    """The finiteness check sums absolute values: a sum that overflows although every value is finite is
    confirmed element by element, not refused."""
    model = nn.Linear(4096, 16).to(dtype)
    dp = _dp(model, lr=0.0)
    big = torch.finfo(dtype).max / 2
    summed = {"weight": torch.full((16, 4096), big, dtype=dtype), "bias": torch.zeros(16, dtype=dtype)}
    dp.accumulate(summed, 1)
    assert dp.num_examples == 1
    summed["bias"][3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf values in \['bias'\]"):
        dp.accumulate(summed, 1)


def test_step_overwrites_stale_gradients_and_zero_grad_clears():
    model = _model()
    dp = _dp(model, lr=0.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # e.g. a non-private backward: must not leak into the step
    dp.accumulate({name: torch.zeros_like(p) for name, p in model.named_parameters()}, 3)
    dp.step()
    assert all(p.grad.abs().max() == 0 for p in model.parameters())
    dp.accumulate({name: torch.ones_like(p) for name, p in model.named_parameters()}, 3)
    dp.zero_grad()
    assert dp.num_examples == 0
    dp.step()
    assert all(p.grad.abs().max() == 0 for p in model.parameters())


def test_frozen_parameters_are_not_trained():
    model = _model()
    model[0].weight.requires_grad_(False)
    dp = _dp(model)
    assert list(dp.params) == ["0.bias", "2.weight", "2.bias"]
    x, y = _data(3)
    dp.accumulate(_clipped_sum(model, x, y), 3)
    dp.step()
    assert model[0].weight.grad is None


@pytest.mark.parametrize("option, value, match", [
    ("noise_multiplier", -0.5, "noise_multiplier"),
    ("noise_multiplier", math.nan, "noise_multiplier"),
    ("max_grad_norm", 0.0, "max_grad_norm"),
    ("max_grad_norm", -1.0, "max_grad_norm"),
    ("expected_batch_size", 0.0, "expected_batch_size"),
    ("sample_rate", 0.0, "sample_rate"),
    ("sample_rate", 1.5, "sample_rate"),
    ("accountant", "gdp", "accountant"),
])
def test_bad_settings(option, value, match):
    with pytest.raises(ValueError, match=match):
        _dp(_model(), **{option: value})


def test_parameters_must_match_the_optimizer():
    model, other = _model(), _model()
    with pytest.raises(ValueError, match="not in the optimizer"):
        persample.DPOptimizer(torch.optim.SGD(other.parameters(), lr=1.0), model.named_parameters(),
                              noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    both = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=1.0)
    with pytest.raises(ValueError, match="without noise"):
        persample.DPOptimizer(both, model.named_parameters(), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=4, sample_rate=0.1)
    with pytest.raises(ValueError, match="generator=None"):
        _dp(model, generator=torch.Generator(), secure_mode=True)


def test_bad_accumulate():
    model = _model()
    dp = _dp(model)
    summed = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="one entry per trainable parameter"):
        dp.accumulate({k: v for k, v in summed.items() if k != "0.bias"}, 1)
    with pytest.raises(ValueError, match="sum over the batch first"):
        dp.accumulate({**summed, "0.bias": torch.zeros(2, 8)}, 2)
    with pytest.raises(ValueError, match="num_examples"):
        dp.accumulate(summed, -1)
