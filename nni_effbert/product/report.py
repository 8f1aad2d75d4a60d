"""The experiment report (``nni-effbert report``): teacher, baselines and searched student measured
side by side, and the page written (:mod:`.report_page`: the table, ``reports/report.md``, plots).

A report is reproducible: :func:`build_report` records the latencies it measured and the
latency-matched baseline it chose in ``<workdir>/reports/measurements.json``
(:class:`LatencyRecord`), and a later report of the same students (same weights, same latency
settings) reuses them instead of measuring again, so it prints the same table and distils
nothing new. ``remeasure=True`` (``nni-effbert report --remeasure``) measures and chooses again.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from nni_effbert.search_spaces.supernet import REFERENCE_EXPRESSION

from ..config import ExperimentConfig
from ..errors import CheckpointError, EffBertError
from ..io import atomic_write_json, atomic_write_text, load_json
from ..latency.measure import measure_latency
from ..latency.runtimes import require_deploy
from ..latency.settings import latency_settings
from ..kd.teacher import load_teacher, prepare_teacher
from ..kd.student_start import student_origin
from ..kd.setup import KDSetup
from ..nas.records import read_nni_trials
from ..nas.supernets import describe_key
from ..workdir import WorkDir
from .distill import distill_record
from .loader import HASHES_KEY, WEIGHTS_FILE, load_exported
from .onnx import (TEACHER_EXPORT, dev_scorer, export_onnx, export_teacher_onnx, onnx_files, runtime_markdown,
                   runtime_rows, task_rows)
from .report_page import format_table, write_report
from .compare import comparisons_markdown
from .baselines import LatencyBaselineChoice, choose_latency_baseline, ensure_baseline, ensure_latency_baseline
from .students import SEARCHED, experiments_dir_of, supernet_experiment

__all__ = ["MEASUREMENTS_FILE", "LatencyRecord", "ReportOutcome", "teacher_row", "student_row", "build_report"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


#: File of ``<workdir>/reports`` recording what :func:`build_report` measured (:class:`LatencyRecord`).
MEASUREMENTS_FILE = "measurements.json"


class LatencyRecord:
    """What a report measured, reused by the next report of the same models.

    ``measurements.json`` holds ``{"format": 1, "settings": {...}, "latency": {name: {"id",
    "ms"}}, "latency_baseline": {"key", "choice"}}``: each latency under the identity of what
    was measured (the teacher's fingerprint, a student's weights sha256), and the
    latency-matched baseline chosen for a searched student. Everything is dropped when the
    latency settings (sequence length, repeats, threads, torch) differ, or with ``remeasure``.

    Parameters
    ----------
    path : Path
        The JSON file.
    settings : dict
        What the latencies depend on besides the model.
    remeasure : bool
        Ignore what is recorded (it is overwritten by :meth:`save`).
    """

    FORMAT = 1

    def __init__(self, path: Path, settings: Mapping[str, Any], *, remeasure: bool = False):
        self.path = Path(path)
        self.settings = dict(settings)
        self.measured = 0
        self.reused = 0
        data: Dict[str, Any] = {}
        if not remeasure and self.path.is_file():
            try:
                data = load_json(self.path, "report measurements")
            except EffBertError as exc:
                logger.warning("measuring again: %s", exc)
                data = {}
            if not isinstance(data, dict) or data.get("format") != self.FORMAT or data.get("settings") != self.settings:
                if data:
                    logger.info("latency settings changed since %s was written: measuring again", self.path)
                data = {}
        self.latencies: Dict[str, Any] = dict(data.get("latency") or {})
        self.baseline: Dict[str, Any] = dict(data.get("latency_baseline") or {})

    def expect(self, idents: Mapping[str, Any]) -> None:
        """Keep the recorded latencies only if every model of ``idents`` (name -> identity) has one
        measured on it: rows are then all reused, or all measured again side by side (a teacher
        latency from an earlier run is never mixed with a new student's)."""
        ok = all(ident is not None and isinstance(self.latencies.get(name), dict)
                 and self.latencies[name].get("id") == ident for name, ident in idents.items())
        if not ok and self.latencies:
            logger.info("models changed since %s was written: measuring every latency again", self.path)
            self.latencies = {}

    def latency(self, name: str, ident: Any, measure: Callable[[], float]) -> float:
        """The recorded latency of ``name`` if it was measured on ``ident``, else ``measure()`` (recorded)."""
        rec = self.latencies.get(name)
        if isinstance(rec, dict) and ident is not None and rec.get("id") == ident and \
                isinstance(rec.get("ms"), (int, float)):
            self.reused += 1
            return float(rec["ms"])
        ms = float(measure())
        self.latencies[name] = {"id": ident, "ms": ms}
        self.measured += 1
        return ms

    def choice(self, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The latency-matched baseline recorded for ``key``, or None."""
        if self.baseline.get("key") == dict(key) and isinstance(self.baseline.get("choice"), dict):
            return dict(self.baseline["choice"])
        return None

    def set_choice(self, key: Mapping[str, Any], choice: Mapping[str, Any]) -> None:
        """Record the latency-matched baseline ``choice`` (:meth:`LatencyBaselineChoice.to_record`) for ``key``."""
        self.baseline = {"key": dict(key), "choice": dict(choice)}

    def save(self) -> None:
        """Write the record (atomically) to :attr:`path`."""
        atomic_write_json({"format": self.FORMAT, "settings": self.settings, "latency": self.latencies,
                           "latency_baseline": self.baseline}, self.path)


# ============================================================================================
# Tables
# ============================================================================================


# ============================================================================================
# Plots and report.md
# ============================================================================================


# ---------------------------------------------------------------------------------------------
# The comparison of teacher, baseline and searched student
# ---------------------------------------------------------------------------------------------


def teacher_row(setup, *, seq_length: int, repeats: int, record: Optional[LatencyRecord] = None) -> Dict[str, Any]:
    """The teacher's table row: dev metric from its fine-tuning record, size, measured latency
    (the one ``record`` holds for this teacher, when given)."""

    model, _ = load_teacher(str(setup.teacher_dir))
    model = prepare_teacher(model).cpu()
    total = sum(p.numel() for p in model.parameters())
    embeddings = getattr(model.base_model, "embeddings", None)
    emb = sum(p.numel() for p in embeddings.parameters()) if embeddings is not None else 0

    def measure() -> float:
        return measure_latency(model, seq_length=seq_length, repeats=repeats).median_ms

    latency = record.latency("teacher", _teacher_id(setup), measure) if record is not None else measure()
    row = {"name": "teacher", "role": "teacher", "dev_metric": float(setup.teacher_marker["dev_metric"]),
           "params": int(total), "non_embedding_params": int(total - emb), "latency_ms": float(latency)}
    exact = ((setup.teacher_marker.get("dev_scores") or {}).get("dev") or {}).get("exact")  # QA teachers
    if exact is not None:
        row["dev_exact"] = float(exact)
    return row


def student_row(folder, name: str, role: str, *, seq_length: int, repeats: int, note: Optional[str] = None,
                metric: Optional[float] = None, latencies: Optional[LatencyRecord] = None) -> Dict[str, Any]:
    """A distilled student's table row (the latency is measured again, beside the teacher's,
    unless ``latencies`` holds one measured on the same weights)."""

    exported = load_exported(folder)
    record = distill_record(exported.meta)
    if record is None:
        raise CheckpointError(f"the student in {folder} is not distilled yet; run "
                              f"`nni-effbert distill -c <config> --export {folder}` first")

    def measure() -> float:
        return measure_latency(exported.model, seq_length=seq_length, repeats=repeats).median_ms

    ident = (exported.meta.get(HASHES_KEY) or {}).get(WEIGHTS_FILE)
    latency = latencies.latency(_row_key(folder), ident, measure) if latencies is not None else measure()
    row = {"name": name, "role": role, "dev_metric": float(metric if metric is not None else record["dev_metric"]),
           "params": int(exported.meta["params"]), "non_embedding_params": int(exported.meta["non_embedding_params"]),
           "latency_ms": float(latency), "note": note}
    exact = (record.get("dev_scores") or {}).get("exact")  # span QA: EM beside F1
    if exact is not None and metric is None:
        row["dev_exact"] = float(exact)
    return row


def reference_note(meta: Mapping[str, Any]) -> Optional[str]:
    """``reference expression`` when every layer of an export is BERT's own MLP expression.

    The search then found nothing better than the hand-designed expression, and only the widths
    and stacks differ from the baseline's; the report says so instead of calling it "searched".
    """
    layers = meta.get("layers") or []
    if layers and all(layer.get("expression") == REFERENCE_EXPRESSION for layer in layers):
        return f"reference expression: BERT's {REFERENCE_EXPRESSION} in every layer"
    return None


def _teacher_id(setup) -> Optional[str]:
    return setup.teacher_marker.get("teacher_fingerprint")


def _row_key(folder) -> str:
    return str(Path(folder).expanduser().absolute())


def _weights_id(folder) -> Optional[str]:
    """The recorded sha256 of an export's weights (what its latency row was measured on)."""
    try:
        meta = load_json(Path(folder) / "export_meta.json", "export metadata")
    except EffBertError:
        return None
    return ((meta or {}).get(HASHES_KEY) or {}).get(WEIGHTS_FILE) if isinstance(meta, dict) else None


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
    comparisons : list of PairedResult
        The paired comparisons on the dev rows (searched vs each baseline, teacher vs searched).
    """

    result: Any
    rows: List[Dict[str, Any]] = field(default_factory=list)
    table: str = ""
    experiment: Optional[str] = None
    baseline_difference: int = 0
    comparisons: List[Any] = field(default_factory=list)


def build_report(cfg: ExperimentConfig, *, experiment: Optional[str] = None, searched_dir=None,
                 experiments_dir: Optional[str] = None,
                 progress: bool = True, setup=None, remeasure: bool = False) -> ReportOutcome:
    """Read the experiment's trials, distil the baseline if needed, and write the report.

    The latencies and the latency-matched baseline's width are measured once and recorded in
    ``reports/measurements.json``; a later report of the same students reuses them (same
    table, nothing measured or distilled again) unless ``remeasure``.

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
    remeasure : bool
        Measure every latency and choose the latency-matched baseline again.
    """

    wd = WorkDir.of(cfg)
    searched_dir = Path(searched_dir) if searched_dir else wd.export_dir(SEARCHED)
    searched = load_exported(searched_dir)  # fail fast, before any training

    if distill_record(searched.meta) is None:
        raise CheckpointError(f"the searched student in {searched_dir} is not distilled yet; run "
                              f"`nni-effbert distill -c <config> --export {searched_dir}` first")
    sliced_from = supernet_experiment(searched.meta)
    if experiment is None:
        experiment = (searched.meta.get("extra") or {}).get("experiment")
    elif sliced_from is None:
        logger.warning("the searched student in %s was sliced from the work directory's own supernets (warm-ups run "
                       "by hand), not experiment %s's: the baseline comes from the same supernets, the experiment "
                       "gives the trial plots", searched_dir, experiment)
    elif sliced_from != experiment:
        # The baseline is sliced from the searched student's supernets: a report of experiment B
        # on a student of A's would compare against A's weights under B's name.
        raise CheckpointError(
            f"report --experiment {experiment}: the searched student in {searched_dir} was sliced from "
            f"the supernets of {describe_key(sliced_from)}, not of experiment {experiment}; export it first (`nni-effbert export "
            f"-c <config> --experiment {experiment}`, then distill) or pass its own experiment")
    trials = read_nni_trials(experiment, experiments_dir=experiments_dir_of(cfg, experiments_dir)) if experiment else []
    if not experiment:
        logger.warning("no NNI experiment given (--experiment) nor recorded in %s: the report has no trial plots",
                       searched_dir)
    setup = setup or KDSetup.from_config(cfg, progress=progress)
    seq, repeats = int(cfg.evaluator.latency_seq_length), int(cfg.evaluator.latency_repeats)
    record = LatencyRecord(wd.reports_dir / MEASUREMENTS_FILE,
                           {"seq_length": seq, "repeats": repeats, "threads": int(torch.get_num_threads()),
                            "torch": torch.__version__, "latency_settings": dataclasses.asdict(latency_settings(cfg))},
                           remeasure=remeasure)
    base_result, choice = ensure_baseline(cfg, searched_dir, progress=progress, setup=setup)
    metric = setup.task.spec.metric
    # The second baseline, matched by latency (predicted, then measured); distilled only when
    # its width differs from the params-matched one. The width chosen once is recorded: short
    # measurements on a busy machine may rank two nearby widths either way on a rerun.
    lat_key = {"searched": searched.meta.get("fingerprint"), "supernet_experiment": sliced_from,
               "space_config": searched.meta.get("space_config")}
    recorded = record.choice(lat_key)
    if recorded is not None:
        lat_choice = LatencyBaselineChoice.from_record(setup.space, recorded)
    else:
        lat_choice = choose_latency_baseline(cfg, searched_dir, progress=progress, setup=setup, remeasure=remeasure)
        record.set_choice(lat_key, lat_choice.to_record())
    same = lat_choice.width == choice.width
    lat_result = None
    if not same:
        lat_result, lat_choice = ensure_latency_baseline(cfg, searched_dir, progress=progress, setup=setup,
                                                         choice=lat_choice)
    students = [base_result.path, *([lat_result.path] if lat_result is not None else []), searched_dir]
    record.expect({"teacher": _teacher_id(setup), **{_row_key(p): _weights_id(p) for p in students}})
    rows = [
        teacher_row(setup, seq_length=seq, repeats=repeats, record=record),
        student_row(base_result.path, "baseline (BERT MLP)" + (", matched by params and latency" if same
                                                               else ", matched by params"),
                    "baseline", seq_length=seq, repeats=repeats, latencies=record,
                    note=f"width {choice.width}, stack 1, {choice.difference:+d} params vs searched"),
    ]
    if lat_result is not None:
        rows.append(student_row(lat_result.path, "baseline (BERT MLP), matched by latency", "baseline_latency",
                                seq_length=seq, repeats=repeats, latencies=record,
                                note=f"width {lat_choice.width}, stack 1, {100 * lat_choice.relative_difference:+.1f}% "
                                     "latency vs searched when chosen"))
    rows.append(student_row(searched_dir, "searched student", "searched", seq_length=seq, repeats=repeats,
                            latencies=record, note=reference_note(searched.meta)))
    record.save()
    if record.reused and not record.measured:
        logger.info("latencies and the latency-matched baseline reused from %s (--remeasure measures again)",
                    record.path)
    models = {"teacher": "teacher", "baseline": base_result.path}
    if lat_result is not None:
        models["baseline (latency)"] = lat_result.path
    models["searched"] = searched_dir
    pairs = [("searched", name) for name in models if name.startswith("baseline")] + [("teacher", "searched")]
    if setup.task.spec.is_span:  # per-question paired tests of span QA are the bench's (bench/squad.py)
        comparisons, paired = None, []
    else:
        comparisons, paired = comparisons_markdown(setup, models, pairs, seed=int(cfg.seed))
    chosen = (searched.meta.get("extra") or {}).get("trial_id")
    origin = (searched.meta.get("extra") or {}).get("origin") or student_origin(cfg)
    objective = cfg.evaluator.objective
    search_rows = len(setup.task.search) if getattr(setup.task, "search", None) is not None else 0
    held, dev_rows = f"{search_rows} rows held out of train", f"{len(setup.task.dev)} rows"
    if setup.task.spec.is_span:  # QA: count questions (each may be several windows); whole articles are held out
        held = f"{len(setup.task.examples['search'])} questions, whole articles held out of train"
        dev_rows = f"{len(setup.task.examples['dev'])} questions"
    note = (f"Splits: the search scored candidates on the **search split** ({held}, "
            f"never trained on); each trial's score is its `default`, the `{objective}` objective "
            f"(evaluator.objective). The table's dev {metric} comes from the **dev split** ({dev_rows}"
            "), which the search never read.")
    metric_name = "dev F1" if setup.task.spec.is_span else f"dev {metric}"  # span QA: EM in its own column
    result = write_report(wd.root, trials, rows, experiment=experiment, metric_name=metric_name,
                          chosen=str(chosen) if chosen is not None else None, origin=origin,
                          search_metric_name=f"search score ({objective})", splits_note=note,
                          comparisons=comparisons)
    folders = [wd.teacher_dir, base_result.path] + ([lat_result.path] if lat_result is not None else []) + [searched_dir]
    _add_runtime_section(cfg, setup, rows, folders, result.report, metric_name=metric_name, seq_length=seq,
                         repeats=repeats, remeasure=remeasure)
    table = format_table(rows, metric_name=metric_name)
    return ReportOutcome(result=result, rows=rows, table=table, experiment=experiment,
                         baseline_difference=choice.difference, comparisons=paired)


def _add_runtime_section(cfg: ExperimentConfig, setup, rows, folders, report: Path, *, metric_name: str,
                         seq_length: int,
                         repeats: int, remeasure: bool = False) -> None:
    """Insert the deployment-runtime section (:mod:`nni_effbert.product.onnx`) into ``report``
    before its search section, and write ``reports/runtimes.json``. ONNX files missing from a
    folder are exported first (the teacher's into ``exports/teacher``). Without the ``[deploy]``
    extra the section says how to get it."""
    try:
        section = _runtime_section(cfg, setup, rows, folders, report, metric_name=metric_name, seq_length=seq_length,
                                   repeats=repeats, remeasure=remeasure)
    except EffBertError as exc:  # DeployMissingError included: the rest of the report stands
        logger.warning("report: deployment-runtime section left out: %s", exc)
        section = f"## Deployment runtimes\n\nLeft out: {exc}.\n"
    text = report.read_text(encoding="utf-8")
    marker = "\n## Search\n"
    text = text.replace(marker, "\n" + section + marker, 1) if marker in text else text + "\n" + section
    atomic_write_text(text, report)


def _runtime_section(cfg: ExperimentConfig, setup, rows, folders, report: Path, *, metric_name: str, seq_length: int,
                     repeats: int, remeasure: bool = False) -> str:
    """The section's Markdown (and ``runtimes.json``); raises :class:`EffBertError` subclasses.

    ``runtimes.json`` records what it measured with a key of the settings and every model's
    weights; a rerun on the same models reuses it (a report of a finished experiment is
    reproducible) unless ``remeasure``."""
    require_deploy("the report's runtime section")
    key = {"seq_length": seq_length, "repeats": repeats, "models": [
        _teacher_id(setup) if row.get("role") == "teacher" else f"{_row_key(folder)}:{_weights_id(folder)}"
        for row, folder in zip(rows, folders)]}
    recorded = report.parent / "runtimes.json"
    if not remeasure and recorded.is_file():
        try:
            old = load_json(recorded, "runtime measurements")
        except EffBertError:
            old = None
        if isinstance(old, dict) and old.get("key") == key and old.get("rows"):
            logger.info("deployment runtimes reused from %s (--remeasure measures again)", recorded)
            return runtime_markdown(old["rows"], metric_name=metric_name, seq_length=seq_length)
    texts = None
    models = []
    for row, folder in zip(rows, folders):
        teacher = row.get("role") == "teacher"
        target = WorkDir.of(cfg).export_dir(TEACHER_EXPORT) if teacher else Path(folder)
        if None in onnx_files(target, source=folder).values():
            if texts is None:
                texts = task_rows(cfg)
            if teacher:
                export_teacher_onnx(cfg, int8=True, rows=texts[0], labels=texts[1], rows_source=texts[2])
            else:
                export_onnx(folder, int8=True, rows=texts[0], labels=texts[1], rows_source=texts[2])
        models.append({**row, "folder": target})
    # Each ONNX model scored as the PyTorch rows were (span QA: windows, answers and F1).
    data = runtime_rows(models, None, setup.task.spec, vocab_size=int(setup.space.config.vocab_size),
                        seq_length=seq_length, repeats=repeats, evaluate=dev_scorer(setup))
    atomic_write_json({"seq_length": seq_length, "batch_size": 1, "threads": 1, "key": key, "rows": data}, recorded)
    return runtime_markdown(data, metric_name=metric_name, seq_length=seq_length)
