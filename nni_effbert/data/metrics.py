"""GLUE metrics on top of scikit-learn and scipy; SQuAD's exact match and F1.

:func:`compute_metrics` returns a dict whose ``default`` entry is the task's primary score
(what NNI ranks trials by) plus each component, e.g. MRPC's
``{'default': 0.84, 'acc_f1': 0.84, 'accuracy': 0.80, 'f1': 0.88}``.
"""
from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from typing import Dict, List, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from .tasks import METRICS

__all__ = ["METRICS", "compute_metrics", "REGRESSION_METRICS", "normalize_answer", "squad_metrics",
           "squad_f1_per_question"]

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


# ---------------------------------------------------------------------------------------------
# SQuAD (the official evaluation scripts' rules, written out: evaluate.load("squad") needs the hub)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_v1(prediction: str, gold: str) -> float:
    return _f1(prediction, gold, empty_matches=False)


def _f1_v2(prediction: str, gold: str) -> float:
    return _f1(prediction, gold, empty_matches=True)


def _f1(prediction: str, gold: str, empty_matches: bool) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_matches and (not pred_tokens or not gold_tokens):
        # v2.0: "" against an unanswerable question is right. v1.1 scores every no-overlap case 0,
        # even a gold answer that normalizes to nothing ("the") against an empty prediction.
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(answers: Sequence[str], version: str) -> List[str]:
    if version == "squad_v2":
        # v2.0 drops gold answers that normalize to nothing; none left means "no answer".
        kept = [a for a in answers if normalize_answer(a)]
        return kept or [""]
    if not answers:
        raise ValueError("a SQuAD v1.1 question needs at least one gold answer")
    return list(answers)


def _per_question(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]], version: str,
                  fn) -> Dict[str, float]:
    if version not in ("squad", "squad_v2"):
        raise ValueError(f"version must be 'squad' or 'squad_v2', got {version!r}")
    missing = [q for q in gold if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[0]!r}")
    return {q: max(fn(predictions[q], g) for g in _golds(answers, version)) for q, answers in gold.items()}


def squad_f1_per_question(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]],
                          version: str = "squad") -> Dict[str, float]:
    """F1 of each question: the maximum over its gold answers (a fraction)."""
    return _per_question(predictions, gold, version, _f1_v2 if version == "squad_v2" else _f1_v1)


def squad_metrics(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]],
                  version: str = "squad") -> Dict[str, float]:
    """Exact match and F1 as the official SQuAD v1.1 / v2.0 evaluation scripts compute them.

    Parameters
    ----------
    predictions : dict
        Question id -> predicted answer text (``""`` = no answer, v2.0).
    gold : dict
        Question id -> gold answer texts (every question of the split; an empty list is an
        unanswerable v2.0 question). Each question scores the maximum over its gold answers.
    version : str
        ``squad`` (v1.1 rules) or ``squad_v2`` (v2.0: gold answers that normalize to nothing
        are dropped, an empty prediction matches an unanswerable question).

    Returns
    -------
    dict of str to float
        ``exact``, ``f1`` and ``default`` (= ``f1``) as fractions (the official scripts print
        them x100), ``total``; for v2.0 also ``HasAns_exact / HasAns_f1 / HasAns_total`` and
        ``NoAns_*`` when the split has such questions.

    Raises
    ------
    ValueError
        A question without a prediction, no questions, or a v1.1 question without gold answers.
    """
    if not gold:
        raise ValueError("squad_metrics: no questions to score")
    em = _per_question(predictions, gold, version, _em)
    f1 = squad_f1_per_question(predictions, gold, version)

    def summary(qids: List[str], prefix: str = "") -> Dict[str, float]:
        return {f"{prefix}exact": float(np.mean([em[q] for q in qids])),
                f"{prefix}f1": float(np.mean([f1[q] for q in qids])), f"{prefix}total": float(len(qids))}

    out = summary(list(gold))
    if version == "squad_v2":
        has = [q for q, answers in gold.items() if any(normalize_answer(a) for a in answers)]
        no = [q for q in gold if q not in set(has)]
        if has:
            out.update(summary(has, "HasAns_"))
        if no:
            out.update(summary(no, "NoAns_"))
    out["default"] = out["f1"]
    return out
