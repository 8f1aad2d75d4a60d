"""Paired comparisons of the report's models: predictions in row order, intervals from stats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nni_effbert.config import load_config
from nni_effbert.kd.scoring import predict
from nni_effbert.kd.setup import KDSetup
from nni_effbert.product.compare import compare_predictions, teacher_logits
from conftest import finetune_teacher_into

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base_teacher, glue_dir):
    cfg = load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={tmp_path_factory.mktemp('work')}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
        "task.max_train_rows=48", "task.max_dev_rows=40", "task.search_rows=8", "evaluator.eval_batch_size=7"])
    finetune_teacher_into(cfg)
    return KDSetup.from_config(cfg, progress=False)


def test_predictions_come_back_in_dataset_row_order(setup):
    student = setup.space.subnet(setup.space.bert_arch()).eval()  # no dropout in the row-by-row forwards
    logits, labels = setup.predict_dev(student)
    assert np.array_equal(labels, np.asarray(setup.task.dev["labels"]))
    for i in (0, 5, 17, 39):  # one row alone, no padding, no sorting
        row = setup.task.dev[i]
        alone = student(torch.tensor([row["input_ids"]]), torch.tensor([row["attention_mask"]]),
                        torch.tensor([row["token_type_ids"]]), return_kd=False).logits[0]
        assert np.allclose(logits[i], alone.detach().numpy(), atol=1e-4)
    # the same metric as evaluate(), which scores the length-sorted order
    assert setup.evaluate(student)["default"] == pytest.approx(float((logits.argmax(-1) == labels).mean()))


def test_teacher_predictions_match_its_own_forward(setup):
    teacher = setup.teacher_model()
    logits, labels = setup.predict_dev(teacher, call=teacher_logits)
    row = setup.task.dev[3]
    alone = teacher(input_ids=torch.tensor([row["input_ids"]]), attention_mask=torch.tensor([row["attention_mask"]]),
                    token_type_ids=torch.tensor([row["token_type_ids"]])).logits[0]
    assert np.allclose(logits[3], alone.detach().numpy(), atol=1e-4)
    with pytest.raises(Exception):
        predict(teacher, setup.task.dev.select([]), setup.task.spec, batch_size=4, pad_token_id=0)


def test_compare_predictions_pairs_rows_for_accuracy_and_any_metric():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 500)
    good = np.where(rng.random(500) < 0.9, gold, 1 - gold)
    poor = np.where(rng.random(500) < 0.6, gold, 1 - gold)
    preds = {"teacher": good, "searched": poor, "baseline": poor.copy()}
    acc = compare_predictions(preds, gold, "accuracy", [("searched", "baseline"), ("teacher", "searched")])
    assert acc[0].diff == 0 and acc[0].p_value == pytest.approx(1.0)
    assert acc[1].diff == pytest.approx((good == gold).mean() - (poor == gold).mean())
    assert acc[1].ci_low > 0 and acc[1].p_value < 0.01
    mcc = compare_predictions(preds, gold, "matthews", [("teacher", "searched")])[0]
    assert mcc.diff > 0 and mcc.ci_low > 0 and mcc.n_rows == 500
