"""Ranking scored trials: the best trial of a search and Pareto fronts (metric vs cost).

trials are ranked, plotted and put on Pareto fronts. Every other trial is counted, never drawn.

"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from ..errors import ConfigError, EffBertError
from nni_effbert.strategies.ties import is_one_shot, measured_margin, order_with_ties

from .records import is_failed, is_rescore, is_scored, normalize_trial

__all__ = ["NoSucceededTrialError", "best_trial", "rescore_pairs", "stage_tie_margin", "pareto_front", "trial_latency"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class NoSucceededTrialError(EffBertError):
    """An experiment (or one of its stages) has no succeeded trial with a finite metric."""




def trial_latency(trial: Mapping[str, Any]) -> Optional[float]:
    """Predicted latency of a trial (ms) if it reported one, else its measured latency, else None."""
    final = trial.get("final") or {}
    predicted = final.get("predicted_latency_ms") if isinstance(final, Mapping) else None
    if isinstance(predicted, (int, float)) and math.isfinite(predicted):
        return float(predicted)
    measured = trial.get("latency_ms")
    return float(measured) if isinstance(measured, (int, float)) and math.isfinite(measured) else None


def _train_steps(trial: Mapping[str, Any]) -> Optional[int]:
    """The KD fine-tune steps a trial reported in its final metric, else None."""
    final = trial.get("final") or {}
    steps = final.get("train_steps") if isinstance(final, Mapping) else None
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None


def rescore_pairs(trials: Iterable[Mapping[str, Any]], stage: int) -> List[tuple]:
    """``(score, re-score)`` of the candidates of ``stage`` that were scored again
    (``search.noise_rescores``), each re-score paired with the scored candidate of the same arch."""
    trials = [normalize_trial(t) for t in trials]
    by_arch = {_arch_key(t): t["metric"] for t in trials if is_scored(t) and t["stage"] == stage}
    return [(by_arch[_arch_key(t)], t["metric"]) for t in trials
            if is_rescore(t) and t["stage"] == stage and _arch_key(t) in by_arch]


def stage_tie_margin(trials: Iterable[Mapping[str, Any]], stage: Optional[int], tie_margin: float) -> float:
    """The tie margin that ranks ``stage``'s candidates: 0 when every one of them reported 0
    fine-tune steps; the margin the stage's re-scores measured when it has at least 2
    (:func:`rescore_pairs`); else ``tie_margin``."""
    trials = [normalize_trial(t) for t in trials]
    pool = [t for t in trials if is_scored(t) and (stage is None or t["stage"] == stage)]
    if is_one_shot(_train_steps(t) for t in pool):
        return 0.0
    measured = measured_margin(rescore_pairs(trials, stage)) if stage is not None else None
    return float(tie_margin) if measured is None else float(measured)


def _arch_key(trial: Mapping[str, Any]) -> str:
    return json.dumps(trial.get("arch") or {}, sort_keys=True, default=str)


def best_trial(trials: Iterable[Mapping[str, Any]], *, stage: Union[int, str, None] = "last",
               experiment: Optional[str] = None, tie_margin: float = 0.0) -> Dict[str, Any]:
    """The best scored trial: highest metric, then fewest parameters, then earliest.

    With ``tie_margin`` (``search.tie_margin``), the trials within that margin of the highest
    metric tie, and the cheapest of them wins: lowest latency (predicted when the trial reported
    it, else measured), else fewest parameters (:func:`nni_effbert.strategies.ties.order_with_ties`).
    When every trial of the pool reported 0 fine-tune steps (``final["train_steps"]``), the margin
    is 0 (:func:`~nni_effbert.strategies.ties.stage_margin`). When the stage holds at least 2
    re-scores (``search.noise_rescores``: trials with ``rescore_of``, paired with the candidate of
    the same arch), the margin they measure replaces ``tie_margin``, as in the search itself
    (:meth:`nni_effbert.strategies.core.ProgressiveSearch.tie_margin`).

    Parameters
    ----------
    trials : iterable of dict
        Trial dicts (see the module docstring).
    stage : int, 'last' or None
        ``'last'`` (default): the highest stage with a scored trial, the progressive search's
        answer (later stages refine earlier ones, and their scores, e.g. inherited-weight scores
        of the paper's stage 3, are not comparable with earlier stages'). An int: that stage.
        None: all trials.
    experiment : str, optional
        Named in the error message.
    tie_margin : float
        Metric margin within which trials tie (0: the strict ranking above).

    Raises
    ------
    NoSucceededTrialError
        If no trial (of the stage) succeeded with a finite metric.
    """
    trials = [normalize_trial(t) for t in trials]
    scored = [t for t in trials if is_scored(t)]
    where = f"experiment {experiment}" if experiment else "the experiment"
    if stage == "last":
        stages = [t["stage"] for t in scored if t["stage"] is not None]
        if stages:
            stage = max(stages)
            logger.info("best trial taken from the last stage with results, stage %d", stage)
        else:
            stage = None
    elif stage is not None and not isinstance(stage, int):
        raise ConfigError(f"stage must be an int, 'last' or None, got {stage!r}")
    pool = scored if stage is None else [t for t in scored if t["stage"] == stage]
    if not pool:
        failed = sum(is_failed(t) for t in trials)
        of_stage = "" if stage is None else f" in stage {stage}"
        raise NoSucceededTrialError(
            f"{where} has no succeeded trial with a finite metric{of_stage} "
            f"({len(trials)} trial(s), {failed} failed); check the failed trials' logs in the NNI web UI, "
            "or export a known architecture with --arch ARCH.json"
        )

    def key(t):
        return (-t["metric"], t["params"] if t["params"] is not None else math.inf,
                t["sequence"] if t["sequence"] is not None else math.inf, t["trial_id"])

    # One-shot scores (every candidate reported 0 fine-tune steps) do not move with the evaluator
    # seed: they are ranked strictly (strategies.ties.stage_margin).
    tie_margin = stage_tie_margin(trials, stage, tie_margin)
    if tie_margin:
        def cost(t):
            latency = trial_latency(t)
            return latency if latency is not None else t["params"]

        return order_with_ties(pool, score=lambda t: t["metric"], cost=cost, margin=float(tie_margin),
                               tiebreak=lambda t: key(t)[1:])[0]
    return min(pool, key=key)


def pareto_front(trials: Iterable[Mapping[str, Any]], cost: str = "params") -> List[Dict[str, Any]]:
    """Scored trials not dominated in (higher ``metric``, lower ``cost``), by increasing cost.

    A trial is dominated when another has a metric at least as high and a cost at least as low,
    one of them strictly. Trials without a ``cost`` value are left out.

    Parameters
    ----------
    trials : iterable of dict
        Trial dicts.
    cost : str
        ``params``, ``non_embedding_params`` or ``latency_ms``.
    """
    if cost not in ("params", "non_embedding_params", "latency_ms"):
        raise ConfigError(f"cost must be params, non_embedding_params or latency_ms, got {cost!r}")
    pts = [t for t in (normalize_trial(t) for t in trials) if is_scored(t) and t[cost] is not None]
    # Sweep by increasing cost (ties: best metric first); a trial is on the front iff its metric
    # beats every cheaper-or-equal trial seen before it.
    pts.sort(key=lambda t: (t[cost], -t["metric"]))
    front: List[Dict[str, Any]] = []
    best = -math.inf
    for t in pts:
        if t["metric"] > best:
            front.append(t)
            best = t["metric"]
        elif t["metric"] == best and front and front[-1][cost] == t[cost]:
            front.append(t)  # an exact duplicate point: neither dominates the other
    return front


