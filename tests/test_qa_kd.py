"""QA teacher (``AutoModelForQuestionAnswering``) fine-tuning, its per-feature output cache, and span scoring."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from nni_effbert.config import load_config
from nni_effbert.data.batches import collate
from nni_effbert.data.qa_answers import score_span_model
from nni_effbert.data.qa import load_qa_task
from nni_effbert.kd.cache import TeacherCache
from nni_effbert.kd.teacher_finetune import finetune_teacher
from nni_effbert.kd.teacher import load_teacher, read_teacher_marker, teacher_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_qa_teacher(tmp_path_factory, qa_tokenizer):
    """A random tiny BERT (2 layers, hidden 32) saved as an HF folder with the QA tokenizer."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(qa_tokenizer), max_position_embeddings=128))
    folder = tmp_path_factory.mktemp("qa_teacher")
    model.save_pretrained(folder)
    qa_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, squad_small, base_qa_teacher):
    train, dev = squad_small
    return load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={tmp_path_factory.mktemp('work')}", f"teacher.model={base_qa_teacher}", "task.name=squad",
        f"task.train_file={train}", f"task.dev_file={dev}", "task.max_seq_length=96", "task.doc_stride=24",
        "task.search_rows=12", "task.max_train_rows=60"])


@pytest.fixture(scope="module")
def qa_data(cfg, qa_tokenizer, tmp_path_factory):
    return load_qa_task(cfg.task, qa_tokenizer, cache_dir=str(tmp_path_factory.mktemp("ds")))


def test_teacher_finetunes_as_question_answering(cfg, qa_data, qa_tokenizer, tmp_path):
    result = finetune_teacher(cfg, qa_data, qa_tokenizer, tmp_path / "teacher", progress=False)
    marker = read_teacher_marker(result.path)
    assert marker["problem_type"] == "question_answering" and marker["metric"] == "f1"
    assert set(marker["dev_scores"]) == {"search", "dev"}
    assert 0.0 <= result.dev_metric <= 1.0 and result.dev_metric == marker["dev_scores"]["dev"]["f1"]
    model, _ = load_teacher(str(result.path))  # the folder says QA: no flag needed
    assert type(model).__name__ == "BertForQuestionAnswering"
    again = finetune_teacher(cfg, qa_data, qa_tokenizer, tmp_path / "teacher", progress=False)
    assert again.reused and again.dev_metric == result.dev_metric


def test_cache_stores_start_end_logits_per_feature(cfg, qa_data, base_qa_teacher, tmp_path):
    feats = qa_data.train
    cache = TeacherCache.open_or_build(tmp_path, base_qa_teacher, feats, data_fingerprint=qa_data.fingerprint,
                                       split="train", hidden_layers=[0, 2], attention_layers=[2], batch_size=8)
    assert cache.span_logits and len(cache) == len(feats) > len(qa_data.examples["train"])
    rows = [3, 0, len(feats) - 1]
    batch = collate([feats[i] for i in rows], pad_token_id=0)
    got = cache.get(batch["idx"], max_len=batch["input_ids"].shape[1])
    model, _ = load_teacher(str(base_qa_teacher), span=True)
    model.eval()
    want = teacher_outputs(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], [0, 2], [2])
    mask = batch["attention_mask"].bool()
    assert got.logits.shape == want.logits.shape == (3, batch["input_ids"].shape[1], 2)
    torch.testing.assert_close(got.logits[mask], want.logits[mask], rtol=0, atol=1e-4)
    assert (got.logits[~mask] == 0).all()
    torch.testing.assert_close(got.hidden_states[1][mask].float(), want.hidden_states[1][mask], rtol=0, atol=2e-2)
    assert len(got.attentions) == 1


def test_score_span_model_with_an_oracle(cfg, qa_data):
    """A model whose logits peak at the gold positions scores (almost) perfectly; a flat one does not."""
    by_ids = {tuple(f["input_ids"]): (f["start_positions"], f["end_positions"]) for f in qa_data.dev}

    def oracle(batch):
        out = torch.zeros(*batch["input_ids"].shape, 2)
        for b, ids in enumerate(batch["input_ids"].tolist()):
            n = int(batch["attention_mask"][b].sum())
            s, e = by_ids[tuple(ids[:n])]
            out[b, s, 0] = out[b, e, 1] = 10.0
        return out

    scores = score_span_model(oracle, qa_data, cfg.task, batch_size=8, pad_token_id=0, splits=("dev",))
    assert scores["dev"]["f1"] > 0.9
    flat = score_span_model(lambda b: torch.zeros(*b["input_ids"].shape, 2), qa_data, cfg.task, 8, 0, splits=("dev",))
    assert flat["dev"]["f1"] < scores["dev"]["f1"]


# ---------------------------------------------------------------------------------------------
# A tiny QA trial end to end: teacher, warm-up, candidate scoring (kd and metric objectives)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trial_cfg(tmp_path_factory, squad_small, base_qa_teacher):
    from nni_effbert.kd.teacher_finetune import finetune_from_config

    train, dev = squad_small
    cfg = load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={tmp_path_factory.mktemp('trial')}", f"teacher.model={base_qa_teacher}", "task.name=squad",
        f"task.train_file={train}", f"task.dev_file={dev}", "task.max_seq_length=96", "task.doc_stride=24",
        "task.search_rows=12", "task.max_train_rows=60", "task.max_dev_rows=16", "warmup.batch_size=8",
        "evaluator.batch_size=8", "distill.general_steps=2", "distill.task_steps=4", "distill.batch_size=8",
        "distill.eval_interval=2"])
    finetune_from_config(cfg, progress=False)
    return cfg


def test_tiny_qa_trial_end_to_end(trial_cfg, tmp_path):
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.nas.warmup import run_warmup

    setup = KDSetup.from_config(trial_cfg, progress=False)
    assert setup.space.config.head == "span"
    train_titles = set(setup.task.examples["train"]["title"])
    assert not train_titles & set(setup.task.examples["search"]["title"])  # no search article trains
    run_warmup(trial_cfg, 0, progress=False, setup=setup)
    evaluator = KDEvaluator(trial_cfg, stage=0, report=False, progress=False, setup=setup)
    arch = setup.space.random_arch(np.random.default_rng(3))
    result = evaluator.evaluate(arch, train_steps=4, trial_id="qa-kd")
    assert result["objective"] == "kd" and result["default"] == -result["search_kd_loss"]
    assert 0.0 <= result["search_metric"] == result["search_f1"] <= 1.0 and "search_exact" in result
    assert np.isfinite(result["search_kd_pred_loss"]) and result["train_steps"] == 4
    # objective: metric = F1 on the search split.
    metric_cfg = dataclasses.replace(trial_cfg, evaluator=dataclasses.replace(trial_cfg.evaluator, objective="metric"))
    scored = KDEvaluator(metric_cfg, stage=0, report=False, progress=False, setup=setup).evaluate(
        arch, train_steps=0, trial_id="qa-metric")
    assert scored["objective"] == "metric" and scored["default"] == scored["search_f1"]
    dev = setup.evaluate(setup.space.subnet(arch))
    assert set(dev) >= {"exact", "f1", "default"} and dev["default"] == dev["f1"]

    # Export, final distillation, report rows with EM and F1.
    from nni_effbert.product.distill import run_distill
    from nni_effbert.product.export import export_student
    from nni_effbert.product.report_page import format_table
    from nni_effbert.product.report import student_row, teacher_row

    folder = export_student(setup.space, arch, setup.space, tmp_path / "searched", tokenizer=setup.tokenizer,
                            task=setup.task.spec)
    distilled = run_distill(trial_cfg, folder, progress=False, setup=setup)
    assert [step for step, _ in distilled.curve] == [2, 4] and 0.0 <= distilled.dev_metric <= 1.0
    # Per-question F1 in dev order (the suite's and the SQuAD bench's paired tests): its mean is dev F1.
    from nni_effbert.product.compare import dev_row_scores

    per_question = dev_row_scores(setup, folder)
    assert per_question.shape == (len(setup.task.examples["dev"]),) and ((0 <= per_question) & (per_question <= 1)).all()
    assert per_question.mean() == pytest.approx(distilled.dev_metric, abs=1e-9)
    # Deploy: the export and the teacher as ONNX (fp32 + int8), checked on dev questions; the fp32
    # graph's dev F1 in ONNX Runtime is the PyTorch student's.
    from nni_effbert.product.onnx import (OnnxModel, evaluate_onnx_span, export_onnx, export_teacher_onnx,
                                          runtime_rows, task_rows)

    texts, labels, source = task_rows(trial_cfg, n=10)
    assert labels is None and source == "squad dev questions" and len(texts) == 10 and len(texts[0]) == 2
    onnx_out = export_onnx(folder, int8=True, rows=texts, rows_source=source)
    assert onnx_out.check["output"] == "span" and onnx_out.check["fp32"]["max_abs_diff"] < 1e-3
    assert evaluate_onnx_span(OnnxModel(onnx_out.onnx_path), setup) == pytest.approx(distilled.dev_metric, abs=1e-6)
    teacher_onnx = export_teacher_onnx(trial_cfg, int8=True, rows=texts, rows_source=source)
    rows = runtime_rows([{"name": "teacher", "role": "teacher", "folder": teacher_onnx.folder,
                          "dev_metric": None, "latency_ms": None},
                         {"name": "searched", "role": "searched", "folder": folder,
                          "dev_metric": distilled.dev_metric, "latency_ms": None}],
                        None, setup.task.spec, vocab_size=int(setup.space.config.vocab_size), seq_length=32,
                        repeats=2, evaluate=lambda m: evaluate_onnx_span(m, setup))
    assert [(r["name"], r["precision"]) for r in rows] == [("teacher", "fp32"), ("teacher", "int8"),
                                                          ("searched", "fp32"), ("searched", "int8")]
    assert rows[2]["dev_metric"] == pytest.approx(distilled.dev_metric, abs=1e-6)
    assert all(0.0 <= r["dev_metric"] <= 1.0 and r["onnxruntime_ms"] > 0 for r in rows)
    row = student_row(folder, "searched", "searched", seq_length=32, repeats=1)
    assert row["dev_metric"] == distilled.dev_metric and 0.0 <= row["dev_exact"] <= row["dev_metric"] + 1e-9
    teacher = teacher_row(setup, seq_length=32, repeats=1)
    assert teacher["dev_exact"] is not None
    table = format_table([teacher, row], metric_name="dev F1")
    assert "| model | dev EM | dev F1 |" in table and f"{row['dev_exact']:.4f}" in table


def test_qa_supernet_starts_from_the_teacher(trial_cfg):
    """warmup.init: teacher on span QA: a student of the teacher's shape, sliced from it before any
    KD step, answers the dev questions exactly as the teacher does (same F1)."""
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.warmup import run_warmup

    cfg = load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        *(f"{k}={v}" for k, v in (("workdir", trial_cfg.workdir), ("teacher.model", trial_cfg.teacher.model))),
        "task.name=squad", f"task.train_file={trial_cfg.task.train_file}", f"task.dev_file={trial_cfg.task.dev_file}",
        "task.max_seq_length=96", "task.doc_stride=24", "task.search_rows=12", "task.max_train_rows=60",
        "task.max_dev_rows=16", "warmup.batch_size=8", "evaluator.batch_size=8", "student.preset=teacher",
        "warmup.init=teacher", "warmup.importance_batches=2"])
    setup = KDSetup.from_config(cfg, progress=False)
    result = run_warmup(cfg, 0, steps=0, general_steps=0, progress=False, setup=setup, experiment="qa-init")
    assert result.init == "teacher (taylor importance)"
    student = setup.space.subnet(setup.space.bert_arch()).eval()
    from nni_effbert.data.batches import make_loader

    batch = next(iter(make_loader(setup.task.dev, 8, False, 0, setup.pad_token_id)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ours = student(*inputs.values(), return_kd=False).logits
        theirs = setup.teacher_model().eval()(**inputs)
    assert theirs.start_logits.std() > 0.01
    torch.testing.assert_close(ours[..., 0], theirs.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[..., 1], theirs.end_logits, atol=1e-4, rtol=0)
    assert setup.evaluate(student)["f1"] == pytest.approx(float(setup.teacher_marker["dev_metric"]), abs=1e-6)


def test_v2_threshold_is_tuned_on_the_search_split(tmp_path, squad_small, qa_tokenizer):
    """SQuAD v2.0 scoring: the null threshold comes from the search split and answers "" on dev."""
    import copy
    import json

    from nni_effbert.config import TaskConfig
    from nni_effbert.typed_yaml import from_dict

    doc = json.loads(Path(squad_small[0]).read_text())
    arts = doc["data"]
    for i, art in enumerate(arts):  # two questions of the next article, asked of this one's first paragraph
        borrowed = copy.deepcopy(arts[(i + 1) % len(arts)]["paragraphs"][1]["qas"][:2])
        for qa in borrowed:
            qa.update(id=f"{qa['id']}-x{i}", answers=[], is_impossible=True)
        art["paragraphs"][0]["qas"] += borrowed
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(doc))
    task = from_dict(TaskConfig, {"name": "squad_v2", "train_file": str(path), "dev_file": str(path),
                                  "max_seq_length": 96, "doc_stride": 24, "search_rows": 20})
    data = load_qa_task(task, qa_tokenizer, cache_dir=str(tmp_path / "ds"))
    by_ids = {tuple(f["input_ids"]): (f["start_positions"], f["end_positions"])
              for split in ("search", "dev") for f in getattr(data, split)}

    def oracle(batch):
        out = torch.zeros(*batch["input_ids"].shape, 2)
        for b, ids in enumerate(batch["input_ids"].tolist()):
            s, e = by_ids[tuple(ids[:int(batch["attention_mask"][b].sum())])]
            out[b, s, 0] = out[b, e, 1] = 10.0
        return out

    dev = score_span_model(oracle, data, task, batch_size=8, pad_token_id=0, splits=("dev",))["dev"]
    assert dev["NoAns_total"] == 12 and dev["NoAns_exact"] == 1.0 and dev["HasAns_f1"] > 0.9
    # The threshold used on dev is the search split's best one, not dev's own.
    from nni_effbert.data.qa_answers import best_null_threshold, postprocess_predictions, span_logits

    starts, ends = span_logits(oracle, data.search, 8, 0)
    preds, diffs = postprocess_predictions(data.examples["search"], data.search, starts, ends)
    gold = {ex["id"]: list(ex["answers"]["text"]) for ex in data.examples["search"]}
    assert dev["null_threshold"] == best_null_threshold(preds, diffs, gold)[0]
    fixed = score_span_model(oracle, data, task, 8, 0, splits=("dev",), null_threshold=1e9)["dev"]
    assert fixed["NoAns_exact"] < dev["NoAns_exact"] and fixed["null_threshold"] == 1e9  # spans everywhere
