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
* the **teacher trial** (``{"_teacher": true}``, the search's first trial when the work
  directory has no fine-tuned teacher) runs what ``nni-effbert teacher`` runs and reports the
  teacher's dev metric (``{"default": ..., "teacher": true, "metric": ..., "reused": ...}``);
* a **candidate** is an arch (``label -> value``) plus optional ``_stage`` and
  ``_train_steps``: the ``_``-prefixed keys are stripped, the arch is validated and scored by
  :class:`~.evaluator.KDEvaluator`.

Exit status: 0 on success; 1 when the trial failed (:class:`~.train.TrialFailure`: NaN loss,
failing shapes; ``disk full while writing <path>``; or out of memory -- the reason is logged and printed, nothing is reported, so
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
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from ..config import ExperimentConfig, each_task, experiment_config, load_config
from ..errors import ConfigError, DiskFullError, EffBertError, one_line
from ..kd.teacher_finetune import finetune_from_config
from ..kd.train import TrialFailure
from ..runtime import apply_gpu_memory_limit, configure_runtime, configure_threads, gpu_oom_reason, resolve_runtime
from ..params import (RESCORE_OF_KEY, STAGE_KEY, TRAIN_STEPS_KEY, add_arguments, echoed_ids, int_meta, is_placeholder, is_teacher,
                      is_warmup, placeholder_reason, read_arch_file, split_arch)
from .kd_evaluator import KDEvaluator
from .supernets import experiment_key
from .supervisor import (CHILD_ENV, EXIT_FAILED, PARAMETER_ENV, _die_with_parent, in_nni, supervise,  # noqa: F401
                         supervise_trial)  # supervise: re-exported
from .multitask_evaluator import MultiTaskEvaluator
from .multitask_warmup import run_multitask_warmup_parameters
from .warmup import run_warmup_parameters

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_BAD_INPUT",
    "add_arguments",
    "in_nni",
    "apply_memory_limit",
    "run_parameters",
    "run_teacher_parameters",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
#: Bad input: config, data, arch, missing checkpoint.
EXIT_BAD_INPUT = 2

def run_teacher_parameters(cfg: ExperimentConfig, *, report: bool = True, progress: bool = True,
                           echo: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the teacher trial: fine-tune (or reuse) the teacher into the work directory.

    Returns the metric dict ``{"default": dev metric, "teacher": True, "metric": name,
    "reused": bool}``; with ``report`` it goes to ``nni.report_final_result`` (the search
    keeps it out of the candidate ranking).
    """
    if cfg.tasks:  # every task's teacher; default = their mean dev metric, each task's under its key
        results = {key: finetune_from_config(one, progress=progress) for key, one in each_task(cfg)}
        metrics = {"default": float(sum(r.dev_metric for r in results.values()) / len(results)), "teacher": True,
                   "metric": "mean over tasks", "reused": all(r.reused for r in results.values()),
                   **{f"teacher.{key}": float(r.dev_metric) for key, r in results.items()}, **(echo or {})}
        logger.info("teachers of %s: %s", ", ".join(results), {k: round(r.dev_metric, 4) for k, r in results.items()})
    else:
        result = finetune_from_config(cfg, progress=progress)
        metrics = {"default": float(result.dev_metric), "teacher": True, "metric": result.metric,
                   "reused": bool(result.reused), **(echo or {})}
        logger.info("teacher %s: dev %s %.4f (%s)", "reused" if result.reused else "fine-tuned", result.metric,
                    result.dev_metric, result.path)
    if report:
        import nni  # local: only a trial inside NNI reports

        nni.report_final_result(metrics)
    return metrics


def run_parameters(cfg: ExperimentConfig, params: Mapping[str, Any], *, stage: Optional[int] = None,
                   train_steps: Optional[int] = None, report: bool = True, progress: bool = True,
                   setup=None, experiment: Optional[str] = None) -> Dict[str, Any]:
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
    experiment : str, optional
        Whose supernets to use (default: ``$NNI_EXP_ID``, see :mod:`.supernets`).

    Returns
    -------
    dict
        The final metric dict.
    """
    if is_teacher(params):
        return run_teacher_parameters(cfg, report=report, progress=progress, echo=echoed_ids(params))
    if cfg.tasks:  # a multi-task search (issue 27): the tasks share one supernet
        return _run_multitask_parameters(cfg, params, stage=stage, train_steps=train_steps, report=report,
                                         progress=progress, experiment=experiment)
    if is_warmup(params):
        return run_warmup_parameters(cfg, params, stage=stage, report=report, progress=progress, setup=setup,
                                     experiment=experiment)
    arch = split_arch(params)
    evaluator = KDEvaluator(cfg, stage=int_meta(params, STAGE_KEY) if stage is None else stage,
                            report=report, progress=progress, setup=setup, experiment=experiment)
    evaluator.reported_extra = echoed_ids(params)
    steps = train_steps if train_steps is not None else int_meta(params, TRAIN_STEPS_KEY)
    return evaluator.evaluate(arch, train_steps=steps, rescore_of=int_meta(params, RESCORE_OF_KEY))


def _run_multitask_parameters(cfg: ExperimentConfig, params: Mapping[str, Any], *, stage: Optional[int],
                              train_steps: Optional[int], report: bool, progress: bool,
                              experiment: Optional[str]) -> Dict[str, Any]:
    """A warm-up or candidate trial of a ``tasks:`` config: :func:`~.multitask_warmup.run_multitask_warmup`
    or :class:`~.multitask_evaluator.MultiTaskEvaluator` (combined ``default``, every task's values)."""
    if is_warmup(params):
        metrics = {**run_multitask_warmup_parameters(cfg, params, stage=stage, progress=progress,
                                                     experiment=experiment), **echoed_ids(params)}
    else:
        evaluator = MultiTaskEvaluator(cfg, int_meta(params, STAGE_KEY) if stage is None else stage,
                                       progress=progress, experiment=experiment)
        steps = train_steps if train_steps is not None else int_meta(params, TRAIN_STEPS_KEY)
        metrics = {**evaluator.evaluate(split_arch(params), train_steps=steps,
                                        rescore_of=int_meta(params, RESCORE_OF_KEY)), **echoed_ids(params)}
    if report:
        import nni  # local: only a trial inside NNI reports

        nni.report_final_result(metrics)
    return metrics


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
        if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
            return True  # a thread's stack could not be mapped: the address-space cap again
        exc = exc.__cause__ or exc.__context__
    return False


def run(args: argparse.Namespace) -> int:
    """Run a trial from parsed arguments (``config``, ``set``, ``arch``, ``stage``,
    ``train_steps``); returns the exit status. Bad input raises :class:`EffBertError`."""
    cfg = load_config(args.config, list(args.set or []))
    # A trial of experiment X ($NNI_EXP_ID, or --experiment X) runs with X's own config snapshot,
    # whatever a later search wrote into <workdir>/config.yml (the --config nnictl passes). The
    # first trials of a new nnictl experiment may start before `search` wrote the snapshot: they
    # read --config, which is the same file then.
    cfg = experiment_config(cfg, experiment_key(getattr(args, "experiment", None)), list(args.set or []),
                            fallback="given")
    configure_threads(cfg)
    runtime = resolve_runtime(cfg)  # a device or precision this machine lacks: exit 2 here
    logger.info("trial runs on %s", runtime.describe())
    inside = in_nni()
    if args.arch:
        params = read_arch_file(args.arch)
    elif inside:
        import nni  # local: only inside NNI

        params = _next_parameters()
        if params is None:
            raise ConfigError("NNI sent no parameters to this trial")
        logger.info("trial %s parameters: %s", nni.get_trial_id(), json.dumps(params, sort_keys=True))
    else:
        raise ConfigError("not running inside NNI: pass --arch ARCH.json with the parameters to run")
    if is_placeholder(params):
        # Started only so that NNI hands out parameters queued before it (strategies.nni.broker).
        logger.info("placeholder trial (%s): nothing to run", placeholder_reason(params))
        return EXIT_OK
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
                                progress=progress, experiment=getattr(args, "experiment", None))
    except (TrialFailure, DiskFullError, MemoryError, RuntimeError) as exc:
        _restore_memory_limit(previous)  # room to log the reason
        gpu_reason = gpu_oom_reason(exc, runtime)
        if gpu_reason is not None:
            reason = gpu_reason
        elif _out_of_memory(exc):
            reason = f"out of memory (limit {limit} MB)" if limit else "out of memory"
            detail = " ".join(str(exc).split())[:300]
            reason = f"{reason}: {detail}" if detail else reason
        elif isinstance(exc, (TrialFailure, DiskFullError)):
            reason = " ".join(str(exc).split())
        else:
            raise
        logger.error("trial FAILED: %s", reason)
        print(f"trial failed: {reason}", file=sys.stderr)
        if inside:
            _report_failure(reason, params)
        return EXIT_FAILED
    _restore_memory_limit(previous)
    print(json.dumps(result, sort_keys=False))
    return EXIT_OK


def _next_parameters() -> Optional[Dict[str, Any]]:
    """This trial's parameters: received by the supervisor already (:data:`PARAMETER_ENV`, then
    set as ``nni``'s current parameters so that reports carry their ``parameter_id``), else from
    ``nni.get_next_parameter()``."""
    import nni  # local: only inside NNI
    import nni.trial  # local: idem

    raw = os.environ.pop(PARAMETER_ENV, None)
    if raw is None:
        return nni.get_next_parameter()
    nni.trial._params = nni.load(raw)
    return nni.trial._params["parameters"]


def _report_failure(reason: str, params: Mapping[str, Any]) -> None:
    """Tell the search why this trial failed, and which parameters it ran (NNI may have queued
    others for this job): a final metric without ``default``, so the web UI never ranks it."""
    try:
        import nni  # local: only inside NNI

        nni.report_final_result({"failed": True, "reason": reason, **echoed_ids(params)})
    except Exception as exc:  # noqa: BLE001 - the trial fails either way; its exit status says so
        logger.warning("could not report the failure to NNI: %s", exc)


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
    args = build_parser().parse_args(argv)
    if os.environ.get(CHILD_ENV):
        _die_with_parent()
    elif in_nni() and not args.arch:
        # Run the trial in a supervised child (warm worker, or this very command line again).
        return supervise_trial()
    configure_runtime(verbose=False, quiet=args.quiet)
    try:
        return run(args)
    except EffBertError as exc:
        print(f"nni-effbert trial: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
