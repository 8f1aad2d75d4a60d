"""The product commands: ``export``, ``distill``, ``report`` and ``quickstart``.

::

    nni-effbert export  -c exp.yml --experiment ID      best succeeded trial -> exports/searched
    nni-effbert export  -c exp.yml --arch arch.json     a known architecture  -> exports/searched
    nni-effbert distill -c exp.yml --export DIR         final KD (general, then task), saved into DIR
    nni-effbert report  -c exp.yml [--experiment ID]    report.md + plots, and the comparison table
    nni-effbert quickstart [--data-dir DIR]             all of it on the embedded SST-2 default

The library functions (:func:`export_best`, :func:`export_arch`, :func:`ensure_baseline`,
:func:`build_report`) are what the commands call; :mod:`nni_effbert.quickstart` chains them.
Each ``Command`` is appended to :data:`nni_effbert.cli.COMMANDS` there.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import CheckpointError, ConfigError

__all__ = [
    "SEARCHED",
    "BASELINE",
    "ExportInfo",
    "ReportOutcome",
    "export_best",
    "export_arch",
    "ensure_baseline",
    "teacher_row",
    "student_row",
    "build_report",
    "COMMANDS",
]

logger = logging.getLogger(__name__)

#: Default export names inside ``<workdir>/exports``.
SEARCHED = "searched"
BASELINE = "baseline"


@dataclass
class ExportInfo:
    """What an export wrote.

    Attributes
    ----------
    path : Path
        The export folder.
    arch : dict
    params, non_embedding_params : int
    source : str
        Where the weights came from (``stage 2 supernet``).
    trial : dict or None
        The best trial it was taken from (``--experiment``).
    """

    path: Path
    arch: Dict[str, Any]
    params: int
    non_embedding_params: int
    source: str
    trial: Optional[Dict[str, Any]] = None


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def _export(evaluator, arch: Dict[str, Any], stage: Optional[int], name: str, extra: Dict[str, Any]) -> ExportInfo:
    """Export ``arch`` with the supernet weights of ``stage`` into ``exports/<name>``."""
    from .export import export_student

    setup = evaluator.setup
    source = evaluator.load_stage(stage)
    if "random initialisation" in source:
        # A student sliced from an untrained supernet is not a searched result: refuse rather than
        # export random weights under a searched name.
        raise CheckpointError(
            "no warmed-up supernet to take the student's weights from; run the search (or "
            "`nni-effbert warmup -c <config>`) first"
        )
    arch = evaluator.validate_arch(arch)
    stage_used = evaluator._loaded_stage
    space = setup.space
    meta = {**extra, "supernet": source, "supernet_stage": stage_used}
    out = setup.workdir.export_dir(name)
    export_student(space, arch, space, out, tokenizer=setup.tokenizer, task=setup.task.spec, extra_meta=meta)
    return ExportInfo(path=out, arch=arch, params=int(space.count_params(arch)),
                      non_embedding_params=int(space.count_params(arch, exclude_embeddings=True)), source=source)


def _experiments_dir(cfg, given: Optional[str]) -> Optional[str]:
    """``given``, else ``<workdir>/nni-experiments`` where ``nni-effbert search`` keeps NNI's
    experiment folders (found even when NNI's manifest in the home folder does not list them)."""
    if given:
        return given
    from .workdir import WorkDir

    folder = WorkDir.of(cfg).root / "nni-experiments"
    return str(folder) if folder.is_dir() else None


def export_best(cfg, experiment: str, *, name: str = SEARCHED, experiments_dir: Optional[str] = None,
                progress: bool = True, evaluator=None) -> ExportInfo:
    """Export the best succeeded trial of an NNI experiment.

    The trial is :func:`~nni_effbert.report.best_trial` (last stage with results, highest dev
    metric, then fewest parameters); its weights are sliced from that stage's supernet.

    Raises
    ------
    ExperimentNotFoundError
        Unknown experiment id.
    NoSucceededTrialError
        No succeeded trial with a finite metric.
    CheckpointError
        The stage's supernet checkpoint is missing.
    """
    from .evaluator import KDEvaluator
    from .report import best_trial, read_nni_trials

    trials = read_nni_trials(experiment, experiments_dir=_experiments_dir(cfg, experiments_dir))
    best = best_trial(trials, experiment=experiment)
    evaluator = evaluator or KDEvaluator(cfg, progress=progress)
    extra = {"source": "experiment", "experiment": experiment, "trial_id": best["trial_id"],
             "trial_metric": best["metric"], "stage": best["stage"], "stage_name": best["stage_name"]}
    info = _export(evaluator, dict(best["arch"] or {}), best["stage"], name, extra)
    info.trial = best
    return info


def export_arch(cfg, arch_file: str, *, name: str = SEARCHED, stage: Optional[int] = None,
                progress: bool = True, evaluator=None) -> ExportInfo:
    """Export the architecture of a JSON file (``label -> value``) with supernet weights.

    ``stage`` picks the supernet checkpoint (default: the latest one in the work directory).
    """
    from .evaluator import KDEvaluator
    from .trial import read_arch_file

    data = read_arch_file(arch_file)
    arch = {k: v for k, v in data.items() if not str(k).startswith("_")}
    evaluator = evaluator or KDEvaluator(cfg, progress=progress)
    extra = {"source": "arch file", "arch_file": str(Path(arch_file).absolute())}
    return _export(evaluator, arch, stage, name, extra)


def ensure_baseline(cfg, searched_dir, *, name: str = BASELINE, progress: bool = True, setup=None):
    """Export (if needed) and distil the hand-designed baseline for a searched export.

    The baseline is :func:`~nni_effbert.distill.baseline_arch` for the searched student's
    parameter count, sliced from the same supernet stage and distilled with the same
    ``distill`` budget. An existing baseline export made for the same searched student, space
    and budget is reused.

    Returns
    -------
    (DistillResult, BaselineChoice)
    """
    from .distill import baseline_arch, distill_record, plan_distill, run_distill
    from .evaluator import KDEvaluator
    from .export import load_exported
    from .io import load_json

    searched = load_exported(searched_dir)
    ev = KDEvaluator(cfg, progress=progress, setup=setup)
    space = ev.setup.space
    if space.config.to_dict() != searched.config.to_dict():
        raise CheckpointError(f"the student in {searched.path} belongs to another student space than this "
                              "config's; build the report with the config it was exported with")
    choice = baseline_arch(space, int(searched.meta["params"]))
    out = ev.setup.workdir.export_dir(name)
    wanted = {"baseline_for": searched.meta.get("fingerprint"), "target_params": choice.target}
    reuse = False
    if (out / "export_meta.json").is_file():
        meta = load_json(out / "export_meta.json", "baseline export metadata")
        extra = meta.get("extra") or {}
        record = distill_record(meta)
        reuse = (all(extra.get(k) == v for k, v in wanted.items()) and record is not None
                 and record.get("plan") == plan_distill(cfg).to_dict()
                 and meta.get("space_config") == space.config.to_dict())
    if not reuse:
        stage = (searched.meta.get("extra") or {}).get("supernet_stage")
        extra = {"source": "baseline", **wanted, "width": choice.width,
                 "param_difference": choice.difference, "searched_export": str(searched.path)}
        logger.info("baseline: BERT MLP, stack 1, width %d (%d params vs %d searched, %+d)", choice.width,
                    choice.params, choice.target, choice.difference)
        _export(ev, choice.arch, stage, name, extra)
    result = run_distill(cfg, out, progress=progress, setup=ev.setup)
    return result, choice


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def teacher_row(setup, *, seq_length: int, repeats: int) -> Dict[str, Any]:
    """The teacher's table row: dev metric from its fine-tuning record, size, measured latency."""
    from .latency import measure_latency
    from .teacher import load_teacher, prepare_teacher

    model, _ = load_teacher(str(setup.teacher_dir))
    model = prepare_teacher(model).cpu()
    total = sum(p.numel() for p in model.parameters())
    embeddings = getattr(model.base_model, "embeddings", None)
    emb = sum(p.numel() for p in embeddings.parameters()) if embeddings is not None else 0
    latency = measure_latency(model, seq_length=seq_length, repeats=repeats).median_ms
    return {"name": "teacher", "role": "teacher", "dev_metric": float(setup.teacher_marker["dev_metric"]),
            "params": int(total), "non_embedding_params": int(total - emb), "latency_ms": float(latency)}


def student_row(folder, name: str, role: str, *, seq_length: int, repeats: int, note: Optional[str] = None,
                metric: Optional[float] = None) -> Dict[str, Any]:
    """A distilled student's table row (the latency is measured again, beside the teacher's)."""
    from .distill import distill_record
    from .export import load_exported
    from .latency import measure_latency

    exported = load_exported(folder)
    record = distill_record(exported.meta)
    if record is None:
        raise CheckpointError(f"the student in {folder} is not distilled yet; run "
                              f"`nni-effbert distill -c <config> --export {folder}` first")
    latency = measure_latency(exported.model, seq_length=seq_length, repeats=repeats).median_ms
    return {"name": name, "role": role, "dev_metric": float(metric if metric is not None else record["dev_metric"]),
            "params": int(exported.meta["params"]), "non_embedding_params": int(exported.meta["non_embedding_params"]),
            "latency_ms": float(latency), "note": note}


@dataclass
class ReportOutcome:
    """What :func:`build_report` produced.

    Attributes
    ----------
    result : ReportResult
        Paths of report.md and the plots.
    rows : list of dict
        Table rows (teacher, baseline, searched).
    table : str
        The formatted table.
    experiment : str or None
    baseline_difference : int
        Baseline params minus searched params.
    """

    result: Any
    rows: List[Dict[str, Any]] = field(default_factory=list)
    table: str = ""
    experiment: Optional[str] = None
    baseline_difference: int = 0


def build_report(cfg, *, experiment: Optional[str] = None, searched_dir=None, experiments_dir: Optional[str] = None,
                 progress: bool = True, setup=None) -> ReportOutcome:
    """Read the experiment's trials, distil the baseline if needed, and write the report.

    Parameters
    ----------
    cfg : ExperimentConfig
    experiment : str, optional
        NNI experiment id; default the one the searched export was taken from (none: the report
        has the table but no trial plots).
    searched_dir : path, optional
        The distilled searched student (default ``exports/searched``).
    experiments_dir : str, optional
        NNI's experiments folder, for experiments its manifest does not know.
    """
    from .export import load_exported
    from .report import format_table, read_nni_trials, write_report
    from .train import KDSetup
    from .workdir import WorkDir

    wd = WorkDir.of(cfg)
    searched_dir = Path(searched_dir) if searched_dir else wd.export_dir(SEARCHED)
    searched = load_exported(searched_dir)  # fail fast, before any training
    from .distill import distill_record

    if distill_record(searched.meta) is None:
        raise CheckpointError(f"the searched student in {searched_dir} is not distilled yet; run "
                              f"`nni-effbert distill -c <config> --export {searched_dir}` first")
    if experiment is None:
        experiment = (searched.meta.get("extra") or {}).get("experiment")
    trials = read_nni_trials(experiment, experiments_dir=_experiments_dir(cfg, experiments_dir)) if experiment else []
    if not experiment:
        logger.warning("no NNI experiment given (--experiment) nor recorded in %s: the report has no trial plots",
                       searched_dir)
    setup = setup or KDSetup.from_config(cfg, progress=progress)
    seq, repeats = int(cfg.evaluator.latency_seq_length), int(cfg.evaluator.latency_repeats)
    base_result, choice = ensure_baseline(cfg, searched_dir, progress=progress, setup=setup)
    metric = setup.task.spec.metric
    rows = [
        teacher_row(setup, seq_length=seq, repeats=repeats),
        student_row(base_result.path, "baseline (BERT MLP)", "baseline", seq_length=seq, repeats=repeats,
                    note=f"width {choice.width}, stack 1, {choice.difference:+d} params vs searched"),
        student_row(searched_dir, "searched student", "searched", seq_length=seq, repeats=repeats),
    ]
    result = write_report(wd.root, trials, rows, experiment=experiment, metric_name=f"dev {metric}")
    table = format_table(rows, metric_name=f"dev {metric}")
    return ReportOutcome(result=result, rows=rows, table=table, experiment=experiment,
                         baseline_difference=choice.difference)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _load_cfg(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, list(args.set or []))


def _configure_export(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", metavar="ID", help="NNI experiment id: export its best succeeded trial")
    src.add_argument("--arch", metavar="ARCH.json", help="export this architecture (label -> value JSON object)")
    parser.add_argument("--name", default=SEARCHED, help=f"export folder name under <workdir>/exports (default {SEARCHED})")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="with --arch: supernet stage to take the weights from (default: the latest)")
    parser.add_argument("--experiments-dir", metavar="DIR",
                        help="NNI experiments folder, when the experiment is not in NNI's manifest")


def _run_export(args: argparse.Namespace) -> int:
    if args.stage is not None and args.arch is None:
        raise ConfigError("--stage goes with --arch; with --experiment the best trial's own stage is used")
    cfg = _load_cfg(args)
    if args.experiment:
        info = export_best(cfg, args.experiment, name=args.name, experiments_dir=args.experiments_dir,
                           progress=not args.quiet)
        t = info.trial
        print(f"best trial {t['trial_id']} (stage {t['stage']}, dev {t['metric']:.4f}), "
              f"{info.params} params ({info.non_embedding_params} non-embedding), weights from {info.source}")
    else:
        info = export_arch(cfg, args.arch, name=args.name, stage=args.stage, progress=not args.quiet)
        print(f"{info.params} params ({info.non_embedding_params} non-embedding), weights from {info.source}")
    print(info.path)
    return 0


def _configure_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", required=True, metavar="DIR", help="export folder (from `nni-effbert export`)")
    parser.add_argument("--force", action="store_true",
                        help="distil again even if the folder was already distilled with the same budget")


def _run_distill(args: argparse.Namespace) -> int:
    from .distill import run_distill

    cfg = _load_cfg(args)
    r = run_distill(cfg, args.export, force=args.force, progress=not args.quiet)
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


def _run_report(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    out = build_report(cfg, experiment=args.experiment, searched_dir=args.export,
                       experiments_dir=args.experiments_dir, progress=not args.quiet)
    print(out.table)
    print(f"report: {out.result.report}")
    for path in out.result.plots.values():
        print(f"plot: {path}")
    return 0


def _configure_quickstart(parser: argparse.ArgumentParser) -> None:
    from .quickstart import configure

    configure(parser)


def _run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run

    return run(args)


def _commands():
    from .cli import Command

    return [
        Command("export", "export the best trial (--experiment) or an arch file (--arch) as a transformers folder",
                _run_export, _configure_export,
                description="Export a student into <workdir>/exports/NAME, loadable by transformers alone: the "
                            "best succeeded trial of an NNI experiment (weights sliced from its stage's supernet) "
                            "or the architecture of a JSON file. Prints the folder."),
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
    ]


def __getattr__(name: str):
    # ``COMMANDS`` is built on first access so importing this module has no side effect and no
    # import cycle with nni_effbert.cli.
    if name == "COMMANDS":
        return _commands()
    raise AttributeError(name)
