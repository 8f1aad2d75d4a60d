"""Task data through the ``datasets`` library: GLUE TSVs, the hub, or users' own files.

Every path ends in the same layout, so code downstream never looks at file formats:

* :func:`load_raw_task` -> ``DatasetDict(train, search, dev)`` with the task's text columns (hub
  spelling) and an integer ``label`` (float for regression), after the seeded subset; ``search``
  is the held-out search split carved from the train rows (:func:`search_split_rows`);
* :func:`load_task` -> :class:`TaskData` tokenized with the teacher's tokenizer, columns
  ``input_ids, token_type_ids, attention_mask, labels, idx``, unpadded, plus a
  ``fingerprint`` that keys the teacher-output cache; ``idx`` of ``train`` and ``search`` is
  the row's position in the (subset) train file, so the two splits never share an id;
* :func:`search_split_rows` -> the seeded train / search partition of the train rows.

Files are checked row by row before ``datasets`` reads them (:mod:`.files`); batches are built by
:mod:`.batches` and unlabeled text by :mod:`.corpus`.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
import numpy as np

from ..errors import DataError
from .files import (check_labels, check_text, drop_new_cache_on_failure, file_format, file_sha256, label_key,
                    label_mapper, read_records, require_columns, resolve_data_dir, sort_labels, task_folder)
from .tasks import CUSTOM_TASK, DATA_DIR_ENV, TaskConfig, TaskSpec, custom_task_spec, get_task_spec


__all__ = [
    "TaskData",
    "HUB_DATASET",
    "MODEL_INPUTS",
    "FORMAT_VERSION",
    "load_raw_task",
    "load_raw_with_source",
    "load_task",
    "tokenizer_fingerprint",
    "tokenize_split",
    "digest",
    "seeded_subset",
    "search_split_rows",
]

logger = logging.getLogger(__name__)

#: Hub repository of GLUE (``load_dataset('glue', name)`` redirects to it).
HUB_DATASET = "nyu-mll/glue"
#: Columns the model consumes; ``labels`` and ``idx`` come beside them.
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# Bump when tokenization or subset logic changes, so older caches are not reused.
FORMAT_VERSION = "effbert-data-1"

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
    to_label = label_mapper(spec)
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
        columns, records = read_records(path, fmt, header)
        require_columns(path, columns, list(text_columns) + [label_column], records)
        check_text(path, records, text_columns, label_column)
        check_labels(path, records, label_column, spec)
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
        key = [FORMAT_VERSION, file_sha256(path), spec.name, spec.text_columns, spec.label_list,
               spec.is_regression, list(text_columns), label_column]
        out[split] = ds.map(
            convert, batched=True, remove_columns=ds.column_names, features=features,
            new_fingerprint=digest(key), desc=f"labels {split}",
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


def seeded_subset(ds: datasets.Dataset, fraction: float, max_rows: Optional[int], seed: int) -> datasets.Dataset:
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
        "version": FORMAT_VERSION,
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


def load_raw_with_source(task_cfg: TaskConfig, cache_dir: Optional[str]) -> Tuple[datasets.DatasetDict, TaskSpec, Dict[str, Any]]:
    source: Dict[str, Any]
    if task_cfg.name == CUSTOM_TASK:
        files = {"train": task_cfg.train_file, "dev": task_cfg.dev_file}
        for split, path in files.items():
            if not path or not os.path.isfile(path):
                raise DataError(f"task.{split}_file: file not found: {path}")
        fmts = {file_format(p) for p in files.values()}
        if len(fmts) != 1:
            raise DataError(f"train_file and dev_file must have the same format, got {sorted(fmts)}")
        fmt = fmts.pop()
        if task_cfg.regression:
            labels = None
        else:
            cols, records = read_records(files["train"], fmt, None)
            require_columns(files["train"], cols, [task_cfg.label_column], records)
            labels = sort_labels([label_key(r[task_cfg.label_column]) for _, r in records])
        spec = custom_task_spec(task_cfg.text_columns, labels, task_cfg.metric, task_cfg.regression)
        dd = _load_files(files, fmt, spec, task_cfg.text_columns, task_cfg.label_column, None, cache_dir)
        source = {split: file_sha256(p) for split, p in files.items()}
    else:
        spec = get_task_spec(task_cfg.name)
        if spec.is_span:
            raise DataError(f"task {spec.name!r} is span question answering: load it with "
                            "nni_effbert.data.qa.load_qa_task (question + context windows), not load_task")
        if task_cfg.metric is not None and task_cfg.metric != spec.metric:
            spec = TaskSpec(**{**spec.__dict__, "metric": task_cfg.metric})
        data_dir = resolve_data_dir(task_cfg)
        if data_dir:
            folder = task_folder(data_dir, spec)
            files = {s: str(folder / f"{stem}.tsv") for s, stem in spec.tsv_splits.items()}
            for split, path in files.items():
                if not os.path.isfile(path):
                    raise DataError(f"{split} file not found: {path}")
            dd = _load_files(
                files, "tsv", spec, spec.tsv_text_columns, spec.tsv_label_column,
                spec.tsv_column_names, cache_dir,
            )
            source = {split: file_sha256(p) for split, p in files.items()}
        else:
            logger.info("no data_dir nor $%s: loading GLUE %s from the datasets hub", DATA_DIR_ENV, spec.name)
            dd = _load_hub(spec, cache_dir)
            source = {split: ds._fingerprint for split, ds in dd.items()}
    seed = _seed(task_cfg)
    train = seeded_subset(dd["train"], task_cfg.train_fraction, task_cfg.max_train_rows, seed)
    train_rows, search_rows = search_split_rows(len(train), task_cfg)
    dd = datasets.DatasetDict(
        train=train.select(train_rows.tolist()) if len(search_rows) else train,
        search=train.select(search_rows.tolist()),
        dev=seeded_subset(dd["dev"], task_cfg.dev_fraction, task_cfg.max_dev_rows, seed),
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
    dd, spec, _ = load_raw_with_source(task_cfg, cache_dir)
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


def digest(obj: Any) -> str:
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


def tokenize_split(
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
    with drop_new_cache_on_failure(cache_dir):
        dd, spec, source = load_raw_with_source(task_cfg, cache_dir)
        rows = source.pop("_rows")
        fingerprint = digest(
            {**source, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": task_cfg.max_seq_length}
        )
        splits = {
            split: tokenize_split(
                dd[split], tokenizer, spec.text_columns, task_cfg.max_seq_length,
                digest([fingerprint, split]), True, f"tokenize {spec.name} {split}", rows.get(split),
            )
            for split in ("train", "search", "dev")
        }
    logger.info(
        "task %s: %d train / %d search (held out from train) / %d dev rows, fingerprint %s",
        spec.name, len(splits["train"]), len(splits["search"]), len(splits["dev"]), fingerprint,
    )
    return TaskData(train=splits["train"], dev=splits["dev"], spec=spec, fingerprint=fingerprint,
                    search=splits["search"])
