"""The ``persample`` console command (also ``python -m persample``). ``persample train`` runs the main job
(:mod:`persample.app.train`).

Bad settings end the command as argparse does: one line naming the problem on stderr, exit status 2, and nothing
written. Warnings (a run that is not private) are one line on stderr too.
"""

import argparse
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Sequence

from persample.app.train import TrainConfig, train_digits

_DEFAULTS = TrainConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persample", description="Per-sample gradients and DP-SGD for PyTorch.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('persample')}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a small CNN on scikit-learn's digits with DP-SGD",
        description="Trains a small CNN with DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) on "
                    "scikit-learn's handwritten digits, then prints the test accuracy and the epsilon spent. "
                    "Writes epochs.csv, grad_norms.csv, grad_norms.png and report.json to --out as it goes.")
    train.add_argument("--epochs", type=int, default=_DEFAULTS.epochs,
                       help="passes over the training set (default: %(default)s)")
    batch = train.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                       help="expected (Poisson) batch size; sample_rate = batch_size / training examples "
                            "(default: %(default)s)")
    batch.add_argument("--sample-rate", type=float, default=None,
                       help="Poisson sampling probability per example (default: from --batch-size)")
    train.add_argument("--max-physical-batch-size", type=int, default=_DEFAULTS.max_physical_batch_size,
                       help="larger logical batches are split and accumulated into one step (default: %(default)s)")
    noise = train.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, default=None,
                       help="noise std / max_grad_norm; 0 is not private (default: derived from --target-epsilon)")
    noise.add_argument("--target-epsilon", type=float, default=_DEFAULTS.target_epsilon,
                       help="epsilon to spend over the whole run at --delta (default: %(default)s)")
    train.add_argument("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm,
                       help="per-example clipping bound (default: %(default)s)")
    train.add_argument("--delta", type=float, default=_DEFAULTS.delta,
                       help="the delta of (epsilon, delta)-DP, well below 1 / training examples "
                            "(default: %(default)s)")
    train.add_argument("--accountant", choices=("rdp", "prv"), default=_DEFAULTS.accountant,
                       help="privacy accountant (Opacus's): Renyi DP or privacy random variables "
                            "(default: %(default)s)")
    train.add_argument("--lr", type=float, default=_DEFAULTS.lr,
                       help="SGD learning rate (momentum 0.9) (default: %(default)s)")
    train.add_argument("--no-dp", action="store_true", help="non-private baseline: no clipping, no noise")
    train.add_argument("--engine", choices=("vmap", "fast"), default=_DEFAULTS.engine,
                       help="per-sample clipping by torch.func vmap(grad) or by the fast ghost-clipping engine "
                            "(default: %(default)s)")
    train.add_argument("--nonfinite", choices=("zero", "raise"), default=_DEFAULTS.nonfinite,
                       help="an example whose gradient is not finite contributes zero (counted) or stops the run "
                            "(default: %(default)s)")
    train.add_argument("--secure-mode", action="store_true",
                       help="draw the Poisson batches and the noise from the OS CSPRNG (not reproducible)")
    train.add_argument("--out", default=_DEFAULTS.out,
                       help="folder for the report and the histogram (default: %(default)s)")
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                       help="seed of the model's initialization, the batches and the noise, except those that "
                            "--secure-mode draws (default: %(default)s)")
    train.add_argument("--device", default=_DEFAULTS.device,
                       help="auto (a GPU if there is one), cpu, cuda, cuda:1, mps (default: %(default)s)")
    train.add_argument("--nproc", type=int, default=1,
                       help="data-parallel processes on this host, started by torchrun (same as "
                            "torchrun --nproc-per-node N -m persample train ...)")
    progress = train.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="always show the progress bar (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``persample <command> ...``; returns the exit status (130 when interrupted, 2 for bad settings)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.exit(2, f"persample train: error: --nproc must be >= 1, got {args.nproc}\n")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, argv)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, sample_rate=args.sample_rate,
        max_physical_batch_size=args.max_physical_batch_size, noise_multiplier=args.noise_multiplier,
        target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
        max_grad_norm=args.max_grad_norm, delta=args.delta, accountant=args.accountant, lr=args.lr,
        dp=not args.no_dp, engine=args.engine, nonfinite=args.nonfinite, secure_mode=args.secure_mode,
        out=args.out, seed=args.seed, device=args.device, progress=args.progress)
    with warnings.catch_warnings():  # restores the usual display on return
        warnings.showwarning = _show_warning
        try:
            train_digits(config)
        except ValueError as error:
            parser.exit(2, f"persample train: error: {error}\n")
        except KeyboardInterrupt:
            return 130
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"persample train: warning: {message}", file=sys.stderr, flush=True)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Starts ``nproc`` ranks of ``python -m persample`` with torchrun on this host (the ``--nproc`` option
    dropped; the ranks see ``WORLD_SIZE``); returns 0, or 1 if a rank failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    drop = {i for i, a in enumerate(argv) if a == "--nproc"}
    rest = [a for i, a in enumerate(argv) if i not in drop and i - 1 not in drop and not a.startswith("--nproc=")]
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "persample", *rest]))
    except ChildFailedError as error:
        print(f"persample train: a process failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
