# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Per-sample gradients, corrected
#
# A per-sample gradient is the gradient of **one example's** loss, for every example of a batch: what
# DP-SGD clips and what example-level analyses rank. This tutorial retells the PyTorch per-sample-gradients
# tutorial (`torch.func`: `functional_call`, `grad`, `vmap`) with three corrections:
#
# 1. the model returns **raw logits** and the loss is `F.cross_entropy` on them;
# 2. an honest account of the softmax variants found in earlier versions of that tutorial and in the wild —
#    which of them change the per-sample gradients and which do not, with numbers;
# 3. the same per-sample gradients computed four ways (a Python loop, `vmap(grad)` with
#    `F.cross_entropy`, `vmap(grad)` with `persample.cross_entropy`, and persample's pipeline), checked
#    against each other and timed.
#
# **On a CPU** persample's fused cross-entropy runs a PyTorch implementation of the same formulas, unless
# `TRITON_INTERPRET=1` asks for the Triton kernel through Triton's interpreter — exact but far too slow to
# time anything. This tutorial therefore sets `TRITON_INTERPRET=0` on a CPU (the semantics are identical;
# tutorial 4 runs the kernel itself). On a GPU the Triton kernel runs either way.

# %%
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"

import matplotlib.pyplot as plt
import torch.nn.functional as F
from IPython.display import Markdown, display
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.func import functional_call, grad, vmap

import persample

CI = os.environ.get("CI", "").lower() not in ("", "0", "false")  # smaller setting for the test suite
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 72
device = "cuda" if torch.cuda.is_available() else "cpu"
batch_size, epochs, repeats = (16, 2, 2) if CI else (64, 10, 20)

# %% [markdown]
# ## Data and a model that returns raw logits
#
# scikit-learn's handwritten digits: 1797 grey-scale 8x8 images of 0-9, shipped with the package. The
# model ends in a linear layer and returns its output as is: **no `softmax` or `log_softmax` in
# `forward`**. The loss does the normalisation, once.

# %%
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
labels = torch.tensor(digits.target)
x_train, x_test, y_train, y_test = (
    t.to(device) for t in train_test_split(images, labels, test_size=0.25, random_state=0))


class SmallCNN(nn.Module):
    """images (B, 1, 8, 8) -> raw logits (B, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


model = SmallCNN().to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(epochs):
    for idx in torch.randperm(len(x_train), device=device).split(64):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
with torch.no_grad():
    accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
print(f"test accuracy after {epochs} epochs: {accuracy:.3f}")

# %% [markdown]
# ## What the loss must see
#
# For raw logits `z` and target `y`, `F.cross_entropy(z, y) = -log_softmax(z)[y] = logsumexp(z) - z[y]`,
# and its gradient with respect to the logits is
#
# $$\frac{\partial \ell}{\partial z} = \mathrm{softmax}(z) - \mathrm{onehot}(y),$$
#
# which vanishes as the model grows confident and correct. Every per-sample gradient of the parameters is
# this vector pushed back through the network. So the question for each way of writing model + loss is
# simply: does the composition still compute this?
#
# Five ways, all as `head(model output)` followed by a loss:
#
# | | model ends with | loss | where it comes from |
# |---|---|---|---|
# | A | raw logits | `F.cross_entropy` | this tutorial |
# | B | `log_softmax` | `F.nll_loss` | the current PyTorch tutorial |
# | C | `log_softmax` | `F.cross_entropy` | "double log-softmax", a common worry |
# | D | raw logits | `F.nll_loss` | the functorch-era notebook: `output = F.log_softmax(x); output = x` |
# | E | `softmax` | `F.cross_entropy` | probabilities fed to a loss that expects logits |
#
# We compare their per-sample gradients in float64, so that any difference is the formula's and not
# rounding. "Error" is the largest per-example distance to A's gradient, relative to the largest
# per-example norm of A's gradients in the batch.

# %%
x, y = x_train[:batch_size], y_train[:batch_size]
model64 = SmallCNN().to(device, torch.float64)
model64.load_state_dict(model.state_dict())
params64 = {name: p.detach().double() for name, p in model.named_parameters()}

variants = {
    "A  logits -> cross_entropy": (lambda z: z, F.cross_entropy),
    "B  log_softmax -> nll_loss": (lambda z: F.log_softmax(z, -1), F.nll_loss),
    "C  log_softmax -> cross_entropy": (lambda z: F.log_softmax(z, -1), F.cross_entropy),
    "D  logits -> nll_loss": (lambda z: z, F.nll_loss),
    "E  softmax -> cross_entropy": (lambda z: F.softmax(z, -1), F.cross_entropy),
}


def per_sample_grads_of(head, loss_fn, params, inputs, targets, module):
    """vmap(grad) of one example's loss: a dict of (B, *param.shape) per parameter."""
    def loss_of_one(params, xi, yi):
        return loss_fn(head(functional_call(module, params, (xi[None],))), yi[None])
    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)


def flat(grads):
    """(B, number of parameters): all of an example's gradients as one vector."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def error(g, reference):
    """Largest per-example |g_i - reference_i|, relative to the largest per-example |reference_i|. (Relative
    to each example's own norm would blow up rounding noise: a confidently right example has a tiny one.)"""
    return ((g - reference).norm(dim=1).max() / reference.norm(dim=1).max()).item()


flat_grads = {name: flat(per_sample_grads_of(*v, params64, x.double(), y, model64)) for name, v in variants.items()}
reference = flat_grads["A  logits -> cross_entropy"]
rows = ["| variant | error vs A | median of norm / norm of A | smallest cosine with A |", "|---|---|---|---|"]
for name, g in flat_grads.items():
    ratio = (g.norm(dim=1) / reference.norm(dim=1)).median().item()
    cosine = F.cosine_similarity(g, reference, dim=1).min().item()
    rows.append(f"| {name} | {error(g, reference):.1e} | {ratio:.3g} | {cosine:.3f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# **B and C are correct.** B is cross-entropy written in two steps. C — log-softmax in the model and
# again in the loss — gives the same per-sample gradients to float64 rounding, and that is not luck:
#
# * values: `log_softmax(z) = z - logsumexp(z)`, and the `logsumexp` of log-probabilities is
#   `log(sum of probabilities) = log 1 = 0`, so a second `log_softmax` returns its input unchanged;
# * gradients: the Jacobian of `log_softmax` is `J = I - 1 pᵀ` (`p = softmax(z)`), and since `pᵀ1 = 1`,
#   `J J = I - 2·1pᵀ + 1(pᵀ1)pᵀ = J`. Applying it twice is applying it once.
#
# C costs an extra pass over the logits and nothing else. In float32 the two differ by rounding only:

# %%
params32 = {name: p.detach() for name, p in model.named_parameters()}
once = flat(per_sample_grads_of(lambda z: z, F.cross_entropy, params32, x, y, model))
twice = flat(per_sample_grads_of(lambda z: F.log_softmax(z, -1), F.cross_entropy, params32, x, y, model))
print(f"float32, C vs A:                   error {error(twice, once):.1e}")
print(f"float32, A vs the float64 reference: error {error(once.double(), reference):.1e}")

# %% [markdown]
# **D and E are wrong**, and they are where the real bug of earlier versions lies.
#
# * **D** is what the functorch-era notebook computed: its `forward` assigned `output = F.log_softmax(x)`
#   and then overwrote it with `output = x`, so `F.nll_loss` received raw logits. `nll_loss(z, y) = -z[y]`:
#   its gradient is `-onehot(y)` for every example, whatever the model predicts. Nothing pushes the wrong
#   classes down, the loss is unbounded below, and the per-sample gradient **never shrinks** for an example
#   the model already gets right.
# * **E** feeds probabilities where logits are expected. They lie in `[0, 1]`, so the loss cannot go below
#   `log(1 + 9/e) ≈ 1.46`, and each example's gradient is rescaled by a factor of its own (the extra
#   softmax Jacobian): the direction barely changes here, the relative sizes do.
#
# The plot shows what that does to the quantity DP-SGD clips and per-example analyses rank: the per-sample
# gradient norm, against how wrong the model is about the example (`1 - p`, `p` its softmax probability
# for the true class).

# %%
with torch.no_grad():
    p_true = F.softmax(model64(x.double()), -1).gather(1, y[:, None]).squeeze(1).cpu()
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, marker in [("A  logits -> cross_entropy", "o"), ("D  logits -> nll_loss", "x"),
                     ("E  softmax -> cross_entropy", "^")]:
    ax.scatter((1 - p_true).clamp(min=1e-16), flat_grads[name].norm(dim=1).cpu(), marker=marker, label=name,
               alpha=0.7)
ax.set(xlabel="1 - p(true class)", ylabel="per-sample gradient norm", xscale="log", yscale="log",
       title="Per-sample gradient norms, same model, same batch")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# With raw logits and cross-entropy (A), the norm falls with `1 - p`: confidently right examples have tiny
# gradients, doubtful ones large — the signal that clipping and example ranking rely on. D gives every
# example about the same norm, right or wrong; E follows A's trend but shrinks the largest gradients, those
# of the examples the model gets wrong.
#
# ### Where a second log-softmax does matter
#
# C is harmless because everything `F.cross_entropy` computes (label smoothing included) depends on the
# logits only through `log_softmax`, which does not change when a constant is added to every logit.
# persample's `z_loss` and `softcap` are deliberately *not* shift-invariant: `z_loss` penalises
# `logsumexp(logits)²`, which is exactly 0 for log-probabilities, and `softcap` caps the values it is
# given. Feed them log-probabilities and they silently do something else:

# %%
z = 3 * torch.randn(8, 10, dtype=torch.float64)
t = torch.randint(0, 10, (8,))
print("option                on logits   on log_softmax(logits)   max |gradient difference|")
for option in ({"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"softcap": 2.0}):
    results = []
    for head in (lambda v: v, lambda v: F.log_softmax(v, -1)):
        zz = z.clone().requires_grad_()
        loss = persample.cross_entropy(head(zz), t, **option)
        results.append((loss.item(), torch.autograd.grad(loss, zz)[0]))
    (key, value), = option.items()
    print(f"{key + '=' + str(value):20s}  {results[0][0]:9.4f}   {results[1][0]:22.4f}   "
          f"{(results[0][1] - results[1][1]).abs().max():.1e}")

# %% [markdown]
# ## Per-sample gradients four ways
#
# From here on: model A, float32, the trained parameters. Each method returns a dict
# `{parameter name: (B, *parameter shape)}`.
#
# **1. A Python loop**: one forward and one backward per example. Correct, simple, slow.

# %%
def loop_per_sample_grads(model, inputs, targets):
    grads = []
    for xi, yi in zip(inputs, targets, strict=True):
        loss = F.cross_entropy(model(xi[None]), yi[None])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    names = [name for name, _ in model.named_parameters()]
    return {name: torch.stack(g) for name, g in zip(names, zip(*grads, strict=True), strict=True)}


# %% [markdown]
# **2. `vmap(grad)`** — write the loss of **one** example as a function of the parameters
# (`functional_call` runs the module with the parameters we pass), take its gradient with `grad`, and
# `vmap` that over the batch. `in_dims=(None, 0, 0)`: the parameters are shared, the inputs and targets are
# mapped over their first dimension. `F.cross_entropy` and `persample.cross_entropy` are interchangeable
# here; the fused one also gives exact zeros for ignored or masked rows (tutorial 4).

# %%
def vmap_per_sample_grads(model, inputs, targets, loss_fn=F.cross_entropy):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params, xi, yi):
        return loss_fn(functional_call(model, params, (xi[None],)), yi[None])

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)


def max_difference(a, b):
    """Largest |a - b| over all parameters, relative to the largest |a|."""
    return max((a[k] - b[k]).abs().max().item() for k in a) / max(a[k].abs().max().item() for k in a)


methods = {
    "loop, F.cross_entropy": lambda: loop_per_sample_grads(model, x, y),
    "vmap(grad), F.cross_entropy": lambda: vmap_per_sample_grads(model, x, y),
    "vmap(grad), persample.cross_entropy": lambda: vmap_per_sample_grads(model, x, y, persample.cross_entropy),
}
loop_grads = methods["loop, F.cross_entropy"]()
for name, method in methods.items():
    print(f"{name:38s} max relative difference to the loop: {max_difference(loop_grads, method()):.1e}")

# %% [markdown]
# ## The persample pipeline
#
# `persample.per_sample_grads(model, inputs, targets)` is the `vmap(grad)` recipe above packaged: it
# builds the one-example loss (by default `persample.cross_entropy`), maps it over the batch and returns
# the same dict. `chunk_size` bounds memory by mapping over the batch in chunks.

# %%
pipeline_grads = persample.per_sample_grads(model, x, y)
print(f"max relative difference to the loop: {max_difference(loop_grads, pipeline_grads):.1e}")
chunked = persample.per_sample_grads(model, x, y, chunk_size=4)
print(f"chunk_size=4, max relative difference to the loop: {max_difference(loop_grads, chunked):.1e}")
methods["persample.per_sample_grads"] = lambda: persample.per_sample_grads(model, x, y)

# %% [markdown]
# ## The fast engine: norms without the gradients
#
# Clipping needs each example's gradient **norm** before it needs the gradients. The fast engine computes
# the norms from each layer's activations and output gradients, without materialising `(B, *shape)` per
# parameter (`persample.GhostClipping`). Here we check its norms, and the clipped sum it forms in the same
# backward, against those of the materialised gradients above.

# %%
engine = persample.GhostClipping(model, max_grad_norm=1.0)
norms = engine.per_sample_grad_norms(x, y)
exact = flat(loop_grads).norm(dim=1)
difference = ((norms - exact).abs().max() / exact.max()).item()
print(f"largest norm difference, relative to the largest norm: {difference:.1e}")
clipped = engine.clipped_grad_sum(x, y).grads
reference = persample.clip_per_sample(loop_grads, 1.0)
print(f"clipped sum, max relative difference to the loop's: {max_difference(reference, clipped):.1e}")
methods["persample.GhostClipping (norms only)"] = lambda: engine.per_sample_grad_norms(x, y)
methods["persample.GhostClipping (clipped sum)"] = lambda: engine.clipped_grad_sum(x, y)

# %% [markdown]
# ## Timing
#
# Wall-clock time per batch, the best of several runs after a warm-up (the least disturbed by whatever
# else the machine was doing), on the machine that executed this notebook (named in the table). For
# scale, the first row is one ordinary backward of the batch-mean loss — one gradient, not `B` of them.
#
# Read it for this small CNN on a CPU only. Here the logits are `(1, 10)` per example, so the
# cross-entropy is a negligible part of the work and the fused op's fixed cost per call (custom-op
# dispatch under `vmap`, argument checks) shows instead; the fused kernel pays off on a GPU with a
# language-model vocabulary, where the logits dominate memory and time (see `benchmarks/`).


# %%
def batch_gradient():
    return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))


def best_seconds(fn):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


timed = {"one batch gradient (reference)": batch_gradient, **methods}
seconds = {name: best_seconds(fn) for name, fn in timed.items()}
loop_time = seconds["loop, F.cross_entropy"]
where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
rows = [f"**{where}**, batch of {batch_size} digits, float32, torch {torch.__version__}", "",
        "| method | ms per batch | speed-up over the loop |", "|---|---|---|"]
rows += [f"| {name} | {1e3 * s:.2f} | {loop_time / s:.1f}x |" for name, s in seconds.items()]
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## Summary
#
# * Give the loss **raw logits**. `log_softmax` in the model followed by `F.nll_loss` or even
#   `F.cross_entropy` is mathematically the same loss with the same per-sample gradients; raw logits into
#   `F.nll_loss` (the functorch-era notebook) or probabilities into `F.cross_entropy` are not, and they
#   distort exactly the per-sample gradient norms that clipping and example analysis use.
# * Options that are not shift-invariant (`z_loss`, `softcap`) need raw logits to mean anything.
# * A loop, `vmap(grad)` with `functional_call`, and persample's fused cross-entropy inside `vmap(grad)`
#   give the same per-sample gradients; `vmap` is the fast one.
