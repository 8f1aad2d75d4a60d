"""The NNI NAS evaluator class of :meth:`KDEvaluator.as_nni_evaluator <nni_effbert.nas.kd_evaluator.KDEvaluator.as_nni_evaluator>`.

Its own module because ``nni.nas.evaluator`` imports pytorch_lightning (about 6 s per process):
nnictl trials never import it, only the ``NasExperiment`` path does.
"""
from __future__ import annotations

from typing import Any

from nni.nas.evaluator import FunctionalEvaluator

from ..params import STAGE_KEY, TRAIN_STEPS_KEY

__all__ = ["StageAwareEvaluator"]


class StageAwareEvaluator(FunctionalEvaluator):
    """``FunctionalEvaluator`` that passes a sample's ``_stage`` and ``_train_steps`` on.

    NNI hands a functional evaluator only the instantiated model; the progressive strategy
    puts the stage of each candidate into its sample (``model.sample``), which this class
    reads before instantiating the model.
    """

    def _execute(self, model: Any) -> Any:
        sample = getattr(model, "sample", None) or {}
        kwargs = dict(self.arguments)
        if sample.get(STAGE_KEY) is not None:
            kwargs["stage"] = int(sample[STAGE_KEY])
        if sample.get(TRAIN_STEPS_KEY) is not None:
            kwargs["train_steps"] = int(sample[TRAIN_STEPS_KEY])
        return self.function(model.executable_model(), **kwargs)
