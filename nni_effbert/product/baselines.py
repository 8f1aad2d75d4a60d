"""The hand-designed baselines a searched student is compared with, exported from the same
supernet and distilled with the same budget.

* **params-matched** (:func:`baseline_arch`, :func:`ensure_baseline`): BERT's MLP
  ``linear2(gelu(linear1(x)))``, stack 1, at the width of the space whose parameter count is
  nearest the searched student's;
* **latency-matched** (:func:`latency_baseline_arch`, :func:`ensure_latency_baseline`): BERT's
  MLP, stack 1, at the width whose latency is nearest the searched student's, first by the latency
  table's prediction (the two nearest widths), then by end-to-end measurement of those candidates
  beside the searched student.

Both are sliced from the supernet stage the searched student came from, so that both students
start from the same kind of weights; an existing baseline export made for the same searched
student, space and budget is reused (:func:`reusable_export`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nni_effbert.search_spaces.modeling import EfficientBertModel

from ..config import ExperimentConfig
from ..errors import CheckpointError
from ..io import load_json
from ..latency.measure import measure_interleaved, pooled_median
from ..latency.settings import latency_settings, torch_device
from ..latency.table import table_for_config
from ..nas.kd_evaluator import KDEvaluator
from .distill import distill_record, plan_distill, run_distill
from .loader import load_exported
from .students import export_from_supernet, supernet_experiment

__all__ = ["BASELINE", "LATENCY_BASELINE", "BaselineChoice", "LatencyBaselineChoice", "baseline_arch",
           "baseline_evaluator", "ensure_baseline", "reusable_export", "distil_baseline", "latency_baseline_arch",
           "recorded_latency_baseline", "choose_latency_baseline", "ensure_latency_baseline"]

logger = logging.getLogger(__name__)

#: Export names of the two baselines inside ``<workdir>/exports``.
BASELINE = "baseline"
LATENCY_BASELINE = "baseline-latency"



@dataclass
class BaselineChoice:
    """The baseline's architecture and how close its size is to the target.

    Attributes
    ----------
    arch : dict
        BERT's MLP expression, stack 1, one width for every layer.
    width : int
    params : int
        Its parameter count.
    target : int
        The searched student's parameter count.
    """

    arch: Dict[str, Any]
    width: int
    params: int
    target: int

    @property
    def difference(self) -> int:
        """``params - target`` (signed)."""
        return self.params - self.target

    @property
    def relative_difference(self) -> float:
        """``difference / target``."""
        return self.difference / self.target if self.target else 0.0


def baseline_arch(space, target_params: int) -> BaselineChoice:
    """BERT's MLP (``linear2(gelu(linear1(x)))``), stack 1, at the space width nearest in size.

    The width is one of ``space.config.widths``, the same for every layer, chosen to minimise
    ``|count_params(arch) - target_params|`` (ties: the smaller model). With stack 1 and only the
    space's widths, an exact match is generally impossible: :attr:`BaselineChoice.difference`
    says by how much it misses.
    """
    best: Optional[BaselineChoice] = None
    for width in space.config.widths:
        arch = space.bert_arch(width=width, stack=1)
        n = int(space.count_params(arch))
        cand = BaselineChoice(arch=arch, width=int(width), params=n, target=int(target_params))
        if best is None or (abs(cand.difference), cand.params) < (abs(best.difference), best.params):
            best = cand
    assert best is not None  # a space always has at least one width
    return best

def baseline_evaluator(cfg: ExperimentConfig, searched_dir, *, progress: bool = True, setup=None):
    """``(searched export, KDEvaluator)`` for slicing a baseline of a searched export: from the
    supernets the searched student came from (its experiment's), in the same student space.

    Raises
    ------
    CheckpointError
        The export belongs to another student space than ``cfg``'s.
    """
    searched = load_exported(searched_dir)
    ev = KDEvaluator(cfg, progress=progress, setup=setup, experiment=supernet_experiment(searched.meta))
    if ev.setup.space.config.to_dict() != searched.config.to_dict():
        raise CheckpointError(f"the student in {searched.path} belongs to another student space than this "
                              "config's; build the report with the config it was exported with")
    return searched, ev


def ensure_baseline(cfg: ExperimentConfig, searched_dir, *, name: str = BASELINE, progress: bool = True, setup=None):
    """Export (if needed) and distil the hand-designed baseline for a searched export.

    The baseline is :func:`~nni_effbert.product.distill.baseline_arch` for the searched student's
    parameter count, sliced from the same supernet stage and distilled with the same
    ``distill`` budget. An existing baseline export made for the same searched student, space
    and budget is reused.

    Returns
    -------
    (DistillResult, BaselineChoice)
    """

    searched, ev = baseline_evaluator(cfg, searched_dir, progress=progress, setup=setup)
    choice = baseline_arch(ev.setup.space, int(searched.meta["params"]))
    wanted = {"baseline_for": searched.meta.get("fingerprint"), "target_params": choice.target,
              "supernet_experiment": ev.experiment}
    about = (f"baseline: BERT MLP, stack 1, width {choice.width} ({choice.params} params vs {choice.target} "
             f"searched, {choice.difference:+d})")
    result = distil_baseline(cfg, ev, searched, choice.arch, name, wanted, about=about, progress=progress,
                             extra={"width": choice.width, "param_difference": choice.difference})
    return result, choice


def reusable_export(cfg: ExperimentConfig, ev, name: str, wanted: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The metadata of ``exports/<name>`` if it can stand as it is: its ``extra`` has every
    ``wanted`` key, it is in the evaluator's student space and it was distilled with today's
    ``distill`` plan; else None."""
    out = ev.setup.workdir.export_dir(name)
    if not (out / "export_meta.json").is_file():
        return None
    meta = load_json(out / "export_meta.json", "baseline export metadata")
    record = distill_record(meta)
    if (all((meta.get("extra") or {}).get(k) == v for k, v in wanted.items()) and record is not None
            and record.get("plan") == plan_distill(cfg).to_dict()
            and meta.get("space_config") == ev.setup.space.config.to_dict()):
        return meta
    return None


def distil_baseline(cfg: ExperimentConfig, ev, searched, arch: Dict[str, Any], name: str, wanted: Dict[str, Any], *,
                    about: str,
                    extra: Optional[Dict[str, Any]] = None, progress: bool = True):
    """Export ``arch`` as the baseline ``exports/<name>`` of the ``searched`` export and distil it.

    ``arch`` is sliced from the searched student's supernet stage (evaluator ``ev``). An export
    that :func:`reusable_export` accepts for ``wanted`` is kept as it is; otherwise it is
    exported again with ``wanted`` + ``extra`` in its metadata (``about`` is logged). Returns the
    :class:`~nni_effbert.product.distill.DistillResult`.
    """
    if reusable_export(cfg, ev, name, wanted) is None:
        stage = (searched.meta.get("extra") or {}).get("supernet_stage")
        logger.info("%s", about)
        # force: a baseline that no longer fits (another searched student, width or budget) is the
        # report's own to redo; export_student logs it when a distilled one is replaced.
        export_from_supernet(ev, dict(arch), stage, name,
                {"source": "baseline", **wanted, **(extra or {}), "searched_export": str(searched.path)}, force=True)
    return run_distill(cfg, ev.setup.workdir.export_dir(name), progress=progress, setup=ev.setup)



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
    measurement wins. ``measure=False`` keeps the prediction's choice. A target predicted slower
    than every width (a stacked or wider student) gets the slowest width, one predicted faster than
    every width the fastest, without measuring: there, measurement noise between two widths that
    both miss the target could only pick the one further from it.
    """
    target_pred = float(table.predict(target_arch))
    cands = []
    for width in space.config.widths:
        arch = space.bert_arch(width=width, stack=1)
        cands.append({"width": int(width), "arch": arch, "predicted_ms": float(table.predict(arch)), "measured_ms": None})
    cands.sort(key=lambda c: (abs(c["predicted_ms"] - target_pred), c["predicted_ms"]))
    chosen = cands[0]
    target_meas = None
    predicted = [c["predicted_ms"] for c in cands]
    if target_pred >= max(predicted) or target_pred <= min(predicted):
        measure = False  # outside the widths' range: the nearest end, cands[0], is the answer
    if measure:
        dev = torch_device(settings.device)
        short = cands[:max(1, shortlist)]
        models = {i: EfficientBertModel(space.config, arch).to(dev)
                  for i, arch in enumerate([target_arch] + [c["arch"] for c in short])}
        rounds = measure_interleaved(models, rounds=3, seq_length=settings.seq_length, batch_size=settings.batch_size,
                                     repeats=max(5, repeats // 3), threads=settings.threads, runtime=settings.runtime)
        target_meas = pooled_median(rounds[0])
        for i, c in enumerate(short, start=1):
            c["measured_ms"] = pooled_median(rounds[i])
        chosen = min(short, key=lambda c: (abs(c["measured_ms"] - target_meas), c["measured_ms"]))
    return LatencyBaselineChoice(arch=chosen["arch"], width=chosen["width"], predicted_ms=chosen["predicted_ms"],
                                 target_predicted_ms=target_pred, measured_ms=chosen["measured_ms"],
                                 target_measured_ms=target_meas,
                                 candidates=[{k: c[k] for k in ("width", "predicted_ms", "measured_ms")} for c in cands])


def recorded_latency_baseline(cfg: ExperimentConfig, ev, searched,
                              name: str = LATENCY_BASELINE) -> Optional[LatencyBaselineChoice]:
    """The choice recorded by an ``exports/<name>`` that can be reused for ``searched`` (same
    student, supernets, space and distill plan), without measuring again; else None."""
    meta = reusable_export(cfg, ev, name, _latency_key(searched, ev))
    if meta is None:
        return None
    return LatencyBaselineChoice.from_record(ev.setup.space, meta["extra"])


def _latency_key(searched, ev) -> Dict[str, Any]:
    return {"baseline_for": searched.meta.get("fingerprint"), "matched_by": "latency",
            "supernet_experiment": ev.experiment}


def choose_latency_baseline(cfg: ExperimentConfig, searched_dir, *, name: str = LATENCY_BASELINE, progress: bool = True,
                            setup=None, remeasure: bool = False) -> LatencyBaselineChoice:
    """The latency-matched baseline for a searched export: the one an existing reusable export
    records, else :func:`latency_baseline_arch` (predicted, then measured). A report asks this
    first, so a rerun keeps the width it measured once (short measurements on a busy machine may
    rank two nearby widths either way); ``remeasure`` chooses again."""
    searched, ev = baseline_evaluator(cfg, searched_dir, progress=progress, setup=setup)
    return _choose_latency_baseline(cfg, ev, searched, name, progress, remeasure=remeasure)


def _choose_latency_baseline(cfg: ExperimentConfig, ev, searched, name: str, progress: bool, *,
                             remeasure: bool = False) -> LatencyBaselineChoice:
    recorded = None if remeasure else recorded_latency_baseline(cfg, ev, searched, name)
    if recorded is not None:
        return recorded
    table = table_for_config(cfg, space_config=ev.setup.space.config, progress=progress)
    return latency_baseline_arch(ev.setup.space, table, dict(searched.arch), settings=latency_settings(cfg))


def ensure_latency_baseline(cfg: ExperimentConfig, searched_dir, *, name: str = LATENCY_BASELINE,
                            progress: bool = True, setup=None,
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
