"""The supervisor of an NNI trial process, without the trial's imports.

Inside NNI a trial runs in a child process of a small supervisor (the same command line; see
:mod:`nni_effbert.nas.trial_runner`). The supervisor only starts the child and waits: this module
imports nothing but the standard library, so ``python -m nni_effbert.trial`` decides to
supervise before torch, transformers and datasets are loaded, and a trial pays their import
once (in the child) instead of twice in a row.

:func:`supervise_trial` first asks the work directory's warm worker (:mod:`.warm_worker`) for
the child: a process forked after those imports, so the trial starts in a fraction of a
second. A worker that is missing, dead or built for other package files falls back to a fresh
child (one line on stderr says why); a missing one is started for the trials after this one.
On NNI 3.0's HTTP trial channel the supervisor receives the trial's parameters itself: a
placeholder (``_noop``) ends here, without the worker or any heavy import; other parameters
reach the child through :data:`PARAMETER_ENV`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Sequence, Tuple

from . import warm_worker
from .warm_worker import WorkerUnavailable

__all__ = ["CHILD_ENV", "PARAMETER_ENV", "NOOP_KEY", "EXIT_FAILED", "in_nni", "needs_supervisor", "supervise",
           "supervise_trial", "prefetch_parameters"]

#: The trial ran and failed (diverged, shapes): NNI shows it FAILED.
EXIT_FAILED = 1
#: Set (to the supervisor's pid) in the environment of the supervised trial process.
CHILD_ENV = "NNI_EFFBERT_TRIAL_SUPERVISOR"
#: The trial's NNI parameter record (as NNI's manager sent it), received by the supervisor.
PARAMETER_ENV = "NNI_EFFBERT_TRIAL_PARAMETER"
#: A placeholder trial's key (:data:`nni_effbert.params.NOOP_KEY`; this module imports no
#: package module, a test keeps the two equal).
NOOP_KEY = "_noop"


def in_nni() -> bool:
    """True when this process is a trial started by NNI (its platform variables are set)."""
    platform = os.environ.get("NNI_PLATFORM")
    return bool(os.environ.get("NNI_TRIAL_COMMAND_CHANNEL")) or (bool(platform) and platform != "unittest")


def needs_supervisor(argv: Sequence[str]) -> bool:
    """True when this process, started with trial arguments ``argv``, is an NNI trial that
    should run its work in a supervised child: inside NNI, not the child already, no ``--arch``."""
    if os.environ.get(CHILD_ENV) or not in_nni():
        return False
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--arch")
    known, _ = parser.parse_known_args(list(argv))
    return not known.arch


def _die_with_parent() -> None:
    """In the supervised child: get SIGKILL when the supervisor dies (Linux), so a cancelled
    trial leaves no orphan training; exit at once if it is already gone."""

    try:
        import ctypes  # local: Linux prctl, supervised child only

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphan may finish its trial; NNI ignores its result
    # A child forked by the warm worker has the worker as its parent (and a lifeline to the
    # supervisor, see warm_worker).
    parent = os.environ.get(warm_worker.CHILD_ENV) or os.environ.get(CHILD_ENV)
    if str(os.getppid()) != parent:
        sys.exit(EXIT_FAILED)


def supervise(command: Sequence[str], *, env: Optional[Dict[str, str]] = None,
              child: Optional[warm_worker.WarmChild] = None) -> int:
    """Run ``command`` (this trial's own command line) as a child and return its exit status;
    a child killed by a signal becomes :data:`EXIT_FAILED` with the reason printed to stderr.
    SIGTERM and SIGINT received by the supervisor are passed on to the child, and the supervisor
    then dies of the same signal (a cancelled trial stays cancelled).

    ``env`` is the child's environment (default: this one, with :data:`CHILD_ENV`); ``child``,
    a process the warm worker already forked, is supervised instead of starting ``command``.
    """

    if child is None:
        env = dict(os.environ, **{CHILD_ENV: str(os.getpid())}) if env is None else env
        child = subprocess.Popen(list(command), env=env)
    received = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        rc = child.wait()
    except WorkerUnavailable as exc:
        rc = None
        died = str(exc)
    if received:
        # NNI (or a user) stopped the trial: die of the same signal, so NNI still records a
        # cancelled trial (USER_CANCELED), not a failure.
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    if rc is None:
        print(f"trial failed: {died}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if rc >= 0:
        return rc
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
    print(f"trial failed: trial process killed by {name}{hint}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def prefetch_parameters(env: Optional[Dict[str, str]] = None, timeout: float = 60.0
                        ) -> Optional[Tuple[Optional[str], Optional[Dict[str, Any]]]]:
    """Receive this trial's parameters from NNI's HTTP trial channel, as
    ``nni.get_next_parameter`` would (``NNI_TRIAL_COMMAND_CHANNEL=http://...``, NNI 3.0 local).

    Returns
    -------
    tuple or None
        ``(raw record, parsed record)``; ``(None, None)`` when the channel is closed (NNI has no
        parameters for this trial); None when there is no HTTP channel or it did not take the
        request (the trial process then asks NNI itself).

    Raises
    ------
    OSError
        The request was taken but no answer came: the parameters may be lost.
    """
    env = os.environ if env is None else env
    url = env.get("NNI_TRIAL_COMMAND_CHANNEL") or ""
    if not url.startswith("http://"):
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the manager is local
    ask = urllib.request.Request(url, data=json.dumps({"type": "request_parameter"}).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    try:
        opener.open(ask, timeout=timeout).close()
    except (OSError, ValueError):
        return None
    while True:
        try:
            with opener.open(url, timeout=timeout) as answer:
                command = json.loads(answer.read().decode())
        except urllib.error.HTTPError as exc:
            if exc.code == 408:  # the manager's long poll timed out: ask again
                continue
            if exc.code == 410:
                return None, None
            raise
        except ValueError as exc:
            raise OSError(f"bad answer from NNI's trial channel: {exc}") from exc
        if command.get("type") != "parameter":
            raise OSError(f"unexpected answer from NNI's trial channel: {str(command)[:200]}")
        raw = command.get("parameter")
        try:
            record = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            record = None  # not plain JSON (an NNI-serialised object): the child loads it
        return raw, record if isinstance(record, dict) else {}


def supervise_trial(command: Optional[Sequence[str]] = None, *, kind: str = "trial") -> int:
    """Run this NNI trial in a supervised child and return its exit status (see
    :func:`supervise`). ``command`` is what follows the interpreter on the child's command line
    (default: this process's own, ``sys.orig_argv[1:]``, a wrapper script included). The child
    is forked by the warm worker when one serves, else a fresh interpreter.

    For ``kind="trial"`` the parameters are received here first (:func:`prefetch_parameters`):
    a placeholder ends with status 0 at once. For another kind the fresh fallback is the
    command itself, unsupervised (``exec``), as before the worker.
    """
    command = list(sys.orig_argv[1:] if command is None else command)
    fresh = [sys.executable, *command]
    env = dict(os.environ, **{CHILD_ENV: str(os.getpid())})
    if kind == "trial":
        try:
            got = prefetch_parameters(env)
        except OSError as exc:
            print(f"trial failed: could not receive this trial's parameters from NNI ({exc})", file=sys.stderr,
                  flush=True)
            return EXIT_FAILED
        if got is not None:
            raw, record = got
            if raw is None:
                print("nni-effbert trial: error: NNI sent no parameters to this trial", file=sys.stderr, flush=True)
                return 2
            params = (record or {}).get("parameters")
            if isinstance(params, dict) and NOOP_KEY in params:
                # Started only so that NNI hands out parameters queued before it (strategies.broker).
                print(f"placeholder trial ({params[NOOP_KEY]}): nothing to run", file=sys.stderr, flush=True)
                return 0
            env[PARAMETER_ENV] = raw
    directory = None
    try:
        directory = warm_worker.worker_dir(env)
        child = warm_worker.request_child(directory, kind, command, env=env)
    except WorkerUnavailable as exc:
        note = ""
        if exc.missing and directory is not None:
            try:
                warm_worker.spawn(directory, kind, env)
                note = " (one is starting for the next trials)"
            except OSError as err:
                note = f" (could not start one: {err})"
        print(f"warm worker: {exc}{note}; this trial starts a fresh process", file=sys.stderr, flush=True)
        if kind != "trial":
            os.execve(fresh[0], fresh, env)  # as before: the trial command itself, unsupervised
        return supervise(fresh, env=env)
    print(f"warm worker {child.worker_pid}: trial process {child.pid}", file=sys.stderr, flush=True)
    return supervise(fresh, child=child)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nni_effbert.nas.supervisor -m MODULE ARGS...``: the ``--python`` search's trial
    command (``MODULE`` is NNI's ``nni.nas.execution.training_service``), run by the warm worker
    of kind ``nas`` when one serves, else exactly as before."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "-m":
        print("usage: python -m nni_effbert.nas.supervisor -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    return supervise_trial(argv, kind="nas")


if __name__ == "__main__":
    sys.exit(main())
