"""The engine's per-example dot products (``persample.engine.forms.batched_dot``) by each way it could compute
them, on the shapes the engine meets: materialized conv and packed gradients (``B x K``, K up to 600k) and Gram
matrices. Squared norms (``x . x``) and products of two tensors are timed apart.

    python benchmarks/batched_dot.py                 # CUDA if available, else the CPU
    python benchmarks/batched_dot.py --device cpu
    python benchmarks/batched_dot.py --quick         # two small shapes: a check of the script

Ways: ``bmm`` — one batched ``1 x K`` by ``K x 1`` matmul (what the engine used before); ``vector_norm`` — one
reduction, squared (squared norms only); ``mul-sum`` — an elementwise product and a sum over the example's
dimensions; ``row_dots`` — the Triton kernel (``persample.kernels.row_dot``; CUDA only), which reads both operands
once and writes no product (products of two tensors). The ``(B C, H W)`` rows are GroupNorm's ``sum G x`` per
example and channel (B=256, a Wide-ResNet's stages). Times are medians over repeated calls, after a warm-up (CUDA:
synchronized). Prints a table and saves it (``results.py``: the batched_dot section of ``RESULTS.md``, appended to
``HISTORY.md``).
"""

import argparse
import statistics
import time

import torch
from results import add_save_flag, header, publish

SHAPES = [(256, 9216), (256, 36864), (256, 147456), (32, 36864), (32, 147456), (16, 600000), (2048, 4096),
          (256, 600), (256 * 64, 1024), (256 * 128, 256), (256 * 256, 64)]
QUICK = [(8, 300), (4, 1000)]


def _median_us(fn, device: torch.device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    add_save_flag(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = QUICK if args.quick else SHAPES
    rows = ["| B | K | dtype | product | bmm | vector_norm | mul-sum | row_dots | best |",
            "|---|---|---|---|---|---|---|---|---|"]
    kernel = device.type == "cuda"
    if kernel:
        from persample.kernels.row_dot import row_dots
    for (B, K), dtype in ((s, d) for s in shapes for d in (torch.float32,)):
        x = torch.randn(B, K, device=device, dtype=dtype)
        y = torch.randn(B, K, device=device, dtype=dtype)
        for product, (a, b) in (("x . x", (x, x)), ("x . y", (x, y))):
            ways = {
                "bmm": lambda a=a, b=b: torch.bmm(a[:, None], b[:, :, None]),
                "vector_norm": (lambda a=a: torch.linalg.vector_norm(a, dim=1).square()) if a is b else None,
                "mul-sum": lambda a=a, b=b: (a * b).sum(1),
                "row_dots": (lambda a=a, b=b: row_dots(a, b)) if kernel and a is not b else None,
            }
            times = {name: _median_us(fn, device, args.reps) for name, fn in ways.items() if fn is not None}
            best = min(times, key=times.get)
            cells = [f"{times[name]:.0f} µs" if name in times else "" for name in ways]
            rows.append(f"| {B} | {K} | {str(dtype).removeprefix('torch.')} | {product} | {' | '.join(cells)} | "
                        f"{best} |")
    publish("batched_dot", header("batched_dot", device) + "\n\n" + "\n".join(rows), args)


if __name__ == "__main__":
    main()
