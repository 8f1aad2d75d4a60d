"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest

from nni_effbert.data.metrics import METRICS, compute_metrics
from nni_effbert.data.tasks import GLUE_TASKS

LABELS = [1, 1, 1, 0, 0, 0, 0, 0]
PREDS = [1, 1, 0, 1, 1, 0, 0, 0]  # TP=2 FP=2 FN=1 TN=3


def test_classification_by_hand():
    assert compute_metrics("accuracy", PREDS, LABELS) == {"accuracy": 0.625, "default": 0.625}
    f1 = compute_metrics("f1", PREDS, LABELS)
    assert f1["default"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    acc_f1 = compute_metrics("acc_f1", PREDS, LABELS)
    assert acc_f1["accuracy"] == 0.625 and acc_f1["f1"] == pytest.approx(4 / 7)
    assert acc_f1["default"] == acc_f1["acc_f1"] == pytest.approx((0.625 + 4 / 7) / 2)
    mcc = compute_metrics("matthews", PREDS, LABELS)
    assert mcc["default"] == pytest.approx((2 * 3 - 2 * 1) / math.sqrt(4 * 3 * 5 * 4))


def test_logits_are_argmaxed():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert compute_metrics("accuracy", logits, [1, 0, 0])["default"] == pytest.approx(2 / 3)


def test_regression_by_hand():
    preds, gold = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 10.0]
    out = compute_metrics("pearson_spearman", np.array(preds)[:, None], gold)
    assert out["pearson"] == pytest.approx(13 / math.sqrt(5 * 50))
    assert out["spearman"] == pytest.approx(0.8)
    assert out["default"] == out["pearson_spearman"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2)
    assert compute_metrics("spearman", preds, gold)["default"] == pytest.approx(0.8)


def test_constant_predictions_are_nan_not_zero():
    out = compute_metrics("pearson", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(out["default"])


def test_multiclass_f1_is_macro():
    out = compute_metrics("f1", [0, 1, 2, 2], [0, 1, 2, 1])
    # per class F1: 1, 2/3, 2/3
    assert out["default"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


@pytest.mark.parametrize(
    "metric, preds, labels, words",
    [
        ("auc", [1], [1], "unknown metric"),
        ("accuracy", [1, 0], [1], "2 predictions but 1 labels"),
        ("accuracy", [], [], "no examples"),
        ("pearson", [1.0, float("nan")], [1.0, 2.0], "NaN"),
    ],
)
def test_bad_input(metric, preds, labels, words):
    with pytest.raises(ValueError, match=words):
        compute_metrics(metric, preds, labels)


def test_every_task_metric_is_known():
    assert {spec.metric for spec in GLUE_TASKS.values()} <= set(METRICS)
