"""persample.PrivacyEngine against Opacus 1.6's on the same loop, and the pain points of Opacus users.

Parameters are compared after several SGD steps with the noise off, the same seeds and so the same Poisson
batches (both loaders draw ``torch.rand(n) < q`` from PyTorch's global generator): absolute tolerance 1e-5
(float32; the two sum the same clipped gradients in different orders, differences seen are below 1e-7).
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import persample
from persample.app.digits import DigitsCNN, digits_split
from tests.engine.models import TinyGPT

opacus = pytest.importorskip("opacus")

ATOL = 1e-5
C = 0.5  # small enough that most examples are clipped


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # Opacus warns about secure mode, optimal RDP orders and full backward hooks on every run.
        warnings.simplefilter("ignore")
        yield


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(kind: str, n: int = 48):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))
    if kind == "digits":
        x, y, _, _ = digits_split()
        return TensorDataset(x[:n], y[:n])
    tokens = torch.randint(0, 24, (n, 7), generator=g)
    return TensorDataset(tokens[:, :-1].clone(), tokens[:, 1:].clone())


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    # Opacus's hooks need the positional table indexed with a batch dimension ("expand").
    return {"mlp": _mlp, "digits": lambda: DigitsCNN(width=8),
            "gpt": lambda: TinyGPT(vocab=24, d=8, layers=1, positions="expand")}[kind]()


def _loss(criterion, out, y):
    return criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _train(model, optimizer, criterion, loader, *, max_physical=None, make_manager=None, epochs=1):
    for _ in range(epochs):
        if max_physical is None:
            batches = loader
            for x, y in batches:
                optimizer.zero_grad()
                _loss(criterion, model(x), y).backward()
                optimizer.step()
            continue
        with make_manager(data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                _loss(criterion, model(x), y).backward()
                optimizer.step()


def _persample_run(kind, *, with_criterion=True, max_physical=None, noise=0.0, accountant="prv", mode="ghost",
                   batch_size=16, epochs=1):
    model = _model(kind)
    dataset = _data(kind)
    engine = persample.PrivacyEngine(accountant=accountant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(dataset, batch_size=batch_size)
    criterion = nn.CrossEntropyLoss()
    if with_criterion:
        model, optimizer, criterion, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=C,
            criterion=criterion, grad_sample_mode=mode)
    else:
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=noise, max_grad_norm=C, grad_sample_mode=mode)
    torch.manual_seed(1)
    _train(model, optimizer, criterion, loader, max_physical=max_physical, make_manager=persample.BatchMemoryManager,
           epochs=epochs)
    return model, engine


def _opacus_run(kind, *, max_physical=None, noise=0.0, accountant="prv", batch_size=16, epochs=1):
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    model = _model(kind)
    engine = opacus.PrivacyEngine(accountant=accountant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
                                                   data_loader=DataLoader(_data(kind), batch_size=batch_size),
                                                   noise_multiplier=noise, max_grad_norm=C)
    torch.manual_seed(1)
    _train(model, optimizer, nn.CrossEntropyLoss(), loader, max_physical=max_physical,
           make_manager=BatchMemoryManager, epochs=epochs)
    return model._module, engine


def _assert_same_parameters(ours: nn.Module, theirs: nn.Module, start: nn.Module):
    moved = 0.0
    for (name, p), q, p0 in zip(ours.named_parameters(), theirs.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=0, msg=name)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 100 * ATOL  # the runs trained: the comparison is not of two untouched models


@pytest.mark.parametrize("kind", ["mlp", "digits", "gpt"])
@pytest.mark.parametrize("with_criterion", [True, False], ids=["criterion", "loss_reduction"])
def test_same_parameters_as_opacus_without_noise(kind, with_criterion):
    ours, _ = _persample_run(kind, with_criterion=with_criterion)
    theirs, _ = _opacus_run(kind)
    _assert_same_parameters(ours, theirs, _model(kind))


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_physical_batches_match_opacus_and_the_whole_batch(kind):
    ours, _ = _persample_run(kind, max_physical=5, batch_size=24)
    theirs, _ = _opacus_run(kind, max_physical=5, batch_size=24)
    _assert_same_parameters(ours, theirs, _model(kind))
    whole, _ = _persample_run(kind, batch_size=24)
    _assert_same_parameters(ours, whole, _model(kind))


def test_vmap_mode_matches_the_engine():
    ghost, _ = _persample_run("digits")
    vmapped, _ = _persample_run("digits", mode="vmap")
    _assert_same_parameters(vmapped, ghost, _model("digits"))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_same_epsilon_as_opacus(accountant):
    _, ours = _persample_run("mlp", noise=1.1, accountant=accountant, epochs=2)
    _, theirs = _opacus_run("mlp", noise=1.1, accountant=accountant, epochs=2)
    assert ours.accountant.history == [(1.1, 16 / 48, 6)]
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-6)


def test_defaults_are_opacus_prv_and_one_pass_per_epoch():
    model = _mlp()
    engine = persample.PrivacyEngine()
    _, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(_data("mlp", 50), batch_size=16),
                                               noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.accountant.mechanism == "prv"
    assert loader.sample_rate == 1 / 4 and len(loader) == 4
    assert optimizer.expected_batch_size == pytest.approx(12.5)


def test_make_private_with_epsilon_spends_the_budget():
    model = _mlp()
    engine = persample.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), target_epsilon=4.0, target_delta=1e-5, epochs=2,
        max_grad_norm=1.0)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert 3.9 < engine.get_epsilon(1e-5) <= 4.0
    model = _mlp()
    _, theirs, _ = opacus.PrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), target_epsilon=4.0, target_delta=1e-5, epochs=2,
        max_grad_norm=1.0)
    assert optimizer.noise_multiplier == theirs.noise_multiplier


def _checkpointed_run(stop_after: int | None, epochs: int = 3):
    """Adam with noise and seeded generators; with ``stop_after``, a fresh process's worth of objects resumes
    from a checkpoint taken after that many epochs."""

    def build(state=None):
        model = _model("mlp")
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        engine = persample.PrivacyEngine()
        loader = DataLoader(_data("mlp"), batch_size=12, generator=torch.Generator().manual_seed(3))
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=0.8, max_grad_norm=C,
                                                       noise_generator=torch.Generator().manual_seed(4))
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            engine.load_state_dict(state["privacy"])
        return model, optimizer, loader, engine

    def epoch(model, optimizer, loader):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    model, optimizer, loader, engine = build()
    for i in range(epochs):
        if i == stop_after:
            state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                     "privacy": copy.deepcopy(engine.state_dict())}
            torch.manual_seed(1234)  # nothing in the run may depend on the global generator
            model, optimizer, loader, engine = build(state)
        epoch(model, optimizer, loader)
    return model, engine


def test_resume_from_a_checkpoint_gives_the_same_run():
    straight, straight_engine = _checkpointed_run(None)
    resumed, resumed_engine = _checkpointed_run(1)
    assert resumed_engine.get_epsilon(1e-5) == straight_engine.get_epsilon(1e-5) > 0
    assert resumed_engine.accountant.history == straight_engine.accountant.history
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_state_dict_keeps_the_users_keys():
    model = _mlp()
    keys = list(model.state_dict())
    private, _, _ = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    assert private is model and list(private.state_dict()) == keys


# Opacus users' pain points --------------------------------------------------------------------------------------


def _one_step(model, criterion=None, *, max_grad_norm, dataset, batch=16, dtype=None, loss_reduction="mean",
              mode="ghost"):
    """One private backward on the first ``batch`` examples; returns the clipped sum it accumulated."""
    engine = persample.PrivacyEngine()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(dataset, batch_size=batch)
    if criterion is not None:
        model, optimizer, criterion, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
            criterion=criterion, grad_sample_mode=mode)
    else:
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                                       loss_reduction=loss_reduction, grad_sample_mode=mode)
        criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
    x, y = dataset[:batch]
    with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
        loss = _loss(criterion, model(x), y)
    loss.backward()
    return optimizer.dp._summed


def _reference(model, x, y) -> tuple[dict[str, torch.Tensor], float]:
    """float64 ``sum_b clip(grad loss_b)`` with one backward per example, and the bound ``C`` it clips to: the
    median norm, so that some examples are clipped and some not (a sum in which every example is clipped
    would not see a wrong scale of the per-example gradients: ``C g / |g|`` does not depend on it)."""
    model = copy.deepcopy(model).double()
    grads, norms = [], []
    for b in range(len(x)):
        model.zero_grad()
        xb = x[b:b + 1].double() if x.is_floating_point() else x[b:b + 1]
        out = model(xb)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y[b:b + 1].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads[-1].values())).item())
    bound = sorted(norms)[len(norms) // 2]
    total = {n: sum(g[n] * min(1.0, bound / (norm + 1e-6)) for g, norm in zip(grads, norms, strict=True))
             for n in grads[0]}
    return total, bound


def _check_against_float64(model, criterion=None, *, data="mlp", atol=1e-5, rtol=1e-4, **kwargs):
    dataset = _data(data) if isinstance(data, str) else data
    x, y = dataset[:16]
    reference, bound = _reference(model, x, y)
    summed = _one_step(copy.deepcopy(model), criterion, max_grad_norm=bound, dataset=dataset, **kwargs)
    assert set(summed) == set(reference)
    for name, ref in reference.items():
        assert summed[name].dtype == torch.float32
        torch.testing.assert_close(summed[name].double(), ref, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_clipped_sum_against_float64(loss_reduction, mode):
    _check_against_float64(_mlp(), loss_reduction=loss_reduction, mode=mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    # Tied head, positions without a batch dimension (which Opacus's hooks cannot take).
    _check_against_float64(TinyGPT(vocab=24, d=8, layers=1), nn.CrossEntropyLoss(), data="gpt", dtype=dtype,
                           atol=0.02, rtol=0.05)


def test_sequence_loss_is_each_examples_mean_over_its_counted_tokens():
    dataset = _data("gpt")
    dataset.tensors[1][::3, 2:] = -100  # some examples count fewer tokens
    _check_against_float64(TinyGPT(vocab=24, d=8, layers=1), nn.CrossEntropyLoss(), data=dataset)


def test_frozen_parameters_are_left_alone():
    model = _mlp()
    model[0].requires_grad_(False)
    _check_against_float64(model)


class _Scaled(nn.Module):
    """A custom layer with its own parameter (no rule: the torch.func fallback; Opacus: 'no grad sampler')."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return torch.tanh(x * self.gain)


def test_custom_module_through_the_fallback():
    _check_against_float64(nn.Sequential(nn.Linear(6, 16), _Scaled(16), nn.Linear(16, 4)))


def test_batch_norm_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="GroupNorm"):
        persample.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(_data("mlp"), batch_size=8),
                                               noise_multiplier=1.0, max_grad_norm=1.0)


def test_empty_batches_collate_and_step_with_noise_only():
    # Plain DataLoader(ds, batch_sampler=PoissonSampler) fails here (default_collate of an empty list).
    dataset = _data("mlp", 4)
    loader = persample.DPDataLoader(dataset, sample_rate=0.02, steps=20, generator=torch.Generator().manual_seed(0))
    sizes = [len(x) for x, _ in loader]
    assert 0 in sizes
    x, y = next(b for b in loader if len(b[0]) == 0)
    assert x.shape == (0, 6) and y.shape == (0,) and y.dtype == torch.int64

    model = _mlp()
    start = [p.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = persample.PrivacyEngine()
    model, optimizer, criterion, _ = engine.make_private(module=model, optimizer=optimizer,
                                                         data_loader=DataLoader(dataset, batch_size=1),
                                                         criterion=nn.CrossEntropyLoss(), noise_multiplier=1.0,
                                                         max_grad_norm=1.0, noise_generator=torch.Generator())
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    assert loss.item() == 0.0 and optimizer.dp._summed is None
    optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))  # the noise
    assert engine.accountant.steps == 1


def test_accumulating_two_batches_without_a_step_raises():
    model = _mlp()
    model, optimizer, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = _data("mlp")[:8]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="BatchMemoryManager"):
        F.cross_entropy(model(x), y).backward()


def test_a_loss_that_bypasses_the_criterion_raises():
    model = _mlp()
    model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = _data("mlp")[:8]
    with pytest.raises(RuntimeError, match="criterion make_private returned"):
        F.cross_entropy(model(x), y).backward()


def test_a_loss_of_several_criterion_terms_and_any_scale():
    """``(criterion(out, y) + 3 * criterion(out, y)) / 8`` is ``loss_b / 2`` per example: the step is that of
    ``criterion(out, y)`` (the step is of the clipped per-example gradients, whatever the loss's scale)."""
    steps = []
    x, y = _data("mlp")[:16]
    _, bound = _reference(_model("mlp"), x, y)  # some examples clipped, some not
    for combine in (lambda loss1, loss2: loss1, lambda loss1, loss2: (loss1 + 3 * loss2) / 8):
        model = _model("mlp")
        model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data("mlp"), batch_size=16), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=0.0, max_grad_norm=bound)
        out = model(x)
        combine(criterion(out, y), criterion(out, y)).backward()
        steps.append(optimizer.dp._summed)
    for name, g in steps[0].items():
        torch.testing.assert_close(steps[1][name], g, msg=name)


def test_a_criterion_without_mean_or_sum_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        persample.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data("mlp"), batch_size=16), criterion=nn.CrossEntropyLoss(reduction="none"),
            noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_loss_that_is_not_per_example_raises():
    model = _mlp()
    model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), criterion=nn.MSELoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    x, _ = _data("mlp")[:8]
    with pytest.raises(ValueError, match="not a mean or sum of per-example losses"):
        criterion(model(x)[:3], torch.zeros(3, 4))


def test_two_forwards_before_one_backward_raise():
    model = _mlp()
    model, optimizer, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = _data("mlp")[:8]
    first = model(x)
    second = model(x)
    with pytest.raises(RuntimeError, match="called again"):
        (F.cross_entropy(first, y) + F.cross_entropy(second, y)).backward()


def test_evaluation_and_lr_schedulers_work_as_usual():
    model = _mlp()
    model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = _data("mlp")[:8]
    with torch.no_grad():
        assert criterion(model(x), y).item() == pytest.approx(F.cross_entropy(model(x), y).item())
    criterion(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bad_arguments_are_named():
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data("mlp"), batch_size=16)
    engine = persample.PrivacyEngine()
    with pytest.raises(ValueError, match="clipping"):
        engine.make_private(module=model, optimizer=sgd, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                            clipping="per_layer")
    with pytest.raises(ValueError, match="noise_generator"):
        persample.PrivacyEngine(secure_mode=True).make_private(
            module=model, optimizer=sgd, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            noise_generator=torch.Generator())
    with pytest.raises(ValueError, match="not the module's"):
        engine.make_private(module=_mlp(), optimizer=sgd, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("kind", ["mlp", "digits"])
def test_torch_compile_of_the_private_model(kind):
    """The compiled private model trains as the eager one: an MLP, and the digits CNN (Conv2d and GroupNorm rules)."""
    eager, _ = _persample_run(kind)
    model = _model(kind)
    model, optimizer, criterion, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(_data(kind), batch_size=16), criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0,
        max_grad_norm=C)
    compiled = torch.compile(model)
    torch.manual_seed(1)
    _train(compiled, optimizer, criterion, loader)
    _assert_same_parameters(model, eager, _model(kind))


def test_a_model_compiled_before_make_private_is_refused_with_the_order_named():
    model = torch.compile(_mlp())
    with pytest.raises(TypeError, match="then compile"):
        persample.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(_data("mlp"), batch_size=16),
                                               noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_data_parallel_wrapper_is_refused():
    model = nn.DataParallel(_mlp())
    with pytest.raises(TypeError, match="DataParallel"):
        persample.PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(_data("mlp"), batch_size=16),
                                               noise_multiplier=1.0, max_grad_norm=1.0)


def test_without_poisson_sampling_the_loader_is_kept_with_a_warning_and_detach_restores_the_model():
    model = _mlp()
    loader = DataLoader(_data("mlp"), batch_size=16, shuffle=True)
    engine = persample.PrivacyEngine()
    with pytest.warns(UserWarning, match="approximation"):
        model, optimizer, returned = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    assert returned is loader and optimizer.dp.sample_rate == 1 / 3
    engine.detach()
    x, y = _data("mlp")[:8]
    F.cross_entropy(model(x), y).backward()  # an ordinary backward again: param.grad, nothing accumulated
    assert all(p.grad is not None for p in model.parameters()) and optimizer.dp._summed is None


class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 2:  # the engine's planning forward and the first step go through
            raise KeyError("the user's forward failed")
        return self.fc(x)


def test_a_forward_that_raises_leaves_the_model_trainable():
    model = _Raises()
    model, optimizer, loader = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = _data("mlp")[:8]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(KeyError):
        model(x)
    assert all(p.requires_grad for p in model.parameters())


def test_secure_mode_has_no_generator_state():
    model = _mlp()
    engine = persample.PrivacyEngine(secure_mode=True)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data("mlp"), batch_size=16, generator=torch.Generator().manual_seed(0)),
        noise_multiplier=1.0, max_grad_norm=1.0)
    assert loader.batch_sampler.secure_mode and loader.batch_sampler.generator is None
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = engine.state_dict()
    assert state["sample_generators"] == [None] and state["noise_generators"] == [None]
    assert state["accountant"] == {"mechanism": "prv", "history": [(1.0, 16 / 48, 3)]}


class _Records(torch.utils.data.Dataset):
    """Examples as dicts with a non-tensor field, collated by a custom function."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "id": f"record-{i}"}


def _collate(items):
    return {"x": torch.stack([item["x"] for item in items]), "ids": [item["id"] for item in items]}


def test_any_map_style_dataset_with_its_collate_fn():
    loader = persample.DPDataLoader.from_data_loader(DataLoader(_Records(), batch_size=1, collate_fn=_collate,
                                                                generator=torch.Generator().manual_seed(0)))
    assert loader.sample_rate == pytest.approx(0.1) and len(loader) == 10
    batches = list(loader)
    assert any(len(b["x"]) for b in batches)
    empty = next(b for b in batches if len(b["x"]) == 0)  # this seed's batches include an empty one
    assert empty["x"].shape == (0, 3) and empty["ids"] == []


def test_physical_batches_stay_aligned_with_prefetching_workers():
    """The end of a logical batch travels with its last physical batch, not with the sampler (which workers'
    prefetching runs ahead): two workers give the run of none."""
    runs = []
    for workers in (0, 2):
        model = _model("mlp")
        model, optimizer, loader = persample.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=DataLoader(_data("mlp"), batch_size=24, num_workers=workers), noise_multiplier=0.0,
            max_grad_norm=C)
        torch.manual_seed(1)
        _train(model, optimizer, nn.CrossEntropyLoss(), loader, max_physical=5,
               make_manager=persample.BatchMemoryManager)
        runs.append(model)
    _assert_same_parameters(runs[1], runs[0], _model("mlp"))


def test_secure_poisson_batches_have_the_binomial_size_and_ignore_seeds():
    """50 secure batches over 1000 examples at q = 0.1: the total size is Binomial(50000, 0.1) (mean 5000, sd
    67.1); |total - 5000| < 5.5 sd fails by chance with probability below 1e-7. Batches from the OS CSPRNG do
    not repeat under the same torch seed."""
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        batches.append(list(persample.dp.PoissonBatchSampler(1000, 0.1, steps=50, secure_mode=True)))
    total = sum(len(b) for b in batches[0])
    assert abs(total - 5000) < 5.5 * (50000 * 0.1 * 0.9) ** 0.5
    assert batches[0] != batches[1]
    assert all(b == sorted(set(b)) and all(0 <= i < 1000 for i in b) for b in batches[0])


def test_a_nonfinite_example_is_dropped_and_reported_at_the_step():
    """An example with a NaN input gets a clip factor of 0 and zeros; the warning is read at optimizer.step(),
    after the noise and the update are queued (the host does not wait for the backward before queueing them),
    and points at the user's step line. The step is the other examples'."""
    torch.manual_seed(0)
    model, dataset = _mlp(), _data("mlp")
    clean = copy.deepcopy(model)
    x, y = dataset[:8]
    x = x.clone()
    x[3, 2] = float("nan")
    private, optimizer, _ = persample.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(dataset, batch_size=8), noise_multiplier=0.0, max_grad_norm=C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.zero_grad()
        F.cross_entropy(private(x), y).backward()
        assert not [w for w in caught if w.category is persample.NonFiniteGradientWarning]
        optimizer.step()
    found = [w for w in caught if w.category is persample.NonFiniteGradientWarning]
    assert len(found) == 1 and "positions [3]" in str(found[0].message), [str(w.message) for w in found]
    assert found[0].filename == __file__
    keep = [0, 1, 2, 4, 5, 6, 7]
    summed = persample.clip_per_sample(persample.per_sample_grads(clean, x[keep], y[keep]), C)
    for (name, p), q in zip(clean.named_parameters(), model.parameters(), strict=True):
        assert torch.isfinite(q).all(), name
        # expected batch size: sample rate 8 / 48 times 48 examples
        torch.testing.assert_close(q, p - 0.5 * summed[name] / 8, atol=ATOL, rtol=1e-4, msg=name)
