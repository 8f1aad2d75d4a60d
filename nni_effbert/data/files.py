"""Task and corpus files: where they are, and whether they can be read, before ``datasets`` reads them.

* :func:`resolve_data_dir` / :func:`task_folder`: a task's folder under ``task.data_dir`` (or
  ``$NNI_EFFBERT_DATA``);
* :func:`scan_text_file`: encoding, NUL bytes and over-long lines, in bounded chunks, named by line;
* :func:`read_records` and the row checks: ``pandas`` (under the csv builder) silently pads short
  rows with empty strings, and a label outside the task is best reported with its file and line;
* :func:`drop_new_cache_on_failure`: what a failed load added to the cache is removed, nothing else.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from .tasks import CUSTOM_TASK, DATA_DIR_ENV, TaskConfig, TaskSpec


__all__ = [
    "MAX_FIELD_CHARS",
    "resolve_data_dir",
    "task_folder",
    "file_format",
    "file_sha256",
    "scan_text_file",
    "read_records",
    "require_columns",
    "label_key",
    "label_mapper",
    "check_labels",
    "check_text",
    "sort_labels",
    "drop_new_cache_on_failure",
]

logger = logging.getLogger(__name__)

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


def task_folder(data_dir: str, spec: TaskSpec) -> Path:
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


def file_format(path: str) -> str:
    fmt = _TEXT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type; use .csv, .tsv, .json or .jsonl")
    return fmt


def file_sha256(path: Union[str, Path]) -> str:
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
                                "(the limit, nni_effbert.data.files.MAX_FIELD_CHARS); split or shorten it")
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


def read_records(path: str, fmt: str, header: Optional[List[str]]) -> Tuple[List[str], List[Tuple[int, Dict[str, Any]]]]:
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


def require_columns(path: str, columns: List[str], needed: Sequence[str], records) -> None:
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


def label_mapper(spec: TaskSpec):
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


def check_labels(path: str, records, label_column: str, spec: TaskSpec) -> None:
    to_label = label_mapper(spec)
    for lineno, rec in records:
        value = rec[label_column]
        if to_label(value) is None:
            allowed = "a number" if spec.is_regression else ", ".join(spec.label_list or [])
            raise DataError(
                f"{path}:{lineno}: label {_short(value)} is not in the task's label set ({allowed})"
            )


def check_text(path: str, records, text_columns: Sequence[str], label_column: Optional[str] = None) -> None:
    limit = MAX_FIELD_CHARS
    for lineno, rec in records:
        for c in text_columns:
            if not isinstance(rec[c], str):
                raise DataError(f"{path}:{lineno}: column {c!r} must be text, got {_short(rec[c])}")
        for c in list(text_columns) + ([label_column] if label_column else []):
            if isinstance(rec[c], str) and len(rec[c]) > limit:
                raise DataError(
                    f"{path}:{lineno}: column {c!r} holds {len(rec[c]):,} characters, above the limit of "
                    f"{limit:,} per field (nni_effbert.data.files.MAX_FIELD_CHARS); shorten or split the row"
                )


def sort_labels(values: Sequence[str]) -> List[str]:
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(set(values), key=key)


def _tree(folder: str) -> set:
    found = set()
    for root, dirs, files in os.walk(folder):
        found.update(os.path.join(root, name) for name in dirs + files)
    return found


@contextmanager
def drop_new_cache_on_failure(cache_dir: Optional[str]) -> Iterator[None]:
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
