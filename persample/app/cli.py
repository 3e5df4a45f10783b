"""The ``persample`` console command (also ``python -m persample``). ``persample train`` runs the main job
(:mod:`persample.app.train`); ``persample audit`` audits its privacy (:mod:`persample.app.audit`).

Bad settings end the command as argparse does: one line naming the problem on stderr, exit status 2, and nothing
written. Warnings (a run that is not private) are one line on stderr too.
"""

import argparse
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Sequence

from persample.app.audit import AuditConfig, run_audit
from persample.app.train import TrainConfig, train_digits

_DEFAULTS = TrainConfig()


def _version() -> str:
    """The installed distribution's version; a source tree on ``PYTHONPATH`` (not installed) has none to read."""
    try:
        return importlib.metadata.version("persample")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: source tree)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persample", description="Per-sample gradients and DP-SGD for PyTorch.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version()}")
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
    _add_audit(commands)
    return parser


def _add_audit(commands) -> None:
    """``persample audit`` (:mod:`persample.app.audit`)."""
    defaults = AuditConfig()
    audit = commands.add_parser(
        "audit", help="audit DP-SGD on digits: lower bounds on the epsilon a run really has",
        description="Trains DP-SGD on scikit-learn's digits with white-box canaries (a Dirac gradient each, on a "
                    "parameter block the model never uses) and black-box canaries (mislabeled copies), and prints "
                    "the accountant's claimed epsilon beside the audited lower bounds and their confidence. "
                    "Writes audit.json and audit.png (claimed vs audited epsilon over the noise multipliers of "
                    "--plot-epsilons) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    audit.add_argument("--target-epsilon", type=float, default=defaults.target_epsilon,
                       help="the claim to audit: the noise is set to spend it over the run at --delta")
    audit.add_argument("--plot-epsilons", type=float, nargs="*", default=list(defaults.plot_epsilons),
                       help="more claims to audit for the plot (none: only --target-epsilon)")
    audit.add_argument("--canaries", type=int, default=defaults.canaries, help="white-box canaries")
    audit.add_argument("--black-box-canaries", type=int, default=defaults.black_box_canaries,
                       help="mislabeled copies of training examples (0: no black-box audit)")
    audit.add_argument("--batch-size", type=int, default=defaults.batch_size, help="expected (Poisson) batch size")
    audit.add_argument("--epochs", type=int, default=defaults.epochs)
    audit.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    audit.add_argument("--delta", type=float, default=defaults.delta)
    audit.add_argument("--confidence", type=float, default=defaults.confidence,
                       help="the probability that each lower bound holds")
    audit.add_argument("--accountant", choices=("rdp", "prv"), default=defaults.accountant)
    audit.add_argument("--engine", choices=("vmap", "fast"), default=defaults.engine)
    audit.add_argument("--out", default=defaults.out)
    audit.add_argument("--seed", type=int, default=defaults.seed)
    progress = audit.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def _run_audit(args, parser: argparse.ArgumentParser) -> int:
    config = AuditConfig(
        target_epsilon=args.target_epsilon, plot_epsilons=tuple(args.plot_epsilons), canaries=args.canaries,
        black_box_canaries=args.black_box_canaries, batch_size=args.batch_size, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, delta=args.delta, confidence=args.confidence,
        accountant=args.accountant, engine=args.engine, out=args.out, seed=args.seed, progress=args.progress)
    try:
        rows = run_audit(config)
    except ValueError as error:
        parser.exit(2, f"persample audit: error: {error}\n")
    except KeyboardInterrupt:
        return 130
    return 1 if any(row[f"white_box_{name}"] > row["claimed_epsilon"] for row in rows
                    for name in ("clopper_pearson", "gaussian", "one_run")) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``persample <command> ...``; returns the exit status (130 when interrupted, 2 for bad settings)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "audit":
        return _run_audit(args, parser)
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
