"""The warm trial worker: trial processes forked from a process whose imports are done.

A fresh trial process spends seconds importing torch, nni, transformers and datasets before
it does any work. The warm worker is a long-lived process (one per work directory and kind of
trial) that has made those imports once, **without initialising CUDA**, and forks one child
per trial on request. The trial's supervisor (:mod:`.supervisor`) asks for the child over a
Unix socket (``SOCK_SEQPACKET``) and passes

* the trial's command (``-m module ...``, ``-c code ...`` or ``script ...``: what follows the
  interpreter on its command line), the working directory and the trial's full environment
  (NNI's per-trial variables included: the child rebuilds NNI's trial channel, ``nni.trial``'s
  ids and NNI's trial logging from it, see :func:`refresh_nni`);
* its own stdin, stdout and stderr (``SCM_RIGHTS``), so the child writes to the trial's NNI log
  files as a fresh process would;
* the read end of a *lifeline* pipe whose write end only the supervisor holds: when the
  supervisor dies, SIGKILL included, the child reads end-of-file and kills itself. (The
  child's parent is the worker, so ``PR_SET_PDEATHSIG`` alone would not notice; it is set too,
  so a child also dies with its worker.)

The worker answers with the child's pid (to which the supervisor forwards SIGTERM / SIGINT),
and, when the child ends, with its exit status (``-N`` for a death by signal N), which the
supervisor turns into the trial's exit status exactly as for a fresh child.

Files, in the worker's directory (``$NNI_EFFBERT_WARM_WORKER``; by default
``<experiment dir>/warm-worker``): ``<kind>.sock`` (or a short path under ``$XDG_RUNTIME_DIR``
or the temp folder, keyed by a hash, when the path would exceed ``AF_UNIX``'s 108 bytes),
``<kind>.lock`` (held by the live worker: at most one per directory and kind), ``<kind>.pid``
and ``<kind>.log``.

A worker is used only when it was built for the same interpreter, package files (sources and
the installed torch / nni / transformers / datasets) and environment as the trial
(:func:`fingerprint`); otherwise, and when none answers, the trial runs in a fresh child as
before, with one line on stderr saying why. It exits when asked (``nni-effbert search`` stops
it with the experiment) or after ``$NNI_EFFBERT_WARM_IDLE_S`` seconds (default 300) without a
trial.

This module is the client side (what the supervisor, the searches and the benches use: finding,
starting, asking and stopping a worker) and the worker's identity (:func:`fingerprint`, the socket
path); the worker process itself is :mod:`.warm_server` (``python -m nni_effbert.nas.warm_server
--dir D --kind K``), which makes the heavy imports in ``preload``. Both import only the standard
library at the top: the supervisor uses this module before any heavy import.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = [
    "ENV", "CHILD_ENV", "IDLE_ENV", "KINDS", "DISABLED", "WorkerUnavailable", "WarmChild", "fingerprint",
    "worker_dir", "socket_path", "worker_env", "ping", "request_child", "spawn", "start", "stop", "for_search",
    "stop_for_search",
]

logger = logging.getLogger(__name__)

#: The worker's directory, or ``off`` to run every trial in a fresh process.
ENV = "NNI_EFFBERT_WARM_WORKER"
#: Set (to the worker's pid) in the environment of a forked trial process.
CHILD_ENV = "NNI_EFFBERT_WARM_CHILD"
#: Seconds a worker without trials waits before it exits.
IDLE_ENV = "NNI_EFFBERT_WARM_IDLE_S"
DEFAULT_IDLE_S = 300.0
#: Values of :data:`ENV` that turn the worker off.
DISABLED = ("off", "0", "false", "no")

#: Kind of trial -> the modules the worker imports before it forks. ``trial``: what nnictl runs
#: (``python -m nni_effbert.trial``); ``nas``: the ``--python`` search's trials
#: (``python -m nni.nas.execution.training_service trial``, which unpickles a model of our space
#: and runs our evaluator). The module a child runs itself is executed fresh (``runpy``), as
#: ``python -m`` would.
#: Interpreter options of a trial command a forked child honours: ``-P`` (Python 3.11+, no unsafe
#: path on ``sys.path``, what the trial command uses so the code directory cannot shadow packages).
SAFE_PATH_OPTIONS = ("-P",)

KINDS: Dict[str, Tuple[str, ...]] = {
    "trial": ("nni", "nni.trial", "nni.runtime.trial_command_channel.v3", "nni_effbert.nas.trial_runner"),
    "nas": ("nni", "nni.trial", "nni.runtime.trial_command_channel.v3", "nni.nas.execution", "nni.nas.space",
            "nni_effbert.nas.kd_evaluator", "nni_effbert.nas.nni_evaluator"),
}

#: ``AF_UNIX`` paths are limited to 108 bytes (NUL included) on Linux.
_MAX_SOCKET_PATH = 100
#: Environment variables read when the worker's modules are imported (interpreter, loader,
#: Hugging Face caches and switches, torch and its thread pools): a trial whose values differ
#: gets a fresh process. Every other variable just reaches the child, as in a fresh process.
#: ``CUDA_VISIBLE_DEVICES`` is not one of them: CUDA starts in the child, after it is set.
_IMPORT_ENV_PREFIXES = ("PYTHON", "LD_", "HF_", "HUGGINGFACE", "TRANSFORMERS_", "DATASETS_", "TOKENIZERS_", "TORCH",
                        "PYTORCH_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "XDG_CACHE_HOME",
                        "HOME", "PATH")
_PER_TRIAL_ENV = ("CUDA_VISIBLE_DEVICES",)
#: Largest request (argv + environment) a supervisor sends.
MAX_MESSAGE = 1 << 20
#: Packages whose installed files are part of the fingerprint.
_PACKAGES = ("torch", "nni", "transformers", "datasets")


class WorkerUnavailable(Exception):
    """No usable warm worker; the message says why (the trial then starts a fresh process).
    ``missing`` is True when none answers at all (a new one may be started)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


# ---------------------------------------------------------------------------------------------
# where, and for what
# ---------------------------------------------------------------------------------------------


def _relevant_env(env: Mapping[str, str]) -> Dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_ENV_PREFIXES) and k not in _PER_TRIAL_ENV}


def worker_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment to start a worker with: ``env`` (default ``os.environ``) without NNI's
    per-trial variables (``import nni`` would otherwise set up that trial's logging)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if not k.startswith("NNI_") or k == IDLE_ENV}


def fingerprint(env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """What a worker must share with a trial to run it: interpreter, package files, environment.

    Cheap (file ``stat`` calls, no heavy import), so every trial's supervisor computes it.
    """
    code = hashlib.sha256()
    import importlib.util  # local: stdlib; find_spec locates packages without importing them

    roots = []
    for name in ("nni_effbert", "nni_effbert.search_spaces", "nni_effbert.strategies"):
        spec = importlib.util.find_spec(name)
        roots += list(spec.submodule_search_locations or []) if spec is not None else []
    for root in dict.fromkeys(roots):
        for path in sorted(Path(root).rglob("*.py")):
            st = path.stat()
            code.update(f"{path}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    packages = hashlib.sha256()
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None:
            packages.update(f"{name}:missing\n".encode())
            continue
        for path in (origin, origin.parent / "version.py"):
            if path.exists():
                packages.update(f"{path}:{path.stat().st_mtime_ns}\n".encode())
    # Per variable, hashed (values may be secrets): a mismatch names the variables that differ.
    envs = {k: hashlib.sha256(v.encode()).hexdigest()[:12]
            for k, v in sorted(_relevant_env(os.environ if env is None else env).items())}
    return {"python": f"{sys.executable} {sys.version}", "code": code.hexdigest()[:16],
            "packages": packages.hexdigest()[:16], "environment": envs}


def worker_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """The warm worker's directory for a trial with environment ``env`` (default ``os.environ``).

    Raises
    ------
    WorkerUnavailable
        Turned off (``$NNI_EFFBERT_WARM_WORKER=off``), or no directory to find it in.
    """
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in DISABLED:
        raise WorkerUnavailable(f"turned off ({ENV}={value})")
    if value:
        return Path(value).absolute()
    # No lazy start from NNI's trial folder: a trial of a plain nnictl config runs fresh. A forked
    # child inherits the worker's address space, so a trial's RLIMIT_AS (evaluator.memory_limit_mb)
    # could hang it; `nni-effbert search` starts the worker and sets the variable.
    raise WorkerUnavailable(f"not started for this experiment ({ENV} is not set; `nni-effbert search` sets it)")


def socket_path(directory: Path, kind: str) -> Path:
    """The worker's socket: ``<directory>/<kind>.sock``, or, when that path is too long for
    ``AF_UNIX``, a short one under ``$XDG_RUNTIME_DIR`` (or the temp folder) keyed by a hash."""
    directory = Path(directory).absolute()
    path = directory / f"{kind}.sock"
    if len(os.fsencode(str(path))) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(str(directory))).hexdigest()[:20]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"nni-effbert-{digest}-{kind}.sock"


# ---------------------------------------------------------------------------------------------
# client side (the supervisor)
# ---------------------------------------------------------------------------------------------


def _connect(directory: Path, kind: str, timeout: float = 5.0) -> socket.socket:
    path = socket_path(directory, kind)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise WorkerUnavailable(f"none at {path}", missing=True) from None
    except (ConnectionRefusedError, OSError) as exc:
        sock.close()
        raise WorkerUnavailable(f"none answers at {path} ({exc.strerror or exc})", missing=True) from None
    return sock


def _receive(sock: socket.socket) -> Optional[Dict[str, Any]]:
    data = sock.recv(MAX_MESSAGE)
    return json.loads(data.decode()) if data else None


def ping(directory: Path, kind: str, timeout: float = 5.0) -> Dict[str, Any]:
    """The worker's answer to a ping: ``{"pid": ..., "fingerprint": {...}, "children": n}``.

    Raises
    ------
    WorkerUnavailable
        None answers.
    """
    sock = _connect(directory, kind, timeout)
    try:
        sock.send(json.dumps({"op": "ping"}).encode())
        reply = _receive(sock)
    except OSError as exc:
        raise WorkerUnavailable(f"the worker did not answer ({exc})") from None
    finally:
        sock.close()
    if not reply:
        raise WorkerUnavailable("the worker closed the connection")
    return reply


class WarmChild:
    """A trial process forked by the warm worker, as the supervisor sees it: its pid, a way to
    signal it, and :meth:`wait` for its exit status (``-N``: killed by signal N)."""

    def __init__(self, sock: socket.socket, pid: int, worker_pid: int, lifeline: int):
        self.sock, self.pid, self.worker_pid, self._lifeline = sock, pid, worker_pid, lifeline

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child (gone already: nothing)."""
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Block until the child ended; its exit status.

        Raises
        ------
        WorkerUnavailable
            The worker died first (its children die with it).
        """
        self.sock.settimeout(None)
        try:
            reply = _receive(self.sock)
        except OSError:
            reply = None
        finally:
            self.sock.close()
            os.close(self._lifeline)
        if reply is None or "exit" not in reply:
            self.send_signal(signal.SIGKILL)  # it dies with the worker (PR_SET_PDEATHSIG); to be sure
            raise WorkerUnavailable(f"warm worker {self.worker_pid} ended during the trial, and its trial process "
                                    f"{self.pid} with it")
        return int(reply["exit"])


def request_child(directory: Path, kind: str, command: Sequence[str], *,
                  env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> WarmChild:
    """Ask the worker of ``directory`` / ``kind`` to fork a child running ``python *command``
    (``-m module args``, ``-c code args`` or ``script args``) in ``cwd`` with ``env`` and this
    process's stdin, stdout and stderr.

    Raises
    ------
    WorkerUnavailable
        No worker answers, or it was built for another interpreter, package or environment, or
        ``command`` has interpreter options a forked child cannot take.
    """
    command = list(command)
    safe_path = bool(command) and command[0] in SAFE_PATH_OPTIONS  # python -P: no cwd on sys.path
    if safe_path:
        command = command[1:]
    if not command or (command[0].startswith("-") and command[0] not in ("-m", "-c")) \
            or (command[0] in ("-m", "-c") and len(command) < 2):
        raise WorkerUnavailable(f"the trial command has interpreter options ({' '.join(command[:2])})")
    env = dict(os.environ if env is None else env)
    sock = _connect(directory, kind)
    read_end, write_end = os.pipe()  # the lifeline: only this process holds the write end
    os.set_inheritable(write_end, False)
    try:
        fds = [_valid_fd(0), 1, 2, read_end]
        request = {"op": "run", "argv": command, "safe_path": safe_path, "cwd": cwd or os.getcwd(), "env": env,
                   "fingerprint": fingerprint(env)}
        socket.send_fds(sock, [json.dumps(request).encode()], fds)
        os.close(read_end)
        if fds[0] != 0:
            os.close(fds[0])
        # Should the answer not come (a stalled worker), closing the socket and the lifeline below
        # makes the worker and the child itself kill a child already forked: never two runs.
        sock.settimeout(60.0)
        reply = _receive(sock)
    except (OSError, ValueError) as exc:
        sock.close()
        os.close(write_end)
        raise WorkerUnavailable(f"the worker did not take the trial ({exc})") from None
    if not reply or "pid" not in reply:
        sock.close()
        os.close(write_end)
        raise WorkerUnavailable((reply or {}).get("error") or "the worker closed the connection")
    return WarmChild(sock, int(reply["pid"]), int(reply.get("worker", 0)), write_end)


def _valid_fd(fd: int) -> int:
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDONLY)


def _lock_held(directory: Path, kind: str) -> bool:
    """True when a worker (starting or serving) holds the directory's lock for ``kind``."""
    path = Path(directory) / f"{kind}.lock"
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def spawn(directory: Path, kind: str, env: Optional[Mapping[str, str]] = None) -> Optional[subprocess.Popen]:
    """Start a worker for ``directory`` / ``kind`` in the background unless one holds its lock;
    returns the process (None when one is there already). It serves once its imports are done."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if _lock_held(directory, kind):
        return None
    with open(directory / f"{kind}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "nni_effbert.nas.warm_server", "--dir", str(directory),
                                 "--kind", kind], env=worker_env(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, close_fds=True)


def start(directory: Path, kind: str, *, timeout: float = 180.0,
          env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Start a worker (unless one answers) and wait until it serves; returns its ping answer.
    ``env``: the environment its trials will have (default: this process's); the worker serves
    only trials whose import-time variables match it.

    Raises
    ------
    WorkerUnavailable
        It did not come up within ``timeout`` seconds (see ``<directory>/<kind>.log``).
    """
    try:
        return ping(directory, kind)
    except WorkerUnavailable:
        pass
    proc = spawn(directory, kind, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return ping(directory, kind)
        except WorkerUnavailable:
            if proc is not None and proc.poll() is not None:
                if _lock_held(directory, kind):
                    proc = None  # another one started meanwhile: wait for it
                else:
                    raise WorkerUnavailable(f"the worker exited with status {proc.returncode}; see "
                                            f"{Path(directory) / (kind + '.log')}") from None
            time.sleep(0.2)  # polling for the worker's socket while it imports
    raise WorkerUnavailable(f"the worker did not start within {timeout:.0f} s; see "
                            f"{Path(directory) / (kind + '.log')}")


def stop(directory: Path, kind: str) -> bool:
    """Ask the worker to exit once its trials ended; False when none answered."""
    try:
        sock = _connect(directory, kind)
    except WorkerUnavailable:
        return False
    try:
        sock.send(json.dumps({"op": "stop"}).encode())
        _receive(sock)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def for_search(root: Path, kind: str, enabled: bool, *, timeout: float = 300.0,
               env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Start the warm worker of a search's trials (work directory ``root``) and wait until it
    serves; returns the environment variables that point the trials at it (``{ENV: "off"}`` when
    not ``enabled``). ``env``: the environment the trials inherit (default: this process's), e.g.
    with ``PYTHONSAFEPATH`` set. A worker that does not come up is logged; the trials then start
    fresh processes, as without one."""
    if not enabled:
        return {ENV: "off"}
    directory = Path(root).absolute() / "warm-worker"
    try:
        info = start(directory, kind, timeout=timeout, env=env)
        logger.info("warm worker %s serves the %s trials (%s)", info.get("pid"), kind, socket_path(directory, kind))
    except WorkerUnavailable as exc:
        logger.warning("warm worker not started (%s): trials start fresh processes", exc)
    return {ENV: str(directory)}


def stop_for_search(env: Mapping[str, str], kind: str) -> None:
    """Stop the worker :func:`for_search` started (its trials' environment ``env``)."""
    value = env.get(ENV, "")
    if value and value.lower() not in DISABLED and stop(Path(value), kind):
        logger.info("warm worker of %s stopped", value)


