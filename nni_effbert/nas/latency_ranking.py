"""Trials against their latency: the score-vs-latency Pareto front and the best trial under a
latency limit (``nni-effbert export --pareto / --max-latency / --min-speedup``).

A trial's latency here is its **predicted** latency (``predicted_latency_ms`` in its final
metric, from the work directory's latency table) when it reported one, else its measured
``latency_ms``: the prediction is deterministic, while one trial's measurement on a shared
machine moves with the load. Which one was used is kept in ``latency_source``.

Only one stage is compared at a time (by default the last stage with results), as
:func:`~nni_effbert.nas.ranking.best_trial` does: scores of different stages come from different
supernets.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from ..errors import ConfigError
from .ranking import NoSucceededTrialError, pareto_front, trial_latency
from .records import is_scored, normalize_trial

__all__ = ["trial_latency", "latency_front", "best_within_latency", "best_by_objective"]

logger = logging.getLogger(__name__)


def _with_latency(trials: Iterable[Mapping[str, Any]], stage: Union[int, str, None]) -> List[Dict[str, Any]]:
    """Scored trials of ``stage`` with a latency, ``latency_ms`` set to :func:`trial_latency`."""
    scored = [normalize_trial(t) for t in trials]
    scored = [t for t in scored if is_scored(t)]
    if stage == "last":
        stages = [t["stage"] for t in scored if t["stage"] is not None]
        stage = max(stages) if stages else None
    elif stage is not None and not isinstance(stage, int):
        raise ConfigError(f"stage must be an int, 'last' or None, got {stage!r}")
    out = []
    for t in scored:
        if stage is not None and t["stage"] != stage:
            continue
        ms = trial_latency(t)
        if ms is None:
            continue
        final = t.get("final") or {}
        t = dict(t, measured_latency_ms=t["latency_ms"], latency_ms=ms,
                 latency_source="predicted" if "predicted_latency_ms" in final else "measured")
        out.append(t)
    return out


def latency_front(trials: Iterable[Mapping[str, Any]], *, stage: Union[int, str, None] = "last") -> List[Dict[str, Any]]:
    """The trials not dominated in (higher metric, lower latency), by increasing latency.

    Each returned dict is the trial with ``latency_ms`` = :func:`trial_latency`, plus
    ``measured_latency_ms`` and ``latency_source``.
    """
    pts = _with_latency(trials, stage)
    keep = {t["trial_id"]: t for t in pts}
    # pareto_front re-normalises; extra keys are not trial-format keys, so pass plain copies.
    plain = [{k: v for k, v in t.items() if k not in ("measured_latency_ms", "latency_source")} for t in pts]
    return [keep[t["trial_id"]] for t in pareto_front(plain, cost="latency_ms")]


def best_within_latency(trials: Iterable[Mapping[str, Any]], max_latency_ms: float, *,
                        stage: Union[int, str, None] = "last", experiment: Optional[str] = None) -> Dict[str, Any]:
    """The highest-metric trial whose latency is at most ``max_latency_ms`` (ties: lower latency).

    Raises
    ------
    NoSucceededTrialError
        No scored trial (of the stage) meets the limit; the message names the fastest one.
    """
    if not (isinstance(max_latency_ms, (int, float)) and max_latency_ms > 0):
        raise ConfigError(f"the latency limit must be a number of ms > 0, got {max_latency_ms!r}")
    pts = _with_latency(trials, stage)
    where = f"experiment {experiment}" if experiment else "the experiment"
    if not pts:
        raise NoSucceededTrialError(f"{where} has no scored trial with a latency (of the stage compared)")
    ok = [t for t in pts if t["latency_ms"] <= max_latency_ms]
    if not ok:
        fastest = min(pts, key=lambda t: t["latency_ms"])
        raise NoSucceededTrialError(
            f"no scored trial of {where} is within {max_latency_ms:.3f} ms: the fastest, trial {fastest['trial_id']}, "
            f"takes {fastest['latency_ms']:.3f} ms ({fastest['latency_source']}); raise the limit, or search with "
            "search.latency_budget_ms")
    return min(ok, key=lambda t: (-t["metric"], t["latency_ms"], str(t["trial_id"])))


def best_by_objective(trials: Iterable[Mapping[str, Any]], objective, target_ms: Optional[float] = None, *,
                      stage: Union[int, str, None] = "last", experiment: Optional[str] = None) -> Dict[str, Any]:
    """The trial with the highest ``objective.value(metric, latency)`` (a
    :class:`~nni_effbert.strategies.stages.ObjectiveConfig`), as the search ranked it; ties: lower
    latency. The dict gains ``objective``.

    Raises
    ------
    NoSucceededTrialError
        No scored trial with a latency.
    """
    pts = _with_latency(trials, stage)
    if not pts:
        where = f"experiment {experiment}" if experiment else "the experiment"
        raise NoSucceededTrialError(f"{where} has no scored trial with a latency to rank by the objective")
    for t in pts:
        t["objective"] = float(objective.value(t["metric"], t["latency_ms"], target_ms))
    return min(pts, key=lambda t: (-t["objective"], t["latency_ms"], str(t["trial_id"])))
