"""EfficientBERT's progressive coarse-to-fine search strategy.

Installed as ``nni_effbert.strategies``.

* :mod:`.stages` -- the search as data (``Stage``, ``SamplerConfig``, ``SearchConfig``);
* :mod:`.core` -- ``ProgressiveSearch``, the ask/tell state machine every adapter wraps;
* :mod:`.sampler` -- initial populations and the learned space-partition sampler;
* :mod:`.nni.strategy` -- ``ProgressiveStrategy`` for ``NasExperiment``;
* :mod:`.nni.advisor` -- ``ProgressiveAdvisor``, the registered ``nnictl`` tuner
  ``EfficientBertProgressive`` (waits for warm-ups);
* :mod:`.nni.tuner` -- ``ProgressiveTuner``, the same as a plain NNI ``Tuner``;
* :mod:`.nni.registration` -- ``register_tuner()``.

The NNI adapters (:mod:`.nni`) are imported on first use, so that ``import nni_effbert.strategies`` (done by
the config loader) stays light.
"""
from .core import Done, Failure, Proposal, ProgressiveSearch, TrialRecord, Wait, split_parameters
from .search_errors import BudgetError, SearchConfigError, SearchFailedError, SearchStateError, WarmupFailedError
from .stages import SamplerConfig, SearchConfig, Stage, paper_stages

_LAZY = {
    "ProgressiveStrategy": ".nni.strategy",
    "ProgressiveAdvisor": ".nni.advisor",
    "ProgressiveTuner": ".nni.tuner",
    "register_tuner": ".nni.registration",
}

__all__ = [
    "Stage", "SamplerConfig", "SearchConfig", "paper_stages",
    "ProgressiveSearch", "Proposal", "Wait", "Done", "Failure", "TrialRecord", "split_parameters",
    "SearchConfigError", "BudgetError", "SearchStateError", "SearchFailedError", "WarmupFailedError",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib  # local: the lazy attribute hook itself

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
