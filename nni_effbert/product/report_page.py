"""The report's page: the comparison table (:func:`format_table`) and ``reports/report.md`` with
its plots (:func:`write_report`).

Rows of the comparison table are dicts with ``name``, ``dev_metric``, ``params``,
``non_embedding_params``, ``latency_ms`` and optionally ``role`` (``teacher`` / ``baseline`` /
``baseline_latency`` / ``searched``) and ``note``; the speed-up column is relative to the teacher
row (``role == 'teacher'``, or the row named ``teacher``).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..errors import ConfigError, EffBertError
from ..io import atomic_write_text, load_json
from ..kd.student_start import origin_line
from ..nas.ranking import best_trial
from ..nas.records import is_failed, is_rescore, is_scored, normalize_trial
from ..typed_yaml import check_known_keys
from ..workdir import WorkDir
from .fidelity import fidelity_markdown
from .plots import params_axis, plot_best_so_far, plot_front, stage_colors, stage_label

__all__ = ["TABLE_KEYS", "ReportResult", "format_table", "write_report"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]



#: Keys a table row may have.
TABLE_KEYS = ("name", "dev_metric", "params", "non_embedding_params", "latency_ms", "role", "note", "dev_exact")


@dataclass
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes
    ----------
    report : Path
        ``report.md``.
    plots : dict
        Plot name (``best_so_far``, ``metric_vs_params``, ``metric_vs_latency``) -> PNG path;
        a plot without any scored trial to draw is left out.
    table : str
        The markdown comparison table (also in the report).
    counts : dict
        Trial counts: ``total``, ``scored``, ``failed``, ``warmup``, ``other`` (running,
        canceled, early-stopped).
    pareto_params, pareto_latency : list of str
        Trial ids on the metric-vs-params and metric-vs-latency Pareto fronts.
    best : dict or None
        The best trial (:func:`best_trial`), or None without scored trials.
    """

    report: Path
    plots: Dict[str, Path] = field(default_factory=dict)
    table: str = ""
    counts: Dict[str, int] = field(default_factory=dict)
    pareto_params: List[str] = field(default_factory=list)
    pareto_latency: List[str] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None


def _fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"table row {i} must be a dict, got {type(row).__name__}")
        check_known_keys(row, TABLE_KEYS, f"table row {i} ({row.get('name')!r})")
        if not row.get("name"):
            raise ConfigError(f"table row {i} has no name")
        clean = {k: row.get(k) for k in TABLE_KEYS}
        for key in ("dev_metric", "params", "non_embedding_params", "latency_ms", "dev_exact"):
            value = clean[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"table row {clean['name']!r}: {key} must be a number or None, got {value!r}")
        out.append(clean)
    teachers = [r for r in out if r["role"] == "teacher"] or \
               [r for r in out if str(r["name"]).strip().lower() == "teacher"]
    if len(teachers) > 1:
        raise ConfigError(f"table has {len(teachers)} teacher rows ({[r['name'] for r in teachers]}); "
                          "mark exactly one with role='teacher'")
    for r in out:
        r["_teacher"] = bool(teachers) and r is teachers[0]
    return out


def format_table(rows: Sequence[Mapping[str, Any]], *, metric_name: str = "dev metric") -> str:
    """The comparison table (teacher, baseline student, searched student) as markdown.

    Parameters
    ----------
    rows : sequence of dict
        ``name``, ``dev_metric``, ``params``, ``non_embedding_params``, ``latency_ms`` (CPU,
        batch 1, sequence 128, median ms), optional ``role``, ``note`` and ``dev_exact`` (span
        QA: exact match beside F1 in ``dev_metric``; a ``dev EM`` column appears when a row has
        one). Unknown values may be None and print as ``n/a``.
    metric_name : str
        Header of the metric column (e.g. ``dev accuracy``).

    Returns
    -------
    str
        A markdown table; ``vs teacher`` is the metric as a percentage of the teacher's and
        ``speed-up`` the teacher's latency divided by the row's.

    Raises
    ------
    ConfigError
        On an unknown key, a missing name, a non-numeric value, or several teacher rows.
    """
    rows = _check_rows(rows)
    teacher = next((r for r in rows if r["_teacher"]), None)
    with_em = any(r["dev_exact"] is not None for r in rows)
    header = ["model", *(["dev EM"] if with_em else []), metric_name, "vs teacher", "params", "non-emb. params",
              "CPU latency b1/s128 (ms, median)", "speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        rel = speed = "n/a"
        if teacher is not None:
            tm, tl = teacher["dev_metric"], teacher["latency_ms"]
            if r["dev_metric"] is not None and tm:
                rel = f"{100 * r['dev_metric'] / tm:.1f}%"
            if r["latency_ms"] and tl:
                speed = f"{tl / r['latency_ms']:.2f}x"
        name = str(r["name"]) + (f" ({r['note']})" if r["note"] else "")
        cells = [name, *([_fmt(r["dev_exact"], ".4f")] if with_em else []), _fmt(r["dev_metric"], ".4f"), rel,
                 _fmt_count(r["params"]),
                 _fmt_count(r["non_embedding_params"]), _fmt(r["latency_ms"], ".2f"), speed]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_report(workdir: PathLike, trials: Sequence[Mapping[str, Any]], table_rows: Sequence[Mapping[str, Any]],
                 out_dir: Optional[PathLike] = None, *, experiment: Optional[str] = None,
                 metric_name: str = "dev metric", title: Optional[str] = None,
                 chosen: Optional[str] = None, origin: Optional[Mapping[str, Any]] = None,
                 search_metric_name: Optional[str] = None, splits_note: Optional[str] = None,
                 comparisons: Optional[str] = None) -> ReportResult:
    """Write ``report.md`` and its PNG plots.

    Parameters
    ----------
    workdir : str or Path
        The experiment's work directory; the report goes to ``<workdir>/reports`` by default.
    trials : sequence of dict
        Trial dicts (module docstring), e.g. from :func:`read_nni_trials`.
    table_rows : sequence of dict
        Rows of the comparison table (:func:`format_table`): teacher, baseline and searched
        student. May be empty (the report then says the table is missing).
    out_dir : str or Path, optional
        Where to write instead of ``<workdir>/reports``.
    experiment : str, optional
        NNI experiment id, shown in the report.
    metric_name : str
        Name of the dev metric (``dev accuracy``).
    title : str, optional
        Report title.
    chosen : str, optional
        Trial id of the exported student (e.g. the best trial under ``--max-latency``), marked as
        the selected point on the plots; default the best trial.
    origin : dict, optional
        :func:`~nni_effbert.kd.student_start.student_origin`: the student preset and supernet init,
        named at the top.
    search_metric_name : str, optional
        Name of the trials' ``default`` in the search section and plots (default ``metric_name``;
        the search scores candidates on the held-out search split, not on dev).
    splits_note : str, optional
        A line saying which split each number comes from.
    comparisons : str, optional
        Markdown placed under the table: the paired comparisons of its models
        (:func:`nni_effbert.product.compare.comparisons_markdown`).

    Returns
    -------
    ReportResult
        Paths, counts, table and Pareto fronts.

    Notes
    -----
    Plots (``best_so_far.png``, ``metric_vs_params.png``, ``metric_vs_latency.png``) show scored
    trials only. Failed trials are counted in the legends, titles and report; a plot with no
    scored trial to show is not written. When ``fidelity.json`` (``nni-effbert fidelity``) is in
    the output folder, its section is appended.
    """

    trials = [normalize_trial(t) for t in trials]
    table = format_table(table_rows, metric_name=metric_name) if table_rows else ""
    out = Path(out_dir) if out_dir is not None else WorkDir.of(workdir).reports_dir
    out.mkdir(parents=True, exist_ok=True)

    rescored = [t for t in trials if is_rescore(t)]  # search.noise_rescores: measure the tie margin
    candidates = [t for t in trials if not t["warmup"] and not is_rescore(t)]
    scored = [t for t in candidates if is_scored(t)]
    failed = [t for t in trials if is_failed(t) or (t["warmup"] and t["status"] == "FAILED")]
    counts = {
        "total": len(trials),
        "scored": len(scored),
        "failed": len(failed),
        "warmup": sum(t["warmup"] for t in trials),
        "rescored": len(rescored),
        "other": len(candidates) - len(scored) - sum(is_failed(t) for t in candidates),
    }
    names = {t["stage"]: t["stage_name"] for t in trials if t["stage_name"]}
    stages = sorted({t["stage"] for t in candidates}, key=lambda s: (s is None, s if s is not None else 0))
    colors = stage_colors(stages)
    metric_name = search_metric_name or metric_name  # the search's scores; the table above names dev
    best = None
    if scored:
        best = best_trial(scored, experiment=experiment)
        picked = [t for t in scored if chosen is not None and t["trial_id"] == str(chosen)]
        best = picked[0] if picked else best

    plots: Dict[str, Path] = {}
    pareto_params: List[str] = []
    pareto_latency: List[str] = []
    if scored:
        plots["best_so_far"] = out / "best_so_far.png"
        plot_best_so_far(trials, names, colors, metric_name, plots["best_so_far"])
        axis = params_axis(scored)
        if axis is not None:
            plots["metric_vs_params"] = out / "metric_vs_params.png"
            pareto_params = plot_front(trials, axis, names, colors, metric_name, best, plots["metric_vs_params"])
        if any(t["latency_ms"] is not None for t in scored):
            plots["metric_vs_latency"] = out / "metric_vs_latency.png"
            pareto_latency = plot_front(trials, "latency_ms", names, colors, metric_name, best,
                                         plots["metric_vs_latency"])

    text = _report_markdown(title or "EfficientBERT search report", experiment, Path(workdir), trials, counts,
                            stages, names, best, table, plots, pareto_params, pareto_latency, metric_name, failed,
                            origin=origin)
    if splits_note:
        text = text.replace("\n## Teacher, baseline and searched student\n", f"\n{splits_note}\n\n"
                            "## Teacher, baseline and searched student\n", 1)
    if comparisons and table:
        text = text.replace(_TABLE_NOTE, _TABLE_NOTE + "\n" + comparisons, 1)
    fidelity_json = out / "fidelity.json"
    if fidelity_json.is_file():
        try:
            text += "\n" + fidelity_markdown(load_json(fidelity_json, "fidelity results"), "fidelity.png")
        except (EffBertError, KeyError, TypeError) as exc:
            logger.warning("fidelity section left out: %s is not readable (%s)", fidelity_json, exc)
    report = out / "report.md"
    atomic_write_text(text, report)
    logger.info("report written to %s (%d plots)", report, len(plots))
    return ReportResult(report=report, plots=plots, table=table, counts=counts, pareto_params=pareto_params,
                        pareto_latency=pareto_latency, best=best)
_TABLE_NOTE = ("Latency: median CPU forward time at batch 1, sequence length 128. "
               "`vs teacher`: dev metric as a percentage of the teacher's.")


def _report_markdown(title, experiment, workdir, trials, counts, stages, names, best, table, plots,
                     pareto_params, pareto_latency, metric_name, failed, origin=None) -> str:
    by_id = {t["trial_id"]: t for t in trials}
    lines = [f"# {title}", ""]
    if experiment:
        lines.append(f"- NNI experiment: `{experiment}`")
    if origin:
        lines.append(f"- {origin_line(origin)}")
    lines += [
        f"- Work directory: `{workdir}`",
        f"- Trials: {counts['total']} ({counts['scored']} scored, {counts['failed']} failed, "
        f"{counts['warmup']} warm-up, "
        + (f"{counts['rescored']} re-scored to measure the tie margin, " if counts["rescored"] else "")
        + f"{counts['other']} running or canceled)",
        "",
        "## Teacher, baseline and searched student",
        "",
    ]
    if table:
        lines += [table, "", _TABLE_NOTE, ""]
    else:
        lines += ["No comparison table yet: run `nni-effbert distill` to produce the final students.", ""]

    lines += ["## Search", ""]
    if not stages:
        lines += ["No candidate trials.", ""]
    else:
        lines += [f"| stage | scored | failed | best {metric_name} | best trial | params |",
                  "|---|---:|---:|---:|---|---:|"]
        for stage in stages:
            of_stage = [t for t in trials if t["stage"] == stage and not t["warmup"]]
            ok = [t for t in of_stage if is_scored(t)]
            top = best_trial(ok, stage=None) if ok else None
            lines.append(f"| {stage_label(stage, names)} | {len(ok)} | {sum(is_failed(t) for t in of_stage)} | "
                         f"{_fmt(top['metric'] if top else None, '.4f')} | {top['trial_id'] if top else 'n/a'} | "
                         f"{_fmt_count(top['params'] if top else None)} |")
        lines.append("")
    if best is not None:
        lines += [f"**Selected architecture**: trial `{best['trial_id']}` "
                  f"({stage_label(best['stage'], names)}), {metric_name} {best['metric']:.4f}, "
                  f"{_fmt_count(best['params'])} params, {_fmt(best['latency_ms'], '.2f')} ms.", ""]
        if best["expressions"]:
            lines += ["| layer | expression |", "|---:|---|"]
            lines += [f"| {i} | `{e}` |" for i, e in enumerate(best["expressions"])]
            lines.append("")

    for key, caption in (("best_so_far", "Best-so-far per stage"),
                         ("metric_vs_params", f"{metric_name} vs parameters (Pareto front circled)"),
                         ("metric_vs_latency", f"{metric_name} vs CPU latency (Pareto front circled)")):
        if key in plots:
            lines += [f"![{caption}]({plots[key].name})", ""]
    if not plots:
        lines += ["No plots: no trial succeeded with a finite metric.", ""]

    for ids, what, unit in ((pareto_params, "parameters", "params"), (pareto_latency, "latency", "latency_ms")):
        if ids:
            lines += [f"### Pareto front: {metric_name} vs {what}", "",
                      f"| trial | stage | {metric_name} | params | non-emb. params | latency (ms) |",
                      "|---|---|---:|---:|---:|---:|"]
            for tid in ids:
                t = by_id[tid]
                lines.append(f"| {tid} | {stage_label(t['stage'], names)} | {t['metric']:.4f} | "
                             f"{_fmt_count(t['params'])} | {_fmt_count(t['non_embedding_params'])} | "
                             f"{_fmt(t['latency_ms'], '.2f')} |")
            lines.append("")

    if failed:
        lines += ["## Failed trials", "", "Counted above, never plotted or ranked.", "",
                  "| trial | stage | kind | status | reason |", "|---|---|---|---|---|"]
        for t in failed:
            reason = " ".join(str(t["message"] or "see the trial's log").split()).replace("|", "\\|")
            kind = "warm-up" if t["warmup"] else "candidate"
            lines.append(f"| {t['trial_id']} | {stage_label(t['stage'], names)} | {kind} | {t['status']} | "
                         f"{reason[:200]} |")
        lines.append("")
    return "\n".join(lines)
