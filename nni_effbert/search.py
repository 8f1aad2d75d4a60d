"""``nni-effbert search``: run the progressive search through NNI's experiment manager.

Two paths, one result (:class:`SearchResult`):

``nnictl`` (default)
    :func:`run_search` saves the resolved experiment config into the work directory
    (``<workdir>/config.yml``), writes an ``nnictl create`` config beside it
    (``<workdir>/nnictl/nnictl.yml``, see :func:`nnictl_config`), registers the
    ``EfficientBertProgressive`` advisor with NNI if needed and runs ``nnictl create``. Every
    trial is ``python -m nni_effbert.trial --config <workdir>/config.yml``: stage warm-ups
    are trials of their own, visible in the web UI. NNI's experiment folders go to
    ``<workdir>/nni-experiments`` (NNI's manifest of experiment ids stays in
    ``~/nni-experiments/.experiment``, where ``nnictl`` and :func:`~.report.read_nni_trials`
    look them up). With ``wait=True`` it polls ``/api/v1/nni/check-status`` until the
    experiment ended, stops it (freeing the port; its records stay readable by id) and
    returns the trials.

``python=True``
    ``NasExperiment(space, KDEvaluator(cfg).as_nni_evaluator(), ProgressiveStrategy(...))``
    with NNI's training-service execution engine and the ``simplified`` model format: the
    NNI manager runs every candidate as a trial process (web UI as above), while the stage
    warm-ups run **inside this process**, through ``warmup_fn=KDEvaluator.warmup``, while no
    candidate runs. A NAS experiment always blocks until the strategy is done, whatever
    ``wait`` says. NNI stores a NAS trial's parameters as a serialised model, which
    :func:`~.report.read_nni_trials` cannot read as an arch, so the strategy's records (arch,
    stage, status, final metric dict from the evaluator's ``trials/<id>/result.json``) are
    also written to ``<workdir>/trials.json`` as ``{"experiment_id", "trials": [...]}`` with
    :mod:`~.report` trial dicts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .errors import CheckpointError, ConfigError, EffBertError
from .io import atomic_write_json, atomic_write_text
from .workdir import WorkDir

__all__ = [
    "SearchError",
    "SearchResult",
    "NNICTL_DIR",
    "EXPERIMENTS_DIR",
    "TRIALS_FILE",
    "TERMINAL_TRIAL_STATUSES",
    "free_port",
    "nnictl_config",
    "write_nnictl_config",
    "run_search",
    "format_trials",
    "configure",
    "run",
    "run_register",
]

logger = logging.getLogger(__name__)

#: Sub-folder of the work directory holding the nnictl config (also the trials' code directory:
#: NNI uploads it to remote machines, so it holds only small files).
NNICTL_DIR = "nnictl"
#: Sub-folder of the work directory given to NNI as ``experimentWorkingDirectory``.
EXPERIMENTS_DIR = "nni-experiments"
#: Records of a ``--python`` search, in the work directory.
TRIALS_FILE = "trials.json"

TERMINAL_TRIAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"})
_ENDED = ("DONE", "STOPPED", "ERROR")
_NO_MORE = ("NO_MORE_TRIAL", "TUNER_NO_MORE_TRIAL")


class SearchError(EffBertError):
    """The search could not be started, or the experiment ended in ERROR (message: the reason)."""


@dataclass
class SearchResult:
    """What :func:`run_search` started or ran.

    Attributes
    ----------
    experiment_id : str
    url : str
        The NNI web UI (``http://localhost:<port>``); dead once the experiment is stopped.
    status : str
        NNI's experiment status when :func:`run_search` returned: ``RUNNING`` (not waited
        for), ``DONE``, ``NO_MORE_TRIAL`` / ``TUNER_NO_MORE_TRIAL`` (all trials ended),
        ``STOPPED`` or ``ERROR``.
    workdir : Path
    nnictl_config : Path or None
        The ``nnictl create`` config written (None on the ``--python`` path).
    port : int
    trials : list of dict
        :mod:`~.report` trial dicts when waited for (empty otherwise).
    error : str or None
        Why the experiment ended in ERROR.
    trials_file : Path or None
        ``<workdir>/trials.json`` (``--python`` path).
    """

    experiment_id: str
    url: str
    status: str
    workdir: Path
    nnictl_config: Optional[Path]
    port: int = 0
    trials: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None
    trials_file: Optional[Path] = None

    @property
    def ok(self) -> bool:
        """Ended without ERROR and with at least one scored candidate (or not waited for)."""
        if self.status == "RUNNING":
            return True
        from .report import is_scored

        return self.status != "ERROR" and any(is_scored(t) for t in self.trials)


# ============================================================================================
# nnictl config
# ============================================================================================


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _space_of(cfg):
    """The student space as the advisor builds it from ``classArgs.config`` (same preset and
    overrides), so the ``searchSpace`` written here matches the advisor's check."""
    from .search_spaces import EfficientBertSpace

    try:
        return EfficientBertSpace.preset(cfg.student.preset, **dict(cfg.student.overrides))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"student: cannot build the {cfg.student.preset!r} space ({exc})") from None


def nnictl_config(cfg, config_file: Path, *, search_space_file: Optional[Path] = None,
                  code_dir: Optional[Path] = None, experiments_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The ``nnictl create`` config (v2 field names) of an experiment.

    Parameters
    ----------
    cfg : ExperimentConfig
    config_file : Path
        The saved experiment config every trial and the advisor read (absolute).
    search_space_file : Path, optional
        ``searchSpaceFile`` (left out when None: the advisor builds the space from ``config``).
    code_dir, experiments_dir : Path, optional
        ``trialCodeDirectory`` / ``experimentWorkingDirectory`` (default: ``<workdir>/nnictl``
        and ``<workdir>/nni-experiments``).
    """
    wd = WorkDir.of(cfg)
    config_file = Path(config_file).absolute()
    conf: Dict[str, Any] = {"experimentName": f"effbert-{cfg.task.name}-{wd.root.name}"}
    if search_space_file is not None:
        conf["searchSpaceFile"] = str(Path(search_space_file).absolute())
    conf.update({
        "trialCommand": f"{sys.executable} -m nni_effbert.trial --config {config_file}",
        "trialCodeDirectory": str(Path(code_dir or wd.root / NNICTL_DIR).absolute()),
        "trialConcurrency": int(cfg.search.trial_concurrency),
        "maxTrialNumber": int(cfg.search.total_trials()),
        "tuner": {"name": "EfficientBertProgressive", "classArgs": {"config": str(config_file)}},
        "trainingService": {"platform": "local", "useActiveGpu": False},
        "experimentWorkingDirectory": str(Path(experiments_dir or wd.root / EXPERIMENTS_DIR).absolute()),
    })
    return conf


def write_nnictl_config(cfg, config_file: Path) -> Path:
    """Write ``<workdir>/nnictl/{nnictl.yml,search_space.json}``; returns the YAML's path."""
    wd = WorkDir.of(cfg)
    folder = wd.root / NNICTL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    space_file = folder / "search_space.json"
    atomic_write_json(_space_of(cfg).nni_search_space(), space_file)
    conf = nnictl_config(cfg, config_file, search_space_file=space_file)
    path = folder / "nnictl.yml"
    header = ("# Written by `nni-effbert search`; run it again with\n"
              f"#   nnictl create --config {path} --port 8080\n")
    atomic_write_text(header + yaml.safe_dump(conf, sort_keys=False), path)
    return path


def _prepare(cfg, config_path: Optional[str]) -> Tuple[WorkDir, Path]:
    """Check the teacher is there and save the resolved config into the work directory."""
    from .teacher import read_teacher_marker

    wd = WorkDir.of(cfg).ensure()
    if read_teacher_marker(wd.teacher_dir) is None:
        raise CheckpointError(f"no fine-tuned teacher in {wd.teacher_dir}; run `nni-effbert teacher -c "
                              f"{config_path or '<config>'}` before the search")
    cfg.save(wd.config_file)
    return wd, wd.config_file


# ============================================================================================
# nnictl and the REST API
# ============================================================================================


def _nnictl(args: Sequence[str], timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nni.tools.nnictl.nnictl", *args]
    logger.debug("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise SearchError(f"`nnictl {' '.join(args)}` did not return within {timeout:.0f} s") from exc


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text or "")  # nnictl colours its output


def _experiment_id(output: str) -> Optional[str]:
    found = re.search(r'nnictl stop (\w+)"', output) or re.search(r"experiment id:?\s*(\w+)", output, re.I)
    return found.group(1) if found else None


def _get(port: int, api: str, timeout: float = 10.0) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/nni/{api}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - localhost only
        return json.loads(resp.read().decode("utf-8"))


def _log_errors(exp_dir: Path, limit: int = 5) -> List[str]:
    """Last ERROR lines of the dispatcher's and the manager's logs."""
    lines: List[str] = []
    for name in ("dispatcher.log", "nnimanager.log"):
        path = exp_dir / "log" / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            lines += [line.strip() for line in text if "ERROR" in line][-limit:]
    return lines


def _error_reason(port: int, exp_dir: Path) -> str:
    reasons: List[str] = []
    try:
        status = _get(port, "check-status")
        for err in status.get("errors") or []:
            reasons.append(" ".join(str(err).split()))
    except (urllib.error.URLError, OSError, ValueError):
        pass
    if not reasons:
        reasons = _log_errors(exp_dir)
    return "; ".join(dict.fromkeys(reasons)) or f"see the logs in {exp_dir / 'log'}"


def _wait(port: int, total: int, progress: bool, timeout: Optional[float]) -> str:
    """Poll the REST API until the experiment ended (and all trials with it); returns its status."""
    from tqdm.auto import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=total, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    failures, shown = 0, ""
    try:
        while True:
            try:
                status = str(_get(port, "check-status").get("status", "")).upper()
                jobs = _get(port, "trial-jobs") or []
                failures = 0
            except (urllib.error.URLError, OSError, ValueError) as exc:
                failures += 1
                if failures >= 10:  # ten polls in a row: the manager is gone
                    raise SearchError(f"the NNI manager on port {port} stopped answering ({exc})") from exc
                status, jobs = "", None
            if jobs is not None:
                ended = sum(str(j.get("status")).upper() in TERMINAL_TRIAL_STATUSES for j in jobs)
                bar.total = max(total, len(jobs))
                bar.update(ended - bar.n)
                running = [j for j in jobs if str(j.get("status")).upper() not in TERMINAL_TRIAL_STATUSES]
                if status and status.lower() != shown:
                    shown = status.lower()
                    bar.set_postfix_str(shown)
                if status in _ENDED or (status in _NO_MORE and not running):
                    return status
            if deadline is not None and time.monotonic() > deadline:
                raise SearchError(f"the experiment did not end within {timeout:.0f} s (status {status or '?'})")
            time.sleep(2.0)  # polling interval of a REST API, not synchronisation
    finally:
        bar.close()


def _check_resumable(wd: WorkDir, exp_id: str, *, nas: bool) -> Path:
    """The folder of experiment ``exp_id`` in this work directory, if it can be resumed.

    Raises
    ------
    ConfigError
        If the id is malformed, or this work directory holds no such experiment (or, for
        ``nas``, no NasExperiment checkpoint of it).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", exp_id or ""):
        raise ConfigError(f"--resume {exp_id!r}: an experiment id is letters and digits, like 'a1b2c3d4'")
    root = wd.root / EXPERIMENTS_DIR
    exp_dir = root / exp_id
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    hint = f"experiments in {root}: {', '.join(known) if known else 'none'}"
    if not exp_dir.is_dir():
        raise ConfigError(f"--resume {exp_id}: no experiment {exp_id} in this work directory ({hint})")
    has_nas_checkpoint = any((exp_dir / "checkpoint").glob("state.ckpt*"))  # NNI adds a suffix (.torch)
    if nas and not has_nas_checkpoint:
        raise ConfigError(f"--resume {exp_id} --python: experiment {exp_id} has no NasExperiment checkpoint "
                          f"({exp_dir / 'checkpoint' / 'state.ckpt'}); an nnictl search resumes without --python")
    if not nas and has_nas_checkpoint:
        raise ConfigError(f"--resume {exp_id}: experiment {exp_id} is a NasExperiment (--python) search; "
                          "resume it with --python")
    return exp_dir


def _run_nnictl(cfg, config_path: Optional[str], *, wait: bool, port: Optional[int], progress: bool,
                timeout: Optional[float], resume: Optional[str] = None) -> SearchResult:
    from nni_effbert.strategies.registration import register_tuner

    wd, config_file = _prepare(cfg, config_path)
    if resume is not None:
        _check_resumable(wd, resume, nas=False)
    conf_path = write_nnictl_config(cfg, config_file)
    try:
        meta = register_tuner()
    except (ImportError, ValueError, OSError) as exc:
        raise SearchError(f"cannot register the EfficientBertProgressive tuner with NNI ({exc})") from exc
    logger.info("tuner %s registered (%s)", meta.get("builtinName"), meta.get("className"))
    port = free_port() if port is None else int(port)
    if resume is None:
        args = ["create", "--config", str(conf_path), "--port", str(port)]
    else:
        args = ["resume", resume, "--port", str(port)]
    created = _nnictl(args)
    output = _plain(created.stdout + created.stderr)
    exp_id = _experiment_id(output) if resume is None else resume
    if created.returncode != 0 or exp_id is None or "ERROR" in output:
        tail = " | ".join(line.strip() for line in output.splitlines() if line.strip())[-800:]
        raise SearchError(f"`nnictl {' '.join(args)}` failed: {tail}")
    url = f"http://localhost:{port}"
    exp_dir = wd.root / EXPERIMENTS_DIR / exp_id
    print(f"experiment {exp_id} {'resumed' if resume else 'started'}: web UI {url}", flush=True)
    print(f"  nnictl config {conf_path}; logs {exp_dir / 'log'}", flush=True)
    result = SearchResult(exp_id, url, "RUNNING", wd.root, conf_path, port=port)
    if not wait:
        print(f"  stop it with: nnictl stop {exp_id}", flush=True)
        return result
    try:
        result.status = _wait(port, cfg.search.total_trials(), progress, timeout)
        if result.status == "ERROR":
            result.error = _error_reason(port, exp_dir)
        from .report import read_nni_trials

        try:
            result.trials = read_nni_trials(exp_id, port=port)
        except EffBertError as exc:
            logger.warning("could not read the trials of %s: %s", exp_id, exc)
    finally:
        stopped = _nnictl(["stop", exp_id])
        if stopped.returncode != 0:
            logger.warning("`nnictl stop %s` failed: %s", exp_id, _plain(stopped.stdout + stopped.stderr)[-500:])
        else:
            logger.info("experiment %s stopped (port %d freed)", exp_id, port)
    return result


# ============================================================================================
# NasExperiment path
# ============================================================================================


def _trial_results(wd: WorkDir, trial_ids: Optional[set] = None) -> Dict[Tuple[str, Any], Tuple[str, Dict[str, Any]]]:
    """``(arch JSON, stage) -> (NNI trial id, metric dict)`` from the evaluator's records
    (``trials/<id>/result.json``; only those of ``trial_ids`` when given), newest last so that it wins."""
    found: Dict[Tuple[str, Any], Tuple[str, Dict[str, Any]]] = {}
    paths = sorted(wd.trials_dir.glob("*/result.json"), key=lambda p: p.stat().st_mtime) \
        if wd.trials_dir.is_dir() else []
    for path in paths:
        if trial_ids is not None and path.parent.name not in trial_ids:
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        result = rec.get("result") if isinstance(rec, dict) else None
        if rec.get("status") == "succeeded" and isinstance(result, dict) and isinstance(rec.get("arch"), dict):
            found[(json.dumps(rec["arch"], sort_keys=True), result.get("stage"))] = (path.parent.name, result)
    return found


def _records_to_trials(strategy, wd: WorkDir) -> List[Dict[str, Any]]:
    """The strategy's records as :mod:`~.report` trial dicts. NNI's NAS engine keeps only the
    ``default`` value of a metric, so the full metric dict (and NNI's trial id) comes from the
    record the evaluator wrote in the trial process."""
    from nni_effbert.strategies.core import split_parameters

    results = _trial_results(wd)
    names = {i: s.name for i, s in enumerate(strategy.search_config.stages)}
    trials = []
    for seq, rec in enumerate(strategy.search.records):
        arch, _ = split_parameters(rec.parameters)
        # Only a success of this search takes a record (an older run may have scored the same arch).
        nni_id, final = results.get((json.dumps(arch, sort_keys=True), rec.stage), (None, None)) \
            if not rec.warmup and rec.status == "succeeded" else (None, None)
        status = {"succeeded": "SUCCEEDED", "failed": "FAILED"}.get(rec.status, str(rec.status).upper())
        trial: Dict[str, Any] = {
            "trial_id": nni_id or f"{'warmup' if rec.warmup else 'strategy'}-{rec.trial_id}", "sequence": seq,
            "stage": rec.stage, "stage_name": names.get(rec.stage), "warmup": bool(rec.warmup), "status": status,
            "arch": arch, "message": rec.reason, "params": rec.params_count,
        }
        if isinstance(final, Mapping):
            trial["final"] = dict(final)
            for key in ("params", "non_embedding_params", "latency_ms"):
                if isinstance(final.get(key), (int, float)):
                    trial[key] = final[key]
            if isinstance(final.get("expressions"), list):
                trial["expressions"] = [str(e) for e in final["expressions"]]
        if rec.score is not None and math.isfinite(float(rec.score)):
            trial["metric"] = float(rec.score)
        trials.append(trial)
    return trials


def _finished_after_stop(wd: WorkDir, exp_id: str):
    """``finished_fn`` of a resumed ``--python`` search: parameters -> score of a candidate that
    SUCCEEDED in experiment ``exp_id`` (NNI's records) with a result its trial process recorded
    (``trials/<id>/result.json``); None for any other. Read before the experiment resumes."""
    from nni_effbert.strategies.core import split_parameters

    from .report import read_nni_trials

    try:
        succeeded = {t["trial_id"] for t in read_nni_trials(exp_id, experiments_dir=wd.root / EXPERIMENTS_DIR)
                     if t.get("status") == "SUCCEEDED"}
    except EffBertError as exc:  # then trials running at the stop are simply proposed again
        logger.warning("resume: could not read experiment %s's trials (%s); candidates left running at the stop "
                       "run again", exp_id, exc)
        succeeded = set()
    scores: Dict[Tuple[str, Any], float] = {}
    for key, (_, final) in _trial_results(wd, succeeded).items():  # this experiment's trials only
        value = final.get("default")
        if isinstance(value, (int, float)) and math.isfinite(value):
            scores[key] = float(value)

    def finished(parameters: Mapping[str, Any]) -> Optional[float]:
        arch, meta = split_parameters(parameters)
        return scores.get((json.dumps(arch, sort_keys=True), meta.get("_stage")))

    return finished


class _Interrupted(KeyboardInterrupt):
    """SIGTERM seen by the ``--python`` search: handled as Ctrl-C (NNI stops and checkpoints)."""


def _save_nas_checkpoint(experiment) -> None:
    """Write the NasExperiment's ``checkpoint/state.ckpt`` atomically (temp file, then rename).

    NNI writes it only when the experiment starts and when it stops; the strategy calls this
    after every finished trial too, so a search killed outright resumes from its last result.
    """
    from nni.nas.utils.serializer import get_default_serializer

    serializer = get_default_serializer()
    folder = experiment._checkpoint_directory  # pylint: disable=protected-access
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".state.ckpt.{os.getpid()}.tmp"
    written = Path(str(tmp) + serializer.suffix)  # NNI's serializers add their suffix (.torch)
    try:
        serializer.save(experiment.state_dict(), tmp)
        os.replace(written, folder / ("state.ckpt" + serializer.suffix))
    finally:
        for path in (tmp, written):
            if path.exists():
                path.unlink()


@contextlib.contextmanager
def _nas_channel_skips_resume_commands():
    """Work around NNI 3.0 for ``NasExperiment.resume`` through a training service.

    On resume the NNI manager sends ``ImportData`` (the finished trials) and, if trials were
    still waiting or running at the stop, ``AddCustomizedTrialJob`` (those trials, which it runs
    again) on the tuner channel. NNI 3.0's NAS channel knows neither: its listener thread dies
    on ``ValueError: Unknown command type`` and the resumed search waits forever. Both are
    skipped here, only while the resumed experiment runs: the strategy restores its history
    from the checkpoint and proposes unfinished candidates again itself (a graceful stop
    cancels them first, see :func:`_cancel_unfinished_trials`).
    """
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    skipped = (str(CommandType.ImportData), str(CommandType.AddCustomizedTrialJob))
    original = TunerCommandChannel.receive

    def receive(self):
        while True:
            try:
                return original(self)
            except ValueError as exc:
                if not any(name in str(exc) for name in skipped):
                    raise
                if str(CommandType.AddCustomizedTrialJob) in str(exc):
                    logger.warning("resume: the NNI manager re-runs trials left unfinished by the stopped process; "
                                   "their results are not used (the strategy proposes those candidates again)")
                else:
                    logger.info("resume: skipped NNI's ImportData (the strategy restored its own history)")

    TunerCommandChannel.receive = receive
    try:
        yield
    finally:
        TunerCommandChannel.receive = original


_UNFINISHED = ("WAITING", "RUNNING", "UNKNOWN")


def _cancel_unfinished_trials(experiment, timeout: float = 60.0) -> List[str]:
    """Cancel the trials still waiting or running in a NasExperiment's manager; returns their ids.

    Called when a ``--python`` search stops early. The NNI manager re-runs the trials it
    has as waiting or running when the experiment is resumed, while NNI's NAS engine ignores
    their results (their parameter ids belong to the stopped process) and the strategy
    proposes those candidates again itself: cancelled, they run once, not twice.
    """
    if getattr(experiment, "_proc", None) is None or not getattr(experiment, "port", None):
        return []
    try:
        pending = [j["trialJobId"] for j in experiment.list_trial_jobs_raw() if j.get("status") in _UNFINISHED]
        for trial_id in pending:
            experiment.kill_trial_job(trial_id)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            jobs = {j["trialJobId"]: j.get("status") for j in experiment.list_trial_jobs_raw()}
            if not any(jobs.get(t) in _UNFINISHED for t in pending):
                break
            time.sleep(0.5)  # polling the manager's REST API for the cancelled trials' status
        if pending:
            logger.info("cancelled unfinished trials %s; the strategy proposes them again on resume", pending)
        return pending
    except Exception:  # stopping must go on; the manager then re-runs them on resume
        logger.exception("could not cancel the unfinished trials before stopping")
        return []


def _nas_experiment_class():
    """``NasExperiment`` whose ``stop()`` first cancels the trials still waiting or running."""
    from nni.experiment import rest
    from nni.nas.experiment import NasExperiment

    class EffBertNasExperiment(NasExperiment):
        def list_trial_jobs_raw(self):
            return rest.get(self.port, "/trial-jobs", self.url_prefix) or []

        def stop(self) -> None:
            _cancel_unfinished_trials(self)
            super().stop()

    return EffBertNasExperiment


def _run_python(cfg, config_path: Optional[str], *, port: Optional[int], progress: bool,
                resume: Optional[str] = None) -> SearchResult:
    from nni.nas.experiment import NasExperimentConfig

    from nni_effbert.strategies import ProgressiveStrategy

    from .evaluator import KDEvaluator
    from .report import normalize_trial

    wd, _ = _prepare(cfg, config_path)
    if resume is not None:
        _check_resumable(wd, resume, nas=True)
    evaluator = KDEvaluator(cfg, progress=progress)
    space = evaluator.space  # the experiment's space (teacher-sized fit_dense, task labels)
    holder: Dict[str, Any] = {}

    def checkpoint() -> None:
        try:
            _save_nas_checkpoint(holder["experiment"])
        except Exception:  # a failed save must not stop the search; NNI saves again at stop
            logger.exception("could not save the NAS experiment checkpoint")

    # arch_space: NNI hands the strategy a SimplifiedModelSpace, which lacks the arch API.
    strategy = ProgressiveStrategy(search=cfg.search, warmup_fn=evaluator.warmup, arch_space=space,
                                   checkpoint_fn=checkpoint,
                                   finished_fn=_finished_after_stop(wd, resume) if resume is not None else None)
    conf = NasExperimentConfig("ts", "simplified", "local")
    conf.experiment_name = f"effbert-{cfg.task.name}-{wd.root.name}-nas"
    conf.trial_concurrency = int(cfg.search.trial_concurrency)
    conf.experiment_working_directory = str(wd.root / EXPERIMENTS_DIR)
    conf.training_service.use_active_gpu = False
    experiment = _nas_experiment_class()(space, evaluator.as_nni_evaluator(), strategy, conf, id=resume)
    holder["experiment"] = experiment
    port = free_port() if port is None else int(port)
    url = f"http://localhost:{port}"
    print(f"NAS experiment {experiment.id} {'resumed' if resume else 'started'}: web UI {url} "
          "(warm-ups run in this process)", flush=True)
    print(f"  stop it with Ctrl-C (or SIGTERM); resume with: nni-effbert search -c {config_path or '<config>'} "
          f"--python --resume {experiment.id}", flush=True)
    result = SearchResult(experiment.id, url, "RUNNING", wd.root, None, port=port)

    def on_sigterm(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        # NNI catches Ctrl-C (and our SIGTERM) in run/resume, stops and checkpoints; None then.
        if resume:
            with _nas_channel_skips_resume_commands():
                finished = experiment.resume(port=port)
        else:
            finished = experiment.run(port=port)
        result.status = "DONE" if finished else "STOPPED"
    except Exception as exc:  # the strategy's own failure (e.g. a failed warm-up) ends the search
        result.status, result.error = "ERROR", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        logger.error("NAS experiment %s failed: %s", experiment.id, result.error)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        experiment.stop()
    if strategy.search is not None:
        result.trials = [normalize_trial(t) for t in _records_to_trials(strategy, wd)]
        result.trials_file = wd.root / TRIALS_FILE
        atomic_write_json({"experiment_id": experiment.id, "trials": result.trials}, result.trials_file)
        if result.status == "DONE" and strategy.search.done is not None and strategy.search.done.failed:
            result.status, result.error = "ERROR", strategy.search.done.reason
    if result.status == "STOPPED":
        print(f"NAS experiment {experiment.id} stopped; resume with: nni-effbert search -c "
              f"{config_path or '<config>'} --python --resume {experiment.id}", flush=True)
    return result


# ============================================================================================
# Public entry
# ============================================================================================


def run_search(cfg, *, config_path: Optional[str], wait: bool, python: bool = False, port: Optional[int] = None,
               progress: bool = True, timeout: Optional[float] = None, resume: Optional[str] = None) -> SearchResult:
    """Run the progressive search of an experiment through NNI (see the module docstring).

    Parameters
    ----------
    cfg : ExperimentConfig
    config_path : str, optional
        The YAML it was loaded from (for messages).
    wait : bool
        Block until the experiment ended, then stop it and return its trials (nnictl path;
        the ``python`` path always blocks).
    python : bool
        Run ``NasExperiment`` in this process instead of ``nnictl create``.
    port : int, optional
        Web UI / REST port (default: a free one).
    progress : bool
        A progress bar over trials ended / total.
    timeout : float, optional
        With ``wait``: give up (and stop the experiment) after this many seconds.
    resume : str, optional
        Resume this stopped experiment of the work directory instead of creating one
        (``nnictl resume``, or ``NasExperiment.resume`` with ``python``): the strategy goes on
        with its saved history; finished trials are not re-run, warm-ups not redone.

    Returns
    -------
    SearchResult

    Raises
    ------
    CheckpointError
        No fine-tuned teacher in the work directory.
    SearchError
        ``nnictl create`` failed, or the manager stopped answering.
    """
    if port is not None and not (0 < int(port) < 65536):
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if python:
        return _run_python(cfg, config_path, port=port, progress=progress, resume=resume)
    return _run_nnictl(cfg, config_path, wait=wait, port=port, progress=progress, timeout=timeout, resume=resume)


def format_trials(trials: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of trials: id, stage, status, metric, params."""
    rows = [("trial", "stage", "status", "metric", "params")]
    for t in trials:
        stage = "-" if t.get("stage") is None else str(t["stage"])
        if t.get("stage_name"):
            stage += f" {t['stage_name']}"
        if t.get("warmup"):
            stage += " (warm-up)"
        metric = t.get("metric")
        params = t.get("params")
        rows.append((str(t.get("trial_id")), stage, str(t.get("status")),
                     "-" if metric is None else f"{metric:.4f}", "-" if params is None else f"{int(params):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ============================================================================================
# CLI
# ============================================================================================


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``nni-effbert search``."""
    parser.add_argument("--wait", action="store_true",
                        help="block until the experiment ends, stop it, print a per-trial summary")
    parser.add_argument("--python", action="store_true",
                        help="run NasExperiment + ProgressiveStrategy in this process instead of nnictl create "
                             "(warm-ups run here; always waits)")
    parser.add_argument("--port", type=int, metavar="N", help="web UI / REST port (default: a free one)")
    parser.add_argument("--resume", metavar="ID",
                        help="resume this stopped experiment of the work directory (with --python: a NasExperiment "
                             "search); the search goes on where it stopped")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait: stop the experiment and fail after this long")


def run(args: argparse.Namespace) -> int:
    """``nni-effbert search``: 0 on success, 1 if the experiment ended in ERROR or nothing scored."""
    from .config import load_config

    cfg = load_config(args.config, list(args.set or []))
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
        print(f"nni-effbert search: error: experiment {result.experiment_id} has no succeeded candidate",
              file=sys.stderr)
        return 1
    return 0


def run_register(args: argparse.Namespace) -> int:
    """``nni-effbert register-tuner``."""
    from nni_effbert.strategies.registration import meta_file, register_tuner

    try:
        meta = register_tuner()
    except (ImportError, ValueError, OSError) as exc:
        raise SearchError(f"cannot register the tuner ({exc})") from exc
    kind = "advisor" if meta.get("isAdvisor") else "tuner"
    print(f"registered {meta.get('builtinName')} ({kind} {meta.get('className')}) from {meta_file()}")
    print("use it in an nnictl config as: tuner: {name: %s, classArgs: {config: exp.yml}}" % meta.get("builtinName"))
    return 0
