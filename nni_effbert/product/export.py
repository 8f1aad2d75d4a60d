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
    ``config.json``, ``arch.json``, tokenizer, docs), which :func:`~nni_effbert.product.loader.verify_export`
    (``nni-effbert verify-export``) checks.
``README.md``
    A short model card: what the model is, how to load it, and what ``trust_remote_code=True``
    executes.

``trust_remote_code=True`` makes ``transformers`` import the folder's ``*.py`` files: anyone
who can write to the folder can run code in the loading process.
:func:`~nni_effbert.product.loader.load_exported` (and so
``distill``, ``report``, ``fidelity``) verifies the hashes first and refuses a folder whose
code, weights or ``config.json`` changed since it was written.

The folder is built under a temporary name beside ``out_dir``, checked (by default the exported
code is imported from the folder and its logits compared with the student's), then swapped in
atomically: a reader never sees a half-written export.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from nni_effbert.search_spaces import EfficientBertModel

from .. import __version__
from .. import hf as hf_templates
from .. import search_spaces
from ..errors import CheckpointError, ConfigError, EffBertError
from ..hf.configuration_effbert import EfficientBertHFConfig
from ..io import (atomic_replace_dir, atomic_write_json, atomic_write_text, disk_full_guard, load_json,
                  make_tmp_dir)
from ..kd.student_start import origin_line
from .loader import (ARCH_FILE, ARCHITECTURE_FILE, CONFIG_FILE, FORMAT_VERSION, HASHES_KEY, META_FILE, README_FILE,
                     WEIGHTS_FILE, PathLike, folder_hashes, space_of, student_from_weights, verify_export)

__all__ = [
    "ExportExistsError",
    "export_student",
    "check_replaceable",
    "record_added_files",
    "architecture_markdown",
]

logger = logging.getLogger(__name__)


class ExportExistsError(CheckpointError):
    """The export folder already exists and would be replaced without ``force``."""

#: Entry point of the pure-torch student among the ``search_spaces`` files.
_STUDENT_MODULE = "modeling.py"

#: Largest |difference| of logits accepted between the exported model and the student.
_VERIFY_ATOL = 1e-5


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
    space = space_of(space_config)
    config = space.config
    arch = space.validate_arch(arch)
    student = student_from_weights(space, arch, weights)
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
        meta[HASHES_KEY] = folder_hashes(tmp)  # every file but the meta itself, written last
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


def record_added_files(folder: PathLike) -> None:
    """Record the sha256 of files written into an export after it was made (its ONNX files and the
    model card section that describes them, :mod:`nni_effbert.product.onnx`).

    The caller must have verified the folder before writing them (:func:`load_exported` does), so
    that only its own files are added to the record, never a file changed by someone else."""
    folder = Path(folder)
    meta = load_json(folder / META_FILE, "export metadata")
    meta[HASHES_KEY] = folder_hashes(folder)
    atomic_write_json(meta, folder / META_FILE)


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
        :func:`~nni_effbert.kd.student_start.student_origin` (student preset and supernet init),
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
