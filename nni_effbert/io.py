"""Crash-safe file and directory writes, and checkpoint reads with clear errors.

Every artifact nni-effbert writes (checkpoints, teacher-output caches, exported models,
JSON markers) goes through this module so that a crash at any moment leaves either the old
complete file or the new complete one, never a half-written file under the final name:

* a file is written to a temporary file in the *same* folder (so the final rename never
  crosses a file system), flushed and ``fsync``-ed, then moved over the target with
  :func:`os.replace`, which POSIX guarantees to be atomic; the folder is ``fsync``-ed so
  the rename itself survives a power loss;
* a directory is built under a temporary name next to its final place and swapped in with
  :func:`atomic_replace_dir`.

Readers use :func:`load_torch` / :func:`load_json`, which turn a missing, truncated or
corrupt file into a :class:`~nni_effbert.errors.CheckpointError` that names the file and
says what to do.

A write that fails because the disk is full (``ENOSPC``, ``EDQUOT``; also as torch and
safetensors report it) raises :class:`~nni_effbert.errors.DiskFullError`
(``disk full while writing <path>``), after the temporary file or folder is removed; the
previous file is untouched (:func:`disk_full_guard`).

A writer killed by SIGKILL cannot remove its temporary file: such leftovers are named
``.<name>.<random>.tmp`` (hidden, never matched by a reader) and are safe to delete.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

from .errors import CheckpointError, ConfigError, DiskFullError

__all__ = [
    "atomic_write",
    "atomic_save_torch",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_replace_dir",
    "make_tmp_dir",
    "load_torch",
    "load_json",
    "disk_full_guard",
    "is_disk_full",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Files created by mkstemp are 0600; artifacts are shared between trials that may run
# as other users on shared storage, so new files get the usual 0644 instead.
_NEW_FILE_MODE = 0o644


def _fsync_dir(folder: Path) -> None:
    """Persist a rename inside ``folder`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (tmpfs on old kernels, network mounts) refuse; harmless
    finally:
        os.close(fd)


_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")


def is_disk_full(exc: BaseException, folder: Optional[PathLike] = None) -> bool:
    """True if ``exc`` (or an exception it was raised from or during) says the disk is full.

    torch reports a failed ``torch.save`` as ``RuntimeError`` (with the ``OSError`` as context, or
    none at all when it wrote through its own stream); safetensors as ``SafetensorError``
    naming ``os error 28``. Where nothing says why, a ``folder`` with no free block left decides.
    """
    seen = set()
    item: Optional[BaseException] = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, DiskFullError):
            return True
        if isinstance(item, OSError) and item.errno in _FULL_ERRNOS:
            return True
        if any(t in str(item).lower() for t in _FULL_TEXT):
            return True
        item = item.__cause__ or item.__context__
    if folder is not None and isinstance(exc, (OSError, RuntimeError)):
        try:
            st = os.statvfs(folder)
        except (OSError, AttributeError):
            return False
        return st.f_bavail == 0
    return False


@contextlib.contextmanager
def disk_full_guard(path: PathLike) -> Iterator[None]:
    """Turn a disk-full failure inside the block into ``DiskFullError("disk full while writing <path>")``.

    Clean-up (removing temporary files) is the block's own job; this only names the failure so
    that a trial fails with a readable reason instead of a stack trace from deep inside torch.
    """
    target = Path(path)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless the disk is full
        probe = target if target.is_dir() else target.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not is_disk_full(exc, probe):
            raise
        raise DiskFullError(errno.ENOSPC, f"disk full while writing {target}; free some space (or move the work "
                                          "directory) and run it again") from exc


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a file for writing so that it appears under ``path`` only once complete.

    Parameters
    ----------
    path : str or os.PathLike
        Final location. Missing parent folders are created.
    mode : {'wb', 'w', 'wt'}
        Binary or text write mode. Append / update modes are refused: an atomic
        replacement always writes the whole file.
    encoding : str, optional
        Text encoding (default UTF-8 in text mode).

    Yields
    ------
    file object
        A handle on a temporary file in the same folder. When the ``with`` block ends
        normally the data is flushed, fsync-ed and renamed onto ``path``; if the block
        raises, the temporary file is removed and ``path`` is left untouched.

    Examples
    --------
    >>> with atomic_write("ckpt/state.bin") as f:  # doctest: +SKIP
    ...     f.write(payload)
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(
            f"atomic_write supports modes 'wb', 'w' and 'wt', not {mode!r}: an atomic "
            "replacement rewrites the whole file, so append/update modes make no sense"
        )
    final = Path(path)
    folder = final.parent
    with disk_full_guard(final):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if "b" in mode:
            handle = os.fdopen(fd, mode)
        else:
            handle = os.fdopen(fd, mode, encoding=encoding or "utf-8")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.chmod(tmp, final.stat().st_mode & 0o777 if final.exists() else _NEW_FILE_MODE)
        except OSError:
            pass  # permissions are a nicety; never lose the data over them
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc, folder):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {final}; free some space (or move the work "
                                              "directory) and run it again") from exc
        raise
    _fsync_dir(folder)


def atomic_save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch  # local: keep ``import nni_effbert.io`` light for the CLI

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_json(obj: Any, path: PathLike, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically.

    The object is serialised *before* the temporary file is opened, so an object that
    cannot be serialised raises ``TypeError`` without touching the file system.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    atomic_write_text(text, path)


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def make_tmp_dir(final_dir: PathLike) -> Path:
    """Create an empty temporary directory next to ``final_dir``, for :func:`atomic_replace_dir`.

    Its name (``.<name>.tmp-<random>``) is hidden and unique, so concurrent builders of the
    same directory never share a scratch folder.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


_RENAME_EXCHANGE = 2  # from <linux/fs.h>


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where the call is unavailable (other OS, old libc, file system without
    support), so the caller can fall back to two renames.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def atomic_replace_dir(tmp_dir: PathLike, final_dir: PathLike) -> None:
    """Move a fully written directory ``tmp_dir`` to ``final_dir``, replacing any old one.

    Parameters
    ----------
    tmp_dir : str or os.PathLike
        The new content, complete and on the same file system as ``final_dir`` (use
        :func:`make_tmp_dir`). It no longer exists afterwards.
    final_dir : str or os.PathLike
        Destination. If it does not exist, a single ``rename`` publishes the new directory.
        If it does, the two are swapped atomically with ``renameat2(RENAME_EXCHANGE)`` on
        Linux, and the old content is then deleted; elsewhere the old directory is first
        renamed to ``.<name>.old-<random>`` -- a crash in between leaves that complete old
        copy on disk, which the next call restores or removes.

    Notes
    -----
    Files inside ``tmp_dir`` must already be flushed (files written with
    :func:`atomic_write`, ``torch.save``/``save_pretrained`` followed by this call are).
    """
    tmp = Path(tmp_dir)
    final = Path(final_dir)
    if not tmp.is_dir():
        raise FileNotFoundError(f"atomic_replace_dir: source directory {tmp} does not exist")
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _recover_dir(final)
    # Persist the files' directory entries before the directory becomes visible.
    _fsync_dir(tmp)
    try:
        os.rename(tmp, final)  # atomic when final is absent (or an empty directory)
        _fsync_dir(parent)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if final.is_file() or final.is_symlink():
        raise FileExistsError(f"atomic_replace_dir: {final} exists and is not a directory")
    if _rename_exchange(tmp, final):
        _fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
        return
    old = parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_dir(final: Path) -> None:
    """Clean up after a crash inside the two-rename fallback of :func:`atomic_replace_dir`."""
    olds = sorted(final.parent.glob(f".{final.name}.old-*"))
    if not olds:
        return
    if not final.exists():
        logger.warning("restoring %s from %s left by an interrupted replacement", final, olds[-1])
        os.rename(olds[-1], final)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def load_torch(
    path: PathLike,
    what: str,
    *,
    hint: Optional[str] = None,
    map_location: Any = "cpu",
) -> Any:
    """``torch.load`` a checkpoint safely (``weights_only=True``: tensors, containers and
    primitives only, never arbitrary pickled objects), turning every failure into a clear
    :class:`CheckpointError`.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    what : str
        What the file is, for the message (``"supernet checkpoint of stage 2"``).
    hint : str, optional
        What the user should do, e.g. ``"run `nni-effbert warmup -c exp.yml --stage 2`"``.
        A generic hint (delete the file and re-create it) is used otherwise.
    map_location : optional
        Passed to ``torch.load`` (default CPU).

    Returns
    -------
    object
        What ``torch.save`` stored.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a file, is truncated or corrupt (random bytes included),
        or holds a pickled Python object other than tensors and plain containers (which could
        run code when loaded: such a file was not written by nni-effbert and is not loaded).
    """
    import torch  # local: keep ``import nni_effbert.io`` light for the CLI

    p = Path(path)
    todo = hint or "delete it and re-run the step that creates it"
    if not p.exists():
        raise CheckpointError(f"{what} not found: {p} does not exist; {hint or 'create it first'}")
    if not p.is_file():
        raise CheckpointError(f"{what} at {p} is not a file; {todo}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} at {p} is empty (0 bytes); {todo}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words every refusal of its safe unpickler alike; only "Unsupported global" means
        # a well-formed pickle of some other object. Anything else (bad opcodes, random bytes)
        # is a damaged file. torch's own advice to turn the safe mode off is never repeated.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{what} at {p} holds a pickled Python object ({found.group(1)}) besides tensors and plain "
                f"containers; nni-effbert does not unpickle such objects (loading one can run code), so it "
                f"was not written by this version of nni-effbert; {todo}"
            ) from exc
        raise CheckpointError(f"{what} at {p} is corrupt (not a readable checkpoint); {todo}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure to deserialise means a bad file
        # torch reports truncated zip archives as RuntimeError("PytorchStreamReader ..."),
        # and non-zip garbage as whatever the legacy unpickler trips on (IndexError, ...).
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in first.lower().replace(" ", "_"):  # torch's advice to unpickle unsafely
            first = type(exc).__name__
        raise CheckpointError(f"{what} at {p} is truncated or corrupt ({first}); {todo}") from exc


def load_json(path: PathLike, what: str, *, hint: Optional[str] = None) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`, with clear errors.

    Raises
    ------
    CheckpointError
        If the file is missing or does not parse.
    """
    p = Path(path)
    todo = hint or "delete it and re-run the step that creates it"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what} not found: {p} does not exist; {hint or 'create it first'}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} at {p} cannot be read ({exc}); {todo}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} at {p} is not valid JSON ({exc}); {todo}") from exc


def read_json_object(path: PathLike, option: str) -> dict:
    """Read a user-given JSON object file (an arch dict for ``--arch`` / ``--fixed``).

    Raises
    ------
    ConfigError
        If the file is missing, not JSON, or not an object; the message names ``option``.
    """

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{option}: file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{option} {p}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {p}: expected a JSON object of label -> value, got {type(data).__name__}")
    return data
