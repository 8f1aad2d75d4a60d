"""Teacher loading / fine-tuning / fingerprints and the shared teacher-output cache."""
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from nni_effbert.kd.cache import TeacherCache
from nni_effbert.config import load_config
from nni_effbert.data.batches import collate, make_loader
from nni_effbert.data.loading import load_task
from nni_effbert.errors import CheckpointError, ConfigError, DataError
from nni_effbert.kd.teacher_finetune import evaluate_teacher, finetune_teacher
from nni_effbert.kd.teacher import (load_teacher, prepare_teacher, read_teacher_marker, resolve_teacher, teacher_fingerprint,
                                    teacher_outputs, vocab_fingerprint)

REPO = Path(__file__).resolve().parents[1]
HIDDEN = [0, 1, 2]  # embedding output + both layers of the tiny teacher
ATTN = [1, 2]


def _tiny_bert(vocab_size, seed=0, num_labels=2):
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=vocab_size, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_vocab_file):
    """Word-piece tokenizer over the shared tiny vocab.

    Built with ``vocab=``: transformers 5 ignores the ``vocab_file=`` keyword (the result
    would know only the 5 special tokens).
    """
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=str(tiny_vocab_file), do_lower_case=True)
    assert len(tok) > 100
    return tok


@pytest.fixture(scope="module")
def base_teacher(tmp_path_factory, tiny_tokenizer):
    """A random tiny BERT saved as an HF folder with the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("base_teacher")
    _tiny_bert(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, glue_dir, base_teacher):
    work = tmp_path_factory.mktemp("work")
    return load_config(
        REPO / "examples" / "tiny" / "effbert.yml",
        [f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
         "task.max_train_rows=200", "task.max_dev_rows=48", "task.search_rows=0"],
    )


@pytest.fixture(scope="module")
def task_data(cfg, tiny_tokenizer):
    return load_task(cfg.task, tiny_tokenizer)


# ---------------------------------------------------------------------------------------
# teacher.py
# ---------------------------------------------------------------------------------------


def test_resolve_teacher(tmp_path, base_teacher):
    assert resolve_teacher(str(base_teacher)) == str(base_teacher.resolve())
    assert resolve_teacher("bert-base-uncased") == "bert-base-uncased"
    minilm = Path(resolve_teacher("minilm"))
    assert (minilm / "config.json").is_file() and minilm.name == "model"
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_teacher(str(tmp_path))
    with pytest.raises(ConfigError, match="folder not found"):
        resolve_teacher(str(tmp_path / "missing"))


def test_load_teacher_returns_attentions(base_teacher, tiny_tokenizer):
    model, tok = load_teacher(str(base_teacher), num_labels=3)
    assert model.config._attn_implementation == "eager" and model.config.num_labels == 3
    assert vocab_fingerprint(tok) == vocab_fingerprint(tiny_tokenizer)
    prepare_teacher(model)
    enc = tiny_tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt")
    out = teacher_outputs(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], [0, 2], [1, 2])
    assert out.logits.shape == (2, 3)
    assert [h.shape[-1] for h in out.hidden_states] == [32, 32]
    assert [tuple(a.shape[1:]) for a in out.attentions] == [(2, enc["input_ids"].shape[1])] * 0 + [
        (2, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
    ] * 2
    # attention rows are probabilities over the real keys only
    att = out.attentions[0][1, :, 0]  # 2nd example (padded), first query
    n = int(enc["attention_mask"][1].sum())
    assert torch.allclose(att[:, :n].sum(-1), torch.ones(2), atol=1e-5) and att[:, n:].abs().max() == 0
    with pytest.raises(ConfigError, match="has 2 layers"):
        teacher_outputs(model, enc["input_ids"], enc["attention_mask"], None, [3], [])


def test_teacher_fingerprint_tracks_weights(tmp_path, base_teacher, tiny_tokenizer):
    fp = teacher_fingerprint(base_teacher)
    assert fp == teacher_fingerprint(base_teacher)
    other = tmp_path / "other"
    model = BertForSequenceClassification.from_pretrained(base_teacher)
    model.save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert teacher_fingerprint(other) == fp  # same content elsewhere: same fingerprint
    with torch.no_grad():
        model.classifier.bias.add_(0.1)
    model.save_pretrained(other)
    assert teacher_fingerprint(other) != fp
    with pytest.raises(ConfigError, match="config.json"):
        teacher_fingerprint(tmp_path)


def test_finetune_teacher_trains_saves_and_reuses(cfg, task_data, tiny_tokenizer, tmp_path):
    out = tmp_path / "teacher"
    res = finetune_teacher(cfg, task_data, tiny_tokenizer, out, progress=False)
    assert not res.reused and res.path == out and res.metric == task_data.spec.metric
    assert 0.0 <= res.dev_metric <= 1.0
    marker = read_teacher_marker(out)
    assert marker["task_fingerprint"] == task_data.fingerprint and marker["train_steps"] == 4
    assert marker["teacher_fingerprint"] == teacher_fingerprint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher", "teacher.lock"]  # no temp dirs left
    # the saved teacher loads, and differs from the base (it was trained)
    model, _ = load_teacher(str(out), num_labels=2)
    assert teacher_fingerprint(out) != teacher_fingerprint(cfg.teacher.model)
    # the reported metric is the saved teacher's real dev score
    dev = make_loader(task_data.dev, 16, False, 0, tiny_tokenizer.pad_token_id)
    assert evaluate_teacher(model, dev, task_data.spec.metric, False) == pytest.approx(res.dev_metric)
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    again = finetune_teacher(cfg, task_data, tiny_tokenizer, out, progress=False)
    assert again.reused and again.dev_metric == res.dev_metric
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    with pytest.raises(ConfigError, match="fine-tuned with 2 labels but the task has 3"):
        load_teacher(str(out), num_labels=3)


def test_finetune_teacher_rejects_other_tokenizer_and_foreign_folders(cfg, task_data, tiny_tokenizer, tmp_path):
    from transformers import BertTokenizer

    out = tmp_path / "teacher"
    finetune_teacher(cfg, task_data, tiny_tokenizer, out, progress=False)
    vocab = tmp_path / "vocab.txt"
    tokens = sorted(tiny_tokenizer.get_vocab(), key=tiny_tokenizer.get_vocab().get)
    vocab.write_text("\n".join(tokens[:-3]) + "\n")  # 3 tokens fewer
    other_tok = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    with pytest.raises(ConfigError, match="different tokenizer"):
        finetune_teacher(cfg, task_data, other_tok, out, progress=False)

    # corrupted teacher files are detected on reuse
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since they were saved"):
        finetune_teacher(cfg, task_data, tiny_tokenizer, out, progress=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and has no effbert_teacher.json"):
        finetune_teacher(cfg, task_data, tiny_tokenizer, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# cache.py
# ---------------------------------------------------------------------------------------


def _open(workdir, teacher, ds, fp="data-fp", **kw):
    return TeacherCache.open_or_build(
        workdir, teacher, ds, data_fingerprint=fp, split="train",
        hidden_layers=kw.pop("hidden", HIDDEN), attention_layers=kw.pop("attn", ATTN),
        batch_size=kw.pop("batch_size", 16), progress=False, **kw,
    )


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_matches_direct_teacher_outputs_and_is_reused(tmp_path, base_teacher, task_data):
    ds = task_data.train
    assert len(ds) == 200
    cache = _open(tmp_path, base_teacher, ds)
    assert cache.built and len(cache) == 200
    files = sorted(p.name for p in cache.folder.iterdir())
    assert files == ["attentions.npy", "hidden.npy", "index.npz", "logits.npy", "meta.json"]
    assert cache.hidden.dtype == np.float16 and cache.hidden.shape[1:] == (3, 32)
    assert cache.hidden.shape[0] == sum(len(x) for x in ds["input_ids"])  # ragged: no padding stored

    rows = [3, 50, 7, 120, 199]
    batch = collate(ds.select(rows)[:], pad_token_id=0)
    lens = batch["attention_mask"].sum(1)
    assert lens.min() < lens.max()  # the batch really has padding
    T = batch["input_ids"].shape[1]
    got = cache.get(batch["idx"], T)
    model, _ = load_teacher(str(base_teacher))
    prepare_teacher(model)
    ref = teacher_outputs(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], HIDDEN, ATTN)

    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-5)
    m = batch["attention_mask"].bool()
    for g, r in zip(got.hidden_states, ref.hidden_states):
        assert g.shape == (5, T, 32)
        torch.testing.assert_close(g.float()[m], r[m], rtol=2e-3, atol=2e-3)
        assert g[~m].abs().max() == 0  # padding is zero
    pair = m[:, None, :, None] & m[:, None, None, :]
    for g, r in zip(got.attentions, ref.attentions):
        assert g.shape == (5, 2, T, T)
        torch.testing.assert_close(g.float().masked_select(pair), r.masked_select(pair.expand_as(r)), rtol=2e-3, atol=1e-3)

    before = _mtimes(cache.folder)
    again = _open(tmp_path, base_teacher, ds)
    assert not again.built and again.folder == cache.folder
    assert _mtimes(again.folder) == before
    torch.testing.assert_close(again.get(batch["idx"], T).hidden_states[1], got.hidden_states[1])

    with pytest.raises(DataError, match="not in the teacher-output cache"):
        cache.get(torch.tensor([0, 100000]))
    with pytest.raises(ValueError, match="shorter than the longest"):
        cache.get(batch["idx"], 2)


def test_cache_key_changes_with_teacher_data_and_layers(tmp_path, base_teacher, task_data, tiny_tokenizer):
    ds = task_data.train.select(range(40))
    key = TeacherCache.make_key(base_teacher, ds, data_fingerprint="fp", split="train", hidden_layers=HIDDEN, attention_layers=ATTN)
    # changed teacher weights
    changed = tmp_path / "changed"
    model = BertForSequenceClassification.from_pretrained(base_teacher)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1.01)
    model.save_pretrained(changed)
    tiny_tokenizer.save_pretrained(changed)
    k_teacher = TeacherCache.make_key(changed, ds, data_fingerprint="fp", split="train", hidden_layers=HIDDEN, attention_layers=ATTN)
    # changed data (other rows), changed data fingerprint, changed layers
    k_rows = TeacherCache.make_key(base_teacher, task_data.train.select(range(1, 41)), data_fingerprint="fp", split="train", hidden_layers=HIDDEN, attention_layers=ATTN)
    k_fp = TeacherCache.make_key(base_teacher, ds, data_fingerprint="fp2", split="train", hidden_layers=HIDDEN, attention_layers=ATTN)
    k_layers = TeacherCache.make_key(base_teacher, ds, data_fingerprint="fp", split="train", hidden_layers=[0, 2], attention_layers=[2])
    names = {k.name for k in (key, k_teacher, k_rows, k_fp, k_layers)}
    assert len(names) == 5
    assert key.teacher != k_teacher.teacher

    a = _open(tmp_path / "w", base_teacher, ds)
    b = _open(tmp_path / "w", changed, ds)
    assert a.built and b.built and a.folder != b.folder
    assert not np.array_equal(np.asarray(a.hidden[:, 1]), np.asarray(b.hidden[:, 1]))


def test_cache_logits_only_and_damaged_folder(tmp_path, base_teacher, task_data):
    ds = task_data.train.select(range(20))
    # a builder killed midway left its temporary folder (and released its lock by dying)
    key = TeacherCache.make_key(base_teacher, ds, data_fingerprint="data-fp", split="train",
                                hidden_layers=[], attention_layers=[])
    stale = tmp_path / "cache" / f".{key.name}.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "logits.npy").write_bytes(b"partial")
    c = _open(tmp_path, base_teacher, ds, hidden=[], attn=[])
    assert c.built and c.folder.name == key.name and not stale.exists()
    assert sorted(p.name for p in c.folder.iterdir()) == ["index.npz", "logits.npy", "meta.json"]
    tb = c.get(torch.tensor([0, 1]))
    assert tb.logits.shape == (2, 2) and tb.hidden_states == [] and tb.attentions == []
    # ids outside the teacher's vocabulary: data tokenized with another tokenizer
    foreign = ds.map(lambda r: {"input_ids": [i + 10_000 for i in r["input_ids"]]})
    with pytest.raises(DataError, match="another tokenizer"):
        _open(tmp_path, base_teacher, foreign)

    full = _open(tmp_path, base_teacher, ds)
    hidden = full.folder / "hidden.npy"
    with open(hidden, "r+b") as f:
        f.truncate(hidden.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="delete"):
        TeacherCache(full.folder)


# Run in the spawned children through ``exec`` so that they import only what a trial
# imports (not this test module with transformers' model classes and pytest).
WORKER = """
import os
import numpy as np
import datasets
from nni_effbert.kd.cache import TeacherCache

ds = datasets.load_from_disk(ds_path)
barrier.wait()  # all three start on the empty cache together
try:
    cache = TeacherCache.open_or_build(
        workdir, teacher, ds, data_fingerprint="fp", split="train",
        hidden_layers=hidden, attention_layers=attn, batch_size=8, progress=False,
    )
    tb = cache.get(np.arange(len(ds)))
    queue.put((os.getpid(), cache.built, str(cache.folder), float(tb.logits.sum()),
               float(sum(h.float().sum() for h in tb.hidden_states)),
               float(sum(a.float().sum() for a in tb.attentions))))
except BaseException as exc:  # report, so the parent fails with the reason
    queue.put(("error", repr(exc)))
"""


def test_three_concurrent_first_trials_build_once(tmp_path, base_teacher, task_data):
    ds = task_data.train.select(range(120))
    ds_path = str(tmp_path / "ds")
    ds.save_to_disk(ds_path)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    workdir = tmp_path / "work"
    env = dict(workdir=str(workdir), teacher=str(base_teacher), ds_path=ds_path, barrier=barrier, queue=queue,
               hidden=HIDDEN, attn=ATTN)
    procs = [ctx.Process(target=exec, args=(WORKER, dict(env))) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not any(r[0] == "error" for r in results), results
    assert sum(r[1] for r in results) == 1, "the cache must be built exactly once"
    assert len({r[2] for r in results}) == 1
    builder = next(r[0] for r in results if r[1])
    cache = TeacherCache(results[0][2])
    assert cache.meta["built_by"]["pid"] == builder
    # every process read the same, intact values; they equal a fresh read here
    tb = cache.get(np.arange(len(ds)))
    sums = (float(tb.logits.sum()), float(sum(h.float().sum() for h in tb.hidden_states)),
            float(sum(a.float().sum() for a in tb.attentions)))
    for r in results:
        assert r[3:] == pytest.approx(sums, rel=1e-6)
    assert np.isfinite(np.asarray(cache.hidden, dtype=np.float32)).all()
    leftovers = [p.name for p in (workdir / "cache").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_unwritable_workdir_is_a_clear_error(tmp_path, base_teacher, task_data, monkeypatch):
    import nni_effbert.kd.cache as cache_mod

    def denied(final):
        raise PermissionError(13, "Permission denied", str(final))

    monkeypatch.setattr(cache_mod, "make_tmp_dir", denied)  # tests run as root: chmod would not bite
    with pytest.raises(ConfigError, match="writable"):
        _open(tmp_path, base_teacher, task_data.train.select(range(8)))
