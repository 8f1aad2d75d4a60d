"""Span QA (SQuAD): reading and checking files, run_qa-style windows, the article search split,
post-processing and the official EM / F1 rules on hand-made cases."""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nni_effbert.config import TaskConfig
from nni_effbert.data.metrics import normalize_answer, squad_metrics
from nni_effbert.data.qa_answers import apply_null_threshold, best_null_threshold, postprocess_predictions
from nni_effbert.data.qa import load_qa_task, load_raw_qa, read_squad_file
from nni_effbert.errors import DataError
from nni_effbert.typed_yaml import from_dict




@pytest.fixture(scope="module")
def squad_doc(squad_dir):
    return json.loads((squad_dir / "dev-part-b.json").read_text(encoding="utf-8"))


def _small(doc, articles, paragraphs=3, questions=4):
    """A SQuAD document with the first few paragraphs / questions of some articles."""
    out = {"version": doc.get("version"), "data": []}
    for a in articles:
        art = doc["data"][a]
        paras = [{"context": p["context"], "qas": p["qas"][:questions]} for p in art["paragraphs"][:paragraphs]]
        out["data"].append({"title": art["title"], "paragraphs": paras})
    return out


def _write(tmp_path, name, doc) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


def _cfg(**kw) -> TaskConfig:
    return from_dict(TaskConfig, {"name": "squad", **kw})


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def test_config_defaults_for_qa():
    cfg = _cfg(train_file="a.json", dev_file="b.json")
    assert (cfg.max_seq_length, cfg.doc_stride, cfg.max_answer_length, cfg.n_best_size) == (384, 128, 30, 20)
    assert from_dict(TaskConfig, {"name": "sst2"}).max_seq_length == 128  # classification unchanged
    with pytest.raises(ValueError, match="doc_stride"):
        _cfg(max_seq_length=64, doc_stride=64)


def test_windows_round_trip(tmp_path, squad_doc, qa_tokenizer):
    """Every answerable question's gold tokens map back through the offsets to its answer text,
    including answers that only a second (or later) window of a long context holds."""
    train = _write(tmp_path, "train.json", _small(squad_doc, [0, 1, 2, 3], paragraphs=4, questions=5))
    dev = _write(tmp_path, "dev.json", _small(squad_doc, [5], paragraphs=2, questions=3))
    cfg = _cfg(train_file=train, dev_file=dev, max_seq_length=96, doc_stride=24, search_rows=0)
    qa = load_qa_task(cfg, qa_tokenizer, cache_dir=str(tmp_path / "cache"))
    examples = {ex["id"]: ex for ex in qa.examples["train"]}
    feats = qa.train
    assert len(feats) > len(examples)  # long contexts overflow into several windows
    hits, exact, later_window = Counter(), 0, 0
    seen = Counter()
    for f in feats:
        ex = examples[f["example_id"]]
        window = seen[f["example_id"]]
        seen[f["example_id"]] += 1
        assert len(f["input_ids"]) <= 96
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0  # outside the window: CLS
            continue
        offsets = f["offset_mapping"]
        assert offsets[s] is not None and offsets[e] is not None and s <= e
        span = ex["context"][offsets[s][0]:offsets[e][1]]
        answer = ex["answers"]["text"][0]
        assert answer in span, (span, answer)
        exact += span == answer
        hits[ex["id"]] += 1
        later_window += window > 0
    # Every answer is shorter than the stride, so some window holds it whole.
    assert set(hits) == set(examples)
    assert later_window > 0, "no answer found in a second window: the test data lost its long contexts"
    # Word-piece boundaries match SQuAD answers almost always (a few answers cut inside a word).
    assert exact / sum(hits.values()) > 0.95
    # Question tokens and special tokens have no offsets; context tokens point into the context.
    f = feats[0]
    assert f["offset_mapping"][0] is None and f["token_type_ids"][0] == 0


# ---------------------------------------------------------------------------------------------
# Search split by article
# ---------------------------------------------------------------------------------------------


def test_search_split_holds_out_whole_articles(tmp_path, squad_doc):
    train = _write(tmp_path, "train.json", _small(squad_doc, range(10), paragraphs=2, questions=3))
    dev = _write(tmp_path, "dev.json", _small(squad_doc, [11], paragraphs=1, questions=2))
    splits = {}
    for seed in (0, 1):
        dd, _ = load_raw_qa(_cfg(train_file=train, dev_file=dev, search_rows=12, seed=seed))
        tr, se = dd["train"], dd["search"]
        assert len(se) >= 12 and len(tr) + len(se) == 60
        assert not set(tr["title"]) & set(se["title"])
        assert not set(tr["context"]) & set(se["context"])
        splits[seed] = sorted(set(se["title"]))
    assert splits[0] != splits[1]  # seeded
    again, _ = load_raw_qa(_cfg(train_file=train, dev_file=dev, search_rows=12, seed=0))
    assert sorted(set(again["search"]["title"])) == splits[0]


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the question
# ---------------------------------------------------------------------------------------------


def _one_para_doc():
    return {"data": [{"title": "T", "paragraphs": [{
        "context": "The cat sat on the mat.",
        "qas": [{"id": "q1", "question": "Where did the cat sit?",
                 "answers": [{"text": "on the mat", "answer_start": 12}]}]}]}]}


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("data"), r"not SQuAD-shaped.*'data'"),
    (lambda d: d["data"][0].pop("paragraphs"), r"not SQuAD-shaped.*data\[0\]"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=4),
     r"question q1: answer_start 4 does not match the context"),
    (lambda d: d["data"][0]["paragraphs"][0].update(context="  "), r"question q1: empty context"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(question=""), r"question q1: empty or missing question"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible=True, answers=[]),
     r"question q1: a SQuAD v2.0 question.*squad_v2"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(
        plausible_answers=[{"text": "mat", "answer_start": 19}]), r"question q1: a SQuAD v2.0 question"),
])
def test_bad_files_fail_on_one_line(tmp_path, edit, pattern):
    doc = _one_para_doc()
    edit(doc)
    path = _write(tmp_path, "bad.json", doc)
    with pytest.raises(DataError) as err:
        read_squad_file(path, "squad")
    msg = str(err.value)
    assert "\n" not in msg and path in msg and re.search(pattern, msg), msg
    read_squad_file(_write(tmp_path, "good.json", _one_para_doc()), "squad")  # the unedited file reads


def test_bad_file_fails_through_the_loader(tmp_path):
    doc = _one_para_doc()
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "on a mat"
    bad = _write(tmp_path, "bad.json", doc)
    good = _write(tmp_path, "good.json", _one_para_doc())
    with pytest.raises(DataError, match=r"bad\.json: question q1: answer_start 12"):
        load_raw_qa(_cfg(train_file=good, dev_file=bad))


# ---------------------------------------------------------------------------------------------
# SQuAD v2.0: unanswerable questions built by pairing questions with another article's paragraph
# ---------------------------------------------------------------------------------------------


def _v2_doc(squad_doc):
    doc = copy.deepcopy(_small(squad_doc, [0, 1], paragraphs=1, questions=3))
    a, b = doc["data"]
    borrowed = copy.deepcopy(a["paragraphs"][0]["qas"])
    for qa in borrowed:
        qa.update(id=qa["id"] + "-x", answers=[], is_impossible=True)
    b["paragraphs"][0]["qas"] += borrowed  # article A's questions asked of article B's paragraph
    return doc, [qa["id"] for qa in borrowed]


def test_v2_unanswerable_questions_target_cls(tmp_path, squad_doc, qa_tokenizer):
    doc, impossible = _v2_doc(squad_doc)
    path = _write(tmp_path, "v2.json", doc)
    with pytest.raises(DataError, match="v2.0 question"):
        read_squad_file(path, "squad")
    cols = read_squad_file(path, "squad_v2")
    assert [cols["answers"][cols["id"].index(q)]["text"] for q in impossible] == [[], [], []]
    cfg = from_dict(TaskConfig, {"name": "squad_v2", "train_file": path, "dev_file": path,
                                 "max_seq_length": 96, "doc_stride": 24, "search_rows": 0})
    qa = load_qa_task(cfg, qa_tokenizer, cache_dir=str(tmp_path / "cache"))
    targets = [(f["start_positions"], f["end_positions"]) for f in qa.dev if f["example_id"] in impossible]
    assert targets and set(targets) == {(0, 0)}


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def _oracle_logits(features, noise=0.0, seed=0):
    """Logits that peak at each feature's gold positions (at CLS where the window has no answer)."""
    rng = np.random.default_rng(seed)
    starts, ends = [], []
    for f in features:
        n = len(f["input_ids"])
        s, e = rng.normal(0, noise, n), rng.normal(0, noise, n)
        s[f["start_positions"]] += 10.0
        e[f["end_positions"]] += 10.0
        starts.append(s)
        ends.append(e)
    return starts, ends


def test_postprocess_recovers_gold_answers(tmp_path, squad_doc, qa_tokenizer):
    train = _write(tmp_path, "t.json", _small(squad_doc, [0], paragraphs=1, questions=1))
    dev = _write(tmp_path, "d.json", _small(squad_doc, [2, 3], paragraphs=3, questions=4))
    cfg = _cfg(train_file=train, dev_file=dev, max_seq_length=96, doc_stride=24, search_rows=0)
    qa = load_qa_task(cfg, qa_tokenizer, cache_dir=str(tmp_path / "cache"))
    starts, ends = _oracle_logits(qa.dev)
    preds, diffs = postprocess_predictions(qa.examples["dev"], qa.dev, starts, ends, n_best_size=5,
                                           max_answer_length=30)
    assert set(preds) == set(qa.examples["dev"]["id"])
    scores = squad_metrics(preds, {ex["id"]: ex["answers"]["text"] for ex in qa.examples["dev"]})
    assert scores["exact"] > 0.9 and scores["f1"] > 0.95
    # max_answer_length cuts spans: with 1 token, multi-token answers cannot be predicted whole.
    short, _ = postprocess_predictions(qa.examples["dev"], qa.dev, starts, ends, max_answer_length=1)
    assert squad_metrics(short, {ex["id"]: ex["answers"]["text"] for ex in qa.examples["dev"]})["exact"] < scores["exact"]
    # Where a window holds the answer in at most max_answer_length tokens, its span beats the
    # null score: negative diff (a longer gold span cannot be predicted, see SQuAD's V&A question).
    fits = {f["example_id"] for f in qa.dev if f["start_positions"] > 0 and f["end_positions"] - f["start_positions"] < 30}
    assert fits and all(diffs[q] < 0 for q in fits)


def test_null_threshold_by_hand():
    preds = {"a": "paris", "b": "london", "c": "rome", "d": "oslo"}
    diffs = {"a": -5.0, "b": -1.0, "c": 2.0, "d": 4.0}
    gold = {"a": ["Paris"], "b": [], "c": ["Rome"], "d": []}
    # Thresholds: below -5 all "" -> F1 (0+1+0+1)/4 = .5; t=-5 -> a answered 0.75; t=-1 -> b wrong 0.5;
    # t=2 -> c right 0.75; t=4 -> d wrong 0.5. Ties keep the first (lowest) threshold.
    thresh, f1 = best_null_threshold(preds, diffs, gold)
    assert thresh == -5.0 and f1 == pytest.approx(0.75)
    answered = apply_null_threshold(preds, diffs, thresh)
    assert answered == {"a": "paris", "b": "", "c": "", "d": ""}
    assert squad_metrics(answered, gold, "squad_v2")["f1"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# Metrics: the official scripts' rules
# ---------------------------------------------------------------------------------------------


def test_normalization_follows_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theory") == "theory"  # articles are whole words only
    assert normalize_answer("U.S.") == "us"


def test_em_f1_by_hand():
    gold = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Santa Clara, California"],
            "q3": ["gold", "golden anniversary"]}
    preds = {"q1": "the Denver broncos.", "q2": "Santa Clara", "q3": "a golden age"}
    out = squad_metrics(preds, gold)
    # q1 exact after normalization; q2 P=2/2 R=2/3 -> F1 0.8; q3: best gold "golden anniversary":
    # pred "golden age" P=1/2 R=1/2 -> 0.5 (against "gold": 0).
    assert out["exact"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx((1 + 0.8 + 0.5) / 3)
    assert out["default"] == out["f1"] and out["total"] == 3
    with pytest.raises(ValueError, match="no prediction"):
        squad_metrics({"q1": "x"}, gold)


def test_v2_no_answer_rules():
    gold = {"h1": ["Paris"], "n1": [], "n2": [], "n3": ["the"]}  # "the" normalizes to nothing: no answer
    preds = {"h1": "Paris", "n1": "", "n2": "something", "n3": ""}
    out = squad_metrics(preds, gold, "squad_v2")
    assert out["HasAns_total"] == 1 and out["NoAns_total"] == 3
    assert out["HasAns_exact"] == 1.0 and out["HasAns_f1"] == 1.0
    assert out["NoAns_exact"] == pytest.approx(2 / 3) and out["NoAns_f1"] == pytest.approx(2 / 3)
    assert out["exact"] == pytest.approx(3 / 4) and out["f1"] == pytest.approx(3 / 4)
    # v1.1 keeps "the" as a gold answer: EM of "" is 1 (both normalize to ""), F1 is 0 (no common token).
    v1 = squad_metrics({"q": ""}, {"q": ["the"]}, "squad")
    assert v1["exact"] == 1.0 and v1["f1"] == 0.0


def test_snapshot_is_read_instead_of_the_files(tmp_path, squad_doc, qa_tokenizer, monkeypatch):
    """Trials load the windows a first process saved; an edited file gives a new snapshot."""
    from nni_effbert.data import qa as qa_mod

    train = _write(tmp_path, "train.json", _small(squad_doc, [0, 1, 2], paragraphs=2, questions=3))
    dev = _write(tmp_path, "dev.json", _small(squad_doc, [4], paragraphs=1, questions=3))
    cfg = _cfg(train_file=train, dev_file=dev, max_seq_length=96, doc_stride=24, search_rows=5)
    first = load_qa_task(cfg, qa_tokenizer, store_dir=tmp_path / "tasks")
    assert len(list((tmp_path / "tasks").glob("qa-*"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the snapshot should have been used")

    monkeypatch.setattr(qa_mod, "read_squad_file", no_reading)
    again = load_qa_task(cfg, qa_tokenizer, store_dir=tmp_path / "tasks")
    assert again.fingerprint == first.fingerprint
    assert again.train[:] == first.train[:] and again.examples["search"][:] == first.examples["search"][:]
    monkeypatch.undo()
    _write(tmp_path, "train.json", _small(squad_doc, [0, 1], paragraphs=2, questions=3))
    changed = load_qa_task(cfg, qa_tokenizer, store_dir=tmp_path / "tasks")
    assert changed.fingerprint != first.fingerprint and len(list((tmp_path / "tasks").glob("qa-*"))) == 2


def test_data_dir_with_official_file_names(tmp_path, squad_doc):
    folder = tmp_path / "squad_root"
    (folder / "squad").mkdir(parents=True)
    _write(folder / "squad", "train-v1.1.json", _small(squad_doc, [0, 1], paragraphs=1, questions=2))
    _write(folder / "squad", "dev-v1.1.json", _small(squad_doc, [2], paragraphs=1, questions=2))
    dd, spec = load_raw_qa(_cfg(data_dir=str(folder), search_rows=0))
    assert spec.name == "squad" and len(dd["train"]) == 4 and len(dd["dev"]) == 2
    with pytest.raises(DataError, match=r"no train-v2.0.json and dev-v2.0.json in .*squad_root"):
        load_raw_qa(from_dict(TaskConfig, {"name": "squad_v2", "data_dir": str(folder)}))
    with pytest.raises(ValueError, match="metric are not used"):
        _cfg(data_dir=str(folder), metric="accuracy")
