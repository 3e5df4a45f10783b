"""Same-shaped layers in one op each: the norms and clipped sums of a group of Outer forms.

A transformer's blocks repeat the same layers: every block's ``qkv`` has factors of the same shapes, and so
do its ``proj``, ``fc`` and ``fc2``. The Outer forms of ``L`` such parameters (each parameter's one form)
are stacked into ``G (L, B, T, m)`` and ``A (L, B, T, n)``; then each example's squared norms summed over
the group are one ghost-norm pass over ``L * B`` examples, and the ``L`` clipped sums
``sum_b c_b G_lb^T A_lb`` one batched matmul. That is a handful of ops per group instead of a handful per
layer, which is what a step of small kernels, bound by the host's launches, spends its time on.

Stacking copies one group's factors at a time and the per-layer factors are released right after, so the
extra memory is one group's factors, not the model's.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persample.engine.forms import Form, Outer, inner


@dataclass
class OuterStack:
    """The Outer forms of ``params`` (one each), stacked: ``G (L, B, T, m)``, ``A (L, B, T, n)``."""

    params: list[nn.Parameter]
    G: Tensor
    A: Tensor


def pop_stacks(forms: dict[nn.Parameter, list[Form]]) -> list[OuterStack]:
    """Takes out of ``forms`` the parameters whose one form is an Outer with the factor shapes and dtypes of
    at least one other such parameter, and returns them stacked by group."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p, fs in forms.items():
        if len(fs) == 1 and isinstance(fs[0], Outer):
            G, A = fs[0].G, fs[0].A
            groups.setdefault((G.shape, A.shape, G.dtype, A.dtype, G.device), []).append(p)
    stacks = []
    for params in groups.values():
        if len(params) > 1:
            outers = [forms.pop(p)[0] for p in params]
            stacks.append(OuterStack(params, torch.stack([f.G for f in outers]), torch.stack([f.A for f in outers])))
    return stacks


def stack_norms(stack: OuterStack) -> Tensor:
    """``(B,)`` each example's squared norm summed over the group's parameters (float32, float64 for float64)."""
    L, B = stack.G.shape[:2]
    G, A = stack.G.flatten(0, 1), stack.A.flatten(0, 1)
    flat = Outer(G, A, torch.Size())
    return inner(flat, flat).view(L, B).sum(0)


def stack_clipped_sums(stack: OuterStack, c: Tensor) -> list[Tensor]:
    """``sum_b c_b grad_lb`` for each parameter ``l`` of the group, in its shape and dtype; ``c (B,)``."""
    G, A = stack.G, stack.A
    L, B, T = G.shape[:3]
    if G.dtype != A.dtype:
        dtype = torch.promote_types(G.dtype, A.dtype)
        G, A = G.to(dtype), A.to(dtype)
    c = c.to(G.dtype).view(1, B, 1, 1)
    # Scale whichever factor is smaller; each parameter's product is formed once for the whole batch.
    if G.shape[3] <= A.shape[3]:
        G = G * c
    else:
        A = A * c
    summed = torch.bmm(G.view(L, B * T, -1).transpose(1, 2), A.view(L, B * T, -1))
    dtype = stack.params[0].dtype
    if all(p.dtype == dtype for p in stack.params):
        summed = summed.to(dtype)  # one cast for the group; the per-parameter ones below are then no-ops
    return [summed[i].view(p.shape).to(p.dtype) for i, p in enumerate(stack.params)]
