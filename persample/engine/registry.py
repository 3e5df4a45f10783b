"""The per-layer rules: one function per module type, registered with :func:`register_rule`.

A rule turns one call of a module — the inputs it saw in the forward and the gradient of its output from
the backward — into each example's gradient of the module's parameters, in the factored forms of
:mod:`persample.engine.forms`. The same forms give the norms and the clipped sums, so one function serves
both. Modules of other types (and modules that use parameters a rule does not know) go to the ``torch.func``
fallback, :mod:`persample.engine.rules.fallback`: exact, but slower.

Adding a layer type, step by step:

1. **The rule**: a new file ``persample/engine/rules/<layer>.py`` whose docstring gives the layer's
   per-example gradient formulas, with one function ``compute(call, grad_output, strategy) -> {name: form}``
   decorated with ``@register_rule(ModuleType, params=("weight", "bias"))``. ``call.args[0]`` is the
   module's first input with the batch dimension first (detached), ``grad_output`` is ``(B, *output_shape)``,
   ``call.params`` holds only the parameter names that are trainable (return a form for each of those, none
   for the others). Pick the form: :class:`~persample.engine.forms.Outer` for a product of inputs and output
   gradients (:func:`~persample.engine.forms.outer_or_dense` chooses by ``strategy`` and cost),
   :class:`~persample.engine.forms.Rows` for a table lookup, :class:`~persample.engine.forms.Summed` for a
   bias next to an Outer weight, :class:`~persample.engine.forms.Implicit` with the rule's own norms and sums
   when the layer's input and output gradient are smaller than any factors (a convolution's),
   :class:`~persample.engine.forms.Dense` otherwise. Pass ``cast_input=True``
   when the module's op runs in the autocast dtype, ``cast_input="float32"`` when it is on CUDA autocast's
   float32 list, so that the kept input is the one it used.
   A type from an optional dependency is named by its import path (a string), so that registering it imports
   nothing. A rule whose work per call is one small kernel can also pass ``batched=``, the same for a list of
   calls in fewer launches (:class:`Rule`; the norm layers' in ``layernorm.py``).
2. **Registration**: import the new module in ``persample/engine/rules/__init__.py`` and add it to
   ``__all__``; importing that package (the engine does) registers every rule.
3. **The test**: ``tests/engine/rules/test_<layer>.py``, mirroring the file: ``rule_for(module, params)`` is
   not None, and :func:`tests.engine.reference.assert_matches_reference` — the engine's norms and clipped sums
   against float64 ``vmap(grad)`` — for each ``strategy`` and each option of the layer that changes its
   gradient, with a bound that clips some examples and not others.
4. **The docs**: the layer joins the list of exact rules in :class:`~persample.engine.GhostClipping`'s
   docstring and in the README.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persample.engine.forms import Form


@dataclass
class Call:
    """One call of a module during the engine's forward.

    ``args`` are the inputs as the module saw them (detached), with the batch dimension first (a call that was
    shared by the whole batch, like a positional embedding of ``arange(T)``, has its first input expanded to the
    batch); ``kwargs`` the fallback's keyword inputs, likewise, or for a rule what its :attr:`Rule.saved` took
    from the call's output (``{}`` if nothing). ``params`` are the trainable parameters
    the call uses, by their names relative to ``module``. ``autocast`` is the ``(device_type, dtype)``
    autocast was on during the call, or None; it is recorded for the fallback, which replays the call (rules
    get None).
    """

    module: nn.Module
    args: tuple
    kwargs: dict
    params: dict[str, nn.Parameter]
    autocast: tuple[str, torch.dtype] | None


RuleFn = Callable[[Call, Tensor, str], dict[str, Form]]


@dataclass(frozen=True)
class Rule:
    """``compute(call, grad_output, strategy) -> {param name: form}`` for the parameters in ``params``.

    ``grad_output`` is ``(B, *output_shape)``; ``strategy`` is ``"auto"``, ``"ghost"`` or ``"materialize"``
    (see :func:`persample.engine.forms.outer_or_dense`). With ``cast_input``, the engine casts the first
    input as autocast would before the call, so that the copy it keeps is the one the op uses: to the autocast
    dtype (``True``) or, under CUDA autocast, to float32 (``"float32"``). ``saved(output)``, if given, runs when
    the call is recorded and returns what the rule may reuse from the output's autograd node (its saved tensors,
    e.g. a normalization's statistics) as ``call.kwargs``; ``{}`` when there is nothing to take.

    ``batched(calls)``, if given, does what ``compute`` does for a list of ``(call, grad_output)`` at once, in
    fewer launches, and returns their forms in order: the engine may then hold the calls it would compute one by
    one until the end of the backward (or until they hold too much memory) and hand them over together.
    """

    compute: RuleFn
    params: frozenset[str]
    cast_input: bool | str
    saved: Callable[[Tensor], dict] | None = None
    batched: Callable[[list[tuple[Call, Tensor]]], list[dict[str, Form]]] | None = None


RULES: dict[type[nn.Module] | str, Rule] = {}


def register_rule(*module_types: type[nn.Module] | str, params: tuple[str, ...], cast_input: bool | str = False,
                  saved: Callable[[Tensor], dict] | None = None,
                  batched: Callable[[list[tuple[Call, Tensor]]], list[dict[str, Form]]] | None = None):
    """Registers the decorated ``compute`` (and ``batched``, see :class:`Rule`) for exactly these module types (not
    their subclasses, which may override ``forward``; those go to the fallback). A type of an optional dependency
    is named by its import path (``"transformers.pytorch_utils.Conv1D"``), so that registering it imports
    nothing."""

    def decorate(compute: RuleFn) -> RuleFn:
        for module_type in module_types:
            RULES[module_type] = Rule(compute, frozenset(params), cast_input, saved, batched)
        return compute

    return decorate


def rule_for(module: nn.Module, used: set[str]) -> Rule | None:
    """The registered rule for ``module`` if it covers every parameter name in ``used``, else None.
    ``fully_shard`` (FSDP2) gives a module the class ``FSDP<Type>(FSDPModule, Type)``, whose forward is
    ``Type``'s: the rule of ``Type``."""
    # FSDP2's module exists only once torch.distributed.fsdp is imported, which persample itself does not do (it is
    # most of a second of `import persample` on two CPU cores).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = type(module) if fsdp is None else next(c for c in type(module).__mro__ if not issubclass(c, fsdp.FSDPModule))
    rule = RULES.get(cls) or RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    return rule if rule is not None and used <= rule.params else None
