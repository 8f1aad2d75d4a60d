"""Tokenized task data prepared once and read from disk (nni_effbert.data.prepared)."""
from __future__ import annotations

import os
import shutil

import datasets
import pytest

from nni_effbert.config import DATA_DIR_ENV, TaskConfig
from nni_effbert.data import prepared as P
from nni_effbert.data.loading import load_task

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _rows(ds):
    return {k: ds[k] for k in ds.column_names}


def test_prepared_task_is_load_task_from_disk(tmp_path, glue_dir, tiny_tokenizer, monkeypatch):
    data = tmp_path / "glue"
    shutil.copytree(glue_dir / "SST-2", data / "SST-2")
    cfg = TaskConfig(name="sst2", data_dir=str(data), max_train_rows=40, max_dev_rows=16, max_seq_length=24)
    store, cache = tmp_path / "tasks", str(tmp_path / "ds")
    reference = load_task(cfg, tiny_tokenizer, cache_dir=str(tmp_path / "ref"))

    first = P.load_prepared_task(cfg, tiny_tokenizer, store_dir=store, identity=["tok-a"], cache_dir=cache)
    key = P.prepared_key(cfg, ["tok-a"])
    assert (store / key / "meta.json").is_file()

    calls = []
    monkeypatch.setattr(P, "load_task", lambda *a, **k: calls.append(1) or load_task(*a, **k))
    second = P.load_prepared_task(cfg, tiny_tokenizer, store_dir=store, identity=["tok-a"], cache_dir=cache)
    assert calls == []  # read from disk: no loading, tokenizing or fingerprinting
    for task in (first, second):
        assert task.fingerprint == reference.fingerprint and task.spec == reference.spec
        assert _rows(task.train) == _rows(reference.train) and _rows(task.dev) == _rows(reference.dev)

    # Anything the data depends on gives a new key, hence the slow path once more.
    P.load_prepared_task(cfg, tiny_tokenizer, store_dir=store, identity=["tok-b"], cache_dir=cache)
    assert len(calls) == 1
    longer = TaskConfig(name="sst2", data_dir=str(data), max_train_rows=40, max_dev_rows=16, max_seq_length=32)
    assert P.prepared_key(longer, ["tok-a"]) != key
    dev = data / "SST-2" / "dev.tsv"
    st = dev.stat()
    os.utime(dev, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert P.prepared_key(cfg, ["tok-a"]) != key
    edited = P.load_prepared_task(cfg, tiny_tokenizer, store_dir=store, identity=["tok-a"], cache_dir=cache)
    assert len(calls) == 2 and edited.fingerprint == reference.fingerprint  # same content, same fingerprint

    # A damaged snapshot is prepared again, not served.
    (store / key / "meta.json").write_text("{")
    assert P._read(store / key) is None


def test_hub_and_missing_files_take_the_slow_path(tmp_path):
    assert P.prepared_key(TaskConfig(name="sst2")) is None  # the datasets hub: nothing to stat
    assert P.prepared_key(TaskConfig(name="sst2", data_dir=str(tmp_path / "nowhere"))) is None
