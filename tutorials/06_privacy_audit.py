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
# # Auditing DP-SGD: is the claimed ε real?
#
# The accountant turns a run's noise multiplier `σ`, sampling rate `q` and number of steps into a *claim*:
# "this training is `(ε, δ)`-differentially private". The claim is only as good as the code: the noise std
# computed from the wrong quantity, a clip applied after the sum instead of per example — each breaks the
# guarantee while every unit test of the pieces still passes. An **audit** checks the whole path: it runs
# the training with *canaries*, tries to tell from what the training released which canaries were in the
# training set, and turns its success into a **lower bound** on ε that holds with a stated confidence. A
# correct implementation keeps every lower bound below its claim; a bound above the claim is proof (at that
# confidence) of a bug.
#
# This tutorial follows `persample.audit`:
#
# 1. the white-box canaries (Nasr et al. 2023) and how they go through the library's own training path;
# 2. the three bounds and the assumption each one needs, checked on simulated scores;
# 3. an audit of DP-SGD on digits at ε = 2, then a broken run caught;
# 4. claimed against audited ε over several noise multipliers, and the black-box audit beside it.
#
# Everything runs on the CPU with PyTorch's cross-entropy (`TRITON_INTERPRET=0`) on one thread.

# %%
import os
import tempfile
from pathlib import Path

import torch

os.environ["TRITON_INTERPRET"] = "0"
torch.set_num_threads(1)

import matplotlib.pyplot as plt
import numpy as np

import persample
from persample.app.audit import plot as plot_audit
from persample.app.digits import DigitsCNN, digits_split
from persample.audit import (
    CanaryModel,
    audit_dp_sgd,
    clopper_pearson_bound,
    gaussian_bound,
    gdp_epsilon,
    one_run_bound,
)
from persample.audit._canaries import pack

CI = os.environ.get("CI", "").lower() not in ("", "0", "false")  # smaller setting for the test suite
plt.rcParams["figure.dpi"] = 72
delta, max_grad_norm = 1e-5, 1.0
canaries = 2_000 if CI else 20_000
batch_size, epochs = (512, 3) if CI else (2048, 10)
claims = [2.0, 8.0] if CI else [1.0, 2.0, 4.0, 8.0]

# %% [markdown]
# ## 1. White-box canaries
#
# `CanaryModel` wraps the model and adds a parameter block of `m` numbers that the model's forward never
# uses. Canary `j` is an extra training example whose logits are `w_j · s · e_0` (the model's own logits
# multiplied by 0) with target class 0: the real cross-entropy gives it a gradient on `w_j` alone — a
# **Dirac** — ten times the clipping bound, and exactly zero on the model. Ordinary examples keep their
# gradients and never touch the block. Each canary is inserted into the training set with probability
# 1/2. From then on the canaries are examples like any other: Poisson sampling, the per-sample engine,
# clipping to `C`, `DPOptimizer`'s noise and scaling.

# %%
x_train, y_train, x_test, y_test = digits_split()
wrapped = CanaryModel(DigitsCNN(), 4, (1, 8, 8), 10, max_grad_norm=max_grad_norm)
batch = torch.cat([pack(x_train[:1], torch.tensor([4])),            # an ordinary example (id m = 4)
                   pack(torch.zeros(2, 1, 8, 8), torch.tensor([1, 3]))])  # canaries 1 and 3
grads = persample.per_sample_grads(wrapped, batch, torch.tensor([int(y_train[0]), 0, 0]))
print("gradient on the block (rows: examples):\n", grads["canary_block.weight"][:, :4, 0])
print("norms before clipping:", persample.per_sample_norms(grads))
print("canaries' gradient on the model:", max(float(g[1:].abs().max()) for name, g in grads.items()
                                              if name.startswith("model.")))

# %% [markdown]
# After each step the auditor reads the block's noisy gradient. Coordinate `j` holds `N(0, (σC)²)/B`,
# plus `-C/B` when canary `j` was inserted *and* sampled into that batch (probability `q`). Under the
# claimed `σ` and `q`, the most powerful test (Neyman-Pearson) scores each canary by its log-likelihood
# ratio `Σ_t log(1 - q + q·exp(z_t/σ - 1/(2σ²)))`, with `z_t` the coordinate in noise-std units.
#
# ## 2. From scores to bounds
#
# An `(ε, δ)`-DP mechanism bounds every membership test: `1 - FNR ≤ e^ε FPR + δ`. The three bounds read
# the canaries' scores differently:
#
# * **Clopper-Pearson**, `log((1 - δ - FNR_ub) / FPR_ub)` with exact binomial upper bounds on the rates:
#   assumes nothing beyond independent canaries (each has its own coordinate, noise and coin). The
#   threshold is chosen on one half of the canaries and the bound computed on the other, so that picking
#   the best threshold does not overstate it.
# * **Gaussian trade-off**: `μ ≥ Φ⁻¹(1 - FPR_ub) - Φ⁻¹(FNR_ub)`, then the ε of a `μ`-GDP mechanism at δ.
#   Assumes the mechanism's trade-off curve is Gaussian: exact without subsampling, a central-limit
#   approximation with it.
# * **One run** (Steinke, Nasr and Jagielski 2023): guesses on the highest and lowest scores, a binomial
#   test. Assumes only each canary's fair coin; pays `2mδ` in its p-value.
#
# Each holds with probability `confidence` (0.95 here). On simulated scores of a `μ`-GDP mechanism, whose
# true ε is known, none goes above the truth; the Gaussian one comes closest:

# %%
rng = np.random.default_rng(0)
mu = 0.5
inserted = rng.random(canaries) < 0.5
scores = rng.normal(mu * inserted)
print(f"true epsilon of {mu}-GDP at delta={delta:g}: {gdp_epsilon(mu, delta):.3f}")
for bound in (clopper_pearson_bound, gaussian_bound, one_run_bound):
    print(f"  {bound.__name__:22s} >= {bound(scores, inserted, delta=delta).epsilon:.3f}")

# %% [markdown]
# ## 3. Auditing DP-SGD on digits
#
# `audit_dp_sgd` trains the model on the digits plus the canaries with the library's own code, and
# returns the claim (the accountant's ε for the claimed run) beside the bounds. The training set is the
# digits, the inserted canaries and some mislabeled copies of digits (black-box canaries, section 4).

# %%
expected_n = len(y_train) + (canaries + 256) / 2
sample_rate = batch_size / expected_n
steps = round(epochs / sample_rate)


def audit(claim, **kwargs):
    sigma = persample.noise_multiplier_for(claim, delta, sample_rate, steps=steps)
    torch.manual_seed(0)
    return audit_dp_sgd(DigitsCNN(), x_train, y_train, num_canaries=canaries, noise_multiplier=sigma,
                        max_grad_norm=max_grad_norm, sample_rate=sample_rate, steps=steps, delta=delta,
                        engine="fast", black_box_canaries=256, progress=False, **kwargs)


def show(result):
    print(f"sigma {result.noise_multiplier:.3f}, q {result.sample_rate:.3f}, {result.steps} steps: "
          f"claimed epsilon {result.claimed_epsilon:.3f}")
    for name, bound in result.white_box.items():
        print(f"  white-box {name:16s} >= {bound.epsilon:.3f} at confidence {bound.confidence}")


result = audit(2.0)
show(result)

# %% [markdown]
# The scores of inserted canaries sit higher than those of left-out ones; the overlap is the privacy.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
bins = np.linspace(*np.percentile(result.white_box_scores, [0.1, 99.9]), 60)
ax.hist(result.white_box_scores[~result.white_box_inserted], bins, alpha=0.6, label="left out")
ax.hist(result.white_box_scores[result.white_box_inserted], bins, alpha=0.6, label="inserted")
ax.set_xlabel("log-likelihood ratio score")
ax.legend()
plt.show()

# %% [markdown]
# ### A broken run is caught
#
# `dp_optimizer=` swaps the optimizer (a distributed one goes in the same way). Here one that adds half the
# noise it claims: the audit, which scores under the claimed `σ`, lands above the claim.

# %%
def halved_noise(optimizer, named_parameters, *, noise_multiplier, **kwargs):
    return persample.DPOptimizer(optimizer, named_parameters, noise_multiplier=noise_multiplier / 2, **kwargs)


broken = audit(2.0, dp_optimizer=halved_noise)
show(broken)
print("bounds above the claim:", broken.exceeded())

# %% [markdown]
# ## 4. Claimed against audited ε
#
# One audit per claim (the noise multiplier set by the accountant to spend it), as `persample audit` does.
# The black-box audit scores mislabeled copies by their loss under the final model — all an outside
# attacker sees. It shows far less than the white-box one: DP-SGD's guarantee covers the released
# gradients, and the final model of a short run hides most of what they carried.

# %%
results = [result if claim == 2.0 else audit(claim) for claim in claims]
rows = [{"noise_multiplier": r.noise_multiplier, "claimed_epsilon": r.claimed_epsilon, "delta": r.delta,
         **{f"white_box_{name}": b.epsilon for name, b in r.white_box.items()},
         **{f"black_box_{name}": b.epsilon for name, b in r.black_box.items()}} for r in results]
png = Path(tempfile.mkdtemp()) / "audit.png"  # persample audit writes it to --out
plot_audit(rows, png, 0.95)
plt.figure(figsize=(8, 5.2))
plt.imshow(plt.imread(png))
plt.axis("off")
plt.show()
for row in rows:
    print(f"claimed {row['claimed_epsilon']:.2f}: Gaussian-assumption bound {row['white_box_gaussian']:.2f} "
          f"({row['white_box_gaussian'] / row['claimed_epsilon']:.0%}), black-box {row['black_box_gaussian']:.2f}")

# %% [markdown]
# The gap between the claim and the Gaussian bound has three parts: the accountant's own slack (RDP is not
# tight), the confidence (a finite number of canaries), and the central-limit approximation of Poisson
# subsampling. `persample audit --accountant prv` audits the tighter PRV claim.
