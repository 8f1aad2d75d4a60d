"""The supervisor of an NNI trial process, without the trial's imports.

Inside NNI a trial runs in a child process of a small supervisor (the same command line; see
:mod:`nni_effbert.nas.trial_runner`). The supervisor only starts the child and waits: this module
imports nothing but the standard library, so ``python -m nni_effbert.trial`` decides to
supervise before torch, transformers and datasets are loaded, and a trial pays their import
once (in the child) instead of twice in a row.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Sequence

__all__ = ["CHILD_ENV", "EXIT_FAILED", "in_nni", "needs_supervisor", "supervise"]

#: The trial ran and failed (diverged, shapes): NNI shows it FAILED.
EXIT_FAILED = 1
#: Set (to the supervisor's pid) in the environment of the supervised trial process.
CHILD_ENV = "NNI_EFFBERT_TRIAL_SUPERVISOR"


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
    if str(os.getppid()) != os.environ.get(CHILD_ENV):
        sys.exit(EXIT_FAILED)


def supervise(command: Sequence[str]) -> int:
    """Run ``command`` (this trial's own command line) as a child and return its exit status;
    a child killed by a signal becomes :data:`EXIT_FAILED` with the reason printed to stderr.
    SIGTERM and SIGINT received by the supervisor are passed on to the child, and the supervisor
    then dies of the same signal (a cancelled trial stays cancelled)."""

    child = subprocess.Popen(list(command), env=dict(os.environ, **{CHILD_ENV: str(os.getpid())}))
    received = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    if received:
        # NNI (or a user) stopped the trial: die of the same signal, so NNI still records a
        # cancelled trial (USER_CANCELED), not a failure.
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    if rc >= 0:
        return rc
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
    print(f"trial failed: trial process killed by {name}{hint}", file=sys.stderr, flush=True)
    return EXIT_FAILED
