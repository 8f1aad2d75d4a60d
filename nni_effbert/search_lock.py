"""One live search per work directory: ``<workdir>/search.lock``.

Two searches in one work directory at once share its teacher cache safely, but they compete
for the machine, and a user who starts a second one by mistake (the same command twice, a few
seconds apart) rarely means to. So a search holds the work directory's lock while it runs and a
second one is refused at start, naming the running experiment and its web UI port
(:class:`SearchRunningError`, a one-line error; exit status 2 from ``nni-effbert search``).
``search.share_workdir: true`` in the config turns this off on purpose.

Who holds it (a JSON record ``{experiment, port, pid, host, kind, started}``):

* ``kind: starting`` -- ``nni-effbert search`` itself, from just before ``nnictl create`` until
  the advisor takes over (so two commands started 3 s apart cannot both pass the check);
* ``kind: advisor`` -- the ``EfficientBertProgressive`` advisor, for as long as the experiment
  runs (also with a plain ``nnictl create`` of a config that uses the advisor: then the
  refusal is the experiment's ERROR, with the same message);
* ``kind: python`` -- the ``nni-effbert search --python`` process.

A lock is *stale*, and taken over with a log line, when its search is gone: the NNI manager at
its port does not answer with its experiment as running, and (for ``starting`` / ``python``)
its process is dead or the start is long past. A lock of the same experiment (``nnictl
resume``) is taken over unless that experiment is running. The record is read and written
under a :class:`filelock.FileLock` (``search.lock.guard``), so two starters never both win.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from filelock import FileLock

from .errors import EffBertError
from .io import atomic_write_json
from .workdir import WorkDir

__all__ = ["SearchRunningError", "SearchHolder", "acquire", "release", "release_experiment", "update", "read_holder", "is_live",
           "STARTING_GRACE_S"]

logger = logging.getLogger(__name__)

#: How long a ``starting`` lock counts as live while no manager answers yet.
STARTING_GRACE_S = 300.0
#: Experiment statuses of a search that still runs (NNI's ``check-status``).
_ACTIVE = ("INITIALIZED", "RUNNING")
_WINDING_DOWN = ("NO_MORE_TRIAL", "TUNER_NO_MORE_TRIAL")


class SearchRunningError(EffBertError):
    """Another search is running on this work directory."""


@dataclass
class SearchHolder:
    """Who holds a work directory's search lock."""

    experiment: Optional[str]
    port: Optional[int]
    pid: int
    host: str
    kind: str
    started: float

    def describe(self) -> str:
        exp = f"experiment {self.experiment}" if self.experiment else "a search that is starting"
        port = f" on port {self.port} (web UI http://localhost:{self.port})" if self.port else ""
        return f"{exp}{port}, pid {self.pid} on {self.host}"


def read_holder(wd: WorkDir) -> Optional[SearchHolder]:
    """The current record, or None (no lock, or an unreadable one, which counts as none)."""
    try:
        data = json.loads(wd.search_lock.read_text(encoding="utf-8"))
        return SearchHolder(experiment=data.get("experiment"), port=data.get("port"), pid=int(data["pid"]),
                            host=str(data.get("host", "")), kind=str(data.get("kind", "")),
                            started=float(data.get("started", 0.0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable search lock %s (%s)", wd.search_lock, exc)
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:  # a zombie (killed, not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _rest(port: int, api: str, timeout: float) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/nni/{api}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - localhost only
        return json.loads(resp.read().decode("utf-8"))


def _manager_state(port: Optional[int], timeout: float = 5.0) -> Tuple[Optional[str], Optional[str], bool]:
    """``(experiment id, status, has unfinished trials)`` from the manager at ``port``;
    ``(None, None, False)`` when nothing answers."""
    if not port:
        return None, None, False
    try:
        profile = _rest(int(port), "experiment", timeout)
        status = str(_rest(int(port), "check-status", timeout).get("status", "")).upper()
        unfinished = False
        if status in _WINDING_DOWN:
            jobs = _rest(int(port), "trial-jobs", timeout) or []
            unfinished = any(str(j.get("status")).upper() in ("WAITING", "RUNNING", "UNKNOWN") for j in jobs)
        return str(profile.get("id")), status, unfinished
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return None, None, False


def is_live(holder: SearchHolder, *, now: Optional[float] = None) -> Tuple[bool, str]:
    """Whether ``holder``'s search still runs, and why (for the message or the takeover's log line)."""
    now = time.time() if now is None else now
    local = holder.host == socket.gethostname()
    alive = local and _pid_alive(holder.pid)
    if local and not alive and holder.kind != "starting":
        return False, f"its process {holder.pid} ({holder.kind}) is gone"
    exp, status, unfinished = _manager_state(holder.port)
    if exp is not None and holder.experiment and exp == holder.experiment:
        if status in _ACTIVE or (status in _WINDING_DOWN and unfinished):
            return True, f"its NNI manager on port {holder.port} reports it {status}"
        return False, f"its NNI manager on port {holder.port} reports it {status} (finished)"
    if exp is not None and holder.kind == "starting" and status in _ACTIVE:
        return True, f"an NNI manager on port {holder.port} runs experiment {exp} for it"
    if holder.kind == "python" and alive:
        return True, f"its process {holder.pid} is alive"
    if holder.kind == "starting" and alive and now - holder.started < STARTING_GRACE_S:
        return True, f"it is starting (process {holder.pid}, {now - holder.started:.0f} s ago)"
    if not local and exp is None:
        # Another machine's search on shared storage: its port is not ours to ask.
        return True, f"it runs on {holder.host}, which this machine cannot check"
    why = f"no NNI manager answers on port {holder.port}" if holder.port else "it has no NNI manager"
    return False, f"{why} and its process {holder.pid} is {'not its search any more' if alive else 'gone'}"


def acquire(wd: WorkDir, *, kind: str, experiment: Optional[str] = None, port: Optional[int] = None,
            pid: Optional[int] = None, share: bool = False) -> Optional[SearchHolder]:
    """Take the work directory's search lock, or refuse.

    Parameters
    ----------
    wd : WorkDir
    kind : {'starting', 'advisor', 'python'}
    experiment, port : optional
        The search's NNI experiment id and REST / web UI port, when known.
    pid : int, optional
        The process that holds it (default this one).
    share : bool
        ``search.share_workdir``: take nothing, refuse nothing.

    Returns
    -------
    SearchHolder or None
        The record written (None with ``share``).

    Raises
    ------
    SearchRunningError
        Another search runs on this work directory (one line: which experiment, its port).
    """
    if share:
        logger.info("search.share_workdir is set: this search shares %s with any other", wd.root)
        return None
    wd.root.mkdir(parents=True, exist_ok=True)
    me = SearchHolder(experiment=experiment, port=int(port) if port else None, pid=int(pid or os.getpid()),
                      host=socket.gethostname(), kind=kind, started=time.time())
    with FileLock(str(wd.search_lock) + ".guard"):
        held = read_holder(wd)
        if held is not None and _ours(held, me):
            logger.info("search lock of %s handed over from %s (pid %d) to %s (pid %d)", wd.root, held.kind,
                        held.pid, kind, me.pid)
            if me.experiment is None:
                me.experiment = held.experiment
        elif held is not None:
            live, why = is_live(held)
            if live:
                raise SearchRunningError(
                    f"another search is running on work directory {wd.root}: {held.describe()} ({why}); "
                    f"wait for it, stop it (nnictl stop {held.experiment or '<id>'}), or use another workdir "
                    "(search.share_workdir: true shares it on purpose)")
            logger.warning("taking over the stale search lock of %s: %s", held.describe(), why)
        atomic_write_json(asdict(me), wd.search_lock)
    return me


def _ours(held: SearchHolder, me: SearchHolder) -> bool:
    """``held`` is this very search at an earlier step (same process, or the ``nni-effbert
    search`` whose manager this advisor runs in: same port), not a rival."""
    if held.pid == me.pid and held.host == me.host:
        return True
    return held.kind == "starting" and me.kind == "advisor" and bool(held.port) and held.port == me.port


def release(wd: WorkDir, holder: Optional[SearchHolder]) -> None:
    """Remove the lock if it is still ``holder``'s (a search that ended); no-op otherwise."""
    if holder is None:
        return
    with FileLock(str(wd.search_lock) + ".guard"):
        held = read_holder(wd)
        if held is not None and held.pid == holder.pid and held.started == holder.started:
            wd.search_lock.unlink(missing_ok=True)


def release_experiment(wd: WorkDir, experiment: str) -> None:
    """Remove the lock if it belongs to ``experiment`` (after ``nnictl stop`` of it)."""
    with FileLock(str(wd.search_lock) + ".guard"):
        held = read_holder(wd)
        if held is not None and held.experiment == experiment:
            wd.search_lock.unlink(missing_ok=True)


def update(wd: WorkDir, holder: Optional[SearchHolder], **changes: Any) -> Optional[SearchHolder]:
    """Record what became known (experiment id) in ``holder``'s lock, if it still holds it."""
    if holder is None:
        return None
    with FileLock(str(wd.search_lock) + ".guard"):
        held = read_holder(wd)
        if held is None or held.pid != holder.pid or held.started != holder.started:
            return None  # taken over (by the advisor): nothing to update
        for key, value in changes.items():
            setattr(holder, key, value)
        atomic_write_json(asdict(holder), wd.search_lock)
    return holder


def lock_info(wd: WorkDir) -> Optional[Dict[str, Any]]:
    """The lock record as a dict (for messages and tests)."""
    held = read_holder(wd)
    return asdict(held) if held else None
