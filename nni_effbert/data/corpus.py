"""Unlabeled text for distillation: corpus files (one sentence per line), or a task's own
training rows without their labels, tokenized and cached by ``datasets``.

Warm-up (``warmup.corpus_file``), final distillation (``distill.corpus_file``) and the transfer
set (``distill.transfer_file``) read their text through :func:`unlabeled_texts`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import datasets

from ..errors import DataError
from . import files as data_files  # MAX_FIELD_CHARS read at call time (one knob for every file)
from .files import drop_new_cache_on_failure, file_sha256, scan_text_file
from .loading import FORMAT_VERSION, digest, load_raw_with_source, tokenize_split, tokenizer_fingerprint

if TYPE_CHECKING:  # annotations only: config assembles the sections and imports data.tasks
    from ..config import ExperimentConfig

__all__ = ["corpus_files", "check_corpus_file", "unlabeled_texts"]


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
        binary (a NUL byte), not UTF-8, a line over
        :data:`~nni_effbert.data.files.MAX_FIELD_CHARS` characters, or
        empty (no non-blank line).
    """
    if not os.path.exists(path):
        raise DataError(f"{key}: file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{key}: {path} is not a file (give plain-text files, one sentence per line)")
    scan_text_file(path, max_line_chars=data_files.MAX_FIELD_CHARS, prefix=f"{key}: ")
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
    with drop_new_cache_on_failure(cache_dir):
        return _unlabeled(cfg, tokenizer, cache_dir, files, key, max_rows, seed, max_length, tok_fp)


def _unlabeled(cfg: ExperimentConfig, tokenizer, cache_dir, files, key, max_rows, seed, max_length,
               tok_fp) -> datasets.Dataset:
    if files:
        raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache_dir)["train"]
        corpus_sha = [file_sha256(path) for path in files]
        corpus_sha = corpus_sha[0] if len(corpus_sha) == 1 else corpus_sha  # one file: the old key
        raw = raw.filter(
            _non_blank, input_columns="text", desc="drop blank lines",
            new_fingerprint=digest([FORMAT_VERSION, corpus_sha, "non-blank"]),
        )
        if len(raw) == 0:
            raise DataError(f"{key}: {', '.join(files)}: the corpus is empty (it needs one sentence per line)")
        source: Dict[str, Any] = {"version": FORMAT_VERSION, "corpus": corpus_sha}
        if max_rows is not None and len(raw) > max_rows:
            raw = raw.shuffle(seed=int(seed)).select(range(int(max_rows))).flatten_indices()
            source.update(max_rows=int(max_rows), subset_seed=int(seed))
        columns: Sequence[str] = ["text"]
    else:
        dd, spec, source = load_raw_with_source(cfg.task, cache_dir)
        raw, columns = dd["train"], spec.text_columns
        row_ids = source.pop("_rows")["train"]
    fingerprint = digest({**source, "unlabeled": True, "tokenizer": tok_fp, "max_seq_length": max_length})
    return tokenize_split(raw, tokenizer, columns, max_length, fingerprint, False, "tokenize unlabeled",
                           None if files else row_ids)
