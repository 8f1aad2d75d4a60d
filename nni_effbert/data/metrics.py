"""GLUE metrics on top of scikit-learn and scipy.

:func:`compute_metrics` returns a dict whose ``default`` entry is the task's primary score
(what NNI ranks trials by) plus each component, e.g. MRPC's
``{'default': 0.84, 'acc_f1': 0.84, 'accuracy': 0.80, 'f1': 0.88}``.
"""
from __future__ import annotations

import logging
import math
from typing import Dict

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from .tasks import METRICS

__all__ = ["METRICS", "compute_metrics", "REGRESSION_METRICS"]

logger = logging.getLogger(__name__)

#: Metrics that compare real-valued predictions; the others compare class ids.
REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman")


def _as_arrays(metric: str, predictions, labels):
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if metric in REGRESSION_METRICS:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]  # regression head output [N, 1]
        preds = preds.astype(np.float64)
        gold = gold.astype(np.float64)
    elif preds.ndim == 2:
        preds = preds.argmax(axis=1)  # logits [N, C] -> class ids
    if preds.ndim != 1 or gold.ndim != 1:
        raise ValueError(
            f"{metric}: expected 1-D predictions (or [N, C] logits) and 1-D labels, got shapes "
            f"{preds.shape} and {gold.shape}"
        )
    if len(preds) != len(gold):
        raise ValueError(f"{metric}: {len(preds)} predictions but {len(gold)} labels")
    if len(gold) == 0:
        raise ValueError(f"{metric}: no examples to score")
    if metric in REGRESSION_METRICS and not (np.isfinite(preds).all() and np.isfinite(gold).all()):
        raise ValueError(f"{metric}: predictions or labels contain NaN or inf")
    return preds, gold


def _correlation(fn, preds: np.ndarray, gold: np.ndarray, name: str) -> float:
    # A constant vector has no correlation: scipy returns NaN and so do we, on purpose. A
    # caller must not mistake a degenerate model for a score of 0.
    if np.ptp(preds) == 0 or np.ptp(gold) == 0:
        logger.warning("%s correlation is undefined for constant predictions or labels", name)
        return math.nan
    return float(fn(preds, gold)[0])


def compute_metrics(metric: str, predictions, labels) -> Dict[str, float]:
    """Score predictions against labels.

    Parameters
    ----------
    metric : str
        ``accuracy``, ``f1`` (of class 1; macro average beyond two classes), ``matthews``, ``pearson``, ``spearman``,
        ``acc_f1`` (mean of accuracy and F1: MRPC, QQP) or ``pearson_spearman`` (mean of the
        two correlations: STS-B).
    predictions : array-like
        Class ids ``[N]`` or logits ``[N, C]`` for classification; values ``[N]`` or
        ``[N, 1]`` for regression.
    labels : array-like
        Gold class ids or values ``[N]``.

    Returns
    -------
    dict of str to float
        ``default`` (the primary score), ``metric`` itself and its components. Correlations
        of a constant vector are NaN (undefined), never 0.

    Raises
    ------
    ValueError
        Unknown metric, empty input, mismatched lengths, or non-finite regression values.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    preds, gold = _as_arrays(metric, predictions, labels)
    out: Dict[str, float] = {}
    if metric in ("accuracy", "acc_f1"):
        out["accuracy"] = float(skm.accuracy_score(gold, preds))
    if metric in ("f1", "acc_f1"):
        # GLUE's F1 is the positive class's (label 1); for a custom task with more than two
        # classes a binary F1 is undefined, so the macro average is used instead.
        binary = set(np.unique(np.concatenate([gold, preds])).tolist()) <= {0, 1}
        out["f1"] = float(
            skm.f1_score(gold, preds, pos_label=1, average="binary" if binary else "macro", zero_division=0)
        )
    if metric == "acc_f1":
        out["acc_f1"] = (out["accuracy"] + out["f1"]) / 2
    if metric == "matthews":
        out["matthews"] = float(skm.matthews_corrcoef(gold, preds))
    if metric in ("pearson", "pearson_spearman"):
        out["pearson"] = _correlation(stats.pearsonr, preds, gold, "pearson")
    if metric in ("spearman", "pearson_spearman"):
        out["spearman"] = _correlation(stats.spearmanr, preds, gold, "spearman")
    if metric == "pearson_spearman":
        out["pearson_spearman"] = (out["pearson"] + out["spearman"]) / 2
    out["default"] = out[metric]
    return out
