"""The progressive search itself, free of any NNI runtime: ``ask`` / ``tell`` / ``state_dict``.

:class:`ProgressiveSearch` walks the stages of a :class:`~.stages.SearchConfig`. For each stage
it first proposes the stage's warm-up trial, answers :class:`Wait` until that trial has
succeeded, then proposes candidates (initial population, then the learned sampler) until the
stage's trial budget is spent, waits for the last of them, hands the best arch over to the
next stage, and finally answers :class:`Done`. The adapters (:mod:`.nni.strategy` for
``NasExperiment``, :mod:`.nni.advisor` and :mod:`.nni.tuner` for ``nnictl``) only translate between
this API and NNI; none of them holds search logic.

Trial parameters (what a trial receives, what the NNI web UI shows) are flat JSON:

* warm-up: ``{"_warmup_stage": i, "_stage_name": ..., "_stage_kind": ...,
  "_general_warmup_steps": ..., <the stage's fixed labels>: <values>}`` plus
  ``"_warmup_steps": n`` when the stage sets ``warmup_steps``;
* candidate: ``{<every arch label>: <value>, "_stage": i}`` plus ``"_train_steps": n`` when the
  stage sets ``train_steps``;
* re-score (only with ``search.noise_rescores``, after a stage's candidates): a candidate's
  parameters plus ``"_rescore_of": <trial id>``; the trial scores that arch again with the next
  evaluator seed. Re-scores measure the stage's tie margin
  (:func:`~.ties.measured_margin`) and are never ranked, counted against ``trials`` or learned from;
* teacher (only with ``teacher_trial=True``, before everything else): ``{"_teacher": true}``.
  It fine-tunes the teacher every other trial distils from; nothing else is proposed until it
  succeeded, its metric is never ranked, and its failure ends the search.

The class is not thread-safe; adapters serialise calls.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

# The wire format (keys, split_parameters) lives in nni_effbert.params; re-exported here.
from ..params import (RESCORE_OF_KEY, STAGE_KEY, TEACHER_KEY, TRAIN_STEPS_KEY, WARMUP_KEY, candidate_parameters,
                      split_parameters,
                      teacher_parameters, warmup_parameters)
from .search_errors import SearchConfigError, SearchFailedError, SearchStateError, WarmupFailedError
from .sampler import (PartitionSampler, bert_seed_archs, check_budget, check_latency_budget, in_budget,
                      latency_in_budget, random_arch_in_budget)
from .stages import SearchConfig, Stage
from .ties import is_one_shot, measured_margin, order_with_ties

__all__ = [
    "Proposal",
    "Wait",
    "Done",
    "Failure",
    "TrialRecord",
    "ProgressiveSearch",
    "WARMUP_KEY",
    "STAGE_KEY",
    "TRAIN_STEPS_KEY",
    "TEACHER_KEY",
    "RESCORE_OF_KEY",
    "split_parameters",
    "NO_METRIC",
    "UNREPORTED",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

#: Failure reason of a candidate that ended SUCCEEDED without a final metric. NNI may deliver a
#: trial's end before its metric when they travel on different threads; a metric that arrives
#: later still counts while the trial's stage is running (see :meth:`ProgressiveSearch.tell`).
NO_METRIC = "trial ended SUCCEEDED without reporting a final metric"
#: Failure reason of a trial whose NNI job ended (failed, killed) before it reported anything.
#: NNI 3.0's local training service may have handed that job another trial's parameters (see
#: :mod:`.nni.broker`), so a metric that arrives later from the job that did run them still counts.
UNREPORTED = "its trial job ended before reporting a result"
#: Failures that a later final metric of the same trial overrides.
REVIVABLE = frozenset({NO_METRIC, UNREPORTED})

Arch = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# What ask() returns and tell() takes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """A trial to run.

    Attributes
    ----------
    trial_id : int
        The core's id of the trial; pass it back to :meth:`ProgressiveSearch.tell`.
    stage : int
        Zero-based stage index.
    warmup : bool
        True for the stage's warm-up trial.
    parameters : dict
        JSON-friendly trial parameters (see the module docstring).
    """

    trial_id: int
    stage: int
    warmup: bool
    parameters: Dict[str, Any]

    @property
    def arch(self) -> Arch:
        """The arch labels of the parameters (the fixed labels for a warm-up)."""
        return split_parameters(self.parameters)[0]


@dataclass(frozen=True)
class Wait:
    """Nothing can be proposed until a running trial reports (``reason`` says which)."""

    reason: str


@dataclass(frozen=True)
class Done:
    """The search has ended; ``failed`` is True when it stopped on an error (``reason``).

    ``cause`` is ``"finished"``, ``"warmup_failed"``, ``"teacher_failed"`` or ``"stage_failed"``
    (no candidate of a stage succeeded).
    """

    reason: str
    failed: bool = False
    cause: str = "finished"

    def error(self) -> Exception:
        """The exception adapters raise for a failed search."""

        cls = WarmupFailedError if self.cause in ("warmup_failed", "teacher_failed") else SearchFailedError
        return cls(self.reason)


@dataclass(frozen=True)
class Failure:
    """A trial ended without a usable result (crash, kill, NaN, no final metric)."""

    reason: str


@dataclass
class TrialRecord:
    """One proposed trial, as kept in the search history (JSON-friendly)."""

    trial_id: int
    stage: int
    warmup: bool
    parameters: Dict[str, Any]
    status: str = "running"  # running | succeeded | failed | lost
    score: Optional[float] = None
    reason: Optional[str] = None
    params_count: Optional[int] = None
    fingerprint: Optional[str] = None
    finish_seq: Optional[int] = None  # completion order, for a reproducible sampler after resume
    metric: Optional[float] = None  # the trial's own score when ``score`` is an objective of score and latency
    latency_ms: Optional[float] = None  # predicted latency (with a latency predictor)
    teacher: bool = False  # the teacher fine-tuning trial (also ``warmup``: never a candidate)
    train_steps: Optional[int] = None  # KD fine-tune steps the trial reported (0: a one-shot score)
    rescore_of: Optional[int] = None  # a re-score of this trial's arch (search.noise_rescores), not a candidate

    @property
    def candidate(self) -> bool:
        """A scored candidate of its stage (not a warm-up, the teacher or a re-score)."""
        return not self.warmup and self.rescore_of is None

    @property
    def arch(self) -> Arch:
        """The arch labels of :attr:`parameters`."""
        return split_parameters(self.parameters)[0]


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


class ProgressiveSearch:
    """EfficientBERT's progressive coarse-to-fine search as an ask/tell state machine.

    Parameters
    ----------
    space : object
        The search space (``EfficientBertSpace`` or anything with its arch API: ``labels``,
        ``choices``, ``expression_labels(i)``, ``size_labels(i)``, ``random_arch``,
        ``bert_arch``, ``count_params``, ``fingerprint``, ``validate_arch`` and
        ``config.num_hidden_layers``).
    config : SearchConfig
        Stages, budget and sampler settings.
    rng : numpy.random.RandomState, optional
        Every random choice of the search; default ``RandomState(config.seed)``.
    latency_fn : callable, optional
        ``latency_fn(arch) -> ms``, the predicted latency (e.g. a
        :class:`~nni_effbert.latency.table.LatencyTable`). Required when the config has a
        latency budget, a speed-up or a latency objective; every proposal then satisfies the
        latency budget, and candidates are ranked by the objective.
    teacher_latency_ms : float, optional
        The teacher's latency with the same settings, for ``speedup`` targets.
    teacher_trial : bool
        Propose a teacher fine-tuning trial (``{"_teacher": true}``) first, and nothing else
        until it succeeded (the work directory has no fine-tuned teacher yet).

    Raises
    ------
    BudgetError
        When no arch can meet ``config.param_budget`` or the latency budget (checked here,
        before any trial).
    SearchConfigError
        A latency budget or objective without ``latency_fn``, or a speed-up without
        ``teacher_latency_ms``.

    Examples
    --------
    >>> search = ProgressiveSearch(space, SearchConfig())          # doctest: +SKIP
    >>> while not isinstance(action := search.ask(), Done):        # doctest: +SKIP
    ...     if isinstance(action, Proposal):
    ...         search.tell(action.trial_id, run_trial(action.parameters))
    """

    def __init__(self, space: Any, config: SearchConfig, rng: Optional[np.random.RandomState] = None, *,
                 latency_fn: Optional[Callable[[Mapping[str, Any]], float]] = None,
                 teacher_latency_ms: Optional[float] = None,
                 teacher_trial: bool = False):
        if not isinstance(config, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
        self.space = space
        self.config = config
        self.rng = rng if rng is not None else np.random.RandomState(config.seed)
        self.param_range = check_budget(space, config.budget, self.rng, config.sampler.max_tries)
        if config.needs_latency and latency_fn is None:
            raise SearchConfigError("search.latency_budget_ms / speedup / objective need a latency predictor "
                                    "(latency_fn=); nni-effbert builds it from the work directory's latency table "
                                    "(`nni-effbert latency -c CONFIG`)")
        self.latency_fn = latency_fn
        self.latency_budget = config.latency_budget(teacher_latency_ms)
        self.objective_target = config.objective.target(teacher_latency_ms)
        self.latency_range = check_latency_budget(space, self.latency_budget, latency_fn, self.rng,
                                                  config.sampler.max_tries, param_budget=config.budget)
        if self.latency_budget is not None:
            logger.info("latency budget [%.3f, %.3f] ms (achievable %.3f..%.3f ms)", *self.latency_budget,
                        *self.latency_range)
        self._records: Dict[int, TrialRecord] = {}
        self._next_id = 0
        self._finish_seq = 0
        self._stage = 0
        self._started = False  # current stage initialised (fixed choices, queue, sampler)
        self._warmup: List[str] = ["pending" if s.warmup else "skipped" for s in config.stages]
        self._fixed: Arch = {}
        self._queue: List[Arch] = []
        self._seen: set = set()  # (stage, fingerprint) of every candidate proposed
        self._incumbents: List[Arch] = []  # best arch of each finished stage
        self._exhausted = False  # the current stage's sub-space has no new arch left
        self._done: Optional[Done] = None
        self._sampler: Optional[PartitionSampler] = None
        self._teacher = "pending" if teacher_trial else "skipped"  # pending | running | done | failed | skipped

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(stage={self._stage}/{len(self.config.stages)}, "
                f"trials={len(self._records)}, done={self._done is not None})")

    # -- read-only views --------------------------------------------------------------------

    @property
    def stage_index(self) -> int:
        """Zero-based index of the current stage (the last one once done)."""
        return self._stage

    @property
    def stage(self) -> Stage:
        """The current :class:`~.stages.Stage`."""
        return self.config.stages[self._stage]

    @property
    def done(self) -> Optional[Done]:
        """How the search ended, or None while it runs."""
        return self._done

    @property
    def records(self) -> List[TrialRecord]:
        """Every trial proposed so far, in proposal order (copies)."""
        return [TrialRecord(**asdict(r)) for r in self._records.values()]

    @property
    def incumbents(self) -> List[Arch]:
        """Best arch of each finished stage."""
        return [dict(a) for a in self._incumbents]

    def record(self, trial_id: int) -> TrialRecord:
        """The record of one trial (a copy)."""
        if trial_id not in self._records:
            raise KeyError(f"unknown trial id {trial_id}")
        return TrialRecord(**asdict(self._records[trial_id]))

    def ranking(self, stage: Optional[int] = None) -> List[TrialRecord]:
        """Successful candidates of ``stage`` (default: the latest stage with results), best
        first: the cheapest of the candidates within ``search.tie_margin`` of the best score
        leads, then the rest by score. Failed, lost and running trials are never ranked."""
        if stage is None:
            stages = [r.stage for r in self._records.values() if not r.warmup and r.status == "succeeded"]
            if not stages:
                return []
            stage = max(stages)
        ok = self._succeeded(stage)
        # Candidates within the stage's tie margin of the best tie; the cheapest of them leads (.ties).
        margin = self.tie_margin(stage)
        ranked = order_with_ties(ok, score=lambda r: r.score,
                                 cost=lambda r: r.latency_ms if r.latency_ms is not None else r.params_count,
                                 margin=margin, tiebreak=lambda r: r.trial_id)
        return [TrialRecord(**asdict(r)) for r in ranked]

    def _succeeded(self, stage: int) -> List[TrialRecord]:
        return [r for r in self._records.values() if r.stage == stage and r.candidate and r.status == "succeeded"]

    def _one_shot(self, stage: int, records: Sequence[TrialRecord]) -> bool:
        """Every candidate was scored without fine-tuning (0 steps): scores without seed noise."""
        planned = self.config.stages[stage].train_steps if stage < len(self.config.stages) else None
        return is_one_shot(r.train_steps if r.train_steps is not None else planned for r in records)

    def rescore_pairs(self, stage: int) -> List[Tuple[float, float]]:
        """``(score, re-score)`` of the stage's candidates scored again (``search.noise_rescores``)."""
        scores = {r.trial_id: r.score for r in self._succeeded(stage)}
        return [(float(scores[r.rescore_of]), float(r.score)) for r in self._records.values()
                if r.stage == stage and r.rescore_of in scores and r.status == "succeeded"]

    def tie_margin(self, stage: int) -> float:
        """The tie margin ranking ``stage`` uses: 0 for a one-shot stage (its scores do not move
        with the evaluator seed); the one the stage's re-scores measured (``search.noise_rescores``:
        :func:`~.ties.measured_margin`, once at least 2 succeeded); else ``search.tie_margin``. The
        same rule as :func:`nni_effbert.nas.ranking.stage_tie_margin`, which export reads."""
        if self._one_shot(stage, self._succeeded(stage)):
            return 0.0
        measured = measured_margin(self.rescore_pairs(stage))
        return float(self.config.tie_margin or 0.0) if measured is None else float(measured)

    def best(self) -> Optional[TrialRecord]:
        """Best candidate of the latest stage that has results, or None."""
        ranked = self.ranking()
        return ranked[0] if ranked else None

    def running(self) -> List[int]:
        """Ids of trials proposed and not yet told."""
        return [r.trial_id for r in self._records.values() if r.status == "running"]

    # -- ask --------------------------------------------------------------------------------

    def ask(self) -> Union[Proposal, Wait, Done]:
        """The next action: a trial to run, a reason to wait for results, or the end."""
        if self._done is None and self._teacher in ("pending", "running"):
            if self._teacher == "pending":
                return self._propose_teacher()
            return Wait("waiting for the teacher fine-tuning trial")
        while self._done is None:
            stage = self.stage
            if not self._started:
                self._start_stage()
            warmup = self._warmup[self._stage]
            if warmup == "pending":
                return self._propose_warmup()
            if warmup == "running":
                return Wait(f"stage {self._stage} ({stage.name}): waiting for its warm-up trial")
            if not self._exhausted and self._issued() < stage.trials:
                arch = self._next_candidate()
                if arch is not None:
                    return self._propose_candidate(arch)
                self._exhausted = True
                logger.warning("stage %d (%s): no new architecture left in its sub-space after %d candidates; "
                               "ending the stage early", self._stage, stage.name, self._issued())
            running = [r for r in self._records.values() if r.status == "running"]
            if running:
                return Wait(f"stage {self._stage} ({stage.name}): waiting for {len(running)} running "
                            f"trial(s) before the hand-off")
            target = self._next_rescore()
            if target is not None:
                return self._propose_rescore(target)
            self._finish_stage()
        return self._done

    def settle(self) -> Optional[Done]:
        """End the search if its last stage has nothing left to propose or wait for, without
        proposing anything: what :meth:`ask` would conclude. For a caller with no slot to fill
        (NNI asks for jobs only while it has submitted fewer than ``maxTrialNumber``, so the last
        results may arrive when nothing will call :meth:`ask` again)."""
        if self._done is not None or self._teacher in ("pending", "running"):
            return self._done
        if (not self._started or self._stage + 1 != len(self.config.stages)
                or self._warmup[self._stage] not in ("done", "skipped")):
            return None
        if not self._exhausted and self._issued() < self.stage.trials:
            return None
        if any(r.status == "running" for r in self._records.values()):
            return None
        if self._next_rescore() is not None:
            return None
        self._finish_stage()
        return self._done

    def _issued(self) -> int:
        return sum(1 for r in self._records.values()
                   if r.stage == self._stage and r.candidate and r.status != "lost")

    def _next_rescore(self) -> Optional[TrialRecord]:
        """The next candidate of the current stage to score again (``search.noise_rescores``): the
        best K by score (strictly), each once; None when there is none left (or none planned)."""
        k = self.config.rescores_of(self.stage)
        ok = self._succeeded(self._stage)
        if not k or len(ok) < 2 or self._one_shot(self._stage, ok):
            return None
        done = {r.rescore_of for r in self._records.values()
                if r.stage == self._stage and r.rescore_of is not None and r.status != "lost"}
        leaders = sorted(ok, key=lambda r: (-r.score, r.trial_id))[:k]
        return next((r for r in leaders if r.trial_id not in done), None)

    def _new_record(self, warmup: bool, parameters: Dict[str, Any], arch: Optional[Arch] = None) -> TrialRecord:
        record = TrialRecord(trial_id=self._next_id, stage=self._stage, warmup=warmup, parameters=parameters)
        if arch is not None:
            record.params_count = int(self.space.count_params(arch))
            record.fingerprint = str(self.space.fingerprint(arch))
            if self.latency_fn is not None:
                record.latency_ms = round(float(self.latency_fn(arch)), 4)
        self._records[record.trial_id] = record
        self._next_id += 1
        return record

    def _propose_teacher(self) -> Proposal:
        params = teacher_parameters()
        record = self._new_record(True, params)
        record.teacher = True
        self._teacher = "running"
        logger.info("teacher fine-tuning proposed as trial %d (no fine-tuned teacher yet)", record.trial_id)
        return Proposal(record.trial_id, self._stage, True, dict(params))

    def _propose_warmup(self) -> Proposal:
        stage = self.stage
        params = warmup_parameters(self._stage, stage.name, stage.kind, stage.general_warmup_steps,
                                   stage.warmup_steps, self._fixed)
        record = self._new_record(True, params)
        self._warmup[self._stage] = "running"
        logger.info("stage %d (%s): warm-up trial %d proposed", self._stage, stage.name, record.trial_id)
        return Proposal(record.trial_id, self._stage, True, dict(params))

    def _propose_rescore(self, target: TrialRecord) -> Proposal:
        stage = self.stage
        params = candidate_parameters(target.arch, self._stage, stage.train_steps, rescore_of=target.trial_id)
        record = self._new_record(False, params, target.arch)
        record.rescore_of = target.trial_id
        logger.info("stage %d (%s): trial %d (score %.6g) re-scored with the next evaluator seed as trial %d, "
                    "to measure the stage's tie margin", self._stage, stage.name, target.trial_id, target.score,
                    record.trial_id)
        return Proposal(record.trial_id, self._stage, False, dict(params))

    def _propose_candidate(self, arch: Arch) -> Proposal:
        stage = self.stage
        arch = self.space.validate_arch(arch)
        params = candidate_parameters(arch, self._stage, stage.train_steps)
        record = self._new_record(False, params, arch)
        self._seen.add((self._stage, record.fingerprint))
        logger.info("stage %d (%s): candidate %d/%d proposed as trial %d (%d params)", self._stage, stage.name,
                    self._issued(), stage.trials, record.trial_id, record.params_count)
        return Proposal(record.trial_id, self._stage, False, dict(params))

    # -- stage life cycle -------------------------------------------------------------------

    def _searched_labels(self, kind: str) -> List[str]:
        n = self.space.config.num_hidden_layers
        sizes = [l for i in range(n) for l in self.space.size_labels(i)]
        if kind == "joint":
            return list(self.space.labels)
        if kind == "expression":
            return [l for l in self.space.labels if l not in set(sizes)]
        return [l for l in self.space.labels if l in set(sizes)]

    def _start_stage(self) -> None:
        """Fix the labels the stage does not search, and build its initial population."""
        stage = self.stage
        searched = self._searched_labels(stage.kind)
        if stage.kind == "joint":
            self._fixed = {}
        else:
            best = self._incumbents[-1]
            self._fixed = {l: best[l] for l in self.space.labels if l not in set(searched)}
        self._sampler = PartitionSampler(searched, self.space.choices, self.config.sampler,
                                         seed=self.config.seed * 1009 + self._stage)
        self._queue = self._initial_population(stage, searched)
        self._exhausted = False
        self._started = True
        logger.info("stage %d (%s, %s): %d candidates, %d fixed labels, %d seeds queued", self._stage, stage.name,
                    stage.kind, stage.trials, len(self._fixed), len(self._queue))

    def _initial_population(self, stage: Stage, searched: Sequence[str]) -> List[Arch]:
        seeds: List[Arch] = []
        if self._stage == 0:
            seeds = bert_seed_archs(self.space, self.config.budget, self.config.sampler.bert_seeds, fits=self._fits)
        elif stage.handoff_top_k > 0:
            prev = self.ranking(self._stage - 1)[:stage.handoff_top_k]
            for r in prev:
                arch = dict(r.arch)
                arch.update(self._fixed)  # project onto this stage's fixed choices
                seeds.append(arch)
        queue, keys = [], set()
        for arch in seeds:
            key = self.space.fingerprint(arch)
            if key not in keys and self._fits(arch):
                keys.add(key)
                queue.append(arch)
        return queue[:stage.initial_population] if stage.initial_population else []

    def _fits(self, arch: Arch) -> bool:
        """Inside the parameter budget and the latency budget."""
        return (in_budget(self.space, arch, self.config.budget)
                and latency_in_budget(self.latency_fn, arch, self.latency_budget))

    def _accept(self, arch: Arch) -> bool:
        if (self._stage, self.space.fingerprint(arch)) in self._seen:
            return False
        return self._fits(arch)

    def _results(self) -> Tuple[List[Arch], List[float]]:
        done = self._succeeded(self._stage)
        done.sort(key=lambda r: r.finish_seq)
        return [r.arch for r in done], [float(r.score) for r in done]

    def _next_candidate(self) -> Optional[Arch]:
        stage = self.stage
        tries = self.config.sampler.max_tries
        while self._queue:
            arch = self._queue.pop(0)
            if self._accept(arch):
                return arch
        if self._issued() < stage.initial_population:
            return random_arch_in_budget(self.space, self.rng, self._fixed, self._accept, tries)
        archs, scores = self._results()
        arch = self._sampler.propose(archs, scores, self.rng, self._accept) if archs else None
        if arch is None:
            # Nothing learned yet (results still running) or mutation found nothing new.
            arch = random_arch_in_budget(self.space, self.rng, self._fixed, self._accept, tries)
        return arch

    def _finish_stage(self) -> None:
        stage = self.stage
        ranked = self.ranking(self._stage)
        if not ranked:
            failed = [r for r in self._records.values() if r.stage == self._stage and not r.warmup]
            self._done = Done(f"stage {self._stage} ({stage.name}) ended with no successful candidate "
                              f"({len(failed)} failed); see the failed trials' logs", failed=True,
                              cause="stage_failed")
            logger.error("search stopped: %s", self._done.reason)
            return
        best = ranked[0]
        self._incumbents.append(best.arch)
        logger.info("stage %d (%s) done: best trial %d, score %.6g, %d params (tie margin %.4g%s)", self._stage,
                    stage.name, best.trial_id, best.score, best.params_count, self.tie_margin(self._stage),
                    ", measured" if len(self.rescore_pairs(self._stage)) >= 2 else "")
        if self._stage + 1 == len(self.config.stages):
            self._done = Done(f"search finished: best arch of the last stage is trial {best.trial_id} "
                              f"(score {best.score:.6g})")
            logger.info("%s", self._done.reason)
            return
        self._stage += 1
        self._started = False

    # -- tell -------------------------------------------------------------------------------

    def tell(self, trial_id: int, result: Union[float, int, Mapping[str, Any], Failure, None]) -> None:
        """Report how a trial ended.

        Parameters
        ----------
        trial_id : int
            From the :class:`Proposal`.
        result : float, dict, Failure or None
            The trial's final metric (higher is better; a dict is read at ``"default"``), or a
            :class:`Failure`. A warm-up may report ``None`` (success without a metric). A
            non-finite metric counts as a failure.

        Notes
        -----
        Reports for unknown or already finished trials are logged and ignored (NNI may repeat
        events). A failed candidate is recorded and never ranked; a failed warm-up ends the
        search (:attr:`done` says why).
        """
        record = self._records.get(trial_id)
        if record is None:
            logger.warning("result for unknown trial %s ignored", trial_id)
            return
        late = (record.status == "failed" and record.reason in REVIVABLE and self._done is None
                and record.stage == self._stage and not isinstance(result, Failure) and result is not None)
        if late:
            logger.warning("trial %d: final metric arrived after its end event; counted after all", trial_id)
            record.status, record.reason = "running", None
        if record.status != "running":
            logger.warning("trial %d already ended (%s); second report ignored", trial_id, record.status)
            return
        failure = result if isinstance(result, Failure) else None
        score: Optional[float] = None
        if failure is None and isinstance(result, Mapping) and isinstance(result.get("train_steps"), int):
            record.train_steps = int(result["train_steps"])
        if failure is None:
            value = result.get("default") if isinstance(result, Mapping) else result
            if value is None:
                if not record.warmup:
                    failure = Failure(NO_METRIC)
            else:
                try:
                    score = float(value)
                except (TypeError, ValueError):
                    failure = Failure(f"final metric {value!r} is not a number")
                else:
                    if not math.isfinite(score):
                        failure = Failure(f"final metric is {score} (not finite)")
                    elif self.config.objective.uses_latency and not record.warmup:
                        # Rank by the objective of the score and the predicted latency (the
                        # same arch always gets the same latency, unlike a measured one).
                        record.metric = score
                        if record.latency_ms is None:
                            record.latency_ms = round(float(self.latency_fn(record.arch)), 4)
                        score = self.config.objective.value(score, record.latency_ms, self.objective_target)
        record.finish_seq = self._finish_seq
        self._finish_seq += 1
        if failure is not None:
            record.status, record.reason = "failed", failure.reason
            if record.teacher:
                self._teacher = "failed"
                self._done = Done(f"teacher fine-tuning, trial {trial_id}, failed: {failure.reason}. Every "
                                  f"warm-up and candidate distils from the teacher, so the search stops; fix the "
                                  f"cause (see the trial's log) and resume.", failed=True, cause="teacher_failed")
                logger.error("search stopped: %s", self._done.reason)
            elif record.warmup:
                self._warmup[record.stage] = "failed"
                name = self.config.stages[record.stage].name
                self._done = Done(f"warm-up of stage {record.stage} ({name}), trial {trial_id}, failed: "
                                  f"{failure.reason}. Its candidates would be scored on an untrained supernet, "
                                  f"so the search stops; fix the cause and resume.", failed=True,
                                  cause="warmup_failed")
                logger.error("search stopped: %s", self._done.reason)
            else:
                logger.warning("trial %d failed: %s (recorded, not ranked)", trial_id, failure.reason)
            return
        record.status, record.score = "succeeded", score
        if record.teacher:
            self._teacher = "done"
            logger.info("teacher trial %d succeeded (dev metric %s)", trial_id, score)
        elif record.warmup:
            self._warmup[record.stage] = "done"
            logger.info("stage %d: warm-up trial %d succeeded", record.stage, trial_id)
        else:
            logger.info("trial %d (stage %d) scored %.6g", trial_id, record.stage, score)

    # -- resume -----------------------------------------------------------------------------

    def requeue_running(self, trial_ids: Optional[Sequence[int]] = None) -> List[int]:
        """Mark running trials as lost and propose them again (new trial id, same arch).

        For resumes where the runtime does not re-run interrupted trials (``NasExperiment``):
        a lost candidate goes to the front of its stage's queue and no longer counts against
        the budget; a lost warm-up is proposed again. Finished trials are never repeated.

        Parameters
        ----------
        trial_ids : sequence of int, optional
            Only these trials (default: every running trial).

        Returns
        -------
        list of int
            The ids marked lost.
        """
        lost, again = [], []
        wanted = None if trial_ids is None else set(trial_ids)
        for record in self._records.values():
            if record.status != "running" or (wanted is not None and record.trial_id not in wanted):
                continue
            record.status, record.reason = "lost", "interrupted before it reported; proposed again"
            lost.append(record.trial_id)
            if record.teacher:
                self._teacher = "pending"
            elif record.warmup:
                self._warmup[record.stage] = "pending"
            elif record.rescore_of is not None:
                pass  # proposed again by _next_rescore
            else:
                self._seen.discard((record.stage, record.fingerprint))
                if record.stage == self._stage:
                    again.append(record.arch)
        self._queue[:0] = again
        if lost:
            logger.info("requeued %d interrupted trial(s): %s", len(lost), lost)
        return lost

    def state_dict(self) -> Dict[str, Any]:
        """The whole search state as JSON-friendly data (history, stage, queue, RNG, sampler)."""
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        return {
            "version": STATE_VERSION,
            "stages": [s.name for s in self.config.stages],
            "labels": list(self.space.labels),
            "stage": self._stage,
            "started": self._started,
            "warmup": list(self._warmup),
            "fixed": dict(self._fixed),
            "queue": [dict(a) for a in self._queue],
            "exhausted": self._exhausted,
            "incumbents": [dict(a) for a in self._incumbents],
            "records": [asdict(r) for r in self._records.values()],
            "seen": sorted([list(k) for k in self._seen]),
            "next_id": self._next_id,
            "finish_seq": self._finish_seq,
            "done": asdict(self._done) if self._done is not None else None,
            "sampler": self._sampler.state_dict() if self._sampler is not None else None,
            "teacher": self._teacher,
            "rng": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (after a JSON round trip too).

        Raises
        ------
        SearchStateError
            If the state is malformed or was saved for other stages or another space.
        """
        try:
            if state.get("version") != STATE_VERSION:
                raise SearchStateError(f"search state version {state.get('version')!r} is not supported "
                                       f"(expected {STATE_VERSION})")
            names = [s.name for s in self.config.stages]
            if list(state["stages"]) != names:
                raise SearchStateError(f"search state was saved for stages {state['stages']}, but this search "
                                       f"has stages {names}; resume with the same search settings")
            if list(state["labels"]) != list(self.space.labels):
                raise SearchStateError("search state was saved for another search space (labels differ); "
                                       "resume with the same student preset and overrides")
            records = {}
            for raw in state["records"]:
                record = TrialRecord(**raw)
                records[record.trial_id] = record
            rng_name, keys, pos, has_gauss, cached = state["rng"]
            self.rng.set_state((rng_name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            self._records = records
            self._stage = int(state["stage"])
            self._started = bool(state["started"])
            self._warmup = list(state["warmup"])
            self._fixed = dict(state["fixed"])
            self._queue = [dict(a) for a in state["queue"]]
            self._exhausted = bool(state["exhausted"])
            self._incumbents = [dict(a) for a in state["incumbents"]]
            self._seen = {(int(s), str(f)) for s, f in state["seen"]}
            self._next_id = int(state["next_id"])
            self._finish_seq = int(state["finish_seq"])
            self._done = Done(**state["done"]) if state["done"] is not None else None
            self._teacher = str(state.get("teacher", "skipped"))  # states saved before the teacher trial
            if self._done is not None and self._done.cause == "teacher_failed":
                logger.info("the saved search stopped on a failed teacher trial; proposing it again")
                self._teacher = "pending"
                self._done = None
            if self._done is not None and self._done.cause == "warmup_failed":
                # "Fix the cause and resume": the failed warm-up is proposed again.
                logger.info("the saved search stopped on a failed warm-up; proposing that warm-up again")
                self._warmup[self._stage] = "pending"
                self._done = None
            self._sampler = None
            if self._started:
                self._sampler = PartitionSampler(self._searched_labels(self.stage.kind), self.space.choices,
                                                 self.config.sampler, seed=self.config.seed * 1009 + self._stage)
                if state["sampler"] is not None:
                    self._sampler.load_state_dict(state["sampler"])
        except SearchStateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise SearchStateError(f"search state is malformed ({type(err).__name__}: {err}); delete it to "
                                   f"start over, or restore an intact copy") from err
        logger.info("search state loaded: stage %d, %d trials (%d running)", self._stage, len(self._records),
                    len(self.running()))
