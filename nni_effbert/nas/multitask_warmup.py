"""Warm-up KD of a multi-task supernet, one stage at a time (issue 27).

The tasks of a ``tasks:`` config share one student encoder (:class:`~nni_effbert.kd.multitask.MultiTaskSetup`);
this warms it up as :func:`~.warmup.run_warmup` does for one task, with the paper's multi-task
step: every step samples a path (the stage's fixed choices held, inside ``search.param_budget``) and
a task (by its weight, :func:`~nni_effbert.kd.train.task_of_step`), and distils that task's
teacher into that task's head through the shared encoder on that task's train rows
(:func:`~nni_effbert.kd.train.kd_train_tasks`). A general phase (``general_warmup_steps``) first
distils attention and hidden states on unlabeled text through the first task's setup (its
teacher and ``warmup.corpus_file``, else its train sentences), as the single-task warm-up does.

The stage checkpoint (``<workdir>/supernet[/<experiment>]/stage{N}.pt``) holds
:meth:`MultiTaskSetup.state_dict` (the encoder once, a head per task) with its plan, tasks and
owner; a warm-up whose checkpoint exists for the same plan is not run again. A stage starts from
the nearest earlier stage's multi-task checkpoint, else as ``warmup.init`` says: ``teacher``
(every task's supernet from its own teacher, the first task's last, so the shared encoder is the
first task's teacher's and each head its own task's), ``teacher_embeddings`` or ``random``.

An interrupted warm-up resumes where its last resumable state (``stage{N}.resume.pt``, every
tenth of the run) left it, as the single-task warm-up does. The multi-task search's warm-up
trials run it (:mod:`.trial_runner`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from filelock import FileLock
from torch import nn

from ..config import ExperimentConfig, task_config
from ..errors import CheckpointError, ConfigError
from ..io import atomic_save_torch, load_torch
from ..kd.multitask import MultiTaskSetup
from ..kd.student_start import start_from_teacher, warmup_init_mode
from ..kd.teacher_init import init_embeddings_from_teacher
from ..kd.train import TaskStream, TrainSettings, TrainState, kd_train, kd_train_tasks, task_of_step
from ..params import GENERAL_WARMUP_STEPS_KEY, WARMUP_KEY, WARMUP_STEPS_KEY, int_meta, is_warmup, split_arch
from ..workdir import WorkDir
from .supernets import check_owner, experiment_key, owner
from .warmup import (_PHASES, _ArchSampler, _check_stage, _checkpoint_interval, _phases, _read_state, _resume_point,
                     _resumed_at, _validate_fixed, plan_warmup)

__all__ = ["MULTITASK_KIND", "MultiTaskWarmupResult", "multitask_plan", "run_multitask_warmup",
           "run_multitask_warmup_parameters", "stage_tasks"]

logger = logging.getLogger(__name__)

#: ``kind`` of a multi-task stage checkpoint.
MULTITASK_KIND = "nni-effbert-multitask-supernet"
#: ``kind`` of a multi-task warm-up's resumable state.
STATE_KIND = "nni-effbert-multitask-warmup-state"


@dataclass
class MultiTaskWarmupResult:
    """Outcome of :func:`run_multitask_warmup`: the checkpoint, whether it was already there,
    where the weights started, the steps each task trained, the last KD loss and the wall time."""

    stage: int
    checkpoint: Path
    plan: Dict[str, Any]
    skipped: bool = False
    init: str = "random"
    task_steps: Dict[str, int] = field(default_factory=dict)
    loss: Optional[float] = None
    seconds: float = 0.0
    resumed_at: Optional[int] = None

    def report(self) -> Dict[str, Any]:
        """Final-metric dict of a multi-task warm-up trial, without ``default`` (a warm-up is not a
        candidate; see :meth:`WarmupResult.report <nni_effbert.nas.warmup.WarmupResult.report>`)."""
        return {"warmup": True, "stage": self.stage, "steps": int(self.plan.get("general_steps") or 0) + int(self.plan.get("steps") or 0),
                "skipped": self.skipped, "init": self.init, "tasks": [t for t, _ in self.plan.get("tasks", [])],
                **({"warmup_loss": float(self.loss)} if self.loss is not None else {}),
                **({"resumed_at": int(self.resumed_at)} if self.resumed_at is not None else {}),
                **{f"warmup_steps.{task}": int(n) for task, n in self.task_steps.items()}}


def multitask_plan(cfg: ExperimentConfig, stage: int, *, fixed: Optional[Mapping[str, Any]] = None,
                   steps: Optional[int] = None, general_steps: Optional[int] = None) -> Dict[str, Any]:
    """The stage's warm-up plan (:func:`~.warmup.plan_warmup` of the first task's config) plus the
    tasks and their weights: equal plans give interchangeable checkpoints."""
    first = task_config(cfg, cfg.task_keys[0])
    return _with_tasks(cfg, plan_warmup(first, stage, fixed=fixed, steps=steps, general_steps=general_steps))


def stage_tasks(cfg: ExperimentConfig, stage: int) -> List[str]:
    """The keys of the tasks stage ``stage`` warms up on and scores on (``search.stages[N].tasks``,
    else every task), in the config's order."""
    chosen = cfg.search.stages[stage].tasks if 0 <= stage < len(cfg.search.stages) else None
    return [key for key in cfg.task_keys if chosen is None or key in chosen]


def _with_tasks(cfg: ExperimentConfig, first_plan) -> Dict[str, Any]:
    """The first task's plan as a dict, plus the stage's tasks with their weights."""
    keys = stage_tasks(cfg, first_plan.stage)
    return {**first_plan.to_dict(), "tasks": [[entry.key, float(entry.weight)] for entry in cfg.tasks
                                              if entry.key in keys]}


def _read_checkpoint(path: Path, stage: int) -> Dict[str, Any]:
    data = load_torch(path, f"multi-task supernet checkpoint of stage {stage}")
    if not isinstance(data, dict) or data.get("kind") != MULTITASK_KIND:
        raise CheckpointError(f"{path} is not a multi-task supernet checkpoint (it was written by a single-task "
                              "warm-up or another tool); delete it or use another work directory")
    return data


def _init(multi: MultiTaskSetup, cfg: ExperimentConfig, wd: WorkDir, stage: int, experiment: Optional[str]) -> str:
    """Load the starting weights of a fresh multi-task warm-up; returns where they came from."""
    previous = wd.latest_supernet_checkpoint(stage - 1, experiment) if stage > 0 else None
    if previous is not None:
        path = wd.supernet_checkpoint(previous, experiment)
        data = _read_checkpoint(path, previous)
        check_owner(data, path, experiment, what=f"multi-task supernet checkpoint of stage {previous}")
        multi.load_state_dict(data["state"])
        logger.info("stage %d multi-task warm-up starts from the stage %d supernet", stage, previous)
        return f"stage {previous} checkpoint"
    if cfg.warmup.checkpoint:
        raise ConfigError("warmup.checkpoint is not supported with tasks: yet (a single-task supernet has one head); "
                          "empty it")
    for t in multi.tasks:
        t.setup.reset_space()
    mode = warmup_init_mode(cfg.warmup)
    if mode == "teacher":
        for t in reversed(multi.tasks):  # the first task's teacher last: the shared encoder is its
            start_from_teacher(t.setup, progress=t.setup.progress)
        return f"teachers (encoder: {multi.tasks[0].name}'s)"
    first = multi.tasks[0].setup
    if mode == "teacher_embeddings":
        init_embeddings_from_teacher(first.space.supernet, first.teacher_model())
        return f"random, {multi.tasks[0].name}'s teacher embeddings"
    return "random"


def run_multitask_warmup(cfg: ExperimentConfig, stage: int, *, fixed: Optional[Mapping[str, Any]] = None,
                         steps: Optional[int] = None, general_steps: Optional[int] = None, force: bool = False,
                         progress: bool = True, multi: Optional[MultiTaskSetup] = None,
                         experiment: Optional[str] = None,
                         checkpoint_interval: Optional[int] = None) -> MultiTaskWarmupResult:
    """Warm up the multi-task supernet of ``stage`` and write its checkpoint.

    Parameters are those of :func:`~.warmup.run_warmup` (``multi``: an already loaded
    :class:`MultiTaskSetup`, whose weights are overwritten). Every ``checkpoint_interval`` steps
    (default a tenth of the run, at least 25) a resumable state goes to
    ``supernet[/<experiment>]/stage{N}.resume.pt``; a run that finds one for the same plan
    continues from it (the same steps, tasks and batches as an uninterrupted run) and deletes it
    once the stage checkpoint is written.

    Raises
    ------
    ConfigError
        ``cfg`` has no ``tasks``, an unknown stage, bad fixed choices, a budget no arch can meet.
    CheckpointError
        A task without a fine-tuned teacher, or an earlier stage checkpoint that is not a
        multi-task one.
    TrialFailure
        If the KD loss diverges.
    """
    started = time.perf_counter()
    if not cfg.tasks:
        raise ConfigError("run_multitask_warmup needs a config with tasks:; use run_warmup for one task")
    _check_stage(cfg, stage)
    multi = multi or MultiTaskSetup.from_config(cfg, progress=progress)
    first = multi.tasks[0].setup
    space = first.space
    fixed = _validate_fixed(space, fixed or {})
    first_plan = plan_warmup(first.cfg, stage, fixed=fixed, steps=steps, general_steps=general_steps)
    plan = _with_tasks(cfg, first_plan)
    wd = WorkDir.of(cfg).ensure()
    experiment = experiment_key(experiment)
    ckpt = wd.supernet_checkpoint(stage, experiment)
    wd.supernet_folder(experiment).mkdir(parents=True, exist_ok=True)
    balanced = cfg.warmup.path_sampling == "balanced"
    max_tries = int(cfg.search.sampler.max_tries)
    samplers = {name: _ArchSampler(space, fixed, first_plan.budget, first_plan.seed, stage, i, max_tries, balanced)
                for i, name in enumerate(_PHASES)}
    samplers["task"](0)  # fail now, before any training, when the budget cannot be met

    with FileLock(str(wd.warmup_lock(stage, experiment))):
        if ckpt.is_file() and not force:
            data = _read_checkpoint(ckpt, stage)
            check_owner(data, ckpt, experiment, what=f"multi-task supernet checkpoint of stage {stage}")
            if data.get("plan") == plan:
                multi.load_state_dict(data["state"])
                logger.info("stage %d is already warmed up for tasks %s (%s)", stage, ", ".join(multi.names), ckpt)
                return MultiTaskWarmupResult(stage, ckpt, plan, skipped=True, init=str(data.get("init")),
                                             loss=data.get("loss"), seconds=time.perf_counter() - started)
            logger.warning("stage %d multi-task checkpoint %s was made with other settings; warming up again", stage, ckpt)
        state_path = wd.warmup_state(stage, experiment)
        state = None if force else _read_state(state_path, plan, STATE_KIND)
        resumed_at: Optional[int] = None
        if state is not None:
            multi.load_state_dict(state["state"])
            init = str(state["init"])
            resumed_at = _resumed_at(state, first_plan.general_steps)
            logger.info("stage %d: resuming the multi-task warm-up after %d of %d steps", stage, resumed_at,
                        first_plan.total_steps)
        else:
            init = _init(multi, cfg, wd, stage, experiment)
        interval = _checkpoint_interval(checkpoint_interval, first_plan.total_steps)
        loss: Optional[float] = None
        task_steps: Dict[str, int] = {}
        container = nn.ModuleList([t.setup.space for t in multi.tasks])
        # The general phase as the single-task warm-up's (the first task's setup); the task phase over every task.
        phases = [p for p in _phases(first, first.cfg, first_plan) if p[0] == "general"] \
            if first_plan.general_steps else []
        if first_plan.steps:
            phases.append(("task", first_plan.steps, None, None, None, ""))
        for name, n_steps, dataset, teacher, loss_fn, desc in phases:
            phase_index = _PHASES.index(name)
            skip, resume = _resume_point(state, phase_index)
            if skip:
                continue  # finished before the interruption

            def save_state(ts: Optional[TrainState], _phase_index: int = phase_index) -> None:
                atomic_save_torch({"kind": STATE_KIND, "plan": plan, "init": init, "phase_index": _phase_index,
                                   "train": ts.to_dict() if ts else None, "state": multi.state_dict()}, state_path)

            settings = TrainSettings(steps=n_steps, learning_rate=first_plan.learning_rate,
                                     batch_size=first_plan.batch_size,
                                     seed=first_plan.seed * 1_000_003 + stage * 1009 + phase_index,
                                     checkpoint_interval=interval,
                                     desc=f"multi-task warm-up stage {stage} ({name})", progress=progress)
            if name == "general":
                logger.info("stage %d general warm-up: %d steps on %s", stage, n_steps, desc)
                out = kd_train(space, teacher, dataset, loss_fn, settings, pad_token_id=first.pad_token_id,
                               arch_sampler=samplers[name], on_checkpoint=save_state, resume=resume,
                               device=first.device, runtime=first.runtime)
                if first_plan.steps:  # the phase boundary: an interruption in the task phase must not redo it
                    save_state(None, _PHASES.index("task"))
            else:
                keys = stage_tasks(cfg, stage)
                streams = [TaskStream(t.name, t.setup.space, t.setup.cached_teacher(), t.setup.task.train,
                                      t.setup.loss_fn, t.weight) for t in multi.tasks if t.name in keys]
                logger.info("stage %d multi-task warm-up: %d steps over %s", stage, n_steps, ", ".join(keys))
                out = kd_train_tasks(container, streams, settings, pad_token_id=first.pad_token_id,
                                     arch_sampler=samplers[name], on_checkpoint=save_state, resume=resume,
                                     device=first.device, runtime=first.runtime)
                # Steps per task over the whole phase, those before a resume included.
                drawn = [task_of_step([s.weight for s in streams], settings.seed, k) for k in range(n_steps)]
                task_steps = {s.name: drawn.count(i) for i, s in enumerate(streams)}
            loss = out.loss if out.loss is not None else loss
        atomic_save_torch({"kind": MULTITASK_KIND, "owner": owner(experiment), "stage": stage, "plan": plan,
                           "init": init, "loss": loss, "tasks": multi.names, "task_steps": task_steps,
                           "teacher_fingerprints": {t.name: t.setup.teacher_fingerprint for t in multi.tasks},
                           "state": multi.state_dict(),
                           "space_configs": {t.name: t.setup.space.config.to_dict() for t in multi.tasks}}, ckpt)
        state_path.unlink(missing_ok=True)
    logger.info("stage %d multi-task warm-up done: %s (steps per task %s)", stage, ckpt, task_steps)
    return MultiTaskWarmupResult(stage, ckpt, plan, skipped=False, init=init, task_steps=task_steps, loss=loss,
                                 seconds=time.perf_counter() - started, resumed_at=resumed_at)


def run_multitask_warmup_parameters(cfg: ExperimentConfig, params: Mapping[str, Any], *,
                                    stage: Optional[int] = None, progress: bool = True,
                                    multi: Optional[MultiTaskSetup] = None,
                                    experiment: Optional[str] = None) -> Dict[str, Any]:
    """A multi-task warm-up trial's parameters (``{"_warmup_stage": N, ...}``, as
    :func:`~.warmup.run_warmup_parameters` reads them) run; returns its metric dict
    (:meth:`MultiTaskWarmupResult.report`). ``stage`` overrides ``_warmup_stage``."""
    if not is_warmup(params):
        raise ConfigError(f"warm-up parameters need {WARMUP_KEY}, got keys {sorted(params)}")
    result = run_multitask_warmup(cfg, int_meta(params, WARMUP_KEY) if stage is None else stage,
                                  fixed=split_arch(params), steps=int_meta(params, WARMUP_STEPS_KEY),
                                  general_steps=int_meta(params, GENERAL_WARMUP_STEPS_KEY), progress=progress,
                                  multi=multi, experiment=experiment)
    return result.report()
