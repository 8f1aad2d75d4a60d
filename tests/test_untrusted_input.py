"""Bad or hostile input that used to crash or lie (issue 23, items 10-16): one-class tasks, label
spellings, non-UTF-8 / binary files, symlinked export names, huge fields, YAML alias bombs,
corrupt or code-carrying checkpoints, NNI's resume checkpoint, non-finite config numbers.

Each test fails on the code before its fix (the fix named in its docstring).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import typing
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from nni_effbert import io
from nni_effbert.config import DATA_DIR_ENV, ExperimentConfig, TaskConfig, load_config
from nni_effbert.data import corpus as C
from nni_effbert.data import files as F
from nni_effbert.data import loading as D
from nni_effbert.errors import CheckpointError, ConfigError, DataError, one_line
from nni_effbert.workdir import WorkDir

datasets.disable_progress_bars()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def write(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def custom(train: str, dev: str, **kw) -> TaskConfig:
    return TaskConfig(search_rows=0, name="custom", train_file=train, dev_file=dev,
                      text_columns=kw.pop("text_columns", ["text"]), **kw)


def tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# --- 10: a classification task needs two classes ---------------------------------------------


@pytest.mark.parametrize("suffix, train", [
    (".tsv", "text\tlabel\ngood\tpos\nfine\tpos\n"),
    (".csv", "text,label\ngood,1\nfine,1.0\n"),  # one class, two spellings
    (".jsonl", '{"text": "good", "label": 1}\n{"text": "fine", "label": 1.0}\n'),
])
def test_one_class_custom_task_is_refused(tmp_path, suffix, train):
    """Fix: ``_load_files`` counts the train file's classes (was: accepted, dev accuracy 1.0000)."""
    dev_text = {".tsv": "text\tlabel\nok\tpos\n", ".csv": "text,label\nok,1\n", ".jsonl": '{"text": "ok", "label": 1}\n'}
    tr = write(tmp_path / f"train{suffix}", train)
    dv = write(tmp_path / f"dev{suffix}", dev_text[suffix])
    with pytest.raises(DataError, match=rf"train{re.escape(suffix)}: every row of column 'label' has the same "
                                        r"class \('(pos|1)'\); .*at least 2 classes") as err:
        D.load_raw_task(custom(tr, dv), str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    assert tree(tmp_path / "cache") == set()  # refused before anything was cached


def test_one_class_glue_train_file_is_refused(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nfine\t1\n")
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nok\t1\nbad\t0\n")
    with pytest.raises(DataError, match=r"SST-2/train\.tsv: every row of column 'label' has the same class \('positive'\)"):
        D.load_raw_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(tmp_path)), str(tmp_path / "cache"))


# --- 11: one label rule for every format -------------------------------------------------------


def test_label_key_rule():
    """Fix: ``label_key`` (was ``_label_key``: text ``1.0`` stayed ``1.0`` while JSON 1.0 became ``1``)."""
    for same in ("1", "1.0", " 1 ", "+1", "01", "1e0", "1.", 1, 1.0):
        assert F.label_key(same) == "1", same
    assert F.label_key("0.50") == F.label_key(0.5) == "0.5"
    assert F.label_key("-0") == F.label_key(-0.0) == "0"
    assert F.label_key("12345678901234567890") == "12345678901234567890"  # no float rounding
    assert F.label_key("Pos") != F.label_key("pos")  # text labels compare exactly
    assert F.label_key("1_000") == "1_000" and F.label_key("nan") == "nan" and F.label_key("0x1") == "0x1"
    assert F.label_key(True) == "true"


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".json", ".jsonl"])
def test_numeric_label_spellings_are_one_class_in_every_format(tmp_path, suffix):
    rows = [("a", "1"), ("b", "1.0"), ("c", "0"), ("d", "0.0")]
    if suffix == ".tsv":
        text = "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
    elif suffix == ".csv":
        text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)
    else:  # JSON: numbers and strings mixed, as files in the wild have them
        recs = [{"text": "a", "label": "1"}, {"text": "b", "label": "1.0"}, {"text": "c", "label": "0"},
                {"text": "d", "label": "0.0"}]
        text = json.dumps(recs) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in recs)
    tr = write(tmp_path / f"train{suffix}", text)
    dv = write(tmp_path / f"dev{suffix}", text)
    dd, spec = D.load_raw_task(custom(tr, dv), str(tmp_path / "cache"))
    assert spec.label_list == ["0", "1"]
    assert dd["train"]["label"] == [1, 1, 0, 0] and dd["dev"]["label"] == [1, 1, 0, 0]


def test_json_numbers_and_text_labels_agree(tmp_path):
    tr = write(tmp_path / "train.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n')
    dv = write(tmp_path / "dev.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.0}\n')
    dd, spec = D.load_raw_task(custom(tr, dv), str(tmp_path / "cache"))
    assert spec.label_list == ["0", "1"] and dd["dev"]["label"] == [1, 0]


def test_glue_layout_reads_float_spelled_ids(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1.0\nbad\t0\n")
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nok\t1\nno\t0.0\n")
    dd, _ = D.load_raw_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(tmp_path)), str(tmp_path / "cache"))
    assert dd["train"]["label"] == [1, 0] and dd["dev"]["label"] == [1, 0]


# --- 12: non-UTF-8 / binary files, symlinked export names --------------------------------------


@pytest.mark.parametrize("suffix, content, words", [
    (".tsv", b"text\tlabel\ngood\t1\ncaf\xe9 au lait\t0\n", r"train\.tsv:3: not UTF-8 text \(byte 0xe9\)"),
    (".csv", b"text,label\ngood,1\n\x89PNG\r\n\x1a\n\x00\x00,0\n", r"train\.csv:5: binary data \(a NUL byte\)"),
    (".jsonl", b'{"text": "good", "label": 1}\n{"text": "\xff\xfe", "label": 0}\n', r"train\.jsonl:2: not UTF-8"),
    (".json", b'[{"text": "good", "label": 1},\n {"text": "\xc3(", "label": 0}]', r"train\.json:2: not UTF-8"),
])
def test_non_utf8_and_binary_task_files_name_file_and_line(tmp_path, suffix, content, words):
    """Fix: ``scan_text_file`` before reading (was: a UnicodeDecodeError traceback)."""
    dev = {".tsv": "text\tlabel\nok\t1\nno\t0\n", ".csv": "text,label\nok,1\nno,0\n",
           ".jsonl": '{"text": "ok", "label": 1}\n', ".json": '[{"text": "ok", "label": 1}]'}[suffix]
    tr = write(tmp_path / f"train{suffix}", content)
    dv = write(tmp_path / f"dev{suffix}", dev)
    with pytest.raises(DataError, match=words) as err:
        D.load_raw_task(custom(tr, dv), str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


def test_non_utf8_glue_dev_file(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    write(tmp_path / "SST-2" / "dev.tsv", b"sentence\tlabel\nok\t1\nna\xefve\t0\n")
    with pytest.raises(DataError, match=r"SST-2/dev\.tsv:3: not UTF-8 text"):
        D.load_raw_task(TaskConfig(search_rows=0, name="sst2", data_dir=str(tmp_path)), str(tmp_path / "cache"))


def test_corpus_file_checked_past_its_first_64k(tmp_path):
    """Fix: the whole corpus file is scanned (was: only its first 64 KiB)."""
    body = b"a plain sentence .\n" * 5000  # ~95 KiB
    path = write(tmp_path / "corpus.txt", body + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"warmup\.corpus_file: .*corpus\.txt:5001: not UTF-8 text"):
        C.check_corpus_file(path)


def test_symlinked_export_name_is_a_one_line_error(tmp_path):
    """Fix: ``WorkDir.export_dir`` (was: FileExistsError from atomic_replace_dir after the export was built)."""
    wd = WorkDir.of(tmp_path / "work")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    wd.exports_dir.mkdir(parents=True)
    os.symlink(elsewhere, wd.exports_dir / "linked")
    with pytest.raises(ConfigError, match=r"exports/linked is a symbolic link .*remove the link or choose another name") as err:
        wd.export_dir("linked")
    assert "\n" not in str(err.value)
    (wd.exports_dir / "plain").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not an export folder"):
        wd.export_dir("plain")
    assert wd.export_dir("fresh") == wd.exports_dir / "fresh"
    assert (elsewhere / "keep.txt").read_text() == "mine"


# --- 13: memory blow-ups ----------------------------------------------------------------------


def test_overlong_field_refused_with_file_and_row_before_caching(tmp_path, monkeypatch):
    """Fix: ``MAX_FIELD_CHARS`` checked per field (was: the tokenizer aborted on a 200 MB field,
    leaving the builder's copies in the cache)."""
    monkeypatch.setattr(F, "MAX_FIELD_CHARS", 50)
    tr = write(tmp_path / "train.tsv", "text\tlabel\ngood\t1\n" + "x" * 60 + "\t0\n")
    dv = write(tmp_path / "dev.tsv", "text\tlabel\nok\t1\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train\.tsv:3: column 'text' holds 60 characters, above the limit of 50 "
                                        r"per field \(nni_effbert\.data\.files\.MAX_FIELD_CHARS\)"):
        D.load_raw_task(custom(tr, dv), str(cache))
    assert tree(cache) == set()
    # a label field is held to the limit too, and the message stays short
    tr = write(tmp_path / "train2.tsv", "text\tlabel\ngood\t1\nbad\t" + "y" * 5000 + "\n")
    with pytest.raises(DataError, match=r"train2\.tsv:3: column 'label' holds 5,000 characters") as err:
        D.load_raw_task(custom(tr, dv), str(cache))
    assert len(str(err.value)) < 300


def test_overlong_corpus_line_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "MAX_FIELD_CHARS", 50)
    path = write(tmp_path / "corpus.txt", "short line .\n" + "z" * 51 + "\nend .\n")
    with pytest.raises(DataError, match=r"distill\.corpus_file: .*corpus\.txt:2: line longer than 50 characters"):
        C.check_corpus_file(path, "distill.corpus_file")
    write(tmp_path / "ok.txt", "short line .\n" + "z" * 50 + "\n")
    C.check_corpus_file(str(tmp_path / "ok.txt"))


def test_failed_load_removes_only_its_own_partial_cache(tmp_path, monkeypatch, tiny_tokenizer):
    """Fix: ``_drop_new_cache_on_failure`` (was: the builder's and the label map's caches of the
    failed load stayed in ``<workdir>/datasets``)."""
    cache = tmp_path / "datasets"
    rows = "".join(f"sentence {i} is {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(40))
    ok = custom(write(tmp_path / "a" / "train.tsv", "text\tlabel\n" + rows),
                write(tmp_path / "a" / "dev.tsv", "text\tlabel\nfine\t1\nawful\t0\n"))
    D.load_task(ok, tiny_tokenizer, cache_dir=str(cache))
    before = tree(cache)
    assert any(name.endswith(".arrow") for name in before)  # an earlier run's cache

    def exhausted(*args, **kwargs):
        raise MemoryError("tokenizer ran out of memory")

    monkeypatch.setattr(D, "_tokenize", exhausted)
    other = custom(write(tmp_path / "b" / "train.tsv", "text\tlabel\n" + rows + "one more\t1\n"),
                   write(tmp_path / "b" / "dev.tsv", "text\tlabel\nfine\t1\nawful\t0\n"))
    with pytest.raises(MemoryError):
        D.load_task(other, tiny_tokenizer, cache_dir=str(cache))
    assert tree(cache) == before  # the failed load's new files are gone, the earlier cache is whole
    monkeypatch.undo()
    again = D.load_task(ok, tiny_tokenizer, cache_dir=str(cache))  # and still loads
    assert len(again.train) == 40


BOMB = """\
workdir: w
student:
  overrides:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
"""


def test_yaml_aliases_refused_in_config_and_set(tmp_path):
    """Fix: ``_StrictLoader.compose_node`` (was: accepted; the real bomb ended in MemoryError)."""
    path = tmp_path / "bomb.yml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError, match=r"bomb\.yml:line 4: YAML anchors and aliases \(&a / \*a\) are not allowed") as err:
        load_config(path, check_paths=False)
    assert "\n" not in one_line(err.value) and len(str(err.value)) < 300
    good = tmp_path / "good.yml"
    good.write_text("workdir: w\n")
    with pytest.raises(ConfigError, match=r"--set .*anchors and aliases"):
        load_config(good, ["student.overrides={a: &x [1, 2], b: [*x, *x]}"], check_paths=False)


# --- 14: corrupt checkpoints are corruption, never a hint to unpickle -------------------------


def test_random_bytes_checkpoint_is_reported_as_corrupt(tmp_path):
    """Fix: ``io.load_torch`` (was: a weights_only refusal advising to turn it off)."""
    path = tmp_path / "stage0.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        io.load_torch(path, "supernet checkpoint of stage 0")
    msg = str(err.value)
    # whichever way the bytes fail to parse (not a zip / pickle, or a pickle that breaks off)
    assert re.search(r"supernet checkpoint of stage 0 at .*stage0\.pt is (truncated or )?corrupt", msg), msg
    assert "weights_only" not in msg and "\n" not in msg


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_object_pickle_checkpoint_refused_without_unsafe_advice(tmp_path, monkeypatch):
    import argparse

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state.pt"
    torch.save({"x": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=r"holds a pickled Python object \(argparse\.Namespace\).*can run code") as err:
        io.load_torch(path, "warm-up resume state")
    assert "weights_only" not in str(err.value)
    path.write_bytes(pickle.dumps({"w": _RunsCode()}))
    with pytest.raises(CheckpointError) as err:
        io.load_torch(path, "warm-up resume state")
    assert "weights_only" not in str(err.value) and not (tmp_path / "PWNED").exists()


def test_no_file_suggests_unsafe_unpickling():
    """Nothing the project ships (code, messages, docs) tells anyone to turn weights_only off."""
    needle = "weights_only=" + "False"
    hits = []
    for top in ("nni_effbert", "search_spaces", "strategies", "docs", "bench", "examples", "scripts", "README.md",
                "DEVELOPERS.md", "setup.py"):
        root = REPO / top
        files = [root] if root.is_file() else (root.rglob("*") if root.is_dir() else [])
        for f in files:
            if f.is_file() and f.suffix in (".py", ".md", ".yml", ".yaml", ".txt", ".sh", ".json", ".rst"):
                if needle in f.read_text(encoding="utf-8", errors="replace").replace(" ", ""):
                    hits.append(str(f.relative_to(REPO)))
    assert not hits, hits


# --- 15: NNI's resume checkpoint is loaded with weights_only -----------------------------------


def test_torch_floor_has_weights_only_default():
    """Fix: ``setup.py`` asks for torch>=2.6 (was >=2.1, whose torch.load unpickles anything)."""
    text = (REPO / "setup.py").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (2, 6)


def test_nas_resume_checkpoint_refuses_code(tmp_path, monkeypatch):
    """Fix: ``python_search.use_safe_checkpoints`` (was: NNI's TorchSerializer, a bare torch.load).

    torch.load's old default (unpickle anything, torch < 2.6) is put back for the test, so the
    pickle would run if anything loaded it without asking for weights_only."""
    from nni.nas.utils.serializer import get_default_serializer, set_default_serializer

    from nni_effbert.nas import python_search

    real_load = torch.load

    torch_before_2_6_default = False  # what torch.load unpickled with when not told

    def old_default_load(*args, **kwargs):
        kwargs.setdefault("weights_only", torch_before_2_6_default)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", old_default_load)
    monkeypatch.chdir(tmp_path)
    previous = get_default_serializer()
    try:
        python_search.use_safe_checkpoints()
        serializer = get_default_serializer()
        ckpt = tmp_path / "checkpoint"
        ckpt.mkdir()
        state = {"strategy": {"history": [1, 2]}, "engine": {"w": torch.ones(2)}}
        serializer.save(state, ckpt / "state.ckpt")  # written as NNI names it
        loaded = serializer.load(ckpt / "state.ckpt")
        assert loaded["strategy"] == state["strategy"] and torch.equal(loaded["engine"]["w"], torch.ones(2))
        (ckpt / "state.ckpt.torch").write_bytes(pickle.dumps(_RunsCode()))
        from nni.nas.utils.serializer import TorchSerializer

        with pytest.raises(Exception):  # NNI's own serializer runs the pickle under the old default
            TorchSerializer().load(ckpt / "state.ckpt")
        assert (tmp_path / "PWNED").exists()
        (tmp_path / "PWNED").unlink()
        with pytest.raises(CheckpointError, match=r"NAS experiment checkpoint at .*state\.ckpt\.torch"):
            serializer.load(ckpt / "state.ckpt")
        assert not (tmp_path / "PWNED").exists()
        (ckpt / "state.ckpt.torch").unlink()
        with pytest.raises(FileNotFoundError):  # NNI skips loading a missing checkpoint
            serializer.load(ckpt / "state.ckpt")
    finally:
        set_default_serializer(previous)


def test_nas_resume_config_with_pickled_object_refused(tmp_path):
    from nni_effbert.nas import python_search

    exp = tmp_path / "exp"
    (exp / "checkpoint").mkdir(parents=True)
    (exp / "checkpoint" / "config.json").write_text(json.dumps({"trialConcurrency": 1, "trainingService": {"platform": "local"}}))
    python_search.check_checkpoint_config(exp)  # NNI's own plain config
    (exp / "checkpoint" / "config.json").write_text(json.dumps(
        {"trialConcurrency": 1, "experimentName": {"__nni_obj__": "gASVAAAA"}}))
    with pytest.raises(CheckpointError, match=r"config\.json holds a serialized Python object \('__nni_obj__'\)"):
        python_search.check_checkpoint_config(exp)


# --- 16: non-finite numbers in the config ----------------------------------------------------


def _float_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        for option in options:
            if dataclasses.is_dataclass(option):
                yield from _float_fields(option, f"{prefix}{f.name}.")
            elif option is float:
                yield f"{prefix}{f.name}"


FLOAT_KEYS = sorted(set(_float_fields(ExperimentConfig)))


def _nested(key: str, value) -> dict:
    out: dict = {"workdir": "w"}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def test_every_float_field_is_covered():
    assert "evaluator.learning_rate" in FLOAT_KEYS and "kd.temperature" in FLOAT_KEYS and len(FLOAT_KEYS) > 15


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_float_refused_at_load(tmp_path, key):
    """Fix: ``typed_yaml._finite`` (was: ``learning_rate: .nan`` passed and failed in the trial)."""
    path = tmp_path / "c.yml"
    for value in (float("nan"), float("inf"), float("-inf"), "nan", "-Infinity"):
        path.write_text(yaml.safe_dump(_nested(key, value)))
        with pytest.raises(ConfigError, match=rf"c\.yml:{re.escape(key)}: must be a finite number"):
            load_config(path, check_paths=False)


def test_non_finite_refused_in_set_and_free_form_overrides(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("workdir: w\n")
    with pytest.raises(ConfigError, match=r"c\.yml:distill\.learning_rate: must be a finite number, got inf"):
        load_config(path, ["distill.learning_rate=.inf"], check_paths=False)
    path.write_text("workdir: w\nstudent:\n  overrides: {hidden_dropout_prob: .nan}\n")
    with pytest.raises(ConfigError, match=r"student\.overrides\.hidden_dropout_prob: must be a finite number"):
        load_config(path, check_paths=False)
    path.write_text("workdir: w\nevaluator: {learning_rate: 1e-4}\n")
    assert load_config(path, check_paths=False).evaluator.learning_rate == pytest.approx(1e-4)


def test_cli_reports_nan_and_alias_bomb_as_one_line(tmp_path, capsys):
    """Through the CLI: exit 2 and one line naming the key, before any work starts."""
    from nni_effbert import cli

    tiny = (REPO / "examples" / "tiny" / "effbert.yml").read_text()
    nan = tmp_path / "nan.yml"
    nan.write_text(tiny)
    for argv in (["search", "-c", str(nan), "--set", f"workdir={tmp_path / 'w'}", "--set", "evaluator.learning_rate=.nan"],
                 ["search", "-c", str(tmp_path / "bomb.yml")]):
        (tmp_path / "bomb.yml").write_text(BOMB)
        code = cli.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines and not any("Traceback" in line for line in lines)
        assert lines[-1].startswith("nni-effbert search: error: ")
        assert ("evaluator.learning_rate: must be a finite number, got nan" in lines[-1]
                or "anchors and aliases" in lines[-1]), lines[-1]
    assert not (tmp_path / "w").exists()  # refused before the work directory was made
