"""The one knowledge-distillation training loop, and everything it needs.

Warm-up of the weight-sharing supernet (:mod:`.warmup`), per-candidate KD fine-tuning
(:mod:`.evaluator`) and the final distillation of an exported student all call
:func:`kd_train`:

* the student is a fixed :class:`~nni_effbert.search_spaces.EfficientBertModel`, or the
  supernet (:class:`~nni_effbert.search_spaces.EfficientBertSupernet`, or its NNI subclass
  :class:`~nni_effbert.search_spaces.EfficientBertSpace`) with an ``arch_sampler``
  that picks the architecture of every step;
* teacher outputs come from a :class:`TeacherSource`: :class:`CachedTeacher` (the shared
  teacher-output cache, for task data) or :class:`LiveTeacher` (a teacher in memory, for
  unlabeled text that is not cached);
* :class:`~nni_effbert.kd.losses.KDLoss`, AdamW (no decay on biases and LayerNorm, as BERT) and a
  linear schedule with warm-up, gradient clipping, a tqdm bar;
* a non-finite loss or gradient, or a forward that fails on shapes, raises
  :class:`TrialFailure` naming the step: a failed candidate is never scored;
* an optional evaluation callback every ``eval_interval`` steps and a checkpoint callback
  every ``checkpoint_interval`` steps, which receives everything needed to resume
  (:class:`TrainState`);
* a :class:`~nni_effbert.runtime.Runtime` (``runtime`` config section): the device, bf16 /
  fp16 autocast (fp16 with a ``GradScaler``), batch-loader workers, optional ``torch.compile`` of
  a fixed student. On an accelerator the loss and gradient checks and the progress-bar loss are
  read back every :data:`~nni_effbert.runtime.SYNC_INTERVAL` steps instead of every step (no
  per-step host sync); a failure still names the step it happened at.

Batches are drawn deterministically from ``(seed, epoch)`` (:func:`iterate_batches`), so a
resumed run sees the same batches as an uninterrupted one without storing sampler state.

:class:`KDSetup` gathers what every command loads from a config: the work directory, the
fine-tuned teacher, its tokenizer, the tokenized task, the student space sized for the
teacher and the KD loss.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from nni_effbert.search_spaces.supernet import EfficientBertSupernet

from ..data.loading import collate, length_sorted_batches, make_loader
from ..data.metrics import compute_metrics
from ..data.prepared import load_prepared_task
from ..data.qa import (apply_null_threshold, best_null_threshold, evaluate_predictions, load_qa_task,
                       postprocess_predictions, score_span_model)
from ..data.tasks import QA_TASKS
from ..errors import CheckpointError, ConfigError, EffBertError
from ..runtime import Runtime, resolve_runtime
from ..workdir import WorkDir
from .cache import TeacherCache
from .losses import KDLoss, TeacherBatch, prediction_loss, span_prediction_loss
from .teacher import FINGERPRINT_MEMO, MARKER_FILE, load_teacher, prepare_teacher, read_teacher_marker, teacher_outputs
from .teacher_init import student_preset

__all__ = [
    "TrialFailure",
    "TeacherSource",
    "CachedTeacher",
    "LiveTeacher",
    "TrainSettings",
    "TrainState",
    "TrainResult",
    "iterate_batches",
    "kd_train",
    "evaluate",
    "predict",
    "score_split",
    "score_span_split",
    "build_space",
    "KDSetup",
]

logger = logging.getLogger(__name__)

Arch = Dict[str, Any]
Batch = Dict[str, Tensor]


class TrialFailure(EffBertError, RuntimeError):
    """A model cannot be scored: its loss or gradient became NaN/inf, or its forward failed.

    The message says what happened and at which step (``"loss became NaN at step 37"``).
    Trials report it as a failure with this reason, never as a score.
    """


# ---------------------------------------------------------------------------------------------
# Teacher sources
# ---------------------------------------------------------------------------------------------


class TeacherSource(Protocol):
    """Anything that returns the teacher's outputs for a padded batch."""

    def __call__(self, batch: Batch) -> TeacherBatch:  # pragma: no cover - protocol
        ...


class CachedTeacher:
    """Teacher outputs read from a :class:`~nni_effbert.kd.cache.TeacherCache` by the batch's ``idx``.

    Parameters
    ----------
    cache : TeacherCache
        Built over the dataset the batches come from.
    device : torch.device or str
        Where the tensors go.
    """

    def __init__(self, cache, device: Any = "cpu"):
        self.cache = cache
        self.device = torch.device(device)

    def __call__(self, batch: Batch) -> TeacherBatch:
        if "idx" not in batch:
            raise ConfigError("CachedTeacher: the batch has no 'idx' column, so cached outputs cannot be looked up")
        return self.cache.get(batch["idx"], max_len=int(batch["input_ids"].shape[1]), device=self.device)


class LiveTeacher:
    """Teacher outputs computed on the fly (for text that is not cached, e.g. a corpus file).

    Parameters
    ----------
    model : transformers model
        The teacher, prepared with :func:`nni_effbert.kd.teacher.prepare_teacher`.
    hidden_layers, attention_layers : sequence of int
        ``KDLoss.teacher_hidden_layers`` / ``teacher_attention_layers``.
    device : torch.device or str
    """

    def __init__(self, model: nn.Module, hidden_layers: Sequence[int], attention_layers: Sequence[int],
                 device: Any = "cpu"):
        self.model = model
        self.hidden_layers = list(hidden_layers)
        self.attention_layers = list(attention_layers)
        self.device = torch.device(device)

    def __call__(self, batch: Batch) -> TeacherBatch:

        out = teacher_outputs(
            self.model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch.get("token_type_ids").to(self.device) if "token_type_ids" in batch else None,
            self.hidden_layers,
            self.attention_layers,
        )
        return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Budget and optimiser of one :func:`kd_train` run.

    Attributes
    ----------
    steps : int
        Optimiser steps (>= 0; 0 trains nothing).
    learning_rate : float
        Peak AdamW learning rate.
    batch_size : int
    warmup_ratio : float
        Fraction of ``steps`` with a linearly rising learning rate (then linear decay to 0).
    weight_decay : float
        AdamW decay of matrices (biases and LayerNorm weights are not decayed).
    max_grad_norm : float
        Gradient clipping norm.
    seed : int
        Seeds the batch order and dropout.
    eval_interval : int
        Call ``evaluate`` every this many steps (0: never; the caller evaluates at the end).
    checkpoint_interval : int
        Call ``on_checkpoint`` every this many steps (0: never).
    desc : str
        Progress bar label.
    progress : bool
        Show the tqdm bar.
    """

    steps: int
    learning_rate: float
    batch_size: int
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_interval: int = 0
    checkpoint_interval: int = 0
    desc: str = "KD"
    progress: bool = True

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise ConfigError(f"training steps must be >= 0, got {self.steps}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainState:
    """Everything :func:`kd_train` needs to continue a run after ``step`` steps.

    The model weights are not part of it (the caller saves the model it owns).
    """

    step: int
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    torch_rng: Tensor

    def to_dict(self) -> Dict[str, Any]:
        """Plain containers and tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {"step": self.step, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "torch_rng": self.torch_rng}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainState":
        return cls(int(data["step"]), data["optimizer"], data["scheduler"], data["torch_rng"])


@dataclass
class TrainResult:
    """Outcome of :func:`kd_train`.

    Attributes
    ----------
    steps : int
        Steps done in total (including those before a resume).
    loss : float or None
        Mean total KD loss of the last (up to 10) steps of this run; None if it trained
        nothing.
    last_terms : dict
        Unweighted loss terms of the last step.
    evals : list of (int, dict)
        ``(step, metrics)`` of each periodic evaluation.
    """

    steps: int
    loss: Optional[float]
    last_terms: Dict[str, float] = field(default_factory=dict)
    evals: List[Tuple[int, Dict[str, float]]] = field(default_factory=list)


class _StepRows(torch.utils.data.Sampler):
    """The row lists of :func:`iterate_batches` from ``start_step`` on, endlessly (for a DataLoader)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start_step

    def __iter__(self):
        per_epoch = math.ceil(self.n / self.batch_size)
        step = self.start
        while True:
            epoch, pos = divmod(step, per_epoch)
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
            for b in range(pos, per_epoch):
                yield order[b * self.batch_size:(b + 1) * self.batch_size]
                step += 1


def iterate_batches(dataset, batch_size: int, seed: int, pad_token_id: int, start_step: int = 0,
                    device: Any = "cpu", workers: int = 0, pin_memory: bool = False) -> Iterator[Batch]:
    """Endless shuffled padded batches; batch ``k`` depends only on ``(seed, k)``.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; its last partial batch is
    kept. Starting at ``start_step`` skips earlier batches without reading them. Each batch is
    padded to its own longest sequence (:func:`~nni_effbert.data.loading.collate`). With
    ``workers`` > 0 the batches are built by that many DataLoader worker processes (the same
    batches); ``pin_memory`` pins them so the copy to a GPU does not block.
    """

    n = len(dataset)
    if n == 0:
        raise ConfigError("cannot train on an empty dataset")
    blocking = torch.device(device).type == "cpu"
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset, sampler=_StepRows(n, batch_size, seed, int(start_step)), batch_size=None,
            collate_fn=functools.partial(collate, pad_token_id=pad_token_id), num_workers=int(workers),
            pin_memory=pin_memory)
        for batch in loader:
            yield {k: v.to(device, non_blocking=not blocking) for k, v in batch.items()}
        return  # the sampler is endless: never reached
    per_epoch = math.ceil(n / batch_size)
    step = int(start_step)
    while True:
        epoch, pos = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        for b in range(pos, per_epoch):
            rows = order[b * batch_size:(b + 1) * batch_size]
            batch = collate(dataset[rows], pad_token_id)
            if pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield {k: v.to(device, non_blocking=not blocking) for k, v in batch.items()}
            step += 1


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
    )


def _forward(model: nn.Module, batch: Batch, arch: Optional[Arch], return_kd: bool = True):
    kwargs: Dict[str, Any] = {"return_kd": return_kd}
    if arch is not None:
        kwargs["arch"] = arch
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), **kwargs)


def _describe_terms(terms: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in terms.items() if k != "total")


def _term_tensors(out) -> Dict[str, Tensor]:
    """The loss terms of a step as detached tensors (read back only at a sync)."""
    terms = {"total": out.total.detach()}
    for name in ("attention", "hidden", "prediction"):
        value = getattr(out, name)
        if value is not None:
            terms[name] = value.detach()
    return terms


def _check_window(window: List[Tuple[int, Dict[str, Tensor], Optional[Tensor]]]) -> List[Dict[str, float]]:
    """Read back the steps since the last sync (one transfer) and fail on the first bad one.

    ``window`` holds ``(step, loss terms, gradient norm or None)``; returns the terms as floats.
    """
    names = [list(terms) for _, terms, _ in window]
    flat = [t.float().reshape(()) for _, terms, _ in window for t in terms.values()]
    norms = [g.float().reshape(()) for _, _, g in window if g is not None]
    values = torch.stack(flat + norms).cpu().tolist() if flat or norms else []
    floats: List[Dict[str, float]] = []
    pos, norm_pos = 0, len(flat)
    for (human, _, grad), keys in zip(window, names):
        terms = dict(zip(keys, values[pos:pos + len(keys)]))
        pos += len(keys)
        if not math.isfinite(terms["total"]):
            what = "NaN" if math.isnan(terms["total"]) else "infinite"
            raise TrialFailure(f"loss became {what} at step {human} ({_describe_terms(terms)})")
        if grad is not None:
            norm = values[norm_pos]
            norm_pos += 1
            if not math.isfinite(norm):
                raise TrialFailure(f"gradient became {norm} at step {human} (loss {terms['total']:.4g})")
        floats.append(terms)
    return floats


def kd_train(
    model: nn.Module,
    teacher: TeacherSource,
    dataset,
    loss_fn: KDLoss,
    settings: TrainSettings,
    *,
    pad_token_id: int,
    arch_sampler: Optional[Callable[[int], Arch]] = None,
    evaluate_fn: Optional[Callable[[int], Dict[str, float]]] = None,
    on_checkpoint: Optional[Callable[[TrainState], None]] = None,
    resume: Optional[TrainState] = None,
    device: Any = "cpu",
    runtime: Optional[Runtime] = None,
) -> TrainResult:
    """Distil ``teacher`` into ``model`` for ``settings.steps`` steps.

    Parameters
    ----------
    model : nn.Module
        A fixed student, or the supernet space when ``arch_sampler`` is given. Called as
        ``model(input_ids, attention_mask, token_type_ids[, arch=...])`` returning a
        ``StudentOutput``.
    teacher : TeacherSource
        Teacher outputs per batch.
    dataset : datasets.Dataset
        Tokenized rows (``input_ids``, ``attention_mask``, ``token_type_ids``, ``idx``).
    loss_fn : KDLoss
    settings : TrainSettings
    pad_token_id : int
        Padding id of the tokenizer.
    arch_sampler : callable, optional
        ``arch_sampler(step) -> arch`` (``step`` counts from 0 over the whole run, resumes
        included), for supernet training.
    evaluate_fn : callable, optional
        ``evaluate_fn(step) -> metrics``, called every ``settings.eval_interval`` steps with
        the model in eval mode.
    on_checkpoint : callable, optional
        ``on_checkpoint(state)`` every ``settings.checkpoint_interval`` steps (not after the
        last one: the caller saves the final result itself).
    resume : TrainState, optional
        Continue a run that stopped after ``resume.step`` steps (the model must already hold
        the weights of that moment).
    device : torch.device or str
        Used when no ``runtime`` is given (then fp32, no loader workers).
    runtime : Runtime, optional
        Device, precision (autocast, fp16 gradient scaling), loader workers, ``torch.compile``
        (of a fixed student only: the supernet's per-step architecture would recompile it), and
        how often the loop synchronises with the device.

    Returns
    -------
    TrainResult

    Raises
    ------
    TrialFailure
        If the loss or the gradient norm becomes NaN or infinite, or the forward pass or a
        loss fails on shapes; the message names the step (1-based). (With fp16 an infinite
        gradient is the ``GradScaler``'s business: that step is skipped, not failed.)
    """

    steps = int(settings.steps)
    start = int(resume.step) if resume is not None else 0
    result = TrainResult(steps=start, loss=None)
    if start >= steps:
        return result
    rt = runtime if runtime is not None else Runtime(torch.device(device))
    device = rt.device
    model.to(device)
    model.train()
    optimizer = _optimizer(model, settings)
    warmup_steps = int(settings.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup_steps, steps))
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.torch_rng)
    else:
        torch.manual_seed(int(settings.seed))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = rt.grad_scaler()
    forward_model = model
    if rt.compile and arch_sampler is None:
        forward_model = torch.compile(model)
    elif rt.compile:
        logger.info("runtime.compile: the supernet runs eagerly (each step's architecture would recompile it)")
    recent: List[float] = []
    window: List[Tuple[int, Dict[str, Tensor], Optional[Tensor]]] = []
    batches = iterate_batches(dataset, settings.batch_size, settings.seed, pad_token_id, start, device,
                              workers=rt.dataloader_workers, pin_memory=rt.pin_memory)
    bar = tqdm(total=steps, initial=start, desc=settings.desc, disable=not settings.progress, dynamic_ncols=True)
    try:
        for step in range(start, steps):
            human = step + 1
            batch = next(batches)
            arch = arch_sampler(step) if arch_sampler is not None else None
            try:
                with rt.autocast():
                    t_out = teacher(batch)
                    s_out = _forward(forward_model, batch, arch)
                    out = loss_fn(s_out, t_out, batch["attention_mask"])
            except EffBertError:
                raise
            except (RuntimeError, ValueError, IndexError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise TrialFailure(f"forward or loss failed at step {human}: {first}") from exc
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.total).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            window.append((human, _term_tensors(out), None if scaler.is_enabled() else grad_norm.detach()))
            sync = (human % rt.sync_interval == 0 or human == steps
                    or (settings.eval_interval and human % settings.eval_interval == 0)
                    or (settings.checkpoint_interval and human % settings.checkpoint_interval == 0))
            if sync:  # before this step's update: on CPU (every step) a bad step never reaches the weights
                for terms in _check_window(window):
                    recent = (recent + [terms["total"]])[-10:]
                    result.last_terms = terms
                window = []
                bar.set_postfix(loss=f"{result.last_terms['total']:.4f}", refresh=False)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            result.steps = human
            bar.update(1)
            if evaluate_fn is not None and settings.eval_interval and human % settings.eval_interval == 0:
                metrics = evaluate_fn(human)
                result.evals.append((human, metrics))
                model.train()
            if on_checkpoint is not None and settings.checkpoint_interval and human % settings.checkpoint_interval == 0 \
                    and human < steps:
                on_checkpoint(TrainState(human, optimizer.state_dict(), scheduler.state_dict(), torch.get_rng_state()))
    finally:
        bar.close()
        batches.close()  # stops DataLoader workers (runtime.dataloader_workers) at once
    result.loss = float(np.mean(recent)) if recent else None
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, dataset, spec, *, batch_size: int, pad_token_id: int,
             arch: Optional[Arch] = None, device: Any = "cpu", batches=None,
             runtime: Optional[Runtime] = None) -> Dict[str, float]:
    """Task metric of ``model`` on a labelled split (usually dev).

    Runs under :func:`torch.inference_mode` on batches of rows sorted by length
    (:func:`~nni_effbert.data.loading.length_sorted_batches`), so little compute goes to padding.

    Parameters
    ----------
    model : nn.Module
        A student (or the supernet with ``arch``).
    dataset : datasets.Dataset
        Tokenized rows with ``labels``.
    spec : TaskSpec
        ``metric`` and ``is_regression`` are used.
    batch_size, pad_token_id : int
        Inference batch size (rows per batch) and padding id.
    arch : dict, optional
        For the supernet.
    device : torch.device or str
        Used when no ``runtime`` is given.
    batches : list of dict, optional
        The split's batches already built by ``length_sorted_batches`` (reused between calls;
        ``dataset`` and ``batch_size`` are then only checked for emptiness).
    runtime : Runtime, optional
        Device, autocast precision and loader workers.

    Returns
    -------
    dict
        :func:`nni_effbert.data.metrics.compute_metrics` output (``default`` and components).

    Raises
    ------
    TrialFailure
        If the model outputs NaN or infinite logits (a diverged model would otherwise get the
        accuracy of always predicting class 0), or the metric is undefined (constant
        regression outputs).
    """

    preds, labels = predict(model, dataset, spec, batch_size=batch_size, pad_token_id=pad_token_id, arch=arch,
                            device=device, batches=batches, runtime=runtime)
    metrics = compute_metrics(spec.metric, preds, labels)
    if not math.isfinite(metrics["default"]):
        raise TrialFailure(f"dev {spec.metric} is undefined ({metrics['default']}): the model's predictions are constant")
    return {k: float(v) for k, v in metrics.items()}


def predict(model: nn.Module, dataset, spec, *, batch_size: int, pad_token_id: int,
            arch: Optional[Arch] = None, device: Any = "cpu", batches=None,
            runtime: Optional[Runtime] = None, call: Optional[Callable[[nn.Module, Batch], Tensor]] = None,
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions of ``model`` on every row of a labelled split, in the dataset's row order.

    What :func:`evaluate` scores, row by row, for paired comparisons of two models on the same
    rows (:mod:`nni_effbert.stats`). Same parameters as :func:`evaluate`, plus ``call``: how to
    get logits from a model and a batch (default: a student's forward; a Hugging Face teacher
    needs ``lambda m, b: m(**inputs).logits``).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Logits ``[N, C]`` (``[N]`` values for regression) and labels ``[N]``, row ``i`` being
        dataset row ``i``.

    Raises
    ------
    TrialFailure
        If the model outputs NaN or infinite logits.
    """
    if len(dataset) == 0:
        raise ConfigError("cannot evaluate on an empty split")
    if batches is None:
        batches, order = length_sorted_batches(dataset, batch_size, pad_token_id)
    else:
        order = None  # batches built by the caller: rows are put back in order by their lengths' sort
    rt = runtime if runtime is not None else Runtime(torch.device(device))
    forward = call or (lambda m, b: _forward(m, b, arch, return_kd=False).logits)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for batch in batches:
                labels.append(batch["labels"])
                batch = {k: v.to(rt.device, non_blocking=rt.is_cuda) for k, v in batch.items()}
                with rt.autocast():
                    out = forward(model, batch)
                logits.append(out.float())
        logits = [x.cpu() for x in logits]  # one sync at the end, not one per batch
    finally:
        model.train(was_training)
    all_logits = torch.cat(logits)
    if not torch.isfinite(all_logits).all():
        raise TrialFailure("the model's dev logits are NaN or infinite: it diverged")
    preds = all_logits[:, 0].numpy() if spec.is_regression else all_logits.numpy()
    gold = torch.cat(labels).numpy()
    if order is None:
        lengths = np.fromiter((len(ids) for ids in dataset["input_ids"]), dtype=np.int64, count=len(dataset))
        order = np.argsort(lengths, kind="stable")  # what length_sorted_batches does
    back = np.argsort(order)
    return preds[back], gold[back]


@torch.no_grad()
def score_split(model: nn.Module, dataset, spec, teacher: TeacherSource, loss_fn: KDLoss, *, batch_size: int,
                pad_token_id: int, arch: Optional[Arch] = None, device: Any = "cpu",
                split: str = "search") -> Dict[str, Any]:
    """Task metric and KD losses of ``model`` on a labelled split, in one pass (eval mode).

    This is what a candidate is scored with on the held-out search split: the task metric and
    the distillation loss against the teacher's (cached) outputs on the same rows (DNA, Li et
    al., CVPR 2020, ranks candidates by their distillation loss).

    Parameters
    ----------
    model : nn.Module
        A student (or the supernet with ``arch``).
    dataset : datasets.Dataset
        Tokenized rows with ``labels`` and ``idx``.
    spec : TaskSpec
    teacher : TeacherSource
        Teacher outputs of the same rows (e.g. :class:`CachedTeacher` over the split's cache).
    loss_fn : KDLoss
        The experiment's KD loss (its weights give ``kd_loss``).
    batch_size, pad_token_id : int
    arch : dict, optional
    device : torch.device or str
    split : str
        Named in error messages.

    Returns
    -------
    dict
        ``metrics`` (:func:`~nni_effbert.data.metrics.compute_metrics`, ``default`` first),
        ``kd_loss`` (the weighted KD loss, mean over batches weighted by their size),
        ``kd_pred_loss`` (the prediction soft-CE alone at ``kd.temperature``, MSE for
        regression, whatever ``kd.prediction_weight`` is), and ``kd_attention_loss`` /
        ``kd_hidden_loss`` when those terms are on; ``rows``.

    Raises
    ------
    TrialFailure
        Non-finite logits or losses, or an undefined metric.
    ConfigError
        An empty split.
    """
    if len(dataset) == 0:
        raise ConfigError(f"cannot score on the empty {split} split")
    was_training = model.training
    model.eval()
    logits, labels = [], []
    sums: Dict[str, float] = {}
    n = 0
    regression = bool(spec.is_regression)
    try:
        for batch in make_loader(dataset, batch_size, False, 0, pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            t_out = teacher(batch)
            out = _forward(model, batch, arch, return_kd=True)
            terms = loss_fn(out, t_out, batch["attention_mask"]).as_dict()
            terms["pred_soft_ce"] = float(prediction_loss(out.logits, t_out.logits, loss_fn.temperature, regression))
            b = int(batch["input_ids"].shape[0])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    means = {k: v / n for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise TrialFailure(f"the model's KD loss on the {split} split is not finite ({means}): it diverged")
    all_logits = torch.cat(logits)
    if not torch.isfinite(all_logits).all():
        raise TrialFailure(f"the model's {split} logits are NaN or infinite: it diverged")
    preds = all_logits[:, 0].numpy() if regression else all_logits.numpy()
    metrics = {k: float(v) for k, v in compute_metrics(spec.metric, preds, torch.cat(labels).numpy()).items()}
    if not math.isfinite(metrics["default"]):
        raise TrialFailure(f"{split} {spec.metric} is undefined ({metrics['default']}): the model's predictions "
                           "are constant")
    out: Dict[str, Any] = {"metrics": metrics, "kd_loss": means["total"], "kd_pred_loss": means["pred_soft_ce"],
                           "rows": n}
    for term in ("attention", "hidden"):
        if term in means:
            out[f"kd_{term}_loss"] = means[term]
    return out


@torch.no_grad()
def score_span_split(model: nn.Module, data, split: str, task_cfg, teacher: TeacherSource, loss_fn: KDLoss, *,
                     batch_size: int, pad_token_id: int, arch: Optional[Arch] = None,
                     device: Any = "cpu") -> Dict[str, Any]:
    """:func:`score_split` of span QA: EM / F1 and KD losses of ``model`` on a QA split, in one pass.

    Features (windows) are scored against the teacher's cached start / end logits; their logits
    are post-processed into one answer per question (:func:`nni_effbert.data.qa.postprocess_predictions`)
    and scored with the official rules. For SQuAD v2.0 the null threshold is the best one on
    this split (the search split is where it is tuned).

    Parameters
    ----------
    model : nn.Module
        A student with the span head (or the supernet with ``arch``).
    data : QAData
    split : str
        ``search`` (candidates) or another split of ``data``.
    task_cfg : TaskConfig
        ``n_best_size`` and ``max_answer_length``.
    teacher, loss_fn, batch_size, pad_token_id, arch, device
        As :func:`score_split`.

    Returns
    -------
    dict
        ``metrics`` (``default`` = F1, ``exact``, ``f1``, ...), ``kd_loss``, ``kd_pred_loss`` (the
        start / end soft CE), ``kd_attention_loss`` / ``kd_hidden_loss`` when on, ``rows`` (features)
        and ``questions``.
    """
    features, examples = getattr(data, split), data.examples[split]
    if len(features) == 0:
        raise ConfigError(f"cannot score on the empty {split} split")
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}
    starts: List[np.ndarray] = []
    ends: List[np.ndarray] = []
    n = 0
    inputs = features.select_columns([c for c in features.column_names if c not in ("example_id", "offset_mapping")])
    try:
        for batch in make_loader(inputs, batch_size, False, 0, pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            t_out = teacher(batch)
            out = _forward(model, batch, arch, return_kd=True)
            terms = loss_fn(out, t_out, batch["attention_mask"]).as_dict()
            terms["pred_soft_ce"] = float(span_prediction_loss(out.logits, t_out.logits, batch["attention_mask"],
                                                               loss_fn.temperature))
            b = int(batch["input_ids"].shape[0])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
            logits = out.logits.float().cpu().numpy()
            for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
                starts.append(logits[row, :length, 0])
                ends.append(logits[row, :length, 1])
    finally:
        model.train(was_training)
    means = {k: v / n for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise TrialFailure(f"the model's KD loss on the {split} split is not finite ({means}): it diverged")
    if not all(np.isfinite(x).all() for x in starts + ends):
        raise TrialFailure(f"the model's {split} start/end logits are NaN or infinite: it diverged")
    preds, diffs = postprocess_predictions(examples, features, starts, ends, task_cfg.n_best_size,
                                           task_cfg.max_answer_length)
    version = data.spec.name
    threshold = None
    if version == "squad_v2":
        gold = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
        threshold, _ = best_null_threshold(preds, diffs, gold)
        preds = apply_null_threshold(preds, diffs, threshold)
    metrics = {k: float(v) for k, v in evaluate_predictions(preds, examples, version).items()}
    if threshold is not None:
        metrics["null_threshold"] = float(threshold)
    out_: Dict[str, Any] = {"metrics": metrics, "kd_loss": means["total"], "kd_pred_loss": means["pred_soft_ce"],
                            "rows": n, "questions": len(examples)}
    for term in ("attention", "hidden"):
        if term in means:
            out_[f"kd_{term}_loss"] = means[term]
    return out_


# ---------------------------------------------------------------------------------------------
# Experiment setup
# ---------------------------------------------------------------------------------------------

# Student fields that must agree with the teacher and the task (set automatically).
_DERIVED = ("vocab_size", "fit_size", "num_labels", "pad_token_id", "type_vocab_size", "head")


def build_space(cfg, teacher_config, spec):
    """The student space of an experiment, sized for its teacher and task.

    ``student.preset`` plus ``student.overrides``, with ``vocab_size``, ``type_vocab_size``
    and ``pad_token_id`` taken from the teacher, ``fit_size`` = the teacher's hidden size
    (hidden-state distillation goes through ``fit_dense``) and ``num_labels`` from the task.

    Parameters
    ----------
    cfg : ExperimentConfig
    teacher_config : transformers.PretrainedConfig
        The (fine-tuned) teacher's config.
    spec : TaskSpec

    Returns
    -------
    EfficientBertSupernet
        The space without NNI mutables (same API and weights as ``EfficientBertSpace``), so a
        trial process never imports ``nni.nas``; ``KDEvaluator.space`` turns it into an
        ``EfficientBertSpace`` sharing its weights, for ``NasExperiment``.

    Raises
    ------
    ConfigError
        Unknown preset or override, an override contradicting the teacher or task, or a
        sequence length beyond the student's position table.
    """

    derived = {
        "vocab_size": int(teacher_config.vocab_size),
        "type_vocab_size": int(getattr(teacher_config, "type_vocab_size", 2) or 2),
        "pad_token_id": int(getattr(teacher_config, "pad_token_id", 0) or 0),
        "fit_size": int(teacher_config.hidden_size),
        "num_labels": 1 if spec.is_regression else int(spec.num_labels),
        # Span QA: start / end logits over the last hidden states instead of pooler + classifier.
        "head": "span" if getattr(spec, "is_span", False) else "sequence",
    }
    preset, overrides = student_preset(cfg, teacher_config)  # student.preset: teacher -> the teacher's sizes
    for key in _DERIVED:
        if key in overrides and overrides[key] != derived[key]:
            raise ConfigError(
                f"student.overrides.{key} = {overrides[key]!r} contradicts the teacher/task ({derived[key]!r}); "
                f"leave {key} out: it is set from the teacher and the task"
            )
    try:
        space = EfficientBertSupernet.preset(preset, **{**overrides, **derived})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"student: {exc}") from None
    longest = max(cfg.task.max_seq_length, cfg.warmup.max_seq_length or 0)
    if longest > space.config.max_position_embeddings:
        raise ConfigError(
            f"task.max_seq_length / warmup.max_seq_length ({longest}) exceed the student's "
            f"max_position_embeddings ({space.config.max_position_embeddings}); lower them or set "
            "student.overrides.max_position_embeddings"
        )
    return space


@dataclass
class KDSetup:
    """What every KD command loads from a config, loaded once.

    Use :meth:`from_config`. Heavy parts (the teacher model, the teacher-output cache) are
    loaded on first use.

    Attributes
    ----------
    cfg : ExperimentConfig
    workdir : WorkDir
    teacher_dir : Path
        The fine-tuned teacher.
    teacher_marker : dict
        Its ``effbert_teacher.json``.
    tokenizer
        The teacher's tokenizer.
    teacher_config
        The teacher's HF config.
    task : TaskData
        The task, tokenized with the teacher's tokenizer.
    space : EfficientBertSupernet
        The student supernet (random weights until a checkpoint is loaded).
    loss_fn : KDLoss
    pad_token_id : int
    device : torch.device
    runtime : Runtime
        Device, precision and loader settings of every model this setup trains or runs
        (:func:`nni_effbert.runtime.resolve_runtime` of ``cfg``).
    """

    cfg: Any
    workdir: WorkDir
    teacher_dir: Path
    teacher_marker: Dict[str, Any]
    tokenizer: Any
    teacher_config: Any
    task: Any
    space: Any
    loss_fn: KDLoss
    pad_token_id: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    _teacher_model: Optional[nn.Module] = field(default=None, repr=False)
    _train_cache: Any = field(default=None, repr=False)
    _dev_batches: Any = field(default=None, repr=False)
    _search_cache: Any = field(default=None, repr=False)
    runtime: Any = None

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = Runtime(self.device)

    @classmethod
    def from_config(cls, cfg, *, progress: bool = True) -> "KDSetup":
        """Load the teacher's config and tokenizer, the task data and the student space.

        Raises
        ------
        CheckpointError
            If the work directory holds no fine-tuned teacher, or one fine-tuned for other
            task data (run ``nni-effbert teacher`` first).
        ConfigError, DataError
            From the config, the data or the space.
        RuntimeConfigError
            If ``runtime`` asks for a device or precision this machine lacks.
        """

        runtime = resolve_runtime(cfg)
        wd = WorkDir.of(cfg).ensure()
        teacher_dir = wd.teacher_dir
        hint = "run `nni-effbert teacher -c <config>` first"
        marker = read_teacher_marker(teacher_dir) if teacher_dir.is_dir() else None
        if marker is None:
            raise CheckpointError(f"no fine-tuned teacher in {teacher_dir} (no {MARKER_FILE}); {hint}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
            teacher_config = AutoConfig.from_pretrained(str(teacher_dir))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"the teacher in {teacher_dir} cannot be loaded ({exc}); delete it and {hint}") from exc
        # Tokenized once per work directory; later processes (every trial) read it from disk.
        identity = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(teacher_dir.iterdir())
                    if p.is_file() and p.name != FINGERPRINT_MEMO]
        if cfg.task.name in QA_TASKS:  # windows saved once per work directory (a snapshot per fingerprint)
            task = load_qa_task(cfg.task, tokenizer, cache_dir=str(wd.datasets_cache),
                                store_dir=wd.datasets_cache / "tasks")
        else:
            task = load_prepared_task(cfg.task, tokenizer, store_dir=wd.datasets_cache / "tasks", identity=identity,
                                      cache_dir=str(wd.datasets_cache))
        if marker.get("task_fingerprint") != task.fingerprint:
            raise CheckpointError(
                f"the teacher in {teacher_dir} was fine-tuned for other task data (fingerprint "
                f"{marker.get('task_fingerprint')}, the config gives {task.fingerprint}); re-run "
                "`nni-effbert teacher -c <config>` to fine-tune it for this config"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))  # a reproducible random start, the caller's RNG untouched
            space = build_space(cfg, teacher_config, task.spec)
        loss_fn = KDLoss(cfg.kd, space.config.num_hidden_layers, int(teacher_config.num_hidden_layers),
                         regression=bool(task.spec.is_regression))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(cfg=cfg, workdir=wd, teacher_dir=teacher_dir, teacher_marker=marker, tokenizer=tokenizer,
                   teacher_config=teacher_config, task=task, space=space, loss_fn=loss_fn, pad_token_id=int(pad),
                   progress=progress, device=runtime.device, runtime=runtime)

    @property
    def teacher_fingerprint(self) -> Optional[str]:
        return self.teacher_marker.get("teacher_fingerprint")

    def teacher_model(self) -> nn.Module:
        """The fine-tuned teacher, frozen, in eval mode (loaded on first call)."""
        if self._teacher_model is None:

            model, _ = load_teacher(str(self.teacher_dir))
            self._teacher_model = prepare_teacher(model).to(self.device)
        return self._teacher_model

    def train_cache(self):
        """The teacher-output cache of the task's train split (built on first use, shared)."""
        if self._train_cache is None:
            self._train_cache = self.open_cache(self.task.train, self.task.fingerprint, "train")
        return self._train_cache

    def open_cache(self, dataset, data_fingerprint: str, split: str):
        """Open (or build, once for all processes) the teacher-output cache of ``dataset``."""

        return TeacherCache.open_or_build(
            self.workdir.root, self.teacher_dir, dataset,
            data_fingerprint=data_fingerprint, split=split,
            hidden_layers=self.loss_fn.teacher_hidden_layers,
            attention_layers=self.loss_fn.teacher_attention_layers,
            pad_token_id=self.pad_token_id,
            batch_size=int(self.cfg.evaluator.batch_size),
            model=self._teacher_model,
            progress=self.progress,
            device=self.device,
        )

    def cached_teacher(self) -> CachedTeacher:
        """Teacher source over the train split's cache."""
        return CachedTeacher(self.train_cache(), self.device)

    def live_teacher(self) -> LiveTeacher:
        """Teacher source running the teacher model itself."""
        return LiveTeacher(self.teacher_model(), self.loss_fn.teacher_hidden_layers,
                           self.loss_fn.teacher_attention_layers, self.device)

    def reset_space(self) -> None:
        """Reset the supernet to its random initialisation, seeded by ``cfg.seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.seed))
            supernet = self.space.supernet
            supernet.apply(supernet._init_weights)

    def _dev_batches_once(self) -> list:
        if self._dev_batches is None:
            ev = self.cfg.evaluator
            size = int(ev.eval_batch_size or ev.batch_size)
            self._dev_batches = length_sorted_batches(self.task.dev, size, self.pad_token_id)[0] \
                if len(self.task.dev) else []
        return self._dev_batches

    def evaluate(self, model: nn.Module, arch: Optional[Arch] = None) -> Dict[str, float]:
        """Dev metric of ``model`` (see :func:`evaluate`), in batches of ``evaluator.eval_batch_size``
        rows sorted by length (built once per setup). For the final report only: the search
        scores on the search split (:meth:`score_search`). Span QA: EM / F1 on dev questions
        (``default`` = F1), the v2.0 null threshold tuned on the search split."""
        if self.task.spec.is_span:
            return self._evaluate_span(model, arch)
        return evaluate(model, self.task.dev, self.task.spec, batch_size=int(self.cfg.evaluator.batch_size),
                        pad_token_id=self.pad_token_id, arch=arch, device=self.device, batches=self._dev_batches_once(),
                        runtime=self.runtime)

    def predict_dev(self, model: nn.Module, *, arch: Optional[Arch] = None,
                    call: Optional[Callable[[nn.Module, Batch], Tensor]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Dev predictions of ``model`` in dev row order, and the labels (see :func:`predict`)."""
        return predict(model, self.task.dev, self.task.spec, batch_size=int(self.cfg.evaluator.batch_size),
                       pad_token_id=self.pad_token_id, arch=arch, device=self.device,
                       batches=self._dev_batches_once(), runtime=self.runtime, call=call)

    # -- the held-out search split ------------------------------------------------------------

    def search_split(self):
        """The task's search split (carved from train, never trained on).

        Raises
        ------
        ConfigError
            If it is empty (``task.search_rows: 0`` or a single train row).
        """
        search = getattr(self.task, "search", None)
        if search is None or len(search) == 0:
            raise ConfigError(
                "the task has no search split (task.search_rows is 0 or the train split has fewer than 2 rows); "
                "the search scores candidates on rows held out from train, never on dev: set task.search_rows "
                "(e.g. 1000) or task.search_fraction"
            )
        return search

    def search_cache(self):
        """The teacher-output cache of the search split (built on first use, shared)."""
        if self._search_cache is None:
            self._search_cache = self.open_cache(self.search_split(), self.task.fingerprint, "search")
        return self._search_cache

    def _evaluate_span(self, model: nn.Module, arch: Optional[Arch]) -> Dict[str, float]:
        rt = self.runtime
        was_training = model.training
        model.eval()

        def forward(batch: Batch) -> Tensor:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with rt.autocast():
                return _forward(model, batch, arch, return_kd=False).logits

        try:
            size = int(self.cfg.evaluator.eval_batch_size or self.cfg.evaluator.batch_size)
            scores = score_span_model(forward, self.task, self.cfg.task, size, self.pad_token_id, splits=("dev",))
        finally:
            model.train(was_training)
        if "dev" not in scores:
            raise ConfigError("cannot evaluate on an empty split")
        return scores["dev"]

    def score_search(self, model: nn.Module, arch: Optional[Arch] = None) -> Dict[str, Any]:
        """Task metric and KD losses of ``model`` on the search split (see :func:`score_split`;
        :func:`score_span_split` for span QA)."""
        if self.task.spec.is_span:
            return score_span_split(model, self.task, "search", self.cfg.task,
                                    CachedTeacher(self.search_cache(), self.device), self.loss_fn,
                                    batch_size=int(self.cfg.evaluator.batch_size), pad_token_id=self.pad_token_id,
                                    arch=arch, device=self.device)
        return score_split(model, self.search_split(), self.task.spec, CachedTeacher(self.search_cache(), self.device),
                           self.loss_fn, batch_size=int(self.cfg.evaluator.batch_size),
                           pad_token_id=self.pad_token_id, arch=arch, device=self.device, split="search")
