"""The CUDA-graph wrappers' bookkeeping (persample/engine/graphed.py), on the CPU: which call captures, which
replays, what is copied and checked. The graphs themselves are exercised on CUDA in test_ghost_clipping.py."""

import pytest
import torch

from persample.engine import graphed
from persample.engine.graphed import GraphedStep, _Recent


def test_recent_keeps_the_last_signatures():
    recent = _Recent(keep=2)
    made = []

    def capture(name):
        return lambda: made.append(name) or name

    assert recent.get_or_capture("a", capture("a")) == ("a", True)
    assert recent.get_or_capture("b", capture("b")) == ("b", True)
    assert recent.get_or_capture("a", capture("a2")) == ("a", False)  # used again: now the most recent
    assert recent.get_or_capture("c", capture("c")) == ("c", True)  # evicts "b", the least recent
    assert list(recent) == ["a", "c"] and made == ["a", "b", "c"]


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_graphed_step_captures_once_per_signature_then_checks_copies_and_replays(monkeypatch):
    captures, checks = [], []

    def fake_capture(self, leaves, spec):
        captures.append([v.clone() for v in leaves])
        static = [v.clone() for v in leaves]
        return graphed._CapturedStep(_FakeGraph(), static, f"result {len(captures)}", 7)

    def check(targets, classes):
        checks.append((targets.clone(), classes))
        return lambda: checks.append("finished")

    monkeypatch.setattr(GraphedStep, "_capture", fake_capture)
    state = {"value": 0}
    step = GraphedStep(step=None, check=check, state=lambda: (state["value"],))
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)

    assert step((x,), y)[0] == "result 1"  # captured: its warm-up checked the targets, no check here
    assert len(captures) == 1 and checks == []
    first = step._captured[next(iter(step._captured))]
    assert first.graph.replays == 1

    x2, y2 = torch.ones(2, 3), torch.ones(2, dtype=torch.long)
    assert step((x2,), y2)[0] == "result 1"  # same shapes: checked, copied in, replayed
    assert len(captures) == 1 and first.graph.replays == 2
    assert torch.equal(checks[0][0], y2) and checks[0][1] == 7 and checks[1] == "finished"
    assert torch.equal(first.inputs[0], x2) and torch.equal(first.inputs[1], y2)

    assert step((torch.zeros(4, 3),), torch.zeros(4, dtype=torch.long))[0] == "result 2"  # new shapes
    state["value"] = 1
    assert step((x,), y)[0] == "result 3"  # same shapes, another state (a setting changed)
    assert len(step._captured) == 2


def test_graphed_step_reads_the_early_output_after_the_graphs_event(monkeypatch):
    """The early output (the mask of finite examples) is the graph's copy on the host: read() waits for the event the
    graph records behind that copy, then returns the copy, each replay's own."""
    early, log = torch.zeros(3, dtype=torch.bool), []
    masks = iter([[True, False, True], [False, True, True]])

    class Event:
        def synchronize(self):
            log.append("waited")

    class Graph:
        def replay(self):
            log.append("replayed")
            early.copy_(torch.tensor(next(masks)))

    def fake_capture(self, leaves, spec):
        return graphed._CapturedStep(Graph(), [v.clone() for v in leaves], "result", None, early, Event())

    monkeypatch.setattr(GraphedStep, "_capture", fake_capture)
    step = GraphedStep(step=None, check=lambda targets, classes: lambda: None, state=tuple)
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    for expected in ([True, False, True], [False, True, True]):
        result, read = step((x,), y)
        assert result == "result" and log[-1] == "replayed"
        assert read().tolist() == expected and log[-1] == "waited"


def test_graphed_step_without_an_early_output_reads_none(monkeypatch):
    monkeypatch.setattr(GraphedStep, "_capture",
                        lambda self, leaves, spec: graphed._CapturedStep(_FakeGraph(), [], "result", None))
    step = GraphedStep(step=None, check=None, state=tuple)
    result, read = step((torch.zeros(2, 3),), torch.zeros(2, dtype=torch.long))
    assert result == "result" and read() is None


def test_graphed_post_copies_a_later_steps_factors_into_the_captured_inputs(monkeypatch):
    from persample.engine import GhostClipping
    from persample.engine.graphed import GraphedPost
    from tests.engine.models import TinyGPT

    def fake_capture(self, tensors, rebuild):
        return graphed._Captured(_FakeGraph(), [t.clone() for t in tensors], ("norms", {"grads": None}))

    monkeypatch.setattr(GraphedPost, "_capture", fake_capture)
    model = TinyGPT(layers=2).double()
    engine = GhostClipping(model, max_grad_norm=0.5)
    post = GraphedPost(engine._norms_and_clipped_sums)
    idx, targets = torch.randint(0, 24, (4, 6)), torch.randint(0, 24, (4, 6))
    assert post(*engine._backward(idx, targets)[:2]) == ("norms", {"grads": None})
    step, losses, _ = engine._backward(torch.randint(0, 24, (4, 6)), targets)
    tensors = [t.clone() for t in [*graphed._flatten(step)[0], losses]]
    post(step, losses)
    (captured,) = post._captured.values()
    assert captured.graph.replays == 2 and not step.forms and not step.stacks
    assert all(torch.equal(a, b) for a, b in zip(captured.inputs, tensors, strict=True))


def test_graphed_step_names_unhashable_inputs():
    step = GraphedStep(step=None, check=None, state=tuple)
    with pytest.raises(ValueError, match=r"must be hashable; got \['set'\]"):
        step((torch.zeros(2, 3), {"ids": {1, 2}}), torch.zeros(2, dtype=torch.long))


def test_graphed_post_keys_implicit_forms_on_their_layer(monkeypatch):
    """A conv weight kept Implicit enters the graph by its input and output gradient, and by its layer: two steps
    of one model share a signature (one capture), and a rebuilt step holds the new tensors with the same ops."""
    from torch import nn

    from persample.engine import GhostClipping
    from persample.engine.forms import Implicit
    from persample.engine.graphed import GraphedPost

    def fake_capture(self, tensors, rebuild):
        return graphed._Captured(_FakeGraph(), [t.clone() for t in tensors], ("norms", {"grads": None}))

    monkeypatch.setattr(GraphedPost, "_capture", fake_capture)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 4))
    engine = GhostClipping(model, max_grad_norm=0.5, strategy="ghost",
                           loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    x, y = torch.randn(3, 2, 3, 3), torch.randint(0, 4, (3,))
    steps = [engine._backward(torch.randn_like(x), y)[0] for _ in range(2)]
    (first, signature, _), (_, again, rebuild) = (graphed._flatten(s) for s in steps)
    assert signature == again
    implicit = [f for fs in steps[1].forms.values() for f in fs if isinstance(f, Implicit)]
    assert {f.ops.module for f in implicit} == {model[0], model[2]}
    assert all(any(f.ops in entry for entry in signature if isinstance(entry, tuple)) for f in implicit)
    new_tensors = [t.clone() for t in first]
    rebuilt = rebuild(new_tensors)
    for p, forms in rebuilt.forms.items():
        for new, old in zip(forms, steps[1].forms[p], strict=True):
            assert type(new) is type(old) and getattr(new, "ops", None) == getattr(old, "ops", None)
    new_implicit = [f for fs in rebuilt.forms.values() for f in fs if isinstance(f, Implicit)]
    assert len(new_implicit) == 2 and all(any(f.x is t for t in new_tensors) for f in new_implicit)
    post = GraphedPost(engine._norms_and_clipped_sums)
    for step in steps:
        post(step, torch.zeros(3))
    (captured,) = post._captured.values()
    assert captured.graph.replays == 2
