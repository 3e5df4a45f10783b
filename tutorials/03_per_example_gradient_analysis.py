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
# # Per-example gradients as a lens: finding mislabelled examples
#
# Per-example gradients are not only for privacy. An example's gradient norm says how hard it pulls on the
# model: examples the model already fits have small ones, examples it cannot fit have large ones — and a
# mislabelled example is one the model *should* not fit. This tutorial
#
# 1. flips 10% of the labels of scikit-learn's handwritten digits,
# 2. trains a small CNN on them for a few epochs,
# 3. ranks the training examples by per-example gradient norm and measures how well that ranking finds the
#    flipped ones (ROC curve and AUC),
# 4. shows what clipping each example's gradient — the first step of DP-SGD — does to the flipped
#    examples' influence, at one checkpoint and over a whole training run.
#
# **The model is tiny, so this tutorial runs on the CPU**, GPU or not. There persample's fused cross-entropy
# runs a PyTorch implementation of the same formulas, unless `TRITON_INTERPRET=1` asks for the Triton kernel
# through Triton's interpreter — exact but far too slow to train with. This tutorial therefore sets
# `TRITON_INTERPRET=0` (the semantics are identical; tutorial 4 runs the kernel itself). It also runs
# PyTorch on a single thread: threads would spend more time waiting for each other than computing (several
# times slower with two, much worse when the cores are busy with other work).

# %%
import os

import torch

os.environ["TRITON_INTERPRET"] = "0"
torch.set_num_threads(1)

import matplotlib.pyplot as plt
import torch.nn.functional as F
from IPython.display import Markdown, display
from sklearn.metrics import roc_auc_score, roc_curve

import persample
from persample.app.digits import NUM_CLASSES, DigitsCNN, digits_split

CI = os.environ.get("CI", "").lower() not in ("", "0", "false")  # smaller setting for the test suite
plt.rcParams["figure.dpi"] = 72
torch.manual_seed(0)

flip_fraction, batch_size, lr, momentum = 0.1, 64, 0.05, 0.9
checkpoint_epoch = 3 if CI else 8  # where the gradient norms are analysed
epochs = 10 if CI else 40          # the longer runs of the last section
max_grad_norm = 1.0                # C, as in tutorial 2 and `persample train`

# %% [markdown]
# ## Digits with 10% of the labels flipped
#
# The data and model of `persample train` (`persample.app.digits`): 1347 training and 450 test digits of 8x8
# pixels, and a small CNN with GroupNorm that returns raw logits. We pick 10% of the training examples at
# random and give each a wrong label, drawn uniformly from the nine other classes. The test set keeps its
# true labels.

# %%
x_train, y_true, x_test, y_test = digits_split()
n = len(y_true)
flips = torch.Generator().manual_seed(0)
flipped = torch.zeros(n, dtype=torch.bool)
flipped[torch.randperm(n, generator=flips)[:round(flip_fraction * n)]] = True
y_train = y_true.clone()  # the labels we train on
offset = torch.randint(1, NUM_CLASSES, (int(flipped.sum()),), generator=flips)
y_train[flipped] = (y_true[flipped] + offset) % NUM_CLASSES
print(f"{int(flipped.sum())} of {n} training labels flipped; every one differs from the true label: "
      f"{bool((y_train[flipped] != y_true[flipped]).all())}")

fig, axes = plt.subplots(1, 10, figsize=(10, 1.5))
for ax, i in zip(axes, flipped.nonzero().flatten()[:10].tolist(), strict=True):
    ax.imshow(x_train[i, 0], cmap="gray_r")
    ax.set_title(f"{y_true[i]} → {y_train[i]}", fontsize=10)
    ax.axis("off")
fig.suptitle("some flipped examples: true label → label given", y=1.05)
plt.show()

# %% [markdown]
# ## Training, ordinary or with clipped per-example gradients
#
# One training function serves the whole tutorial. Without `max_grad_norm` it is ordinary mini-batch SGD
# on the batch-mean loss. With it, every step computes the per-example gradients
# (`persample.per_sample_grads`), clips each to norm `C` and sums them (`persample.clip_per_sample`), and
# divides by the batch size: DP-SGD's clipping without its noise (so, no privacy — this isolates what
# clipping does). It yields the model after every epoch, so the same run can be inspected along the way.

# %%
def train(epochs, max_grad_norm=None, seed=0):
    """Yields (epoch, model) after each epoch of training on the flipped labels."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(n, generator=shuffle).split(batch_size):
            optimizer.zero_grad()
            if max_grad_norm is None:
                persample.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            else:
                grads = persample.per_sample_grads(model, x_train[idx], y_train[idx])
                summed = persample.clip_per_sample(grads, max_grad_norm)
                for name, p in model.named_parameters():
                    p.grad = summed[name] / len(idx)
            optimizer.step()
        yield epoch, model


def test_accuracy(model):
    with torch.no_grad():
        return (model(x_test).argmax(-1) == y_test).float().mean().item()


*_, (epoch, model) = train(checkpoint_epoch)  # run to the last epoch
print(f"after {epoch} epochs: test accuracy {test_accuracy(model):.3f}")

# %% [markdown]
# ## Ranking the training set by gradient norm
#
# At this checkpoint we compute every training example's gradient of its own loss (with its possibly wrong
# label) and its norm over all parameters: `(1347, 6186)` numbers, a fraction of a second on a CPU. This is
# the quantity DP-SGD clips. The loss of each example is the classic signal for this task; we compute it
# too, for comparison.

# %%
grads = persample.per_sample_grads(model, x_train, y_train)  # {name: (n, *param.shape)}
norms = persample.per_sample_norms(grads)                     # (n,)
with torch.no_grad():
    losses = persample.cross_entropy(model(x_train), y_train, reduction="none")

k = int(flipped.sum())
auc = roc_auc_score(flipped, norms)
top_k = flipped[norms.topk(k).indices].float().mean().item()
display(Markdown("\n".join([
    f"Detecting the {k} flipped labels among {n} examples after {checkpoint_epoch} epochs:", "",
    "| score | ROC AUC | flipped among the top k |", "|---|---|---|",
    f"| per-example gradient norm | **{auc:.3f}** | {top_k:.1%} |",
    f"| per-example loss | {roc_auc_score(flipped, losses):.3f} | "
    f"{flipped[losses.topk(k).indices].float().mean():.1%} |"])))

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
false_positive, true_positive, _ = roc_curve(flipped, norms)
left.plot(false_positive, true_positive, label=f"gradient norm, AUC = {auc:.3f}")
left.plot([0, 1], [0, 1], "k:", label="chance")
left.set(xlabel="false-positive rate (clean examples flagged)", ylabel="true-positive rate (flipped found)",
         title="flipped-label detection by gradient norm")
left.legend(loc="lower right", fontsize=9)
bins = torch.logspace(norms.min().log10().item(), norms.max().log10().item(), 40)
right.hist(norms[~flipped], bins=bins, alpha=0.6, label=f"clean ({n - k})")
right.hist(norms[flipped], bins=bins, alpha=0.6, label=f"flipped ({k})")
right.axvline(max_grad_norm, color="black", linestyle="--", label=f"max_grad_norm C = {max_grad_norm:g}")
right.set(xscale="log", xlabel="per-example gradient norm", ylabel="examples", title="gradient norms")
right.legend(fontsize=9, loc="upper left")
plt.show()

# %% [markdown]
# The flipped examples stand apart by an order of magnitude: after a few epochs the model has learnt the
# digits from the 90% of consistent labels, so it confidently predicts the *true* class of a flipped
# example, and that example's loss and gradient are large. The gradient norm and the loss rank the examples
# almost identically: with cross-entropy the gradient with respect to the logits is
# `softmax(logits) - onehot(label)`, whose size grows with the loss, and every parameter's gradient is that
# vector pushed back through the network.
#
# The clean examples that rank highest are digits the model gets wrong, several of them hard to read for a
# person too:

# %%
with torch.no_grad():
    predicted = model(x_train).argmax(-1)
clean_ranked = [i for i in norms.argsort(descending=True).tolist() if not flipped[i]][:10]
fig, axes = plt.subplots(1, 10, figsize=(10, 1.5))
for ax, i in zip(axes, clean_ranked, strict=True):
    ax.imshow(x_train[i, 0], cmap="gray_r")
    ax.set_title(f"{y_train[i]}, says {predicted[i]}", fontsize=9)
    ax.axis("off")
fig.suptitle("clean examples with the largest gradient norms: label, prediction", y=1.05)
plt.show()

# %% [markdown]
# ## What clipping does to them
#
# DP-SGD clips every example's gradient to norm at most `C` before summing: an example's influence on the
# step is capped, whoever it is. With `C = 1`, how much of the summed gradient comes from the 10% of flipped
# examples, before and after clipping?

# %%
flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)      # (n, parameters)
clipped = flat * persample.clip_factors(norms, max_grad_norm)[:, None]


def share_of_flipped(per_example):
    """The flipped examples' part of the summed per-example gradient norms."""
    sizes = per_example.norm(dim=1)
    return (sizes[flipped].sum() / sizes.sum()).item()


def cosine_to_clean(per_example):
    """Cosine between the gradient summed over every example and the one summed over clean examples only."""
    return F.cosine_similarity(per_example.sum(0), per_example[~flipped].sum(0), dim=0).item()


rows = [f"C = {max_grad_norm:g}, checkpoint after {checkpoint_epoch} epochs", "",
        "| | clean | flipped |", "|---|---|---|",
        f"| examples | {n - k} ({1 - k / n:.0%}) | {k} ({k / n:.0%}) |",
        f"| median gradient norm | {norms[~flipped].median():.2f} | {norms[flipped].median():.2f} |",
        f"| fraction clipped | {(norms[~flipped] > max_grad_norm).float().mean():.1%} | "
        f"{(norms[flipped] > max_grad_norm).float().mean():.1%} |",
        "", "| | before clipping | after clipping |", "|---|---|---|",
        f"| flipped examples' share of the summed norms | {share_of_flipped(flat):.1%} | "
        f"{share_of_flipped(clipped):.1%} |",
        f"| cosine of the summed gradient with the clean-only one | {cosine_to_clean(flat):.3f} | "
        f"{cosine_to_clean(clipped):.3f} |"]
display(Markdown("\n".join(rows)))

# %% [markdown]
# Before clipping, one example in ten supplies close to half of the gradient's mass and turns the summed
# gradient away from the direction the clean examples agree on. Clipping caps every example at `C`;
# the flipped ones, all far above it, are cut the most, and their share drops to near their share of the
# data. The smaller `C`, the more examples are clipped and the closer each one's voice is to equal:

# %%
bounds = torch.logspace(-1.5, 2, 30)
shares = [share_of_flipped(flat * persample.clip_factors(norms, c.item())[:, None]) for c in bounds]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(bounds, shares, label="after clipping at C")
ax.axhline(share_of_flipped(flat), color="C1", linestyle="--", label="no clipping")
ax.axhline(k / n, color="black", linestyle=":", label="share of the examples")
ax.axvline(max_grad_norm, color="gray", linewidth=0.8)
ax.set(xscale="log", xlabel="max_grad_norm C", ylabel="flipped share of summed norms", ylim=(0, None),
       title="the flipped examples' voice in the summed gradient")
ax.legend(fontsize=9)
plt.show()

# %% [markdown]
# ## Over a whole run: memorising the flipped labels, or not
#
# A checkpoint is a snapshot; what matters is what the model ends up learning. Trained long enough, an
# ordinary network memorises its flipped labels — it learns to answer "3" for that one "7" — and as it does,
# their gradients shrink and the norm stops singling them out. We train twice from the same start on the
# same batches, ordinarily and with clipping at `C = 1`, and follow three things per epoch: the test
# accuracy (true labels), the fraction of flipped training examples the model predicts with their *flipped*
# label, and the AUC of the gradient norm as a detector.

# %%
def measure(model):
    norms = persample.per_sample_grad_norms(model, x_train, y_train)
    with torch.no_grad():
        predicted = model(x_train).argmax(-1)
    return {"test accuracy": test_accuracy(model),
            "flipped labels memorised": (predicted[flipped] == y_train[flipped]).float().mean().item(),
            "AUC of the gradient norm": roc_auc_score(flipped, norms),
            "clean clipped": (norms[~flipped] > max_grad_norm).float().mean().item(),
            "flipped clipped": (norms[flipped] > max_grad_norm).float().mean().item()}


history = {label: [measure(model) for _, model in train(epochs, bound)]
           for label, bound in [("ordinary", None), (f"clipped at C = {max_grad_norm:g}", max_grad_norm)]}

shown = ["test accuracy", "flipped labels memorised", "AUC of the gradient norm"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for ax, key in zip(axes, shown, strict=True):
    for label, rows in history.items():
        ax.plot(range(1, epochs + 1), [row[key] for row in rows], label=label)
    ax.axvline(checkpoint_epoch, color="gray", linewidth=0.8)
    ax.set(xlabel="epoch", title=key)
axes[0].legend(fontsize=9)
plt.show()

rows = [f"after {epochs} epochs", "", "| training | " + " | ".join(history[next(iter(history))][-1]) + " |",
        "|---|" + "---|" * len(history[next(iter(history))][-1])]
rows += [f"| {label} | " + " | ".join(f"{value:.3f}" for value in runs[-1].values()) + " |"
         for label, runs in history.items()]
display(Markdown("\n".join(rows)))

# %% [markdown]
# The ordinary run fits the clean examples first (the gray line marks the checkpoint analysed above), then
# spends its later epochs memorising the flipped labels: their gradients shrink, the detector's AUC falls,
# and the test accuracy drops as the model bends to fit noise. With clipping, the flipped examples stay
# clipped for the whole run while the clean ones fall below `C` as they are learnt — clipping becomes
# selective — and the model never memorises the flipped labels; it ends both more accurate and still able
# to point at them. (Clipping also shrinks the steps early on, when nearly every example is above `C`, which
# is why the clipped run starts slower.)
#
# ## Summary
#
# * `persample.per_sample_grads` + `persample.per_sample_norms` (or `persample.per_sample_grad_norms`) give
#   every example's gradient norm; ranked, they find mislabelled examples about as well as the loss does.
# * Detection works best once the model has learnt the clean examples and before it memorises the noisy
#   ones.
# * Clipping per-example gradients (`persample.clip_per_sample`) caps the influence of exactly those
#   examples: at a checkpoint, the flipped examples' share of the gradient drops towards their share of
#   the data, and over a run, the model does not memorise them. DP-SGD gets this robustness with its
#   clipping; its noise (tutorial 2) is what buys the privacy guarantee.
