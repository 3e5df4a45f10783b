import pytest
import torch
from torch import nn

from persample.engine import GhostClipping, forms, stacks
from persample.engine.forms import Outer, Summed, inner
from persample.engine.stacks import pop_stacks, stack_clipped_sums, stack_norms
from tests.engine.models import TinyGPT
from tests.engine.reference import assert_matches_reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
B, T, M, N = 3, 5, 4, 6


def layer(bias: bool, dtype=torch.float64):
    """An Outer weight form and, with ``bias``, the Summed bias form over the same ``G``, and their parameters."""
    G, A = torch.randn(B, T, M, dtype=dtype), torch.randn(B, T, N, dtype=dtype)
    found = {nn.Parameter(torch.zeros(M, N, dtype=dtype)): [Outer(G, A, torch.Size([M, N]))]}
    if bias:
        found[nn.Parameter(torch.zeros(M, dtype=dtype))] = [Summed(G)]
    return found


def materialize(form) -> torch.Tensor:
    if isinstance(form, Summed):
        return form.G.sum(1)
    return torch.einsum("btm,btn->bmn", form.G, form.A)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_stacked_norms_and_clipped_sums_equal_per_layer(bias, chunked, splits, monkeypatch):
    if chunked:
        monkeypatch.setattr(forms, "_CHUNK_ELEMENTS", 1)  # one example of one layer per chunk
    monkeypatch.setattr(stacks, "_k_splits", lambda *args: splits)  # the summed products split over B * T
    found = {}
    for _ in range(3):
        found.update(layer(bias))
    per_layer = {p: fs[0] for p, fs in found.items()}
    (stack,) = pop_stacks(found)
    assert not found and len(stack.params) == 3 and (stack.biases is not None) == bias
    expected_norms = sum(inner(x, x) for x in per_layer.values())
    torch.testing.assert_close(stack_norms(stack).sum(0), expected_norms, rtol=1e-12, atol=1e-12)
    c = torch.rand(B, dtype=torch.float64)
    summed = stack_clipped_sums(stack, c)
    assert set(summed) == set(per_layer)
    for p, x in per_layer.items():
        assert summed[p].shape == p.shape and summed[p].dtype == p.dtype
        torch.testing.assert_close(summed[p], torch.einsum("b,b...->...", c, materialize(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_summed_outer_split_over_the_long_dimension(splits):
    G, A = torch.randn(3, 8, 5, dtype=torch.float64), torch.randn(3, 8, 7, dtype=torch.float64)
    torch.testing.assert_close(stacks.summed_outer(G, A, splits), torch.einsum("lkm,lkn->lmn", G, A))


def test_k_splits_only_for_few_output_tiles_in_full_precision():
    assert stacks._k_splits(4, 1152, 384, 4096, torch.float32) == 2  # 108 tiles
    assert stacks._k_splits(4, 384, 384, 4096, torch.float32) == 4  # 36 tiles
    assert stacks._k_splits(12, 768, 768, 4096, torch.float32) == 1  # 432 tiles: enough
    assert stacks._k_splits(4, 1152, 384, 4096, torch.bfloat16) == 1
    assert stacks._k_splits(4, 384, 384, 600, torch.float32) == 1  # chunks would be too short


def test_what_is_not_stacked():
    """A lone shape, a parameter with two forms and layers with and without a bias are left as they are or
    stacked apart."""
    with_bias, without = layer(True), layer(False)
    lone = {nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)): [Outer(torch.randn(B, T, 2, dtype=torch.float64),
                                                                          torch.randn(B, T, 2, dtype=torch.float64),
                                                                          torch.Size([2, 2]))]}
    twice = layer(False)
    (p, fs), = twice.items()
    fs.append(fs[0])
    found = {**with_bias, **layer(True), **without, **layer(False), **lone, **twice}
    kept = set(lone) | set(twice)
    result = pop_stacks(found)
    assert set(found) == kept and len(result) == 2
    assert sorted(s.biases is not None for s in result) == [False, True]


def test_mixed_dtypes_give_float32_norms():
    found = {}
    for _ in range(2):
        found.update(layer(True, torch.bfloat16))
    for p in found:
        p.data = p.data.float()
    (stack,) = pop_stacks(found)
    assert stack_norms(stack).dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in stack_clipped_sums(stack, torch.rand(B)).values())


@pytest.mark.parametrize("strategy", ["auto", "ghost"])
@pytest.mark.parametrize("frozen_bias", [False, True])
def test_gpt_with_stacked_blocks_matches_the_reference(strategy, frozen_bias):
    model = TinyGPT(layers=3).double()
    if frozen_bias:  # one block's fc has no bias form: its weight stacks apart from the others
        model.blocks[1].fc.bias.requires_grad_(False)
    idx, targets = torch.randint(0, 24, (4, 6)), torch.randint(0, 24, (4, 6))
    assert_matches_reference(model, idx, targets, strategy=strategy)


def test_stacks_are_used_on_a_gpt(monkeypatch):
    calls = []
    monkeypatch.setattr("persample.engine.ghost_clipping.pop_stacks",
                        lambda found: calls.append(result := stacks.pop_stacks(found)) or result)
    model = TinyGPT(layers=3).double()
    GhostClipping(model, max_grad_norm=1.0, strategy="ghost").per_sample_grad_norms(
        torch.randint(0, 24, (4, 6)), torch.randint(0, 24, (4, 6)))
    # qkv, proj, fc and fc2 of the three blocks: four groups of three, each with its biases.
    assert sorted(len(s.params) for s in calls[0]) == [3, 3, 3, 3]
    assert all(s.biases is not None for s in calls[0])


@pytest.mark.parametrize("way", ["make_private", "engine"])
def test_each_layers_factors_are_freed_once_stacked(way, monkeypatch):
    """Stacking copies each group's factors; the layers' own must be freed right after, or the copy doubles them
    at the step's peak. In a make_private loop the user's loss keeps the autograd graph, and with it the engine's
    hooks, alive through the clipping: nothing there may hold a layer's input."""
    import gc
    import weakref

    import persample

    alive = []

    def watched(found):
        refs = [weakref.ref(t) for fs in found.values() if len(fs) == 1 and isinstance(fs[0], Outer)
                for t in (fs[0].G, fs[0].A)]
        result = stacks.pop_stacks(found)
        gc.collect()
        alive.append((len(result), sum(r() is not None for r in refs)))
        return result

    monkeypatch.setattr("persample.engine.ghost_clipping.pop_stacks", watched)
    torch.manual_seed(0)
    model = TinyGPT(layers=3)
    idx, targets = torch.randint(0, 24, (4, 6)), torch.randint(0, 24, (4, 6))
    if way == "engine":
        persample.GhostClipping(model, max_grad_norm=1.0, strategy="ghost").clipped_grad_sum(idx, targets)
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(idx, targets), batch_size=4)
        with pytest.warns(UserWarning):  # the accountant's note on poisson_sampling=False
            model, optimizer, loader = persample.PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False)
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()  # the clipping runs here, with loss (and its graph) alive
        assert loss.grad_fn is not None
    ((stacked, kept),) = alive
    assert stacked and not kept  # groups were stacked, and no layer kept its own factors
