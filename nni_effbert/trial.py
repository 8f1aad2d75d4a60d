"""``python -m nni_effbert.trial``: the command NNI runs for every trial.

The trial entry lives in :mod:`nni_effbert.nas.trial_runner`; this module keeps the documented command
(and the ``trialCommand`` of existing nnictl configs) working. Inside NNI the process first
becomes the trial's supervisor (:mod:`nni_effbert.nas.supervisor`) without importing the
trial's libraries: only the supervised child loads torch, transformers and datasets (or it comes
from the warm worker, :mod:`nni_effbert.nas.warm_worker`, which loaded them already).
"""
import sys
from typing import Optional, Sequence

from .nas.supervisor import needs_supervisor, supervise_trial
from .runtime import silence_import_warnings

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``python -m nni_effbert.trial`` (see :func:`nni_effbert.nas.trial_runner.main`);
    returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if needs_supervisor(args):
        # Run the trial in a supervised child: forked by the warm worker, else this very
        # command line again (a wrapper script included).
        return supervise_trial()
    silence_import_warnings()  # before the library's imports below, which may import nni
    from .nas.trial_runner import main as run_trial  # local: the supervisor process never loads the trial's libraries

    return run_trial(args)


if __name__ == "__main__":
    sys.exit(main())
