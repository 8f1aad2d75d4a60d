"""Cost-aware product steps: export the best trial under a latency limit, and the BERT-MLP
baseline matched to the searched student's latency.

* :func:`export_within_latency` is ``nni-effbert export --experiment ID --max-latency MS`` /
  ``--min-speedup X``: the best trial of the last stage whose latency
  (:func:`~nni_effbert.nas.latency_ranking.trial_latency`: predicted where reported) meets the limit.
* :func:`latency_baseline_arch` / :func:`ensure_latency_baseline` build the report's second
  baseline: BERT's MLP, stack 1, at the width whose latency is nearest the searched student's,
  first by the latency table's prediction (the two nearest widths), then by end-to-end
  measurement of those candidates beside the searched student. The params-matched baseline
  (:func:`~nni_effbert.product.students.ensure_baseline`) stays, so the report shows both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nni_effbert.search_spaces.modeling import EfficientBertModel

from ..errors import ConfigError
from ..latency.measure import measure_latency
from ..latency.settings import latency_settings, torch_device
from ..latency.table import table_for_config
from ..latency.targets import teacher_latency_ms
from ..nas.latency_ranking import best_by_objective, best_within_latency
from ..nas.kd_evaluator import KDEvaluator
from ..nas.records import read_nni_trials
from .students import (SEARCHED, ExportInfo, _export, baseline_evaluator, distil_baseline, experiments_dir_of,
                       reusable_export)

__all__ = ["LATENCY_BASELINE", "LatencyBaselineChoice", "export_within_latency", "export_best_objective", "latency_limit",
           "latency_baseline_arch", "choose_latency_baseline", "ensure_latency_baseline"]

logger = logging.getLogger(__name__)

#: Export name of the latency-matched baseline inside ``<workdir>/exports``.
LATENCY_BASELINE = "baseline-latency"


def latency_limit(cfg, *, max_latency_ms: Optional[float] = None, min_speedup: Optional[float] = None) -> float:
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


def export_within_latency(cfg, experiment: str, max_latency_ms: float, *, name: str = SEARCHED,
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
    info = _export(evaluator, dict(best["arch"] or {}), best["stage"], name, extra, force=force)
    info.trial = best
    return info


def export_best_objective(cfg, experiment: str, *, name: str = SEARCHED, experiments_dir: Optional[str] = None,
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
    info = _export(evaluator, dict(best["arch"] or {}), best["stage"], name, extra, force=force)
    info.trial = best
    return info


@dataclass
class LatencyBaselineChoice:
    """The latency-matched baseline and how close it comes.

    Attributes
    ----------
    arch : dict
    width : int
    predicted_ms, target_predicted_ms : float
        The baseline's and the searched student's predicted latency.
    measured_ms, target_measured_ms : float or None
        Their end-to-end latency measured side by side (None when not measured).
    candidates : list of dict
        ``{width, predicted_ms, measured_ms}`` of the widths considered.
    """

    arch: Dict[str, Any]
    width: int
    predicted_ms: float
    target_predicted_ms: float
    measured_ms: Optional[float] = None
    target_measured_ms: Optional[float] = None
    candidates: List[Dict[str, Any]] = field(default_factory=list)

    def to_record(self) -> Dict[str, Any]:
        """The choice as JSON (the arch left out: it is BERT's MLP at ``width``, :meth:`from_record`)."""
        return {"width": int(self.width), "predicted_ms": self.predicted_ms, "target_predicted_ms": self.target_predicted_ms,
                "measured_ms": self.measured_ms, "target_measured_ms": self.target_measured_ms,
                "candidates": list(self.candidates)}

    @classmethod
    def from_record(cls, space, record: Dict[str, Any]) -> "LatencyBaselineChoice":
        """The choice :meth:`to_record` wrote, in ``space``."""
        return cls(arch=space.bert_arch(width=int(record["width"]), stack=1), width=int(record["width"]),
                   predicted_ms=float(record["predicted_ms"]), target_predicted_ms=float(record["target_predicted_ms"]),
                   measured_ms=record.get("measured_ms"), target_measured_ms=record.get("target_measured_ms"),
                   candidates=list(record.get("candidates") or []))

    @property
    def relative_difference(self) -> float:
        """(baseline - searched) / searched latency, measured when available, else predicted."""
        if self.measured_ms is not None and self.target_measured_ms:
            return (self.measured_ms - self.target_measured_ms) / self.target_measured_ms
        return (self.predicted_ms - self.target_predicted_ms) / self.target_predicted_ms


def latency_baseline_arch(space, table, target_arch: Dict[str, Any], *, settings=None, measure: bool = True,
                          shortlist: int = 2, repeats: int = 30) -> LatencyBaselineChoice:
    """BERT's MLP, stack 1, at the width whose latency is nearest ``target_arch``'s.

    The ``shortlist`` widths nearest by predicted latency are then measured end to end (random
    weights: latency does not depend on them), interleaved with the target, and the nearest by
    measurement wins. ``measure=False`` keeps the prediction's choice.
    """
    target_pred = float(table.predict(target_arch))
    cands = []
    for width in space.config.widths:
        arch = space.bert_arch(width=width, stack=1)
        cands.append({"width": int(width), "arch": arch, "predicted_ms": float(table.predict(arch)), "measured_ms": None})
    cands.sort(key=lambda c: (abs(c["predicted_ms"] - target_pred), c["predicted_ms"]))
    chosen = cands[0]
    target_meas = None
    if measure:
        dev = torch_device(settings.device)
        short = cands[:max(1, shortlist)]
        models = [(None, EfficientBertModel(space.config, target_arch))] + \
                 [(c, EfficientBertModel(space.config, c["arch"])) for c in short]
        times: Dict[int, List[float]] = {i: [] for i in range(len(models))}
        for _ in range(3):  # interleaved: load drift hits every model alike
            for i, (_, model) in enumerate(models):
                r = measure_latency(model.to(dev), seq_length=settings.seq_length, batch_size=settings.batch_size,
                                    repeats=max(5, repeats // 3), threads=settings.threads, runtime=settings.runtime)
                times[i].extend(r.times_ms)
        med = {i: sorted(v)[len(v) // 2] for i, v in times.items()}
        target_meas = med[0]
        for i, (c, _) in enumerate(models[1:], start=1):
            c["measured_ms"] = med[i]
        chosen = min(short, key=lambda c: (abs(c["measured_ms"] - target_meas), c["measured_ms"]))
    return LatencyBaselineChoice(arch=chosen["arch"], width=chosen["width"], predicted_ms=chosen["predicted_ms"],
                                 target_predicted_ms=target_pred, measured_ms=chosen["measured_ms"],
                                 target_measured_ms=target_meas,
                                 candidates=[{k: c[k] for k in ("width", "predicted_ms", "measured_ms")} for c in cands])


def recorded_latency_baseline(cfg, ev, searched, name: str = LATENCY_BASELINE) -> Optional[LatencyBaselineChoice]:
    """The choice recorded by an ``exports/<name>`` that can be reused for ``searched`` (same
    student, supernets, space and distill plan), without measuring again; else None."""
    meta = reusable_export(cfg, ev, name, _latency_key(searched, ev))
    if meta is None:
        return None
    return LatencyBaselineChoice.from_record(ev.setup.space, meta["extra"])


def _latency_key(searched, ev) -> Dict[str, Any]:
    return {"baseline_for": searched.meta.get("fingerprint"), "matched_by": "latency",
            "supernet_experiment": ev.experiment}


def choose_latency_baseline(cfg, searched_dir, *, name: str = LATENCY_BASELINE, progress: bool = True,
                            setup=None, remeasure: bool = False) -> LatencyBaselineChoice:
    """The latency-matched baseline for a searched export: the one an existing reusable export
    records, else :func:`latency_baseline_arch` (predicted, then measured). A report asks this
    first, so a rerun keeps the width it measured once (short measurements on a busy machine may
    rank two nearby widths either way); ``remeasure`` chooses again."""
    searched, ev = baseline_evaluator(cfg, searched_dir, progress=progress, setup=setup)
    return _choose_latency_baseline(cfg, ev, searched, name, progress, remeasure=remeasure)


def _choose_latency_baseline(cfg, ev, searched, name: str, progress: bool, *,
                             remeasure: bool = False) -> LatencyBaselineChoice:
    recorded = None if remeasure else recorded_latency_baseline(cfg, ev, searched, name)
    if recorded is not None:
        return recorded
    table = table_for_config(cfg, space_config=ev.setup.space.config, progress=progress)
    return latency_baseline_arch(ev.setup.space, table, dict(searched.arch), settings=latency_settings(cfg))


def ensure_latency_baseline(cfg, searched_dir, *, name: str = LATENCY_BASELINE, progress: bool = True, setup=None,
                            choice: Optional[LatencyBaselineChoice] = None):
    """Export (if needed) and distil the latency-matched baseline for a searched export.

    Like :func:`~nni_effbert.product.students.ensure_baseline` (same supernet stage, same distill
    budget), with the width of ``choice`` (default :func:`choose_latency_baseline`: an existing
    export for the same searched student and budget is reused without measuring again). Builds
    the latency table if missing.

    Returns
    -------
    (DistillResult, LatencyBaselineChoice)
    """
    searched, ev = baseline_evaluator(cfg, searched_dir, progress=progress, setup=setup)
    if choice is None:
        choice = _choose_latency_baseline(cfg, ev, searched, name, progress)
    wanted = {**_latency_key(searched, ev), "width": choice.width}
    about = (f"latency-matched baseline: BERT MLP, stack 1, width {choice.width} (predicted "
             f"{choice.predicted_ms:.3f} ms vs {choice.target_predicted_ms:.3f} searched)")
    extra = {"predicted_ms": choice.predicted_ms, "target_predicted_ms": choice.target_predicted_ms,
             "measured_ms": choice.measured_ms, "target_measured_ms": choice.target_measured_ms,
             "candidates": choice.candidates}
    result = distil_baseline(cfg, ev, searched, choice.arch, name, wanted, about=about, extra=extra,
                             progress=progress)
    return result, choice
