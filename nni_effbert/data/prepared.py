"""Tokenized task data saved once per work directory and loaded from disk by every trial.

:func:`~.loading.load_task` reads and checks the task files row by row, runs the ``datasets``
builders, subsets and tokenizes (from the ``datasets`` cache when it can), and fingerprints
file contents and tokenizer: seconds per process for SST-2, paid by every nnictl trial. The
result depends only on the task config, the files and the tokenizer, so
:func:`load_prepared_task` keeps it under ``<workdir>/datasets/tasks/<key>/``
(``datasets.Dataset.save_to_disk`` of both splits + ``meta.json``) and later processes open it
with ``datasets.load_from_disk`` (memory-mapped Arrow, no tokenizing, no fingerprinting).

``key`` hashes the whole ``task`` config section, the resolved data folder, the path, size and
modification time of each data file and an ``identity`` the caller gives (the teacher folder's
files: its tokenizer and its fine-tuning marker). A changed file or setting gives a new key and
the slow path runs once again; data from the datasets hub (no files to stat) always takes the
slow path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import datasets

from ..errors import DataError
from ..io import atomic_replace_dir, atomic_write_json, make_tmp_dir
from .files import resolve_data_dir, task_folder
from .loading import TaskData, digest, load_task
from .tasks import CUSTOM_TASK, TaskConfig, TaskSpec, get_task_spec


__all__ = ["PREPARED_FORMAT", "task_files", "prepared_key", "load_prepared_task"]

logger = logging.getLogger(__name__)

#: Bumped when the layout of a prepared task changes (part of every key).
PREPARED_FORMAT = "effbert-prepared-3"  # 2: the held-out search split is saved too; 3: one label rule (1 == 1.0)


def task_files(task_cfg: TaskConfig) -> Optional[Dict[str, str]]:
    """Split -> file a task is read from; None when it comes from the datasets hub.

    Raises
    ------
    DataError
        The data folder has no file for the task (as :func:`~.loading.load_task` would say).
    """
    if task_cfg.name == CUSTOM_TASK:
        return {"train": str(task_cfg.train_file), "dev": str(task_cfg.dev_file)}
    data_dir = resolve_data_dir(task_cfg)
    if not data_dir:
        return None
    spec = get_task_spec(task_cfg.name)
    folder = task_folder(data_dir, spec)
    return {split: str(folder / f"{stem}.tsv") for split, stem in spec.tsv_splits.items()}


def _stat(path: Union[str, os.PathLike]) -> list:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def prepared_key(task_cfg: TaskConfig, identity: Sequence[Any] = ()) -> Optional[str]:
    """The key of a task's prepared data, or None when it cannot be keyed (hub data, a missing
    file: :func:`~.loading.load_task` then runs and reports what is wrong)."""
    try:
        files = task_files(task_cfg)
        if files is None:
            return None
        stamps = {split: _stat(path) for split, path in files.items()}
    except (DataError, OSError):
        return None
    return digest([PREPARED_FORMAT, dataclasses.asdict(task_cfg), resolve_data_dir(task_cfg), stamps,
                    list(identity)])


def _read(folder: Path) -> Optional[TaskData]:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        splits = {split: datasets.load_from_disk(str(folder / split)) for split in ("train", "dev")}
        splits["search"] = datasets.load_from_disk(str(folder / "search")) if meta.get("has_search") else None
        spec = TaskSpec(**meta["spec"])
        fingerprint = str(meta["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        logger.warning("prepared task data in %s cannot be read (%s); preparing it again", folder, exc)
        return None
    return TaskData(train=splits["train"], dev=splits["dev"], spec=spec, fingerprint=fingerprint,
                    search=splits["search"])


def _write(task: TaskData, folder: Path) -> None:
    tmp = make_tmp_dir(folder)
    try:
        search = getattr(task, "search", None)
        for split in ("train", "dev"):
            getattr(task, split).save_to_disk(str(tmp / split))
        if search is not None:
            search.save_to_disk(str(tmp / "search"))
        atomic_write_json({"fingerprint": task.fingerprint, "spec": dataclasses.asdict(task.spec),
                           "has_search": search is not None,
                           "rows": {"train": len(task.train), "dev": len(task.dev),
                                    "search": len(search) if search is not None else 0}}, tmp / "meta.json")
        if folder.exists():  # another process prepared it meanwhile: keep theirs (trials may read it)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            atomic_replace_dir(tmp, folder)
    except OSError as exc:  # a snapshot is a speed-up; never fail a command over it
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not save prepared task data to %s: %s", folder, exc)


def load_prepared_task(task_cfg: TaskConfig, tokenizer: Any, *, store_dir: Union[str, os.PathLike],
                       identity: Sequence[Any] = (), cache_dir: Optional[str] = None) -> TaskData:
    """:func:`~.loading.load_task`, through a snapshot in ``store_dir``.

    Parameters
    ----------
    task_cfg : TaskConfig
    tokenizer : transformers tokenizer
        Used only when the task is prepared (first call for a key).
    store_dir : path
        Folder of the snapshots (``<workdir>/datasets/tasks``).
    identity : sequence
        JSON-able description of the tokenizer's origin (e.g. names, sizes and modification
        times of the teacher folder's files): part of the key.
    cache_dir : str, optional
        ``datasets`` cache folder of the slow path.

    Returns
    -------
    TaskData
        The same columns, rows and fingerprint as :func:`~.loading.load_task` gives.
    """
    key = prepared_key(task_cfg, identity)
    if key is None:
        return load_task(task_cfg, tokenizer, cache_dir=cache_dir)
    folder = Path(store_dir) / key
    task = _read(folder)
    if task is not None:
        logger.info("task %s: %d train / %d dev rows from %s", task.spec.name, len(task.train), len(task.dev), folder)
        return task
    task = load_task(task_cfg, tokenizer, cache_dir=cache_dir)
    _write(task, folder)
    return task
