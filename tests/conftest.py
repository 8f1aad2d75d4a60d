"""Shared pytest fixtures: the GLUE test data and a tiny offline tokenizer."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS = 400


def _glue_dir() -> Path:
    root = Path(os.environ.get("EFFBERT_TEST_DATA") or REPO.parent / "shared" / "data" / "glue")
    # Deliberately no skip: a missing data folder is a broken test setup, not an optional test.
    assert (root / "SST-2" / "train.tsv").is_file() and (root / "RTE" / "train.tsv").is_file(), (
        f"GLUE test data not found under {root}; set EFFBERT_TEST_DATA to a folder holding "
        "SST-2/ and RTE/"
    )
    return root


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """GLUE-layout root holding ``SST-2/`` and ``RTE/`` (``$EFFBERT_TEST_DATA`` or ../shared)."""
    return _glue_dir()


def _frequent_words(root: Path, n: int) -> list:
    counts: Counter = Counter()
    for rel in ("SST-2/train.tsv", "RTE/train.tsv"):
        with open(root / rel, encoding="utf-8") as f:
            next(f)  # header
            for i, line in enumerate(f):
                if i >= 20000:  # plenty for a stable top-n, and fast
                    break
                counts.update(re.findall(r"[a-z]+", line.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


@pytest.fixture(scope="session")
def tiny_vocab_file(tmp_path_factory, glue_dir) -> Path:
    """WordPiece vocab: special tokens, characters, ``##`` pieces and frequent words."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&$%/")
    words = [w for w in _frequent_words(glue_dir, N_WORDS) if w not in chars]
    tokens = SPECIAL_TOKENS + chars + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + words
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab_file):
    """A lower-casing BERT tokenizer over :func:`tiny_vocab_file` (a few hundred tokens)."""
    from transformers import BertTokenizer

    # transformers 5 ignores ``vocab_file`` in BertTokenizerFast's constructor; pass the vocab.
    tok = BertTokenizer(vocab=str(tiny_vocab_file), do_lower_case=True)
    assert len(tok) > 100, f"tiny tokenizer has only {len(tok)} tokens"
    return tok


@pytest.fixture(scope="session")
def base_teacher(tmp_path_factory, tiny_vocab_file) -> Path:
    """A random tiny BERT teacher (hidden 32) with the shared tiny vocab, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tiny_vocab_file.parent), do_lower_case=True)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(tok), max_position_embeddings=64, num_labels=2))
    folder = tmp_path_factory.mktemp("base_teacher")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _squad_dir() -> Path:
    root = Path(os.environ.get("EFFBERT_TEST_SQUAD") or REPO.parent / "shared" / "data" / "squad" / "v1.1")
    assert (root / "dev-part-a.json").is_file() and (root / "dev-part-b.json").is_file(), (
        f"SQuAD test data not found under {root}; set EFFBERT_TEST_SQUAD to a folder holding dev-part-a.json "
        "and dev-part-b.json"
    )
    return root


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    """Folder of the official SQuAD v1.1 dev set split by article (``dev-part-a.json``, ``dev-part-b.json``)."""
    return _squad_dir()


@pytest.fixture(scope="session")
def qa_tokenizer(tmp_path_factory, squad_dir):
    """A fast lower-casing BERT tokenizer: 1,500 most frequent words of SQuAD part b + characters."""
    import json

    from transformers import BertTokenizer

    counts: Counter = Counter()
    for art in json.loads((squad_dir / "dev-part-b.json").read_text(encoding="utf-8"))["data"]:
        for p in art["paragraphs"]:
            counts.update(re.findall(r"[a-z]+", p["context"].lower()))
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars] + [w for w, _ in counts.most_common(1500) if w not in chars]
    path = tmp_path_factory.mktemp("qa_tokenizer") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(path), do_lower_case=True)
    assert tok.is_fast
    return tok


@pytest.fixture(scope="session")
def squad_small(tmp_path_factory, squad_dir):
    """``(train, dev)`` SQuAD files: 6 articles of part b (3 paragraphs x 4 questions), 2 of part a."""
    import json

    def cut(name, n_articles):
        doc = json.loads((squad_dir / name).read_text(encoding="utf-8"))
        data = [{"title": a["title"], "paragraphs": [{"context": p["context"], "qas": p["qas"][:4]}
                                                     for p in a["paragraphs"][:3]]} for a in doc["data"][:n_articles]]
        return {"version": doc.get("version"), "data": data}

    folder = tmp_path_factory.mktemp("squad_small")
    (folder / "train.json").write_text(json.dumps(cut("dev-part-b.json", 6)), encoding="utf-8")
    (folder / "dev.json").write_text(json.dumps(cut("dev-part-a.json", 2)), encoding="utf-8")
    return folder / "train.json", folder / "dev.json"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (two OpenMP threads on a loaded 2-core box are
    several times slower than one); a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finetune_teacher_into(cfg) -> None:
    """Fine-tune ``cfg``'s (tiny, in-test) teacher into its work directory, quietly."""
    from transformers import AutoTokenizer

    from nni_effbert.data.loading import load_task
    from nni_effbert.kd.teacher_finetune import finetune_teacher
    from nni_effbert.workdir import WorkDir

    wd = WorkDir.of(cfg).ensure()
    tok = AutoTokenizer.from_pretrained(str(cfg.teacher.model))
    task = load_task(cfg.task, tok, cache_dir=str(wd.datasets_cache))
    finetune_teacher(cfg, task, tok, wd.teacher_dir, progress=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: runs a real NNI manager (nnictl), tens of seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); scripts/gpu_check.sh runs them")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, glue_dir):
    """A work directory made by ``nni-effbert quickstart --budget smoke`` on the test data, once
    per session (:class:`support.smoke.SmokeWorkdir`: ``root``, ``config``, ``experiment``...).
    Shared: add your own exports (``--name``), change nothing the quickstart wrote.
    ``$EFFBERT_SMOKE_WORKDIR`` names one made before, to reuse instead."""
    from support.smoke import REUSE_ENV, delete_experiment, existing_smoke_workdir, make_smoke_workdir

    if os.environ.get(REUSE_ENV):  # a quickstart work directory made before (while developing)
        yield existing_smoke_workdir(Path(os.environ[REUSE_ENV]).absolute())
        return
    made = make_smoke_workdir(tmp_path_factory.mktemp("smoke") / "qs", glue_dir)
    yield made
    delete_experiment(made.experiment, made.env)
