"""Paired comparisons of two models: a 95% interval and a two-sided p-value over rows x seeds.

Two models are compared on the *same* evaluation rows and, when both were distilled with several
seeds, the *same* distill seeds: seed ``s`` of model A is paired with seed ``s`` of model B, and row
``r`` with row ``r``. A model with one seed (a teacher) is paired with every seed of the other.

The statistic is the difference of the metric, averaged over the seeds:
``mean_s metric(A_s) - mean_s metric(B_s)``.

* The interval is a percentile bootstrap over rows (:func:`scipy.stats.bootstrap`, rows resampled
  with replacement, both models and every seed resampled with the same rows).
* The p-value is a paired permutation test (:func:`scipy.stats.permutation_test`,
  ``permutation_type='samples'``): under the null hypothesis that the two models are
  exchangeable on every row, each row's predictions (all seeds at once) are swapped between A and
  B at random. Two-sided.

Seeds enter through the statistic: each row's difference is averaged over the paired seeds, so
more seeds shrink the seed noise in the interval as more rows shrink the row noise. The seeds are
not resampled themselves: with the 3-5 seeds a CPU budget affords, a bootstrap over seeds says
little, and the per-seed differences are reported beside the interval (``per_seed``) for the
reader to judge.

Two entry points: :func:`paired_scores` for metrics that are a mean of per-row scores (accuracy,
SQuAD EM / F1: fast, vectorised), :func:`paired_metric` for any metric of the whole prediction
vector (Matthews, F1, Pearson: the metric is recomputed on each resample).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from .errors import EffBertError

__all__ = ["PairedResult", "StatsInputError", "paired_scores", "paired_suite", "paired_metric", "format_paired_table"]

#: Confidence of every interval the tool prints.
CONFIDENCE = 0.95
#: Resamples of the bootstrap and of the permutation test (Monte Carlo standard error of a p-value
#: near 0.05 is about 0.005 at this count).
N_RESAMPLES = 2000


class StatsInputError(EffBertError):
    """Two models' predictions cannot be paired (different rows, seeds or shapes)."""


@dataclass(frozen=True)
class PairedResult:
    """One paired comparison, A minus B.

    Attributes
    ----------
    name_a, name_b : str
        What is compared (report rows: ``searched``, ``baseline``, ``teacher``, ...).
    score_a, score_b : float
        Each model's metric, averaged over its seeds.
    diff : float
        ``score_a - score_b`` averaged over the paired seeds.
    ci_low, ci_high : float
        The ``confidence`` interval of ``diff`` (percentile bootstrap over rows).
    p_value : float
        Two-sided p-value of the paired permutation test (rows swapped between A and B).
    per_seed : tuple of float
        ``diff`` of each paired seed alone.
    n_rows, n_seeds : int
        Rows and paired seeds the comparison used.
    confidence, n_resamples : float, int
        The interval's level and the resamples of each test.
    """

    name_a: str
    name_b: str
    score_a: float
    score_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    per_seed: Tuple[float, ...]
    n_rows: int
    n_seeds: int
    confidence: float = CONFIDENCE
    n_resamples: int = N_RESAMPLES

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of every field."""
        out = asdict(self)
        out["per_seed"] = list(self.per_seed)
        return out

    def summary(self) -> str:
        """``+0.0123 [-0.0040, +0.0290], p 0.14`` (A minus B, the interval, the two-sided p)."""
        return (f"{self.diff:+.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}], "
                f"p {_format_p(self.p_value)}")


def _format_p(p: float) -> str:
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


def _as_seed_rows(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim < 2 or array.shape[1] == 0:
        raise StatsInputError(f"{what}: expected [rows] or [seeds, rows] values, got shape {array.shape}")
    return array


def _pair(a: Any, b: Any, name_a: str, name_b: str) -> Tuple[np.ndarray, np.ndarray]:
    """Broadcast a one-seed model to the other's seeds; refuse rows or seeds that do not pair."""
    a, b = _as_seed_rows(a, name_a), _as_seed_rows(b, name_b)
    if a.shape[1:] != b.shape[1:]:
        raise StatsInputError(
            f"{name_a} has {a.shape[1]} rows but {name_b} has {b.shape[1]}: a paired comparison needs both "
            "models scored on the same rows, in the same order")
    if a.shape[0] != b.shape[0]:
        if min(a.shape[0], b.shape[0]) != 1:
            raise StatsInputError(
                f"{name_a} has {a.shape[0]} seeds but {name_b} has {b.shape[0]}: pair the same distill seeds "
                "(or give one model a single seed, e.g. a teacher)")
        seeds = max(a.shape[0], b.shape[0])
        a, b = np.broadcast_to(a, (seeds,) + a.shape[1:]), np.broadcast_to(b, (seeds,) + b.shape[1:])
    return a, b


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _check_finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise StatsInputError(f"{what} is not finite ({value}): the metric is undefined on these predictions")
    return float(value)


def paired_scores(scores_a: Any, scores_b: Any, *, name_a: str = "A", name_b: str = "B",
                  confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedResult:
    """Compare two models whose metric is the mean of per-row scores.

    Parameters
    ----------
    scores_a, scores_b : array-like, ``[rows]`` or ``[seeds, rows]``
        Per-row scores (1/0 correctness for accuracy, per-question EM or F1 for SQuAD), on the same
        rows in the same order; seed ``s`` of A is paired with seed ``s`` of B.
    name_a, name_b : str
        Names for messages and the result.
    confidence : float
        Level of the interval (0.95).
    n_resamples : int
        Bootstrap and permutation resamples.
    seed : int
        Seeds both resampling procedures, so a report is reproducible.

    Returns
    -------
    PairedResult
    """
    a, b = _pair(scores_a, scores_b, name_a, name_b)
    a, b = a.astype(np.float64), b.astype(np.float64)
    row_diff = (a - b).mean(axis=0)  # each row's difference, averaged over the paired seeds
    if row_diff.size < 2:
        raise StatsInputError(f"{name_a} vs {name_b}: a paired comparison needs at least 2 rows")
    boot = stats.bootstrap((row_diff,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                           method="percentile", vectorized=True, rng=_rng(seed))
    # Swapping A and B on a row flips the sign of its difference: the paired ("samples") permutation
    # of (mean_s A, mean_s B) per row.
    perm = stats.permutation_test((a.mean(axis=0), b.mean(axis=0)),
                                  lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                  vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                                  rng=_rng(seed + 1))
    return PairedResult(
        name_a=name_a, name_b=name_b, score_a=float(a.mean()), score_b=float(b.mean()),
        diff=float(row_diff.mean()), ci_low=float(boot.confidence_interval.low),
        ci_high=float(boot.confidence_interval.high), p_value=float(perm.pvalue),
        per_seed=tuple(float(v) for v in (a - b).mean(axis=1)), n_rows=int(a.shape[1]), n_seeds=int(a.shape[0]),
        confidence=confidence, n_resamples=n_resamples)


def paired_suite(scores_a: Mapping[str, Any], scores_b: Mapping[str, Any], weights: Mapping[str, float], *,
                 name_a: str = "A", name_b: str = "B", confidence: float = CONFIDENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedResult:
    """Compare two models on the weighted average of several tasks' per-row metrics (a GLUE-style
    suite average), each task's rows paired as in :func:`paired_scores`.

    The statistic is ``sum_t w_t * (mean_s,r A_t - mean_s,r B_t)`` (weights normalised to 1). The
    interval is a percentile bootstrap that resamples each task's rows within that task
    (:func:`scipy.stats.bootstrap` over one sample per task: the tasks keep their sizes and weights);
    the p-value a paired permutation test that swaps A and B row by row in every task, two-sided.

    Parameters
    ----------
    scores_a, scores_b : mapping of task -> array-like ``[rows]`` or ``[seeds, rows]``
        Per-row scores of each task (the same tasks in both).
    weights : mapping of task -> float
        Each task's weight in the average (> 0).
    """
    tasks = list(scores_a)
    if not tasks or set(tasks) != set(scores_b) or not set(tasks) <= set(weights):
        raise StatsInputError(f"{name_a} vs {name_b}: the suite needs the same tasks on both sides and a weight for "
                              f"each (got {sorted(scores_a)}, {sorted(scores_b)}, weights {sorted(weights)})")
    total = float(sum(float(weights[t]) for t in tasks))
    if not math.isfinite(total) or total <= 0 or any(float(weights[t]) <= 0 for t in tasks):
        raise StatsInputError(f"{name_a} vs {name_b}: task weights must be positive, got {dict(weights)}")
    w = np.array([float(weights[t]) / total for t in tasks])
    pairs = [_pair(scores_a[t], scores_b[t], f"{name_a}[{t}]", f"{name_b}[{t}]") for t in tasks]
    pairs = [(a.astype(np.float64), b.astype(np.float64)) for a, b in pairs]
    diffs = [(a - b).mean(axis=0) for a, b in pairs]  # each row's difference, averaged over the paired seeds
    if any(d.size < 2 for d in diffs):
        raise StatsInputError(f"{name_a} vs {name_b}: every task needs at least 2 rows for a paired comparison")

    def weighted(*samples, axis=-1):
        return sum(wt * np.mean(x, axis=axis) for wt, x in zip(w, samples))

    boot = stats.bootstrap(tuple(diffs), weighted, confidence_level=confidence, n_resamples=n_resamples,
                           method="percentile", vectorized=True, rng=_rng(seed))
    # One long paired sample: row r of task t weighs w_t / n_t; swapping A and B on a row flips its term.
    row_w = np.concatenate([np.full(d.size, wt / d.size) for wt, d in zip(w, diffs)])
    a_all = np.concatenate([a.mean(axis=0) for a, _ in pairs])
    b_all = np.concatenate([b.mean(axis=0) for _, b in pairs])
    perm = stats.permutation_test((a_all, b_all), lambda x, y, axis: np.sum(row_w * (x - y), axis=axis),
                                  permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                                  alternative="two-sided", rng=_rng(seed + 1))
    seeds = {a.shape[0] for a, _ in pairs}
    per_seed = tuple(float(sum(wt * (a[s] - b[s]).mean() for wt, (a, b) in zip(w, pairs))) for s in range(seeds.pop())) \
        if len(seeds) == 1 else ()
    return PairedResult(
        name_a=name_a, name_b=name_b, score_a=float(sum(wt * a.mean() for wt, (a, _) in zip(w, pairs))),
        score_b=float(sum(wt * b.mean() for wt, (_, b) in zip(w, pairs))), diff=float(weighted(*diffs)),
        ci_low=float(boot.confidence_interval.low), ci_high=float(boot.confidence_interval.high),
        p_value=float(perm.pvalue), per_seed=per_seed, n_rows=int(sum(d.size for d in diffs)),
        n_seeds=int(max(a.shape[0] for a, _ in pairs)), confidence=confidence, n_resamples=n_resamples)


def paired_metric(metric: Callable[[np.ndarray, np.ndarray], float], preds_a: Any, preds_b: Any, labels: Any, *,
                  name_a: str = "A", name_b: str = "B", confidence: float = CONFIDENCE,
                  n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedResult:
    """Compare two models under any metric of the whole prediction vector.

    Parameters
    ----------
    metric : callable
        ``metric(predictions, labels) -> float`` (e.g. Matthews correlation, F1, Pearson).
    preds_a, preds_b : array-like, ``[rows]`` or ``[seeds, rows]``
        Predictions on the same rows in the same order (class ids or regression values).
    labels : array-like, ``[rows]``
        The gold labels of those rows.
    name_a, name_b, confidence, n_resamples, seed
        As :func:`paired_scores`.

    Returns
    -------
    PairedResult
    """
    a, b = _pair(preds_a, preds_b, name_a, name_b)
    gold = np.asarray(labels)
    if gold.shape != a.shape[1:]:
        raise StatsInputError(f"{gold.shape[0] if gold.ndim else 0} labels for {a.shape[1]} rows of {name_a}")
    seeds, rows = a.shape[0], a.shape[1]
    if rows < 2:
        raise StatsInputError(f"{name_a} vs {name_b}: a paired comparison needs at least 2 rows")
    # Rows are addressed by index into a pool [A rows | B rows], so that a permutation can swap a
    # row's A and B predictions (all seeds at once) and a bootstrap can resample rows of both.
    pool = np.concatenate([a, b], axis=1)

    def per_seed(ia: np.ndarray, ib: np.ndarray, gold_rows: np.ndarray) -> np.ndarray:
        return np.array([metric(pool[s, ia], gold_rows) - metric(pool[s, ib], gold_rows) for s in range(seeds)])

    def diff(ia: np.ndarray, ib: np.ndarray) -> float:
        return float(per_seed(ia, ib, gold[ia % rows]).mean())

    index_a, index_b = np.arange(rows), np.arange(rows) + rows
    observed = per_seed(index_a, index_b, gold)
    score_a = _check_finite(float(np.mean([metric(a[s], gold) for s in range(seeds)])), f"{name_a}'s metric")
    score_b = _check_finite(float(np.mean([metric(b[s], gold) for s in range(seeds)])), f"{name_b}'s metric")
    boot = stats.bootstrap((index_a,), lambda idx: diff(idx, idx + rows), confidence_level=confidence,
                           n_resamples=n_resamples, method="percentile", vectorized=False, rng=_rng(seed))
    perm = stats.permutation_test((index_a, index_b), diff, permutation_type="samples", vectorized=False,
                                  n_resamples=n_resamples, alternative="two-sided", rng=_rng(seed + 1))
    return PairedResult(
        name_a=name_a, name_b=name_b, score_a=score_a, score_b=score_b, diff=float(observed.mean()),
        ci_low=float(boot.confidence_interval.low), ci_high=float(boot.confidence_interval.high),
        p_value=float(perm.pvalue), per_seed=tuple(float(v) for v in observed), n_rows=rows, n_seeds=seeds,
        confidence=confidence, n_resamples=n_resamples)


def format_paired_table(results: Sequence[PairedResult], metric_name: str = "metric",
                        note: Optional[str] = None) -> str:
    """A markdown table of comparisons: A, B, their scores, A - B, the interval and the p-value."""
    if not results:
        return ""
    level = int(round(results[0].confidence * 100))
    lines = [f"| comparison | {metric_name} A | {metric_name} B | A - B | {level}% CI | p (two-sided) | rows x seeds |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name_a} vs {r.name_b} | {r.score_a:.4f} | {r.score_b:.4f} | {r.diff:+.4f} | "
                     f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {_format_p(r.p_value)} | {r.n_rows} x {r.n_seeds} |")
    text = "\n".join(lines)
    if note:
        text += "\n\n" + note
    return text
