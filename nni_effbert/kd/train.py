"""The one knowledge-distillation training loop, and everything it needs.

Warm-up of the weight-sharing supernet (:mod:`.warmup`), per-candidate KD fine-tuning
(:mod:`.evaluator`) and the final distillation of an exported student all call
:func:`kd_train`:

* the student is a fixed :class:`~nni_effbert.search_spaces.EfficientBertModel`, or the
  supernet (:class:`~nni_effbert.search_spaces.EfficientBertSupernet`, or its NNI subclass
  :class:`~nni_effbert.search_spaces.EfficientBertSpace`) with an ``arch_sampler``
  that picks the architecture of every step;
* teacher outputs come from a :class:`~nni_effbert.kd.sources.TeacherSource` (the shared
  teacher-output cache, or the teacher itself for unlabeled text that is not cached);
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

Scoring a trained student lives in :mod:`nni_effbert.kd.scoring`; what a command loads from a
config (:class:`~nni_effbert.kd.setup.KDSetup`) in :mod:`nni_effbert.kd.setup`.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.batches import collate
from ..errors import ConfigError, EffBertError
from ..runtime import Runtime
from .losses import KDLoss
from .sources import Arch, Batch, TeacherSource

__all__ = [
    "TrialFailure",
    "TrainSettings",
    "TrainState",
    "TrainResult",
    "iterate_batches",
    "TaskStream",
    "task_of_step",
    "kd_train",
    "kd_train_tasks",
    "student_forward",
]

logger = logging.getLogger(__name__)



class TrialFailure(EffBertError, RuntimeError):
    """A model cannot be scored: its loss or gradient became NaN/inf, or its forward failed.

    The message says what happened and at which step (``"loss became NaN at step 37"``).
    Trials report it as a failure with this reason, never as a score.
    """



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
    task_steps : dict
        Steps of this run per task (:func:`kd_train_tasks`; ``{"task": n}`` for :func:`kd_train`).
    """

    steps: int
    loss: Optional[float]
    last_terms: Dict[str, float] = field(default_factory=dict)
    evals: List[Tuple[int, Dict[str, float]]] = field(default_factory=list)
    task_steps: Dict[str, int] = field(default_factory=dict)


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
    padded to its own longest sequence (:func:`~nni_effbert.data.batches.collate`). With
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


def student_forward(model: nn.Module, batch: Batch, arch: Optional[Arch], return_kd: bool = True):
    """``model``'s forward on a padded batch: a fixed student (``arch`` None) or the supernet's
    ``arch`` path; ``return_kd`` also returns the hidden states and attentions KD needs."""
    kwargs: Dict[str, Any] = {"return_kd": return_kd}
    if arch is not None:
        kwargs["arch"] = arch
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), **kwargs)


@dataclass
class TaskStream:
    """One task of a multi-task KD run (:func:`kd_train_tasks`): the task's student (its
    supernet, sharing the encoder with the other tasks'), teacher outputs, rows, loss and weight."""

    name: str
    model: nn.Module
    teacher: TeacherSource
    dataset: Any
    loss_fn: KDLoss
    weight: float = 1.0


def task_of_step(weights, seed: int, step: int) -> int:
    """The task (index into ``weights``) that step ``step`` trains: drawn with probabilities
    proportional to ``weights``, from ``(seed, step)`` alone, so a resumed run draws the same."""
    w = np.asarray(weights, dtype=float)
    if w.size == 1:
        return 0
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError(f"task weights must be positive numbers, got {list(weights)}")
    return int(np.random.default_rng([int(seed), int(step)]).choice(w.size, p=w / w.sum()))


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

    stream = TaskStream("task", model, teacher, dataset, loss_fn)
    return _train(model, [stream], settings, pad_token_id=pad_token_id, arch_sampler=arch_sampler,
                  evaluate_fn=evaluate_fn, on_checkpoint=on_checkpoint, resume=resume, device=device, runtime=runtime)


def kd_train_tasks(model: nn.Module, streams: List[TaskStream], settings: TrainSettings, *, pad_token_id: int,
                   **options: Any) -> TrainResult:
    """:func:`kd_train` over several tasks: each step trains the task :func:`task_of_step` draws
    (by the streams' weights), on that task's next batch, teacher outputs and loss, through that
    task's model, with one optimizer over ``model`` (a module holding every stream's model, whose
    shared tensors it counts once). Step ``k``'s task, architecture and batch depend only on the
    seeds and ``k``, so a resumed run repeats an uninterrupted one. ``options`` and errors are
    :func:`kd_train`'s keyword arguments (``arch_sampler``, ``evaluate_fn``, ``on_checkpoint``,
    ``resume``, ``device``, ``runtime``); ``result.task_steps`` counts the steps each task trained."""
    if not streams:
        raise ConfigError("kd_train_tasks needs at least one task stream")
    return _train(model, list(streams), settings, pad_token_id=pad_token_id, **options)


def _train(model: nn.Module, streams: List[TaskStream], settings: TrainSettings, *, pad_token_id: int,
           arch_sampler=None, evaluate_fn=None, on_checkpoint=None, resume=None, device: Any = "cpu",
           runtime: Optional[Runtime] = None) -> TrainResult:
    steps = int(settings.steps)
    start = int(resume.step) if resume is not None else 0
    result = TrainResult(steps=start, loss=None)
    if start >= steps:
        return result
    rt = runtime if runtime is not None else Runtime(torch.device(device))
    device = rt.device
    model.to(device)
    model.train()
    for stream in streams:
        stream.model.to(device)
        stream.model.train()
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
    forward_models = [stream.model for stream in streams]
    if rt.compile and arch_sampler is None and len(streams) == 1:
        forward_models = [torch.compile(streams[0].model)]
    elif rt.compile:
        logger.info("runtime.compile: the supernet runs eagerly (each step's architecture would recompile it)")
    recent: List[float] = []
    window: List[Tuple[int, Dict[str, Tensor], Optional[Tensor]]] = []
    weights = [float(stream.weight) for stream in streams]
    # One batch stream per task (the single task keeps settings.seed), each resumed after the
    # batches the steps before `start` took from it.
    before = [0] * len(streams)
    for k in range(start):
        before[task_of_step(weights, settings.seed, k)] += 1
    batches = [iterate_batches(stream.dataset, settings.batch_size, settings.seed + 7919 * i, pad_token_id,
                               before[i], device, workers=rt.dataloader_workers, pin_memory=rt.pin_memory)
               for i, stream in enumerate(streams)]
    result.task_steps = {stream.name: 0 for stream in streams}
    bar = tqdm(total=steps, initial=start, desc=settings.desc, disable=not settings.progress, dynamic_ncols=True)
    try:
        for step in range(start, steps):
            human = step + 1
            i = task_of_step(weights, settings.seed, step)
            stream = streams[i]
            batch = next(batches[i])
            arch = arch_sampler(step) if arch_sampler is not None else None
            result.task_steps[stream.name] += 1
            try:
                with rt.autocast():
                    t_out = stream.teacher(batch)
                    s_out = student_forward(forward_models[i], batch, arch)
                    out = stream.loss_fn(s_out, t_out, batch["attention_mask"])
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
        for it in batches:
            it.close()  # stops DataLoader workers (runtime.dataloader_workers) at once
    result.loss = float(np.mean(recent)) if recent else None
    return result
