"""NNI records read back as trial dicts: the REST API of a running experiment, the sqlite
database of a stopped one.

Trials travel as plain dicts (JSON-friendly, what :func:`read_nni_trials` returns and
:func:`~nni_effbert.product.report_page.write_report` takes) with these keys; only ``trial_id`` is required:

``trial_id`` (str)
    NNI's trial job id.
``sequence`` (int or None)
    NNI's trial number (``sequenceId``), the x axis of the best-so-far plot.
``stage`` (int or None), ``stage_name`` (str or None)
    Search stage (zero-based, as in the ``_stage`` trial parameter); None outside a staged search.
``warmup`` (bool)
    A trial that prepares the search instead of scoring an architecture: a stage's warm-up
    (it trains the supernet) or the teacher trial. Never ranked or plotted as a score.
``rescore_of`` (int or None)
    Set on a re-score (``search.noise_rescores``): the progressive search's id of the candidate
    whose arch this trial scored again with the next evaluator seed. A re-score measures the
    score's noise; it is never ranked, plotted or counted as a candidate.
``teacher`` (bool)
    The teacher fine-tuning trial (``{"_teacher": true}``; also ``warmup``); its metric is the
    teacher's dev metric.
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
    The ``label -> value`` architecture (trial parameters without ``_``-prefixed keys; a
    ``NasExperiment`` trial's final metric ``arch``, since its parameters are NNI's serialised model).
``message`` (str or None)
    Why a trial failed, where known.
``final`` (dict or None)
    The raw final metric.

A trial is *scored* when it is a SUCCEEDED, non-warm-up trial with a finite metric; only scored
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, EffBertError
from ..params import NOOP_KEY, RESCORE_OF_KEY, STAGE_KEY, WARMUP_KEY, arch_part, is_teacher, stage_name
from ..typed_yaml import check_known_keys
from ..workdir import check_experiment_id

__all__ = ["ExperimentNotFoundError", "normalize_trial", "is_scored", "is_rescore", "is_failed", "read_nni_trials"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: NNI's manifest of experiments (``nnictl`` and ``Experiment`` both keep it here).
_MANIFEST = Path("~/nni-experiments/.experiment")
_DEFAULT_EXPERIMENTS_DIR = Path("~/nni-experiments")

_TRIAL_DEFAULTS: Dict[str, Any] = {
    "trial_id": None, "sequence": None, "stage": None, "stage_name": None, "warmup": False,
    "status": "UNKNOWN", "metric": None, "params": None, "non_embedding_params": None,
    "latency_ms": None, "expressions": None, "arch": None, "message": None, "final": None,
    "teacher": False, "rescore_of": None,
}


class ExperimentNotFoundError(EffBertError, LookupError):
    """No NNI experiment with the given id (or nothing answering on the given port)."""



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
    check_known_keys(trial, sorted(_TRIAL_DEFAULTS), f"trial {trial.get('trial_id')!r}")
    out = {**_TRIAL_DEFAULTS, **dict(trial)}
    if out["trial_id"] is None:
        raise ConfigError(f"trial without a trial_id: {dict(trial)}")
    out["trial_id"] = str(out["trial_id"])
    out["status"] = str(out["status"]).upper()
    out["teacher"] = bool(out["teacher"])
    out["warmup"] = bool(out["warmup"]) or out["teacher"]
    for key, kind in (("metric", float), ("latency_ms", float), ("params", int),
                      ("non_embedding_params", int), ("sequence", int), ("stage", int), ("rescore_of", int)):
        value = out[key]
        if value is None:
            continue
        try:
            out[key] = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"trial {out['trial_id']}: {key} must be a number, got {value!r}") from exc
    return out


def _has_score(trial: Mapping[str, Any]) -> bool:
    metric = trial.get("metric")
    return (str(trial.get("status", "")).upper() == "SUCCEEDED" and not trial.get("warmup")
            and isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric))


def is_scored(trial: Mapping[str, Any]) -> bool:
    """True for a SUCCEEDED candidate (not a warm-up or a re-score) with a finite metric."""
    return _has_score(trial) and trial.get("rescore_of") is None


def is_rescore(trial: Mapping[str, Any]) -> bool:
    """True for a SUCCEEDED re-score (``rescore_of``) with a finite metric."""
    return _has_score(trial) and trial.get("rescore_of") is not None


def is_failed(trial: Mapping[str, Any]) -> bool:
    status = str(trial.get("status", "")).upper()
    return status == "FAILED" or (status == "SUCCEEDED" and not trial.get("warmup") and not _has_score(trial))


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
    if experiment is not None:
        check_experiment_id(experiment)  # before it is joined to any folder
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
    ran: Dict[str, Any] = {}
    for m in metrics or []:
        if m.get("type") == "FINAL":
            finals.setdefault(m.get("trialJobId"), m.get("data"))
            ran.setdefault(m.get("trialJobId"), m.get("parameterId"))
    rows = []
    for job in jobs or []:
        tid = job.get("trialJobId")
        data = finals.get(tid)
        if data is None and job.get("finalMetricData"):
            data = job["finalMetricData"][0].get("data")
            ran.setdefault(tid, job["finalMetricData"][0].get("parameterId"))
        rows.append((tid, job.get("status"), job.get("sequenceId"), job.get("hyperParameters") or [], data,
                     job.get("message")))
    return _finish(_trials_from_jobs(rows, ran))


def _trials_from_jobs(rows: Sequence[Tuple[Any, Any, Any, Sequence[Any], Any, Any]],
                      ran: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Trial dicts from NNI jobs ``(id, status, sequence, hyperParameters, final metric, message)``.

    A job's parameters are the ones its final metric was reported with (``ran``: job id ->
    parameter id), not necessarily the ones NNI lists for it: NNI 3.0's local training service
    hands queued parameters to whichever trial asks first (see ``strategies.nni.broker``). Placeholder
    jobs (``_noop`` parameters) are left out."""
    by_pid: Dict[int, Dict[str, Any]] = {}
    listed = []
    for tid, status, seq, entries, data, message in rows:
        pid, params = _hyper_parameters_with_id(entries)
        if pid is not None:
            by_pid.setdefault(pid, params)
        listed.append((tid, status, seq, pid, params, data, message))
    trials, moved = [], 0
    for tid, status, seq, pid, params, data, message in listed:
        final = _decode(data) if data is not None else None
        echoed = final.get("parameter_id") if isinstance(final, Mapping) else None
        actual = echoed if isinstance(echoed, int) and not isinstance(echoed, bool) else _int_or_none(ran.get(tid))
        if actual is not None and actual != pid and actual in by_pid:
            params, moved = by_pid[actual], moved + 1
        if NOOP_KEY in params:
            continue
        trials.append(_trial_from_nni(tid, status, seq, params, data, message))
    if moved:
        logger.warning("%d NNI trial(s) ran parameters NNI lists under another trial (NNI hands queued "
                       "parameters to whichever trial asks first); their parameters here are the ones they "
                       "reported with", moved)
    return trials


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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
            "select trialJobId, data, parameterId from MetricData where type = 'FINAL' order by rowid").fetchall()
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
    ran: Dict[str, Any] = {}
    for tid, data, pid in finals:
        final_by_trial.setdefault(tid, data)
        ran.setdefault(tid, pid)
    rows = [(tid, job["status"], job["sequence"], job["params"], final_by_trial.get(tid), job["message"])
            for tid, job in jobs.items()]
    return _finish(_trials_from_jobs(rows, ran))


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


def _hyper_parameters_with_id(entries: Sequence[Any]) -> Tuple[Optional[int], Dict[str, Any]]:
    """``(parameter id, parameters)`` of a job's first hyper-parameter entry."""
    for entry in entries:
        hp = _decode(entry)
        if isinstance(hp, dict):
            params = hp.get("parameters", hp)
            if isinstance(params, dict):
                return _int_or_none(hp.get("parameter_id")), params
    return None, {}


def _trial_from_nni(tid: str, status: Any, sequence: Any, params: Mapping[str, Any], data: Any,
                    message: Any) -> Dict[str, Any]:
    final = _decode(data) if data is not None else None
    teacher = is_teacher(params)
    warmup = WARMUP_KEY in params or teacher
    stage = params.get(WARMUP_KEY if warmup else STAGE_KEY)
    trial = dict(_TRIAL_DEFAULTS, trial_id=str(tid), status=str(status or "UNKNOWN").upper(),
                 sequence=int(sequence) if sequence is not None else None, warmup=warmup, teacher=teacher,
                 arch=arch_part(params), rescore_of=params.get(RESCORE_OF_KEY),
                 stage_name=stage_name(params), message=message or None)
    metric = None
    if isinstance(final, Mapping):
        trial["final"] = dict(final)
        metric = final.get("default")
        if isinstance(final.get("arch"), Mapping):
            # A NasExperiment trial's parameters are NNI's serialised model, not the arch: its
            # evaluator reports the arch (nas.kd_evaluator.evaluate_nni_model).
            trial["arch"] = dict(final["arch"])
        for key in ("params", "non_embedding_params", "latency_ms"):
            if isinstance(final.get(key), (int, float)):
                trial[key] = final[key]
        exprs = final.get("expressions", final.get("expression"))
        if isinstance(exprs, list):
            trial["expressions"] = [str(e) for e in exprs]
        if stage is None and not teacher and isinstance(final.get("stage"), int):
            stage = final["stage"]
        if isinstance(final.get("rescore_of"), int) and not isinstance(final.get("rescore_of"), bool):
            trial["rescore_of"] = final["rescore_of"]  # a NasExperiment trial's parameters do not carry it
        if final.get("failed") or final.get("error"):
            trial["message"] = str(final.get("reason") or final.get("error") or "reported as failed")
            metric = None
    elif final is not None:
        trial["final"] = {"default": final}
        metric = final
    if isinstance(metric, (int, float)) and not isinstance(metric, bool):
        trial["metric"] = float(metric)
    trial["stage"] = int(stage) if isinstance(stage, (int, float)) and not isinstance(stage, bool) else None
    if trial["status"] == "SUCCEEDED" and not warmup and not _has_score(trial):
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


