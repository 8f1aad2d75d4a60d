"""Paired comparisons (nni_effbert.stats): agree with scipy, shrink with data, refuse bad pairs."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, matthews_corrcoef

from nni_effbert.stats import StatsInputError, format_paired_table, paired_metric, paired_scores


def _models(rows: int, seeds: int, gap: float, seed: int = 0):
    """Correctness of two models on ``rows`` rows for ``seeds`` distill seeds: row difficulty is
    shared, each seed flips its own rows, model A is right ``gap`` more often."""
    rng = np.random.default_rng(seed)
    easy = rng.random(rows)
    a = (easy[None, :] + rng.normal(0, 0.3, (seeds, rows)) > 0.3 - gap).astype(float)
    b = (easy[None, :] + rng.normal(0, 0.3, (seeds, rows)) > 0.3).astype(float)
    return a, b


def test_paired_scores_match_a_direct_scipy_computation():
    a, b = _models(rows=300, seeds=3, gap=0.05)
    result = paired_scores(a, b, name_a="searched", name_b="baseline", n_resamples=999, seed=4)
    d = (a - b).mean(axis=0)
    boot = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=999, method="percentile",
                           rng=np.random.default_rng(4))
    perm = stats.permutation_test((a.mean(axis=0), b.mean(axis=0)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                  permutation_type="samples", n_resamples=999, rng=np.random.default_rng(5))
    assert result.diff == pytest.approx(a.mean() - b.mean())
    assert result.score_a == pytest.approx(a.mean()) and result.score_b == pytest.approx(b.mean())
    assert (result.ci_low, result.ci_high) == pytest.approx((boot.confidence_interval.low, boot.confidence_interval.high))
    assert result.p_value == pytest.approx(perm.pvalue)
    assert result.per_seed == pytest.approx(tuple((a - b).mean(axis=1)))
    assert (result.n_rows, result.n_seeds) == (300, 3)


def test_interval_shrinks_with_more_rows_and_more_seeds():
    def width(rows, seeds):
        a, b = _models(rows=rows, seeds=seeds, gap=0.02, seed=1)
        r = paired_scores(a, b, n_resamples=999)
        return r.ci_high - r.ci_low

    assert width(2000, 1) < 0.6 * width(200, 1)
    assert width(500, 5) < 0.85 * width(500, 1)


def test_a_real_difference_is_seen_and_a_missing_one_is_not():
    a, b = _models(rows=1000, seeds=3, gap=0.08)
    seen = paired_scores(a, b, n_resamples=999)
    assert seen.p_value < 0.05 and seen.ci_low > 0
    same = paired_scores(a, a.copy(), n_resamples=999)
    assert same.diff == 0 and same.p_value == pytest.approx(1.0) and same.ci_low <= 0 <= same.ci_high


def test_paired_metric_agrees_with_paired_scores_for_accuracy():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 2, 400)
    pa = np.where(rng.random((3, 400)) < 0.85, gold, 1 - gold)
    pb = np.where(rng.random((3, 400)) < 0.80, gold, 1 - gold)
    by_metric = paired_metric(accuracy_score, pa, pb, gold, n_resamples=300)
    by_scores = paired_scores((pa == gold).astype(float), (pb == gold).astype(float), n_resamples=300)
    assert by_metric.diff == pytest.approx(by_scores.diff)
    assert by_metric.score_a == pytest.approx(by_scores.score_a)
    assert by_metric.ci_low == pytest.approx(by_scores.ci_low, abs=0.015)
    assert by_metric.ci_high == pytest.approx(by_scores.ci_high, abs=0.015)
    assert by_metric.p_value == pytest.approx(by_scores.p_value, abs=0.05)


def test_paired_metric_takes_any_metric_and_a_one_seed_teacher():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 300)
    teacher = np.where(rng.random(300) < 0.9, gold, 1 - gold)  # one seed, paired with each student seed
    student = np.where(rng.random((3, 300)) < 0.75, gold, 1 - gold)
    r = paired_metric(matthews_corrcoef, teacher, student, gold, name_a="teacher", name_b="student",
                      n_resamples=300)
    assert r.n_seeds == 3 and r.score_a == pytest.approx(matthews_corrcoef(gold, teacher))
    assert r.diff > 0 and r.p_value < 0.05 and r.ci_low > 0
    table = format_paired_table([r], "MCC")
    assert "teacher vs student" in table and "95% CI" in table and "300 x 3" in table


def test_pairs_that_do_not_pair_are_refused_in_one_line():
    with pytest.raises(StatsInputError, match="same rows") as err:
        paired_scores(np.ones((2, 10)), np.ones((2, 11)), name_a="searched", name_b="baseline")
    assert "\n" not in str(err.value) and "searched" in str(err.value)
    with pytest.raises(StatsInputError, match="same distill seeds"):
        paired_scores(np.ones((2, 10)), np.ones((3, 10)))
    with pytest.raises(StatsInputError, match="labels"):
        paired_metric(accuracy_score, np.ones(10), np.ones(10), np.ones(9))


def test_paired_suite_weights_tasks_and_reduces_to_paired_scores_for_one_task():
    from nni_effbert.stats import paired_scores, paired_suite

    rng = np.random.default_rng(3)
    a = {"big": rng.integers(0, 2, (3, 400)), "small": rng.integers(0, 2, (3, 60))}
    b = {"big": a["big"].copy(), "small": np.clip(a["small"] - (rng.random((3, 60)) < 0.3), 0, 1)}
    one = paired_suite({"big": a["big"]}, {"big": b["small"][:, :1].repeat(400, 1)}, {"big": 1.0})
    ref = paired_scores(a["big"], b["small"][:, :1].repeat(400, 1))
    assert (one.diff, one.ci_low, one.ci_high, one.p_value) == pytest.approx((ref.diff, ref.ci_low, ref.ci_high,
                                                                              ref.p_value))
    suite = paired_suite(a, b, {"big": 1.0, "small": 3.0})
    small = (a["small"] - b["small"]).mean()
    assert suite.diff == pytest.approx(0.75 * small)  # 'big' is identical: only 'small' moves the average
    assert suite.ci_low <= suite.diff <= suite.ci_high and suite.n_rows == 460 and len(suite.per_seed) == 3
    assert suite.score_a == pytest.approx(0.25 * a["big"].mean() + 0.75 * a["small"].mean())
    same = paired_suite(a, a, {"big": 1.0, "small": 1.0})
    assert same.diff == 0 and same.p_value == 1.0
    with pytest.raises(StatsInputError, match="same tasks"):
        paired_suite(a, {"big": b["big"]}, {"big": 1.0, "small": 1.0})
    with pytest.raises(StatsInputError, match="positive"):
        paired_suite(a, b, {"big": 1.0, "small": 0.0})
