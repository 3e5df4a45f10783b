"""Each example's gradient of one parameter, kept factored, and the two things the engine does with it.

A layer rule describes each example's gradient of a parameter in one of four forms (``B`` examples,
``T`` positions per example) instead of materializing it:

* :class:`Dense` — ``g (B, *param_shape)`` in float32 (float64 for float64 models): materialized; for
  small parameters (biases, norm scales) and for layers where materializing is cheaper than the factors
  (``T * (m + n) >= m * n``).
* :class:`Outer` — ``grad_b = G_b^T A_b`` with ``G (B, T, m)``, ``A (B, T, n)``: a Linear weight (or an
  unfolded Conv2d weight) from its output gradients and its inputs.
* :class:`Rows` — ``grad_b = sum_t e_{index[b, t]} G[b, t]^T`` with ``G (B, T, n)``, ``index (B, T)``: an
  Embedding table, whose rows receive the output gradients of the positions that looked them up.
* :class:`Summed` — ``grad_b = sum_t G[b, t]`` with ``G (B, T, m)``: a bias, kept unsummed until the end of
  the backward, so that the biases of same-shaped layers are summed with their weights' stack
  (:mod:`persample.engine.stacks`), not one op per layer. Otherwise it becomes :class:`Dense` by
  :func:`as_dense`, which :func:`inner` and :func:`clipped_sum` apply first.
* :class:`Implicit` — ``grad_b`` known only to its layer's rule, from the layer's input ``x`` and output
  gradient ``G`` (batch first) as they are: a convolution weight, whose factors as an Outer (the unfolded
  patches, ``prod(kernel) / prod(stride)`` times the input) would hold several times the memory of ``x``
  itself. The rule's :class:`ImplicitOps` give each example's squared norm, the weighted sum and, for the
  rare cross term with another form, the materialized gradients.

:func:`inner` gives ``<grad_b(x), grad_b(y)>`` for every example without forming either gradient. With
``x is y`` that is the squared norm; for two uses of one parameter (an embedding tied to the LM head, a
module called twice) it is the cross term, since the example's gradient is the sum of the uses and
``||u + v||^2 = ||u||^2 + ||v||^2 + 2 <u, v>``. The Outer·Outer product is the ghost norm
``<A_b A'_b^T, G_b G'_b^T>`` (``T x T'`` matrices, no ``m x n`` one), Rows·Rows compares indices instead
of forming one-hot rows, Outer·Rows gathers ``G[b, s, index[b, t]]``.

:func:`clipped_sum` gives ``sum_b c_b grad_b`` in one matmul (Outer), one ``index_add`` (Rows) or one
matrix-vector product (Dense): the clipped, summed gradient is formed once, not per example.

Work on ``(B, T, T')`` intermediates is split along the batch so that one chunk stays under
``_CHUNK_ELEMENTS`` elements.
"""

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from persample.backend import transforms_active, use_triton
from persample.kernels import row_dot

_CHUNK_ELEMENTS = 1 << 26
_DOT_BY_MATMUL = 1 << 23  # on the CPU, batched_dot of two tensors larger than this is one batched matmul
_DOT_BY_KERNEL = 1 << 23  # on the Triton path, larger than this: the row_dot kernel (smaller: its temporary is small)


@dataclass
class Dense:
    g: Tensor  # (B, *param_shape)


@dataclass
class Outer:
    G: Tensor  # (B, T, m)
    A: Tensor  # (B, T, n)
    shape: torch.Size  # the parameter's shape, with m * n elements


@dataclass
class Rows:
    G: Tensor  # (B, T, n)
    index: Tensor  # (B, T) int64 in [0, num_rows)
    shape: torch.Size  # (num_rows, n)


@dataclass
class Summed:
    G: Tensor  # (B, T, m): the gradients of the output positions that the bias was added to


class ImplicitOps(Protocol):
    """What a rule that returns :class:`Implicit` forms provides. Equal (and hashing equal) across steps for the
    same layer: a CUDA graph of the engine's post-backward is keyed on it."""

    def sq_norms(self, x: Tensor, G: Tensor) -> Tensor:
        """``(B,)`` each example's squared gradient norm, float32 (float64 for float64)."""

    def weighted_sum(self, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
        """``sum_b c_b grad_b`` in the parameter's shape, ``c (B,)`` in ``G``'s dtype."""

    def per_example(self, x: Tensor, G: Tensor) -> Tensor:
        """``(B, *param_shape)`` every example's gradient, float32 (float64 for float64)."""


@dataclass
class Implicit:
    x: Tensor  # (B, ...) the layer's input, as its op saw it
    G: Tensor  # (B, ...) the gradient of the layer's output
    ops: ImplicitOps


Form = Dense | Outer | Rows | Summed | Implicit


def as_dense(x: Form) -> Form:
    """A :class:`Summed` form summed over its positions (float32, float64 for float64); other forms as they are."""
    return Dense(x.G.sum(1, dtype=acc_dtype(x.G))) if isinstance(x, Summed) else x


def outer_or_dense(G: Tensor, A: Tensor, shape: torch.Size, strategy: str) -> Form:
    """The cheaper form of ``grad_b = G_b^T A_b``: the factors when ``T (m + n) < m n`` (ghost norm), else
    the materialized ``(B, m, n)`` gradients, which then cost less memory and less time.

    ``strategy`` ``"ghost"`` / ``"materialize"`` forces one of them (tests exercise both paths).
    """
    if prefers_factors(G.shape[1], G.shape[2], A.shape[2], strategy):
        return Outer(G, A, shape)
    g = torch.bmm(G.transpose(1, 2), A.to(G.dtype))
    return Dense(g.reshape(G.shape[0], *shape).to(acc_dtype(G)))


def prefers_factors(T: int, m: int, n: int, strategy: str) -> bool:
    """Whether ``grad_b = G_b^T A_b`` (``T`` positions, ``m x n``) is kept as factors: ``T (m + n) < m n`` for
    ``"auto"`` (the factors are then smaller than the gradient, and their Gram matrices cheaper than forming it),
    always for ``"ghost"``, never for ``"materialize"``."""
    return strategy == "ghost" or (strategy == "auto" and T * (m + n) < m * n)


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32: the dtype of norms and of Dense forms."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@functools.cache
def _gemm_out_dtype() -> bool:
    """Whether this PyTorch's GEMMs take ``out_dtype`` (low-precision inputs, float32 output; CUDA only)."""
    x = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="meta")
    try:
        torch.bmm(x, x, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _gemm_writes(x: Tensor, acc: torch.dtype) -> bool:
    """Whether a GEMM of float16/bfloat16 ``x`` can write float32 ``acc`` itself (CUDA, a PyTorch with
    ``out_dtype``)."""
    return x.is_cuda and acc == torch.float32 and x.dtype in (torch.float16, torch.bfloat16) and _gemm_out_dtype()


def bmm_acc(x: Tensor, y: Tensor, acc: torch.dtype, plus_one: bool = False) -> Tensor:
    """``x @ y`` (batched), plus 1 everywhere with ``plus_one``, in the accumulation dtype ``acc``. On CUDA,
    float16/bfloat16 inputs come out of the GEMM in float32 directly: the product is not rounded to the inputs'
    dtype first, and no cast is launched (the engine runs several of these per layer group and step). Elsewhere
    the product is cast."""
    one = x.new_ones(()) if plus_one else None
    if _gemm_writes(x, acc):
        return torch.bmm(x, y, out_dtype=acc) if one is None else torch.baddbmm(one, x, y, out_dtype=acc)
    return _to(torch.bmm(x, y) if one is None else torch.baddbmm(one, x, y), acc)


def bmm_into(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """``out = x @ y`` (batched), ``out`` of the inputs' dtype or of their accumulation dtype. As :func:`bmm_acc`,
    float16/bfloat16 inputs go into a float32 ``out`` straight from the GEMM on CUDA (not rounded first, no
    second copy); elsewhere the product is cast."""
    if out.dtype == x.dtype:
        return torch.bmm(x, y, out=out)
    if _gemm_writes(x, out.dtype):
        return torch.bmm(x, y, out_dtype=out.dtype, out=out)
    return out.copy_(torch.bmm(x, y))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    # The engine runs a few of these per layer and step; most are no-ops, which need no call into torch.
    return t if t.dtype == dtype else t.to(dtype)


def _common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _to(a, dtype), _to(b, dtype)


def batched_dot(x: Tensor, y: Tensor) -> Tensor:
    """``(B,)`` dot products of ``x[b]`` and ``y[b]`` (same shape and dtype). Squared norms (``x is y``) are one
    reduction, ``vector_norm`` squared; other products, on the Triton path beyond ``2^23`` elements (contiguous
    operands), one kernel that reads both once and writes no product (:mod:`persample.kernels.row_dot`; on an
    H100 0.6-0.95x the product and sum's time there, and no temporary; below, its extra launch cost more than
    the product's pass), else a product and a sum, or on the CPU beyond ``2^23`` elements, where the product's
    temporary costs more, one batched matmul. A batched ``1 x K`` by ``K x 1`` product is slow on both devices:
    cuBLAS runs it as gemv kernels, 3-15x slower than the reduction on an H200 (B=256, K from 37k to 600k), and
    on two CPU cores it took about 10x the reduction's time (``benchmarks/batched_dot.py``; its section of
    ``benchmarks/RESULTS.md``)."""
    B, same = x.shape[0], x is y
    if x.ndim == 1:
        x, y = x.view(B, 1), y.view(B, 1)
    # Reduced over every dimension but the first, not over a reshape: a tensor in another memory format (a
    # cuDNN weight gradient in channels-last) would be copied by the reshape.
    dims = tuple(range(1, x.ndim))
    if same:
        return torch.linalg.vector_norm(x, dim=dims).square()
    if _by_kernel(x, y):
        return _to(row_dot.row_dots(x, y), x.dtype)
    if x.is_cuda or x.numel() <= _DOT_BY_MATMUL:
        return (x * y).sum(dims)
    return torch.bmm(x.reshape(B, 1, -1), y.reshape(B, -1, 1)).reshape(B)


def _by_kernel(x: Tensor, y: Tensor) -> bool:
    """Whether :func:`batched_dot` runs :func:`~persample.kernels.row_dot.row_dots`: on the Triton path, for
    large contiguous operands outside autograd and the transforms (which trace PyTorch ops, not launches)."""
    return (x.numel() > _DOT_BY_KERNEL and use_triton(x) and x.is_contiguous() and y.is_contiguous()
            and not (x.requires_grad or y.requires_grad) and not transforms_active())


def by_chunks(per_example: int, dot, *tensors: Tensor) -> Tensor:
    """``dot(*tensors)`` over slices of the batch whose ``(b, T, T')`` intermediates fit ``_CHUNK_ELEMENTS``."""
    B = tensors[0].shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example))
    if step >= B:
        return dot(*tensors)
    return torch.cat([dot(*(t[i:i + step] for t in tensors)) for i in range(0, B, step)])


def _dense_dense(x: Dense, y: Dense) -> Tensor:
    a, b = _common(x.g, y.g)
    return batched_dot(a, b)


def _dense_outer(x: Dense, y: Outer) -> Tensor:
    # <D_b, G_b^T A_b> = sum_t G_b[t] . (D_b A_b[t])
    acc = acc_dtype(x.g, y.G)
    B, m = y.G.shape[0], y.G.shape[2]
    D = _to(x.g.reshape(B, m, -1), acc)
    return batched_dot(torch.bmm(_to(y.A, acc), D.transpose(1, 2)), _to(y.G, acc))


def _dense_rows(x: Dense, y: Rows) -> Tensor:
    # <D_b, sum_t e_{i_t} G_b[t]^T> = sum_t D_b[i_t] . G_b[t]
    acc = acc_dtype(x.g, y.G)
    B, T, n = y.G.shape
    picked = _to(x.g.reshape(B, -1, n), acc).gather(1, y.index[:, :, None].expand(B, T, n))
    return batched_dot(picked, _to(y.G, acc))


def _outer_outer(x: Outer, y: Outer) -> Tensor:
    acc = acc_dtype(x.G, y.G)

    def dot(gx: Tensor, gy: Tensor, ax: Tensor, ay: Tensor) -> Tensor:
        gx, gy = _common(gx, gy)
        ax, ay = _common(ax, ay)
        return batched_dot(bmm_acc(gx, gy.transpose(1, 2), acc), bmm_acc(ax, ay.transpose(1, 2), acc))

    return by_chunks(x.G.shape[1] * y.G.shape[1], dot, x.G, y.G, x.A, y.A)


def _outer_rows(x: Outer, y: Rows) -> Tensor:
    # <G_b^T A_b, R_b> = sum_{s,t} G_b[s, i_t] <A_b[s], G'_b[t]>: the Outer gradient read at the looked-up rows.
    acc = acc_dtype(x.G, y.G)
    Tx, Ty = x.G.shape[1], y.G.shape[1]

    def dot(gx: Tensor, ax: Tensor, gy: Tensor, index: Tensor) -> Tensor:
        picked = _to(gx.gather(2, index[:, None, :].expand(-1, Tx, Ty)), acc)
        a, g = _common(ax, gy)
        return batched_dot(picked, bmm_acc(a, g.transpose(1, 2), acc))

    return by_chunks(Tx * Ty, dot, x.G, x.A, y.G, y.index)


def _rows_rows(x: Rows, y: Rows) -> Tensor:
    # Only positions that looked up the same row interact.
    acc = acc_dtype(x.G, y.G)

    def dot(gx: Tensor, gy: Tensor, ix: Tensor, iy: Tensor) -> Tensor:
        gx, gy = _common(gx, gy)
        same = (ix[:, :, None] == iy[:, None, :]).to(acc)
        return batched_dot(bmm_acc(gx, gy.transpose(1, 2), acc), same)

    return by_chunks(x.G.shape[1] * y.G.shape[1], dot, x.G, y.G, x.index, y.index)


_INNER = {
    (Dense, Dense): _dense_dense,
    (Dense, Outer): _dense_outer,
    (Dense, Rows): _dense_rows,
    (Outer, Outer): _outer_outer,
    (Outer, Rows): _outer_rows,
    (Rows, Rows): _rows_rows,
}


def inner(x: Form, y: Form) -> Tensor:
    """``<grad_b(x), grad_b(y)>`` for each example: ``(B,)`` in float32 (float64 for float64 inputs)."""
    if isinstance(x, Implicit) and x is y:
        return x.ops.sq_norms(x.x, x.G)
    # A cross term with an Implicit form (a convolution called twice, or tied to another layer) is rare: that
    # form is materialized.
    x, y = (Dense(f.ops.per_example(f.x, f.G)) if isinstance(f, Implicit) else as_dense(f) for f in (x, y))
    rule = _INNER.get((type(x), type(y)))
    if rule is not None:
        return rule(x, y)
    return _INNER[(type(y), type(x))](y, x)


def clipped_sum(x: Form, c: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_b c_b grad_b(x)`` with ``c (B,)``, in the parameter's shape and ``dtype``."""
    x = as_dense(x)
    if isinstance(x, Dense):
        return _to((_to(c, x.g.dtype) @ x.g.flatten(1)).view(x.g.shape[1:]), dtype)
    if isinstance(x, Implicit):
        return _to(x.ops.weighted_sum(x.x, x.G, _to(c, x.G.dtype)), dtype)
    c = c.view(-1, 1, 1)
    if isinstance(x, Outer):
        G, A = _common(x.G, x.A)
        # Scale whichever factor is smaller; the product is formed once for the whole batch.
        if G.shape[2] <= A.shape[2]:
            G = G * _to(c, G.dtype)
        else:
            A = A * _to(c, A.dtype)
        return bmm_acc(G.flatten(0, 1).T[None], A.flatten(0, 1)[None], dtype).view(x.shape)
    n = x.G.shape[2]
    scaled = _to((x.G * _to(c, x.G.dtype)).view(-1, n), dtype)
    return torch.zeros(x.shape, dtype=dtype, device=x.G.device).index_add_(0, x.index.reshape(-1), scaled)
