"""The steps the benchmarks time: one DP-SGD step in each of its variants, on the models of
:mod:`persample.models` at the benchmarks' sizes.

Each variant builds its optimizer (and wrappers) around a fresh model and returns ``step(x, y)``, one training
step: the normal step (forward, ``F.cross_entropy``, backward, AdamW) and the DP ones, which clip each
example's gradient (an example's loss is its mean cross-entropy over its tokens), add Gaussian noise, average by
the batch size and take an AdamW step. ``dp_step.py`` times them side by side; ``host_overhead.py`` and
``profile_step.py`` look inside the normal step and the fast engine's.
"""

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import persample
from persample.models import CNN, GPT, WideResNet

MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-4


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "gpt", "cnn" or "wrn"
    batch: int
    cpu_batch: int = 0  # the batch on the CPU, if not ``batch``
    seq: int = 0  # GPT
    vocab: int = 0
    d: int = 0
    layers: int = 0
    heads: int = 0
    size: int = 0  # CNN / WRN image side
    width: int = 32  # CNN channels of the first convolution
    depth: int = 0  # WRN
    widen: int = 0
    classes: int = 10


FULL = [
    Config("GPT d=384 L=4 V=8192 B=32 T=128", "gpt", batch=32, seq=128, vocab=8192, d=384, layers=4, heads=6),
    Config("GPT-2-small d=768 L=12 V=32000 B=16 T=256", "gpt", batch=16, seq=256, vocab=32000, d=768, layers=12,
           heads=12),
    Config("CNN 3 conv B=256 32x32", "cnn", batch=256, size=32),
    Config("WRN-16-4 GroupNorm B=256 32x32", "wrn", batch=256, cpu_batch=32, size=32, depth=16, widen=4),
]
QUICK = [
    Config("tiny GPT d=32 L=2 V=128 B=4 T=16", "gpt", batch=4, seq=16, vocab=128, d=32, layers=2, heads=2),
    Config("tiny CNN B=8 16x16", "cnn", batch=8, size=16),
    Config("tiny WRN-10-1 GroupNorm B=4 16x16", "wrn", batch=4, size=16, depth=10, widen=1),
]


def on_device(cfg: Config, device: torch.device) -> Config:
    """``cfg`` with its CPU batch (and its name saying so) when ``device`` is the CPU."""
    if device.type == "cuda" or not cfg.cpu_batch:
        return cfg
    return dataclasses.replace(cfg, name=cfg.name.replace(f"B={cfg.batch}", f"B={cfg.cpu_batch}"),
                               batch=cfg.cpu_batch)


# How a GPT is built: (positions, tied). Ours always run the first; Opacus tries them in order.
LAYOUTS = [(positions, tied) for tied in (True, False) for positions in ("arange", "expand", "repeat")]


def build_model(cfg: Config, layout: tuple[str, bool] = LAYOUTS[0]) -> nn.Module:
    torch.manual_seed(0)
    if cfg.kind == "gpt":
        return GPT(cfg.vocab, cfg.d, cfg.layers, cfg.heads, cfg.seq, positions=layout[0], tied=layout[1])
    if cfg.kind == "wrn":
        return WideResNet(cfg.depth, cfg.widen, cfg.classes)
    return CNN(cfg.classes, cfg.width)


def make_batch(cfg: Config, batch: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(1)
    if cfg.kind == "gpt":
        x = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
        y = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g)
    else:
        x = torch.randn(batch, 3, cfg.size, cfg.size, generator=g)
        y = torch.randint(0, cfg.classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def time_step(step, x, y, device: torch.device, steps: int = 1) -> float:
    """Seconds per step of ``steps`` steps run back to back from an idle GPU (CUDA events), or of host time on
    the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        return (time.perf_counter() - start) / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step(x, y)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)


def noisy_step(named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, summed: dict, batch: int) -> None:
    """Gaussian noise on the clipped sums, average by the (expected) batch size, AdamW step: one ``randn``
    for all parameters and ``foreach`` updates, so that the noise is a few kernels, not three per tensor.
    ``named`` is ``list(model.named_parameters())``, listed once per run rather than walked every step."""
    params = [p for name, p in named if name in summed]
    grads = [summed[name] for name, p in named if name in summed]
    noise = torch.randn(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
    noise = [n.view_as(g) for n, g in zip(noise.split([g.numel() for g in grads]), grads, strict=True)]
    torch._foreach_add_(grads, noise, alpha=NOISE_MULTIPLIER * MAX_GRAD_NORM)
    torch._foreach_div_(grads, batch)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------
# The variants: each builds its optimizer (and wrappers) around a fresh model and returns step(x, y).
# ---------------------------------------------------------------------------------------------------


def normal_step(model, device, precision, batch, fused=False):
    opt = adamw(model)

    def step(x, y):
        with autocast(device, precision):
            logits = model(x)
            if fused:
                loss = persample.cross_entropy(logits, y)
            else:
                loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def graphed_normal_step(model, device, precision, batch):
    """The normal step with its forward and backward captured once in a CUDA graph and replayed (PyTorch's
    partial-network capture: the gradients are the graph's static tensors, the AdamW step runs eagerly): the
    like-for-like baseline of the engine's ``cuda_graph="step"``."""
    opt = adamw(model)
    captured = {}

    def forward_backward(x, y):
        # No autocast cache: its casts would be allocated and freed inside the capture.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
        loss.backward()

    def step(x, y):
        if not captured:
            static = x.clone(), y.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    opt.zero_grad(set_to_none=True)
                    forward_backward(*static)
            torch.cuda.current_stream().wait_stream(side)
            opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward_backward(*static)
            captured.update(graph=graph, static=static)
        for buffer, value in zip(captured["static"], (x, y), strict=True):
            buffer.copy_(value)
        captured["graph"].replay()
        opt.step()  # no zero_grad: the replay writes the gradients anew

    return step


def vmap_step(model, device, precision, batch):
    """The per-sample pipeline: ``persample.per_sample_grads`` when present (issue 3), else the same
    ``functional_call`` + ``vmap(grad)`` recipe spelled here; then clip, sum, noise."""
    opt = adamw(model)
    named = list(model.named_parameters())
    pipeline = getattr(persample, "per_sample_grads", None)
    names = [n for n, p in named if p.requires_grad]

    def one_loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return persample.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def step(x, y):
        with autocast(device, precision):
            if pipeline is not None:
                grads = pipeline(model, x, y)
            else:
                grads = per_example({n: p.detach() for n, p in model.named_parameters() if n in names}, x, y)
        norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
        factors = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
        summed = {n: torch.einsum("b,b...->...", factors.to(g.dtype), g).to(torch.float32) for n, g in grads.items()}
        del grads
        noisy_step(named, opt, summed, batch)

    return step


def fast_step(model, device, precision, batch, cuda_graph=None):
    opt = adamw(model)
    named = list(model.named_parameters())
    engine = persample.GhostClipping(model, max_grad_norm=MAX_GRAD_NORM, cuda_graph=cuda_graph)

    def step(x, y):
        with autocast(device, precision):
            out = engine.clipped_grad_sum(x, y)
        noisy_step(named, opt, out.grads, batch)

    return step


def opacus_step(model, device, precision, batch, mode):
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    options = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=batch,
                   loss_reduction="mean")
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                       max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(adamw(model), **options)
        criterion = DPLossFastGradientClipping(wrapped, opt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def step(x, y):
            with autocast(device, precision):
                logits = wrapped(x)
                shape = logits.shape if logits.ndim == 3 else None
                loss = criterion(logits.flatten(0, -2), y.flatten(), shape=shape)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    opt = DPOptimizer(adamw(model), **options)

    def step(x, y):
        with autocast(device, precision):
            loss = F.cross_entropy(wrapped(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


VARIANTS = {
    "normal step": lambda m, d, p, b: normal_step(m, d, p, b),
    "normal step, persample.cross_entropy": lambda m, d, p, b: normal_step(m, d, p, b, fused=True),
    "vmap pipeline": vmap_step,
    "fast engine (GhostClipping)": fast_step,
    "fast engine, cuda_graph='post'": lambda m, d, p, b: fast_step(m, d, p, b, cuda_graph="post"),
    "normal step, CUDA graph": graphed_normal_step,
    "fast engine, cuda_graph='step'": lambda m, d, p, b: fast_step(m, d, p, b, cuda_graph="step"),
    "Opacus hooks": lambda m, d, p, b: opacus_step(m, d, p, b, "hooks"),
    "Opacus functorch": lambda m, d, p, b: opacus_step(m, d, p, b, "functorch"),
    "Opacus ghost clipping": lambda m, d, p, b: opacus_step(m, d, p, b, "ghost"),
}

FAST_VARIANTS = ("fast engine (GhostClipping)", "fast engine, cuda_graph='post'", "fast engine, cuda_graph='step'")
# Variants that run only on CUDA, and the like-for-like baseline of a fast variant besides the normal step.
CUDA_ONLY = ("normal step, CUDA graph", "fast engine, cuda_graph='step'")
BASELINES = {"fast engine, cuda_graph='step'": "normal step, CUDA graph"}
