"""Span question answering (SQuAD v1.1 / v2.0): loading and run_qa-style features.

The data flow follows Hugging Face's ``examples/pytorch/question-answering/run_qa.py``:

* :func:`load_raw_qa` -> ``DatasetDict(train, search, dev)`` of *examples* (one row per
  question: ``id, title, context, question, answers{text, answer_start}``), from the hub
  (``squad`` / ``squad_v2``), a data folder with the official file names, or
  ``task.train_file`` / ``task.dev_file``. Files are read with plain :mod:`json` and checked
  question by question (:func:`read_squad_file`), so a bad file fails with one line naming the
  file and the question id. The search split is held out **by article**, seeded
  (:func:`article_search_split`): no context of the search split is in any training row.
* :func:`prepare_features` -> *features*: the fast tokenizer cuts ``question + context`` into
  windows of ``max_seq_length`` tokens that overlap by ``doc_stride``
  (``return_overflowing_tokens``, ``return_offsets_mapping``); each feature knows its example
  (``example_id``), the character offsets of its context tokens (``offset_mapping``, None
  elsewhere) and the gold span (``start_positions`` / ``end_positions``, the CLS position when
  the answer is not inside the window or the question has none).
From logits to answers and scores is :mod:`.qa_answers`:

* :func:`~.qa_answers.postprocess_predictions` -> answer strings: the ``n_best_size`` best start and end
  logits of every feature of an example, spans of at most ``max_answer_length`` tokens inside
  the context, scored by ``start + end``; for v2.0 the null (CLS) score against the best span
  gives ``score_diff`` and a threshold tuned on the search split (:func:`~.qa_answers.best_null_threshold`).
* :func:`~.qa_answers.evaluate_predictions` -> EM / F1 (:mod:`nni_effbert.data.metrics`);
  :func:`~.qa_answers.score_span_model` runs a model (any callable from a padded batch to ``[B, T, 2]``
  logits) over splits and scores it, the v2.0 threshold tuned on the search split.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
import numpy as np

from ..errors import DataError
from ..io import atomic_replace_dir, atomic_write_json, make_tmp_dir
from .files import file_sha256, resolve_data_dir
from .loading import digest, search_split_rows, seeded_subset, tokenizer_fingerprint
from .tasks import QA_TASKS, TaskConfig, TaskSpec, get_task_spec


__all__ = [
    "QAData",
    "QA_FEATURE_COLUMNS",
    "HUB_DATASETS",
    "read_squad_file",
    "load_raw_qa",
    "article_search_split",
    "prepare_features",
    "load_qa_task",
]

logger = logging.getLogger(__name__)

#: ``datasets`` hub names of the two tasks.
HUB_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
#: Columns of a feature besides the model inputs.
QA_FEATURE_COLUMNS = ("start_positions", "end_positions", "example_id", "offset_mapping", "idx")
# Bump when reading, splitting or tokenization changes, so older caches are not reused.
_FORMAT_VERSION = "effbert-qa-1"

_EXAMPLE_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
})


@dataclass
class QAData:
    """A tokenized span-QA task.

    Attributes
    ----------
    train, search, dev : datasets.Dataset
        Features (windows): ``input_ids, token_type_ids, attention_mask`` (unpadded int lists),
        ``start_positions, end_positions`` (token positions; CLS when the window holds no answer),
        ``example_id`` (the question id), ``offset_mapping`` (``[start, end)`` characters of each
        context token in the example's context, None for question and special tokens) and
        ``idx`` (the feature's position in its split: the teacher-output cache key).
    examples : datasets.DatasetDict
        The questions of each split (``id, title, context, question, answers``); the gold
        answers for scoring. ``train`` holds no article of ``search``.
    spec : TaskSpec
    fingerprint : str
        Digest of data content, tokenizer, window settings, subset and search split.
    """

    train: datasets.Dataset
    search: datasets.Dataset
    dev: datasets.Dataset
    examples: datasets.DatasetDict
    spec: TaskSpec
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# Reading SQuAD JSON
# ---------------------------------------------------------------------------------------------


def _shape_error(path: str, where: str, what: str) -> DataError:
    return DataError(f"{path}: not SQuAD-shaped JSON: {where} {what} (expected "
                     "data[].paragraphs[].{context, qas[].{id, question, answers[].{text, answer_start}}})")


def read_squad_file(path: str, version: str = "squad") -> Dict[str, List[Any]]:
    """Read and check a SQuAD-format JSON file.

    Parameters
    ----------
    path : str
        ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
        [{"text", "answer_start"}], "is_impossible"}]}]}]}`` (the official layout).
    version : str
        ``squad`` (v1.1: every question has an answer; a v2.0 question is an error) or
        ``squad_v2`` (questions with ``is_impossible: true`` have no answers).

    Returns
    -------
    dict of str to list
        Columns ``id, title, context, question, answers`` (``answers`` as ``{"text": [...],
        "answer_start": [...]}``, the ``datasets`` hub layout), one row per question, in file order.
        A title-less article is named by its position (``article-<i>``).

    Raises
    ------
    DataError
        One line naming the file (and the question id where there is one): a missing or
        unreadable file, invalid JSON, a JSON that is not SQuAD-shaped, an empty context or
        question, a duplicate id, an ``answer_start`` whose text does not match the context, a
        v1.1 question without answers, a v2.0 question (``is_impossible: true`` or
        ``plausible_answers``) given to ``squad``, or an unanswerable question with answers.
    """
    if version not in QA_TASKS:
        raise ValueError(f"version must be one of {sorted(QA_TASKS)}, got {version!r}")
    if not os.path.isfile(path):
        raise DataError(f"SQuAD file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise _shape_error(path, "the top level", "has no 'data' list")
    cols: Dict[str, List[Any]] = {k: [] for k in _EXAMPLE_FEATURES}
    seen = set()
    for a, article in enumerate(doc["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise _shape_error(path, f"data[{a}]", "has no 'paragraphs' list")
        title = article.get("title")
        title = title if isinstance(title, str) and title.strip() else f"article-{a}"
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list) or "context" not in para:
                raise _shape_error(path, where, "needs 'context' and a 'qas' list")
            context = para["context"]
            if not isinstance(context, str):
                raise _shape_error(path, where, f"has a context that is no string ({type(context).__name__})")
            for q, qa in enumerate(para["qas"]):
                if not isinstance(qa, dict) or "id" not in qa:
                    raise _shape_error(path, f"{where}.qas[{q}]", "has no 'id'")
                qid = str(qa["id"])
                at = f"{path}: question {qid}"
                if qid in seen:
                    raise DataError(f"{at}: duplicate question id")
                seen.add(qid)
                if not context.strip():
                    raise DataError(f"{at}: empty context (data[{a}].paragraphs[{p}])")
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f"{at}: empty or missing question")
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise DataError(f"{at}: 'answers' must be a list of {{text, answer_start}}")
                impossible = qa.get("is_impossible", False)
                if version == "squad" and (impossible is True or "plausible_answers" in qa):
                    raise DataError(f"{at}: a SQuAD v2.0 question (is_impossible / plausible_answers) in a "
                                    "v1.1 task; use task.name: squad_v2 for this file")
                if impossible is True and answers:
                    raise DataError(f"{at}: is_impossible is true but the question has answers")
                if not answers and version == "squad":
                    raise DataError(f"{at}: no answers (every SQuAD v1.1 question has one; "
                                    "use task.name: squad_v2 for unanswerable questions)")
                if not answers and version == "squad_v2" and impossible is not True:
                    raise DataError(f"{at}: no answers but is_impossible is not true")
                texts, starts = [], []
                for ans in answers:
                    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) \
                            or not isinstance(ans.get("answer_start"), int) or isinstance(ans["answer_start"], bool):
                        raise DataError(f"{at}: each answer needs a string 'text' and an integer 'answer_start'")
                    text, start = ans["text"], ans["answer_start"]
                    if not text.strip():
                        raise DataError(f"{at}: empty answer text")
                    if start < 0 or context[start:start + len(text)] != text:
                        found = context[max(start, 0):max(start, 0) + len(text)]
                        raise DataError(f"{at}: answer_start {start} does not match the context: "
                                        f"answer {text!r} but the context has {found!r} there")
                    texts.append(text)
                    starts.append(start)
                cols["id"].append(qid)
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(question)
                cols["answers"].append({"text": texts, "answer_start": starts})
    if not cols["id"]:
        raise DataError(f"{path}: the file holds no questions")
    return cols


# ---------------------------------------------------------------------------------------------
# Raw splits
# ---------------------------------------------------------------------------------------------


def _qa_files(task_cfg: TaskConfig, spec: TaskSpec) -> Optional[Dict[str, str]]:
    """``{train, dev}`` file paths, or None for the hub."""
    if task_cfg.train_file or task_cfg.dev_file:
        return {"train": str(task_cfg.train_file), "dev": str(task_cfg.dev_file)}
    data_dir = resolve_data_dir(task_cfg)
    if not data_dir:
        return None
    root = Path(data_dir)
    for folder in (root, root / spec.name, root / spec.name.upper(), root / "SQuAD"):
        files = {s: folder / name for s, name in spec.tsv_splits.items()}
        if all(p.is_file() for p in files.values()):
            return {s: str(p) for s, p in files.items()}
    names = " and ".join(spec.tsv_splits.values())
    raise DataError(f"no {names} in {root} (nor in {root / spec.name}); put the official SQuAD files "
                    "there or give task.train_file and task.dev_file")


def _load_hub(spec: TaskSpec, cache_dir: Optional[str]) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(HUB_DATASETS[spec.name], cache_dir=cache_dir)
    except Exception as err:  # offline machines fail in many ways (DNS, offline mode, 404...)
        raise DataError(
            f"cannot load {spec.name!r} from the datasets hub ({type(err).__name__}: {err}); on a machine "
            f"without hub access set task.data_dir to a folder holding {' and '.join(spec.tsv_splits.values())}, "
            "or give task.train_file and task.dev_file"
        ) from err
    return datasets.DatasetDict({
        split: raw[hub].select_columns(list(_EXAMPLE_FEATURES)).cast(_EXAMPLE_FEATURES)
        for split, hub in spec.hub_splits.items()
    })


def article_search_split(titles: Sequence[str], task_cfg: TaskConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the train questions and of the search questions, split by article.

    Articles are taken in a permutation seeded with ``task.seed`` until the search split holds
    ``task.search_rows`` questions (or ``task.search_fraction`` of them; at most half, see
    :func:`nni_effbert.data.loading.search_split_rows`). Whole articles go to one side, so no
    context of the search split appears in a training row. At least one article stays for
    training.

    Parameters
    ----------
    titles : sequence of str
        The article of each question.
    task_cfg : TaskConfig

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(train_positions, search_positions)``, disjoint, together ``0..len(titles)-1``.
    """
    n = len(titles)
    # The question count the row-based rule would give (same fraction/cap semantics and warning).
    want = len(search_split_rows(n, task_cfg)[1])
    articles = list(dict.fromkeys(titles))
    if want == 0 or len(articles) < 2:
        if want and len(articles) < 2:
            logger.warning("the QA train data has a single article: no search split can be held out by article")
        return np.arange(n), np.arange(0)
    sizes = collections.Counter(titles)
    order = np.random.default_rng([int(task_cfg.seed or 0), 0xA271C1E]).permutation(len(articles))
    chosen, count = set(), 0
    for i in order[:-1]:  # at least one article trains
        if count >= want:
            break
        chosen.add(articles[i])
        count += sizes[articles[i]]
    is_search = np.fromiter((t in chosen for t in titles), dtype=bool, count=n)
    return np.flatnonzero(~is_search), np.flatnonzero(is_search)


def _source_fingerprint(task_cfg: TaskConfig, spec: TaskSpec, source: Dict[str, Any]) -> Dict[str, Any]:
    """What the questions of the three splits depend on: the data, the subset and the search split."""
    return {
        "version": _FORMAT_VERSION, "task": spec.name, "source": source, "seed": int(task_cfg.seed or 0),
        "train_fraction": task_cfg.train_fraction, "dev_fraction": task_cfg.dev_fraction,
        "max_train_rows": task_cfg.max_train_rows, "max_dev_rows": task_cfg.max_dev_rows,
        "search_rows": task_cfg.search_rows, "search_fraction": task_cfg.search_fraction,
    }


def _task_fingerprint(src: Dict[str, Any], tokenizer: Any, task_cfg: TaskConfig) -> str:
    return digest({**src, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": task_cfg.max_seq_length,
                    "doc_stride": task_cfg.doc_stride, "padding_side": tokenizer.padding_side})


def _qa_spec(task_cfg: TaskConfig) -> TaskSpec:
    spec = get_task_spec(task_cfg.name)
    if not spec.is_span:
        raise DataError(f"task {spec.name!r} is not a QA task; load it with nni_effbert.data.loading.load_task")
    return spec


def _load_raw(task_cfg: TaskConfig, cache_dir: Optional[str]) -> Tuple[datasets.DatasetDict, TaskSpec, Dict[str, Any]]:
    spec = _qa_spec(task_cfg)
    files = _qa_files(task_cfg, spec)
    if files is None:
        logger.info("no data_dir nor train_file: loading %s from the datasets hub", spec.name)
        dd = _load_hub(spec, cache_dir)
        source: Dict[str, Any] = {split: ds._fingerprint for split, ds in dd.items()}
    else:
        dd = datasets.DatasetDict({
            split: datasets.Dataset.from_dict(read_squad_file(path, spec.name), features=_EXAMPLE_FEATURES)
            for split, path in files.items()
        })
        source = {split: file_sha256(path) for split, path in files.items()}
    seed = int(task_cfg.seed or 0)
    train = seeded_subset(dd["train"], task_cfg.train_fraction, task_cfg.max_train_rows, seed)
    train_rows, search_rows = article_search_split(train["title"], task_cfg)
    out = datasets.DatasetDict(
        train=train.select(train_rows.tolist()),
        search=train.select(search_rows.tolist()),
        dev=seeded_subset(dd["dev"], task_cfg.dev_fraction, task_cfg.max_dev_rows, seed),
    )
    return out, spec, _source_fingerprint(task_cfg, spec, source)


def load_raw_qa(task_cfg: TaskConfig, cache_dir: Optional[str] = None) -> Tuple[datasets.DatasetDict, TaskSpec]:
    """Load the questions of a QA task: ``DatasetDict(train, search, dev)`` and its spec.

    Parameters
    ----------
    task_cfg : TaskConfig
        ``name`` is ``squad`` or ``squad_v2``. Data comes from ``train_file`` / ``dev_file``
        (SQuAD-format JSON), else a ``data_dir`` (or ``$EFFBERT_DATA_DIR``) holding the official
        file names (``train-v1.1.json``, ``dev-v1.1.json`` / ``train-v2.0.json``,
        ``dev-v2.0.json``), else the ``datasets`` hub. The seeded subset (``*_fraction``,
        ``max_*_rows``) counts questions; the search split is held out by article
        (:func:`article_search_split`).
    cache_dir : str, optional
        ``datasets`` cache folder (hub only).

    Raises
    ------
    DataError
        See :func:`read_squad_file`; missing files; no hub access.
    """
    dd, spec, _ = _load_raw(task_cfg, cache_dir)
    return dd, spec


# ---------------------------------------------------------------------------------------------
# Features (run_qa's prepare_train_features + prepare_validation_features in one)
# ---------------------------------------------------------------------------------------------


def prepare_features(examples: Mapping[str, List[Any]], tokenizer: Any, max_length: int,
                     doc_stride: int) -> Dict[str, List[Any]]:
    """Tokenize a batch of questions into overlapping windows of their contexts.

    As Hugging Face's ``run_qa.py``: the question (left-stripped) and the context form one pair,
    only the context is truncated, windows overlap by ``doc_stride`` tokens. Every position the
    tokenizer returns is used as is; nothing is re-tokenized by hand. Training targets use the
    first gold answer (as run_qa); a window that does not contain it whole, and an unanswerable
    question, target the CLS position. No padding here (batches are padded by
    :func:`nni_effbert.data.batches.collate`).

    Parameters
    ----------
    examples : dict of lists
        Columns ``id, context, question, answers`` (a ``datasets`` batch).
    tokenizer : transformers fast tokenizer (offset mappings need one)
    max_length : int
        Tokens per window (question + context + special tokens).
    doc_stride : int
        Tokens shared by consecutive windows.

    Returns
    -------
    dict of lists
        ``input_ids, token_type_ids, attention_mask, start_positions, end_positions, example_id,
        offset_mapping`` per feature (see :class:`QAData`).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"QA needs a fast tokenizer (offset mappings); {type(tokenizer).__name__} is not one")
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]  # some SQuAD questions start with blanks
    first, second = (questions, examples["context"]) if pad_on_right else (examples["context"], questions)
    # A question that leaves no more than doc_stride context tokens per window makes the Rust
    # tokenizer panic (an uncatchable-looking PanicException): say which question instead.
    special = tokenizer.num_special_tokens_to_add(pair=True)
    q_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for qid, n in zip(examples["id"], q_lengths):
        if max_length - special - n <= doc_stride:
            raise DataError(f"question {qid}: its {n} tokens leave {max_length - special - n} context tokens per "
                            f"window, not more than task.doc_stride ({doc_stride}); raise task.max_seq_length "
                            "or lower task.doc_stride")
    enc = tokenizer(
        first, second, truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, return_token_type_ids=True, return_attention_mask=True, padding=False,
    )
    context_id = 1 if pad_on_right else 0
    out: Dict[str, List[Any]] = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    out.update(start_positions=[], end_positions=[], example_id=[], offset_mapping=[])
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = enc["overflow_to_sample_mapping"][i]
        seq_ids = enc.sequence_ids(i)
        ids = enc["input_ids"][i]
        cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        start_pos = end_pos = cls_index
        answers = examples["answers"][ex]
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ctx = [t for t, s in enumerate(seq_ids) if s == context_id]
            first_tok, last_tok = ctx[0], ctx[-1]
            if offsets[first_tok][0] <= start_char and offsets[last_tok][1] >= end_char:
                # The first context token whose span ends after start_char, the last that starts before end_char.
                start_pos = next(t for t in ctx if offsets[t][1] > start_char)
                end_pos = next(t for t in reversed(ctx) if offsets[t][0] < end_char)
        out["start_positions"].append(start_pos)
        out["end_positions"].append(end_pos)
        out["example_id"].append(examples["id"][ex])
        out["offset_mapping"].append([list(o) if s == context_id else None for o, s in zip(offsets, seq_ids)])
    return out


def _features(ds: datasets.Dataset, tokenizer: Any, task_cfg: TaskConfig, fingerprint: str, desc: str) -> datasets.Dataset:
    fn = lambda batch: prepare_features(batch, tokenizer, task_cfg.max_seq_length, task_cfg.doc_stride)  # noqa: E731
    feats = ds.map(fn, batched=True, remove_columns=ds.column_names, new_fingerprint=fingerprint, desc=desc)
    # idx = the feature's position in its split: the key of the teacher-output cache.
    return feats.add_column("idx", list(range(len(feats))), new_fingerprint=digest([fingerprint, "idx"]))


def load_qa_task(task_cfg: TaskConfig, tokenizer: Any, cache_dir: Optional[str] = None,
                 store_dir: Optional[os.PathLike] = None) -> QAData:
    """Load a QA task and cut it into windows with the (teacher's) fast tokenizer.

    Parameters
    ----------
    task_cfg : TaskConfig
        See :func:`load_raw_qa`; ``max_seq_length`` (384 by default for QA) and ``doc_stride``
        (128) shape the windows.
    tokenizer : transformers fast tokenizer
    cache_dir : str, optional
        ``datasets`` cache folder (hub downloads).
    store_dir : path, optional
        Folder of snapshots (``qa-<fingerprint>/``, ``datasets.save_to_disk``): a task read from
        files is read, checked and cut into windows once per work directory, and every later
        process (each trial) loads the snapshot. The fingerprint hashes the files' contents, so
        an edited file gives a new snapshot.

    Returns
    -------
    QAData
    """
    spec = _qa_spec(task_cfg)
    snapshot: Optional[Path] = None
    if store_dir is not None:
        files = _qa_files(task_cfg, spec)
        if files is not None and all(os.path.isfile(p) for p in files.values()):
            src = _source_fingerprint(task_cfg, spec, {split: file_sha256(p) for split, p in files.items()})
            snapshot = Path(store_dir) / f"qa-{_task_fingerprint(src, tokenizer, task_cfg)}"
            if (snapshot / _SNAPSHOT_DONE).is_file():
                try:
                    return _read_snapshot(snapshot, spec)
                except (OSError, ValueError, KeyError, FileNotFoundError) as err:
                    logger.warning("QA snapshot %s is unreadable (%s); rebuilding it", snapshot, err)
    dd, spec, source = _load_raw(task_cfg, cache_dir)
    fingerprint = _task_fingerprint(source, tokenizer, task_cfg)
    feats = {split: _features(dd[split], tokenizer, task_cfg, digest([fingerprint, split]),
                              f"windows {spec.name} {split}") for split in dd}
    logger.info("task %s: %d/%d/%d train/search/dev questions -> %d/%d/%d windows, fingerprint %s", spec.name,
                len(dd["train"]), len(dd["search"]), len(dd["dev"]), len(feats["train"]), len(feats["search"]),
                len(feats["dev"]), fingerprint)
    data = QAData(train=feats["train"], search=feats["search"], dev=feats["dev"], examples=dd, spec=spec,
                  fingerprint=fingerprint)
    if snapshot is not None:
        _write_snapshot(data, snapshot)
    return data


_SNAPSHOT_DONE = "complete.json"


def _write_snapshot(data: QAData, folder: Path) -> None:
    """Save ``data`` into ``folder`` atomically (a temporary folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(folder)
    try:
        datasets.DatasetDict(train=data.train, search=data.search, dev=data.dev).save_to_disk(str(tmp / "features"))
        data.examples.save_to_disk(str(tmp / "examples"))
        atomic_write_json({"fingerprint": data.fingerprint, "task": data.spec.name}, tmp / _SNAPSHOT_DONE)
        atomic_replace_dir(tmp, folder)
    except OSError as err:  # a snapshot is an optimisation: the data in memory is still right
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not save the QA snapshot %s (%s); later processes will read the files again",
                       folder, err)


def _read_snapshot(folder: Path, spec: TaskSpec) -> QAData:
    meta = json.loads((folder / _SNAPSHOT_DONE).read_text(encoding="utf-8"))
    feats = datasets.load_from_disk(str(folder / "features"))
    examples = datasets.load_from_disk(str(folder / "examples"))
    return QAData(train=feats["train"], search=feats["search"], dev=feats["dev"], examples=examples, spec=spec,
                  fingerprint=str(meta["fingerprint"]))
