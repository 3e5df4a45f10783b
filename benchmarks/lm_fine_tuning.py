"""Benchmark: one fine-tuning step of a Llama-shaped causal LM (random weights from a config, nothing downloaded).

Table 1, the loss side: one training step (forward, loss, backward) of the whole model with
  * transformers' own loss (the logits, then a float32 copy of them in ``ForCausalLMLoss``),
  * persample's ``apply_fused_loss`` (the logits are kept; the loss is the fused kernel on a float32 copy),
  * persample's ``apply_fused_linear_cross_entropy`` (no logits: the head and the loss run chunk by chunk),
  * Liger-Kernel's ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` (its other patches off).
Reported: the median step time and the step's peak memory above what was allocated before it (parameters,
their gradients, the batch), also as a share of one ``(B, T, V)`` logits tensor in the model's dtype.

Table 2, DP LoRA: one ``training_step`` of ``DPTrainer`` (LoRA adapters on q/k/v/o, noise and per-sequence
clipping) against ``transformers.Trainer``'s on the same LoRA model and batch.

    python benchmarks/lm_fine_tuning.py            # CUDA: a 1B-class config (Llama-3.2-1B shapes), bfloat16
    python benchmarks/lm_fine_tuning.py --cpu      # the CPU: a small config, float32

On CUDA the peak comes from ``torch.cuda.max_memory_allocated``; on the CPU each variant runs in its own process,
whose peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) is read around the step, with
glibc returning large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``) so that the peak is the step's.
Liger's kernels are Triton: on the CPU they run (slowly) in Triton's interpreter, and their time means nothing.
Prints markdown tables and appends them to benchmarks/RESULTS.md (``--no-results``: do not).
Targets (issue 21): the loss side's extra memory at most 5% of the logits and no slower than Liger's; the DP LoRA
step at most 1.2x the time and 1.1x the peak memory of the step without DP.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
LOSSES = ["transformers", "persample apply_fused_loss", "persample apply_fused_linear_cross_entropy",
          "Liger fused_linear_cross_entropy"]
CONFIGS = {  # Llama-3.2-1B's shapes on the GPU; a small one for the CPU
    "gpu": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, batch=8, seq=1024, dtype="bfloat16"),
    "cpu": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, batch=4, seq=256, dtype="float32"),
}


def build(shape: dict, device: str):
    import transformers

    dims = {k: v for k, v in shape.items() if k not in ("batch", "seq", "dtype")}
    config = transformers.LlamaConfig(**dims, max_position_embeddings=shape["seq"], pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, getattr(torch, shape["dtype"])).train()
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


def dp_lora_step(dp: bool, shape: dict, device: str, reps: int) -> dict:
    import peft
    import transformers

    from persample.integrations.transformers import DPTrainer, DPTrainingArguments

    model, batch = build(shape, device)
    bf16 = shape["dtype"] == "bfloat16"
    model = peft.get_peft_model(model.float() if bf16 else model,
                                peft.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    rows = [{k: v[i].cpu() for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), report_to=[], bf16=bf16,
                  use_cpu=device == "cpu", disable_tqdm=True)
    if dp:
        args = DPTrainingArguments(**common, noise_multiplier=1.0, per_sample_max_grad_norm=1.0)
        trainer = DPTrainer(model, args, train_dataset=rows * 4)
    else:
        trainer = transformers.Trainer(model, transformers.TrainingArguments(**common), train_dataset=rows * 4)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.accelerator.gradient_state._set_sync_gradients(True)  # as at the last part of a logical batch
    inputs = {k: v.clone() for k, v in batch.items()}

    def step():
        trainer.training_step(model, inputs)
        model.zero_grad(set_to_none=False)

    step()
    cuda = device == "cuda"
    with Peak(cuda) as peak:
        step()
    return dict(ms=median_ms(step, reps, cuda), peak=peak.bytes)


def in_subprocess(kind: str, variant, shape: dict, device: str, reps: int, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "1" if "Liger" in str(variant) else "0"}
    cmd = [sys.executable, __file__, "--worker", json.dumps([kind, variant, shape, device, reps])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout} s")
    if done.returncode != 0:
        return dict(error=(done.stderr.strip().splitlines() or ["?"])[-1][:120])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(kind: str, variant, shape: dict, device: str, reps: int, timeout: float) -> dict:
    if device == "cpu":
        return in_subprocess(kind, variant, shape, device, reps, timeout)
    try:
        fn = loss_step if kind == "loss" else dp_lora_step
        return fn(variant, shape, device, reps)
    except Exception as exc:  # recorded in the table, not fatal
        return dict(error=f"{type(exc).__name__}: {exc}"[:120])
    finally:
        torch.cuda.empty_cache()


def mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the small config on the CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--skip-liger", action="store_true", help="leave Liger out (slow in Triton's interpreter)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per variant on the CPU")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, variant, shape, device, reps = json.loads(args.worker)
        fn = loss_step if kind == "loss" else dp_lora_step
        print(json.dumps(fn(variant, shape, device, reps)))
        return
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        parser.error("the 1B-class benchmark needs a CUDA GPU; use --cpu for the small config")
    device, shape = ("cuda", CONFIGS["gpu"]) if cuda else ("cpu", CONFIGS["cpu"])
    reps = args.reps or (10 if cuda else 3)
    dtype = getattr(torch, shape["dtype"])
    logits = shape["batch"] * shape["seq"] * shape["vocab_size"] * dtype.itemsize

    rows = ["| loss | step time | peak above start | / one logits tensor |", "|---|---|---|---|"]
    for variant in LOSSES:
        if variant.startswith("Liger") and args.skip_liger:
            continue
        r = run("loss", variant, shape, device, reps if not (variant.startswith("Liger") and not cuda) else 1,
                args.timeout)
        if "error" in r:
            rows.append(f"| {variant} | crash: {r['error']} | | |")
        else:
            rows.append(f"| {variant} | {r['ms']:,.0f} ms | {mib(r['peak'])} | {r['peak'] / logits:.2f}x |")
    dp_rows = ["| LoRA step | step time | peak above start |", "|---|---|---|"]
    results = {dp: run("dp", dp, shape, device, reps, args.timeout) for dp in (False, True)}
    for dp, r in results.items():
        name = "DPTrainer (noise, per-sequence clipping)" if dp else "Trainer (no DP)"
        dp_rows.append(f"| {name} | crash: {r['error']} | |" if "error" in r else
                       f"| {name} | {r['ms']:,.0f} ms | {mib(r['peak'])} |")
    if all("error" not in r for r in results.values()):
        dp_rows.append(f"| ratio | {results[True]['ms'] / results[False]['ms']:.2f}x | "
                       f"{results[True]['peak'] / max(results[False]['peak'], 1):.2f}x |")

    where = torch.cuda.get_device_name() if cuda else "CPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    dims = ", ".join(f"{k}={v}" for k, v in shape.items())
    text = "\n".join([
        f"## lm_fine_tuning — {datetime.date.today()} — {where} — commit {commit}", "",
        f"Llama config: {dims}; one (B, T, V) logits tensor: {mib(logits)}; torch {torch.__version__}; "
        f"median of {reps} steps.", "", *rows, "", "DP LoRA (r=16 on q/k/v/o), one training_step on the same batch:",
        "", *dp_rows, ""])
    print(text)
    if not args.no_results:
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
