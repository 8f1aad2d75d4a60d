"""Task data through the ``datasets`` library: GLUE TSVs, the hub, or users' own files.

Every path ends in the same layout, so code downstream never looks at file formats:

* :func:`load_raw_task` -> ``DatasetDict(train, search, dev)`` with the task's text columns (hub
  spelling) and an integer ``label`` (float for regression), after the seeded subset; ``search``
  is the held-out search split carved from the train rows (:func:`search_split_rows`);
* :func:`load_task` -> :class:`TaskData` tokenized with the teacher's tokenizer, columns
  ``input_ids, token_type_ids, attention_mask, labels, idx``, unpadded, plus a
  ``fingerprint`` that keys the teacher-output cache; ``idx`` of ``train`` and ``search`` is
  the row's position in the (subset) train file, so the two splits never share an id;
* :func:`make_loader` / :func:`collate` -> padded torch batches;
* :func:`unlabeled_texts` -> tokenized sentences for warm-up distillation.

Files are checked row by row before ``datasets`` reads them: ``pandas`` (under the csv
builder) silently pads short rows with empty strings, and a label outside the task is best
reported with its file and line.
"""
from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from ..errors import DataError
from .tasks import CUSTOM_TASK, DATA_DIR_ENV, TaskSpec, custom_task_spec, get_task_spec

if TYPE_CHECKING:  # annotations only: config assembles the sections and imports data.tasks
    from ..config import ExperimentConfig, TaskConfig

__all__ = [
    "TaskData",
    "HUB_DATASET",
    "MODEL_INPUTS",
    "load_raw_task",
    "load_task",
    "tokenizer_fingerprint",
    "collate",
    "make_loader",
    "length_sorted_batches",
    "unlabeled_texts",
    "resolve_data_dir",
    "corpus_files",
    "check_corpus_file",
    "search_split_rows",
    "label_key",
    "MAX_FIELD_CHARS",
    "scan_text_file",
]

logger = logging.getLogger(__name__)

#: Hub repository of GLUE (``load_dataset('glue', name)`` redirects to it).
HUB_DATASET = "nyu-mll/glue"
#: Columns the model consumes; ``labels`` and ``idx`` come beside them.
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# Bump when tokenization or subset logic changes, so older caches are not reused.
_FORMAT_VERSION = "effbert-data-1"
_TEXT_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json"}

#: Longest text (or label) field a task file may hold, in characters; longer ones are refused
#: with ``file:line`` before anything is cached or tokenized. ``task.max_seq_length`` truncates
#: far below it (512 tokens are a few thousand characters), and a tokenizer given one field of
#: hundreds of MB aborts the process. Corpus files hold their lines to the same limit.
MAX_FIELD_CHARS = 100_000
# Bytes read at a time when a file is scanned for its encoding.
_SCAN_CHUNK = 1 << 20
# A plain decimal number (no ``_`` separators, no ``nan``/``inf``): the labels that name a number.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

# The csv module refuses fields above 128 KiB by default; fields are held to MAX_FIELD_CHARS
# by our own check (which names the file and line), so csv's limit is lifted.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class TaskData:
    """A tokenized task.

    Attributes
    ----------
    train, dev : datasets.Dataset
        Columns ``input_ids, token_type_ids, attention_mask`` (unpadded int lists),
        ``labels`` (int, or float for regression) and ``idx`` (for ``dev``: the row position in
        the split; for ``train``: the row position in the subset train file). ``train`` holds
        only the student-train rows: the search split is not in it.
    spec : TaskSpec
        Labels, metric and columns of the task.
    fingerprint : str
        Stable hex digest of data content, tokenizer, max length, fractions, search split and seed.
    search : datasets.Dataset or None
        The held-out search split (same columns; ``idx`` = position in the subset train file,
        disjoint from ``train``'s). Candidates are scored on it; nothing trains on it. Empty
        when ``task.search_rows`` is 0.
    """

    train: datasets.Dataset
    dev: datasets.Dataset
    spec: TaskSpec
    fingerprint: str
    search: Optional[datasets.Dataset] = None


# ---------------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------------


def resolve_data_dir(task_cfg: TaskConfig) -> Optional[str]:
    """``task.data_dir``, else ``$EFFBERT_DATA_DIR``, else None (the hub)."""
    if task_cfg.data_dir:
        return task_cfg.data_dir
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return os.path.abspath(os.path.expanduser(env)) if env else None


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _task_folder(data_dir: str, spec: TaskSpec) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set task.data_dir or ${DATA_DIR_ENV})")
    train_name = f"{spec.tsv_splits['train']}.tsv"
    candidates = [root / spec.glue_dir] + sorted(
        p for p in root.iterdir() if p.is_dir() and _squash(p.name) in (_squash(spec.glue_dir), spec.name)
    )
    for folder in candidates:
        if (folder / train_name).is_file():
            return folder
    if (root / train_name).is_file():  # data_dir is the task folder itself
        return root
    found = sorted(p.name for p in root.iterdir())
    raise DataError(
        f"no {spec.glue_dir}/{train_name} under {root}; task.data_dir must be a GLUE-layout "
        f"root (holding {spec.glue_dir}/) or the {spec.glue_dir} folder itself. Found: "
        f"{', '.join(found[:20]) or 'nothing'}"
    )


def _file_format(path: str) -> str:
    fmt = _TEXT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type; use .csv, .tsv, .json or .jsonl")
    return fmt


def _sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Row-level validation of files
# ---------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages about huge fields."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value)):,} characters)"


def scan_text_file(path: Union[str, os.PathLike], *, max_line_chars: Optional[int] = None,
                   prefix: str = "") -> int:
    """Check that a file is UTF-8 text, reading it in bounded chunks (1 MiB at a time).

    Parameters
    ----------
    path : str or PathLike
        The file.
    max_line_chars : int, optional
        Refuse a line longer than this many characters (corpus files: :data:`MAX_FIELD_CHARS`).
    prefix : str
        Put before the message (a config key such as ``"warmup.corpus_file: "``).

    Returns
    -------
    int
        The number of lines.

    Raises
    ------
    DataError
        One line naming ``file:line``: a NUL byte (binary data), bytes that are not UTF-8, a
        line over ``max_line_chars``, or a read error.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, line_chars = 1, 0
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(_SCAN_CHUNK)
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    at = line + chunk.count(b"\n", 0, nul)
                    raise DataError(f"{prefix}{path}:{at}: binary data (a NUL byte), not a text file; "
                                    "give UTF-8 text")
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    at = line + err.object.count(b"\n", 0, err.start)
                    raise DataError(f"{prefix}{path}:{at}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                                    "save the file as UTF-8") from None
                parts = text.split("\n")
                if max_line_chars is not None:
                    for i, part in enumerate(parts):
                        line_chars += len(part)
                        if line_chars > max_line_chars:
                            raise DataError(
                                f"{prefix}{path}:{line + i}: line longer than {max_line_chars:,} characters "
                                "(the limit, nni_effbert.data.loading.MAX_FIELD_CHARS); split or shorten it")
                        if i < len(parts) - 1:
                            line_chars = 0
                line += len(parts) - 1
                if not chunk:
                    return line - 1 if line_chars == 0 else line
    except OSError as exc:
        raise DataError(f"{prefix}cannot read {path}: {exc.strerror or exc}") from None


def _iter_delimited(path: str, fmt: str) -> Iterator[Tuple[int, List[str]]]:
    """Yield (line number, fields) of a TSV (no quoting, as GLUE) or CSV (quoted) file."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "tsv":
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():  # pandas skips blank lines too
                    yield lineno, line.split("\t")
        else:
            reader = csv.reader(f)
            for fields in reader:
                if any(x.strip() for x in fields):
                    yield reader.line_num, fields


def _read_records(path: str, fmt: str, header: Optional[List[str]]) -> Tuple[List[str], List[Tuple[int, Dict[str, Any]]]]:
    """Read and check a file: (column names, [(line, record)]). Raises DataError."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    scan_text_file(path)  # binary or non-UTF-8 content: file and line, not a UnicodeDecodeError
    records: List[Tuple[int, Dict[str, Any]]] = []
    if fmt == "json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
            pairs = [(i + 1, r) for i, r in enumerate(rows)]  # "line" = record number here
        else:
            pairs = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    pairs.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from None
        columns: List[str] = []
        for lineno, rec in pairs:
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per record, got {type(rec).__name__}")
            for k in rec:
                if k not in columns:
                    columns.append(k)
            records.append((lineno, rec))
    else:
        rows = _iter_delimited(path, fmt)
        if header is None:
            try:
                _, columns = next(rows)
            except StopIteration:
                raise DataError(f"{path}: file is empty") from None
        else:
            columns = list(header)
        for lineno, fields in rows:
            if len(fields) != len(columns):
                raise DataError(
                    f"{path}:{lineno}: ragged row with {len(fields)} fields, expected "
                    f"{len(columns)} ({', '.join(columns)})"
                    + ("; GLUE TSVs are tab-separated without quoting" if fmt == "tsv" else "")
                )
            records.append((lineno, dict(zip(columns, fields))))
    if not records:
        raise DataError(f"{path}: file has no data rows")
    return columns, records


def _require_columns(path: str, columns: List[str], needed: Sequence[str], records) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; the file has: "
            f"{', '.join(map(repr, columns))}"
        )
    for lineno, rec in records:  # JSON records may lack keys that others have
        for c in needed:
            if rec.get(c) is None:
                raise DataError(f"{path}:{lineno}: record has no value for column {c!r}")


def label_key(value: Any) -> str:
    """The class a raw label names: the one rule of every file format (TSV, CSV, JSON, JSON
    lines, GLUE folders).

    A label is its text with surrounding spaces removed, compared exactly (case counts:
    ``Pos`` and ``pos`` are two classes). A label that is a plain decimal number (a JSON
    number, or text such as ``1``, ``1.0``, ``+1``, ``01``, ``1e0``) names that number, written
    as an integer when it is one: ``1``, ``1.0`` and JSON ``1.0`` are all the class ``1``;
    ``0.50`` is ``0.5``. JSON ``true`` / ``false`` are the classes ``true`` / ``false``.

    Parameters
    ----------
    value : object
        A label as read from a file (text, or a JSON number / boolean).

    Returns
    -------
    str
        The class name.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = str(value).strip()
    if not _NUMBER.fullmatch(text):
        return text
    try:
        return str(int(text))  # exact for long integers
    except ValueError:
        pass
    number = float(text)
    if not np.isfinite(number):  # 1e999: keep the text
        return text
    if number.is_integer():
        return str(int(number))
    return repr(number)


def _label_mapper(spec: TaskSpec):
    """Return f(raw label) -> id (or float), or None when the value is not in the task."""
    if spec.is_regression:
        def to_float(value: Any) -> Optional[float]:
            try:
                out = float(value)
            except (TypeError, ValueError):
                return None
            return out if np.isfinite(out) else None

        return to_float
    ids = {label_key(name): i for i, name in enumerate(spec.label_list or [])}
    # GLUE TSVs of SST-2, CoLA, MRPC, QQP and WNLI store ids; MNLI, QNLI and RTE store names.
    ids.update({str(i): i for i in range(spec.num_labels)} if spec.name != CUSTOM_TASK else {})

    def to_id(value: Any) -> Optional[int]:
        return ids.get(label_key(value))

    return to_id


def _check_labels(path: str, records, label_column: str, spec: TaskSpec) -> None:
    to_label = _label_mapper(spec)
    for lineno, rec in records:
        value = rec[label_column]
        if to_label(value) is None:
            allowed = "a number" if spec.is_regression else ", ".join(spec.label_list or [])
            raise DataError(
                f"{path}:{lineno}: label {_short(value)} is not in the task's label set ({allowed})"
            )


def _check_text(path: str, records, text_columns: Sequence[str], label_column: Optional[str] = None) -> None:
    limit = MAX_FIELD_CHARS
    for lineno, rec in records:
        for c in text_columns:
            if not isinstance(rec[c], str):
                raise DataError(f"{path}:{lineno}: column {c!r} must be text, got {_short(rec[c])}")
        for c in list(text_columns) + ([label_column] if label_column else []):
            if isinstance(rec[c], str) and len(rec[c]) > limit:
                raise DataError(
                    f"{path}:{lineno}: column {c!r} holds {len(rec[c]):,} characters, above the limit of "
                    f"{limit:,} per field (nni_effbert.data.loading.MAX_FIELD_CHARS); shorten or split the row"
                )


def _sort_labels(values: Sequence[str]) -> List[str]:
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(set(values), key=key)


# ---------------------------------------------------------------------------------------------
# Loading raw splits
# ---------------------------------------------------------------------------------------------


def _builder_kwargs(fmt: str, columns: List[str], header: bool) -> Dict[str, Any]:
    if fmt == "json":
        return {}
    kwargs: Dict[str, Any] = {
        # Everything as text: pandas would turn "NA" into NaN and "1" into an int.
        "features": datasets.Features({c: datasets.Value("string") for c in columns}),
        "keep_default_na": False,
        "na_filter": False,
    }
    if fmt == "tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)  # SST-2/RTE text holds quotes
    if not header:
        kwargs.update(header=None, column_names=columns)
    return kwargs


def _load_files(
    files: Mapping[str, str],
    fmt: str,
    spec: TaskSpec,
    text_columns: Sequence[str],
    label_column: str,
    header: Optional[List[str]],
    cache_dir: Optional[str],
) -> datasets.DatasetDict:
    """Validate then load split files; rename to the spec's columns and map labels to ids.

    Each split is loaded on its own: GLUE's MNLI dev file has more columns than its train file.
    """
    to_label = _label_mapper(spec)
    label_feature = (
        datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_list))
    )
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in spec.text_columns}, "label": label_feature}
    )

    def convert(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        out = {dst: [str(t) for t in batch[src]] for src, dst in zip(text_columns, spec.text_columns)}
        out["label"] = [to_label(v) for v in batch[label_column]]
        return out

    columns_of: Dict[str, List[str]] = {}
    train_classes = None
    for split, path in files.items():  # every file is checked before anything is cached
        columns, records = _read_records(path, fmt, header)
        _require_columns(path, columns, list(text_columns) + [label_column], records)
        _check_text(path, records, text_columns, label_column)
        _check_labels(path, records, label_column, spec)
        columns_of[split] = columns
        if split == "train" and not spec.is_regression:
            train_classes = {to_label(rec[label_column]) for _, rec in records}
        del records
    if train_classes is not None and len(train_classes) < 2:
        only = ", ".join(repr(spec.label_list[i]) for i in sorted(train_classes)) or "none"
        raise DataError(
            f"{files['train']}: every row of column {label_column!r} has the same class ({only}); a classification "
            "task needs at least 2 classes in its train file (set task.regression: true for a numeric target)"
        )
    out = datasets.DatasetDict()
    for split, path in files.items():
        columns = columns_of[split]
        ds = datasets.load_dataset(
            "json" if fmt == "json" else "csv",
            data_files={split: path},
            cache_dir=cache_dir,
            **_builder_kwargs(fmt, columns, header is None),
        )[split]
        key = [_FORMAT_VERSION, _sha256(path), spec.name, spec.text_columns, spec.label_list,
               spec.is_regression, list(text_columns), label_column]
        out[split] = ds.map(
            convert, batched=True, remove_columns=ds.column_names, features=features,
            new_fingerprint=_digest(key), desc=f"labels {split}",
        )
    return out


def _load_hub(spec: TaskSpec, cache_dir: Optional[str]) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(HUB_DATASET, spec.name, cache_dir=cache_dir)
    except Exception as err:  # offline machines fail in many ways (DNS, offline mode, 404...)
        raise DataError(
            f"cannot load GLUE {spec.name!r} from the datasets hub ({type(err).__name__}: {err}). "
            f"On a machine without hub access pass --data-dir, set task.data_dir, or set "
            f"${DATA_DIR_ENV} to a GLUE-layout folder holding {spec.glue_dir}/train.tsv and "
            f"{spec.glue_dir}/{spec.tsv_splits['dev']}.tsv"
        ) from err
    out = datasets.DatasetDict()
    for split, hub_split in spec.hub_splits.items():
        ds = raw[hub_split]
        keep = list(spec.text_columns) + ["label"]
        out[split] = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return out


def _subset(ds: datasets.Dataset, fraction: float, max_rows: Optional[int], seed: int) -> datasets.Dataset:
    n = len(ds)
    k = max(1, int(round(n * fraction)))
    if max_rows is not None:
        k = min(k, max_rows)
    if k >= n:
        return ds
    # A seeded permutation's prefix: a larger fraction contains every row of a smaller one.
    # Kept rows stay in file order so that idx follows the file.
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    return ds.select(keep.tolist())


def _source_fingerprint(task_cfg: TaskConfig, spec: TaskSpec) -> Dict[str, Any]:
    """What the raw data depends on (file contents, hub revision, subset)."""
    return {
        "version": _FORMAT_VERSION,
        "task": spec.name,
        "text_columns": list(spec.text_columns),
        "labels": spec.label_list,
        "regression": spec.is_regression,
        "train_fraction": task_cfg.train_fraction,
        "dev_fraction": task_cfg.dev_fraction,
        "max_train_rows": task_cfg.max_train_rows,
        "max_dev_rows": task_cfg.max_dev_rows,
        "seed": _seed(task_cfg),
        "search_rows": task_cfg.search_rows,
        "search_fraction": task_cfg.search_fraction,
    }


def _seed(task_cfg: TaskConfig) -> int:
    return 0 if task_cfg.seed is None else int(task_cfg.seed)


def search_split_rows(n: int, task_cfg: TaskConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the student-train rows and of the search rows among ``n`` train rows.

    ``task.search_rows`` rows (or ``round(task.search_fraction * n)``), at most half of ``n``
    (a warning says when the cap applies), drawn by a permutation seeded with ``task.seed``
    and independent of the subset's own permutation.

    Parameters
    ----------
    n : int
        Train rows after the seeded subset.
    task_cfg : TaskConfig

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(train_positions, search_positions)``, disjoint, together ``0..n-1``.
    """
    if task_cfg.search_fraction is not None:
        want = int(round(n * float(task_cfg.search_fraction)))
    else:
        want = int(task_cfg.search_rows or 0)
    k = min(want, n // 2)
    if k < want:
        logger.warning("task.search_rows/search_fraction asks for %d search rows but the train split has %d rows: "
                       "using %d (half), the rest trains the students", want, n, k)
    perm = np.random.default_rng([_seed(task_cfg), 0x5EA4C4]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _load_raw(task_cfg: TaskConfig, cache_dir: Optional[str]) -> Tuple[datasets.DatasetDict, TaskSpec, Dict[str, Any]]:
    source: Dict[str, Any]
    if task_cfg.name == CUSTOM_TASK:
        files = {"train": task_cfg.train_file, "dev": task_cfg.dev_file}
        for split, path in files.items():
            if not path or not os.path.isfile(path):
                raise DataError(f"task.{split}_file: file not found: {path}")
        fmts = {_file_format(p) for p in files.values()}
        if len(fmts) != 1:
            raise DataError(f"train_file and dev_file must have the same format, got {sorted(fmts)}")
        fmt = fmts.pop()
        if task_cfg.regression:
            labels = None
        else:
            cols, records = _read_records(files["train"], fmt, None)
            _require_columns(files["train"], cols, [task_cfg.label_column], records)
            labels = _sort_labels([label_key(r[task_cfg.label_column]) for _, r in records])
        spec = custom_task_spec(task_cfg.text_columns, labels, task_cfg.metric, task_cfg.regression)
        dd = _load_files(files, fmt, spec, task_cfg.text_columns, task_cfg.label_column, None, cache_dir)
        source = {split: _sha256(p) for split, p in files.items()}
    else:
        spec = get_task_spec(task_cfg.name)
        if spec.is_span:
            raise DataError(f"task {spec.name!r} is span question answering: load it with "
                            "nni_effbert.data.qa.load_qa_task (question + context windows), not load_task")
        if task_cfg.metric is not None and task_cfg.metric != spec.metric:
            spec = TaskSpec(**{**spec.__dict__, "metric": task_cfg.metric})
        data_dir = resolve_data_dir(task_cfg)
        if data_dir:
            folder = _task_folder(data_dir, spec)
            files = {s: str(folder / f"{stem}.tsv") for s, stem in spec.tsv_splits.items()}
            for split, path in files.items():
                if not os.path.isfile(path):
                    raise DataError(f"{split} file not found: {path}")
            dd = _load_files(
                files, "tsv", spec, spec.tsv_text_columns, spec.tsv_label_column,
                spec.tsv_column_names, cache_dir,
            )
            source = {split: _sha256(p) for split, p in files.items()}
        else:
            logger.info("no data_dir nor $%s: loading GLUE %s from the datasets hub", DATA_DIR_ENV, spec.name)
            dd = _load_hub(spec, cache_dir)
            source = {split: ds._fingerprint for split, ds in dd.items()}
    seed = _seed(task_cfg)
    train = _subset(dd["train"], task_cfg.train_fraction, task_cfg.max_train_rows, seed)
    train_rows, search_rows = search_split_rows(len(train), task_cfg)
    dd = datasets.DatasetDict(
        train=train.select(train_rows.tolist()) if len(search_rows) else train,
        search=train.select(search_rows.tolist()),
        dev=_subset(dd["dev"], task_cfg.dev_fraction, task_cfg.max_dev_rows, seed),
    )
    rows = {"train": train_rows, "search": search_rows}
    return dd, spec, {**_source_fingerprint(task_cfg, spec), "source": source, "_rows": rows}


def load_raw_task(task_cfg: TaskConfig, cache_dir: Optional[str] = None) -> Tuple[datasets.DatasetDict, TaskSpec]:
    """Load a task's train and dev splits, untokenized.

    Parameters
    ----------
    task_cfg : TaskConfig
        ``name`` picks a GLUE task or ``custom``. GLUE data is read from ``data_dir`` (else
        ``$EFFBERT_DATA_DIR``, else the datasets hub); custom data from ``train_file`` and
        ``dev_file`` (CSV, TSV or JSON lines). The seeded subset (``*_fraction``,
        ``max_*_rows``, ``seed``) is applied.
    cache_dir : str, optional
        ``datasets`` cache folder (default: the ``datasets`` default cache).

    Returns
    -------
    (datasets.DatasetDict, TaskSpec)
        Splits ``train`` (the student-train rows), ``search`` (the held-out search split carved
        from the train rows, see :func:`search_split_rows`) and ``dev``, with the spec's text
        columns and ``label`` (class id, or float for regression).

    Raises
    ------
    DataError
        Empty file, missing column, ragged row, label outside the task, no hub access.
    """
    dd, spec, _ = _load_raw(task_cfg, cache_dir)
    return dd, spec


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable digest of what a tokenizer does (vocab, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings that HF leaves behind in the backend.
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(
            {"vocab": sorted(tokenizer.get_vocab().items()),
             "lower": getattr(tokenizer, "do_lower_case", None),
             "special": tokenizer.all_special_tokens},
            sort_keys=True,
        )
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _tokenize(
    batch: Dict[str, List[Any]],
    indices: List[int],
    tokenizer: Any,
    text_columns: Sequence[str],
    max_length: int,
    with_labels: bool,
    row_ids: Optional[Sequence[int]] = None,
) -> Dict[str, List[Any]]:
    texts = [batch[c] for c in text_columns]
    enc = tokenizer(
        *texts, truncation=True, max_length=max_length, padding=False,
        return_token_type_ids=True, return_attention_mask=True,
    )
    out = {k: enc[k] for k in MODEL_INPUTS}
    if with_labels:
        out["labels"] = batch["label"]
    out["idx"] = list(indices) if row_ids is None else [int(row_ids[i]) for i in indices]
    return out


def _tokenize_split(
    ds: datasets.Dataset,
    tokenizer: Any,
    text_columns: Sequence[str],
    max_length: int,
    fingerprint: str,
    with_labels: bool,
    desc: str,
    row_ids: Optional[Sequence[int]] = None,
) -> datasets.Dataset:
    fn = functools.partial(
        _tokenize, tokenizer=tokenizer, text_columns=list(text_columns),
        max_length=max_length, with_labels=with_labels, row_ids=row_ids,
    )
    # Our own fingerprint names the cache file: datasets' default hashes the tokenizer object
    # with dill, which is not stable across processes for every tokenizer.
    return ds.map(
        fn, batched=True, with_indices=True, remove_columns=ds.column_names,
        new_fingerprint=fingerprint, desc=desc,
    )


def load_task(task_cfg: TaskConfig, tokenizer: Any, cache_dir: Optional[str] = None) -> TaskData:
    """Load and tokenize a task with the (teacher's) tokenizer.

    Parameters
    ----------
    task_cfg : TaskConfig
        See :func:`load_raw_task`; ``max_seq_length`` truncates (no padding here).
    tokenizer : transformers tokenizer
        Called as ``tokenizer(text_a[, text_b], truncation=True, max_length=...)``.
    cache_dir : str, optional
        ``datasets`` cache folder; tokenized splits are cached there by fingerprint.

    Returns
    -------
    TaskData
    """
    with _drop_new_cache_on_failure(cache_dir):
        dd, spec, source = _load_raw(task_cfg, cache_dir)
        rows = source.pop("_rows")
        fingerprint = _digest(
            {**source, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": task_cfg.max_seq_length}
        )
        splits = {
            split: _tokenize_split(
                dd[split], tokenizer, spec.text_columns, task_cfg.max_seq_length,
                _digest([fingerprint, split]), True, f"tokenize {spec.name} {split}", rows.get(split),
            )
            for split in ("train", "search", "dev")
        }
    logger.info(
        "task %s: %d train / %d search (held out from train) / %d dev rows, fingerprint %s",
        spec.name, len(splits["train"]), len(splits["search"]), len(splits["dev"]), fingerprint,
    )
    return TaskData(train=splits["train"], dev=splits["dev"], spec=spec, fingerprint=fingerprint,
                    search=splits["search"])


def _tree(folder: str) -> set:
    found = set()
    for root, dirs, files in os.walk(folder):
        found.update(os.path.join(root, name) for name in dirs + files)
    return found


@contextmanager
def _drop_new_cache_on_failure(cache_dir: Optional[str]) -> Iterator[None]:
    """On any failure inside the block (an exception, MemoryError, Ctrl-C), remove what the block
    added to ``cache_dir`` and nothing else: caches of earlier runs stay, a half-built one of this
    run (a builder's Arrow copy of a huge file, tokenized splits) does not linger.

    The ``datasets`` default cache (``cache_dir`` None) is left alone.
    """
    if not cache_dir:
        yield
        return
    before = _tree(cache_dir) if os.path.isdir(cache_dir) else set()
    try:
        yield
    except BaseException:
        added = sorted(_tree(cache_dir) - before) if os.path.isdir(cache_dir) else []
        # A new folder holds only new entries: remove the topmost new paths whole.
        top = [p for p in added if os.path.dirname(p) not in added]
        for path in top:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if top:
            logger.warning("data loading failed: removed %d partial cache entr%s it had written under %s",
                           len(top), "y" if len(top) == 1 else "ies", cache_dir)
        raise


def _non_blank(text: str) -> bool:
    return bool(text.strip())


def corpus_files(value: Union[str, Sequence[str], None]) -> List[str]:
    """``warmup.corpus_file`` / ``distill.corpus_file`` as a list of paths (empty when unset)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def check_corpus_file(path: str, key: str = "warmup.corpus_file") -> None:
    """Check that a corpus file exists, is readable UTF-8 text and has a non-blank line.

    The whole file is scanned in bounded chunks (:func:`scan_text_file`), so a bad byte or an
    over-long line anywhere is reported with its line before ``datasets`` reads the file.

    Raises
    ------
    DataError
        One line naming the file (and line) and what is wrong: missing, a folder, unreadable,
        binary (a NUL byte), not UTF-8, a line over :data:`MAX_FIELD_CHARS` characters, or
        empty (no non-blank line).
    """
    if not os.path.exists(path):
        raise DataError(f"{key}: file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{key}: {path} is not a file (give plain-text files, one sentence per line)")
    scan_text_file(path, max_line_chars=MAX_FIELD_CHARS, prefix=f"{key}: ")
    try:
        with open(path, "rb") as f:
            if not any(line.strip() for line in f):
                raise DataError(f"{key}: {path}: corpus file is empty (it needs one sentence per line)")
    except OSError as exc:
        raise DataError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def unlabeled_texts(cfg: ExperimentConfig, tokenizer: Any, cache_dir: Optional[str] = None, *,
                    corpus: Union[str, Sequence[str], None] = None, key: str = "warmup.corpus_file",
                    max_rows: Optional[int] = None, seed: int = 0) -> datasets.Dataset:
    """Tokenized unlabeled text for warm-up distillation.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``warmup.corpus_file`` (plain text, one sentence per line; one file or a list) when
        set, else the task's student-train rows (after the seeded subset, without the search
        split; sentence pairs stay pairs, as the teacher sees them; ``idx`` = position in the
        subset train file). Truncated to ``warmup.max_seq_length`` or ``task.max_seq_length``.
    tokenizer : transformers tokenizer
    cache_dir : str, optional
        ``datasets`` cache folder.
    corpus : str or list of str, optional
        Corpus file(s) to read instead of ``warmup.corpus_file`` (``distill.corpus_file``).
    key : str
        Config key named in errors.
    max_rows : int, optional
        Keep a seeded random subset of this many corpus lines (the lines a phase of
        ``steps x batch_size`` can see), so that caching the teacher's outputs costs what is used.
    seed : int
        Seeds that subset.

    Returns
    -------
    datasets.Dataset
        Columns ``input_ids, token_type_ids, attention_mask, idx``. Its ``_fingerprint`` is a
        stable key of text, tokenizer and max length.

    Raises
    ------
    DataError
        A corpus file that is missing, unreadable, binary or empty (see :func:`check_corpus_file`).
    """
    max_length = cfg.warmup.max_seq_length or cfg.task.max_seq_length
    tok_fp = tokenizer_fingerprint(tokenizer)
    files = corpus_files(cfg.warmup.corpus_file if corpus is None else corpus)
    for path in files:
        check_corpus_file(path, key)
    with _drop_new_cache_on_failure(cache_dir):
        return _unlabeled(cfg, tokenizer, cache_dir, files, key, max_rows, seed, max_length, tok_fp)


def _unlabeled(cfg, tokenizer, cache_dir, files, key, max_rows, seed, max_length, tok_fp) -> datasets.Dataset:
    if files:
        raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache_dir)["train"]
        corpus_sha = [_sha256(path) for path in files]
        corpus_sha = corpus_sha[0] if len(corpus_sha) == 1 else corpus_sha  # one file: the old key
        raw = raw.filter(
            _non_blank, input_columns="text", desc="drop blank lines",
            new_fingerprint=_digest([_FORMAT_VERSION, corpus_sha, "non-blank"]),
        )
        if len(raw) == 0:
            raise DataError(f"{key}: {', '.join(files)}: the corpus is empty (it needs one sentence per line)")
        source: Dict[str, Any] = {"version": _FORMAT_VERSION, "corpus": corpus_sha}
        if max_rows is not None and len(raw) > max_rows:
            raw = raw.shuffle(seed=int(seed)).select(range(int(max_rows))).flatten_indices()
            source.update(max_rows=int(max_rows), subset_seed=int(seed))
        columns: Sequence[str] = ["text"]
    else:
        dd, spec, source = _load_raw(cfg.task, cache_dir)
        raw, columns = dd["train"], spec.text_columns
        row_ids = source.pop("_rows")["train"]
    fingerprint = _digest({**source, "unlabeled": True, "tokenizer": tok_fp, "max_seq_length": max_length})
    return _tokenize_split(raw, tokenizer, columns, max_length, fingerprint, False, "tokenize unlabeled",
                           None if files else row_ids)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def _as_rows(features: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]) -> Dict[str, List[Any]]:
    if isinstance(features, Mapping):  # a dataset slice: dict of lists
        return {k: list(v) for k, v in features.items()}
    if not features:
        raise ValueError("collate: empty batch")
    return {k: [f[k] for f in features] for k in features[0]}


def collate(
    features: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]],
    pad_token_id: int,
) -> Dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence.

    Parameters
    ----------
    features : list of dicts, or dict of lists
        Rows of a :class:`TaskData` split (``input_ids`` etc. as int lists).
    pad_token_id : int
        Filler of ``input_ids``; ``token_type_ids`` and ``attention_mask`` pad with 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids, token_type_ids, attention_mask`` as ``[B, T]`` long tensors; ``labels``
        (long, or float for regression), ``start_positions`` / ``end_positions`` (span QA) and
        ``idx`` as ``[B]`` tensors when present. Other columns (QA's ``example_id``,
        ``offset_mapping``) are left out.
    """
    cols = _as_rows(features)
    lengths = [len(ids) for ids in cols["input_ids"]]
    width = max(lengths)
    batch: Dict[str, torch.Tensor] = {}
    for name in MODEL_INPUTS:
        if name not in cols:
            if name == "token_type_ids":  # tokenizers without segment ids (RoBERTa-style)
                cols[name] = [[0] * n for n in lengths]
            elif name == "attention_mask":
                cols[name] = [[1] * n for n in lengths]
            else:
                raise KeyError(f"collate: batch has no {name!r}; columns: {sorted(cols)}")
        fill = pad_token_id if name == "input_ids" else 0
        out = torch.full((len(lengths), width), fill, dtype=torch.long)
        for i, seq in enumerate(cols[name]):
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        batch[name] = out
    if "labels" in cols:
        labels = cols["labels"]
        is_float = any(isinstance(v, float) for v in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
    for name in ("start_positions", "end_positions"):  # span QA targets (nni_effbert.data.qa)
        if name in cols:
            batch[name] = torch.tensor(cols[name], dtype=torch.long)
    if "idx" in cols:
        batch["idx"] = torch.tensor(cols["idx"], dtype=torch.long)
    return batch


def make_loader(
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_token_id: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A torch DataLoader over a tokenized split, padded per batch (to the batch's longest row).

    Batches are read from Arrow a slice at a time (one ``dataset[indices]`` call per batch),
    which is much faster than row by row. The shuffle order depends only on ``seed``.
    ``num_workers`` / ``pin_memory`` are DataLoader's (``runtime.dataloader_workers``; pinned
    batches copy to a GPU without blocking).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if shuffle:
        base = RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
    else:
        base = SequentialSampler(dataset)
    sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole index lists
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory),
    )


def length_sorted_batches(dataset: datasets.Dataset, batch_size: int, pad_token_id: int) -> Tuple[List[Dict[str, torch.Tensor]], np.ndarray]:
    """Padded batches of a split with its rows sorted by length, for inference.

    Rows of similar length share a batch, so little compute goes to padding (dev sentences of
    SST-2 range from a few to 60+ tokens). The split is read from Arrow once.

    Parameters
    ----------
    dataset : datasets.Dataset
        A tokenized split (see :class:`TaskData`).
    batch_size : int
        Rows per batch (> 0).
    pad_token_id : int

    Returns
    -------
    (list of dict, numpy.ndarray)
        The batches (as :func:`collate` returns them) and ``order``: batch rows, concatenated,
        are the dataset's rows ``order`` (so ``out[np.argsort(order)]`` restores dataset order).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    cols = dataset[:]
    lengths = np.fromiter((len(ids) for ids in cols["input_ids"]), dtype=np.int64, count=len(dataset))
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size].tolist()
        batches.append(collate({k: [v[i] for i in rows] for k, v in cols.items()}, pad_token_id))
    return batches, order
