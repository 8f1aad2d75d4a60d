"""The ``nnictl`` search driver: write the nnictl config, register the advisor, ``nnictl create``
(or ``resume``) and optionally wait for the experiment to end.

See :mod:`nni_effbert.nas.launcher` for the whole picture.
"""

import logging
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from tqdm.auto import tqdm

from nni_effbert.strategies.nni.registration import not_registered_hint, register_tuner

from ..config import ExperimentConfig, save_experiment_config
from ..errors import EffBertError
from ..io import atomic_write_json, atomic_write_text
from ..workdir import WorkDir
from .experiments import (
    ENDED_STATUSES,
    EXPERIMENTS_DIR,
    NNICTL_DIR,
    NO_MORE_STATUSES,
    SAFE_PATH_ENV,
    SAFE_PATH_FLAG,
    TERMINAL_TRIAL_STATUSES,
    SearchError,
    SearchResult,
    check_resumable,
    free_port,
    prepare_workdir,
    rest_get,
    student_space,
    web_ui_warning,
)
from .. import search_lock
from . import warm_worker
from .records import read_nni_trials

__all__ = ["trial_command", "nnictl_config", "local_training_service", "write_nnictl_config", "run_nnictl"]

logger = logging.getLogger(__name__)

def nnictl_config(cfg: ExperimentConfig, config_file: Path, *, search_space_file: Optional[Path] = None,
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
    conf: Dict[str, Any] = {"experimentName": f"effbert-{cfg.task_label}-{wd.root.name}"}
    if search_space_file is not None:
        conf["searchSpaceFile"] = str(Path(search_space_file).absolute())
    conf.update({
        "trialCommand": trial_command(config_file),
        "trialCodeDirectory": str(Path(code_dir or wd.root / NNICTL_DIR).absolute()),
        "trialConcurrency": int(cfg.search.trial_concurrency),
        "maxTrialNumber": cfg.search.max_trial_jobs(),
        "tuner": {"name": "EfficientBertProgressive", "classArgs": {"config": str(config_file)}},
        "trainingService": local_training_service(cfg.search),
        "experimentWorkingDirectory": str(Path(experiments_dir or wd.root / EXPERIMENTS_DIR).absolute()),
    })
    # Always written: with 0, NNI sets CUDA_VISIBLE_DEVICES=-1, so trials with runtime.device auto
    # run on the CPU instead of all piling onto GPU 0.
    conf["trialGpuNumber"] = int(cfg.search.gpus_per_trial)
    return conf


def trial_command(config_file: Path) -> str:
    """The ``trialCommand`` NNI runs with ``/bin/bash`` in the trial code directory:
    ``python -P -m nni_effbert.trial --config <config>``, every part shell-quoted (a work
    directory may hold spaces, ``;`` or ``$(...)``)."""
    return shlex.join([sys.executable, SAFE_PATH_FLAG, "-m", "nni_effbert.trial",
                       "--config", str(Path(config_file).absolute())])


def local_training_service(search) -> Dict[str, Any]:
    """NNI's local ``trainingService`` (v2 field names) with the GPU scheduling of ``search``:
    ``useActiveGpu``, ``maxTrialNumberPerGpu`` and, when ``search.gpu_indices`` is set, ``gpuIndices``."""
    ts: Dict[str, Any] = {"platform": "local", "useActiveGpu": bool(search.use_active_gpu),
                          "maxTrialNumberPerGpu": int(search.max_trials_per_gpu)}
    if search.gpu_indices:
        ts["gpuIndices"] = [int(i) for i in search.gpu_indices]
    return ts


def write_nnictl_config(cfg: ExperimentConfig, config_file: Path) -> Path:
    """Write ``<workdir>/nnictl/{nnictl.yml,search_space.json}``; returns the YAML's path."""
    wd = WorkDir.of(cfg)
    folder = wd.root / NNICTL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    space_file = folder / "search_space.json"
    atomic_write_json(student_space(cfg).nni_search_space(), space_file)
    conf = nnictl_config(cfg, config_file, search_space_file=space_file)
    path = folder / "nnictl.yml"
    header = ("# Written by `nni-effbert search`; run it again with\n"
              f"#   nnictl create --config {shlex.quote(str(path))} --port 8080\n")
    atomic_write_text(header + yaml.safe_dump(conf, sort_keys=False), path)
    return path


#: ``nnictl`` with more patience: NNI 3.0's launcher gives a new manager 3 s (3 polls of
#: ``check-status``) to answer, then kills it; node needs longer on a busy machine.
_NNICTL = ("import sys\n"
           "import nni.experiment.launcher as launcher\n"
           "_check = launcher._check_rest_server\n"
           "launcher._check_rest_server = lambda port, retry=3, url_prefix=None: _check(port, 60, url_prefix)\n"
           "from nni.tools.nnictl.nnictl import parse_args\n"
           "sys.argv[0] = 'nnictl'\n"
           "parse_args()\n")


def _nnictl(args: Sequence[str], timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _NNICTL, *args]
    logger.debug("running %s", " ".join(cmd))
    try:
        # The manager, its dispatcher and its trials inherit this environment.
        env = dict(kw.pop("env", None) or os.environ, **SAFE_PATH_ENV)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as exc:
        raise SearchError(f"`nnictl {' '.join(args)}` did not return within {timeout:.0f} s") from exc


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text or "")  # nnictl colours its output


def _manager_too_slow(output: str) -> bool:
    """nnictl gave up because the manager's REST server did not answer within its 3 s."""
    return "Create experiment failed" in output and "check-status" in output


def _experiment_id(output: str) -> Optional[str]:
    found = re.search(r'nnictl stop (\w+)"', output) or re.search(r"experiment id:?\s*(\w+)", output, re.I)
    return found.group(1) if found else None


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
        status = rest_get(port, "check-status")
        for err in status.get("errors") or []:
            reasons.append(" ".join(str(err).split()))
    except (urllib.error.URLError, OSError, ValueError):
        pass
    if not reasons:
        reasons = _log_errors(exp_dir)
    dispatcher_log = exp_dir / "log" / "dispatcher.log"
    if dispatcher_log.is_file():
        hint = not_registered_hint(dispatcher_log.read_text(encoding="utf-8", errors="replace"))
        if hint:
            return hint
    return "; ".join(dict.fromkeys(reasons)) or f"see the logs in {exp_dir / 'log'}"


def _wait(port: int, total: int, progress: bool, timeout: Optional[float]) -> str:
    """Poll the REST API until the experiment ended (and all trials with it); returns its status."""

    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=total, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    failures, shown = 0, ""
    try:
        while True:
            try:
                status = str(rest_get(port, "check-status").get("status", "")).upper()
                jobs = rest_get(port, "trial-jobs") or []
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
                if status in ENDED_STATUSES or (status in NO_MORE_STATUSES and not running):
                    return status
            if deadline is not None and time.monotonic() > deadline:
                raise SearchError(f"the experiment did not end within {timeout:.0f} s (status {status or '?'})")
            time.sleep(2.0)  # polling interval of a REST API, not synchronisation
    finally:
        bar.close()


def run_nnictl(cfg: ExperimentConfig, config_path: Optional[str], *, wait: bool, port: Optional[int], progress: bool,
                timeout: Optional[float], resume: Optional[str] = None) -> SearchResult:

    port = free_port() if port is None else int(port)
    # One live search per work directory, checked before anything of the running one is touched
    # (config.yml): refused here (exit 2) if another runs; the advisor takes the lock over from
    # this process once the experiment runs (same port).
    lock = search_lock.acquire(WorkDir.of(cfg).ensure(), kind="starting", experiment=resume, port=port,
                               share=cfg.search.share_workdir)
    warm_env: Dict[str, str] = {}
    try:
        wd, config_file = prepare_workdir(cfg, config_path)
        if resume is not None:
            check_resumable(wd, resume, nas=False)
        conf_path = write_nnictl_config(cfg, config_file)
        try:
            meta = register_tuner()
        except (ImportError, ValueError, OSError) as exc:
            raise SearchError(f"cannot register the EfficientBertProgressive tuner with NNI ({exc})") from exc
        logger.info("tuner %s registered (%s)", meta.get("builtinName"), meta.get("className"))
        if resume is None:
            args = ["create", "--config", str(conf_path), "--port", str(port)]
        else:
            args = ["resume", resume, "--port", str(port)]
        # The NNI manager passes its environment on to every trial: where the warm worker is.
        # The worker gets the trials' environment (PYTHONSAFEPATH included, see _nnictl): a worker
        # whose import-time variables differ from its trials' would refuse them.
        warm_env = warm_worker.for_search(wd.root, "trial", bool(cfg.search.warm_worker),
                                          env=dict(os.environ, **SAFE_PATH_ENV))
        env = dict(os.environ, **warm_env)
        created = _nnictl(args, env=env)
        for _ in range(2):
            if created.returncode == 0 or not _manager_too_slow(_plain(created.stdout + created.stderr)):
                break
            # NNI's launcher gives the manager 3 s to answer and kills it otherwise; on a busy
            # machine node takes longer: try again (on a fresh port, the old one may linger).
            logger.warning("the NNI manager did not start in time (busy machine?); trying again")
            port = free_port()
            search_lock.update(wd, lock, port=port)
            args = [*args[:-1], str(port)]
            created = _nnictl(args, env=env)
    except BaseException:
        search_lock.release(WorkDir.of(cfg), lock)
        warm_worker.stop_for_search(warm_env, "trial")
        raise
    output = _plain(created.stdout + created.stderr)
    exp_id = _experiment_id(output) if resume is None else resume
    if created.returncode != 0 or exp_id is None or "ERROR" in output:
        search_lock.release(wd, lock)
        warm_worker.stop_for_search(warm_env, "trial")
        tail = " | ".join(line.strip() for line in output.splitlines() if line.strip())[-800:]
        raise SearchError(f"`nnictl {' '.join(args)}` failed: {tail}")
    search_lock.update(wd, lock, experiment=exp_id)
    # The experiment's own config: `export/report/fidelity --experiment`, its trials and a later
    # resume read it, whatever another search writes into <workdir>/config.yml afterwards.
    save_experiment_config(cfg, exp_id)
    url = f"http://localhost:{port}"
    exp_dir = wd.root / EXPERIMENTS_DIR / exp_id
    print(f"experiment {exp_id} {'resumed' if resume else 'started'}: web UI {url}", flush=True)
    print(f"  nnictl config {conf_path}; logs {exp_dir / 'log'}", flush=True)
    logger.warning(web_ui_warning(port))
    result = SearchResult(exp_id, url, "RUNNING", wd.root, conf_path, port=port)
    if not wait:
        print(f"  stop it with: nnictl stop {exp_id}", flush=True)
        return result
    try:
        result.status = _wait(port, cfg.search.total_trials(), progress, timeout)
        if result.status == "ERROR":
            result.error = _error_reason(port, exp_dir)

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
            search_lock.release_experiment(wd, exp_id)
        warm_worker.stop_for_search(warm_env, "trial")
    return result


