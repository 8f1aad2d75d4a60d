"""Experiment reports: trials read back from NNI, the best trial, Pareto fronts, plots, tables.

Trials travel as plain dicts (JSON-friendly, what :func:`read_nni_trials` returns and
:func:`write_report` takes) with these keys; only ``trial_id`` is required:

``trial_id`` (str)
    NNI's trial job id.
``sequence`` (int or None)
    NNI's trial number (``sequenceId``), the x axis of the best-so-far plot.
``stage`` (int or None), ``stage_name`` (str or None)
    Search stage (zero-based, as in the ``_stage`` trial parameter); None outside a staged search.
``warmup`` (bool)
    A stage's warm-up trial: it trains the supernet and is never ranked or plotted as a score.
``status`` (str)
    ``SUCCEEDED``, ``FAILED``, ``USER_CANCELED``, ``SYS_CANCELED``, ``EARLY_STOPPED``,
    ``RUNNING``, ``WAITING`` ... (NNI's names). A trial that NNI calls SUCCEEDED but that
    reported no finite metric is read back as ``FAILED`` with a ``message`` saying so.
``metric`` (float or None)
    The final metric's ``default`` (dev metric, higher is better).
``params``, ``non_embedding_params`` (int or None), ``latency_ms`` (float or None)
    Size and CPU latency (batch 1, sequence 128, median) reported by the trial.
``expressions`` (list of str or None)
    Per-layer MLP expressions.
``arch`` (dict)
    The ``label -> value`` architecture (trial parameters without ``_``-prefixed keys).
``message`` (str or None)
    Why a trial failed, where known.
``final`` (dict or None)
    The raw final metric.

A trial is *scored* when it is a SUCCEEDED, non-warm-up trial with a finite metric; only scored
trials are ranked, plotted and put on Pareto fronts. Every other trial is counted, never drawn.

Rows of the comparison table (:func:`format_table`) are dicts with ``name``, ``dev_metric``,
``params``, ``non_embedding_params``, ``latency_ms`` and optionally ``role``
(``teacher`` / ``baseline`` / ``searched``) and ``note``; the speed-up column is relative to
the teacher row (``role == 'teacher'``, or the row named ``teacher``).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .errors import ConfigError, EffBertError
from .io import atomic_write, atomic_write_text

__all__ = [
    "ExperimentNotFoundError",
    "NoSucceededTrialError",
    "ReportResult",
    "read_nni_trials",
    "normalize_trial",
    "is_scored",
    "best_trial",
    "pareto_front",
    "format_table",
    "write_report",
    "TABLE_KEYS",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Trial parameter keys written by the progressive search (``strategies.core``).
_STAGE_KEY = "_stage"
_WARMUP_KEY = "_warmup_stage"
_STAGE_NAME_KEY = "_stage_name"

#: NNI's manifest of experiments (``nnictl`` and ``Experiment`` both keep it here).
_MANIFEST = Path("~/nni-experiments/.experiment")
_DEFAULT_EXPERIMENTS_DIR = Path("~/nni-experiments")

_TRIAL_DEFAULTS: Dict[str, Any] = {
    "trial_id": None, "sequence": None, "stage": None, "stage_name": None, "warmup": False,
    "status": "UNKNOWN", "metric": None, "params": None, "non_embedding_params": None,
    "latency_ms": None, "expressions": None, "arch": None, "message": None, "final": None,
}

#: Keys a table row may have.
TABLE_KEYS = ("name", "dev_metric", "params", "non_embedding_params", "latency_ms", "role", "note")


class ExperimentNotFoundError(EffBertError, LookupError):
    """No NNI experiment with the given id (or nothing answering on the given port)."""


class NoSucceededTrialError(EffBertError):
    """An experiment (or one of its stages) has no succeeded trial with a finite metric."""


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


# ============================================================================================
# Trials
# ============================================================================================

def normalize_trial(trial: Mapping[str, Any]) -> Dict[str, Any]:
    """A trial dict with every key of the module's trial format (missing ones set to None).

    Raises
    ------
    ConfigError
        If ``trial_id`` is missing, or ``metric`` / counts are not numbers.
    """
    if not isinstance(trial, Mapping):
        raise ConfigError(f"a trial must be a dict, got {type(trial).__name__}")
    unknown = sorted(set(trial) - set(_TRIAL_DEFAULTS))
    if unknown:
        raise ConfigError(f"trial {trial.get('trial_id')!r}: unknown key(s) {unknown}; "
                          f"allowed: {sorted(_TRIAL_DEFAULTS)}")
    out = {**_TRIAL_DEFAULTS, **dict(trial)}
    if out["trial_id"] is None:
        raise ConfigError(f"trial without a trial_id: {dict(trial)}")
    out["trial_id"] = str(out["trial_id"])
    out["status"] = str(out["status"]).upper()
    out["warmup"] = bool(out["warmup"])
    for key, kind in (("metric", float), ("latency_ms", float), ("params", int),
                      ("non_embedding_params", int), ("sequence", int), ("stage", int)):
        value = out[key]
        if value is None:
            continue
        try:
            out[key] = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"trial {out['trial_id']}: {key} must be a number, got {value!r}") from exc
    return out


def is_scored(trial: Mapping[str, Any]) -> bool:
    """True for a SUCCEEDED, non-warm-up trial with a finite metric."""
    metric = trial.get("metric")
    return (str(trial.get("status", "")).upper() == "SUCCEEDED" and not trial.get("warmup")
            and isinstance(metric, (int, float)) and math.isfinite(metric))


def _is_failed(trial: Mapping[str, Any]) -> bool:
    status = str(trial.get("status", "")).upper()
    return status == "FAILED" or (status == "SUCCEEDED" and not trial.get("warmup") and not is_scored(trial))


def best_trial(trials: Iterable[Mapping[str, Any]], *, stage: Union[int, str, None] = "last",
               experiment: Optional[str] = None) -> Dict[str, Any]:
    """The best scored trial: highest metric, then fewest parameters, then earliest.

    Parameters
    ----------
    trials : iterable of dict
        Trial dicts (see the module docstring).
    stage : int, 'last' or None
        ``'last'`` (default): the highest stage with a scored trial, the progressive search's
        answer (later stages refine earlier ones, and their scores, e.g. inherited-weight scores
        of the paper's stage 3, are not comparable with earlier stages'). An int: that stage.
        None: all trials.
    experiment : str, optional
        Named in the error message.

    Raises
    ------
    NoSucceededTrialError
        If no trial (of the stage) succeeded with a finite metric.
    """
    trials = [normalize_trial(t) for t in trials]
    scored = [t for t in trials if is_scored(t)]
    where = f"experiment {experiment}" if experiment else "the experiment"
    if stage == "last":
        stages = [t["stage"] for t in scored if t["stage"] is not None]
        if stages:
            stage = max(stages)
            logger.info("best trial taken from the last stage with results, stage %d", stage)
        else:
            stage = None
    elif stage is not None and not isinstance(stage, int):
        raise ConfigError(f"stage must be an int, 'last' or None, got {stage!r}")
    pool = scored if stage is None else [t for t in scored if t["stage"] == stage]
    if not pool:
        failed = sum(_is_failed(t) for t in trials)
        of_stage = "" if stage is None else f" in stage {stage}"
        raise NoSucceededTrialError(
            f"{where} has no succeeded trial with a finite metric{of_stage} "
            f"({len(trials)} trial(s), {failed} failed); check the failed trials' logs in the NNI web UI, "
            "or export a known architecture with --arch ARCH.json"
        )

    def key(t):
        return (-t["metric"], t["params"] if t["params"] is not None else math.inf,
                t["sequence"] if t["sequence"] is not None else math.inf, t["trial_id"])

    return min(pool, key=key)


def pareto_front(trials: Iterable[Mapping[str, Any]], cost: str = "params") -> List[Dict[str, Any]]:
    """Scored trials not dominated in (higher ``metric``, lower ``cost``), by increasing cost.

    A trial is dominated when another has a metric at least as high and a cost at least as low,
    one of them strictly. Trials without a ``cost`` value are left out.

    Parameters
    ----------
    trials : iterable of dict
        Trial dicts.
    cost : str
        ``params``, ``non_embedding_params`` or ``latency_ms``.
    """
    if cost not in ("params", "non_embedding_params", "latency_ms"):
        raise ConfigError(f"cost must be params, non_embedding_params or latency_ms, got {cost!r}")
    pts = [t for t in (normalize_trial(t) for t in trials) if is_scored(t) and t[cost] is not None]
    # Sweep by increasing cost (ties: best metric first); a trial is on the front iff its metric
    # beats every cheaper-or-equal trial seen before it.
    pts.sort(key=lambda t: (t[cost], -t["metric"]))
    front: List[Dict[str, Any]] = []
    best = -math.inf
    for t in pts:
        if t["metric"] > best:
            front.append(t)
            best = t["metric"]
        elif t["metric"] == best and front and front[-1][cost] == t[cost]:
            front.append(t)  # an exact duplicate point: neither dominates the other
    return front


# ============================================================================================
# Reading trials from NNI
# ============================================================================================

def read_nni_trials(experiment: Optional[str] = None, *, port: Optional[int] = None,
                    experiments_dir: Optional[PathLike] = None, timeout: float = 10.0) -> List[Dict[str, Any]]:
    """Read an NNI experiment's trials and final metrics as trial dicts.

    A running experiment is asked through its REST API (``/api/v1/nni/trial-jobs`` and
    ``/metric-data``); a stopped one is read from its database,
    ``<experiments dir>/<id>/db/nni.sqlite`` (tables ``TrialJobEvent`` and ``MetricData``),
    opened read-only, so no NNI manager needs to be started.

    Parameters
    ----------
    experiment : str, optional
        Experiment id. Its port and working directory are looked up in NNI's manifest
        (``~/nni-experiments/.experiment``).
    port : int, optional
        Port of a running experiment's REST server; with ``experiment`` too, the ids must match.
    experiments_dir : str or Path, optional
        The experiments' working directory (``experimentWorkingDirectory``), when the manifest
        does not know the experiment; default ``~/nni-experiments``.
    timeout : float
        Seconds to wait for the REST server.

    Returns
    -------
    list of dict
        One trial dict per trial, in trial-number order.

    Raises
    ------
    ExperimentNotFoundError
        If neither the REST server nor a database of the experiment can be found.
    """
    if experiment is None and port is None:
        raise ConfigError("read_nni_trials needs an experiment id or the port of a running experiment")
    if port is not None:
        return _read_rest(int(port), experiment, timeout)
    info = _manifest().get(experiment, {})
    status = str(info.get("status", "")).upper()
    if info.get("port") and status not in ("STOPPED", "DONE", "ERROR", "VIEWED", "NO_MORE_TRIAL") and status:
        try:
            return _read_rest(int(info["port"]), experiment, timeout)
        except ExperimentNotFoundError as exc:
            logger.info("experiment %s: REST API not available (%s); reading its database", experiment, exc)
    roots = []
    if experiments_dir is not None:
        roots.append(Path(experiments_dir).expanduser())
    if info.get("logDir"):
        roots.append(Path(info["logDir"]).expanduser())
    roots.append(_DEFAULT_EXPERIMENTS_DIR.expanduser())
    for root in roots:
        db = root / experiment / "db" / "nni.sqlite"
        if db.is_file():
            return _read_sqlite(db, experiment)
    known = sorted(_manifest())
    raise ExperimentNotFoundError(
        f"unknown NNI experiment {experiment!r}: no database at "
        f"{' or '.join(str(r / experiment / 'db' / 'nni.sqlite') for r in dict.fromkeys(roots))}"
        + (f"; experiments NNI knows: {', '.join(known)}" if known else "")
        + ". Check the id (`nnictl experiment list --all`), or pass the experiments' working directory"
    )


def _manifest() -> Dict[str, Dict[str, Any]]:
    path = _MANIFEST.expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _get_json(port: int, api: str, timeout: float) -> Any:
    url = f"http://localhost:{port}/api/v1/nni/{api}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - localhost only
            return json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ExperimentNotFoundError(f"no NNI experiment answers at {url} ({exc}); is it running? "
                                      "For a stopped experiment pass its id instead of a port") from exc


def _read_rest(port: int, experiment: Optional[str], timeout: float) -> List[Dict[str, Any]]:
    profile = _get_json(port, "experiment", timeout)
    found = profile.get("id") if isinstance(profile, dict) else None
    if experiment is not None and found is not None and found != experiment:
        raise ExperimentNotFoundError(f"port {port} serves experiment {found!r}, not {experiment!r}")
    jobs = _get_json(port, "trial-jobs", timeout)
    metrics = _get_json(port, "metric-data", timeout)
    finals: Dict[str, Any] = {}
    for m in metrics or []:
        if m.get("type") == "FINAL":
            finals.setdefault(m.get("trialJobId"), m.get("data"))
    trials = []
    for job in jobs or []:
        tid = job.get("trialJobId")
        data = finals.get(tid)
        if data is None and job.get("finalMetricData"):
            data = job["finalMetricData"][0].get("data")
        params = _hyper_parameters(job.get("hyperParameters") or [])
        trials.append(_trial_from_nni(tid, job.get("status"), job.get("sequenceId"), params, data,
                                      job.get("message")))
    return _finish(trials)


def _read_sqlite(db: Path, experiment: str) -> List[Dict[str, Any]]:
    try:
        # Read-only: the NNI manager of a running experiment may be writing the same file.
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ExperimentNotFoundError(f"cannot open the database of experiment {experiment} at {db}: {exc}") from exc
    try:
        events = conn.execute(
            "select trialJobId, event, data, sequenceId, message from TrialJobEvent order by rowid").fetchall()
        finals = conn.execute(
            "select trialJobId, data from MetricData where type = 'FINAL' order by rowid").fetchall()
    except sqlite3.Error as exc:
        raise ExperimentNotFoundError(f"{db} is not a readable NNI database ({exc})") from exc
    finally:
        conn.close()
    # Replay the events as the NNI manager does (nniDataStore.getTrialJobsByReplayEvents).
    jobs: Dict[str, Dict[str, Any]] = {}
    for tid, event, data, seq, message in events:
        if not tid:
            continue
        job = jobs.setdefault(tid, {"status": "UNKNOWN", "params": [], "sequence": None, "message": None})
        if event == "USER_TO_CANCEL":
            job["status"] = "USER_CANCELED"
        elif event == "ADD_CUSTOMIZED":
            job["status"] = "WAITING"
        elif event != "ADD_HYPERPARAMETER":
            job["status"] = event
        if data and data.strip():
            job["params"].append(data)
        if seq is not None and job["sequence"] is None:
            job["sequence"] = seq
        job["message"] = message
    final_by_trial: Dict[str, Any] = {}
    for tid, data in finals:
        final_by_trial.setdefault(tid, data)
    trials = [_trial_from_nni(tid, job["status"], job["sequence"], _hyper_parameters(job["params"]),
                              final_by_trial.get(tid), job["message"])
              for tid, job in jobs.items()]
    return _finish(trials)


def _decode(data: Any) -> Any:
    """NNI stores a metric as JSON of the JSON string the trial sent: decode until not a string."""
    for _ in range(3):
        if not isinstance(data, str):
            break
        try:
            data = json.loads(data)
        except ValueError:
            break
    return data


def _hyper_parameters(entries: Sequence[Any]) -> Dict[str, Any]:
    for entry in entries:
        hp = _decode(entry)
        if isinstance(hp, dict):
            params = hp.get("parameters", hp)
            if isinstance(params, dict):
                return params
    return {}


def _trial_from_nni(tid: str, status: Any, sequence: Any, params: Mapping[str, Any], data: Any,
                    message: Any) -> Dict[str, Any]:
    final = _decode(data) if data is not None else None
    warmup = _WARMUP_KEY in params
    stage = params.get(_WARMUP_KEY if warmup else _STAGE_KEY)
    trial = dict(_TRIAL_DEFAULTS, trial_id=str(tid), status=str(status or "UNKNOWN").upper(),
                 sequence=int(sequence) if sequence is not None else None, warmup=warmup,
                 arch={k: v for k, v in params.items() if not str(k).startswith("_")},
                 stage_name=params.get(_STAGE_NAME_KEY), message=message or None)
    metric = None
    if isinstance(final, Mapping):
        trial["final"] = dict(final)
        metric = final.get("default")
        for key in ("params", "non_embedding_params", "latency_ms"):
            if isinstance(final.get(key), (int, float)):
                trial[key] = final[key]
        exprs = final.get("expressions", final.get("expression"))
        if isinstance(exprs, list):
            trial["expressions"] = [str(e) for e in exprs]
        if stage is None and isinstance(final.get("stage"), int):
            stage = final["stage"]
        if final.get("failed") or final.get("error"):
            trial["message"] = str(final.get("reason") or final.get("error") or "reported as failed")
            metric = None
    elif final is not None:
        trial["final"] = {"default": final}
        metric = final
    if isinstance(metric, (int, float)) and not isinstance(metric, bool):
        trial["metric"] = float(metric)
    trial["stage"] = int(stage) if isinstance(stage, (int, float)) and not isinstance(stage, bool) else None
    if trial["status"] == "SUCCEEDED" and not warmup and not is_scored(trial):
        # Never let a success without a usable score look like a score.
        trial["status"] = "FAILED"
        if trial["message"] is None:
            trial["message"] = ("succeeded without a final metric" if final is None
                                else f"final metric {trial['final'].get('default')!r} is not a finite number")
    return trial


def _finish(trials: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Stage names come with the warm-up trials' parameters; give them to the stage's candidates.
    names = {t["stage"]: t["stage_name"] for t in trials if t["warmup"] and t["stage_name"]}
    for t in trials:
        if t["stage_name"] is None and t["stage"] in names:
            t["stage_name"] = names[t["stage"]]
    trials.sort(key=lambda t: (t["sequence"] if t["sequence"] is not None else math.inf, t["trial_id"]))
    return trials


# ============================================================================================
# Tables
# ============================================================================================

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
        unknown = sorted(set(row) - set(TABLE_KEYS))
        if unknown:
            raise ConfigError(f"table row {i} ({row.get('name')!r}): unknown key(s) {unknown}; "
                              f"allowed: {list(TABLE_KEYS)}")
        if not row.get("name"):
            raise ConfigError(f"table row {i} has no name")
        clean = {k: row.get(k) for k in TABLE_KEYS}
        for key in ("dev_metric", "params", "non_embedding_params", "latency_ms"):
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
        batch 1, sequence 128, median ms), optional ``role`` and ``note``. Unknown values may be
        None and print as ``n/a``.
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
    header = ["model", metric_name, "vs teacher", "params", "non-emb. params",
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
        cells = [name, _fmt(r["dev_metric"], ".4f"), rel, _fmt_count(r["params"]),
                 _fmt_count(r["non_embedding_params"]), _fmt(r["latency_ms"], ".2f"), speed]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ============================================================================================
# Plots and report.md
# ============================================================================================

def _stage_label(stage: Optional[int], names: Mapping[Optional[int], Optional[str]]) -> str:
    if stage is None:
        return "trials"
    name = names.get(stage)
    return f"stage {stage}" + (f" ({name})" if name else "")


def _stage_colors(stages: Sequence[Optional[int]]) -> Dict[Optional[int], Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(stages)}


def _new_figure():
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no GUI
    # backend, whatever backend the user's matplotlib is configured with.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def _plot_best_so_far(trials: List[Dict[str, Any]], names, colors, metric_name: str, path: Path) -> None:
    fig, ax = _new_figure()
    stages = list(colors)
    for stage in stages:
        of_stage = [t for t in trials if t["stage"] == stage and not t["warmup"]]
        scored = [t for t in of_stage if is_scored(t)]
        failed = sum(_is_failed(t) for t in of_stage)
        label = f"{_stage_label(stage, names)}: {len(scored)} scored" + (f", {failed} failed" if failed else "")
        if not scored:
            ax.plot([], [], color=colors[stage], label=label + " (nothing to plot)")
            continue
        xs = [t["sequence"] if t["sequence"] is not None else i for i, t in enumerate(scored)]
        ys = [t["metric"] for t in scored]
        best, running = -math.inf, []
        for y in ys:
            best = max(best, y)
            running.append(best)
        ax.scatter(xs, ys, s=14, color=colors[stage], alpha=0.35, linewidths=0)
        ax.step(xs, running, where="post", color=colors[stage], linewidth=2, label=label)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"best {metric_name} so far")
    ax.set_title("Best-so-far per stage (dots: each scored trial)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _plot_front(trials: List[Dict[str, Any]], cost: str, names, colors, metric_name: str, best: Optional[Dict],
                path: Path) -> List[str]:
    from matplotlib.ticker import EngFormatter

    pts = [t for t in trials if is_scored(t) and t[cost] is not None]
    front = pareto_front(pts, cost=cost)
    fig, ax = _new_figure()
    for stage in colors:
        of_stage = [t for t in pts if t["stage"] == stage]
        if of_stage:
            ax.scatter([t[cost] for t in of_stage], [t["metric"] for t in of_stage], s=22, alpha=0.7,
                       color=colors[stage], label=_stage_label(stage, names), linewidths=0)
    ax.step([t[cost] for t in front], [t["metric"] for t in front], where="post", color="black",
            linewidth=1.2, alpha=0.8)
    ax.scatter([t[cost] for t in front], [t["metric"] for t in front], s=60, facecolors="none",
               edgecolors="black", linewidths=1.3, label=f"Pareto front ({len(front)})")
    if best is not None and best[cost] is not None:
        ax.scatter([best[cost]], [best["metric"]], marker="*", s=220, color="gold", edgecolors="black",
                   linewidths=0.8, zorder=5, label=f"selected (trial {best['trial_id']})")
    failed = sum(_is_failed(t) for t in trials)
    xlabel = {"params": "parameters", "non_embedding_params": "non-embedding parameters",
              "latency_ms": "CPU latency, batch 1 / seq 128 (ms, median)"}[cost]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_name)
    if cost != "latency_ms":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title(f"{metric_name} vs {xlabel.split(',')[0]}: {len(pts)} scored trials"
                 + (f" ({failed} failed, not shown)" if failed else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return [t["trial_id"] for t in front]


def _params_axis(scored: Sequence[Mapping[str, Any]]) -> Optional[str]:
    # The embedding tables are the same for every candidate, so non-embedding parameters show
    # the differences better; fall back to totals when some trial did not report them.
    if scored and all(t["non_embedding_params"] is not None for t in scored):
        return "non_embedding_params"
    if any(t["params"] is not None for t in scored):
        return "params"
    return None


def write_report(workdir: PathLike, trials: Sequence[Mapping[str, Any]], table_rows: Sequence[Mapping[str, Any]],
                 out_dir: Optional[PathLike] = None, *, experiment: Optional[str] = None,
                 metric_name: str = "dev metric", title: Optional[str] = None) -> ReportResult:
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

    Returns
    -------
    ReportResult
        Paths, counts, table and Pareto fronts.

    Notes
    -----
    Plots (``best_so_far.png``, ``metric_vs_params.png``, ``metric_vs_latency.png``) show scored
    trials only. Failed trials are counted in the legends, titles and report; a plot with no
    scored trial to show is not written.
    """
    from .workdir import WorkDir

    trials = [normalize_trial(t) for t in trials]
    table = format_table(table_rows, metric_name=metric_name) if table_rows else ""
    out = Path(out_dir) if out_dir is not None else WorkDir.of(workdir).reports_dir
    out.mkdir(parents=True, exist_ok=True)

    candidates = [t for t in trials if not t["warmup"]]
    scored = [t for t in candidates if is_scored(t)]
    failed = [t for t in trials if _is_failed(t) or (t["warmup"] and t["status"] == "FAILED")]
    counts = {
        "total": len(trials),
        "scored": len(scored),
        "failed": len(failed),
        "warmup": sum(t["warmup"] for t in trials),
        "other": len(candidates) - len(scored) - sum(_is_failed(t) for t in candidates),
    }
    names = {t["stage"]: t["stage_name"] for t in trials if t["stage_name"]}
    stages = sorted({t["stage"] for t in candidates}, key=lambda s: (s is None, s if s is not None else 0))
    colors = _stage_colors(stages)
    best = None
    if scored:
        best = best_trial(scored, experiment=experiment)

    plots: Dict[str, Path] = {}
    pareto_params: List[str] = []
    pareto_latency: List[str] = []
    if scored:
        plots["best_so_far"] = out / "best_so_far.png"
        _plot_best_so_far(trials, names, colors, metric_name, plots["best_so_far"])
        axis = _params_axis(scored)
        if axis is not None:
            plots["metric_vs_params"] = out / "metric_vs_params.png"
            pareto_params = _plot_front(trials, axis, names, colors, metric_name, best, plots["metric_vs_params"])
        if any(t["latency_ms"] is not None for t in scored):
            plots["metric_vs_latency"] = out / "metric_vs_latency.png"
            pareto_latency = _plot_front(trials, "latency_ms", names, colors, metric_name, best,
                                         plots["metric_vs_latency"])

    text = _report_markdown(title or "EfficientBERT search report", experiment, Path(workdir), trials, counts,
                            stages, names, best, table, plots, pareto_params, pareto_latency, metric_name, failed)
    report = out / "report.md"
    atomic_write_text(text, report)
    logger.info("report written to %s (%d plots)", report, len(plots))
    return ReportResult(report=report, plots=plots, table=table, counts=counts, pareto_params=pareto_params,
                        pareto_latency=pareto_latency, best=best)


def _report_markdown(title, experiment, workdir, trials, counts, stages, names, best, table, plots,
                     pareto_params, pareto_latency, metric_name, failed) -> str:
    by_id = {t["trial_id"]: t for t in trials}
    lines = [f"# {title}", ""]
    if experiment:
        lines.append(f"- NNI experiment: `{experiment}`")
    lines += [
        f"- Work directory: `{workdir}`",
        f"- Trials: {counts['total']} ({counts['scored']} scored, {counts['failed']} failed, "
        f"{counts['warmup']} warm-up, {counts['other']} running or canceled)",
        "",
        "## Teacher, baseline and searched student",
        "",
    ]
    if table:
        lines += [table, "", "Latency: median CPU forward time at batch 1, sequence length 128. "
                  "`vs teacher`: dev metric as a percentage of the teacher's.", ""]
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
            lines.append(f"| {_stage_label(stage, names)} | {len(ok)} | {sum(_is_failed(t) for t in of_stage)} | "
                         f"{_fmt(top['metric'] if top else None, '.4f')} | {top['trial_id'] if top else 'n/a'} | "
                         f"{_fmt_count(top['params'] if top else None)} |")
        lines.append("")
    if best is not None:
        lines += [f"**Selected architecture**: trial `{best['trial_id']}` "
                  f"({_stage_label(best['stage'], names)}), {metric_name} {best['metric']:.4f}, "
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
                lines.append(f"| {tid} | {_stage_label(t['stage'], names)} | {t['metric']:.4f} | "
                             f"{_fmt_count(t['params'])} | {_fmt_count(t['non_embedding_params'])} | "
                             f"{_fmt(t['latency_ms'], '.2f')} |")
            lines.append("")

    if failed:
        lines += ["## Failed trials", "", "Counted above, never plotted or ranked.", "",
                  "| trial | stage | kind | status | reason |", "|---|---|---|---|---|"]
        for t in failed:
            reason = " ".join(str(t["message"] or "see the trial's log").split()).replace("|", "\\|")
            kind = "warm-up" if t["warmup"] else "candidate"
            lines.append(f"| {t['trial_id']} | {_stage_label(t['stage'], names)} | {kind} | {t['status']} | "
                         f"{reason[:200]} |")
        lines.append("")
    return "\n".join(lines)
