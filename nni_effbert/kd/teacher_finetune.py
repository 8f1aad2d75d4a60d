"""Fine-tuning the teacher on the task (``nni-effbert teacher``), once per work directory.

:func:`finetune_from_config` fine-tunes the configured base model (``AutoModelForSequenceClassification``
or ``AutoModelForQuestionAnswering``) on the task's student-train rows under a file lock, saves it
with its tokenizer atomically and writes the marker (:data:`~nni_effbert.kd.teacher.MARKER_FILE`)
that lets a later run reuse it; a marker for other task data or another tokenizer is refused.
:func:`evaluate_teacher` / :func:`evaluate_span_teacher` score a teacher on dev.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from ..config import ExperimentConfig, single_task
from ..data.batches import make_loader
from ..data.loading import load_task
from ..data.metrics import compute_metrics
from ..data.qa import load_qa_task
from ..data.qa_answers import score_span_model
from ..data.tasks import QA_TASKS
from ..errors import CheckpointError, ConfigError, EffBertError
from ..io import atomic_replace_dir, atomic_write_json, make_tmp_dir
from ..runtime import Runtime, resolve_runtime
from ..workdir import WorkDir
from .teacher import (MARKER_FILE, MARKER_FORMAT, head_logits, load_teacher, read_teacher_marker, resolve_teacher,
                      teacher_fingerprint, vocab_fingerprint)

__all__ = ["TeacherResult", "finetune_teacher", "finetune_from_config", "evaluate_teacher", "evaluate_span_teacher"]

logger = logging.getLogger(__name__)



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


def finetune_teacher(cfg: ExperimentConfig, task_data, tokenizer, out_dir: Union[str, os.PathLike],
                     progress: bool = True) -> TeacherResult:
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


def finetune_from_config(cfg: ExperimentConfig, progress: bool = True) -> TeacherResult:
    """Load the task with the teacher's tokenizer and fine-tune (or reuse) the teacher.

    What ``nni-effbert teacher`` and the quickstart run: the teacher goes to the work
    directory's ``teacher/`` folder.

    Raises
    ------
    ConfigError
        If the teacher's tokenizer cannot be loaded (and whatever :func:`finetune_teacher` raises).
    """

    single_task(cfg, "teacher fine-tuning")
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


def _finetune_locked(cfg: ExperimentConfig, task_data, spec, base: str, tok_fp: str, out: Path,
                     progress: bool) -> TeacherResult:
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


def _train_and_save(cfg: ExperimentConfig, task_data, spec, tok_fp: str, out: Path, progress: bool) -> TeacherResult:

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
            "format": MARKER_FORMAT,
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
        return head_logits(out)

    try:
        return score_span_model(forward, task_data, task_cfg, batch_size, pad_token_id, splits=splits)
    finally:
        model.train(was_training)
