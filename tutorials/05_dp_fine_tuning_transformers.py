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
# # DP fine-tuning of a (tiny) transformers model
#
# The common way to use DP-SGD on language models is to pretrain on public data without privacy, then
# **fine-tune on the private data with DP-SGD**: the model arrives knowing most of what it needs, so the
# private phase is short and the noise it must absorb is small. This tutorial walks through that with a
# Hugging Face `LlamaForCausalLM`, built from a config with random weights — nothing is downloaded — and
# small enough to train on a CPU in seconds:
#
# 1. swap the model's loss for persample's fused cross-entropy (`apply_fused_loss`),
# 2. pretrain it on a public task,
# 3. compute **per-sequence** gradients with `torch.func` (`functional_call` + `vmap(grad)`) over
#    `per_sequence_loss`, and check them against `persample.per_sample_grads`,
# 4. fine-tune on the private task with clipping, noise (`persample.DPOptimizer`) and a target `ε`, next to
#    the same fine-tuning without privacy and DP-SGD from scratch.
#
# **On a CPU** persample's fused cross-entropy runs a PyTorch implementation of the same formulas, unless
# `TRITON_INTERPRET=1` asks for the Triton kernel through Triton's interpreter — exact but far too slow to
# train with. This tutorial therefore sets `TRITON_INTERPRET=0` on a CPU (the semantics are identical;
# tutorial 4 runs the kernel itself). On a GPU the Triton kernel runs either way. It also runs PyTorch on a
# single CPU thread: the model is so small that threads spend more time waiting for each other than
# computing (several times slower with two, much worse when the cores are busy with other work).

# %%
import copy
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)

import warnings

import matplotlib.pyplot as plt
from tqdm import TqdmWarning

warnings.filterwarnings("ignore", category=TqdmWarning)  # transformers' progress bars (unused) want ipywidgets
import transformers
from IPython.display import Markdown, display
from torch import nn
from torch.func import functional_call, grad, vmap

import persample
from persample.integrations.transformers import apply_fused_loss, per_sequence_loss

CI = os.environ.get("CI", "").lower() not in ("", "0", "false")  # smaller setting for the test suite
plt.rcParams["figure.dpi"] = 72
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"

pretrain_steps, fine_tune_steps, eval_every = (40, 40, 10) if CI else (200, 300, 20)
batch_size, lr = 64, 3e-3
target_epsilons, delta, max_grad_norm = [8.0, 1.0], 1e-5, 1.0

# %% [markdown]
# ## Two tasks: public and private
#
# Each sequence counts modulo 32 from a random start with a fixed step: `x_t = (x_0 + t·step) mod 32`,
# 12 tokens long. The **public** sequences use steps 1 and 2, the **private** ones steps 3 and 5. To continue
# a sequence the model has to find the step from the last two tokens and add it — a job for attention. Only
# the second token cannot be predicted (it reveals which of the two steps it is); every later one is
# determined, so the best possible mean loss per token is `log(2) / 11 ≈ 0.063`.

# %%
VOCAB, LENGTH = 32, 12


def counting_sequences(num, steps, generator):
    """(num, LENGTH) int64: x_t = (x_0 + t * step) % VOCAB, x_0 uniform, step drawn from ``steps``."""
    start = torch.randint(0, VOCAB, (num, 1), generator=generator)
    step = torch.tensor(steps)[torch.randint(0, len(steps), (num, 1), generator=generator)]
    return (start + step * torch.arange(LENGTH)) % VOCAB


draw = torch.Generator().manual_seed(0)
public = counting_sequences(5000, [1, 2], draw).to(device)
private = counting_sequences(2000, [3, 5], draw).to(device)
private_test = counting_sequences(500, [3, 5], draw).to(device)  # held out, to measure the fine-tuning
best_loss = math.log(2) / (LENGTH - 1)
print("public: ", *public[:2].tolist(), sep="\n  ")
print("private:", *private[:2].tolist(), sep="\n  ")

# %% [markdown]
# ## A tiny Llama from a config, with the fused loss
#
# Two layers, hidden size 64: about 86 thousand parameters. `attn_implementation="eager"` computes attention
# with plain matrix products and a softmax, which `torch.func.vmap` batches over examples; PyTorch's fused
# `scaled_dot_product_attention` has no batching rule on a CPU, and `vmap` would fall back to a slow loop
# over the examples.
#
# Since transformers 4.46 a model computes its loss through `self.loss_function`, not through a
# `CrossEntropyLoss` module, so that is what `apply_fused_loss` replaces: `model(input_ids, labels=...)`
# then computes the same loss — labels shifted, `-100` ignored — with `persample.cross_entropy`. It returns
# a handle whose `remove()` undoes it.

# %%
config = transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=LENGTH, attn_implementation="eager")
torch.manual_seed(0)
random_init = transformers.LlamaForCausalLM(config).to(device)
print(f"{sum(p.numel() for p in random_init.parameters())} parameters")

batch = public[:8]
with torch.no_grad():
    original = random_init(batch, labels=batch).loss
handle = apply_fused_loss(random_init)
with torch.no_grad():
    fused = random_init(batch, labels=batch).loss
print(f"loss with transformers' ForCausalLMLoss {original.item():.6f}, with the fused loss {fused.item():.6f}")


def evaluate(model):
    """Mean loss per token on the held-out private sequences, and the accuracy on the determined tokens."""
    with torch.no_grad():
        output = model(private_test, labels=private_test)
    # Position t predicts token t + 1; from token 2 on (0-based), the next token is determined.
    correct = output.logits[:, 1:-1].argmax(-1) == private_test[:, 2:]
    return output.loss.item(), correct.float().mean().item()


# %% [markdown]
# ## Pretraining on the public task
#
# Ordinary training, no privacy: the public data can be used freely. The loss is the model's own, now
# fused (a deep copy of the model keeps the fused loss). Every fine-tuning run below starts from a copy of
# the pretrained model.

# %%
def train_step(model, optimizer, sequences):
    optimizer.zero_grad()
    model(sequences, labels=sequences).loss.backward()
    optimizer.step()


pretrained = copy.deepcopy(random_init)
optimizer = torch.optim.Adam(pretrained.parameters(), lr=lr)
order = torch.Generator().manual_seed(0)
for _ in range(pretrain_steps):
    train_step(pretrained, optimizer, public[torch.randint(0, len(public), (batch_size,), generator=order)])
with torch.no_grad():
    public_loss = pretrained(public[:500], labels=public[:500]).loss.item()
print(f"after {pretrain_steps} steps: loss on public sequences {public_loss:.3f}")
for name, model in [("random init", random_init), ("pretrained", pretrained)]:
    loss, accuracy = evaluate(model)
    print(f"{name:12s} held-out private loss {loss:.3f}, accuracy on determined tokens {accuracy:.1%}")

# %% [markdown]
# The pretrained model has learnt the public task and is confidently wrong on the private one: it predicts
# steps of 1 or 2, so its private loss is far *above* that of the random model. What it has learnt is
# the mechanism — look at the last two tokens, extend the pattern — and that is what fine-tuning can reuse.
#
# ## Per-sequence gradients with torch.func
#
# DP-SGD's unit of privacy here is one sequence, so it needs each sequence's gradient of its own loss.
# `per_sequence_loss(logits, labels)` gives one loss per sequence — the mean over its counted tokens, with
# the causal shift — computed with the fused cross-entropy. The recipe is the one of the `torch.func` docs:
# write the loss of **one** sequence as a function of the parameters (`functional_call` runs the model with
# the parameters we pass), take `grad`, and `vmap` it over the batch, the parameters shared.

# %%
def per_sequence_grads(model, sequences):
    """{name: (B, *param.shape)}: every sequence's gradient of its own loss; sequences (B, LENGTH)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params, sequence):
        logits = functional_call(model, params, (sequence[None],)).logits  # (1, LENGTH, VOCAB)
        return per_sequence_loss(logits, sequence[None])[0]

    return vmap(grad(loss_of_one), in_dims=(None, 0))(params, sequences)


grads = per_sequence_grads(pretrained, private[:16])
print({name: tuple(g.shape) for name, g in list(grads.items())[:3]}, "...")

# %% [markdown]
# `persample.per_sample_grads` does the same for any module that returns logits, with checks on the way (no
# BatchNorm, no mixing of examples in the forward). A transformers model returns an output object, so a
# three-line wrapper hands it the `.logits`; the loss is `per_sequence_loss`:

# %%
class Logits(nn.Module):
    """A causal LM that returns its logits (B, T, V) instead of an output object."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids).logits


checked = persample.per_sample_grads(Logits(pretrained), private[:16], private[:16], loss_fn=per_sequence_loss)
difference = max((checked[f"lm.{name}"] - g).abs().max().item() for name, g in grads.items())
norms = persample.per_sample_norms(grads)
print(f"largest difference between the two: {difference:.1e}")
print(f"per-sequence gradient norms of the pretrained model on private data: median {norms.median():.1f}, "
      f"max {norms.max():.1f}")

# %% [markdown]
# ## Fine-tuning, with and without privacy
#
# The private step is that of tutorial 2: Poisson-sample a batch (expected size 64 of the 2000 private
# sequences), compute the per-sequence gradients, clip each to `max_grad_norm` and sum them
# (`persample.clip_per_sample`), and let `persample.DPOptimizer` add the noise, divide by the expected batch
# size and step Adam. The noise multiplier is chosen so that the whole fine-tuning run spends the target `ε`
# at `δ = 1e-5`: here `ε = 8`, a common choice for language models, and the much stricter `ε = 1`.
#
# `max_grad_norm = 1` is well below the typical per-sequence norm, so nearly every gradient is clipped: each
# sequence then contributes a vector of the same length, only its direction differs. That is usual for DP
# fine-tuning of language models and works well with Adam, which rescales the update anyway.
#
# The runs, evaluated on the held-out private sequences every few steps:
#
# * **non-private** fine-tuning of the pretrained model (batches of 64, the model's own fused loss);
# * **DP fine-tuning** of the pretrained model, at each `ε`;
# * **DP from scratch**: the same private training from the random initialisation, to see what the public
#   pretraining is worth under privacy.

# %%
num_private = len(private)
sample_rate = batch_size / num_private
noise_multipliers = {eps: persample.noise_multiplier_for(eps, delta, sample_rate, steps=fine_tune_steps)
                     for eps in target_epsilons}
print(f"sample_rate {sample_rate:.3f}, {fine_tune_steps} steps, δ = {delta:g}: noise_multiplier "
      + ", ".join(f"{sigma:.3f} for ε = {eps:g}" for eps, sigma in noise_multipliers.items()))


def fine_tune(start, epsilon=None):
    """Held-out (step, loss, accuracy) along the run, and the epsilon spent; epsilon=None: no privacy."""
    model = copy.deepcopy(start)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve = [(0, *evaluate(model))]
    if epsilon is not None:
        dp_optimizer = persample.DPOptimizer(
            optimizer, model.named_parameters(), noise_multiplier=noise_multipliers[epsilon],
            max_grad_norm=max_grad_norm, expected_batch_size=sample_rate * num_private, sample_rate=sample_rate,
            generator=torch.Generator(device).manual_seed(1))
        batches = persample.PoissonSampler(num_private, sample_rate, steps=fine_tune_steps,
                                           generator=torch.Generator().manual_seed(0))
    else:
        order = torch.Generator().manual_seed(0)
        batches = (torch.randint(0, num_private, (batch_size,), generator=order) for _ in range(fine_tune_steps))
    for step, idx in enumerate(batches, start=1):
        sequences = private[idx.to(device)]
        if epsilon is not None:
            clipped = persample.clip_per_sample(per_sequence_grads(model, sequences), max_grad_norm)
            dp_optimizer.accumulate(clipped, len(idx))
            dp_optimizer.step()
        else:
            train_step(model, optimizer, sequences)
        if step % eval_every == 0:
            curve.append((step, *evaluate(model)))
    return curve, math.inf if epsilon is None else dp_optimizer.epsilon(delta)


runs = {("non-private", None): fine_tune(pretrained)}
for eps in target_epsilons:
    runs["DP fine-tuning", eps] = fine_tune(pretrained, eps)
    runs["DP from scratch", eps] = fine_tune(random_init, eps)

# %%
colors = {"non-private": "black", "DP fine-tuning": "C0", "DP from scratch": "C1"}
styles = dict(zip([None, *target_epsilons], ["-", "-", "--", ":"], strict=False))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
for (name, eps), (curve, _) in runs.items():
    steps, losses, accuracies = zip(*curve, strict=True)
    label = name if eps is None else f"{name}, ε = {eps:g}"
    left.plot(steps, losses, color=colors[name], linestyle=styles[eps], label=label)
    right.plot(steps, accuracies, color=colors[name], linestyle=styles[eps], label=label)
left.axhline(best_loss, color="gray", linewidth=0.8)
left.text(fine_tune_steps, best_loss * 0.93, f"best possible, log(2)/11 = {best_loss:.3f}", ha="right", va="top",
          fontsize=8)
left.set(yscale="log", ylim=(best_loss * 0.6, None), xlabel="fine-tuning step", ylabel="held-out loss per token",
         title=f"private task, δ = {delta:g}")
right.set(xlabel="fine-tuning step", ylabel="accuracy", ylim=(0, 1.02),
          title="next-token accuracy on the determined tokens")
right.legend(fontsize=9, loc="lower right")
plt.show()

rows = [f"after {fine_tune_steps} steps", "", "| run | target ε | held-out loss | accuracy | ε spent |",
        "|---|---|---|---|---|"]
rows += [f"| {name} | {'-' if eps is None else f'{eps:g}'} | {curve[-1][1]:.3f} | {curve[-1][2]:.1%} | "
         f"{spent:.3f} |" for (name, eps), (curve, spent) in runs.items()]
display(Markdown("\n".join(rows)))

# %% [markdown]
# At `ε = 8`, DP fine-tuning of the pretrained model gets every determined token right within about 50
# steps, behind the non-private run but not far; at `ε = 1` it needs two to three times as many steps and ends less
# confident (a higher loss at the same accuracy). Either way every sequence's influence on the model is
# bounded by the clipping and hidden by the noise. From the random initialisation the same private budget
# buys less, and the stricter the budget the larger the gap: at `ε = 8` this easy task is still learnt,
# only more slowly, while at `ε = 1` the loss stays about three times higher — the model must discover the
# mechanism itself, through the noise. That is why DP training of language models almost always starts
# from a public checkpoint.
#
# %% [markdown]
# ## The same with a `Trainer`: `DPTrainer` and LoRA
#
# Everything above — Poisson batches, per-sequence clipping, noise once per step, the accountant — is what
# `persample.integrations.transformers.DPTrainer` does inside a Hugging Face `Trainer`, so logging, `report_to`,
# checkpoints (the privacy state included) and schedulers work as usual. The DP settings sit next to
# `TrainingArguments` in `DPTrainingArguments`; the expected logical batch is `per_device_train_batch_size ×
# gradient_accumulation_steps`, and its slices go through persample's fast engine (`persample.GhostClipping`),
# which clips each sequence's gradient from one forward and one backward, without `vmap`.
#
# Here it fine-tunes only **LoRA adapters** (rank 8 on every attention and MLP projection, from `peft`), the
# usual way to fine-tune a large model: the engine then computes per-sequence gradients of the adapters only,
# and the noise is added to them only.

# %%
import tempfile

import peft

from persample.integrations.transformers import DPTrainer, DPTrainingArguments

lora_model = peft.get_peft_model(copy.deepcopy(pretrained), peft.LoraConfig(
    r=8, lora_alpha=16, lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
lora_model.print_trainable_parameters()
args = DPTrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=fine_tune_steps, per_device_train_batch_size=batch_size // 2,
    gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", target_epsilon=8.0,
    target_delta=delta, per_sample_max_grad_norm=max_grad_norm, logging_steps=eval_every, save_strategy="no",
    report_to=[], use_cpu=device == "cpu", disable_tqdm=True, seed=0)
rows = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s} for s in private.cpu()]
trainer = DPTrainer(lora_model, args, train_dataset=rows,
                    data_collator=lambda batch: {k: torch.stack([r[k] for r in batch]) for k in batch[0]})
trainer.train()
loss, accuracy = evaluate(lora_model)
print(f"noise_multiplier {trainer.noise_multiplier:.3f}; ε spent {trainer.epsilon:.2f}; "
      f"held-out private loss {loss:.3f}, accuracy {accuracy:.1%}")
print("logged:", [{k: round(v, 3) for k, v in e.items() if k in ("step", "loss", "epsilon")}
                  for e in trainer.state.log_history if "loss" in e][-2:])

# %% [markdown]
# The adapters are about a sixth of this tiny model's parameters (well under 1% of a billion-parameter model's),
# yet they adapt the public model to the private task within the same budget; the noise, of the same size on
# every coordinate, falls on those coordinates only. The logged `loss` is the mean per-sequence loss of the
# Poisson batches, and `epsilon` the accountant's after that step.
#
# ## Summary
#
# * `apply_fused_loss(model)` makes a transformers causal LM (or sequence classifier) compute its own loss
#   with persample's fused cross-entropy; `handle.remove()` undoes it.
# * `per_sequence_loss(logits, labels)` is each sequence's mean loss over its counted tokens, shift
#   included. `vmap(grad(...))` over it with `functional_call` — or `persample.per_sample_grads` on a module
#   that returns `.logits` — gives per-sequence gradients; use `attn_implementation="eager"` so that `vmap`
#   batches the attention.
# * Clip and sum with `persample.clip_per_sample`, add noise and step with `persample.DPOptimizer` around
#   any optimizer (Adam here), with the noise multiplier from `persample.noise_multiplier_for` for the
#   target `ε`; `DPOptimizer.epsilon(delta)` reports what was spent.
# * `DPTrainer` with `DPTrainingArguments` does all of it inside a transformers `Trainer`, with the fast
#   engine's per-sequence clipping, and with LoRA adapters from `peft` trains and noises only those.
# * Public pretraining, then private fine-tuning, is what makes DP-SGD affordable for language models.
