"""The NNI adapters of the progressive search, above the NNI-free core (:mod:`nni_effbert.strategies.core`).

* :mod:`.strategy` -- ``ProgressiveStrategy`` for ``NasExperiment``;
* :mod:`.advisor` -- ``ProgressiveAdvisor``, the registered ``nnictl`` tuner
  ``EfficientBertProgressive`` (waits for warm-ups);
* :mod:`.tuner` -- ``ProgressiveTuner``, the same as a plain NNI ``Tuner``;
* :mod:`.broker` -- ``TrialBroker``: which NNI job ran which parameters;
* :mod:`.factory` -- builds the space, the search and the broker from ``classArgs``;
* :mod:`.registration` -- ``register_tuner()``.

Nothing here is imported by ``import nni_effbert.strategies``.
"""
