"""Old import path of the advisor, kept for ``registered_algorithms.yml`` entries and nnictl
configs that still name ``nni_effbert.strategies.advisor.ProgressiveAdvisor``; the class lives in
:mod:`nni_effbert.strategies.nni.advisor` (re-run ``nni-effbert register-tuner`` to update)."""
from .nni.advisor import ProgressiveAdvisor, ProgressiveClassArgsValidator  # noqa: F401
