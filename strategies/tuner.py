"""Old import path of the plain-Tuner adapter, kept for nnictl configs that name
``nni_effbert.strategies.tuner.ProgressiveTuner``; the class lives in
:mod:`nni_effbert.strategies.nni.tuner`."""
from .nni.tuner import ProgressiveTuner  # noqa: F401
