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
failing shapes; or out of memory -- the reason is logged and printed, nothing is reported, so
NNI marks the trial FAILED); 2 for bad input (config, data, arch, missing checkpoint), with a
one-line message.

Inside NNI the trial runs in a child process of a small supervisor (the same command line):
a training process killed by a signal (SIGKILL from the kernel's out-of-memory killer or an
operator) exits with no status, which NNI 3.0 records as ``USER_CANCELED`` and without a
reason; the supervisor turns it into exit status 1 and prints ``trial failed: trial process
killed by SIGKILL``, so the trial is FAILED with its reason in the trial log. The child dies
with its supervisor (``PR_SET_PDEATHSIG``), so cancelling the trial leaves no orphan.

``evaluator.memory_limit_mb`` caps the trial process's address space (``RLIMIT_AS``, set
once the config is read); an allocation beyond it (``MemoryError``, or torch's "can't
allocate memory") fails the trial with the reason ``out of memory (limit N MB)``.

On a GPU (``runtime.device``; inside NNI, ``auto`` is the GPU NNI assigned through
``CUDA_VISIBLE_DEVICES``) a CUDA out-of-memory error fails the trial the same way, with the
reason ``out of GPU memory (N MiB on cuda:K)``: ``N`` is ``runtime.gpu_memory_mb`` when set (a
per-process cap, for trials sharing a GPU), else the device's memory. ``RLIMIT_AS`` is not set
on a GPU: CUDA reserves far more address space than it uses and would fail to start under it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from ..config import load_config
from ..errors import ConfigError, EffBertError, one_line
from ..kd.train import TrialFailure
from ..runtime import apply_gpu_memory_limit, configure_runtime, configure_threads, gpu_oom_reason, resolve_runtime
from .evaluator import KDEvaluator
from .params import add_arguments, int_meta, is_warmup, read_arch_file, split_arch
from .warmup import run_warmup_parameters

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_BAD_INPUT",
    "add_arguments",
    "in_nni",
    "apply_memory_limit",
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

def in_nni() -> bool:
    """True when this process is a trial started by NNI (its platform variables are set)."""
    platform = os.environ.get("NNI_PLATFORM")
    return bool(os.environ.get("NNI_TRIAL_COMMAND_CHANNEL")) or (bool(platform) and platform != "unittest")


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
    if is_warmup(params):
        return run_warmup_parameters(cfg, params, stage=stage, report=report, progress=progress, setup=setup)
    arch = split_arch(params)
    evaluator = KDEvaluator(cfg, stage=int_meta(params, "_stage") if stage is None else stage,
                            report=report, progress=progress, setup=setup)
    steps = train_steps if train_steps is not None else int_meta(params, "_train_steps")
    return evaluator.evaluate(arch, train_steps=steps)


def apply_memory_limit(limit_mb: Optional[int]):
    """Cap this process's address space at ``limit_mb`` MB (``RLIMIT_AS``); returns the previous
    soft limit (to restore before reporting), or None when no cap was set."""
    if not limit_mb:
        return None

    import torch  # local: started only when a memory cap is set

    # Start the thread pools first: a worker thread created under the cap reserves its stack
    # and malloc arena, and libgomp exits the whole process (no reason given) when that fails.
    torch.ones(1 << 20).add_(1.0)
    torch.ones(64, 64) @ torch.ones(64, 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = int(limit_mb) * 2 ** 20
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    logger.info("memory limit: %d MB of address space", limit_mb)
    return soft


def _restore_memory_limit(previous) -> None:
    if previous is None:
        return

    resource.setrlimit(resource.RLIMIT_AS, (previous, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _out_of_memory(exc: Optional[BaseException]) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an allocation failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                              or "Cannot allocate memory" in str(exc)):
            return True  # torch's CPU allocator raises RuntimeError, not MemoryError
        exc = exc.__cause__ or exc.__context__
    return False


def run(args: argparse.Namespace) -> int:
    """Run a trial from parsed arguments (``config``, ``set``, ``arch``, ``stage``,
    ``train_steps``); returns the exit status. Bad input raises :class:`EffBertError`."""
    cfg = load_config(args.config, list(args.set or []))
    configure_threads(cfg)
    runtime = resolve_runtime(cfg)  # a device or precision this machine lacks: exit 2 here
    logger.info("trial runs on %s", runtime.describe())
    inside = in_nni()
    if args.arch:
        params = read_arch_file(args.arch)
    elif inside:
        import nni  # local: only inside NNI

        params = nni.get_next_parameter()
        if params is None:
            raise ConfigError("NNI sent no parameters to this trial")
        logger.info("trial %s parameters: %s", nni.get_trial_id(), json.dumps(params, sort_keys=True))
    else:
        raise ConfigError("not running inside NNI: pass --arch ARCH.json with the parameters to run")
    progress = not getattr(args, "quiet", False)
    limit = cfg.evaluator.memory_limit_mb
    if limit and runtime.is_cuda:
        logger.warning("evaluator.memory_limit_mb is not applied on %s (CUDA cannot start under RLIMIT_AS); "
                       "runtime.gpu_memory_mb caps GPU memory", runtime.device)
        limit = None
    apply_gpu_memory_limit(runtime)
    # What the trial runs is imported at the top of this module, before the cap: an import under
    # a nearly exhausted cap was seen to spin forever instead of raising (NNI's modules, 1000 MB).
    previous = apply_memory_limit(limit)
    try:
        result = run_parameters(cfg, params, stage=args.stage, train_steps=args.train_steps, report=inside,
                                progress=progress)
    except (TrialFailure, MemoryError, RuntimeError) as exc:
        _restore_memory_limit(previous)  # room to log the reason
        gpu_reason = gpu_oom_reason(exc, runtime)
        if gpu_reason is not None:
            reason = gpu_reason
        elif _out_of_memory(exc):
            reason = f"out of memory (limit {limit} MB)" if limit else "out of memory"
            detail = " ".join(str(exc).split())[:300]
            reason = f"{reason}: {detail}" if detail else reason
        elif isinstance(exc, TrialFailure):
            reason = " ".join(str(exc).split())
        else:
            raise
        logger.error("trial FAILED: %s", reason)
        print(f"trial failed: {reason}", file=sys.stderr)
        return EXIT_FAILED
    _restore_memory_limit(previous)
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


#: Set (to the supervisor's pid) in the environment of the supervised trial process.
CHILD_ENV = "NNI_EFFBERT_TRIAL_SUPERVISOR"


def _die_with_parent() -> None:
    """In the supervised child: get SIGKILL when the supervisor dies (Linux), so a cancelled
    trial leaves no orphan training; exit at once if it is already gone."""

    try:
        import ctypes  # local: Linux prctl, supervised child only

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphan may finish its trial; NNI ignores its result
    if str(os.getppid()) != os.environ.get(CHILD_ENV):
        sys.exit(EXIT_FAILED)


def supervise(command: Sequence[str]) -> int:
    """Run ``command`` (this trial's own command line) as a child and return its exit status;
    a child killed by a signal becomes :data:`EXIT_FAILED` with the reason printed to stderr.
    SIGTERM and SIGINT received by the supervisor are passed on to the child, and the supervisor
    then dies of the same signal (a cancelled trial stays cancelled)."""

    child = subprocess.Popen(list(command), env=dict(os.environ, **{CHILD_ENV: str(os.getpid())}))
    received = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    if received:
        # NNI (or a user) stopped the trial: die of the same signal, so NNI still records a
        # cancelled trial (USER_CANCELED), not a failure.
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    if rc >= 0:
        return rc
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
    print(f"trial failed: trial process killed by {name}{hint}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``python -m nni_effbert.trial``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if os.environ.get(CHILD_ENV):
        _die_with_parent()
    elif in_nni() and not args.arch:
        # Re-run this very command line (a wrapper script included) under a supervisor.
        return supervise([sys.executable, *sys.orig_argv[1:]])
    configure_runtime(verbose=False, quiet=args.quiet)
    try:
        return run(args)
    except EffBertError as exc:
        print(f"nni-effbert trial: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
