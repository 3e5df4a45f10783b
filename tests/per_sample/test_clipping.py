"""persample.per_sample._clipping: norms, factors, flat and per-layer clipping, against float64 loops."""

import math

import pytest
import torch

import persample
from persample.per_sample import layer_groups

SHAPES = {"fc1.weight": (6, 5), "fc1.bias": (6,), "fc2.weight": (3, 6), "fc2.bias": (3,), "scale": ()}


def _grads(B, dtype=torch.float64, spread=True):
    torch.manual_seed(0)
    # Example i scaled by 4**(i - B/2): norms from far below to far above any bound used here.
    factors = torch.tensor([4.0 ** (i - B / 2) if spread else 1.0 for i in range(B)], dtype=dtype)
    return {name: torch.randn(B, *shape, dtype=dtype) * factors.reshape(B, *[1] * len(shape))
            for name, shape in SHAPES.items()}


def _flat(grads, i):
    return torch.cat([g[i].reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_per_sample_norms(dtype):
    grads = _grads(7, dtype)
    reference = torch.stack([_flat(grads, i).double().norm() for i in range(7)])
    norms = persample.per_sample_norms(grads)
    assert norms.shape == (7,)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(norms.double(), reference, rtol=1e-6, atol=0)


def test_clip_factors_follow_opacus():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e6], dtype=torch.float64)
    factors = persample.clip_factors(norms, 1.0)
    torch.testing.assert_close(factors, torch.clamp(1.0 / (norms + 1e-6), max=1.0))


@pytest.mark.parametrize("max_grad_norm", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("B", [0, 1, 8])
def test_clip_per_sample_bounds_every_example_and_sums(max_grad_norm, B):
    grads = _grads(B)
    summed = persample.clip_per_sample(grads, max_grad_norm)
    clipped = []
    for i in range(B):
        norm = _flat(grads, i).norm()
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        clipped.append({name: g[i] * factor for name, g in grads.items()})
        assert float(norm) * factor <= max_grad_norm
    for name, shape in SHAPES.items():
        assert summed[name].shape == shape
        reference = sum((c[name] for c in clipped), torch.zeros(shape, dtype=torch.float64))
        torch.testing.assert_close(summed[name], reference, rtol=1e-12, atol=1e-12)


def test_clip_per_sample_accepts_precomputed_norms():
    grads = _grads(5)
    norms = persample.per_sample_norms(grads)
    with_norms = persample.clip_per_sample(grads, 1.0, norms=norms)
    for name, value in persample.clip_per_sample(grads, 1.0).items():
        torch.testing.assert_close(with_norms[name], value)
    with pytest.raises(ValueError, match=r"norms must have shape \(5,\)"):
        persample.clip_per_sample(grads, 1.0, norms=norms[:3])


def test_layer_groups():
    assert layer_groups(list(SHAPES)) == {"fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight", "fc2.bias"],
                                          "scale": ["scale"]}


@pytest.mark.parametrize("B", [0, 6])
def test_clip_per_layer_with_one_bound_splits_it_evenly(B):
    grads = _grads(B)
    groups = layer_groups(grads)
    bound = 2.0 / math.sqrt(len(groups))
    summed = persample.clip_per_layer(grads, 2.0)
    for name in SHAPES:
        group = next(names for names in groups.values() if name in names)
        reference = torch.zeros(SHAPES[name], dtype=torch.float64)
        for i in range(B):
            norm = float(torch.cat([grads[n][i].reshape(-1) for n in group]).norm())
            factor = min(1.0, bound / (norm + 1e-6))
            assert norm * factor <= bound
            reference += grads[name][i] * factor
        torch.testing.assert_close(summed[name], reference, rtol=1e-12, atol=1e-12)


def test_clip_per_layer_bounds_whole_gradient_and_each_group():
    grads = _grads(6)
    bounds = {"fc1": 0.5, "fc2": 2.0, "scale": 0.1}
    groups = layer_groups(grads)
    for i in range(6):
        one = {name: g[i:i + 1] for name, g in grads.items()}
        clipped = persample.clip_per_layer(one, bounds)
        for group, names in groups.items():
            assert float(torch.cat([clipped[n].reshape(-1) for n in names]).norm()) <= bounds[group]
        total = float(torch.cat([c.reshape(-1) for c in clipped.values()]).norm())
        assert total <= math.sqrt(sum(b * b for b in bounds.values()))


def test_clip_per_layer_custom_groups():
    grads = _grads(4)
    groups = {"weights": ["fc1.weight", "fc2.weight"], "rest": ["fc1.bias", "fc2.bias", "scale"]}
    summed = persample.clip_per_layer(grads, {"weights": 1.0, "rest": 1.0}, groups=groups)
    for names in groups.values():
        members = {n: grads[n] for n in names}
        for name, value in persample.clip_per_sample(members, 1.0).items():
            torch.testing.assert_close(summed[name], value)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True, "1"])
def test_bad_max_grad_norm(bad):
    grads = _grads(2)
    for clip in (persample.clip_per_sample, persample.clip_per_layer):
        with pytest.raises(ValueError, match="max_grad_norm"):
            clip(grads, bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        persample.clip_factors(torch.ones(2), bad)


def test_bad_grads_and_groups():
    with pytest.raises(ValueError, match="empty"):
        persample.clip_per_sample({}, 1.0)
    with pytest.raises(ValueError, match="same leading batch dimension"):
        persample.clip_per_sample({"a": torch.ones(2, 3), "b": torch.ones(3, 3)}, 1.0)
    grads = _grads(2)
    with pytest.raises(ValueError, match="exactly once"):
        persample.clip_per_layer(grads, 1.0, groups={"fc1": ["fc1.weight", "fc1.bias"]})
    with pytest.raises(ValueError, match="one bound per group"):
        persample.clip_per_layer(grads, {"fc1": 1.0})


def _poisoned(B=6):
    grads = _grads(B, spread=False)
    grads["fc1.weight"][1, 2, 3] = float("nan")
    grads["scale"][4] = float("inf")
    return grads


def _reference_sum(grads, keep, max_grad_norm):
    """The float64 loop over the examples ``keep`` alone."""
    total = {name: torch.zeros(g.shape[1:], dtype=torch.float64) for name, g in grads.items()}
    for i in keep:
        factor = min(1.0, max_grad_norm / (float(_flat(grads, i).norm()) + 1e-6))
        for name, g in grads.items():
            total[name] += factor * g[i].double()
    return total


def test_nonfinite_examples_contribute_zero_and_are_counted():
    grads = _poisoned()
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"2 of 6 examples .* positions \[1, 4\]"):
        summed = persample.clip_per_sample(grads, 0.7)
    assert isinstance(summed, dict) and isinstance(summed, persample.ClippedSum) and summed.nonfinite == 2
    for name, expected in _reference_sum(grads, [0, 2, 3, 5], 0.7).items():
        torch.testing.assert_close(summed[name], expected, rtol=1e-12, atol=1e-15)
    norms = persample.per_sample_norms(grads)
    torch.testing.assert_close(persample.clip_factors(norms, 0.7)[[1, 4]], torch.zeros(2, dtype=torch.float64))
    with pytest.warns(persample.NonFiniteGradientWarning):  # the same with the norms given
        assert persample.clip_per_sample(grads, 0.7, norms=norms).nonfinite == 2
    assert persample.clip_per_sample(_grads(6), 0.7).nonfinite == 0


def test_nonfinite_in_one_group_drops_the_whole_example_from_every_group():
    grads = _poisoned()
    with pytest.warns(persample.NonFiniteGradientWarning, match=r"positions \[1, 4\]"):
        summed = persample.clip_per_layer(grads, 0.9)
    assert summed.nonfinite == 2
    groups = layer_groups(grads)
    bound = 0.9 / math.sqrt(len(groups))
    for names in groups.values():
        members = {name: grads[name] for name in names}
        for name, expected in _reference_sum(members, [0, 2, 3, 5], bound).items():
            torch.testing.assert_close(summed[name], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("clip", ["per_sample", "per_layer"])
def test_nonfinite_raise_names_the_positions(clip):
    clip_fn = persample.clip_per_sample if clip == "per_sample" else persample.clip_per_layer
    with pytest.raises(ValueError, match=r"2 of 6 examples .* positions \[1, 4\]; nonfinite='raise'"):
        clip_fn(_poisoned(), 1.0, nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        clip_fn(_grads(3), 1.0, nonfinite="ignore")


def test_many_nonfinite_positions_are_shortened():
    grads = {"w": torch.full((40, 2), float("nan"))}
    with pytest.raises(ValueError, match=r"40 of 40 examples .* \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]"):
        persample.clip_per_sample(grads, 1.0, nonfinite="raise")
