"""``python -m nni_effbert.trial``: the command NNI runs for every trial.

The trial entry lives in :mod:`nni_effbert.nas.trial`; this module keeps the documented command
(and the ``trialCommand`` of existing nnictl configs) working.
"""
import sys

from .runtime import silence_import_warnings

silence_import_warnings()  # before the library's imports below, which import nni

from .nas.trial import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
