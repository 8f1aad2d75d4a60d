"""Cost-aware exports: the best trial under a latency limit, or the best by the search's latency
objective.

* :func:`export_within_latency` is ``nni-effbert export --experiment ID --max-latency MS`` /
  ``--min-speedup X``: the best trial of the last stage whose latency
  (:func:`~nni_effbert.nas.latency_ranking.trial_latency`: predicted where reported) meets the limit.
* :func:`export_best_objective`: the best trial by ``search.objective`` (metric and latency).

The latency-matched baseline is in :mod:`.baselines`.
"""
from __future__ import annotations

import logging
from typing import Optional

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..latency.targets import teacher_latency_ms
from ..nas.latency_ranking import best_by_objective, best_within_latency
from ..nas.kd_evaluator import KDEvaluator
from ..nas.records import read_nni_trials
from .students import SEARCHED, ExportInfo, experiments_dir_of, export_from_supernet

__all__ = ["export_within_latency", "export_best_objective", "latency_limit"]

logger = logging.getLogger(__name__)


def latency_limit(cfg: ExperimentConfig, *, max_latency_ms: Optional[float] = None,
                  min_speedup: Optional[float] = None) -> float:
    """The latency limit in ms from ``--max-latency`` and/or ``--min-speedup`` (the tighter one).

    Raises
    ------
    ConfigError
        Neither given, a non-positive value, or a speed-up without a fine-tuned teacher.
    """
    limits = []
    if max_latency_ms is not None:
        if max_latency_ms <= 0:
            raise ConfigError(f"--max-latency must be > 0 ms, got {max_latency_ms}")
        limits.append(float(max_latency_ms))
    if min_speedup is not None:
        if min_speedup <= 0:
            raise ConfigError(f"--min-speedup must be > 0, got {min_speedup}")
        teacher = teacher_latency_ms(cfg)
        if teacher is None:
            raise ConfigError("--min-speedup needs the teacher's latency, but the work directory has no fine-tuned "
                              "teacher; run `nni-effbert teacher -c CONFIG` or give --max-latency MS")
        logger.info("teacher latency %.3f ms: speed-up %.2fx means at most %.3f ms", teacher, min_speedup,
                    teacher / min_speedup)
        limits.append(teacher / float(min_speedup))
    if not limits:
        raise ConfigError("give --max-latency MS or --min-speedup X")
    return min(limits)


def export_within_latency(cfg: ExperimentConfig, experiment: str, max_latency_ms: float, *, name: str = SEARCHED,
                          experiments_dir: Optional[str] = None, progress: bool = True,
                          force: bool = False) -> ExportInfo:
    """Export the best trial of ``experiment`` (last stage) whose latency is at most ``max_latency_ms``.

    An existing ``exports/<name>`` is replaced only with ``force``.

    Raises
    ------
    NoSucceededTrialError
        No scored trial meets the limit (the message names the fastest one).
    """
    trials = read_nni_trials(experiment, experiments_dir=experiments_dir_of(cfg, experiments_dir))
    best = best_within_latency(trials, max_latency_ms, experiment=experiment)
    evaluator = KDEvaluator(cfg, progress=progress, experiment=experiment)  # that experiment's supernets
    extra = {"source": "experiment", "experiment": experiment, "trial_id": best["trial_id"],
             "trial_metric": best["metric"], "stage": best["stage"], "stage_name": best["stage_name"],
             "max_latency_ms": float(max_latency_ms), "trial_latency_ms": best["latency_ms"],
             "trial_latency_source": best["latency_source"]}
    info = export_from_supernet(evaluator, dict(best["arch"] or {}), best["stage"], name, extra, force=force)
    info.trial = best
    return info


def export_best_objective(cfg: ExperimentConfig, experiment: str, *, name: str = SEARCHED,
                          experiments_dir: Optional[str] = None,
                          progress: bool = True, force: bool = False) -> ExportInfo:
    """Export the trial of the last stage that is best by ``search.objective`` (score and latency),
    the ranking the search itself used; ``nni-effbert export --experiment ID`` does this when the
    config has a latency objective. An existing ``exports/<name>`` is replaced only with ``force``."""
    objective = cfg.search.objective
    target = objective.target(teacher_latency_ms(cfg) if objective.target_speedup is not None else None)
    trials = read_nni_trials(experiment, experiments_dir=experiments_dir_of(cfg, experiments_dir))
    best = best_by_objective(trials, objective, target, experiment=experiment)
    evaluator = KDEvaluator(cfg, progress=progress, experiment=experiment)  # that experiment's supernets
    extra = {"source": "experiment", "experiment": experiment, "trial_id": best["trial_id"],
             "trial_metric": best["metric"], "stage": best["stage"], "stage_name": best["stage_name"],
             "objective": objective.kind, "trial_objective": best["objective"], "trial_latency_ms": best["latency_ms"]}
    info = export_from_supernet(evaluator, dict(best["arch"] or {}), best["stage"], name, extra, force=force)
    info.trial = best
    return info


