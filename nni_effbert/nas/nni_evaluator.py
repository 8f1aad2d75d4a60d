"""The NNI NAS evaluator class of :meth:`KDEvaluator.as_nni_evaluator <nni_effbert.nas.kd_evaluator.KDEvaluator.as_nni_evaluator>`.

Its own module because ``nni.nas.evaluator`` imports pytorch_lightning (about 6 s per process):
nnictl trials never import it, only the ``NasExperiment`` path does.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from nni.nas.evaluator import FunctionalEvaluator

from ..params import RESCORE_OF_KEY, STAGE_KEY, TRAIN_STEPS_KEY

__all__ = ["StageAwareEvaluator", "PROGRESSIVE_SAMPLE_KEY"]

#: A sample carrying this key comes from :class:`~nni_effbert.strategies.ProgressiveStrategy`,
#: whose warm-ups write the running experiment's own supernets.
PROGRESSIVE_SAMPLE_KEY = STAGE_KEY


class StageAwareEvaluator(FunctionalEvaluator):
    """``FunctionalEvaluator`` that passes a sample's ``_stage``, ``_train_steps`` and ``_rescore_of`` on, and
    tells every trial which supernet it inherits from.

    NNI hands a functional evaluator only the instantiated model; the progressive strategy
    puts the stage of each candidate into its sample (``model.sample``), which this class
    reads before instantiating the model.

    The ``supernet`` argument (:func:`~nni_effbert.nas.supernets.supernet_source`) is part of
    the evaluator NNI serialises into each trial. ``auto`` and ``own`` are resolved in
    :meth:`freeze`, in the strategy's process, before NNI submits the trial: for a
    progressive-strategy sample, where the evaluator's in-process warm-ups wrote (the
    experiment's supernets under ``search --python``); for any other strategy's (``auto``), the
    work directory's, whose checkpoint is checked once there, so a missing warm-up stops the
    experiment with one line instead of failing every trial.
    """

    #: Set by :meth:`KDEvaluator.as_nni_evaluator` in the strategy's process (never serialised):
    #: ``resolve_supernet(progressive)`` gives the concrete source a sample's trial reads (and
    #: raises the one-line ``CheckpointError`` when that supernet is missing).
    resolve_supernet: Optional[Callable[[bool], Dict[str, Any]]] = None

    def freeze(self, sample: Dict[str, Any]):
        frozen = super().freeze(sample)
        source = self.arguments.get("supernet")
        if not isinstance(source, Mapping) or source.get("source") not in ("auto", "own"):
            return frozen  # explicit: checked when the KDEvaluator was built
        progressive = isinstance(sample, Mapping) and PROGRESSIVE_SAMPLE_KEY in sample
        if self.resolve_supernet is not None:
            resolved = self.resolve_supernet(progressive)
        else:  # an evaluator NNI deserialised: no KDEvaluator behind it to ask
            resolved = {"source": "own"} if progressive or source.get("source") == "own" else {"source": "workdir"}
        if frozen is self:
            return StageAwareEvaluator(self.function, **{**self.arguments, "supernet": resolved})
        frozen.trace_kwargs["supernet"] = resolved  # a mutated copy (mutable arguments)
        return frozen

    def _execute(self, model: Any) -> Any:
        sample = getattr(model, "sample", None) or {}
        kwargs = dict(self.arguments)
        if sample.get(STAGE_KEY) is not None:
            kwargs["stage"] = int(sample[STAGE_KEY])
        if sample.get(TRAIN_STEPS_KEY) is not None:
            kwargs["train_steps"] = int(sample[TRAIN_STEPS_KEY])
        if sample.get(RESCORE_OF_KEY) is not None:
            kwargs["rescore_of"] = int(sample[RESCORE_OF_KEY])
        return self.function(model.executable_model(), **kwargs)
