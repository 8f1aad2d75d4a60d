"""Trial entry point: what ``nnictl`` runs for every trial.

::

    python -m nni_effbert.trial --config exp.yml [--set key=value ...] [--arch arch.json]
    nni-effbert trial -c exp.yml [--arch arch.json]          # the same

Inside NNI the parameters come from ``nni.get_next_parameter()``; outside NNI,
``--arch arch.json`` gives them (for debugging) and the final metric dict is printed as JSON.
Either way they are a flat dict (see :mod:`nni_effbert.strategies.core`):

* a **warm-up trial** carries ``_warmup_stage`` (and ``_warmup_steps``,
  ``_general_warmup_steps``, the stage's fixed labels): it runs :func:`~.warmup.run_warmup`
  for that stage and reports the dev metric of a reference arch on the warmed supernet;
* a **candidate** is an arch (``label -> value``) plus optional ``_stage`` and
  ``_train_steps``: the ``_``-prefixed keys are stripped, the arch is validated and scored by
  :class:`~.evaluator.KDEvaluator`.

Exit status: 0 on success; 1 when the trial failed (:class:`~.train.TrialFailure`: NaN loss,
failing shapes -- the reason is logged and printed, nothing is reported, so NNI marks the
trial FAILED); 2 for bad input (config, data, arch, missing checkpoint), with a one-line
message.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .errors import ConfigError, EffBertError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_BAD_INPUT",
    "add_arguments",
    "in_nni",
    "configure_threads",
    "read_arch_file",
    "run_parameters",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
#: The trial ran and failed (diverged, shapes): NNI shows it FAILED.
EXIT_FAILED = 1
#: Bad input: config, data, arch, missing checkpoint.
EXIT_BAD_INPUT = 2

_WARMUP = "_warmup_stage"
_KNOWN_META = {"_warmup_stage", "_warmup_steps", "_general_warmup_steps", "_stage", "_stage_name",
               "_stage_kind", "_train_steps"}


def in_nni() -> bool:
    """True when this process is a trial started by NNI (its platform variables are set)."""
    platform = os.environ.get("NNI_PLATFORM")
    return bool(os.environ.get("NNI_TRIAL_COMMAND_CHANNEL")) or (bool(platform) and platform != "unittest")


def configure_threads(cfg) -> int:
    """Give each of ``search.trial_concurrency`` concurrent trials its share of the CPU cores.

    OpenMP threads that outnumber the free cores spin against each other and make every
    forward several times slower, so a trial uses ``cpu_count // trial_concurrency`` threads
    (at least 1). An explicit ``OMP_NUM_THREADS`` is respected. Returns the thread count.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // max(1, int(cfg.search.trial_concurrency)))
    torch.set_num_threads(threads)
    return threads


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trial's own options (``--arch``, ``--stage``, ``--train-steps``) to ``parser``."""
    parser.add_argument("--arch", metavar="ARCH.json",
                        help="run these parameters instead of asking NNI (a label -> value JSON object; "
                             "'_'-prefixed keys such as _stage or _warmup_stage are honoured)")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="zero-based stage whose supernet the candidate inherits (overrides _stage; "
                             "default: the latest warmed stage)")
    parser.add_argument("--train-steps", type=int, metavar="N",
                        help="KD steps per candidate (overrides _train_steps and evaluator.train_steps; "
                             "0 scores inherited weights)")
    return parser


def read_arch_file(path) -> Dict[str, Any]:
    """Read trial parameters from a JSON file.

    Raises
    ------
    ConfigError
        If the file is missing, not JSON, or not an object.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--arch: file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--arch {p}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--arch {p}: expected a JSON object of label -> value, got {type(data).__name__}")
    return data


def _int_meta(params: Mapping[str, Any], key: str) -> Optional[int]:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON round trips may turn 2 into 2.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"trial parameter {key} must be an integer, got {value!r}")
    return value


def run_parameters(cfg, params: Mapping[str, Any], *, stage: Optional[int] = None,
                   train_steps: Optional[int] = None, report: bool = True, progress: bool = True,
                   setup=None) -> Dict[str, Any]:
    """Run one trial's parameters: a stage warm-up or a candidate evaluation.

    Parameters
    ----------
    cfg : ExperimentConfig
    params : dict
        Trial parameters (see the module docstring).
    stage, train_steps : int, optional
        Override ``_stage`` / ``_warmup_stage`` and ``_train_steps``.
    report : bool
        Report results to NNI.
    progress : bool
        Progress bars.
    setup : KDSetup, optional
        Already loaded experiment (reused instead of loading it again).

    Returns
    -------
    dict
        The final metric dict.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"trial parameters must be a JSON object, got {type(params).__name__}")
    arch = {k: v for k, v in params.items() if not str(k).startswith("_")}
    unknown = sorted(k for k in params if str(k).startswith("_") and k not in _KNOWN_META)
    if unknown:
        logger.debug("ignoring trial parameters %s", unknown)
    if _WARMUP in params:
        from .warmup import run_warmup

        warm_stage = _int_meta(params, _WARMUP) if stage is None else stage
        logger.info("warm-up trial of stage %s (%s)", warm_stage, params.get("_stage_name", "?"))
        result = run_warmup(cfg, warm_stage, fixed=arch, steps=_int_meta(params, "_warmup_steps"),
                            general_steps=_int_meta(params, "_general_warmup_steps"), progress=progress,
                            setup=setup)
        metrics = result.report()
        if report:
            import nni

            nni.report_final_result(metrics)
        return metrics
    from .evaluator import KDEvaluator

    evaluator = KDEvaluator(cfg, stage=_int_meta(params, "_stage") if stage is None else stage,
                            report=report, progress=progress, setup=setup)
    steps = train_steps if train_steps is not None else _int_meta(params, "_train_steps")
    return evaluator.evaluate(arch, train_steps=steps)


def run(args: argparse.Namespace) -> int:
    """Run a trial from parsed arguments (``config``, ``set``, ``arch``, ``stage``,
    ``train_steps``); returns the exit status. Bad input raises :class:`EffBertError`."""
    from .config import load_config
    from .train import TrialFailure

    cfg = load_config(args.config, list(args.set or []))
    configure_threads(cfg)
    inside = in_nni()
    if args.arch:
        params = read_arch_file(args.arch)
    elif inside:
        import nni

        params = nni.get_next_parameter()
        if params is None:
            raise ConfigError("NNI sent no parameters to this trial")
        logger.info("trial %s parameters: %s", nni.get_trial_id(), json.dumps(params, sort_keys=True))
    else:
        raise ConfigError("not running inside NNI: pass --arch ARCH.json with the parameters to run")
    progress = not getattr(args, "quiet", False)
    try:
        result = run_parameters(cfg, params, stage=args.stage, train_steps=args.train_steps, report=inside,
                                progress=progress)
    except TrialFailure as exc:
        reason = " ".join(str(exc).split())
        logger.error("trial FAILED: %s", reason)
        print(f"trial failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, sort_keys=False))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m nni_effbert.trial``."""
    parser = argparse.ArgumentParser(
        prog="python -m nni_effbert.trial",
        description="Run one nni-effbert trial: a stage warm-up or a candidate evaluation. Inside NNI the "
                    "parameters come from the tuner; outside, pass --arch.",
    )
    parser.add_argument("-c", "--config", required=True, metavar="EXP.yml", help="experiment config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key; repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return add_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``python -m nni_effbert.trial``; returns the exit status."""
    from .cli import configure_runtime, one_line

    args = build_parser().parse_args(argv)
    configure_runtime(verbose=False, quiet=args.quiet)
    try:
        return run(args)
    except EffBertError as exc:
        print(f"nni-effbert trial: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
