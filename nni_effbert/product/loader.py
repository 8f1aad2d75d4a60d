"""Read an export folder back (the plugin side), and check it has not changed since it was written.

The folder's format is :mod:`nni_effbert.product.export`'s; this module holds its file names and
version, :func:`load_exported` (the pure-torch student with its weights, arch and labels) and
:func:`verify_export` (every file against the sha256 recorded in ``export_meta.json``).

``trust_remote_code=True`` makes ``transformers`` import a folder's ``*.py`` files, so
:func:`load_exported` (and so ``distill``, ``report``, ``fidelity``) verifies the hashes first and
refuses a folder whose code, weights or ``config.json`` changed since it was written.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nni_effbert.search_spaces import EfficientBertConfig, EfficientBertModel, EfficientBertSupernet

from .. import hf as hf_templates
from ..errors import CheckpointError, ConfigError
from ..io import load_json

__all__ = [
    "ExportedStudent",
    "ExportIntegrityError",
    "load_exported",
    "verify_export",
    "file_sha256",
    "folder_hashes",
    "space_of",
    "student_from_weights",
    "load_strict",
    "FORMAT_VERSION",
    "HASHES_KEY",
    "WEIGHTS_FILE",
    "ARCH_FILE",
    "ARCHITECTURE_FILE",
    "META_FILE",
    "CONFIG_FILE",
    "README_FILE",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.json"
ARCHITECTURE_FILE = "architecture.md"
META_FILE = "export_meta.json"
README_FILE = "README.md"
CONFIG_FILE = "config.json"

#: Bumped when the folder layout changes incompatibly; :func:`load_exported` checks it.
FORMAT_VERSION = 1

#: Key of ``export_meta.json`` mapping every other file of the folder to its sha256 (hex).
HASHES_KEY = "files_sha256"

PathLike = Union[str, Path]


class ExportIntegrityError(CheckpointError):
    """An export folder's files disagree with the sha256 recorded in its ``export_meta.json``
    (or the folder predates the hashes): its code, weights or config were changed since export."""


@dataclass
class ExportedStudent:
    """An export folder read back on the plugin side (see :func:`load_exported`).

    Attributes
    ----------
    model : EfficientBertModel
        The pure-torch student with the exported weights, in eval mode.
    arch : dict
        Its ``label -> value`` architecture (from ``arch.json``).
    config : EfficientBertConfig
        The search-space config it was exported with.
    id2label : dict
        Class id -> label name (``{0: 'score'}`` for regression).
    meta : dict
        The folder's ``export_meta.json`` (counts, task, caller metadata under ``extra``).
    path : Path
        The folder.
    """

    model: Any
    arch: Dict[str, Any]
    config: Any
    id2label: Dict[int, str]
    meta: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def label_names(self) -> Optional[List[str]]:
        """The class names in label order, for re-exporting; None for a span-QA student."""
        return None if self.config.head == "span" else [self.id2label[i] for i in range(len(self.id2label))]


def load_exported(path: PathLike, *, verify: bool = True) -> ExportedStudent:
    """Read an export folder back as the plugin-side pure-torch student.

    Parameters
    ----------
    path : str or Path
        A folder written by :func:`export_student`.
    verify : bool
        Check first that every file matches the sha256 recorded in ``export_meta.json``
        (:func:`verify_export`); a folder whose code, weights or ``config.json`` changed, or one
        written before the hashes, is refused.

    Returns
    -------
    ExportedStudent
        ``model`` (an ``EfficientBertModel`` in eval mode, ready for further distillation),
        ``arch``, ``config``, ``id2label``, ``meta``.

    Raises
    ------
    CheckpointError
        If the folder or one of its files is missing or corrupt, or the weights do not fit the
        architecture.
    ExportIntegrityError
        If ``verify`` and a file disagrees with its recorded sha256 (or none is recorded), or
        ``config.json``'s ``arch`` differs from ``arch.json``.
    """

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; create it with "
                              "`nni-effbert export` (or nni_effbert.product.export.export_student)")
    if verify:
        verify_export(folder)
    hint = f"re-export the student into {folder}"
    missing = [n for n in (CONFIG_FILE, ARCH_FILE, WEIGHTS_FILE, META_FILE) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not an nni-effbert export folder: missing {missing}; {hint}")
    meta = load_json(folder / META_FILE, "export metadata", hint=hint)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{folder / META_FILE}: export format version {version!r} is not "
                              f"{FORMAT_VERSION}, the one this nni-effbert reads; {hint}")
    try:
        config = EfficientBertConfig.from_dict(meta["space_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: invalid space_config ({exc}); {hint}") from exc
    arch = load_json(folder / ARCH_FILE, "architecture file", hint=hint)
    space = space_of(config)
    try:
        arch = space.validate_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{folder / ARCH_FILE}: {exc}; {hint}") from exc
    hf_config = load_json(folder / CONFIG_FILE, "model config", hint=hint)
    _check_config_arch(folder, hf_config, arch, space, hint)
    id2label = {int(k): v for k, v in (hf_config.get("id2label") or {}).items()}
    if len(id2label) != config.num_labels:
        raise CheckpointError(f"{folder / CONFIG_FILE}: id2label has {len(id2label)} labels but the "
                              f"model has num_labels={config.num_labels}; {hint}")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights {folder / WEIGHTS_FILE} are corrupt ({exc}); {hint}") from exc
    prefix = hf_templates.STUDENT_PREFIX + "."
    stray = sorted(k for k in tensors if not k.startswith(prefix))
    if stray:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: tensors {stray[:5]} lack the "
                              f"{prefix!r} prefix of exported students; {hint}")
    model = EfficientBertModel(config, arch)
    load_strict(model, {k[len(prefix):]: v for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    model.eval()
    return ExportedStudent(model=model, arch=arch, config=config, id2label=id2label, meta=meta, path=folder)


def file_sha256(path: PathLike) -> str:
    """The sha256 (hex) of a file, read in 1 MiB blocks (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_export(path: PathLike) -> Dict[str, str]:
    """Check an export folder against the sha256 recorded in its ``export_meta.json``.

    Every file listed under ``files_sha256`` must exist and hash to its recorded value, and no
    ``*.py`` file may be present that is not listed (``trust_remote_code=True`` would import
    it). ``config.json``'s ``arch`` must equal ``arch.json``.

    Parameters
    ----------
    path : str or Path
        The export folder.

    Returns
    -------
    dict
        File name -> sha256 of the files checked.

    Raises
    ------
    ExportIntegrityError
        The first disagreement, naming the file and how to fix it (re-export, or check the
        folder's origin); also for a folder written by an nni-effbert without file hashes.
    CheckpointError
        Not an export folder (no ``export_meta.json``), or an unreadable one.
    """
    folder = Path(path)
    hint = f"re-export the student into {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"export folder {folder} does not exist; create it with `nni-effbert export`")
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"{folder} is not an nni-effbert export folder: no {META_FILE}; {hint}")
    meta = load_json(folder / META_FILE, "export metadata", hint=hint)
    hashes = meta.get(HASHES_KEY) if isinstance(meta, dict) else None
    if not isinstance(hashes, dict) or not hashes:
        version = meta.get("nni_effbert_version") if isinstance(meta, dict) else None
        raise ExportIntegrityError(
            f"{folder} was exported by nni-effbert {version or '(unknown version)'}, which did not record file "
            f"hashes, so its code and weights cannot be verified; re-export it (`nni-effbert export ... --force`)")
    bad_names = [n for n in hashes if not isinstance(n, str) or Path(n).name != n or n in (".", "..", META_FILE)]
    if bad_names:
        raise ExportIntegrityError(f"{folder / META_FILE}: {HASHES_KEY} lists {bad_names[:3]}, not file names of "
                                   f"the folder; {hint}")
    for name in sorted(hashes, key=lambda n: (not n.endswith(".py"), n)):  # code first
        file = folder / name
        if not file.is_file():
            raise ExportIntegrityError(f"{file} is missing (export_meta.json records it); {hint}")
        got = file_sha256(file)
        if got != hashes[name]:
            raise ExportIntegrityError(
                f"{file} was changed after export (sha256 {got[:12]}... but export_meta.json records "
                f"{str(hashes[name])[:12]}...); do not load it with trust_remote_code; {hint}")
    stray = sorted(p.name for p in folder.glob("*.py") if p.name not in hashes)
    if stray:
        raise ExportIntegrityError(f"{folder} holds code that was not exported: {stray} (trust_remote_code could "
                                   f"import it); remove it or {hint}")
    arch = load_json(folder / ARCH_FILE, "architecture file", hint=hint) if (folder / ARCH_FILE).is_file() else None
    config = load_json(folder / CONFIG_FILE, "model config", hint=hint) if (folder / CONFIG_FILE).is_file() else None
    if isinstance(arch, dict) and isinstance(config, dict) and config.get("arch") != arch:
        raise ExportIntegrityError(_arch_mismatch(folder, config.get("arch"), arch, hint))
    return {name: str(hashes[name]) for name in hashes}


def _arch_mismatch(folder: Path, config_arch: Any, arch: Mapping[str, Any], hint: str) -> str:
    if not isinstance(config_arch, dict):
        return f"{folder / CONFIG_FILE} has no arch (arch.json has one); {hint}"
    diff = sorted(k for k in set(config_arch) | set(arch) if config_arch.get(k) != arch.get(k))
    first = diff[0]
    return (f"{folder / CONFIG_FILE} disagrees with {ARCH_FILE}: {first} is {config_arch.get(first)!r} there but "
            f"{arch.get(first)!r} in {ARCH_FILE} ({len(diff)} label(s) differ), so transformers would load another "
            f"model; {hint}")


def _check_config_arch(folder: Path, hf_config: Any, arch: Mapping[str, Any], space, hint: str) -> None:
    """``config.json``'s ``arch`` (what transformers builds) must be ``arch.json``'s (what the plugin builds)."""
    config_arch = hf_config.get("arch") if isinstance(hf_config, dict) else None
    try:
        same = isinstance(config_arch, dict) and space.validate_arch(config_arch) == arch
    except ValueError:
        same = False
    if not same:
        raise ExportIntegrityError(_arch_mismatch(folder, config_arch, arch, hint))


def folder_hashes(folder: Path) -> Dict[str, str]:
    """sha256 of every file of a folder being exported (``export_meta.json`` itself aside)."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != META_FILE}


def space_of(space_config: Any):

    if isinstance(space_config, EfficientBertSupernet):  # EfficientBertSpace included
        return space_config
    if isinstance(space_config, EfficientBertConfig):
        return EfficientBertSupernet(space_config)
    if isinstance(space_config, Mapping):
        try:
            return EfficientBertSupernet(EfficientBertConfig.from_dict(dict(space_config)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid search-space config: {exc}") from exc
    raise ConfigError(f"space_config must be an EfficientBertConfig, a dict of its fields or an "
                      f"EfficientBertSpace, got {type(space_config).__name__}")


def student_from_weights(space, arch: Dict[str, Any], weights: Any):
    """A fresh student of ``arch`` holding a copy of ``weights`` (never the caller's module)."""

    if isinstance(weights, EfficientBertSupernet):  # EfficientBertSpace included
        if weights.config != space.config:
            raise ConfigError("the supernet passed as weights has another config than space_config")
        return weights.subnet(arch).cpu().eval()  # exports and their checks are on CPU
    if isinstance(weights, EfficientBertModel):
        if weights.arch != arch and space.validate_arch(weights.arch) != arch:
            diff = sorted(k for k in arch if weights.arch.get(k) != arch[k])
            raise ConfigError(f"the model passed as weights has another architecture than arch "
                              f"(labels differing: {diff[:6]}); export the model's own arch "
                              "(model.arch) or pass the matching weights")
        state = weights.state_dict()
        what = "student model"
    elif isinstance(weights, Mapping):
        state = dict(weights)
        what = "student state dict"
    else:
        raise ConfigError(f"weights must be an EfficientBertModel, an EfficientBertSpace (supernet) or a "
                          f"state dict, got {type(weights).__name__}")
    student = EfficientBertModel(space.config, arch)
    load_strict(student, state, what)
    return student.eval()


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch (given vs expected) {shapes[:5]}")
        raise CheckpointError(f"{what} does not fit the architecture: {'; '.join(parts)}. Pass the "
                              "weights of a student of this arch, or the supernet to slice them from")
    model.load_state_dict(state, strict=True)
