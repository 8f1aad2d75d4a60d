"""The warm worker process (``python -m nni_effbert.nas.warm_server --dir D --kind K``): imports what
a kind of trial needs once, without initialising CUDA, then forks one child per trial on request.

The protocol, the worker's identity and the client side are in :mod:`.warm_worker`, whose module
docstring describes the whole design. Here: :func:`serve` (the lock, the socket, the idle
timeout), the request loop, and the forked child, which rebuilds NNI's trial channel from the
trial's environment (:func:`refresh_nni`), takes the trial's stdio and lifeline, and runs the
trial's command as a fresh interpreter would (``runpy``).
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .warm_worker import (CHILD_ENV, DEFAULT_IDLE_S, IDLE_ENV, KINDS, MAX_MESSAGE, fingerprint, socket_path)

__all__ = ["preload", "serve", "refresh_nni", "main"]

logger = logging.getLogger(__name__)

#: The worker's lock file descriptor (closed in forked children).
_LOCK_FD: List[Optional[int]] = [None]
#: Environment variables the worker's imports set.
_IMPORT_SET_ENV: Dict[str, str] = {}



def preload(kind: str) -> None:
    """Import what the trials of ``kind`` use, without initialising CUDA."""
    from ..runtime import silence_import_warnings  # local: the worker process only, before the heavy imports

    silence_import_warnings()
    for name in KINDS[kind]:
        importlib.import_module(name)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) == theirs.get(key):
            continue
        if key == "environment" and isinstance(mine.get(key), dict) and isinstance(theirs.get(key), dict):
            names = [k for k in sorted(set(mine[key]) | set(theirs[key])) if mine[key].get(k) != theirs[key].get(k)]
            parts.append(f"environment ({', '.join(names)})")
        else:
            parts.append(key)
    return ", ".join(parts)


class _Worker:
    def __init__(self, directory: Path, kind: str, idle_s: float, fingerprint: Dict[str, Any]):
        self.directory, self.kind, self.idle_s = directory, kind, idle_s
        self.selector = selectors.DefaultSelector()
        self.children: Dict[int, Optional[socket.socket]] = {}  # pid -> its supervisor's connection
        self.connections: Dict[socket.socket, Optional[int]] = {}  # connection -> its child's pid
        self.stopping = False
        self.last_active = time.monotonic()
        self.fingerprint = fingerprint
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        self.path = socket_path(directory, kind)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    # -- loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a dead worker's socket; we hold the lock
        self.listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        logger.info("warm worker %d (%s) serving at %s", os.getpid(), self.kind, self.path)
        try:
            while True:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wakeups()
                    else:
                        self._readable(key.fileobj)
                self._reap()
                if self.stopping and self.listener.fileno() >= 0:
                    self._close_listener()
                idle = not self.children and not self.connections
                if idle and (self.stopping or time.monotonic() - self.last_active > self.idle_s):
                    logger.info("warm worker %d exits (%s)", os.getpid(), "asked to" if self.stopping else "idle")
                    return
        finally:
            self._close_listener()

    def _close_listener(self) -> None:
        if self.listener.fileno() < 0:
            return
        try:
            self.selector.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        try:
            if self.path.exists():
                self.path.unlink()
        except OSError:
            pass

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.connections[conn] = None
        self.selector.register(conn, selectors.EVENT_READ, "conn")
        self.last_active = time.monotonic()

    def _drop(self, conn: socket.socket) -> None:
        pid = self.connections.pop(conn, None)
        if pid is not None and pid in self.children:
            self.children[pid] = None
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _send(self, conn: socket.socket, message: Mapping[str, Any]) -> None:
        try:
            conn.send(json.dumps(message).encode())
        except OSError:
            pass

    def _readable(self, conn: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            pid = self.connections.get(conn)
            if pid is not None and pid in self.children:
                # The supervisor is gone (killed): its trial process must not outlive it.
                logger.warning("supervisor of trial process %d gone: killing it", pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for fd in fds:
                os.close(fd)
            self._drop(conn)
            return
        try:
            request = json.loads(data.decode())
        except ValueError:
            request = {}
        op = request.get("op")
        if op == "ping":
            self._send(conn, {"pid": os.getpid(), "kind": self.kind, "fingerprint": self.fingerprint,
                              "children": len(self.children)})
        elif op == "stop":
            self.stopping = True
            self._send(conn, {"stopping": True, "children": len(self.children)})
        elif op == "run" and len(fds) == 4:
            self._run(conn, request, fds)
            return
        else:
            self._send(conn, {"error": f"bad request {op!r}"})
        for fd in fds:
            os.close(fd)

    def _refusal(self, request: Mapping[str, Any]) -> Optional[str]:
        if self.stopping:
            return "the worker is stopping"
        theirs = request.get("fingerprint") or {}
        if theirs != self.fingerprint:
            return (f"worker {os.getpid()} was built for another {_differences(self.fingerprint, theirs)} "
                    "(package files changed since it started, or another interpreter / environment)")
        if _cuda_initialized():
            return f"worker {os.getpid()} has initialised CUDA, which a forked child cannot use"
        if not request.get("argv"):
            return "no command to run"
        return None

    def _run(self, conn: socket.socket, request: Mapping[str, Any], fds: List[int]) -> None:
        reason = self._refusal(request)
        if reason is not None:
            for fd in fds:
                os.close(fd)
            self._send(conn, {"error": reason})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for handler in logger.handlers:
            handler.flush()
        worker_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the trial process
            code = 1
            try:
                code = _child(request, fds, worker_pid, close=[self.selector, self.listener, conn, *self.connections,
                                                                self.wake_r, self.wake_w, _LOCK_FD[0]])
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.connections[conn] = pid
        self.last_active = time.monotonic()
        logger.info("forked trial process %d for %s", pid, request.get("env", {}).get("NNI_TRIAL_JOB_ID", "?"))
        self._send(conn, {"pid": pid, "worker": worker_pid})

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            conn = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            logger.info("trial process %d ended (%d)", pid, code)
            self.last_active = time.monotonic()
            if conn is not None:
                self._send(conn, {"exit": code})
                self._drop(conn)


def _die_with(worker_pid: int) -> None:
    try:
        import ctypes  # local: Linux prctl, forked child only

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != worker_pid:
        os._exit(1)


def _watch_lifeline(fd: int) -> None:
    """Block until the supervisor's end of the lifeline closes (it died), then die."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGKILL)


def refresh_nni() -> None:
    """Make an already imported ``nni`` read this process's environment again: its
    ``env_vars`` (and every ``nni`` module that copied them), ``nni.trial``'s ids and parameters,
    the default trial command channel and NNI's trial logging, as ``import nni`` in a fresh
    trial process would have set them."""
    import nni.runtime.env_vars as env_vars  # local: forked child only, nni already imported by the worker
    import nni.runtime.log as nni_log  # local: idem
    import nni.runtime.trial_command_channel as channel  # local: idem
    import nni.trial as nni_trial  # local: idem

    env_vars.trial_env_vars = env_vars._load_env_vars(env_vars._trial_env_var_names)
    env_vars.dispatcher_env_vars = env_vars._load_env_vars(env_vars._dispatcher_env_var_names)
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "nni" or name.startswith("nni.")) or module is env_vars:
            continue
        if "trial_env_vars" in vars(module):
            module.trial_env_vars = env_vars.trial_env_vars
        if "dispatcher_env_vars" in vars(module):
            module.dispatcher_env_vars = env_vars.dispatcher_env_vars
    trial = env_vars.trial_env_vars
    nni_trial._params = None
    nni_trial._experiment_id = trial.NNI_EXP_ID or "STANDALONE"
    nni_trial._trial_id = trial.NNI_TRIAL_JOB_ID or "STANDALONE"
    nni_trial._sequence_id = int(trial.NNI_TRIAL_SEQ_ID) if trial.NNI_TRIAL_SEQ_ID is not None else 0
    nni_trial._intermediate_seq = 0
    channel._channel = None
    root = logging.getLogger()
    for handler in nni_log.handlers.values():
        root.removeHandler(handler)
    nni_log.handlers.clear()
    for handler in nni_log._handlers.values():
        nni_log._root_logger.removeHandler(handler)
    nni_log._handlers.clear()
    nni_log._init_logger()


def _child(request: Mapping[str, Any], fds: Sequence[int], worker_pid: int, close: Sequence[Any]) -> int:
    """Become the trial process of ``request``; returns its exit status (never returns into the
    worker's loop: the caller ``os._exit``\\ s)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for item in close:
        try:
            item.close() if hasattr(item, "close") else os.close(item)
        except (OSError, TypeError):
            pass
    _die_with(worker_pid)
    stdin, stdout, stderr, lifeline = fds
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
    for fd in {stdin, stdout, stderr} - {0, 1, 2}:
        os.close(fd)
    import threading  # local: forked child only

    threading.Thread(target=_watch_lifeline, args=(lifeline,), name="lifeline", daemon=True).start()
    for handler in list(logger.handlers):  # the worker's log file is not the trial's
        logger.removeHandler(handler)
    logger.propagate = True
    os.environ.clear()
    os.environ.update({**_IMPORT_SET_ENV, **request["env"], CHILD_ENV: str(worker_pid)})
    os.chdir(request["cwd"])
    os.write(2, f"warm worker {worker_pid}: trial process {os.getpid()} forked (parent {os.getppid()})\n".encode())
    refresh_nni()
    return _run_command(request["argv"], safe_path=bool(request.get("safe_path")))


def _first_path_entry(entry: str, safe_path: bool) -> None:
    """Replace the worker's own script entry of ``sys.path`` (the interpreter's first one) as a
    fresh ``python`` would set it, or drop it under ``-P``."""
    if safe_path:
        del sys.path[0]
    else:
        sys.path[0] = entry


def _run_command(argv: Sequence[str], safe_path: bool = False) -> int:
    """``python *argv`` (``-m module ...``, ``-c code ...`` or ``script ...``) in this process;
    its exit status, as the interpreter would set it."""
    import atexit  # local: forked child only
    import builtins  # local: forked child only
    import runpy  # local: forked child only
    import traceback  # local: forked child only

    code = 0
    try:
        # sys.argv and sys.path[0] as the interpreter sets them for each form; with -P (safe
        # path) no entry is prepended, so the worker's own first entry (its start directory) goes.
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            _first_path_entry(os.getcwd(), safe_path)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            _first_path_entry("", safe_path)
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102 - the trial's own -c command
        else:
            sys.argv = list(argv)
            _first_path_entry(os.path.dirname(os.path.abspath(argv[0])), safe_path)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # die of it, as the interpreter does
        code = 130
    except BaseException:  # noqa: BLE001 - an uncaught exception: print it and exit 1, as python does
        traceback.print_exc()
        code = 1
    try:
        import threading  # local: forked child only

        threading._shutdown()  # join non-daemon threads, as the interpreter does at exit
    except Exception:  # noqa: BLE001 - exiting either way
        pass
    try:
        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001 - exiting either way
        pass
    _flush()
    return code & 0xFF


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def serve(directory: Path, kind: str, idle_s: Optional[float] = None) -> int:
    """Run a worker for ``directory`` / ``kind`` until stopped or idle; 0, or 0 at once when
    another worker holds the directory's lock."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / f"{kind}.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another worker serves (or starts for) this directory
    _LOCK_FD[0] = lock.fileno()
    handler = logging.FileHandler(directory / f"{kind}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s warm worker: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if idle_s is None:
        idle_s = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_S)
    started = time.monotonic()
    built_for = fingerprint()  # before the imports, some of which set variables (the trials' are unset)
    before = dict(os.environ)
    preload(kind)
    # Set by the imports (e.g. KMP_INIT_AT_FORK): a fresh trial process has them after its own.
    _IMPORT_SET_ENV.update({k: v for k, v in os.environ.items() if before.get(k) != v})
    if _cuda_initialized():
        logger.error("importing the trial's modules initialised CUDA; a forked child could not use it")
        return 1
    (directory / f"{kind}.pid").write_text(f"{os.getpid()}\n")
    logger.info("imports done in %.1f s", time.monotonic() - started)
    try:
        _Worker(directory, kind, idle_s, built_for).serve()
    finally:
        try:
            (directory / f"{kind}.pid").unlink()
        except OSError:
            pass
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``python -m nni_effbert.nas.warm_server --dir D --kind K``."""
    parser = argparse.ArgumentParser(prog="python -m nni_effbert.nas.warm_server",
                                     description="Serve trial processes forked after the imports are done.")
    parser.add_argument("--dir", required=True, help="the worker's directory (socket, lock, log)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="trial")
    parser.add_argument("--idle", type=float, metavar="SECONDS", help=f"exit after this long without a trial "
                        f"(default ${IDLE_ENV} or {DEFAULT_IDLE_S:.0f})")
    args = parser.parse_args(argv)
    return serve(Path(args.dir), args.kind, args.idle)


if __name__ == "__main__":
    sys.exit(main())
