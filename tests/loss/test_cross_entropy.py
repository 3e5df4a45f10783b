"""persample.cross_entropy / cross_entropy_with_grad / CrossEntropyLoss against a float64 reference.

Under TRITON_INTERPRET=1 (CI) CPU tensors run the real Triton kernels through the interpreter, whose
block size is 64, so V=130 crosses two block boundaries. With a GPU the same tests also run on CUDA.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import persample
from persample.kernels import cross_entropy as ce_kernels
from tests.conftest import CUDA, DEVICES, interpreting
from tests.reference import cross_entropy_reference, rel_err

TOL = {torch.float64: 1e-7, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
SHAPES = [(1, 1), (3, 2), (5, 37), (4, 130), (2, 3, 17)]
OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 1},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "mask": {"mask": True},
    "all": {"weight": True, "label_smoothing": 0.1, "softcap": 5.0, "z_loss": 1e-3, "mask": True,
            "ignore_index": 0},
}


def make_inputs(shape, dtype, device, opts, scale=3.0):
    *batch, V = shape
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    target = torch.randint(0, V, batch, device=device)
    kwargs = dict(opts)
    if kwargs.pop("weight", False):
        kwargs["weight"] = (torch.rand(V, dtype=torch.float64) + 0.5).to(device=device, dtype=torch.float32)
    if kwargs.pop("mask", False):
        mask = torch.rand(batch, device=device) > 0.3
        mask.view(-1)[0] = True
        kwargs["mask"] = mask
    ignore = kwargs.get("ignore_index", -100)
    if target.numel() > 2:
        target.view(-1)[1] = ignore  # one ignored row in every batch large enough
    return logits, target, kwargs


def check_value_and_grad(shape, dtype, device, reduction, opts, upstream="random"):
    logits, target, kwargs = make_inputs(shape, dtype, device, opts)
    x = logits.clone().requires_grad_()
    loss = persample.cross_entropy(x, target, reduction=reduction, **kwargs)
    assert loss.dtype == dtype
    x_ref = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x_ref, target, reduction=reduction, **kwargs)
    assert loss.shape == ref.shape
    if upstream == "ones":
        g = torch.ones_like(ref)
    else:  # a non-uniform upstream gradient, and a scalar that is not 1 for the reduced losses
        g = torch.rand_like(ref) + 0.5
    loss.backward(g.to(dtype))
    ref.backward(g)
    assert rel_err(loss, ref) < TOL[dtype], (loss, ref)
    assert rel_err(x.grad, x_ref.grad) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_every_option(shape, reduction, option, device):
    check_value_and_grad(shape, torch.float32, device, reduction, OPTIONS[option])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (4, 130)], ids=str)
def test_dtypes(shape, reduction, option, dtype, device):
    check_value_and_grad(shape, dtype, device, reduction, OPTIONS[option])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_exactly_one(reduction, device):
    # loss.backward() with grad 1 takes the kernel's skip-the-pass branch.
    check_value_and_grad((6, 70), torch.float32, device, reduction, OPTIONS["all"], upstream="ones")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_magnitude_logits(dtype, device):
    logits, target, _ = make_inputs((6, 70), dtype, device, {}, scale=1e4)
    for reduction in ("none", "mean"):
        x = logits.clone().requires_grad_()
        loss = persample.cross_entropy(x, target, reduction=reduction)
        x_ref = logits.detach().double().requires_grad_()
        ref = cross_entropy_reference(x_ref, target, reduction=reduction)
        g = torch.rand_like(ref) + 0.5
        loss.backward(g.to(dtype))
        ref.backward(g)
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert rel_err(loss, ref) < TOL[dtype]
        assert rel_err(x.grad, x_ref.grad) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("how", ["ignore_index", "mask"])
def test_uncounted_rows_are_exactly_zero_even_with_nan_logits(how, reduction, device):
    logits = torch.randn(5, 70, device=device)
    target = torch.randint(0, 70, (5,), device=device)
    bad = torch.tensor([False, True, False, True, False], device=device)
    logits[1] = float("nan")
    logits[3] = float("-inf")
    kwargs = {}
    if how == "mask":
        kwargs["mask"] = ~bad
    else:
        target[bad] = -100
    x = logits.clone().requires_grad_()
    loss = persample.cross_entropy(x, target, reduction=reduction, **kwargs)
    loss.backward(torch.rand_like(loss) + 0.5)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[bad] == 0).all()
    if reduction == "none":
        assert (loss[bad] == 0).all()
    clean = torch.where(bad[:, None], 0.0, logits)
    ref = cross_entropy_reference(clean.double(), torch.where(bad, -100, target), reduction=reduction)
    assert rel_err(loss, ref) < 1e-5

    per_row, dlogits = persample.cross_entropy_with_grad(logits, target, **kwargs)
    assert (per_row[bad] == 0).all() and (dlogits[bad] == 0).all() and torch.isfinite(dlogits).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored_gives_zero_not_nan(reduction, device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    loss = persample.cross_entropy(logits, target, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    assert (loss == 0).all()
    assert (logits.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_cross_entropy_with_grad(option, reduction, device):
    logits, target, kwargs = make_inputs((2, 3, 70), torch.float32, device, OPTIONS[option])
    loss, dlogits = persample.cross_entropy_with_grad(logits, target, reduction=reduction, **kwargs)
    assert loss.dtype == torch.float32 and dlogits.dtype == logits.dtype and dlogits.shape == logits.shape
    x_ref = logits.double().requires_grad_()
    ref = cross_entropy_reference(x_ref, target, reduction=reduction, **kwargs)
    # For "none" each row's loss depends on its own logits only, so the gradient of the sum is exactly
    # the stack of d loss_i / d logits_i.
    ref.sum().backward()
    assert rel_err(loss, ref) < TOL[torch.float32]
    assert rel_err(dlogits, x_ref.grad) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cross_entropy_with_grad_half(dtype):
    logits, target, kwargs = make_inputs((4, 130), dtype, DEVICES[-1], OPTIONS["all"])
    loss, dlogits = persample.cross_entropy_with_grad(logits, target, **kwargs)
    x_ref = logits.double().requires_grad_()
    ref = cross_entropy_reference(x_ref, target, reduction="none", **kwargs)
    ref.sum().backward()
    assert loss.dtype == torch.float32 and dlogits.dtype == dtype
    assert rel_err(loss, ref) < 1e-5  # the loss is computed and returned in float32
    assert rel_err(dlogits, x_ref.grad) < TOL[dtype]


def test_module_form():
    logits, target, kwargs = make_inputs((5, 37), torch.float32, "cpu", OPTIONS["weight+smoothing"])
    module = persample.CrossEntropyLoss(weight=kwargs["weight"], label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    ref = cross_entropy_reference(logits, target, weight=kwargs["weight"], label_smoothing=0.1, z_loss=1e-3,
                                  softcap=4.0)
    assert rel_err(module(logits, target), ref) < 1e-6
    assert "weight" in dict(module.named_buffers())
    assert "label_smoothing=0.1" in repr(module)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_with_retain_graph(reduction):
    x = torch.randn(6, 70, requires_grad=True)
    t = torch.randint(0, 70, (6,))
    t[2] = -100
    loss = persample.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction)
    (g1,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, x)
    ref = torch.func.grad(lambda x: cross_entropy_reference(x, t, label_smoothing=0.1, reduction=reduction))(
        x.detach().double())
    assert rel_err(g1, 2 * ref) < 1e-5
    assert rel_err(g2, 3 * ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_none_with_an_expanded_upstream_and_a_second_backward(dtype, device):
    # loss.sum().backward() hands the per-row loss an expanded (stride 0) upstream gradient.
    x = torch.randn(3, 4, 70, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 70, (3, 4), device=device)
    t[0, 1] = -100
    loss = persample.cross_entropy(x, t, reduction="none")
    (g1,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad((loss * 2).sum(), x)
    ref = torch.func.grad(lambda x: cross_entropy_reference(x, t, reduction="sum"))(x.detach().double())
    assert rel_err(g1, ref) < TOL[dtype] and rel_err(g2, 2 * ref) < TOL[dtype]


def test_none_second_derivative_raises():
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.randint(0, 9, (4,))
    (g,) = torch.autograd.grad(persample.cross_entropy(x, t, reduction="none").sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        g.sum().backward()


def test_no_grad_forward():
    logits, target, _ = make_inputs((5, 37), torch.float32, "cpu", {})
    with torch.no_grad():
        loss = persample.cross_entropy(logits.requires_grad_(), target)
    assert rel_err(loss, cross_entropy_reference(logits, target)) < 1e-6


# ---------------------------------------------------------------------------------------------------
# torch.func and torch.compile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_vmap_grad_equals_loop_of_autograd(option, device):
    """Per-example gradients of a tiny linear model: vmap(grad) with persample vs a loop of autograd with
    F.cross_entropy, each example a (T, V) sequence with mean over its counted tokens."""
    B, T, D, V = 4, 3, 5, 70
    inputs = torch.randn(B, T, D, device=device)
    target = torch.randint(0, V, (B, T), device=device)
    target[1, 0] = OPTIONS[option].get("ignore_index", -100)
    weight_matrix = torch.randn(V, D, device=device)
    kwargs = {k: v for k, v in OPTIONS[option].items() if k not in ("weight", "mask")}

    def loss_fn(w, x, t):
        return persample.cross_entropy(x @ w.T, t, **kwargs)

    per_example = vmap(grad(loss_fn), in_dims=(None, 0, 0))(weight_matrix, inputs, target)
    for i in range(B):
        w = weight_matrix.double().clone().requires_grad_()
        cross_entropy_reference(inputs[i].double() @ w.T, target[i], **kwargs).backward()
        assert rel_err(per_example[i], w.grad) < 1e-5


def test_grad_jacrev_and_vmap_over_batches():
    x = torch.randn(3, 5, 37)
    t = torch.randint(0, 37, (3, 5))
    t[0, 1] = -100
    g = grad(lambda x: persample.cross_entropy(x, t))(x)
    assert rel_err(g, grad(lambda x: cross_entropy_reference(x, t))(x.double())) < 1e-5

    jac = jacrev(lambda x: persample.cross_entropy(x, t[0], reduction="none"))(x[0])
    jac_ref = jacrev(lambda x: cross_entropy_reference(x, t[0], reduction="none"))(x[0].double())
    assert rel_err(jac, jac_ref) < 1e-5

    for reduction in ("none", "mean", "sum"):
        batched = vmap(lambda x, t, r=reduction: persample.cross_entropy(x, t, reduction=r, label_smoothing=0.1))(x, t)
        looped = torch.stack([cross_entropy_reference(x[i], t[i], reduction=reduction, label_smoothing=0.1)
                              for i in range(3)])
        assert rel_err(batched, looped) < 1e-5


def test_vmap_with_unbatched_target_and_cross_entropy_with_grad():
    x = torch.randn(3, 5, 37)
    t = torch.randint(0, 37, (5,))
    loss, dlogits = vmap(lambda x: persample.cross_entropy_with_grad(x, t))(x)
    for i in range(3):
        ref_loss, ref_grad = persample.cross_entropy_with_grad(x[i], t)
        assert rel_err(loss[i], ref_loss) < 1e-6
        assert rel_err(dlogits[i], ref_grad) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensor_left_over_from_a_finished_transform(reduction, device):
    # A tensor kept from inside torch.func.grad is a wrapper of a level that has ended; plain eager code may
    # still use it, and autograd.Function.apply unwraps it. The eager training path skips apply's Python half
    # and must fall back to it for such a tensor.
    kept = {}

    def f(x):
        kept["x"] = x
        return x.sum()

    grad(f)(torch.randn(4, 9, device=device, requires_grad=True))
    x, t = kept["x"], torch.randint(0, 9, (4,), device=device)
    assert torch._C._functorch.is_functorch_wrapped_tensor(x) and x.requires_grad
    loss = persample.cross_entropy(x, t, reduction=reduction)
    ref = cross_entropy_reference(x.detach().double(), t, reduction=reduction)
    assert rel_err(loss, ref) < 1e-6
    loss.sum().backward()


def test_higher_order_and_forward_mode_raise():
    x = torch.randn(4, 9)
    t = torch.randint(0, 9, (4,))
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jacrev(jacrev(lambda x: persample.cross_entropy(x, t)))(x)
    with pytest.raises(NotImplementedError, match="forward mode AD"):
        torch.func.hessian(lambda x: persample.cross_entropy(x, t))(x)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x = torch.randn(4, 70)
    t = torch.randint(0, 70, (4,))
    t[0] = -100

    @torch.compile(fullgraph=True)
    def f(x, t):
        return persample.cross_entropy(x * 2.0, t, reduction=reduction, label_smoothing=0.1).sum()

    xc = x.clone().requires_grad_()
    loss = f(xc, t)
    loss.backward()
    x_ref = x.double().requires_grad_()
    ref = cross_entropy_reference(x_ref * 2.0, t, reduction=reduction, label_smoothing=0.1).sum()
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(xc.grad, x_ref.grad) < 1e-5


# ---------------------------------------------------------------------------------------------------
# The PyTorch path (CPU without the interpreter) must agree with the kernels
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_pytorch_path(option, reduction, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_value_and_grad((4, 130), torch.float32, "cpu", reduction, OPTIONS[option])
    check_value_and_grad((4, 130), torch.bfloat16, "cpu", reduction, OPTIONS[option])


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear exception, and the library still works afterwards
# ---------------------------------------------------------------------------------------------------


def _bad_calls(device):
    x = torch.randn(4, 10, device=device)
    t = torch.randint(0, 10, (4,), device=device)
    xg = x.clone().requires_grad_()
    return [
        (ValueError, "outside \\[0, 10\\)", lambda: persample.cross_entropy(x, torch.tensor([0, 1, 10, 2], device=device))),
        (ValueError, "class index -3", lambda: persample.cross_entropy(x, torch.tensor([0, -3, 1, 2], device=device))),
        (ValueError, "does not match", lambda: persample.cross_entropy(x, t[:3])),
        (ValueError, "does not match", lambda: persample.cross_entropy(x.T, t)),
        (TypeError, "integer class indices", lambda: persample.cross_entropy(x, t.float())),
        (TypeError, "float16, bfloat16, float32", lambda: persample.cross_entropy(x.long(), t)),
        (ValueError, "weight must have shape \\(10,\\)", lambda: persample.cross_entropy(x, t, weight=torch.ones(9, device=device))),
        (ValueError, "reduction must be one of", lambda: persample.cross_entropy(x, t, reduction="avg")),
        (ValueError, "label_smoothing", lambda: persample.cross_entropy(x, t, label_smoothing=1.5)),
        (ValueError, "softcap", lambda: persample.cross_entropy(x, t, softcap=0.0)),
        (TypeError, "mask must be a bool", lambda: persample.cross_entropy(x, t, mask=torch.ones(4, device=device))),
        (ValueError, "mask shape", lambda: persample.cross_entropy(x, t, mask=torch.ones(3, dtype=torch.bool, device=device))),
        (ValueError, "outside", lambda: persample.cross_entropy_with_grad(x, t + 10)),
        # The training path, whose main kernel checks the targets itself:
        (ValueError, "class index 12", lambda: persample.cross_entropy(xg, torch.tensor([0, 12, 1, -5], device=device))),
        (ValueError, "class index -5", lambda: persample.cross_entropy(xg, torch.tensor([0, 9, -5, 12], device=device),
                                                                       reduction="sum")),
        (ValueError, "class index 10", lambda: persample.cross_entropy(xg, torch.tensor([3, 10, 4, 5], device=device),
                                                                       reduction="none")),
        (ValueError, "outside", lambda: vmap(grad(lambda x, t: persample.cross_entropy(x, t)))(x[:, None], (t + 10)[:, None])),
    ]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors_and_library_stays_usable(device):
    for exc, pattern, call in _bad_calls(device):
        with pytest.raises(exc, match=pattern):
            call()
    x = torch.randn(4, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (4,), device=device)
    persample.cross_entropy(x, t).backward()
    assert torch.isfinite(x.grad).all()
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.skipif(not (CUDA or interpreting()), reason="the kernels' grid")
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_training_path_on_a_persistent_grid(reduction, option, monkeypatch):
    # On a GPU, rows of up to 32768 half logits run on a persistent grid, where the main kernel also sums the
    # targets' weights for the mean and reduces the loss; the interpreter's grid is one program per row.
    monkeypatch.setattr(ce_kernels, "_grid", lambda N, device, per_sm: (min(N, 3),))
    device = "cuda" if CUDA else "cpu"
    for shape in [(7, 37), (2, 5, 17)]:
        check_value_and_grad(shape, torch.float32, device, reduction, OPTIONS[option])
    x = torch.randn(8, 10, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="class index 11"):
        persample.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 5, 11, 99], device=device), reduction=reduction)
    persample.cross_entropy(x, torch.arange(8, device=device), reduction=reduction).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_out_of_range_target_inside_compile_gives_nan_not_a_crash():
    """Where no data-dependent check can run (compiled code), the kernel must not touch memory outside
    the row: the bad row's loss is NaN, the others are right."""
    torch._dynamo.reset()
    x = torch.randn(3, 10)
    t = torch.tensor([1, 25, 3])
    loss = torch.compile(lambda x, t: persample.cross_entropy(x, t, reduction="none"), fullgraph=True)(x, t)
    assert torch.isnan(loss[1])
    assert rel_err(loss[[0, 2]], F.cross_entropy(x[[0, 2]].double(), t[[0, 2]], reduction="none")) < 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_large_vocab_crosses_blocks():
    for dtype in (torch.bfloat16, torch.float32):
        check_value_and_grad((16, 40000), dtype, "cuda", "mean", OPTIONS["all"])
        check_value_and_grad((16, 40000), dtype, "cuda", "none", OPTIONS["plain"])


# ---------------------------------------------------------------------------------------------------
# The z-loss under class weights: F.cross_entropy's weighted mean plus the plain mean of the z terms
# (issue 17; Liger-Kernel's tests gave 8.58290599 against 8.57712318 here when the z terms were weighted)
# ---------------------------------------------------------------------------------------------------


def _weighted_with_z(x, target, weight, reduction, z_loss, label_smoothing):
    """The documented semantics spelled out in float64, independently of tests/reference.py."""
    counted = target != -100
    ce = F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    z_rows = z_loss * torch.logsumexp(torch.where(counted[:, None], x, 0.0), -1) ** 2 * counted
    if reduction == "none":
        return ce + z_rows
    if reduction == "sum":
        return ce + z_rows.sum()
    return ce + z_rows.sum() / counted.sum()


def _paths(path, monkeypatch):
    if path == "pytorch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not (CUDA or interpreting()):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    return "cuda" if CUDA and path == "kernel" else "cpu"


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_does_not_depend_on_the_weights_scale(reduction, path, monkeypatch):
    device = _paths(path, monkeypatch)
    logits = torch.randn(7, 37, dtype=torch.float64, device=device) * 3
    target = torch.randint(0, 37, (7,), device=device)
    target[2] = -100
    weight = torch.rand(37, dtype=torch.float64, device=device) + 0.5
    upstream = torch.rand(7 if reduction == "none" else (), dtype=torch.float64, device=device) + 0.5
    opts = dict(z_loss=1e-2, label_smoothing=0.1)
    means = []
    for factor in (1.0, 2.0, 1e-3, 1e4):
        w = weight * factor
        x = logits.clone().requires_grad_()
        ref_x = logits.clone().requires_grad_()
        loss = persample.cross_entropy(x, target, weight=w, reduction=reduction, **opts)  # the training path
        expected = _weighted_with_z(ref_x, target, w, reduction, **opts)
        loss.backward(upstream)
        expected.backward(upstream)
        # (The kernels take the options as float32 scalars: 1e-7, not float64's rounding.)
        assert rel_err(loss, expected) < TOL[torch.float64]
        assert rel_err(x.grad, ref_x.grad) < TOL[torch.float64]
        with torch.no_grad():  # the path of evaluation and transforms
            assert rel_err(persample.cross_entropy(logits, target, weight=w, reduction=reduction, **opts),
                           expected) < TOL[torch.float64]
        value, dlogits = persample.cross_entropy_with_grad(logits, target, weight=w, reduction=reduction, **opts)
        assert rel_err(value, expected) < TOL[torch.float64]
        if reduction != "none":
            assert rel_err(dlogits, ref_x.grad / upstream) < TOL[torch.float64]
        means.append(loss.detach())
    if reduction == "mean":  # scaling every class weight changes nothing
        assert all(rel_err(m, means[0]) < 1e-12 for m in means)


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_z_loss_under_weights_per_example_with_vmap(path, monkeypatch):
    # Each example's mean over its tokens under vmap(grad): the pair of scales is batched with the examples.
    device = _paths(path, monkeypatch)
    B, T, D, V = 3, 4, 5, 23
    inputs = torch.randn(B, T, D, dtype=torch.float64, device=device)
    target = torch.randint(0, V, (B, T), device=device)
    target[1, :3] = -100
    head = torch.randn(V, D, dtype=torch.float64, device=device)
    weight = torch.rand(V, dtype=torch.float64, device=device) + 0.1

    def loss_fn(h, x, t, w):
        return persample.cross_entropy(x @ h.T, t, weight=w, z_loss=0.05)

    for factor in (1.0, 2.0):
        per_example = vmap(grad(loss_fn), in_dims=(None, 0, 0, None))(head, inputs, target, weight * factor)
        for i in range(B):
            h = head.clone().requires_grad_()
            _weighted_with_z(inputs[i] @ h.T, target[i], weight, "mean", 0.05, 0.0).backward()
            assert rel_err(per_example[i], h.grad) < TOL[torch.float64]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pytorch_plain_path_with_a_target_logit_of_minus_inf(reduction, monkeypatch):
    """The plain case's PyTorch path reads the log-sum-exp off the target's log-probability; where that logit is
    -inf it recomputes the row's: the loss is inf and the gradient the finite softmax minus the one-hot."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits = torch.randn(3, 7, dtype=torch.float64)
    target = torch.tensor([2, 5, 0])
    logits[1, 5] = float("-inf")
    rows, dlogits = persample.cross_entropy_with_grad(logits, target)
    assert torch.isinf(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    expected = torch.softmax(logits, -1) - F.one_hot(target, 7)
    torch.testing.assert_close(dlogits, expected)
    x = logits.clone().requires_grad_()
    persample.cross_entropy(x, target, reduction=reduction).sum().backward()
    torch.testing.assert_close(x.grad, expected * (1 / 3 if reduction == "mean" else 1))


def test_pytorch_plain_path_second_backward_and_double_derivative(monkeypatch):
    """retain_graph=True: a second backward gives the same gradient (the saved log-probabilities are not
    overwritten); create_graph=True: the gradient's own derivative raises."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 9, requires_grad=True)
    t = torch.tensor([0, -100, 3, 8])
    loss = persample.cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2) and (g1[1] == 0).all()
    (g,) = torch.autograd.grad(persample.cross_entropy(x, t), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pytorch_plain_path_with_log_probabilities_below_the_subnormal_floor(dtype, monkeypatch):
    """Logits spread over hundreds (as a GPT's are) put many log-probabilities below log(tiny), whose exponentials
    the backward raises to about 3 * tiny instead of computing subnormals: the loss and the gradient stay those of
    float64 autograd, the same row's retained graph gives the same gradient, and nothing is NaN."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits = (torch.randn(6, 50, dtype=torch.float64) * 150).to(dtype)
    target = torch.tensor([0, 7, -100, 49, 3, 3])
    ref = logits.double().requires_grad_()
    F.cross_entropy(ref, target, reduction="sum").backward()
    assert (torch.log_softmax(ref.detach(), -1) < -87.4).float().mean() > 0.3  # the floor is really crossed
    x = logits.clone().requires_grad_()
    loss = persample.cross_entropy(x, target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    (again,) = torch.autograd.grad(loss, x)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    scale = ref.grad.abs().max().item()
    assert torch.isfinite(grad).all() and torch.equal(grad, again)
    assert (grad.double() - ref.grad).abs().max().item() <= tol * scale
    assert abs(loss.item() - F.cross_entropy(ref.detach(), target, reduction="sum").item()) <= tol * abs(loss.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pytorch_with_grad_in_chunks_of_rows(dtype, reduction, monkeypatch):
    """cross_entropy_with_grad on the PyTorch path works on float16/bfloat16 logits one chunk of rows at a time
    (at most CHUNK_NUMEL float32 elements held): chunks of 3 rows, a last one short, an ignored and a -inf target
    logit among them, give the values of one chunk exactly, and those of float64 autograd to the dtype's
    rounding."""
    from persample.loss import _cross_entropy_ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(4)
    V = 37
    logits = (torch.randn(11, V, generator=g, dtype=torch.float64) * 6).to(dtype)
    target = torch.randint(0, V, (11,), generator=g)
    target[4] = -100
    logits[7, target[7]] = float("-inf")
    monkeypatch.setattr(ops, "CHUNK_NUMEL", 3 * V)
    loss, grad = persample.cross_entropy_with_grad(logits, target, reduction=reduction)
    monkeypatch.setattr(ops, "CHUNK_NUMEL", 1 << 30)
    whole_loss, whole_grad = persample.cross_entropy_with_grad(logits, target, reduction=reduction)
    assert torch.equal(loss, whole_loss) and torch.equal(grad, whole_grad) and grad.dtype == dtype
    ref = logits.double().requires_grad_()
    rows = F.cross_entropy(ref, target, reduction="none")  # row 7's loss is inf, its gradient finite
    counted = (target != -100).sum()
    reference = {"none": rows, "mean": rows.sum() / counted, "sum": rows.sum()}[reduction]
    (expected,) = torch.autograd.grad(reference, ref, torch.ones_like(reference))
    assert torch.isinf(loss).any() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(grad.double(), expected, rtol=2e-2, atol=1e-2 / V)
    # One rounding of a float32 result: within one unit in the last place of the dtype (8 bits for bfloat16), which
    # log-probabilities rounded to the dtype first would miss by |log p| units.
    ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    assert ((grad.double() - expected).abs() <= expected.abs() * ulp + 2.0 ** -24).all()
