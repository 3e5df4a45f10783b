"""Benchmark: one fine-tuning step of a Llama-shaped causal LM (random weights from a config, nothing downloaded).

Table 1, the loss side: one training step (forward, loss, backward) of the whole model with
  * transformers' own loss (the logits, then a float32 copy of them in ``ForCausalLMLoss``),
  * persample's ``apply_fused_loss`` (the logits are kept; the loss is the fused kernel on a float32 copy),
  * persample's ``apply_fused_linear_cross_entropy`` (no logits: the head and the loss run chunk by chunk),
  * Liger-Kernel's ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` (its other patches off).
Reported: the median step time and the step's peak memory above what was allocated before it (parameters,
their gradients, the batch), also as a share of one ``(B, T, V)`` logits tensor in the model's dtype.

Table 2, DP LoRA: one ``training_step`` of ``DPTrainer`` (LoRA adapters on q/k/v/o, noise and per-sequence
clipping) against ``transformers.Trainer``'s on the same LoRA model and batch (float32 weights, bf16 autocast on
the GPU as ``TrainingArguments(bf16=True)`` sets it), with the model as built and with
``apply_fused_linear_cross_entropy`` (under DP the engine then clips with the head's fused per-example norms).

    python benchmarks/lm_fine_tuning.py            # CUDA: a 1B-class config (Llama-3.2-1B shapes), bfloat16
    python benchmarks/lm_fine_tuning.py --cpu      # the CPU: a small config, float32
    python benchmarks/lm_fine_tuning.py --quick    # a tiny config on any device, to check the script (not saved)

Every variant runs in its own process, so that one that fails (out of memory, a missing package) gives a crash row
and the others still run. On CUDA the peak comes from ``torch.cuda.max_memory_allocated``; on the CPU from the
process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) read around the step, with
glibc returning large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``) so that the peak is the step's.
Liger's kernels are Triton: on the CPU they run (slowly) in Triton's interpreter, and their time means nothing.
Prints markdown tables and saves them (``results.py``: the lm_fine_tuning section of RESULTS.md, lm_fine_tuning_cpu for
the CPU, appended to HISTORY.md; ``--no-save``: do not).
Targets (issue 21): the loss side's extra memory at most 5% of the logits and no slower than Liger's; the DP LoRA
step at most 1.2x the time and 1.1x the peak memory of the step without DP.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import add_save_flag, header, publish

LOSSES = ["transformers", "persample apply_fused_loss", "persample apply_fused_linear_cross_entropy",
          "Liger fused_linear_cross_entropy"]
CONFIGS = {  # Llama-3.2-1B's shapes on the GPU; a small one for the CPU
    "gpu": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, batch=8, seq=1024, dtype="bfloat16"),
    "cpu": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, batch=4, seq=256, dtype="float32"),
    "quick": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, batch=2, seq=64, dtype="float32"),
}
LORA = [(False, False), (True, False), (False, True), (True, True)]  # (DP, no-logits patch)


def build(shape: dict, device: str, dtype: torch.dtype | None = None):
    import transformers

    dims = {k: v for k, v in shape.items() if k not in ("batch", "seq", "dtype")}
    config = transformers.LlamaConfig(**dims, max_position_embeddings=shape["seq"], pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: a 1B model's random init on the CPU takes long
        model = transformers.LlamaForCausalLM(config)
    model = model.to(dtype or getattr(torch, shape["dtype"])).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(device)
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


class Peak:
    """The peak memory of a block above what was in use when it began: CUDA's allocator statistics, or the
    process's peak resident set on Linux."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = self._status("VmHWM") - self.base


def median_ms(fn, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loss_step(variant: str, shape: dict, device: str, reps: int) -> dict:
    """One variant's step time and peak, in this process."""
    model, batch = build(shape, device)
    if variant == "persample apply_fused_loss":
        from persample.integrations.transformers import apply_fused_loss

        apply_fused_loss(model)
    elif variant == "persample apply_fused_linear_cross_entropy":
        from persample.integrations.transformers import apply_fused_linear_cross_entropy

        apply_fused_linear_cross_entropy(model)
    elif variant.startswith("Liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)

    def step():
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # the gradients stay allocated, as in a training loop

    step()  # warm-up: allocates the gradients
    cuda = device == "cuda"
    with Peak(cuda) as peak:
        step()
    return dict(ms=median_ms(step, reps, cuda), peak=peak.bytes)


def dp_lora_step(variant: list, shape: dict, device: str, reps: int) -> dict:
    """One ``training_step`` of a LoRA model, ``variant = [dp, patched]``, as ``Trainer.train`` runs it: the model
    prepared by the Trainer's accelerator (bf16 autocast when the arguments set it), at the last part of a
    logical batch."""
    import peft
    import transformers

    from persample.integrations.transformers import DPTrainer, DPTrainingArguments, apply_fused_linear_cross_entropy

    dp, patched = variant
    bf16 = shape["dtype"] == "bfloat16"
    model, batch = build(shape, device, torch.float32)  # float32 weights, bf16 autocast: Trainer's bf16=True
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if patched:
        apply_fused_linear_cross_entropy(model)
    rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), report_to=[], bf16=bf16,
                  use_cpu=device == "cpu", disable_tqdm=True)
    if dp:
        args = DPTrainingArguments(**common, noise_multiplier=1.0, per_sample_max_grad_norm=1.0)
        trainer = DPTrainer(model, args, train_dataset=rows * 4)
    else:
        trainer = transformers.Trainer(model, transformers.TrainingArguments(**common), train_dataset=rows * 4)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    prepared = trainer.accelerator.prepare(model)  # what train() does: autocast around the forward
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop; Trainer divides the loss by it
    trainer.accelerator.gradient_state._set_sync_gradients(True)  # as at the last part of a logical batch
    inputs = {k: v.clone() for k, v in batch.items()}

    def step():
        trainer.training_step(prepared, inputs)
        model.zero_grad(set_to_none=False)

    step()
    cuda = device == "cuda"
    with Peak(cuda) as peak:
        step()
    return dict(ms=median_ms(step, reps, cuda), peak=peak.bytes)


def run(kind: str, variant, shape: dict, device: str, reps: int, timeout: float) -> dict:
    """One variant in a process of its own: a crash, a hang or an out-of-memory there is a row of the table."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if "Liger" in str(variant) and device == "cpu" else "0"}
    if device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--worker", json.dumps([kind, variant, shape, device, reps])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:g} s")
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:160])
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the small config on the CPU")
    parser.add_argument("--quick", action="store_true", help="a tiny config on any device, to check the script")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--skip-liger", action="store_true", help="leave Liger out (slow in Triton's interpreter)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per variant (default: 180 on CUDA, 600 on the CPU)")
    add_save_flag(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, variant, shape, device, reps = json.loads(args.worker)
        fn = loss_step if kind == "loss" else dp_lora_step
        print(json.dumps(fn(variant, shape, device, reps)))
        return
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not (args.cpu or args.quick):
        parser.error("the 1B-class benchmark needs a CUDA GPU; use --cpu for the small config")
    device = "cuda" if cuda else "cpu"
    shape = CONFIGS["quick" if args.quick else "gpu" if cuda else "cpu"]
    reps = args.reps or (10 if cuda else 3)
    timeout = args.timeout or (180 if cuda else 600)
    dtype = getattr(torch, shape["dtype"])
    logits = shape["batch"] * shape["seq"] * shape["vocab_size"] * dtype.itemsize

    rows = ["| loss | step time | peak above start | / one logits tensor |", "|---|---|---|---|"]
    for variant in LOSSES:
        if variant.startswith("Liger") and args.skip_liger:
            continue
        slow = variant.startswith("Liger") and not cuda  # Triton's interpreter: one step is enough
        r = run("loss", variant, shape, device, 1 if slow else reps, timeout)
        name = variant + (" (Triton interpreter)" if slow else "")
        if "error" in r:
            rows.append(f"| {name} | crash: {r['error']} | | |")
        else:
            rows.append(f"| {name} | {r['ms']:,.0f} ms | {mib(r['peak'])} | {r['peak'] / logits:.2f}x |")

    dp_rows = ["| LoRA step | step time | peak above start | DP / no DP (time, peak) |", "|---|---|---|---|"]
    results = {}
    for dp, patched in LORA:
        r = results[dp, patched] = run("dp", [dp, patched], shape, device, reps, timeout)
        name = ("DPTrainer (noise, per-sequence clipping)" if dp else "Trainer (no DP)") + \
            (", apply_fused_linear_cross_entropy" if patched else "")
        base = results.get((False, patched))
        ratio = ""
        if dp and "error" not in r and base is not None and "error" not in base:
            ratio = f"{r['ms'] / base['ms']:.2f}x, {r['peak'] / max(base['peak'], 1):.2f}x"
        dp_rows.append(f"| {name} | crash: {r['error']} | | |" if "error" in r else
                       f"| {name} | {r['ms']:,.0f} ms | {mib(r['peak'])} | {ratio} |")

    dims = ", ".join(f"{k}={v}" for k, v in shape.items())
    section = "lm_fine_tuning" if cuda else "lm_fine_tuning_cpu"  # a CPU run keeps the GPU table
    context = header(section, device, f"Llama config: {dims}",
                     f"one (B, T, V) logits tensor: {mib(logits)}", f"median of {reps} steps")
    text = "\n".join([context, "", *rows, "",
                      "DP LoRA (r=16 on q/k/v/o), one training_step on the same batch:", "", *dp_rows])
    publish(section, text, args)


if __name__ == "__main__":
    main()
