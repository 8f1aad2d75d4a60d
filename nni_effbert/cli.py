"""The ``nni-effbert`` command line: every subcommand, in one table.

::

    nni-effbert teacher        -c exp.yml               fine-tune (or reuse) the teacher, print its dev metric
    nni-effbert warmup         -c exp.yml --stage N     warm up stage N's weight-sharing supernet
    nni-effbert trial          -c exp.yml --arch A.json run one trial (what nnictl runs), print its metrics
    nni-effbert search         -c exp.yml [--wait]      the progressive search (nnictl, or --python)
    nni-effbert register-tuner                          register EfficientBertProgressive with nnictl
    nni-effbert export         -c exp.yml --experiment ID | --arch A.json [--onnx [--int8]]
    nni-effbert export-teacher -c exp.yml [--int8]      the fine-tuned teacher as ONNX (int8: the baseline to beat)
    nni-effbert distill        -c exp.yml [--export DIR] final KD of an exported student (default exports/searched)
    nni-effbert report         -c exp.yml [--experiment ID]
    nni-effbert quickstart     [--data-dir DIR]         all of it on the embedded SST-2 default
    nni-effbert fidelity       -c exp.yml --experiment ID [--sample K] [--steps N] [--repeat R] [--distill-seeds D]
    nni-effbert verify-export  PATH                     check an export folder's files against its recorded sha256

Every command takes ``-c/--config`` and repeatable ``--set dotted.key=value`` overrides, and
``--help``. Errors nni-effbert raises on purpose (:class:`~nni_effbert.errors.EffBertError`:
bad config, data, arch, missing checkpoint) end the command with a one-line message on
stderr and exit status 2, without a traceback.

This is the top of the package: it imports everything and nothing imports it.

Adding a command
----------------
Append a :class:`Command` to :data:`COMMANDS`: a name, a one-line help, ``run(args) -> int``, an
optional ``configure(parser)`` that adds the command's own options. The ``run`` functions import
the library inside their body: importing torch, transformers and nni costs seconds, and
``nni-effbert --help`` and argument errors must stay instant (the one place in the package
where imports are deliberately local).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

from . import __version__
from .errors import ConfigError, EffBertError, one_line
from .runtime import configure_runtime, configure_threads, resolve_runtime
from .workdir import WorkDir, check_experiment_id

if TYPE_CHECKING:  # annotations only: the CLI imports config lazily (fast --help)
    from .config import ExperimentConfig

__all__ = ["Command", "COMMANDS", "build_parser", "main"]


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


def _load_cfg(args: argparse.Namespace, experiment: Optional[str] = None, *, resume: bool = False,
              every_task: bool = False):
    """The command's config; with ``experiment``, that experiment's own config snapshot (plus the
    command's ``--set``; for a ``resume``, exactly the snapshot), see
    :func:`~nni_effbert.config.experiment_config`. For a multi-task config, the single-task config
    of ``--task`` (:func:`~nni_effbert.config.task_config`; an error without it), unless
    ``every_task`` and no ``--task``: then the multi-task config itself."""
    from .config import experiment_config, load_config, task_config

    cfg = load_config(args.config, list(args.set or []))
    if not (every_task and cfg.tasks and getattr(args, "task", None) is None):
        cfg = task_config(cfg, getattr(args, "task", None))
    if resume:
        # A resumed experiment goes on with its own config, exactly (other stages or budgets
        # would not fit the history it resumes); without a snapshot, the config given.
        resumed = experiment_config(cfg, experiment, fallback="given", option="--resume")
        if resumed is not cfg and args.set:
            logging.getLogger(__name__).warning("--set is not applied to a resumed experiment: %s goes on with its "
                                                "own config", experiment)
        cfg = resumed
    else:
        cfg = experiment_config(cfg, experiment, list(args.set or []))
    resolve_runtime(cfg)  # runtime.device / precision this machine cannot run: one line, exit 2
    configure_threads(cfg, concurrent=False)  # runtime.threads when set; else torch's default
    return cfg


# ---------------------------------------------------------------------------------------------
# teacher, warmup, trial
# ---------------------------------------------------------------------------------------------


def _run_teacher(args: argparse.Namespace) -> int:
    from .config import each_task
    from .kd.teacher_finetune import finetune_from_config

    cfg = _load_cfg(args, every_task=True)
    # A multi-task config without --task: every task's teacher, one after the other.
    for name, one in each_task(cfg):
        result = finetune_from_config(one, progress=not args.quiet)
        how = "reused" if result.reused else "fine-tuned"
        print(f"{'' if name is None else f'[{name}] '}teacher ({how}): {result.path}")
        print(f"{'' if name is None else f'[{name}] '}dev {result.metric} = {result.dev_metric:.4f}")
    return 0




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
    parser.add_argument("--experiment", metavar="ID",
                        help="write (or resume) this NNI experiment's supernet, supernet/ID/stage{N}.pt (default: "
                             "the work directory's own, supernet/stage{N}.pt, which no experiment reads)")


def _run_warmup(args: argparse.Namespace) -> int:
    from .nas.warmup import load_fixed_file, run_warmup

    cfg = _load_cfg(args, args.experiment, every_task=True)
    fixed = load_fixed_file(args.fixed) if args.fixed else None
    if cfg.tasks:  # a multi-task config without --task: one supernet for every task
        from .nas.multitask_warmup import run_multitask_warmup

        multi = run_multitask_warmup(cfg, args.stage, fixed=fixed, steps=args.steps, general_steps=args.general_steps,
                                     force=args.force, progress=not args.quiet, experiment=args.experiment)
        state = "already warmed up" if multi.skipped else f"steps per task {multi.task_steps}, from {multi.init}"
        print(f"stage {multi.stage} multi-task supernet ({state}): {multi.checkpoint}")
        return 0
    result = run_warmup(cfg, args.stage, fixed=fixed, steps=args.steps, general_steps=args.general_steps,
                        force=args.force, checkpoint_interval=args.checkpoint_every, progress=not args.quiet,
                        experiment=args.experiment)
    state = "already warmed up" if result.skipped else f"{result.plan.total_steps} steps from {result.init}"
    if result.resumed_at is not None:
        state += f", resumed at step {result.resumed_at}"
    print(f"stage {result.stage} supernet ({state}): {result.checkpoint}")
    if result.metrics:
        loss = f", KD loss {result.loss:.4f}" if result.loss is not None else ""
        print(f"reference arch on the search split: {result.metric} = {result.metrics['default']:.4f}{loss}")
    return 0




def _configure_trial(parser: argparse.ArgumentParser) -> None:
    from .params import add_arguments

    add_arguments(parser)


def _run_trial(args: argparse.Namespace) -> int:
    from .nas.trial_runner import run

    return run(args)

# ---------------------------------------------------------------------------------------------
# search, register-tuner
# ---------------------------------------------------------------------------------------------


def _configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="block until the experiment ends, stop it, print a per-trial summary")
    parser.add_argument("--python", action="store_true",
                        help="run NasExperiment + ProgressiveStrategy in this process instead of nnictl create "
                             "(warm-ups run here; always waits)")
    parser.add_argument("--port", type=int, metavar="N", help="web UI / REST port (default: a free one)")
    parser.add_argument("--resume", metavar="ID",
                        help="resume this stopped experiment of the work directory (with --python: a NasExperiment "
                             "search); the search goes on where it stopped, with the experiment's own config "
                             "(<workdir>/nni-experiments/ID/effbert.yml; -c only locates the work directory)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait: stop the experiment and fail after this long")
    parser.add_argument("--no-warm-worker", action="store_true",
                        help="start every trial in a fresh interpreter instead of forking it from a warm worker "
                             "(the config's search.warm_worker: false)")


def _run_search(args: argparse.Namespace) -> int:
    """0 on success, 1 if the experiment ended in ERROR or nothing scored, 130 when stopped."""
    from .nas.launcher import format_trials, run_search
    from .nas.records import is_failed

    cfg = _load_cfg(args, args.resume, resume=True, every_task=True)  # tasks: without --task searches them all
    if args.no_warm_worker:
        cfg.search.warm_worker = False
    result = run_search(cfg, config_path=args.config, wait=args.wait, python=args.python, port=args.port,
                        progress=not args.quiet, timeout=args.timeout, resume=args.resume)
    if result.status == "RUNNING":
        return 0
    if result.status == "STOPPED":  # Ctrl-C / SIGTERM on the --python path; resumable
        if result.trials:
            print(format_trials(result.trials))
        print(f"experiment {result.experiment_id}: STOPPED")
        return 130
    if result.trials:
        print(format_trials(result.trials))
    if result.trials_file is not None:
        print(f"trial records: {result.trials_file}")
    print(f"experiment {result.experiment_id}: {result.status}")
    if result.error:
        print(f"nni-effbert search: error: experiment {result.experiment_id} ended in ERROR: {result.error}",
              file=sys.stderr)
        return 1
    if not result.ok:
        failed = [t for t in result.trials if is_failed(t)]
        why = "has no succeeded candidate"
        if failed:
            first = next((" ".join(str(t["message"]).split()) for t in failed if t.get("message")), "")
            why = (f"ended {result.status}, but no candidate was scored: {len(failed)} trial(s) failed"
                   + (f" (first failure: {first[:300]})" if first else "")
                   + f"; trial logs: {result.workdir / 'nni-experiments' / result.experiment_id}"
                   "/environments/*/trials/<trial id>/trial.stderr")
        print(f"nni-effbert search: error: experiment {result.experiment_id} {why}", file=sys.stderr)
        return 1
    return 0


def _run_register_tuner(args: argparse.Namespace) -> int:
    from .nas.launcher import SearchError
    from .strategies.nni.registration import meta_file, register_tuner

    try:
        meta = register_tuner()
    except (ImportError, ValueError, OSError) as exc:
        raise SearchError(f"cannot register the tuner ({exc})") from exc
    kind = "advisor" if meta.get("isAdvisor") else "tuner"
    print(f"registered {meta.get('builtinName')} ({kind} {meta.get('className')}) from {meta_file()}")
    print("use it in an nnictl config as: tuner: {name: %s, classArgs: {config: exp.yml}}" % meta.get("builtinName"))
    return 0

# ---------------------------------------------------------------------------------------------
# export, distill, report, quickstart
# ---------------------------------------------------------------------------------------------


def _configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", metavar="ID",
                        help="NNI experiment id: export its best succeeded trial, with that experiment's supernets "
                             "(with --arch: the arch, with that experiment's supernets)")
    parser.add_argument("--pareto", action="store_true",
                        help="with --experiment: list the trials on the score-vs-latency Pareto front (last stage; "
                             "predicted latency where the trials reported it); exports nothing unless "
                             "--max-latency / --min-speedup is given")
    parser.add_argument("--max-latency", type=float, metavar="MS",
                        help="with --experiment: export the best trial whose latency is at most MS milliseconds")
    parser.add_argument("--min-speedup", type=float, metavar="X",
                        help="with --experiment: export the best trial at least X times faster than the teacher")
    parser.add_argument("--arch", metavar="ARCH.json", help="export this architecture (label -> value JSON object)")
    parser.add_argument("--name", default="searched", help="export folder name under <workdir>/exports (default searched)")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="with --arch: supernet stage to take the weights from (default: the latest)")
    parser.add_argument("--experiments-dir", metavar="DIR",
                        help="NNI experiments folder, when the experiment is not in NNI's manifest")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing export of the same name (its weights, and any distilled student "
                             "and distill record in it, are lost)")
    _configure_onnx(parser, "also write model.onnx (ONNX Runtime) into the folder, checked on dev rows; without "
                            "--experiment / --arch: add it to the existing exports/NAME (e.g. after distill); a tasks: config "
                            "without --task: every task's")


def _configure_onnx(parser: argparse.ArgumentParser, help_onnx: str) -> None:
    parser.add_argument("--onnx", action="store_true", help=help_onnx)
    parser.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx (onnxruntime dynamic int8 quantization); implies --onnx")


def _export_onnx(cfg: ExperimentConfig, folder, args: argparse.Namespace, teacher: bool = False,
                 label: Optional[str] = None) -> None:
    from .product.onnx import CHECK_FILE, check_model_folder, export_onnx, export_teacher_onnx, task_rows, teacher_folder

    teacher_folder(cfg) if teacher else check_model_folder(folder)  # before reading the task's rows
    rows, labels, source = task_rows(cfg)
    if teacher:
        out = export_teacher_onnx(cfg, int8=args.int8, rows=rows, labels=labels, rows_source=source)
    else:
        out = export_onnx(folder, int8=args.int8, rows=rows, labels=labels, rows_source=source)
    tag = "" if label is None else f"[{label}] "
    print(tag + out.summary())
    print(f"{tag}check: {out.folder / CHECK_FILE}")


def _run_export(args: argparse.Namespace) -> int:
    if args.int8:
        args.onnx = True
    if args.onnx and args.experiment is None and args.arch is None:
        from .config import each_task

        # A multi-task config without --task: every task's exports/NAME.
        for name, one in each_task(_load_cfg(args, every_task=True)):
            folder = WorkDir.of(one).export_dir(args.name)
            _export_onnx(one, folder, args, label=name)
            print(folder)
        return 0
    if args.experiment is None and args.arch is None:
        raise ConfigError("export needs --experiment ID (its best trial) or --arch ARCH.json (or both: the arch "
                          "with that experiment's supernets)")
    if args.stage is not None and args.arch is None:
        raise ConfigError("--stage goes with --arch; with --experiment the best trial's own stage is used")
    from .product.students import export_arch, export_best

    cfg = _load_cfg(args, args.experiment, every_task=True)
    limited = args.max_latency is not None or args.min_speedup is not None
    if cfg.tasks:  # a multi-task search without --task: its arch for every task
        return _export_multitask(cfg, args, limited)
    if (args.pareto or limited) and (not args.experiment or args.arch):
        raise ConfigError("--pareto, --max-latency and --min-speedup go with --experiment ID (without --arch)")
    if args.pareto:
        _print_pareto(cfg, args)
        if not limited:
            return 0
    if limited:
        from .product.latency_exports import export_within_latency, latency_limit

        limit = latency_limit(cfg, max_latency_ms=args.max_latency, min_speedup=args.min_speedup)
        info = export_within_latency(cfg, args.experiment, limit, name=args.name, experiments_dir=args.experiments_dir,
                                     progress=not args.quiet, force=args.force)
        t = info.trial
        print(f"best trial within {limit:.3f} ms: {t['trial_id']} (stage {t['stage']}, dev {t['metric']:.4f}, "
              f"{t['latency_ms']:.3f} ms {t['latency_source']}), {info.params} params, weights from {info.source}")
    elif args.experiment and not args.arch and cfg.search.objective.uses_latency:
        from .product.latency_exports import export_best_objective

        info = export_best_objective(cfg, args.experiment, name=args.name, experiments_dir=args.experiments_dir,
                                     progress=not args.quiet, force=args.force)
        t = info.trial
        print(f"best trial by the {cfg.search.objective.kind} objective {t['trial_id']} (stage {t['stage']}, dev "
              f"{t['metric']:.4f}, {t['latency_ms']:.3f} ms, objective {t['objective']:.4f}), {info.params} params, "
              f"weights from {info.source}")
    elif args.experiment and not args.arch:
        info = export_best(cfg, args.experiment, name=args.name, experiments_dir=args.experiments_dir,
                           progress=not args.quiet, force=args.force)
        t = info.trial
        print(f"best trial {t['trial_id']} (stage {t['stage']}, search score {t['metric']:.4f}), "
              f"{info.params} params ({info.non_embedding_params} non-embedding), weights from {info.source}")
    else:
        info = export_arch(cfg, args.arch, name=args.name, stage=args.stage, progress=not args.quiet,
                           experiment=args.experiment, force=args.force)
        print(f"{info.params} params ({info.non_embedding_params} non-embedding), weights from {info.source}")
    if args.onnx:
        _export_onnx(cfg, info.path, args)
    print(info.path)
    return 0


def _export_multitask(cfg: ExperimentConfig, args: argparse.Namespace, limited: bool) -> int:
    from .params import arch_part, read_arch_file
    from .product.suite import export_multitask

    if args.experiment is None or args.pareto or limited:
        raise ConfigError("a tasks: config exports with --experiment ID (its best candidate, or --arch with --stage) "
                          "for every task; --pareto, --max-latency and --min-speedup go with --task NAME")
    arch = arch_part(read_arch_file(args.arch)) if args.arch else None
    infos = export_multitask(cfg, args.experiment, name=args.name, arch=arch, stage=args.stage,
                             experiments_dir=args.experiments_dir, force=args.force, progress=not args.quiet)
    for task, info in infos.items():
        print(f"[{task}] {info.params} params ({info.non_embedding_params} non-embedding), weights from "
              f"{info.source}: {info.path}")
    if args.onnx:
        from .config import each_task

        for task, one in each_task(cfg):
            _export_onnx(one, infos[task].path, args, label=task)
    return 0


def _configure_export_teacher(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (the quantized-teacher baseline)")


def _run_export_teacher(args: argparse.Namespace) -> int:
    from .config import each_task

    # A multi-task config without --task: every task's teacher.
    for name, one in each_task(_load_cfg(args, every_task=True)):
        _export_onnx(one, None, args, teacher=True, label=name)
    return 0


def _print_pareto(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from .nas.latency_ranking import latency_front
    from .nas.records import read_nni_trials
    from .product.students import experiments_dir_of

    trials = read_nni_trials(args.experiment, experiments_dir=experiments_dir_of(cfg, args.experiments_dir))
    front = latency_front(trials)
    print(f"Pareto front of experiment {args.experiment} (score vs latency, last stage): {len(front)} trial(s)")
    print("| trial | stage | score | latency (ms) | latency from | measured (ms) | params |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for t in front:
        measured = f"{t['measured_latency_ms']:.3f}" if t["measured_latency_ms"] is not None else "-"
        print(f"| {t['trial_id']} | {t['stage']} | {t['metric']:.4f} | {t['latency_ms']:.3f} | {t['latency_source']} "
              f"| {measured} | {t['params'] if t['params'] is not None else '-'} |")


def _configure_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", metavar="DIR",
                        help="export folder (from `nni-effbert export`; default <workdir>/exports/searched, "
                             "where `nni-effbert export` writes by default)")
    parser.add_argument("--force", action="store_true",
                        help="distil again even if the folder was already distilled with the same budget")


def _run_distill(args: argparse.Namespace) -> int:
    from .product.distill import run_distill

    cfg = _load_cfg(args, every_task=args.export is None)
    if cfg.tasks:  # general KD once, then every task's student from it
        from .product.suite import distill_multitask

        for task, r in distill_multitask(cfg, force=args.force, progress=not args.quiet).items():
            print(f"[{task}] {r.path}: dev {r.metric} = {r.dev_metric:.4f}; latency {r.latency_ms:.2f} ms; "
                  f"{r.params} params")
        return 0
    export = args.export or WorkDir.of(cfg).export_dir("searched")
    r = run_distill(cfg, export, force=args.force, progress=not args.quiet)
    state = "already distilled" if r.skipped else f"{r.plan.general_steps} general + {r.plan.task_steps} task KD steps"
    before = f"{r.before:.4f} -> " if r.before is not None else ""
    print(f"{r.path} ({state})")
    print(f"dev {r.metric} = {before}{r.dev_metric:.4f}; latency {r.latency_ms:.2f} ms (batch 1, seq {r.seq_length}); "
          f"{r.params} params ({r.non_embedding_params} non-embedding)")
    return 0


def _configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", metavar="ID",
                        help="NNI experiment id (default: the one the searched export came from)")
    parser.add_argument("--export", metavar="DIR", help="the distilled searched student (default <workdir>/exports/searched)")
    parser.add_argument("--experiments-dir", metavar="DIR",
                        help="NNI experiments folder, when the experiment is not in NNI's manifest")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure every latency and choose the latency-matched baseline again (default: reuse "
                             "what an earlier report of the same students measured, reports/measurements.json)")


def _run_report(args: argparse.Namespace) -> int:
    from .product.report import build_report

    cfg = _load_cfg(args, args.experiment, every_task=True)
    if cfg.tasks:  # the suite report: every task, the latency-matched baseline through the same steps
        from .product.suite import ensure_multitask_baseline, suite_report

        if args.export:
            raise ConfigError("report --export goes with --task NAME; a tasks: config reports every task's "
                              "exports/searched")
        ensure_multitask_baseline(cfg, force=args.remeasure, progress=not args.quiet)
        print(suite_report(cfg, progress=not args.quiet)["markdown"])
        print(WorkDir.of(cfg).root / "reports" / "suite.md")
        return 0
    out = build_report(cfg, experiment=args.experiment, searched_dir=args.export,
                       experiments_dir=args.experiments_dir, progress=not args.quiet, remeasure=args.remeasure)
    print(out.table)
    for c in out.comparisons:
        print(f"{c.name_a} - {c.name_b} (dev, paired, 95% CI): {c.summary()}")
    print(f"report: {out.result.report}")
    for path in out.result.plots.values():
        print(f"plot: {path}")
    return 0


def _configure_quickstart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="GLUE folder holding SST-2/{train,dev}.tsv (default $EFFBERT_DATA_DIR, else the hub)")
    parser.add_argument("--workdir", default="effbert-quickstart", metavar="DIR",
                        help="where everything goes (default ./effbert-quickstart)")
    parser.add_argument("--budget", default="default", choices=("default", "smoke"),
                        help="default (<= 15 min on 2 CPU cores) or smoke (smallest budgets, <= 5 min)")
    parser.add_argument("--port", type=int, help="NNI web UI port (default: the search's default)")


def _run_quickstart(args: argparse.Namespace) -> int:
    """Prints the table and the paths of the report and the exported model."""
    import time
    from pathlib import Path

    from .config import load_config
    from .product.quickstart import SMOKE_NOTE, run_pipeline, write_config

    started = time.perf_counter()
    workdir = Path(args.workdir).expanduser().absolute()
    path = write_config(workdir, args.budget, args.data_dir)
    cfg = load_config(path)
    out = run_pipeline(cfg, path, port=args.port, progress=not args.quiet)
    total = time.perf_counter() - started
    print(out.report.table)
    for c in out.report.comparisons:
        print(f"{c.name_a} - {c.name_b} (dev, paired, 95% CI): {c.summary()}")
    print(f"report: {out.report.result.report}")
    print(f"exported model: {out.export.path}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in out.timings.items()) + f"; total {total:.0f}s")
    if args.budget == "smoke":
        print(f"note: {SMOKE_NOTE}")
    return 0

# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------


def _configure_fidelity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, metavar="ID", help="NNI experiment id whose candidates to measure")
    parser.add_argument("--sample", type=int, default=12, metavar="K",
                        help="candidates to distil: the best, the worst and seeded random ones between (default 12)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="total distill steps per candidate (default: the config's distill budget; split "
                             "between general and task KD in the config's proportion)")
    parser.add_argument("--repeat", type=int, default=0, metavar="R",
                        help="also re-score the K archs with R other evaluator seeds (test-retest ceiling)")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="stage to sample from (default: the stage with the most scored candidates)")
    parser.add_argument("--distill-seeds", type=int, default=1, metavar="D",
                        help="distil each arch with D distill seeds; the final score is their mean and the final's "
                             "own seed-to-seed Kendall tau is reported (default 1)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the sample (default: the config's seed)")
    parser.add_argument("--experiments-dir", metavar="DIR",
                        help="NNI experiments folder, when the experiment is not in NNI's manifest")


def _run_fidelity(args: argparse.Namespace) -> int:
    from .product.fidelity import run_fidelity

    cfg = _load_cfg(args, args.experiment)
    out = run_fidelity(cfg, args.experiment, sample=args.sample, steps=args.steps, repeat=args.repeat,
                       stage=args.stage, seed=args.seed, experiments_dir=args.experiments_dir,
                       progress=not args.quiet, distill_seeds=args.distill_seeds)
    print(out.summary)
    print(f"distilled {out.distilled} arch(s), reused {out.reused} recorded; re-scored {out.rescored}")
    for path in (out.json_path, out.md_path, out.png_path):
        print(f"written: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# verify-export
# ---------------------------------------------------------------------------------------------


def _configure_verify_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="an export folder (e.g. <workdir>/exports/searched)")


def _run_verify_export(args: argparse.Namespace) -> int:
    from .product.loader import load_exported, verify_export

    hashes = verify_export(args.path)
    load_exported(args.path, verify=False)  # config.json / arch.json / weights agree with each other
    code = sorted(n for n in hashes if n.endswith(".py"))
    print(f"{args.path}: OK, {len(hashes)} files match export_meta.json (code: {', '.join(code)})")
    return 0


# ---------------------------------------------------------------------------------------------
# The command table
# ---------------------------------------------------------------------------------------------

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
    Command("search", "run the progressive search with nnictl (or NasExperiment with --python)", _run_search,
            _configure_search,
            description="Save the resolved config (<workdir>/config.yml, and the experiment's own copy "
                        "<workdir>/nni-experiments/ID/effbert.yml that `--experiment ID` commands, its trials and a "
                        "resume read) and an nnictl config into the work directory, register the "
                        "EfficientBertProgressive tuner if needed and run `nnictl create`; prints the web UI URL "
                        "and the experiment id. --wait blocks until it ends, stops it and prints the trials "
                        "(exit 1 if it ended in ERROR). --python runs NasExperiment + ProgressiveStrategy in this "
                        "process instead (warm-ups run here; records also go to <workdir>/trials.json)."),
    Command("register-tuner", "register EfficientBertProgressive with NNI (nnictl algo register)", _run_register_tuner,
            needs_config=False,
            description="Register the progressive search as the NNI builtin tuner EfficientBertProgressive "
                        "(idempotent; same as `nnictl algo register --meta <package>/resources/tuner_meta.yml`)."),
    Command("export", "export the best trial (--experiment) or an arch file (--arch) as a transformers folder",
            _run_export, _configure_export,
            description="Export a student into <workdir>/exports/NAME, loadable by transformers alone: the "
                        "best succeeded trial of an NNI experiment (weights sliced from its stage's supernet) "
                        "or the architecture of a JSON file. Prints the folder."),
    Command("verify-export", "check an export folder's code, weights and config against export_meta.json's sha256",
            _run_verify_export, _configure_verify_export, needs_config=False,
            description="Compare every file of an export folder with the sha256 recorded in its export_meta.json "
                        "(files_sha256) at export time, refuse Python files that were not exported, and check that "
                        "config.json describes the same architecture as arch.json. Run it before loading the folder "
                        "with trust_remote_code=True, which imports the folder's *.py files. Exit 0 if the folder "
                        "is intact, 2 (one line naming the file) if not."),
    Command("export-teacher", "export the fine-tuned teacher as ONNX (--int8: also the quantized teacher)",
            _run_export_teacher, _configure_export_teacher,
            description="Write <workdir>/exports/teacher: the fine-tuned teacher as model.onnx (and with --int8 "
                        "model.int8.onnx, dynamic int8: the cheapest speed-up, the baseline a searched student "
                        "has to beat) with its tokenizer and config, checked against PyTorch on dev rows "
                        "(onnx_check.json). Needs the [deploy] extra."),
    Command("distill", "final KD of an exported student (general, then task KD); saves it into the folder",
            _run_distill, _configure_distill,
            description="Distil the teacher into an exported student with the distill: budget: general KD "
                        "(hidden states + attentions on unlabeled text), then task KD (with predictions). "
                        "Scores it on dev, measures its latency and re-exports it into the same folder."),
    Command("report", "write report.md + plots and print teacher / baseline / searched student table",
            _run_report, _configure_report,
            description="Read the experiment's trials, distil the hand-designed baseline (BERT MLP, stack 1, "
                        "width matched to the searched student's size) if it is missing, and write "
                        "<workdir>/reports/report.md with plots; prints the comparison table."),
    Command("quickstart", "run the whole pipeline on the embedded SST-2 default (teacher -> search -> report)",
            _run_quickstart, _configure_quickstart, needs_config=False,
            description="Fine-tune the MiniLM teacher on SST-2, search, export, distil the searched student "
                        "and the baseline, and write the report, on the embedded default config."),
    Command("latency", "build the per-device latency table of the student space (--check N: test it)",
            lambda args: _run_latency(args), lambda parser: _configure_latency(parser),
            description="Time every component of the student space (embeddings, attention, MLP per width, "
                        "expression slots, heads) at evaluator.latency_{device,threads,batch_size,seq_length} "
                        "and store the table in <workdir>/latency/ (resumable; reused while the key matches). "
                        "--check N measures N random archs end to end and reports the predictor's MAPE and "
                        "Kendall tau (<workdir>/latency/check.json; check-RUNTIME.json under an "
                        "evaluator.latency_runtime other than torch)."),
    Command("fidelity", "measure how well the search score predicts the distilled dev score (Kendall tau)",
            _run_fidelity, _configure_fidelity,
            description="Distil K scored candidates of an experiment (best, worst, seeded random between) as "
                        "`nni-effbert distill` would, score them on dev, and write <workdir>/reports/"
                        "fidelity.{md,json,png}: Kendall tau / Spearman rho (p-values) and top-1 / top-3 hit "
                        "rates of the search score, for every objective. --repeat R re-scores the archs with R "
                        "other evaluator seeds (test-retest ceiling). Resumable: recorded archs are not redone."),
]


def _configure_latency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="measure N random archs end to end against the table's prediction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --check archs (default 0)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per --check arch (median; default 30)")


def _run_latency(args: argparse.Namespace) -> int:
    from .config import each_task
    from .io import atomic_write_json
    from .latency.check import check_table
    from .latency.components import random_archs
    from .latency.settings import LATENCY_DIR, latency_settings
    from .latency.table import table_for_config
    from .latency.targets import teacher_latency_ms
    from .workdir import WorkDir

    # A multi-task config without --task: the one table its search reads (<workdir>/latency);
    # latency depends on the student space and evaluator.latency_*, not on the task.
    cfg = _load_cfg(args, every_task=True)
    if args.check < 0 or args.repeats < 1:
        raise ConfigError("--check must be >= 0 and --repeats >= 1")
    settings = latency_settings(cfg)
    table = table_for_config(cfg, progress=not args.quiet)
    lo, hi = table.latency_range()
    print(f"latency table: {table.path} ({len(table.entries)} entries; {table.key['device']}, runtime "
          f"{settings.runtime}, torch {table.key['torch']}, {settings.threads} thread(s), batch {settings.batch_size}, "
          f"seq {settings.seq_length})")
    print(f"predicted latency of the space: {lo:.3f} .. {hi:.3f} ms")
    for key, one in each_task(cfg):
        teacher = teacher_latency_ms(one)
        if teacher is not None:
            print(f"teacher{'' if key is None else f' of {key}'}: {teacher:.3f} ms (speed-up of the space: "
                  f"{teacher / hi:.2f}x .. {teacher / lo:.2f}x)")
    if args.check:
        result = check_table(table, random_archs(table.config, args.check, seed=args.seed), settings,
                             repeats=args.repeats, progress=not args.quiet)
        suffix = "" if settings.runtime == "torch" else f"-{settings.runtime}"
        out = WorkDir.of(cfg).root / LATENCY_DIR / f"check{suffix}.json"
        atomic_write_json({**result.to_dict(), "table": str(table.path), "seed": args.seed}, out)
        print(f"check on {args.check} random archs ({settings.runtime}): MAPE {result.mape:.2f}%, Kendall tau "
              f"{result.kendall_tau:.3f} (p {result.kendall_p:.2g}) -> {out}")
    return 0


def build_parser(commands: Sequence[Command] = None) -> argparse.ArgumentParser:
    """The ``nni-effbert`` parser with one subparser per command."""
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
    with_config.add_argument("--task", metavar="NAME", default=None,
                             help="a multi-task config (tasks:): run on this task, in its own work directory "
                                  "<workdir>/tasks/NAME (without --task: teacher fine-tunes every task's teacher, warmup "
                                  "warms up one supernet for all the tasks, latency builds the one table the "
                                  "multi-task search reads)")
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
        for option in ("experiment", "resume"):  # ids become paths: checked before anything is read
            if getattr(args, option, None) is not None:
                check_experiment_id(getattr(args, option), f"--{option}")
        return int(cmd.run(args) or 0)
    except EffBertError as exc:
        print(f"nni-effbert {cmd.name}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nni-effbert {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
