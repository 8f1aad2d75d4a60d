"""Teacher outputs computed once per (teacher, data, tokenization, layers) and shared by trials.

Every trial distils from the same teacher on the same examples, so the teacher's logits,
hidden states and attention maps are computed once and stored under
``<workdir>/cache/<key>/``, where ``key`` hashes everything the values depend on (see
:class:`CacheKey`): a changed teacher, changed data or a different set of layers gives a
new key, hence a new cache -- an old cache is never served for new inputs.

Layout (ragged: examples are stored un-padded, so no space goes to padding)
----------------------------------------------------------------------------
``meta.json``
    Key, dtype, shapes, teacher geometry, who built it. Written last: a folder with a
    ``meta.json`` whose ``complete`` flag is set is complete by construction.
``index.npz``
    ``ids`` (the dataset's ``idx`` of each example), ``lengths`` (tokens per example),
    ``tok_offsets`` ``[N + 1]`` into the token-major arrays and ``att_offsets`` ``[N + 1]``
    into the flat attention array.
``logits.npy``
    ``[N, C]`` float32 (a few bytes per example; soft targets at low temperature are
    sensitive to rounding, so these are not stored in half precision). For a question-answering
    teacher (``meta.json`` ``span_logits: true``) the start / end logits of every token,
    ``[total_tokens, 2]`` float32, token-major like ``hidden.npy``: one row per feature (window)
    of the QA data, whose ``idx`` keys the cache.
``hidden.npy``
    ``[total_tokens, n_hidden_layers, H]`` (fp16 by default), token-major: example ``e``
    owns rows ``tok_offsets[e]:tok_offsets[e + 1]``.
``attentions.npy``
    Flat (fp16 by default): example ``e`` owns ``att_offsets[e]:att_offsets[e + 1]``, which
    reshapes to ``[n_attention_layers, heads, t_e, t_e]``.

All arrays are ``.npy`` files opened as read-only ``numpy.memmap``, so concurrent trials
share one copy through the page cache.

Concurrency
-----------
The first process takes ``<workdir>/cache/<key>.lock`` (``filelock``), builds into a
hidden temporary folder and renames it to ``<key>/`` atomically; processes arriving
meanwhile block on the lock and then open the finished folder. A builder killed midway
leaves only its temporary folder (removed by the next builder) and releases the lock
when it dies. ``filelock`` uses ``fcntl`` locks, which local file systems and NFSv4
honour; on shared storage without working locks, build the cache once before starting
concurrent trials.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, DataError, DiskFullError, EffBertError
from ..io import atomic_replace_dir, atomic_write_json, disk_full_guard, load_json, make_tmp_dir
from .losses import TeacherBatch
from .teacher import is_span_teacher, load_teacher, prepare_teacher, teacher_fingerprint, teacher_outputs

__all__ = ["CACHE_FORMAT", "CacheKey", "TeacherCache", "TeacherBatch", "dataset_token_hash"]

logger = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout changes (part of every key).
CACHE_FORMAT = 1
_DTYPES = ("float16", "float32")


def dataset_token_hash(dataset) -> str:
    """Hash of a tokenized dataset's content: ``input_ids``, ``token_type_ids`` and ``idx``.

    This pins the cache to the exact tokenization (tokenizer, max length, truncation, row
    selection), whatever fingerprint the data loader computed.
    """
    table = dataset.with_format("arrow")[:]
    h = hashlib.sha256()
    for name in ("input_ids", "token_type_ids", "idx"):
        if name not in table.column_names:
            h.update(f"{name}:absent".encode())
            continue
        col = table.column(name).combine_chunks()
        h.update(name.encode())
        if hasattr(col, "offsets"):  # list column: hash the lengths and the values
            lengths = np.diff(np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64))
            h.update(lengths.tobytes())
            h.update(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
        else:
            h.update(np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached values depend on.

    Attributes
    ----------
    teacher : str
        :func:`~nni_effbert.kd.teacher.teacher_fingerprint` of the teacher folder.
    data : str
        The task data's fingerprint (``TaskData.fingerprint``).
    split : str
        ``"train"``, ``"dev"``, ...
    tokens : str
        :func:`dataset_token_hash` of the split's tokenized rows.
    hidden_layers : tuple of int
        Teacher ``hidden_states`` indices stored (0 = embedding output).
    attention_layers : tuple of int
        Teacher layers (1-based) whose attention maps are stored.
    dtype : str
        Storage dtype of hidden states and attentions.
    format : int
        :data:`CACHE_FORMAT`.
    """

    teacher: str
    data: str
    split: str
    tokens: str
    hidden_layers: Tuple[int, ...]
    attention_layers: Tuple[int, ...]
    dtype: str = "float16"
    format: int = CACHE_FORMAT

    @property
    def name(self) -> str:
        """Folder name: ``<split>-<16 hex digits of the key's hash>``."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.split)
        return f"{safe_split}-{hashlib.sha256(blob).hexdigest()[:16]}"


class TeacherCache:
    """Read-only view of a complete teacher-output cache folder.

    Use :meth:`open_or_build` to get one; the constructor only opens an existing folder.

    Attributes
    ----------
    folder : Path
    meta : dict
        Contents of ``meta.json``.
    built : bool
        True if this process built the cache (False if it was found on disk).
    hidden_layers, attention_layers : tuple of int
    """

    def __init__(self, folder: Union[str, os.PathLike], built: bool = False):
        self.folder = Path(folder)
        self.built = built
        hint = f"delete {self.folder} and re-run; the cache is rebuilt automatically"
        self.meta: Dict[str, Any] = load_json(self.folder / "meta.json", "teacher-output cache metadata", hint=hint)
        if not self.meta.get("complete") or self.meta.get("format") != CACHE_FORMAT:
            raise CheckpointError(f"teacher-output cache {self.folder} is incomplete or of another format; {hint}")
        self.hidden_layers = tuple(self.meta["key"]["hidden_layers"])
        self.attention_layers = tuple(self.meta["key"]["attention_layers"])
        self.num_heads = int(self.meta["num_heads"])
        self.span_logits = bool(self.meta.get("span_logits", False))  # absent in caches of classification teachers
        self.hidden_size = int(self.meta["hidden_size"])
        try:
            with np.load(self.folder / "index.npz") as index:
                self.ids = index["ids"]
                self.lengths = index["lengths"]
                self.tok_offsets = index["tok_offsets"]
                self.att_offsets = index["att_offsets"]
            self.logits = np.load(self.folder / "logits.npy", mmap_mode="r")
            self.hidden = np.load(self.folder / "hidden.npy", mmap_mode="r") if self.hidden_layers else None
            self.attentions = np.load(self.folder / "attentions.npy", mmap_mode="r") if self.attention_layers else None
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"teacher-output cache {self.folder} is damaged ({exc}); {hint}") from exc
        n = len(self.ids)
        expected = {
            "logits": (int(self.tok_offsets[-1]), 2) if self.span_logits else (n, int(self.meta["num_labels"])),
            "hidden": (int(self.tok_offsets[-1]), len(self.hidden_layers), self.hidden_size) if self.hidden_layers else None,
            "attentions": (int(self.att_offsets[-1]),) if self.attention_layers else None,
        }
        for name, shape in expected.items():
            arr = getattr(self, name)
            if shape is not None and tuple(arr.shape) != shape:
                raise CheckpointError(f"teacher-output cache {self.folder}: {name} has shape {arr.shape}, expected {shape}; {hint}")
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        self._order = order

    # -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"TeacherCache({self.folder.name}, examples={len(self)}, hidden_layers={list(self.hidden_layers)}, "
            f"attention_layers={list(self.attention_layers)}, dtype={self.meta['key']['dtype']})"
        )

    def positions(self, idx) -> np.ndarray:
        """Row positions in the cache of dataset ids ``idx``.

        Raises
        ------
        DataError
            If an id is not in the cache (the batch comes from other data).
        """
        ids = np.asarray(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        where = np.searchsorted(self._sorted_ids, ids)
        where = np.clip(where, 0, len(self._sorted_ids) - 1)
        missing = ids[self._sorted_ids[where] != ids]
        if missing.size:
            raise DataError(
                f"examples with idx {missing[:5].tolist()} are not in the teacher-output cache {self.folder.name}; "
                "the batch does not come from the data the cache was built for"
            )
        return self._order[where]

    def get(self, idx, max_len: Optional[int] = None, device: Union[str, torch.device, None] = None) -> TeacherBatch:
        """Teacher outputs for a batch, right-padded like :func:`nni_effbert.data.collate`.

        Parameters
        ----------
        idx : LongTensor ``[B]``
            The batch's ``idx`` column.
        max_len : int, optional
            Padded length ``T`` of the batch (its ``input_ids.shape[1]``); defaults to the
            longest example.
        device : optional
            Where to put the tensors. To a GPU they go from pinned memory with
            ``non_blocking`` copies (the storage dtype is kept: no conversion on the host).

        Returns
        -------
        TeacherBatch
            ``logits [B, C]`` (float32; ``[B, T, 2]`` start / end logits of a QA teacher, 0 at
            padded positions); ``hidden_states``: one ``[B, T, H]`` per stored
            layer; ``attentions``: one ``[B, heads, T, T]`` per stored layer, both in the
            storage dtype (fp16 by default; the KD losses compute in float32). Padded
            positions are 0.
        """
        pos = self.positions(idx)
        lens = self.lengths[pos]
        longest = int(lens.max()) if len(lens) else 0
        T = longest if max_len is None else int(max_len)
        if T < longest:
            raise ValueError(f"max_len={T} is shorter than the longest example of the batch ({longest} tokens)")
        B = len(pos)
        if self.span_logits:
            buf = np.zeros((B, T, 2), dtype=np.float32)
            for b, p in enumerate(pos):
                t, off = int(lens[b]), int(self.tok_offsets[p])
                buf[b, :t] = self.logits[off : off + t]
            logits = torch.from_numpy(buf)
        else:
            logits = torch.from_numpy(np.ascontiguousarray(self.logits[pos], dtype=np.float32))
        hidden = []
        if self.hidden is not None:
            buf = np.zeros((len(self.hidden_layers), B, T, self.hidden_size), dtype=self.hidden.dtype)
            for b, p in enumerate(pos):
                t, off = int(lens[b]), int(self.tok_offsets[p])
                buf[:, b, :t] = self.hidden[off : off + t].transpose(1, 0, 2)
            hidden = list(torch.from_numpy(buf).unbind(0))
        atts = []
        if self.attentions is not None:
            n_att, heads = len(self.attention_layers), self.num_heads
            buf = np.zeros((n_att, B, heads, T, T), dtype=self.attentions.dtype)
            for b, p in enumerate(pos):
                t, off = int(lens[b]), int(self.att_offsets[p])
                buf[:, b, :, :t, :t] = self.attentions[off : off + n_att * heads * t * t].reshape(n_att, heads, t, t)
            atts = list(torch.from_numpy(buf).unbind(0))
        batch = TeacherBatch(logits=logits, hidden_states=hidden, attentions=atts)
        if device is None:
            return batch
        device = torch.device(device)
        if device.type != "cuda":
            return batch.to(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return TeacherBatch(move(logits), [move(h) for h in hidden], [move(a) for a in atts])

    # -----------------------------------------------------------------------------------

    @staticmethod
    def make_key(
        teacher_path: Union[str, os.PathLike],
        dataset,
        *,
        data_fingerprint: str,
        split: str,
        hidden_layers: Sequence[int],
        attention_layers: Sequence[int],
        dtype: str = "float16",
    ) -> CacheKey:
        """The :class:`CacheKey` of a cache (hashes the teacher files and the tokenized rows)."""

        if dtype not in _DTYPES:
            raise ConfigError(f"cache dtype must be one of {_DTYPES}, not {dtype!r}")
        if not hidden_layers and not attention_layers:
            logger.debug("teacher cache without hidden states or attentions: logits only")
        return CacheKey(
            teacher=teacher_fingerprint(teacher_path),
            data=str(data_fingerprint),
            split=str(split),
            tokens=dataset_token_hash(dataset),
            hidden_layers=tuple(int(h) for h in hidden_layers),
            attention_layers=tuple(int(a) for a in attention_layers),
            dtype=dtype,
        )

    @classmethod
    def open_or_build(
        cls,
        workdir: Union[str, os.PathLike],
        teacher_path: Union[str, os.PathLike],
        dataset,
        *,
        data_fingerprint: str,
        split: str,
        hidden_layers: Sequence[int],
        attention_layers: Sequence[int],
        pad_token_id: int = 0,
        batch_size: int = 32,
        dtype: str = "float16",
        model: Optional[torch.nn.Module] = None,
        progress: bool = True,
        lock_timeout: float = -1,
        device: Union[str, torch.device, None] = None,
    ) -> "TeacherCache":
        """Open the cache for these inputs, building it first if no process has yet.

        Parameters
        ----------
        workdir : path
            Experiment work directory; the cache lives in ``<workdir>/cache/``.
        teacher_path : path
            Fine-tuned teacher folder (fingerprinted into the key; loaded only to build).
        dataset : datasets.Dataset
            Un-padded tokenized split with ``input_ids``, ``attention_mask``, ``idx`` and
            optionally ``token_type_ids``.
        data_fingerprint : str
            ``TaskData.fingerprint``.
        split : str
            Split name, part of the key and the folder name.
        hidden_layers, attention_layers : sequence of int
            Teacher layers to store, e.g. ``KDLoss.teacher_hidden_layers`` and
            ``KDLoss.teacher_attention_layers``.
        pad_token_id : int
            Padding id used while building (values at padded positions are not stored).
        batch_size : int
            Teacher batch size while building.
        dtype : {'float16', 'float32'}
            Storage dtype of hidden states and attentions.
        model : torch.nn.Module, optional
            The teacher already in memory (must be the one in ``teacher_path``); loaded
            from ``teacher_path`` when needed otherwise.
        progress : bool
            tqdm progress bar while building.
        lock_timeout : float
            Seconds to wait for another builder (-1: wait as long as it takes).
        device : optional
            Where the teacher runs while building (``runtime.device``; default CPU). It runs in
            fp32 whatever ``runtime.precision``: the cache is shared by every trial, so its
            values must not depend on one run's precision (the stored dtype is ``dtype``).

        Returns
        -------
        TeacherCache
        """
        key = cls.make_key(
            teacher_path, dataset, data_fingerprint=data_fingerprint, split=split,
            hidden_layers=hidden_layers, attention_layers=attention_layers, dtype=dtype,
        )
        root = Path(workdir) / "cache"
        final = root / key.name
        if _is_complete(final):  # fast path: no lock, no writes (works on read-only storage)
            logger.info("using teacher-output cache %s", final)
            return cls(final)
        try:
            return cls._build_locked(root, final, key, teacher_path, dataset, model, pad_token_id,
                                     batch_size, progress, lock_timeout, device)
        except PermissionError as exc:
            raise ConfigError(
                f"cannot write the teacher-output cache under {root}: {exc}; make the work directory "
                "writable or choose another workdir"
            ) from exc

    @classmethod
    def _build_locked(cls, root: Path, final: Path, key: CacheKey, teacher_path, dataset, model,
                      pad_token_id: int, batch_size: int, progress: bool, lock_timeout: float,
                      device=None) -> "TeacherCache":
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f"{key.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("teacher-output cache %s is being built by another process; waiting", final)
            try:
                lock.acquire(timeout=lock_timeout)
            except Timeout as exc:
                raise EffBertError(
                    f"timed out after {lock_timeout}s waiting for {lock.lock_file}, held by another "
                    "process building the teacher-output cache"
                ) from exc
        try:
            if _is_complete(final):  # built while we waited
                logger.info("using teacher-output cache %s built by another process", final)
                return cls(final)
            for stale in root.glob(f".{key.name}.tmp-*"):  # left by a builder that died
                logger.warning("removing stale cache build folder %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            with disk_full_guard(final):
                tmp = make_tmp_dir(final)
                try:
                    _build(tmp, key, teacher_path, dataset, model, pad_token_id, batch_size, progress, device)
                    atomic_replace_dir(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            return cls(final, built=True)
        finally:
            lock.release()


def _reserve(path: Path) -> None:
    """Allocate the blocks of a freshly created memory-mapped file now.

    A memmap's file is sparse: on a full disk, writing its pages raises SIGBUS and kills the
    process without a word. Reserved up front, a full disk is an ``ENOSPC`` here instead
    (``disk full while writing ...``, the build folder removed).
    """
    if not path.is_file() or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    return  # the file system cannot reserve (some network mounts): as before
                raise
    finally:
        os.close(fd)


def _is_complete(folder: Path) -> bool:
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _build(tmp: Path, key: CacheKey, teacher_path, dataset, model, pad_token_id: int, batch_size: int, progress: bool,
           device=None) -> None:
    """Compute the teacher outputs of ``dataset`` into the empty folder ``tmp`` (teacher on ``device``)."""

    for col in ("input_ids", "attention_mask"):
        if col not in dataset.column_names:
            raise DataError(f"dataset for the teacher cache has no {col!r} column (columns: {dataset.column_names})")
    n = len(dataset)
    if n == 0:
        raise DataError(f"cannot build a teacher-output cache for the empty {key.split!r} split")
    table = dataset.with_format("arrow")[:]
    ids_col = table.column("idx").to_numpy() if "idx" in table.column_names else np.arange(n)
    ids = np.asarray(ids_col, dtype=np.int64)
    if len(np.unique(ids)) != n:
        raise DataError(f"the {key.split!r} split has duplicate idx values; the cache addresses examples by idx")
    input_offsets = np.asarray(table.column("input_ids").combine_chunks().offsets.to_numpy(zero_copy_only=False))
    lengths = np.diff(input_offsets).astype(np.int64)
    if (lengths == 0).any():
        raise DataError(f"the {key.split!r} split has examples with no tokens")

    if model is None:
        model, _ = load_teacher(str(teacher_path))
    model = prepare_teacher(model)
    if device is not None:
        model.to(device)
    run_on = next(model.parameters()).device
    cfg = model.config
    max_id = int(table.column("input_ids").combine_chunks().flatten().to_numpy().max())
    if max_id >= cfg.vocab_size:
        raise DataError(
            f"the {key.split!r} split has token id {max_id} but the teacher's vocabulary has "
            f"{cfg.vocab_size} entries: the data was tokenized with another tokenizer than the "
            "teacher's; tokenize it with the teacher's tokenizer"
        )
    heads, hidden_size, num_labels = int(cfg.num_attention_heads), int(cfg.hidden_size), int(cfg.num_labels)
    span = is_span_teacher(cfg) or hasattr(model, "qa_outputs")  # start / end logits per token
    n_h, n_a = len(key.hidden_layers), len(key.attention_layers)

    tok_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    att_offsets = np.concatenate([[0], np.cumsum(n_a * heads * lengths**2)]).astype(np.int64)
    itemsize = np.dtype(key.dtype).itemsize
    logit_rows = int(tok_offsets[-1]) if span else n
    logit_cols = 2 if span else num_labels
    need = (int(tok_offsets[-1]) * n_h * hidden_size + int(att_offsets[-1])) * itemsize + logit_rows * logit_cols * 4
    free = shutil.disk_usage(tmp).free
    logger.info(
        "building teacher-output cache %s: %d examples, %d tokens, %.1f MB",
        key.name, n, int(tok_offsets[-1]), need / 2**20,
    )
    if need > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {tmp.parent / key.name}: the teacher-output cache needs "
            f"{need / 2**30:.3f} GiB but {tmp.parent} has {free / 2**30:.3f} GiB free; free some space, use fewer "
            "train rows (task.train_fraction / max_train_rows), or fewer distilled layers"
        )

    logits = open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float32, shape=(logit_rows, logit_cols))
    hidden = open_memmap(tmp / "hidden.npy", mode="w+", dtype=key.dtype, shape=(int(tok_offsets[-1]), n_h, hidden_size)) if n_h else None
    atts = open_memmap(tmp / "attentions.npy", mode="w+", dtype=key.dtype, shape=(int(att_offsets[-1]),)) if n_a else None
    for name in ("logits.npy", "hidden.npy", "attentions.npy"):
        _reserve(tmp / name)
    limit = float(np.finfo(key.dtype).max)

    # Longest first: similar lengths share a batch (little padding) and the biggest batch
    # runs first, so running out of memory happens at once, not at the end.
    order = np.argsort(-lengths, kind="stable")
    input_ids = table.column("input_ids").to_pylist()
    types = table.column("token_type_ids").to_pylist() if "token_type_ids" in table.column_names else None
    n_batches = (n + batch_size - 1) // batch_size
    for start in tqdm(range(0, n, batch_size), total=n_batches, desc=f"teacher cache ({key.split})", disable=not progress):
        rows = order[start : start + batch_size]
        T = int(lengths[rows].max())
        ids_t = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(rows), T), dtype=torch.long)
        type_t = torch.zeros((len(rows), T), dtype=torch.long) if types is not None else None
        for b, r in enumerate(rows):
            t = int(lengths[r])
            ids_t[b, :t] = torch.tensor(input_ids[r])
            mask_t[b, :t] = 1
            if type_t is not None:
                type_t[b, :t] = torch.tensor(types[r])
        if run_on.type != "cpu":
            ids_t, mask_t = ids_t.to(run_on), mask_t.to(run_on)
            type_t = type_t.to(run_on) if type_t is not None else None
        out = teacher_outputs(model, ids_t, mask_t, type_t, key.hidden_layers, key.attention_layers)
        if span:
            if out.logits.dim() != 3:
                raise EffBertError("the teacher looked like a question-answering model but returned "
                                   f"logits of shape {tuple(out.logits.shape)}, not [B, T, 2]")
            lg = out.logits.float().cpu().numpy()
            for b, r in enumerate(rows):
                t, off = int(lengths[r]), int(tok_offsets[r])
                logits[off : off + t] = lg[b, :t]
        else:
            logits[rows] = out.logits.float().cpu().numpy()
        if n_h:
            hs = torch.stack(out.hidden_states, dim=2).float().cpu().numpy()  # [B, T, n_h, H]
            if np.abs(hs).max() > limit:
                raise EffBertError(f"teacher hidden states exceed the {key.dtype} range; build the cache with dtype='float32'")
            for b, r in enumerate(rows):
                t, off = int(lengths[r]), int(tok_offsets[r])
                hidden[off : off + t] = hs[b, :t]
        if n_a:
            at = torch.stack(out.attentions, dim=1).float().cpu().numpy()  # [B, n_a, heads, T, T]
            for b, r in enumerate(rows):
                t, off = int(lengths[r]), int(att_offsets[r])
                atts[off : off + n_a * heads * t * t] = at[b, :, :, :t, :t].reshape(-1)
    if not np.isfinite(np.asarray(logits)).all():
        raise EffBertError("the teacher produced non-finite logits; the teacher checkpoint is broken")
    for arr, name in ((logits, "logits.npy"), (hidden, "hidden.npy"), (atts, "attentions.npy")):
        if arr is not None:
            arr.flush()
            _fsync_file(tmp / name)
    del logits, hidden, atts
    with open(tmp / "index.npz", "wb") as f:
        np.savez(f, ids=ids, lengths=lengths, tok_offsets=tok_offsets, att_offsets=att_offsets)
        f.flush()
        os.fsync(f.fileno())
    meta = {
        "complete": True,
        "format": CACHE_FORMAT,
        "key": asdict(key),
        "teacher_path": str(Path(teacher_path).resolve()),
        "num_examples": n,
        "total_tokens": int(tok_offsets[-1]),
        "num_labels": num_labels,
        "span_logits": span,
        "num_heads": heads,
        "hidden_size": hidden_size,
        "shapes": {
            "logits": [logit_rows, logit_cols],
            "hidden": [int(tok_offsets[-1]), n_h, hidden_size] if n_h else None,
            "attentions": [int(att_offsets[-1])] if n_a else None,
        },
        "built_by": {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    atomic_write_json(meta, tmp / "meta.json")  # last: its presence marks completeness
