"""Tests of task specs and data loading (nni_effbert.data.tasks, nni_effbert.data.loading)."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from nni_effbert.data import batches as B
from nni_effbert.data import corpus as C
from nni_effbert.data import loading as D
from nni_effbert.config import DATA_DIR_ENV, ExperimentConfig, TaskConfig
from nni_effbert.errors import ConfigError, DataError
from nni_effbert.data.tasks import GLUE_TASKS, METRICS, canonical_task_name, get_task_spec

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- task specs ------------------------------------------------------------------------------


def test_task_specs_consistent():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    for spec in GLUE_TASKS.values():
        assert spec.metric in METRICS
        assert len(spec.tsv_text_columns) == len(spec.text_columns) in (1, 2)
        if spec.is_regression:
            assert spec.num_labels == 1 and spec.label_list is None
        else:
            assert spec.num_labels == len(spec.label_list)
    assert get_task_spec("mnli").tsv_splits["dev"] == "dev_matched"
    assert get_task_spec("mnli").hub_splits["dev"] == "validation_matched"
    assert [canonical_task_name(n) for n in ("SST-2", "sts-b", "CoLA", "rte", "Custom")] == [
        "sst2", "stsb", "cola", "rte", "custom"]
    with pytest.raises(ConfigError, match="unknown task 'imdb'.*cola, sst2"):
        canonical_task_name("imdb")
    with pytest.raises(ConfigError, match="unknown task"):
        TaskConfig(search_rows=0, name="imdb")


# --- shared GLUE data ------------------------------------------------------------------------


def test_sst2_from_glue_root_and_task_folder(glue_dir, cache_dir):
    dd, spec = D.load_raw_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(glue_dir), max_train_rows=300), cache_dir)
    assert spec.name == "sst2" and not spec.is_pair and spec.num_labels == 2
    assert len(dd["train"]) == 300 and len(dd["dev"]) == 872
    assert dd["train"].column_names == ["sentence", "label"]
    assert set(dd["dev"]["label"]) == {0, 1}
    first = (glue_dir / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")
    assert dd["dev"][0] == {"sentence": first[0], "label": int(first[1])}
    dd2, _ = D.load_raw_task(TaskConfig(search_rows=0, name="SST-2", data_dir=str(glue_dir / "SST-2"), max_train_rows=300), cache_dir)
    assert dd2["train"]["sentence"] == dd["train"]["sentence"]


def test_rte_string_labels_and_pairs(glue_dir, cache_dir):
    dd, spec = D.load_raw_task(TaskConfig(search_rows=0, name="rte", data_dir=str(glue_dir)), cache_dir)
    assert spec.is_pair and spec.label_list == ["entailment", "not_entailment"]
    lines = (glue_dir / "RTE" / "train.tsv").read_text(encoding="utf-8").splitlines()
    assert len(dd["train"]) == len(lines) - 1
    _, s1, s2, label = lines[1].split("\t")
    assert dd["train"][0] == {"sentence1": s1, "sentence2": s2, "label": spec.label_list.index(label)}
    assert set(dd["train"]["label"]) == {0, 1}


def test_fractions_are_seeded(glue_dir, cache_dir):
    def rows(**kw):
        dd, _ = D.load_raw_task(TaskConfig(search_rows=0, name="rte", data_dir=str(glue_dir), **kw), cache_dir)
        return dd["train"]["sentence1"], dd["dev"]["sentence1"]

    full_train, full_dev = rows()
    a = rows(train_fraction=0.1, dev_fraction=0.5, seed=1)
    assert a == rows(train_fraction=0.1, dev_fraction=0.5, seed=1)
    assert len(a[0]) == round(0.1 * len(full_train)) and len(a[1]) == round(0.5 * len(full_dev))
    assert a[0] != rows(train_fraction=0.1, seed=2)[0]
    bigger = rows(train_fraction=0.2, seed=1)[0]
    assert set(a[0]) <= set(bigger)  # a larger fraction extends a smaller one
    assert len(rows(train_fraction=0.5, max_train_rows=7, seed=1)[0]) == 7


def test_subset_keeps_file_order():
    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    kept = D.seeded_subset(ds, 0.3, None, seed=5)["i"]
    assert len(kept) == 30 and kept == sorted(kept) and kept != list(range(30))
    assert D.seeded_subset(ds, 1.0, 10, seed=5)["i"] == D.seeded_subset(ds, 0.5, 10, seed=5)["i"]


def test_load_task_tokenizes_and_fingerprints(glue_dir, cache_dir, tiny_tokenizer):
    cfg = TaskConfig(search_rows=0, name="rte", data_dir=str(glue_dir), max_seq_length=24, max_train_rows=40, max_dev_rows=10, seed=0)
    td = D.load_task(cfg, tiny_tokenizer, cache_dir)
    assert td.train.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels", "idx"]
    assert td.train["idx"] == list(range(40)) and len(td.dev) == 10
    assert max(len(x) for x in td.train["input_ids"]) == 24  # truncated
    row = td.train[0]
    assert row["input_ids"][0] == tiny_tokenizer.cls_token_id and tiny_tokenizer.pad_token_id not in row["input_ids"]
    assert set(row["token_type_ids"]) == {0, 1}  # a sentence pair
    raw, _ = D.load_raw_task(cfg, cache_dir)
    assert td.train["labels"] == raw["train"]["label"]

    again = D.load_task(cfg, tiny_tokenizer, cache_dir)
    assert again.fingerprint == td.fingerprint and again.train._fingerprint == td.train._fingerprint
    changed = {
        D.load_task(TaskConfig(**{**cfg.__dict__, **kw}), tiny_tokenizer, cache_dir).fingerprint
        for kw in ({"max_seq_length": 32}, {"seed": 1}, {"max_train_rows": 41}, {"dev_fraction": 0.5})
    }
    assert td.fingerprint not in changed and len(changed) == 4


def test_fingerprint_follows_tokenizer(tiny_vocab_file, tiny_tokenizer):
    from transformers import BertTokenizer

    same = BertTokenizer(vocab=str(tiny_vocab_file), do_lower_case=True)
    cased = BertTokenizer(vocab=str(tiny_vocab_file), do_lower_case=False)
    tiny_tokenizer("warm up the backend", truncation=True, max_length=4)  # leaves call state behind
    assert D.tokenizer_fingerprint(same) == D.tokenizer_fingerprint(tiny_tokenizer)
    assert D.tokenizer_fingerprint(cased) != D.tokenizer_fingerprint(tiny_tokenizer)


# --- other GLUE layouts, custom tasks and bad input --------------------------------------------


def test_headerless_cola_and_mnli_dev_matched(tmp_path, cache_dir):
    write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tBill whistled ran.\n")
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tThey drank the pub.\n")
    dd, spec = D.load_raw_task(TaskConfig(search_rows=0, name="cola", data_dir=str(tmp_path)), cache_dir)
    assert spec.metric == "matthews" and dd["train"]["label"] == [1, 0]
    assert dd["train"]["sentence"][1] == "Bill whistled ran."

    head = "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    write(tmp_path / "MNLI" / "train.tsv", head + "0\tx\tA man.\tA person.\tentailment\tentailment\n"
          "1\tx\tA dog.\tA cat.\tcontradiction\tcontradiction\n")
    write(tmp_path / "MNLI" / "dev_matched.tsv",
          "index\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label\n0\tx\tIt rains.\tIt is wet.\tneutral\tneutral\tneutral\n")
    dd, spec = D.load_raw_task(TaskConfig(search_rows=0, name="mnli", data_dir=str(tmp_path)), cache_dir)
    assert dd["train"].column_names == ["premise", "hypothesis", "label"]
    assert dd["train"]["label"] == [0, 2] and dd["dev"]["label"] == [1]


def test_custom_csv_tsv_jsonl_json(tmp_path, cache_dir):
    csv_train = write(tmp_path / "train.csv", 'text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    csv_dev = write(tmp_path / "dev.csv", "text,label\nawful,neg\n")
    cfg = TaskConfig(search_rows=0, name="custom", train_file=csv_train, dev_file=csv_dev, text_columns=["text"])
    dd, spec = D.load_raw_task(cfg, cache_dir)
    assert spec.label_list == ["neg", "pos"] and spec.metric == "accuracy"
    assert dd["train"]["text"] == ["good, really", "bad", "fine"] and dd["train"]["label"] == [1, 0, 1]

    tsv_train = write(tmp_path / "t.tsv", 'q\tp\ty\nsay "hi"\thello\t0.5\nno\tyes\t4\n')
    tsv_dev = write(tmp_path / "d.tsv", "q\tp\ty\na\tb\t1\n")
    cfg = TaskConfig(search_rows=0, name="custom", train_file=tsv_train, dev_file=tsv_dev, text_columns=["q", "p"],
                     label_column="y", regression=True)
    dd, spec = D.load_raw_task(cfg, cache_dir)
    assert spec.is_regression and spec.num_labels == 1 and spec.metric == "pearson_spearman"
    assert dd["train"]["q"][0] == 'say "hi"' and dd["train"]["label"] == [0.5, 4.0]

    rows = [{"a": "x y", "b": "z", "lab": 10}, {"a": "u", "b": "v", "lab": 2}, {"a": "w", "b": "q", "lab": 2}]
    jl = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    js = write(tmp_path / "dev.json", json.dumps(rows[:2]))
    for dev in (write(tmp_path / "dev.jsonl", json.dumps(rows[0]) + "\n"),):
        cfg = TaskConfig(search_rows=0, name="custom", train_file=jl, dev_file=dev, text_columns=["a", "b"],
                         label_column="lab", metric="f1")
        dd, spec = D.load_raw_task(cfg, cache_dir)
        assert spec.label_list == ["2", "10"] and spec.metric == "f1"  # numeric labels sort numerically
        assert dd["train"]["label"] == [1, 0, 0] and dd["dev"]["label"] == [1]
    with pytest.raises(DataError, match="same format"):
        D.load_raw_task(TaskConfig(search_rows=0, name="custom", train_file=jl, dev_file=csv_dev, text_columns=["a"]), cache_dir)
    js_train = write(tmp_path / "train.json", json.dumps(rows))
    dd, _ = D.load_raw_task(TaskConfig(search_rows=0, name="custom", train_file=js_train, dev_file=js, text_columns=["a"],
                                       label_column="lab"), cache_dir)
    assert dd["dev"]["a"] == ["x y", "u"]


@pytest.mark.parametrize(
    "train, dev, words",
    [
        ("", "sentence\tlabel\nok\t1\n", r"train\.tsv: file is empty"),
        ("sentence\tlabel\n", "sentence\tlabel\nok\t1\n", r"train\.tsv: file has no data rows"),
        ("text\tlabel\nhi\t1\n", "sentence\tlabel\nok\t1\n", r"train\.tsv: missing column\(s\) 'sentence'; the file has: 'text', 'label'"),
        ("sentence\tlabel\nhi\t1\nshort\n", "sentence\tlabel\nok\t1\n", r"train\.tsv:3: ragged row with 1 fields, expected 2"),
        ("sentence\tlabel\nhi\t1\n", "sentence\tlabel\nok\t1\tx\n", r"dev\.tsv:2: ragged row with 3 fields"),
        ("sentence\tlabel\nhi\t1\nyo\t2\n", "sentence\tlabel\nok\t1\n", r"train\.tsv:3: label '2' is not in the task's label set \(negative, positive\)"),
        ("sentence\tlabel\nhi\tpositive\nyo\tmeh\n", "sentence\tlabel\nok\t1\n", r"train\.tsv:3: label 'meh'"),
    ],
)
def test_bad_glue_files(tmp_path, cache_dir, train, dev, words):
    write(tmp_path / "SST-2" / "train.tsv", train)
    write(tmp_path / "SST-2" / "dev.tsv", dev)
    with pytest.raises(DataError, match=words):
        D.load_raw_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(tmp_path)), cache_dir)


def test_bad_custom_files_and_folders(tmp_path, cache_dir):
    good = write(tmp_path / "dev.csv", "text,label\nok,a\n")
    cases = [
        (write(tmp_path / "a.csv", "text,label\nfine,a\n"), "text,label\nok,b\n",
         r"dev_a\.csv:2: label 'b' is not in the task's label set \(a\)"),
        (write(tmp_path / "b.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n'), None,
         r"b\.jsonl: missing|b\.jsonl:2: record has no value for column 'label'"),
        (write(tmp_path / "c.jsonl", '{"text": "x", "label": "a"}\n{oops\n'), None, r"c\.jsonl:2: invalid JSON"),
        (write(tmp_path / "d.csv", "text,label\n1,a\n2,a,3\n"), "text,label\nok,a\n", r"d\.csv:3: ragged row"),
        (write(tmp_path / "e.txt", "x"), "text,label\nok,a\n", "unknown file type"),
    ]
    for train, dev_text, words in cases:
        suffix = Path(train).suffix if Path(train).suffix != ".txt" else ".csv"
        dev = write(tmp_path / f"dev_{Path(train).stem}{suffix}", dev_text) if dev_text else good
        if suffix == ".jsonl" and dev_text is None:
            dev = write(tmp_path / "dev_ok.jsonl", '{"text": "x", "label": "a"}\n')
        with pytest.raises(DataError, match=words):
            D.load_raw_task(TaskConfig(search_rows=0, name="custom", train_file=train, dev_file=dev, text_columns=["text"]), cache_dir)
    regression = TaskConfig(search_rows=0, name="custom", train_file=write(tmp_path / "r.csv", "text,label\nx,1.5\ny,high\n"),
                            dev_file=good, text_columns=["text"], regression=True)
    with pytest.raises(DataError, match=r"r\.csv:3: label 'high' is not in the task's label set \(a number\)"):
        D.load_raw_task(regression, cache_dir)
    with pytest.raises(DataError, match=r"no RTE/train\.tsv under .*Found: .*dev\.csv"):
        D.load_raw_task(TaskConfig(search_rows=0, name="rte", data_dir=str(tmp_path)), cache_dir)


def test_hub_failure_says_how_to_pass_local_data(monkeypatch, cache_dir):
    def offline(path, *args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(D.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=rf"--data-dir.*task\.data_dir.*\${DATA_DIR_ENV}.*SST-2/train\.tsv"):
        D.load_raw_task(TaskConfig(search_rows=0, name="sst2"), cache_dir)


def test_env_data_dir_used_by_loader(monkeypatch, glue_dir, cache_dir):
    monkeypatch.setenv(DATA_DIR_ENV, str(glue_dir))
    dd, spec = D.load_raw_task(TaskConfig(search_rows=0, name="rte", max_train_rows=5), cache_dir)
    assert spec.name == "rte" and len(dd["train"]) == 5


# --- batching and unlabeled text -------------------------------------------------------------


def test_collate_pads_and_types():
    feats = [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "attention_mask": [1, 1, 1], "labels": 1, "idx": 4},
        {"input_ids": [5], "token_type_ids": [0], "attention_mask": [1], "labels": 0, "idx": 9},
    ]
    batch = B.collate(feats, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["idx"].tolist() == [4, 9]
    reg = B.collate({"input_ids": [[1], [1, 2]], "labels": [0.5, 2.0]}, pad_token_id=0)
    assert reg["labels"].dtype == torch.float32 and reg["token_type_ids"].tolist() == [[0, 0], [0, 0]]
    assert reg["attention_mask"].tolist() == [[1, 0], [1, 1]]


def test_make_loader_seeded(glue_dir, cache_dir, tiny_tokenizer):
    td = D.load_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(glue_dir), max_train_rows=50, max_seq_length=16),
                     tiny_tokenizer, cache_dir)
    order = lambda seed: torch.cat([b["idx"] for b in B.make_loader(td.train, 8, True, seed, 0)]).tolist()
    assert order(3) == order(3) != order(4) and sorted(order(3)) == list(range(50))
    batches = list(B.make_loader(td.dev, 16, False, 0, tiny_tokenizer.pad_token_id))
    assert torch.cat([b["idx"] for b in batches]).tolist() == list(range(len(td.dev)))
    assert len({len(x) for x in td.dev["input_ids"]}) > 1  # stored unpadded
    b = batches[0]
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 16
    assert (b["input_ids"][b["attention_mask"] == 0] == tiny_tokenizer.pad_token_id).all()


def test_unlabeled_texts(tmp_path, glue_dir, cache_dir, tiny_tokenizer):
    corpus = write(tmp_path / "corpus.txt", "the film is good\n\n   \nit is not a film\n")
    cfg = ExperimentConfig(workdir=str(tmp_path))
    cfg.warmup.corpus_file = corpus
    cfg.warmup.max_seq_length = 5
    ds = C.unlabeled_texts(cfg, tiny_tokenizer, cache_dir)
    assert len(ds) == 2 and ds.column_names == ["input_ids", "token_type_ids", "attention_mask", "idx"]
    assert max(len(x) for x in ds["input_ids"]) == 5
    assert C.unlabeled_texts(cfg, tiny_tokenizer, cache_dir)._fingerprint == ds._fingerprint
    cfg.warmup.corpus_file = write(tmp_path / "empty.txt", "\n \n")
    with pytest.raises(DataError, match="corpus file is empty"):
        C.unlabeled_texts(cfg, tiny_tokenizer, cache_dir)

    cfg = ExperimentConfig(workdir=str(tmp_path))
    cfg.task = TaskConfig(search_rows=0, name="rte", data_dir=str(glue_dir), max_train_rows=12, max_seq_length=20)
    ds = C.unlabeled_texts(cfg, tiny_tokenizer, cache_dir)
    assert len(ds) == 12 and "labels" not in ds.column_names
    assert all(1 in t for t in ds["token_type_ids"])  # pairs stay pairs


def test_search_split_carved_from_train(glue_dir, cache_dir, tiny_tokenizer, tmp_path):
    """task.search_rows rows leave train for the held-out search split (GLUE and custom files)."""
    cfg = TaskConfig(name="sst2", data_dir=str(glue_dir), max_train_rows=40, max_dev_rows=8, max_seq_length=16,
                     search_rows=10)
    full = list(D.load_raw_task(TaskConfig(**{**cfg.__dict__, "search_rows": 0}), cache_dir)[0]["train"]["sentence"])
    dd, _ = D.load_raw_task(cfg, cache_dir)
    assert len(dd["train"]) == 30 and len(dd["search"]) == 10
    assert sorted(list(dd["train"]["sentence"]) + list(dd["search"]["sentence"])) == sorted(full)
    td = D.load_task(cfg, tiny_tokenizer, cache_dir)
    assert sorted(list(td.train["idx"]) + list(td.search["idx"])) == list(range(40))  # positions in the train subset
    assert [full[i] for i in td.search["idx"]] == list(dd["search"]["sentence"])
    assert td.fingerprint != D.load_task(TaskConfig(**{**cfg.__dict__, "search_rows": 11}), tiny_tokenizer,
                                         cache_dir).fingerprint
    rows = "text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(8))
    train = write(tmp_path / "train.csv", rows)
    dev = write(tmp_path / "dev.csv", "text,label\nawful,neg\n")
    custom, _ = D.load_raw_task(TaskConfig(name="custom", train_file=train, dev_file=dev, text_columns=["text"],
                                           search_fraction=0.25, search_rows=None), cache_dir)
    assert len(custom["search"]) == 2 and len(custom["train"]) == 6
    assert not set(custom["search"]["text"]) & set(custom["train"]["text"])
    empty = D.load_task(TaskConfig(**{**cfg.__dict__, "search_rows": 0}), tiny_tokenizer, cache_dir)
    assert len(empty.search) == 0 and len(empty.train) == 40
