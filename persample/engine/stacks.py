"""Same-shaped layers in one op each: the norms and clipped sums of a group of Outer forms.

A transformer's blocks repeat the same layers: every block's ``qkv`` has factors of the same shapes, and so
do its ``proj``, ``fc`` and ``fc2``. The Outer forms of ``L`` such parameters (each parameter's one form)
are stacked into ``G (L, B, T, m)`` and ``A (L, B, T, n)``; then each example's squared norms summed over
the group are one ghost-norm pass over ``L * B`` examples, and the ``L`` clipped sums
``sum_b c_b G_lb^T A_lb`` one batched matmul. That is a handful of ops per group instead of a handful per
layer, which is what a step of small kernels, bound by the host's launches, spends its time on.

A bias whose one form is :class:`~persample.engine.forms.Summed` over its weight's ``G`` joins the stack:
its gradient ``G_b^T 1`` is the weight's with inputs of ones, so the pair's squared norm is
``<G_b G_b^T, A_b A_b^T + 1>`` (the ``+ 1`` inside the same batched matmul) and its clipped sum is ``G``
summed with the weights ``c_b`` (one reduction of the scaled ``G``, or one matrix-vector product).

Stacking copies one factor of one group at a time and the per-layer factors are released right after, so
the extra memory is one group's ``G`` or ``A``, not the model's factors.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persample.engine.forms import Form, Outer, Summed, acc_dtype, batched_dot, bmm_acc, by_chunks


@dataclass
class OuterStack:
    """The Outer forms of ``params`` (one each), stacked: ``G (L, B, T, m)``, ``A (L, B, T, n)``; with
    ``biases``, the parameters whose one form is the Summed ``G`` of the same layer."""

    params: list[nn.Parameter]
    G: Tensor
    A: Tensor
    biases: list[nn.Parameter] | None


def pop_stacks(forms: dict[nn.Parameter, list[Form]]) -> list[OuterStack]:
    """Takes out of ``forms`` the parameters whose one form is an Outer with the factor shapes and dtypes of
    at least one other such parameter (and their layers' Summed biases), and returns them stacked by group."""
    bias_of = {id(fs[0].G): p for p, fs in forms.items() if len(fs) == 1 and isinstance(fs[0], Summed)}
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p, fs in forms.items():
        if len(fs) == 1 and isinstance(fs[0], Outer):
            G, A = fs[0].G, fs[0].A
            groups.setdefault((G.shape, A.shape, G.dtype, A.dtype, G.device, id(G) in bias_of), []).append(p)
    fs = G = A = None  # the loop's last layer: its factors are freed once stacked, like the others'
    stacks = []
    for key, params in groups.items():
        if len(params) < 2:
            continue
        outers = [forms.pop(p)[0] for p in params]
        biases = [bias_of[id(f.G)] for f in outers] if key[-1] else None
        for b in biases or ():
            del forms[b]
        Gs, As = [f.G for f in outers], [f.A for f in outers]
        del outers
        # One factor at a time, each list dropped once stacked: the extra memory is one group's G or A.
        G = torch.stack(Gs)
        del Gs
        stacks.append(OuterStack(params, G, torch.stack(As), biases))
    return stacks


def stack_norms(stack: OuterStack) -> Tensor:
    """``(L, B)`` each example's squared norm of each of the group's ``L`` layers, its bias included (float32,
    float64 for float64): the caller sums them with the other terms in one op."""
    L, B = stack.G.shape[:2]
    acc = acc_dtype(stack.G, stack.A)

    def dot(G: Tensor, A: Tensor) -> Tensor:
        aa = bmm_acc(A, A.transpose(1, 2), acc, plus_one=stack.biases is not None)
        return batched_dot(bmm_acc(G, G.transpose(1, 2), acc), aa)

    T = stack.G.shape[2]
    return by_chunks(T * T, dot, stack.G.flatten(0, 1), stack.A.flatten(0, 1)).view(L, B)


def stack_clipped_sums(stack: OuterStack, c: Tensor) -> dict[nn.Parameter, Tensor]:
    """``{parameter: sum_b c_b grad_b}`` for the group's parameters (and biases), in their shapes and dtypes;
    ``c (B,)``."""
    G, A = stack.G, stack.A
    L, B, T = G.shape[:3]
    if G.dtype != A.dtype:
        dtype = torch.promote_types(G.dtype, A.dtype)
        G, A = G.to(dtype), A.to(dtype)
    c = c.to(G.dtype)
    # Scale whichever factor is smaller (a copy of it); the products are formed once for the whole batch.
    scale_G = G.shape[3] <= A.shape[3]
    if scale_G:
        G = G * c.view(1, B, 1, 1)
    else:
        A = A * c.view(1, B, 1, 1)
    G = G.view(L, B * T, -1)
    weights = summed_outer(G, A.view(L, B * T, -1), dtype=stack.params[0].dtype)
    summed = dict(zip(stack.params, as_parameters(weights, stack.params), strict=True))
    if stack.biases is not None:
        biases = G.sum(1, dtype=acc_dtype(G)) if scale_G else c.repeat_interleave(T) @ G
        summed.update(zip(stack.biases, as_parameters(biases, stack.biases), strict=True))
    return summed


def summed_outer(G: Tensor, A: Tensor, splits: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``(L, m, n)``: ``G[l]^T A[l]`` for ``G (L, K, m)``, ``A (L, K, n)``, summed over the long dimension ``K``; in
    ``dtype`` (default ``G``'s; float32 from low-precision factors comes straight out of the GEMM, see
    :func:`~persample.engine.forms.bmm_acc`).

    cuBLAS does not split the inner dimension of a batched GEMM: with few output tiles and a long ``K`` (a
    4-layer group of a small model, ``K = B * T``) it runs on a fraction of the SMs. In float32/float64, where
    such a GEMM takes long enough to matter, ``K`` is then split into ``splits`` chunks that are batched too
    (views, no copy) and the partial products summed, which fills more of them (the gain on a small GPT's
    group of 4 layers: benchmarks/RESULTS.md, "Figures quoted from code"). Low precision keeps one GEMM (fast
    already, and its partial sums would be rounded)."""
    L, K, m = G.shape
    if splits is None:
        splits = _k_splits(L, m, A.shape[2], K, G.dtype)
    dtype = dtype or G.dtype
    if splits == 1:
        return bmm_acc(G.transpose(1, 2), A, dtype)
    parts = torch.bmm(G.reshape(L * splits, K // splits, m).transpose(1, 2), A.reshape(L * splits, K // splits, -1))
    return parts.view(L, splits, m, -1).sum(1, dtype=dtype)


def _k_splits(L: int, m: int, n: int, K: int, dtype: torch.dtype) -> int:
    """How many chunks :func:`summed_outer` splits ``K`` into: doubling (up to 4) while the GEMM has fewer than
    about 1.5 waves of 128x128 output tiles on an H100 and each chunk keeps at least 512 rows."""
    if dtype not in (torch.float32, torch.float64):
        return 1
    tiles = L * -(-m // 128) * -(-n // 128)
    splits = 1
    while splits < 4 and tiles * splits < 200 and K % (2 * splits) == 0 and K // (2 * splits) >= 512:
        splits *= 2
    return splits


def as_parameters(stacked: Tensor, params: list[nn.Parameter], sizes: list[int] | None = None) -> list[Tensor]:
    """``stacked`` unbound (or split into ``sizes`` along its one dimension), part ``l`` in ``params[l]``'s shape
    and dtype: one cast for all parts when the parameters share a dtype, and no view or cast of a part that needs
    none (each is a few microseconds, for every parameter of every step)."""
    dtype = params[0].dtype
    if stacked.dtype != dtype and all(p.dtype == dtype for p in params):
        stacked = stacked.to(dtype)
    parts = stacked.unbind() if sizes is None else stacked.split(sizes)
    out = []
    for part, p in zip(parts, params, strict=True):
        if part.dtype != p.dtype:
            part = part.to(p.dtype)
        out.append(part if part.shape == p.shape else part.view(p.shape))
    return out
