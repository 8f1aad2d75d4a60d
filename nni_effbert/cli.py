"""The ``nni-effbert`` command line.

::

    nni-effbert teacher -c exp.yml               fine-tune (or reuse) the teacher, print its dev metric
    nni-effbert warmup  -c exp.yml --stage N     warm up stage N's weight-sharing supernet
    nni-effbert trial   -c exp.yml --arch A.json run one trial (what nnictl runs), print its metrics

Every command takes ``-c/--config`` and repeatable ``--set dotted.key=value`` overrides, and
``--help``. Errors nni-effbert raises on purpose (:class:`~nni_effbert.errors.EffBertError`:
bad config, data, arch, missing checkpoint) end the command with a one-line message on
stderr and exit status 2, without a traceback.

Adding a command
----------------
Append a :class:`Command` to :data:`COMMANDS`: a name, a one-line help, an optional
``configure(parser)`` that adds the command's own options, and ``run(args) -> int``. Import
heavy modules inside ``run`` so that ``--help`` and input errors stay fast.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .errors import EffBertError

__all__ = ["Command", "COMMANDS", "build_parser", "configure_runtime", "one_line", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One subcommand of ``nni-effbert``.

    Attributes
    ----------
    name : str
    help : str
        One line, shown in ``nni-effbert --help``.
    run : callable
        ``run(args) -> exit status``.
    configure : callable, optional
        ``configure(parser)`` adds the command's own arguments.
    description : str, optional
        Longer text for ``nni-effbert NAME --help`` (default: ``help``).
    needs_config : bool
        Add ``-c/--config`` (required) and ``--set``.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Optional[Callable[[argparse.ArgumentParser], None]] = None
    description: Optional[str] = None
    needs_config: bool = True


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def configure_runtime(verbose: bool = False, quiet: bool = False) -> None:
    """Logging to stderr and silence for known third-party import noise (CLI processes only)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Emitted while importing nni 3.0 / lightning on current torch and setuptools: harmless,
    # and they would bury our one-line messages.
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module")
    for name in ("nni", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


# ---------------------------------------------------------------------------------------------
# teacher
# ---------------------------------------------------------------------------------------------


def _load_cfg(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, list(args.set or []))


def _run_teacher(args: argparse.Namespace) -> int:
    from .teacher import finetune_from_config

    result = finetune_from_config(_load_cfg(args), progress=not args.quiet)
    how = "reused" if result.reused else "fine-tuned"
    print(f"teacher ({how}): {result.path}")
    print(f"dev {result.metric} = {result.dev_metric:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------
# warmup
# ---------------------------------------------------------------------------------------------


def _configure_warmup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, default=0, metavar="N",
                        help="zero-based stage of search.stages to warm up (default 0)")
    parser.add_argument("--fixed", metavar="ARCH.json",
                        help="JSON object of labels held fixed while sampling (the stage's fixed choices)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="task-KD steps (default: the stage's warmup_steps)")
    parser.add_argument("--general-steps", type=int, metavar="N",
                        help="general-KD steps on unlabeled text first (default: the stage's general_warmup_steps)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="steps between resumable states (default: a tenth of the run, at least 25)")
    parser.add_argument("--force", action="store_true",
                        help="warm up again even if the stage's checkpoint exists for the same settings")


def _run_warmup(args: argparse.Namespace) -> int:
    from .warmup import load_fixed_file, run_warmup

    cfg = _load_cfg(args)
    fixed = load_fixed_file(args.fixed) if args.fixed else None
    result = run_warmup(cfg, args.stage, fixed=fixed, steps=args.steps, general_steps=args.general_steps,
                        force=args.force, checkpoint_interval=args.checkpoint_every, progress=not args.quiet)
    state = "already warmed up" if result.skipped else f"{result.plan.total_steps} steps from {result.init}"
    if result.resumed_at is not None:
        state += f", resumed at step {result.resumed_at}"
    print(f"stage {result.stage} supernet ({state}): {result.checkpoint}")
    if result.metrics:
        loss = f", KD loss {result.loss:.4f}" if result.loss is not None else ""
        print(f"reference arch dev {result.metric} = {result.metrics['default']:.4f}{loss}")
    return 0


# ---------------------------------------------------------------------------------------------
# trial
# ---------------------------------------------------------------------------------------------


def _configure_trial(parser: argparse.ArgumentParser) -> None:
    from .trial import add_arguments

    add_arguments(parser)


def _run_trial(args: argparse.Namespace) -> int:
    from .trial import run

    return run(args)


#: The subcommands, in ``--help`` order. Append new ones here.
COMMANDS: List[Command] = [
    Command("teacher", "fine-tune (or reuse) the teacher on the task and print its dev metric", _run_teacher,
            description="Fine-tune teacher.model on the task into <workdir>/teacher, or reuse the teacher "
                        "already there for the same task data, and print its dev metric."),
    Command("warmup", "warm up a stage's weight-sharing supernet by KD (writes supernet/stage{N}.pt)", _run_warmup,
            _configure_warmup,
            description="Distil the fine-tuned teacher into the weight-sharing supernet of one stage, sampling a "
                        "random architecture per step; writes <workdir>/supernet/stage{N}.pt (resumable)."),
    Command("trial", "run one trial: a stage warm-up or a candidate evaluation (what nnictl runs)", _run_trial,
            _configure_trial,
            description="Run one trial. Inside NNI the parameters come from the tuner; outside NNI pass --arch "
                        "ARCH.json. Prints the final metric dict as JSON. Exit status 1 if the trial failed "
                        "(e.g. NaN loss), 2 for bad input."),
]

# search, register-tuner (their code lives in nni_effbert.search).
def _configure_search(parser: argparse.ArgumentParser) -> None:
    from .search import configure

    configure(parser)


def _run_search(args: argparse.Namespace) -> int:
    from .search import run

    return run(args)


def _run_register_tuner(args: argparse.Namespace) -> int:
    from .search import run_register

    return run_register(args)


COMMANDS += [
    Command("search", "run the progressive search with nnictl (or NasExperiment with --python)", _run_search,
            _configure_search,
            description="Save the resolved config and an nnictl config into the work directory, register the "
                        "EfficientBertProgressive tuner if needed and run `nnictl create`; prints the web UI URL "
                        "and the experiment id. --wait blocks until it ends, stops it and prints the trials "
                        "(exit 1 if it ended in ERROR). --python runs NasExperiment + ProgressiveStrategy in this "
                        "process instead (warm-ups run here; records also go to <workdir>/trials.json)."),
    Command("register-tuner", "register EfficientBertProgressive with NNI (nnictl algo register)", _run_register_tuner,
            needs_config=False,
            description="Register the progressive search as the NNI builtin tuner EfficientBertProgressive "
                        "(idempotent; same as `nnictl algo register --meta <package>/resources/tuner_meta.yml`)."),
]

# export, distill, report, quickstart (their code lives in nni_effbert.product).
from .product import COMMANDS as _PRODUCT_COMMANDS  # noqa: E402 - needs Command defined above

COMMANDS.extend(_PRODUCT_COMMANDS)


def build_parser(commands: Sequence[Command] = None) -> argparse.ArgumentParser:
    """The ``nni-effbert`` parser with one subparser per command."""
    from . import __version__

    commands = COMMANDS if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="nni-effbert",
        description="EfficientBERT's progressive MLP search as a Microsoft NNI plugin.",
    )
    parser.add_argument("--version", action="version", version=f"nni-effbert {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("-c", "--config", required=True, metavar="EXP.yml", help="experiment config (YAML)")
    with_config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value, e.g. --set evaluator.train_steps=50 (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in commands:
        parents = [common, with_config] if cmd.needs_config else [common]
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help, parents=parents)
        if cmd.configure is not None:
            cmd.configure(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``nni-effbert``; returns the exit status (2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    cmd: Command = args._command
    configure_runtime(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(cmd.run(args) or 0)
    except EffBertError as exc:
        print(f"nni-effbert {cmd.name}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nni-effbert {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
