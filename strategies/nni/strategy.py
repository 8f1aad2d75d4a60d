"""``NasExperiment`` adapter: the progressive search as an NNI NAS ``Strategy``.

::

    space = EfficientBertSpace.preset("quickstart")
    strategy = ProgressiveStrategy(search=cfg.search, warmup_fn=run_warmup)
    NasExperiment(space, evaluator, strategy).run(port=8080)

Warm-up. In this path the warm-up of each stage runs *inside the strategy's process*, through
the ``warmup_fn`` you inject: ``warmup_fn(parameters)`` receives the same JSON parameters an
``nnictl`` warm-up trial gets (``{"_warmup_stage": i, "_stage_name": ..., "_warmup_steps": ...,
<fixed labels>}``) and must return once the stage's supernet checkpoint is written, or raise.
It is called while no candidate runs, so candidates always start from the warmed-up supernet.
A raised exception stops the search with :class:`~nni_effbert.strategies.search_errors.WarmupFailedError`. Without a
``warmup_fn`` the warm-ups are skipped with a logged warning (fine for a synthetic evaluator or
a supernet warmed up beforehand with ``nni-effbert warmup``).

Stage and training budget reach the evaluator through the sample. Each candidate is submitted
as ``model_space.freeze(sample)`` where ``sample`` holds the arch labels plus ``_stage`` and,
when the stage sets it, ``_train_steps`` -- exactly the parameters of an ``nnictl`` trial. NNI
keeps it as ``model.sample`` (an evaluator overriding ``_execute(model)`` reads it there, in
the strategy's process and in trial processes alike); the space's mutables ignore the extra
keys. :func:`~nni_effbert.strategies.core.split_parameters` separates arch and search keys.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
from nni.nas.execution import ExecutionEngine
from nni.nas.execution.event import ModelEvent, ModelEventType
from nni.nas.space import ExecutableModelSpace, ModelStatus
from nni.nas.strategy.base import Strategy

from ..core import Done, Failure, Proposal, ProgressiveSearch, Wait
from ..search_errors import SearchConfigError, SearchStateError
from ..stages import SearchConfig

__all__ = ["ProgressiveStrategy"]

logger = logging.getLogger(__name__)

_ARCH_API = ("labels", "choices", "expression_labels", "size_labels", "random_arch", "bert_arch",
             "count_params", "fingerprint", "validate_arch", "config")


class ProgressiveStrategy(Strategy):
    """EfficientBERT's progressive coarse-to-fine search for ``NasExperiment``.

    Parameters
    ----------
    search : SearchConfig or dict, optional
        Stages, parameter budget, seed and sampler settings (default: the paper's stages).
    warmup_fn : callable, optional
        ``warmup_fn(parameters: dict) -> None``, run in this process before each stage's
        candidates (see the module docstring). None: warm-ups are skipped with a warning.
    arch_space : object, optional
        The object with the arch API (``count_params``, ``fingerprint``, ...). Default: the
        model space given to NNI (``EfficientBertSpace`` has it).
    seed : int, optional
        Overrides ``search.seed``.
    checkpoint_fn : callable, optional
        ``checkpoint_fn() -> None``, called after every result the search records (a finished
        candidate or warm-up), outside the strategy's lock. ``nni-effbert search --python``
        passes one that saves the experiment's checkpoint, so a search killed outright
        resumes from its last result, not from its start.
    finished_fn : callable, optional
        ``finished_fn(parameters: dict) -> float or None``, asked after :meth:`load_state_dict`
        for each candidate the saved state still has as running: a trial can finish after the
        stopped process saved its last result (between a stop signal and the cancelling of
        running trials). A score recovers that result and the candidate is not run again; None
        proposes it again. ``nni-effbert search --python --resume`` answers from the stopped
        experiment's succeeded NNI trials.
    latency_fn : callable, optional
        ``latency_fn(arch) -> ms``, the latency predictor a latency budget or objective needs
        (:class:`~nni_effbert.latency.table.LatencyTable`).
    teacher_latency_ms : float, optional
        The teacher's latency, for ``speedup`` targets.

    Notes
    -----
    Failed candidates are recorded and never ranked; the search goes on. :meth:`state_dict`
    holds the whole search; after :meth:`load_state_dict` trials that were running are
    proposed again, finished ones never.
    """

    def __init__(self, *, search: Union[SearchConfig, Mapping[str, Any], None] = None,
                 warmup_fn: Optional[Callable[[Dict[str, Any]], None]] = None, arch_space: Any = None,
                 seed: Optional[int] = None, checkpoint_fn: Optional[Callable[[], None]] = None,
                 finished_fn: Optional[Callable[[Dict[str, Any]], Optional[float]]] = None,
                 latency_fn: Optional[Callable[[Mapping[str, Any]], float]] = None,
                 teacher_latency_ms: Optional[float] = None):
        super().__init__()
        if search is None:
            search = SearchConfig()
        elif isinstance(search, Mapping):
            search = SearchConfig.from_dict(dict(search))
        elif not isinstance(search, SearchConfig):
            raise SearchConfigError(f"search must be a SearchConfig or a mapping of its fields, got "
                                    f"{type(search).__name__}")
        if seed is not None:
            search = SearchConfig.from_dict({**search.to_dict(), "seed": seed})
        if warmup_fn is not None and not callable(warmup_fn):
            raise SearchConfigError(f"warmup_fn must be callable (parameters dict -> None), got {warmup_fn!r}")
        if checkpoint_fn is not None and not callable(checkpoint_fn):
            raise SearchConfigError(f"checkpoint_fn must be callable (no arguments), got {checkpoint_fn!r}")
        if finished_fn is not None and not callable(finished_fn):
            raise SearchConfigError(f"finished_fn must be callable (parameters dict -> score or None), got "
                                    f"{finished_fn!r}")
        self.search_config = search
        self.warmup_fn = warmup_fn
        self.checkpoint_fn = checkpoint_fn
        self.finished_fn = finished_fn
        self._arch_space = arch_space
        self.latency_fn = latency_fn
        self.teacher_latency_ms = teacher_latency_ms
        self.search: Optional[ProgressiveSearch] = None
        self._pending_state: Optional[dict] = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._running: Dict[int, tuple] = {}  # id(model) -> (model, trial id)
        self._warned_no_warmup = False

    def extra_repr(self) -> str:
        stages = ", ".join(f"{s.name}:{s.kind}x{s.trials}" for s in self.search_config.stages)
        return f"stages=[{stages}], budget={self.search_config.param_budget}, seed={self.search_config.seed}"

    # -- life cycle -------------------------------------------------------------------------

    def _initialize(self, model_space: ExecutableModelSpace, engine: ExecutionEngine) -> ExecutableModelSpace:
        arch_space = self._arch_space
        if arch_space is None:
            arch_space = getattr(model_space, "model_space", model_space)
        missing = [name for name in _ARCH_API if not hasattr(arch_space, name)]
        if missing:
            raise SearchConfigError(f"{type(arch_space).__name__} lacks the arch API the progressive search needs "
                                    f"({missing}); use EfficientBertSpace or pass arch_space=")
        nni_labels = set(model_space.simplify())
        unknown = sorted(set(arch_space.labels) - nni_labels)
        if unknown:
            raise SearchConfigError(f"labels {unknown[:5]} of the arch space are not mutables of the NNI model space")
        self.search = ProgressiveSearch(arch_space, self.search_config,
                                        np.random.RandomState(self.search_config.seed),
                                        latency_fn=self.latency_fn, teacher_latency_ms=self.teacher_latency_ms)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)

    def _run(self) -> None:
        assert self.search is not None
        while True:
            with self._lock:
                action = self.search.ask()
                while isinstance(action, Wait):
                    if not self._running:
                        raise RuntimeError(f"the search waits ({action.reason}) but no model is running")
                    # Woken by _on_training_end; the timeout only guards against a lost wake-up.
                    self._changed.wait(timeout=5.0)
                    action = self.search.ask()
            if isinstance(action, Done):
                if action.failed:
                    raise action.error()
                logger.info("%s", action.reason)
                break
            assert isinstance(action, Proposal)
            if action.warmup:
                self._warmup(action)
                continue
            if not self.wait_for_resource():
                with self._lock:
                    self.search.requeue_running([action.trial_id])
                logger.info("engine budget exhausted; stopping the progressive search")
                break
            self._submit(action)
        running = [m for m, _ in list(self._running.values())]
        if running:
            self.engine.wait_models(*running)

    def _warmup(self, action: Proposal) -> None:
        if self.warmup_fn is None:
            if not self._warned_no_warmup:
                logger.warning("no warmup_fn given to ProgressiveStrategy: stage warm-ups are skipped, so candidates "
                               "inherit whatever supernet weights exist")
                self._warned_no_warmup = True
            result: Any = None
        else:
            logger.info("stage %d: running its warm-up in-process", action.stage)
            try:
                self.warmup_fn(dict(action.parameters))
                result = None
            except Exception as err:  # the reason is kept, and the search stops on it
                logger.exception("warm-up of stage %d failed", action.stage)
                result = Failure(f"{type(err).__name__}: {err}")
        with self._lock:
            self.search.tell(action.trial_id, result)
        self._checkpoint()

    def _checkpoint(self) -> None:
        if self.checkpoint_fn is not None:
            self.checkpoint_fn()

    def _submit(self, action: Proposal) -> None:
        model = self.model_space.freeze(dict(action.parameters))
        with self._lock:
            self._running[id(model)] = (model, action.trial_id)
        # The sequential engine trains the model inside submit_models and calls back before
        # returning; other engines call back from their own thread.
        self.engine.submit_models(model)

    def _on_training_end(self, event: ModelEvent) -> None:
        model = event.model
        with self._lock:
            entry = self._running.pop(id(model), None)
            if entry is None or entry[0] is not model:
                if entry is not None:
                    self._running[id(model)] = entry
                logger.debug("training end of a model this strategy did not submit: %s", model)
                return
            trial_id = entry[1]
            # The event carries the new status; NNI copies it onto the model after callbacks.
            status = getattr(event, "status", model.status)
            if status == ModelStatus.Trained and model.metric is not None:
                self.search.tell(trial_id, model.metric)
            elif status == ModelStatus.Trained:
                self.search.tell(trial_id, Failure("model trained without reporting a final metric"))
            else:
                self.search.tell(trial_id, Failure(f"model ended with status {status.value}"))
            self._changed.notify_all()
        self._checkpoint()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.search is None:
            raise RuntimeError("ProgressiveStrategy has no state before initialize()")
        with self._lock:
            return {"search": self.search.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (before or after ``initialize``); trials that were running
        are proposed again, unless ``finished_fn`` knows their score."""
        if not isinstance(state_dict, Mapping) or "search" not in state_dict:
            raise SearchStateError("ProgressiveStrategy state must be a dict with a 'search' entry "
                                   "(the output of state_dict())")
        if self.search is None:
            self._pending_state = dict(state_dict)
            return
        self._load(state_dict)

    def _load(self, state_dict: Mapping[str, Any]) -> None:
        with self._lock:
            self.search.load_state_dict(state_dict["search"])
            if self.finished_fn is not None:
                for trial_id in self.search.running():
                    record = self.search.record(trial_id)
                    score = None if record.warmup else self.finished_fn(dict(record.parameters))
                    if score is not None:
                        logger.info("resume: trial %d finished after the stop (score %.6g); not run again",
                                    trial_id, score)
                        self.search.tell(trial_id, score)
            self.search.requeue_running()
