"""Export a searched EfficientBERT student as a folder that plain ``transformers`` loads.

The folder follows Hugging Face's custom-model convention, so on any machine with ``torch`` and
``transformers`` (nni not needed)::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

work. It holds:

``config.json``
    ``model_type``, ``auto_map`` pointing at the two remote-code files below, the student's sizes,
    its ``arch`` and ``id2label`` / ``label2id``.
``configuration_effbert.py``, ``modeling_effbert_hf.py``
    The ``PretrainedConfig`` and ``PreTrainedModel`` classes (templates in :mod:`nni_effbert.hf`).
``modeling.py``, ``ops.py``
    Verbatim copies of :mod:`nni_effbert.search_spaces` ``modeling.py`` / ``ops.py``, the pure-torch
    student, imported relatively by ``modeling_effbert_hf.py``: the model code exists once.
``model.safetensors``
    The weights, named ``student.<tensor name of EfficientBertModel>``.
``tokenizer.json``, ``tokenizer_config.json`` ...
    The tokenizer, when one is given (``model_max_length`` capped at the position table).
``arch.json``
    The architecture as a flat ``label -> value`` dict.
``architecture.md``
    Per-layer expression, width, stack and parameters, with totals.
``export_meta.json``
    The search-space config, parameter counts, fingerprint, task, caller metadata, and under
    ``files_sha256`` the sha256 of every other file of the folder (remote code, weights,
    ``config.json``, ``arch.json``, tokenizer, docs), which :func:`verify_export`
    (``nni-effbert verify-export``) checks.
``README.md``
    A short model card: what the model is, how to load it, and what ``trust_remote_code=True``
    executes.

``trust_remote_code=True`` makes ``transformers`` import the folder's ``*.py`` files: anyone
who can write to the folder can run code in the loading process. :func:`load_exported` (and so
``distill``, ``report``, ``fidelity``) verifies the hashes first and refuses a folder whose
code, weights or ``config.json`` changed since it was written.

The folder is built under a temporary name beside ``out_dir``, checked (by default the exported
code is imported from the folder and its logits compared with the student's), then swapped in
atomically: a reader never sees a half-written export.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from nni_effbert.search_spaces import EfficientBertConfig, EfficientBertModel, EfficientBertSupernet

from .. import __version__
from .. import hf as hf_templates
from .. import search_spaces
from ..errors import CheckpointError, ConfigError, EffBertError
from ..hf.configuration_effbert import EfficientBertHFConfig
from ..io import (atomic_replace_dir, atomic_write_json, atomic_write_text, disk_full_guard, load_json,
                  make_tmp_dir)
from ..kd.teacher_init import origin_line

__all__ = [
    "ExportedStudent",
    "ExportIntegrityError",
    "ExportExistsError",
    "export_student",
    "load_exported",
    "verify_export",
    "check_replaceable",
    "file_sha256",
    "HASHES_KEY",
    "architecture_markdown",
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


class ExportIntegrityError(CheckpointError):
    """An export folder's files disagree with the sha256 recorded in its ``export_meta.json``
    (or the folder predates the hashes): its code, weights or config were changed since export."""


class ExportExistsError(CheckpointError):
    """The export folder already exists and would be replaced without ``force``."""

#: Entry point of the pure-torch student among the ``search_spaces`` files.
_STUDENT_MODULE = "modeling.py"

#: Largest |difference| of logits accepted between the exported model and the student.
_VERIFY_ATOL = 1e-5

PathLike = Union[str, Path]


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


# ============================================================================================
# Public API
# ============================================================================================

def export_student(
    space_config: Any,
    arch: Mapping[str, Any],
    weights: Any,
    out_dir: PathLike,
    *,
    tokenizer: Any = None,
    label_names: Optional[Sequence[str]] = None,
    task: Any = None,
    extra_meta: Optional[Mapping[str, Any]] = None,
    verify: bool = True,
) -> Path:
    """Write a student as a folder loadable by ``transformers`` alone.

    Parameters
    ----------
    space_config : EfficientBertConfig, dict or EfficientBertSpace
        The search-space config the student belongs to (sizes, ``num_labels``, ranges). A space
        may be passed to avoid building one.
    arch : dict
        The student's ``label -> value`` architecture; validated against the space.
    weights : EfficientBertModel, EfficientBertSpace or dict of tensors
        A fixed student of ``arch`` (e.g. after final distillation), a supernet (its slices for
        ``arch`` are exported, as :meth:`EfficientBertSpace.subnet` takes them) or the state dict
        of a student of ``arch``.
    out_dir : str or Path
        Destination folder; an existing folder there is replaced atomically.
    tokenizer : PreTrainedTokenizerBase, str or Path, optional
        Tokenizer saved into the folder (an object, or a folder to load it from). Without one the
        model still loads, but ``pipeline('text-classification', ...)`` needs a tokenizer.
    label_names : sequence of str, optional
        Class names in label-id order (``id2label``); one name for regression.
    task : TaskSpec, optional
        Used for label names (``task.label_list``) when ``label_names`` is not given, and
        recorded in the metadata.
    extra_meta : dict, optional
        JSON-serialisable metadata stored under ``extra`` in ``export_meta.json`` (dev metric,
        experiment id, trial id, ...).
    verify : bool
        Import the folder's remote code, load the weights through ``transformers`` and check its
        logits match the student's (within 1e-5) before publishing the folder.

    Returns
    -------
    Path
        The export folder.

    Raises
    ------
    ValueError
        If ``arch`` is not an architecture of the space (the message names the label).
    ConfigError
        If labels, tokenizer or metadata do not fit the model.
    CheckpointError
        If ``weights`` do not match ``arch`` (missing, unexpected or mis-shaped tensors).
    """
    space = _space_of(space_config)
    config = space.config
    arch = space.validate_arch(arch)
    student = _student_from_weights(space, arch, weights)
    n_params = sum(p.numel() for p in student.parameters())
    expected = space.count_params(arch)
    if n_params != expected:  # the space's contract; a mismatch means a bug, not bad input
        raise EffBertError(f"student has {n_params} parameters but count_params(arch) says {expected}")
    if config.head == "span":  # start / end logits: no classes to name
        if config.num_labels != 2:
            raise ConfigError(f"a question-answering student (head: span) has num_labels=2 (start, end), "
                              f"got {config.num_labels}")
        id2label = {0: "start", 1: "end"}
    else:
        id2label = _id2label(config.num_labels, label_names, task)
    tok = _load_tokenizer(tokenizer, config)
    if extra_meta is not None:
        try:
            json.dumps(dict(extra_meta))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra_meta must be JSON-serialisable (plain dicts, lists, numbers, "
                              f"strings): {exc}") from exc

    final = Path(out_dir)
    with disk_full_guard(final):
        _export_into(final, space, config, arch, student, tok, task, id2label, n_params, extra_meta, verify)
    return final


def _export_into(final: Path, space, config, arch, student, tok, task, id2label, n_params, extra_meta,
                 verify) -> None:
    """Build the export folder next to ``final`` and swap it in (the temporary folder is removed
    on any failure)."""
    tmp = make_tmp_dir(final)
    try:
        _write_remote_code(tmp)
        _write_config(tmp, config, arch, id2label)
        _write_weights(tmp, student)
        if tok is not None:
            _write_tokenizer(tmp, tok, config.max_position_embeddings)
        atomic_write_json(arch, tmp / ARCH_FILE)
        origin = (extra_meta or {}).get("origin")
        atomic_write_text(architecture_markdown(space, arch, student, id2label, origin=origin), tmp / ARCHITECTURE_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "nni_effbert_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "space_config": config.to_dict(),
            "params": n_params,
            "non_embedding_params": space.count_params(arch, exclude_embeddings=True),
            "fingerprint": space.fingerprint(arch),
            "layers": space.describe(arch),
            "task": getattr(task, "name", None),
            "label_names": [id2label[i] for i in range(len(id2label))],
            "has_tokenizer": tok is not None,
            "extra": dict(extra_meta or {}),
        }
        atomic_write_text(_model_card(meta, id2label, tok is not None), tmp / README_FILE)
        meta[HASHES_KEY] = _folder_hashes(tmp)  # every file but the meta itself, written last
        atomic_write_json(meta, tmp / META_FILE)
        if verify:
            _verify_folder(tmp, student, config)
            verify_export(tmp)  # what readers will check: the hashes match the files published
        _warn_if_losing_distilled(final, extra_meta)
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported student (%d params, %d non-embedding) to %s", n_params,
                meta["non_embedding_params"], final)


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
    space = _space_of(config)
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
    _load_strict(model, {k[len(prefix):]: v for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
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


def check_replaceable(folder: PathLike, *, force: bool) -> None:
    """Refuse to replace an existing folder (an export, or anything else) unless ``force``.

    With ``force`` the folder is replaced; :func:`export_student` still logs a warning when the
    replaced folder held a distilled student whose record the new export does not carry on.

    Raises
    ------
    ExportExistsError
        ``folder`` exists and ``force`` is False; the message names what would be lost (the
        distilled weights and distill record, or the export's weights and metadata).
    """
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        return
    if not force:
        raise ExportExistsError(f"{folder} already exists; replacing it would lose {_what_would_be_lost(folder)}; "
                                "pass --force to replace it, or --name to export under another name")


def _what_would_be_lost(folder: Path) -> str:
    meta = None
    if (folder / META_FILE).is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
    if not isinstance(meta, dict):
        return "the folder's contents (it is not a readable nni-effbert export)"
    record = (meta.get("extra") or {}).get("distill")
    if isinstance(record, dict):
        score = record.get("dev_metric")
        what = f"dev {record.get('metric', 'metric')} {score:.4f}" if isinstance(score, (int, float)) else "distilled"
        return (f"the distilled student ({WEIGHTS_FILE}, {what}) and its distill record in {META_FILE}")
    return f"the exported weights ({WEIGHTS_FILE}) and {META_FILE}"


def _warn_if_losing_distilled(final: Path, extra_meta: Optional[Mapping[str, Any]]) -> None:
    """Log when a distilled export is replaced by one that does not carry its distill record on."""
    meta_file = final / META_FILE
    if not meta_file.is_file():
        return
    try:
        old = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    record = (old.get("extra") or {}).get("distill") if isinstance(old, dict) else None
    if isinstance(record, dict) and not isinstance((extra_meta or {}).get("distill"), dict):
        logger.warning("replacing the distilled student in %s: its distilled weights and distill record are lost",
                       final)


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


def record_added_files(folder: PathLike) -> None:
    """Record the sha256 of files written into an export after it was made (its ONNX files and the
    model card section that describes them, :mod:`nni_effbert.product.onnx`).

    The caller must have verified the folder before writing them (:func:`load_exported` does), so
    that only its own files are added to the record, never a file changed by someone else."""
    folder = Path(folder)
    meta = load_json(folder / META_FILE, "export metadata")
    meta[HASHES_KEY] = _folder_hashes(folder)
    atomic_write_json(meta, folder / META_FILE)


def _folder_hashes(folder: Path) -> Dict[str, str]:
    """sha256 of every file of a folder being exported (``export_meta.json`` itself aside)."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != META_FILE}


def architecture_markdown(space: Any, arch: Mapping[str, Any], student: Any = None,
                          id2label: Optional[Mapping[int, str]] = None,
                          origin: Optional[Mapping[str, Any]] = None) -> str:
    """The human-readable ``architecture.md`` of a student.

    Parameters
    ----------
    space : EfficientBertSpace
        The space ``arch`` belongs to.
    arch : dict
        The architecture.
    student : EfficientBertModel, optional
        The built student; per-layer parameters are measured on it (built when omitted).
    id2label : dict, optional
        Class names, listed under the head.
    origin : dict, optional
        :func:`~nni_effbert.kd.teacher_init.student_origin` (student preset and supernet init),
        named under the title.

    Returns
    -------
    str
        Markdown: per layer expression, width of ``linear1``, stack and parameters; then the
        embeddings, ``fit_dense`` and head, total and non-embedding parameters.
    """

    arch = space.validate_arch(arch)
    if student is None:
        student = EfficientBertModel(space.config, arch)
    c = space.config

    def numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = space.count_params(arch)
    non_embedding = space.count_params(arch, exclude_embeddings=True)
    lines = [
        "# EfficientBERT student architecture",
        "",
        f"Hidden size {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} attention heads, "
        f"factorized embeddings of size {c.embedding_size}, ffn hidden size {c.intermediate_size}, "
        f"vocabulary {c.vocab_size}, up to {c.max_position_embeddings} positions.",
        "",
        *([origin_line(origin), ""] if origin else []),
        "Each layer is self-attention followed by `stack` MLPs, each with its own residual and LayerNorm, "
        "all computing the layer's expression; `width` is the number of units of `linear1`.",
        "",
        "| layer | expression | width | stack | params |",
        "|------:|------------|------:|------:|-------:|",
    ]
    for i, (layer, info) in enumerate(zip(student.layers, space.describe(arch))):
        lines.append(f"| {i} | `{info['expression']}` | {info['width']} | {info['stack']} | {numel(layer):,} |")
    emb = numel(student.embeddings)
    span = c.head == "span"
    head = numel(student.qa_outputs) if span else numel(student.pooler) + numel(student.classifier)
    labels = ""
    if id2label and not span:
        labels = " (labels: " + ", ".join(f"{i}={id2label[i]}" for i in sorted(id2label)) + ")"
    lines += [
        "",
        f"- Embeddings (token tables, up-projection, LayerNorm): {emb:,}",
        f"- fit_dense (projection to the teacher's hidden size {c.fit_size}, used by distillation only): "
        f"{numel(student.fit_dense):,}",
        (f"- Span head (start and end logits per token): {head:,}" if span
         else f"- Pooler and classifier, {c.num_labels} output(s){labels}: {head:,}"),
        "",
        f"**Total parameters: {total:,}**",
        "",
        f"**Non-embedding parameters: {non_embedding:,}** (total minus the word, position and "
        "token-type tables)",
        "",
        "Loading this folder with `trust_remote_code=True` imports its `*.py` files: check them first with "
        "`nni-effbert verify-export <folder>` (or `sha256sum` against `files_sha256` in `export_meta.json`).",
        "",
    ]
    return "\n".join(lines)


# ============================================================================================
# Internals
# ============================================================================================

def _space_of(space_config: Any):

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


def _student_from_weights(space, arch: Dict[str, Any], weights: Any):
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
    _load_strict(student, state, what)
    return student.eval()


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
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


def _id2label(num_labels: int, label_names: Optional[Sequence[str]], task: Any) -> Dict[int, str]:
    names: Optional[List[str]] = None
    if label_names is not None:
        if isinstance(label_names, str):
            raise ConfigError(f"label_names must be a list of names, got the string {label_names!r}")
        names = [str(n) for n in label_names]
    if task is not None:
        task_labels = getattr(task, "label_list", None)
        task_n = getattr(task, "num_labels", None)
        if task_n is not None and task_n != num_labels:
            raise ConfigError(f"task {getattr(task, 'name', task)!r} has {task_n} label(s) but the student "
                              f"has num_labels={num_labels}; set the space's num_labels to {task_n}")
        if names is None and task_labels:
            names = [str(n) for n in task_labels]
    if names is None:
        names = ["score"] if num_labels == 1 else [f"LABEL_{i}" for i in range(num_labels)]
        if num_labels > 1:
            logger.warning("no label names given: the exported model will answer %s", ", ".join(names))
    if len(names) != num_labels:
        raise ConfigError(f"{len(names)} label name(s) {names} for a student with num_labels={num_labels}; "
                          "give one name per class (one for regression)")
    if len(set(names)) != len(names):
        raise ConfigError(f"label names must be distinct, got {names}")
    return dict(enumerate(names))


def _load_tokenizer(tokenizer: Any, config) -> Any:
    if tokenizer is None:
        logger.warning("exporting without a tokenizer: pipeline('text-classification', ...) will need "
                       "one passed explicitly")
        return None
    if isinstance(tokenizer, (str, Path)):

        folder = Path(tokenizer)
        kwargs: Dict[str, Any] = {}
        if _is_export_folder(folder):
            # AutoTokenizer reads the model config first; ours needs remote code, so hand it the
            # config class directly instead of prompting for (or running) the folder's code.

            kwargs["config"] = EfficientBertHFConfig.from_pretrained(str(folder))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a tokenizer from {folder}: {exc}") from exc
    if not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError(f"tokenizer must be a transformers tokenizer or a folder holding one, got "
                          f"{type(tokenizer).__name__}")
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab_size is "
                          f"{config.vocab_size}: token ids would overflow the embedding table; export "
                          "with the tokenizer the student was trained with")
    return tokenizer


def _is_export_folder(folder: Path) -> bool:
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == hf_templates.MODEL_TYPE


def _remote_code_files() -> List[Path]:
    """``modeling.py`` and every file of ``search_spaces`` it imports relatively, recursively.

    Each must be pure torch: an import of nni or nni_effbert would break loading where nni is
    not installed, so it is refused here rather than discovered by a user.
    """

    root = Path(search_spaces.__file__).resolve().parent
    todo, seen = [root / _STUDENT_MODULE], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module:
                    raise EffBertError(f"{path}: only `from .module import ...` relative imports can be "
                                       "exported as remote code")
                todo.append(root / (node.module.replace(".", "/") + ".py"))
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                bad = [n for n in names if n.split(".")[0] in ("nni", "nni_effbert")]
                if bad:
                    raise EffBertError(f"{path} imports {bad}: the exported student code must be pure "
                                       "torch so that it loads without nni")
    return seen


def _write_remote_code(folder: Path) -> None:
    for src in _remote_code_files():
        shutil.copyfile(src, folder / src.name)
    for name in (hf_templates.CONFIG_FILE, hf_templates.MODELING_FILE):
        shutil.copyfile(hf_templates.TEMPLATE_DIR / name, folder / name)


def _write_config(folder: Path, config, arch: Dict[str, Any], id2label: Dict[int, str]) -> None:

    fields = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range", "fit_size",
              "pad_token_id", "head")
    span = config.head == "span"
    hf_config = EfficientBertHFConfig(
        arch=arch,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        problem_type=None if span else "regression" if config.num_labels == 1 else "single_label_classification",
        **{f: getattr(config, f) for f in fields},
    )
    data = hf_config.to_dict()
    data["model_type"] = hf_templates.MODEL_TYPE
    data["auto_map"] = dict(hf_templates.QA_AUTO_MAP if span else hf_templates.AUTO_MAP)
    data["architectures"] = [hf_templates.MODEL_CLASSES[config.head]]
    atomic_write_json(data, folder / CONFIG_FILE)


def _write_weights(folder: Path, student: torch.nn.Module) -> None:

    prefix = hf_templates.STUDENT_PREFIX + "."
    # clone: safetensors refuses views and shared storage; exported tensors are independent.
    tensors = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _write_tokenizer(folder: Path, tokenizer: Any, max_positions: int) -> None:
    tokenizer.save_pretrained(str(folder))
    # Inputs longer than the position table cannot run: cap model_max_length so that
    # `truncation=True` (and pipeline(..., truncation=True)) cuts at the right length.
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        current = data.get("model_max_length")
        if not isinstance(current, (int, float)) or current > max_positions:
            data["model_max_length"] = max_positions
            atomic_write_json(data, cfg_path)


def _model_card(meta: Mapping[str, Any], id2label: Mapping[int, str], has_tokenizer: bool) -> str:
    span = (meta.get("space_config") or {}).get("head") == "span"
    kind = "Sequence regression (one score)" if len(id2label) == 1 else \
        "Sequence classification into " + ", ".join(f"`{id2label[i]}`" for i in sorted(id2label))
    if span:
        kind = "Extractive question answering (start and end logits per token)"
    task = f" on `{meta['task']}`" if meta.get("task") else ""
    lines = [
        "# EfficientBERT student",
        "",
        f"A compact BERT-style encoder{task} whose feed-forward MLPs were found by EfficientBERT's "
        "architecture search (Dong et al., Findings of EMNLP 2021) with "
        f"nni-effbert {meta['nni_effbert_version']} (a Microsoft NNI plugin). "
        f"{kind}. {meta['params']:,} parameters ({meta['non_embedding_params']:,} without the embedding "
        "tables); see `architecture.md` for each layer and `arch.json` for the architecture.",
        "",
        "It needs `torch` and `transformers` only. The model code ships in this folder "
        "(`modeling_effbert_hf.py` and the pure-torch `modeling.py` / `ops.py`), so pass "
        "`trust_remote_code=True` to every loader:",
        "",
        "```python",
        *(["from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline",
           "",
           'model = AutoModelForQuestionAnswering.from_pretrained("PATH", trust_remote_code=True)',
           'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
           'answer = pipeline("question-answering", model="PATH", trust_remote_code=True)',
           'answer(question="Who wrote it?", context="The book was written by Jane Austen.")']
          if span else
          ["from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
           "",
           'model = AutoModelForSequenceClassification.from_pretrained("PATH", trust_remote_code=True)',
           'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
           'classify = pipeline("text-classification", model="PATH", trust_remote_code=True)',
           'classify("a gripping, beautifully acted film", truncation=True)']),
        "```",
        "",
        "**What `trust_remote_code=True` runs.** It makes `transformers` import this folder's Python files "
        "(`configuration_effbert.py`, `modeling_effbert_hf.py`, `modeling.py`, `ops.py`) into your process: "
        "whoever can change them can run code as you. Check the folder before loading it: "
        "`nni-effbert verify-export PATH` compares every file with the sha256 recorded in `export_meta.json` "
        "(`files_sha256`); without nni-effbert, compare `sha256sum *.py model.safetensors config.json` "
        "with those values.",
        "",
    ]
    if not has_tokenizer:
        lines += ["No tokenizer was exported with this model: pass the one it was trained with.", ""]
    return "\n".join(lines)


def _verify_folder(folder: Path, student: torch.nn.Module, config) -> None:
    """Load ``folder`` through its own remote code and compare logits with ``student``.

    The folder's files are imported as a private package (so relative imports resolve exactly
    as in Hugging Face's module cache), then ``from_pretrained`` reads ``config.json`` and the
    safetensors weights, as ``AutoModelForSequenceClassification`` would.
    """
    package = f"_nni_effbert_export_{uuid.uuid4().hex}"
    spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules[package] = importlib.util.module_from_spec(spec)
    try:
        modeling = importlib.import_module(f"{package}.{Path(hf_templates.MODELING_FILE).stem}")

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar would only clutter export logs
        try:
            model = getattr(modeling, hf_templates.MODEL_CLASSES[config.head]).from_pretrained(str(folder))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        gen = torch.Generator().manual_seed(0)
        length = min(16, config.max_position_embeddings)
        ids = torch.randint(0, config.vocab_size, (3, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, length // 2:] = 0  # one padded row, so masking is compared too
        types = torch.zeros_like(ids)
        # The student may sit on a GPU (runtime.device); the check compares in fp32 on the CPU side.
        on = next(student.parameters()).device
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            got = torch.stack([out.start_logits, out.end_logits], -1) if config.head == "span" else out.logits
            want = student(ids.to(on), mask.to(on), types.to(on), return_kd=False).logits.float().cpu()
        diff = (got - want).abs().max().item()
        if not math.isfinite(diff) or diff > _VERIFY_ATOL:
            raise EffBertError(f"exported model disagrees with the student: max |logit difference| "
                               f"{diff:.3g} > {_VERIFY_ATOL}; the export in {folder} was not published")
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
