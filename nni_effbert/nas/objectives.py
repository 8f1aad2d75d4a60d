"""What a candidate's ``default`` is: the search objectives, all measured on the search split.

A candidate is scored on the task's held-out **search split** (rows carved from train, never
trained on; see :func:`nni_effbert.data.loading.search_split_rows`), never on dev. Every
objective is computed for every candidate and put into its final metric dict, so the web UI
(and ``nni-effbert fidelity``) can compare them; ``evaluator.objective`` only picks which one
is ``default`` (the number the strategy ranks by and NNI's "Top trials" sorts by; higher is
better):

============  ==================================  ============================================
objective     ``default`` =                       metric-dict key it copies
============  ==================================  ============================================
``kd``        minus the KD loss vs the cached     ``search_kd_loss`` (attention + hidden +
              teacher outputs                     prediction terms with the ``kd.*`` weights)
``kd_pred``   minus the prediction soft-CE        ``search_kd_pred_loss``
``metric``    the task metric                     ``search_metric``
============  ==================================  ============================================

Anchor: DNA (Li et al., "Block-wisely Supervised Neural Architecture Search with Knowledge
Distillation", CVPR 2020) ranks candidates by their distillation loss and reports a better
rank correlation with the final accuracy than ranking by accuracy; on small search splits the
task metric is also coarse (a few hundred rows give steps of a few tenths of a point, and
half-trained candidates tie at the majority-class rate), while a loss is continuous.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping

from ..config import OBJECTIVES
from ..errors import ConfigError

__all__ = ["OBJECTIVES", "OBJECTIVE_KEYS", "objective_value", "search_metric_dict", "objective_scores"]

logger = logging.getLogger(__name__)

#: Objective -> (metric-dict key, sign): ``default = sign * final[key]``.
OBJECTIVE_KEYS: Dict[str, tuple] = {
    "kd": ("search_kd_loss", -1.0),
    "kd_pred": ("search_kd_pred_loss", -1.0),
    "metric": ("search_metric", 1.0),
}


def objective_value(final: Mapping[str, Any], objective: str) -> float:
    """The value of ``objective`` (higher is better) from a candidate's final metric dict.

    Raises
    ------
    ConfigError
        Unknown objective, or a metric dict without the key it needs (a trial scored before
        the search split existed).
    """
    if objective not in OBJECTIVE_KEYS:
        raise ConfigError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    key, sign = OBJECTIVE_KEYS[objective]
    value = final.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"the metric dict has no {key!r} (needed by objective {objective!r}); it was scored by an "
                          "nni-effbert without the search split: run the search again")
    return sign * float(value)


def search_metric_dict(scored: Mapping[str, Any], metric_name: str) -> Dict[str, Any]:
    """The ``search_*`` keys of a final metric dict from :func:`~nni_effbert.kd.scoring.score_split`'s output."""
    metrics = scored["metrics"]
    out: Dict[str, Any] = {"search_metric": float(metrics["default"])}
    for k, v in metrics.items():
        if k != "default":
            out[f"search_{k}"] = float(v)
    out["search_kd_loss"] = float(scored["kd_loss"])
    out["search_kd_pred_loss"] = float(scored["kd_pred_loss"])
    for term in ("attention", "hidden"):
        if f"kd_{term}_loss" in scored:
            out[f"search_kd_{term}_loss"] = float(scored[f"kd_{term}_loss"])
    out["search_rows"] = int(scored["rows"])
    out["search_metric_name"] = str(metric_name)
    return out


def objective_scores(final: Mapping[str, Any]) -> Dict[str, float]:
    """Every objective's value (higher is better) of a final metric dict that has them."""
    out = {}
    for name in OBJECTIVES:
        try:
            out[name] = objective_value(final, name)
        except ConfigError:
            continue
    return out
