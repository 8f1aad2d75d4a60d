"""What both search drivers share: the work-directory layout of a search, its result, resuming
checks, the REST helper and the trial table."""

import json
import logging
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from nni_effbert.search_spaces import EfficientBertSpace

from ..config import ExperimentConfig, each_task
from ..errors import CheckpointError, ConfigError, EffBertError
from ..kd.teacher import read_teacher_marker
from ..kd.student_start import student_preset
from ..workdir import WorkDir, check_experiment_id
from .records import is_scored

__all__ = ["NNICTL_DIR", "EXPERIMENTS_DIR", "TRIALS_FILE", "TERMINAL_TRIAL_STATUSES", "SAFE_PATH_FLAG", "SAFE_PATH_ENV", "SearchError", "SearchResult", "free_port", "web_ui_warning", "student_space", "prepare_workdir", "rest_get", "check_resumable", "format_trials"]

logger = logging.getLogger(__name__)

#: Sub-folder of the work directory holding the nnictl config (also the trials' code directory:
#: NNI uploads it to remote machines, so it holds only small files).
NNICTL_DIR = "nnictl"
#: Sub-folder of the work directory given to NNI as ``experimentWorkingDirectory``.
EXPERIMENTS_DIR = "nni-experiments"
#: Records of a ``--python`` search, in the work directory.
TRIALS_FILE = "trials.json"

#: Python's flag that keeps the working directory (NNI runs a trial in ``trialCodeDirectory``) off
#: ``sys.path``, so that a ``yaml.py`` left there cannot shadow an installed package: ``-P``
#: (Python 3.11+) only does that; older Pythons get ``-I``, which also ignores ``PYTHON*``
#: variables and the user site-packages.
SAFE_PATH_FLAG = "-P" if sys.version_info >= (3, 11) else "-I"
#: The same for every Python the NNI manager starts (its dispatcher runs ``python -m nni`` in the
#: experiment's log folder; trials inherit it too): set in the environment of the manager.
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}


TERMINAL_TRIAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"})
ENDED_STATUSES = ("DONE", "STOPPED", "ERROR")
NO_MORE_STATUSES = ("NO_MORE_TRIAL", "TUNER_NO_MORE_TRIAL")


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

        return self.status != "ERROR" and any(is_scored(t) for t in self.trials)


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def web_ui_warning(port: int) -> str:
    """The one-line warning ``nni-effbert search`` logs when NNI's manager starts.

    NNI 3.0's manager cannot be bound to localhost: its REST server calls ``app.listen(port)``
    with no host (``nni_node/rest_server/index.js``) and its command line has no host option
    (``nni_node/common/globals/arguments.js``, strict). Its web UI and REST API have no
    authentication, so anyone who reaches the port can stop trials or change the experiment.
    """
    return (f"NNI's web UI / REST API on port {port} has no authentication and listens on all interfaces "
            f"(NNI 3.0 cannot bind it to localhost): block port {port} with a firewall and reach it through an "
            f"SSH tunnel, `ssh -L {port}:localhost:{port} HOST`, then http://localhost:{port}")


def student_space(cfg: ExperimentConfig):
    """The student space as the advisor builds it from ``classArgs.config`` (same preset and
    overrides), so the ``searchSpace`` written here matches the advisor's check."""

    try:
        preset, overrides = student_preset(cfg)  # student.preset: teacher reads the teacher's config
        return EfficientBertSpace.preset(preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"student: cannot build the {cfg.student.preset!r} space ({exc})") from None


def prepare_workdir(cfg: ExperimentConfig, config_path: Optional[str]) -> Tuple[WorkDir, Path]:
    """Check the teacher is there and save the resolved config into the work directory."""

    wd = WorkDir.of(cfg).ensure()
    for key, one in each_task(cfg):  # a multi-task config: every task's own teacher
        folder = WorkDir.of(one).teacher_dir
        if read_teacher_marker(folder) is None:
            whose = f" of task {key}" if key else ""
            raise CheckpointError(f"no fine-tuned teacher{whose} in {folder}; run `nni-effbert teacher -c "
                                  f"{config_path or '<config>'}` before the search")
    cfg.save(wd.config_file)
    return wd, wd.config_file


def rest_get(port: int, api: str, timeout: float = 10.0) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/nni/{api}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - localhost only
        return json.loads(resp.read().decode("utf-8"))


def check_resumable(wd: WorkDir, exp_id: str, *, nas: bool) -> Path:
    """The folder of experiment ``exp_id`` in this work directory, if it can be resumed.

    Raises
    ------
    ConfigError
        If the id is malformed, or this work directory holds no such experiment (or, for
        ``nas``, no NasExperiment checkpoint of it).
    """
    check_experiment_id(exp_id, "--resume")
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


def format_trials(trials: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of trials: id, stage, status, metric, params."""
    rows = [("trial", "stage", "status", "metric", "params")]
    for t in trials:
        stage = "-" if t.get("stage") is None else str(t["stage"])
        if t.get("stage_name"):
            stage += f" {t['stage_name']}"
        if t.get("teacher"):
            stage = "teacher"
        elif t.get("warmup"):
            stage += " (warm-up)"
        metric = t.get("metric")
        params = t.get("params")
        rows.append((str(t.get("trial_id")), stage, str(t.get("status")),
                     "-" if metric is None else f"{metric:.4f}", "-" if params is None else f"{int(params):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


