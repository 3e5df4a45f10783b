"""persample.linear_cross_entropy and linear_cross_entropy_head_grad_norms against the plain composition
``F.linear`` + ``F.cross_entropy`` in float64. Shapes stay tiny and chunks small (several per call) so that
the Triton interpreter (TRITON_INTERPRET=1) runs the whole file in seconds."""

import pytest
import torch
import torch.nn.functional as F

import persample
from persample import linear_cross_entropy, linear_cross_entropy_head_grad_norms

N, D, V = 21, 12, 37
IGNORE = -100
# Options whose values are exact in float32, since the kernel receives its scalar options as float32.
OPTIONS = {
    "plain": {},
    "class_weight": {"class_weight": True},
    "label_smoothing": {"label_smoothing": 0.125},
    "softcap": {"softcap": 4.0},
    "z_loss": {"z_loss": 2.0**-6},
    "mask": {"mask": True},
    "all": {"class_weight": True, "label_smoothing": 0.25, "softcap": 2.0, "z_loss": 2.0**-5, "mask": True},
}
# float64 is held to 1e-7, not 1e-15: the kernel divides label_smoothing by V in float32.
TOL = {torch.float64: 1e-7, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _problem(shape, dtype, bias=True, seed=0, ignored=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, shape, generator=g)
    flat = target.view(-1)
    for i in ignored:
        flat[i] = IGNORE
    return hidden.to(dtype), weight.to(dtype), (b.to(dtype) if bias else None), target, g


def _kwargs(option, shape, g):
    kw = dict(OPTIONS[option])
    if kw.get("class_weight"):
        kw["class_weight"] = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    if kw.get("mask"):
        kw["mask"] = torch.rand(shape, generator=g) > 0.25
    return kw


def _reference(hidden, weight, target, bias=None, class_weight=None, reduction="mean", label_smoothing=0.0,
               softcap=None, z_loss=0.0, mask=None):
    """The plain composition in float64: per-row F.cross_entropy plus the z-loss, reduced like persample."""
    z = F.linear(hidden, weight, bias).double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if mask is not None:
        target = torch.where(mask, target, IGNORE)
    zf, tf = z.reshape(-1, z.shape[-1]), target.reshape(-1)
    cw = class_weight.double() if class_weight is not None else None
    rows = F.cross_entropy(zf, tf, weight=cw, ignore_index=IGNORE, reduction="none",
                           label_smoothing=label_smoothing)
    counted = tf != IGNORE
    z_rows = z_loss * torch.logsumexp(zf, -1) ** 2 * counted
    if reduction == "none":
        return (rows + z_rows).reshape(target.shape)
    if reduction == "sum":
        return rows.sum() + z_rows.sum()
    # The weighted mean of the cross-entropy, the plain mean of the z-loss terms over the counted rows.
    w_t = cw[torch.where(counted, tf, 0)] if cw is not None else torch.ones_like(rows)
    denom = (w_t * counted).sum()
    count = counted.sum()
    return ((rows.sum() / denom if denom > 0 else rows.sum() * 0)
            + (z_rows.sum() / count if count > 0 else z_rows.sum() * 0))


def _loss_and_grads(fn, hidden, weight, bias, upstream, **kw):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], bias=leaves[2] if bias is not None else None, **kw)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    return out, grads


def _linear_ce(hidden, weight, target, **kw):
    return linear_cross_entropy(hidden, weight, target, **kw)


def _assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * float(scale))


def _check(shape, dtype, reduction, option, bias=True, chunk_size=5, seed=0):
    hidden, weight, b, target, g = _problem(shape, dtype, bias, seed)
    kw = _kwargs(option, shape, g)
    cw = kw.get("class_weight")
    kw_ours = {**kw, "class_weight": cw.to(dtype) if cw is not None else None}
    out_shape = shape if reduction == "none" else ()
    # A non-uniform upstream gradient, so that "none" must weight every row by its own.
    upstream = torch.randn(out_shape, generator=g, dtype=torch.float64) + 2.0
    ours, grads = _loss_and_grads(lambda h, w, bias, **k: _linear_ce(h, w, target, bias=bias, **k), hidden,
                                  weight, b, upstream, reduction=reduction, chunk_size=chunk_size, **kw_ours)
    hidden64, weight64, b64 = hidden.double(), weight.double(), b.double() if bias else None
    ref, ref_grads = _loss_and_grads(lambda h, w, bias, **k: _reference(h, w, target, bias=bias, **k), hidden64,
                                     weight64, b64, upstream, reduction=reduction, **kw)
    assert ours.dtype == dtype and ours.shape == ref.shape
    _assert_close(ours, ref, dtype)
    for actual, expected in zip(grads, ref_grads, strict=True):
        assert actual.dtype == dtype
        _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_plain_composition_float64(reduction, option):
    _check((N,), torch.float64, reduction, option)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_plain_composition_low_precision(dtype, reduction):
    _check((N,), dtype, reduction, "all")


@pytest.mark.parametrize("chunk_size", [1, 4, N, 64])
def test_chunk_sizes(chunk_size):
    _check((N,), torch.float64, "mean", "plain", chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_shape_without_bias(reduction):
    _check((3, 7), torch.float64, reduction, "mask", bias=False)


@pytest.mark.parametrize("frozen", ["hidden", "weight", "bias"])
def test_frozen_inputs_get_no_gradient(frozen):
    hidden, weight, bias, target, _ = _problem((N,), torch.float64)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        t.requires_grad_(name != frozen)
    linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=5).backward()
    ref = {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}
    _reference(ref["hidden"], ref["weight"], target, bias=ref["bias"]).backward()
    for name, t in tensors.items():
        if name == frozen:
            assert t.grad is None
        else:
            _assert_close(t.grad, ref[name].grad, torch.float64)


def test_second_backward_through_retained_graph():
    hidden, weight, _, target, _ = _problem((N,), torch.float64, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, target, chunk_size=5)
    first = torch.autograd.grad(3.0 * loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(3.0 * loss, (hidden, weight))
    for a, b in zip(first, second, strict=True):
        _assert_close(a, b, torch.float64)


def test_no_grad_and_all_ignored():
    hidden, weight, bias, target, _ = _problem((N,), torch.float64)
    with torch.no_grad():
        _assert_close(linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=5),
                      _reference(hidden, weight, target, bias=bias), torch.float64)
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, torch.full((N,), IGNORE), bias=bias, chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_torch_func_falls_back_to_the_composition():
    hidden, weight, _, target, _ = _problem((N,), torch.float64, bias=False)
    grad = torch.func.grad(lambda w: linear_cross_entropy(hidden, w, target))(weight)
    expected = torch.func.grad(lambda w: persample.cross_entropy(F.linear(hidden, w), target))(weight)
    _assert_close(grad, expected, torch.float64)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"weight": torch.zeros(V, D, dtype=torch.float32)}, TypeError, "dtype and device of hidden"),
    ({"weight": torch.zeros(V, D + 1, dtype=torch.float64)}, ValueError, "weight must have shape"),
    ({"bias": torch.zeros(V + 1, dtype=torch.float64)}, ValueError, "bias must have shape"),
    ({"target": torch.zeros(N + 1, dtype=torch.long)}, ValueError, "does not match hidden shape"),
    ({"target": torch.full((N,), V)}, ValueError, "outside"),
    ({"target": torch.zeros(N)}, TypeError, "integer class indices"),
    ({"class_weight": torch.ones(V + 1, dtype=torch.float64)}, ValueError, "class_weight must have shape"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"hidden": torch.zeros(N, D, dtype=torch.int64)}, TypeError, "hidden must be"),
])
def test_errors_name_the_bad_argument(kwargs, error, match):
    args = {"hidden": torch.zeros(N, D, dtype=torch.float64), "weight": torch.zeros(V, D, dtype=torch.float64),
            "target": torch.zeros(N, dtype=torch.long)}
    args.update(kwargs)
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, target, **args)


# ---------------------------------------------------------------------------------------------------------
# Per-example gradient norms of the head
# ---------------------------------------------------------------------------------------------------------


def _materialized_norms(hidden, weight, target, bias, reduction, **kw):
    """Each example's loss and head-gradient norms from its own float64 autograd graph."""
    losses, weight_norms, bias_norms = [], [], []
    mask = kw.pop("mask", None)
    for i in range(hidden.shape[0]):
        w = weight.double().detach().requires_grad_()
        b = bias.double().detach().requires_grad_() if bias is not None else None
        loss = _reference(hidden[i].double(), w, target[i], bias=b, reduction=reduction,
                          mask=mask[i] if mask is not None else None, **kw)
        grads = torch.autograd.grad(loss, [w] + ([b] if b is not None else []), allow_unused=True)
        losses.append(loss.detach())
        weight_norms.append(grads[0].norm())
        bias_norms.append(grads[1].norm() if b is not None else None)
    return (torch.stack(losses), torch.stack(weight_norms),
            torch.stack(bias_norms) if bias is not None else None)


@pytest.mark.parametrize("chunk_size", [3, 8, 100])
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_head_grad_norms_match_materialized(reduction, option, chunk_size):
    B, T = 4, 5
    hidden, weight, bias, target, g = _problem((B, T), torch.float64, ignored=(1, 7, 8))
    target[2] = IGNORE  # an example with nothing counted: loss and norms 0
    kw = _kwargs(option, (B, T), g)
    ours = linear_cross_entropy_head_grad_norms(hidden, weight, target, bias=bias, reduction=reduction,
                                                chunk_size=chunk_size, **kw)
    expected = _materialized_norms(hidden, weight, target, bias, reduction, **kw)
    for actual, ref in zip(ours, expected, strict=True):
        _assert_close(actual, ref, torch.float64)
    assert ours.weight[2] == 0 and ours.bias[2] == 0


def test_head_grad_norms_low_precision_without_bias():
    B, T = 3, 4
    hidden, weight, _, target, _ = _problem((B, T), torch.float32, bias=False)
    ours = linear_cross_entropy_head_grad_norms(hidden, weight, target, chunk_size=4)
    expected = _materialized_norms(hidden, weight, target, None, "mean")
    assert ours.bias is None and ours.weight.dtype == torch.float32
    _assert_close(ours.loss, expected[0], torch.float32)
    _assert_close(ours.weight, expected[1], torch.float32)


def test_head_grad_norms_errors():
    hidden, weight, _, target, _ = _problem((2, 3), torch.float64, bias=False, ignored=(1,))
    with pytest.raises(ValueError, match="mean' or 'sum"):
        linear_cross_entropy_head_grad_norms(hidden, weight, target, reduction="none")
    with pytest.raises(ValueError, match=r"\(B, T, d\)"):
        linear_cross_entropy_head_grad_norms(hidden[0], weight, target[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_plain_composition(dtype):
    torch.manual_seed(0)
    n, d, v = 1000, 256, 5003
    hidden = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device="cuda", dtype=dtype) / d**0.5).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    target[::7] = IGNORE
    loss = linear_cross_entropy(hidden, weight, target, chunk_size=128)
    loss.backward()
    hh = hidden.double().detach().requires_grad_()
    ww = weight.double().detach().requires_grad_()
    ref = _reference(hh, ww, target)
    ref.backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for ours, expected in ((hidden.grad, hh.grad), (weight.grad, ww.grad)):
        err = (ours.double() - expected).norm() / expected.norm()
        assert err < tol
    norms = linear_cross_entropy_head_grad_norms(hidden.detach().view(10, 100, d), weight.detach(),
                                                 target.view(10, 100))
    expected = _materialized_norms(hidden.detach().view(10, 100, d), weight.detach(), target.view(10, 100), None,
                                   "mean")
    torch.testing.assert_close(norms.weight.double(), expected[1], rtol=tol, atol=0)


@pytest.mark.parametrize("factor", [1.0, 2.0, 2.0**-10])
def test_z_loss_under_class_weights_does_not_depend_on_their_scale(factor):
    # The mean is F.cross_entropy's weighted mean plus the plain mean of the z terms over the counted rows
    # (issue 17): the same loss and gradients for class weights scaled by any factor, on every schedule (the
    # gradients from the forward, their recomputation in a second backward, no grad) and in the head's norms.
    hidden, weight, bias, target, g = _problem((3, 7), torch.float64)
    class_weight = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    opts = dict(label_smoothing=0.25, z_loss=2.0**-3)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(*leaves[:2], target, bias=leaves[2], class_weight=class_weight * factor,
                                chunk_size=5, **opts)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    ref, ref_grads = _loss_and_grads(lambda h, w, bias, **k: _reference(h, w, target, bias=bias, **k), hidden,
                                     weight, bias, torch.tensor(1.0, dtype=torch.float64),
                                     class_weight=class_weight, **opts)
    _assert_close(loss, ref, torch.float64)
    for a, b, expected in zip(first, second, ref_grads, strict=True):
        _assert_close(a, expected, torch.float64)
        _assert_close(b, expected, torch.float64)
    with torch.no_grad():
        _assert_close(linear_cross_entropy(hidden, weight, target, bias=bias, class_weight=class_weight * factor,
                                           chunk_size=5, **opts), ref, torch.float64)
    ours = linear_cross_entropy_head_grad_norms(hidden, weight, target, bias=bias,
                                                class_weight=class_weight * factor, chunk_size=7, **opts)
    expected = _materialized_norms(hidden, weight, target, bias, "mean", class_weight=class_weight, **opts)
    for actual, ref_norm in zip(ours, expected, strict=True):
        _assert_close(actual, ref_norm, torch.float64)
