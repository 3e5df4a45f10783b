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
# # Masked and padded batches: exact zeros, never NaN
#
# Sequences of different lengths are padded to one rectangle `(B, T)` and a boolean `mask` says which
# positions are real. The loss then has three jobs:
#
# 1. padded positions contribute **exactly nothing**: loss 0 and gradient 0, whatever the model wrote
#    into them — including `-inf` (an additive mask) or `NaN` (garbage);
# 2. the mean is taken over the **counted** tokens only, not over `B * T`;
# 3. an example with no counted token at all gives loss 0 and gradient 0, not `0 / 0`.
#
# The usual way of masking — compute the loss everywhere, then zero the padded positions with `where` — gets
# the value right and the gradient wrong. This tutorial shows that with numbers, then shows
# `persample.cross_entropy(..., mask=mask)` doing all three jobs, down to per-example gradients with
# `torch.func`.
#
# It runs the fused Triton kernel itself. On a GPU that is the compiled kernel; on a CPU we switch on
# Triton's interpreter (`TRITON_INTERPRET=1`), which executes the same kernel code in Python — slow, which
# is why every shape below is tiny. It must be set before `persample` (and so Triton) is imported.

# %%
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import matplotlib.pyplot as plt
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import persample

torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 72
device = "cuda" if torch.cuda.is_available() else "cpu"
# float64 so that "equal" below means equal to the last bits, not within float32 rounding.
dtype = torch.float64

# %% [markdown]
# ## A padded batch
#
# Four next-token-prediction examples of lengths 8, 5, 2 and 0 over a vocabulary of 16 tokens, padded to
# `T = 8` with token 0. The empty example is deliberate: ragged batches do produce them (a document
# truncated away, a packed batch with a spare slot).

# %%
V, PAD = 16, 0
lengths = torch.tensor([8, 5, 2, 0], device=device)
B, T = len(lengths), int(lengths.max())
tokens = torch.randint(1, V, (B, T + 1), device=device)
mask = torch.arange(T, device=device) < lengths[:, None]  # (B, T), True where counted
inputs = torch.where(mask, tokens[:, :-1], PAD)            # (B, T)
targets = torch.where(mask, tokens[:, 1:], PAD)            # (B, T): the next token
print(mask.int())

# %% [markdown]
# ## What goes wrong: masking after the fact
#
# Take logits whose padded rows hold `-inf` (what an additive `-inf` mask leaves there) or `NaN` (garbage),
# compute the cross-entropy everywhere, and zero the padded positions with `torch.where`:

# %%
logits = torch.randn(B, T, V, device=device, dtype=dtype)
logits[1, ~mask[1]] = float("-inf")  # example 1: additive -inf mask at its padding
logits[2, ~mask[2]] = float("nan")   # example 2: garbage at its padding


def where_masked_mean(logits, targets, mask):
    """The after-the-fact pattern: loss everywhere, padded positions zeroed, divided by the counted tokens."""
    rows = logits.reshape(-1, logits.shape[-1])
    per_token = F.cross_entropy(rows, targets.reshape(-1), reduction="none").reshape(targets.shape)
    return torch.where(mask, per_token, 0.0).sum() / mask.sum()


x = logits.clone().requires_grad_()
loss = where_masked_mean(x, targets, mask)
loss.backward()
print(f"loss = {loss.item():.6f}  (finite and correct)")
print("rows of d loss / d logits that hold a NaN, per example:")
print(x.grad.isnan().any(-1).int())

# %% [markdown]
# The value is right, but every padded row of the gradient is `NaN`. The reason is in the backward of
# `where`: it sends a cotangent of 0 into the branch it discarded, and the chain rule multiplies that 0 by
# the local derivative of the cross-entropy there, `softmax(logits) - onehot(target)`. For a row of `-inf`,
# `softmax` is `0 / 0`; for a row of `NaN` it is `NaN`; and `0 * NaN = NaN`. A zero cotangent does not
# protect a branch whose own derivative is not finite — the trap behind the classic JAX "double `where`"
# advice and behind NaN gradients reported against masked cross-entropies in Optax.
#
# PyTorch's own `ignore_index` does not help here either: it zeroes the same rows after the log-softmax,
# whose backward then meets the same `0 * NaN`. And a mean over zero counted rows is `0 / 0`:

# %%
x = logits.clone().requires_grad_()
ignored = torch.where(mask, targets, -100)
F.cross_entropy(x.flatten(0, 1), ignored.flatten(), ignore_index=-100).backward()
print("F.cross_entropy(ignore_index): NaN rows per example:", x.grad.isnan().any(-1).sum(-1).tolist())
print("F.cross_entropy of the empty example alone:", F.cross_entropy(logits[3], ignored[3]).item())

# %% [markdown]
# ## persample: the mask is part of the loss
#
# `persample.cross_entropy(logits, targets, mask=mask)` takes the mask itself. The kernel never reads the
# logits of a masked row: their loss is 0 and their gradient is written as exact zeros, so `-inf` and
# `NaN` there cannot leak. `reduction="mean"` divides by the number of counted rows (and gives 0 when there
# are none).

# %%
x = logits.clone().requires_grad_()
loss = persample.cross_entropy(x, targets, mask=mask)
loss.backward()
print(f"loss = {loss.item():.6f}")
print("any NaN in d loss / d logits:", x.grad.isnan().any().item())
print("padded rows exactly zero:    ", torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask])))
print("empty example alone:         ", persample.cross_entropy(logits[3], targets[3], mask=mask[3]).item())

# %% [markdown]
# `persample.cross_entropy_with_grad` returns each token's loss and its gradient from one kernel pass, with
# no autograd involved. Here it is with the batch mean, so it can be compared with the two gradients above:

# %%
loss_pt, dlogits = persample.cross_entropy_with_grad(logits, targets, mask=mask, reduction="mean")
print(f"loss = {loss_pt.item():.6f}, same gradient as through autograd: {torch.equal(dlogits, x.grad)}")

naive = logits.clone().requires_grad_()
where_masked_mean(naive, targets, mask).backward()
panels = {"where-mask after F.cross_entropy": naive.grad, "persample, mask=mask": dlogits}
fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), sharey=True)
cmap = plt.get_cmap("viridis").copy()
cmap.set_bad("red")
vmax = dlogits.norm(dim=-1).max().item()
for ax, (title, g) in zip(axes, panels.items(), strict=True):
    image = ax.imshow(g.norm(dim=-1).cpu(), cmap=cmap, vmin=0, vmax=vmax)
    ax.set(title=title, xlabel="position", xticks=range(T))
axes[0].set(ylabel="example", yticks=range(B))
fig.colorbar(image, ax=axes, label="|d loss / d logits| per token")
plt.show()

# %% [markdown]
# Red is `NaN`. On the right, every padded position is exactly 0 (dark) and every counted one carries
# `(softmax - onehot) / 15`, 15 being the number of counted tokens in the batch.
#
# ## Per-example gradients of a tiny sequence model
#
# Now a model. `TinyLM` embeds the tokens, averages them causally (position `t` sees tokens `0..t` only,
# so padding at the end cannot reach the real positions) and maps each position to vocabulary logits. Like
# an attention mask, its padding mask is **added** to the logits: `-inf` at padded positions.

# %%
class TinyLM(nn.Module):
    """tokens (..., T) -> logits (..., T, V); position t depends on tokens 0..t only."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, mask):
        e = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[-1] + 1, device=e.device, dtype=e.dtype)
        h = torch.tanh(self.hidden(e.cumsum(-2) / steps[:, None]))
        padding = torch.where(mask, 0.0, float("-inf")).to(e.dtype)
        return self.head(h) + padding[..., None]


model = TinyLM(V, 8).to(device, dtype)
params = {name: p.detach() for name, p in model.named_parameters()}


def naive_loss(params, inputs, targets, mask):
    return where_masked_mean(functional_call(model, params, (inputs, mask)), targets, mask)


def persample_loss(params, inputs, targets, mask):
    return persample.cross_entropy(functional_call(model, params, (inputs, mask)), targets, mask=mask)


for loss_fn in (naive_loss, persample_loss):
    g = grad(loss_fn)(params, inputs, targets, mask)
    bad = [name for name, v in g.items() if not v.isfinite().all()]
    print(f"{loss_fn.__name__:15s} batch gradient: non-finite in {bad or 'nothing'}")

# %% [markdown]
# With the after-the-fact mask, the `NaN` rows of `d loss / d logits` flow through the addition into
# `head`, and from there into every parameter: one padded position poisons the whole update. (Had the model
# used `logits.masked_fill(~mask, -inf)` instead, whose backward zeroes the filled positions, the
# parameters would be spared — but anything that consumes `d loss / d logits` directly, such as per-example
# gradient norms computed from activations and logit gradients, would still see the `NaN`.)
#
# Per-example gradients are `vmap(grad(loss))` over the batch, with the parameters shared
# (`in_dims=None`). Each example's loss is the mean over **its own** counted tokens. The after-the-fact
# version fails twice here: examples 1 and 2 through their padded rows, and the empty example 3 through
# its `0 / 0` mean.

# %%
per_example = vmap(grad(persample_loss), in_dims=(None, 0, 0, 0))(params, inputs, targets, mask)
naive_per_example = vmap(grad(naive_loss), in_dims=(None, 0, 0, 0))(params, inputs, targets, mask)
for name, g in per_example.items():
    print(f"{name:13s} {tuple(g.shape)}  naive has NaN in examples "
          f"{naive_per_example[name].isnan().flatten(1).any(1).nonzero().flatten().tolist()}")
print("empty example: every gradient exactly zero:", all(not g[3].any() for g in per_example.values()))

# %% [markdown]
# Two checks that padding contributes **exactly** nothing:
#
# * each example's gradient equals the gradient of that example run **alone, unpadded** (its first
#   `length` positions) — up to float64 rounding, since the sums run over different shapes;
# * overwriting everything at the padded positions (input tokens and targets) leaves the per-example
#   gradients **bit for bit** unchanged: a padded position adds exact zeros.

# %%
for i, n in enumerate(lengths.tolist()):
    if n == 0:
        continue
    alone = grad(persample_loss)(params, inputs[i, :n], targets[i, :n], mask[i, :n])
    diff = max((alone[k] - per_example[k][i]).abs().max().item() for k in alone)
    print(f"example {i} (length {n}): max |padded - alone| = {diff:.1e}")

scrambled_inputs = torch.where(mask, inputs, torch.randint(1, V, inputs.shape, device=device))
scrambled_targets = torch.where(mask, targets, torch.randint(0, V, targets.shape, device=device))
scrambled = vmap(grad(persample_loss), in_dims=(None, 0, 0, 0))(params, scrambled_inputs, scrambled_targets, mask)
print("padding scrambled, per-example gradients bit-identical:",
      all(torch.equal(per_example[k], scrambled[k]) for k in per_example))

# %% [markdown]
# ## Which mean?
#
# "Mean over counted tokens" matters as soon as lengths differ. Dividing by the padded length `T` instead
# shrinks a short example's loss and gradient by `length / T`; for DP-SGD, which clips each example's
# gradient, that silently changes how much each example counts. The batch-level `reduction="mean"` is a
# third, equally legitimate choice — each counted token weighs the same, so long examples weigh more:

# %%
with torch.no_grad():
    token_loss = persample.cross_entropy(model(inputs, mask), targets, mask=mask, reduction="none")  # (B, T)
counted = mask.sum(-1)
own_mean = token_loss.sum(-1) / counted.clamp(min=1)
print("length  mean over own tokens  sum / T  ratio")
for n, m, p in zip(counted.tolist(), own_mean.tolist(), (token_loss.sum(-1) / T).tolist(), strict=True):
    print(f"{n:6d}  {m:19.4f}  {p:7.4f}  {p / m:5.3f}" if n else f"{n:6d}  {m:19.4f}  {p:7.4f}      -")
print(f"batch token mean (reduction='mean'): {persample.cross_entropy(model(inputs, mask), targets, mask=mask):.4f}"
      f" = {token_loss.sum() / counted.sum():.4f};  mean of per-example means: {own_mean[counted > 0].mean():.4f}")

# %% [markdown]
# ## Summary
#
# * Masking a loss **after** computing it on padded positions gives the right value and `NaN` gradients as
#   soon as a padded row is not finite; PyTorch's `ignore_index` has the same problem, and its mean over no
#   counted row is `NaN`.
# * `persample.cross_entropy(..., mask=mask)` (or `ignore_index`) never reads masked rows: loss 0,
#   gradient exactly 0, the mean over counted rows only, and 0 for an empty example — under autograd and
#   under `torch.func` (`grad`, `vmap(grad)`) alike.
# * Per-example gradients of a padded batch equal those of each example alone, and do not change when
#   the padding does.
