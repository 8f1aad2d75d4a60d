"""Warm-up KD of the weight-sharing supernet, one stage at a time.

EfficientBERT (Dong et al., 2021, Sec. 3.3) scores candidates with weights inherited from a
supernet that was first distilled from the teacher while sampling a random architecture at
every step ("warm-up KD"). ``nni-effbert warmup -c exp.yml --stage N`` does this for stage
``N`` (zero-based) and writes ``<workdir>/supernet/stage{N}.pt``; a warm-up trial of an NNI
experiment writes ``<workdir>/supernet/<experiment id>/stage{N}.pt`` and only that experiment
reads it (:mod:`.supernets`).

Per step, the arch is uniform over the space with the stage's fixed choices held (``--fixed``
or the warm-up trial's parameters) and, when ``search.param_budget`` is set, inside the budget
(rejection sampling). The arch of step ``k`` depends only on ``(seed, stage, phase, k)``.

Phases and data
---------------
===========================  ===============================  =============================
phase                        text                             loss
===========================  ===============================  =============================
general (``general_steps``)  ``warmup.corpus_file`` if set,   attention + hidden states
                             else the task's train sentences
task (``steps``), after a    the task's train split           attention + hidden +
general phase                                                 predictions (``kd``)
task, alone                  as the general phase             attention + hidden +
                                                              predictions
===========================  ===============================  =============================

The task's train sentences go through the shared teacher-output cache (the one candidate
trials use); a corpus (``warmup.corpus_file``: one plain-text file or a list) is streamed with
the same tokenizer, and the seeded subset of its lines that the phase's ``steps x batch_size``
can see gets a teacher-output cache of its own, built once. The general phase is the paper's
stage-3 two-step warm-up (general KD on unlabeled text, then task KD).

A supernet with no earlier checkpoint starts as ``warmup.init`` says: ``teacher`` (every
weight from the teacher, most important heads and neurons first:
:mod:`nni_effbert.kd.teacher_init`), ``teacher_embeddings`` (random, embedding tables from the
teacher: :func:`~nni_effbert.kd.teacher_init.init_embeddings_from_teacher`) or ``random``.

Start, resume, skip
-------------------
* A resumable state (weights, optimizer, scheduler, RNG, phase, step) is written every
  ``checkpoint_interval`` steps to ``supernet/stage{N}.resume.pt``; a run that finds one for
  the same plan continues from it, and deletes it once the stage checkpoint is written.
* Otherwise the supernet starts from the nearest earlier stage's checkpoint, else from
  ``warmup.checkpoint`` (which must exist: a named checkpoint that is missing is an error,
  never a silent random start), else from random weights (logged).
* A stage whose checkpoint exists for the same plan is not warmed up again (``force=True``
  redoes it). Concurrent warm-ups of one stage serialise on ``supernet/stage{N}.lock``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from filelock import FileLock

from nni_effbert.strategies.sampler import balanced_arch, in_budget, random_arch_in_budget

from ..config import ExperimentConfig
from ..data.corpus import corpus_files, unlabeled_texts
from ..errors import CheckpointError, ConfigError
from ..io import atomic_save_torch, load_torch, read_json_object
from ..kd.losses import KDLoss
from ..kd.student_start import start_from_teacher, warmup_init_mode
from ..kd.teacher_init import init_embeddings_from_teacher
from ..kd.setup import KDSetup
from ..kd.sources import CachedTeacher
from ..kd.train import TrainSettings, TrainState, kd_train
from ..workdir import WorkDir
from ..params import (GENERAL_WARMUP_STEPS_KEY, WARMUP_KEY, WARMUP_STEPS_KEY, arch_part, echoed_ids, int_meta,
                      split_arch, stage_name)
from .objectives import search_metric_dict
from .supernets import (check_owner, experiment_key, load_supernet_checkpoint, read_supernet_checkpoint,
                        write_supernet_checkpoint)

__all__ = [
    "WarmupPlan",
    "WarmupResult",
    "plan_warmup",
    "run_warmup",
    "run_warmup_parameters",
    "load_fixed_file",
    "warmup_required",
]

logger = logging.getLogger(__name__)

_STATE_KIND = "nni-effbert-warmup-state"
_PHASES = ("general", "task")


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass
class WarmupPlan:
    """What a stage's warm-up does; equal plans give interchangeable checkpoints.

    Attributes
    ----------
    stage : int
        Zero-based stage.
    general_steps, steps : int
        Steps of the general-KD phase and of the task-KD phase.
    fixed : dict
        Labels held fixed while sampling archs.
    budget : list of float or None
        ``[min, max]`` parameters of sampled archs.
    learning_rate : float
    batch_size : int
    seed : int
    corpus : str, list of str or None
        Corpus file(s) of the general (or only) phase.
    max_seq_length : int
        Of the unlabeled text.
    """

    stage: int
    general_steps: int
    steps: int
    fixed: Dict[str, Any]
    budget: Optional[List[float]]
    learning_rate: float
    batch_size: int
    seed: int
    corpus: Any
    max_seq_length: int
    init_embeddings: str = "teacher"
    #: ``warmup.init: teacher`` and its importance (None otherwise, and then left out of
    #: :meth:`to_dict`, so plans of the older starts compare equal to checkpoints made before).
    init: Optional[str] = None
    importance: Optional[str] = None
    importance_batches: Optional[int] = None

    @property
    def total_steps(self) -> int:
        return self.general_steps + self.steps

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("init", "importance", "importance_batches"):
            if d[key] is None:
                del d[key]
        return d


def warmup_required(cfg: ExperimentConfig, stage: int) -> bool:
    """True if the search's stage ``stage`` warms up its supernet before scoring candidates."""
    stages = cfg.search.stages
    return 0 <= stage < len(stages) and bool(stages[stage].warmup)


def _check_stage(cfg: ExperimentConfig, stage: int) -> None:
    n = len(cfg.search.stages)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < n:
        raise ConfigError(
            f"stage {stage!r} does not exist: the config has {n} stage(s), numbered 0..{n - 1} "
            f"({', '.join(s.name for s in cfg.search.stages)})"
        )


def plan_warmup(cfg: ExperimentConfig, stage: int, *, fixed: Optional[Mapping[str, Any]] = None,
                steps: Optional[int] = None,
                general_steps: Optional[int] = None) -> WarmupPlan:
    """The warm-up plan of ``stage`` from the config and explicit overrides.

    Steps come from the arguments (the warm-up trial's ``_warmup_steps`` /
    ``_general_warmup_steps``), else from ``search.stages[stage]`` (``warmup_steps``,
    ``general_warmup_steps``), else ``warmup.steps``; ``warmup.learning_rate``,
    ``batch_size``, ``corpus_file`` and ``max_seq_length`` apply to every stage.
    """
    _check_stage(cfg, stage)
    st = cfg.search.stages[stage]
    if steps is None:
        # A stage that leaves its warm-up length empty uses the experiment-wide warmup.steps.
        steps = st.warmup_steps if st.warmup_steps is not None else cfg.warmup.steps
    general_steps = st.general_warmup_steps if general_steps is None else general_steps
    for name, value in (("warm-up steps", steps), ("general warm-up steps", general_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return WarmupPlan(
        stage=stage, general_steps=int(general_steps), steps=int(steps), fixed=dict(fixed or {}),
        budget=list(cfg.search.param_budget) if cfg.search.param_budget is not None else None,
        learning_rate=float(cfg.warmup.learning_rate), batch_size=int(cfg.warmup.batch_size),
        seed=int(cfg.seed), corpus=cfg.warmup.corpus_file,
        max_seq_length=int(cfg.warmup.max_seq_length or cfg.task.max_seq_length),
        init_embeddings=str(cfg.warmup.init_embeddings),
        **_teacher_init_fields(cfg),
    )


def _teacher_init_fields(cfg: ExperimentConfig) -> Dict[str, Any]:
    if warmup_init_mode(cfg.warmup) != "teacher":
        return {}
    batches = int(cfg.warmup.importance_batches) if cfg.warmup.importance == "taylor" else None
    return {"init": "teacher", "importance": str(cfg.warmup.importance), "importance_batches": batches}


def load_fixed_file(path) -> Dict[str, Any]:
    """Read an arch subset (``label -> value`` JSON object) for ``--fixed``.

    Raises
    ------
    ConfigError
        If the file is missing, not JSON, or not an object.
    """
    data = read_json_object(path, "--fixed")
    return arch_part(data)


def _validate_fixed(space, fixed: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(fixed) - set(space.choices))
    if unknown:
        raise ConfigError(f"fixed choices: unknown label(s) {unknown}; labels look like 'layer0_width'")
    out = {}
    for label, value in fixed.items():
        allowed = space.choices[label]
        match = [v for v in allowed if v == value and type(v) is type(value)] or \
                [v for v in allowed if not isinstance(v, str) and not isinstance(value, (str, bool)) and v == value]
        if not match:
            raise ConfigError(f"fixed choices: label {label!r} has value {value!r}; allowed values: {allowed}")
        out[label] = match[0]
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class WarmupResult:
    """Outcome of :func:`run_warmup`.

    Attributes
    ----------
    stage : int
    checkpoint : Path
        ``supernet/stage{N}.pt``.
    plan : WarmupPlan
    skipped : bool
        True if a checkpoint for the same plan existed and nothing was trained.
    init : str
        Where the weights started from (``"random"``, ``"stage 0 checkpoint"``, ...).
    resumed_at : int or None
        Global step a resumed run continued from.
    loss : float or None
        Mean KD loss of the last steps.
    seconds : float
        Wall time of this call.
    reference_arch : dict or None
        The arch scored after the warm-up (see :attr:`metrics`).
    metrics : dict
        Search-split metrics of ``reference_arch`` on the warmed supernet (the search never
        reads dev).
    metric : str
        Name of the task metric.
    search : dict
        ``search_*`` keys of ``reference_arch`` (task metric and KD losses on the search split).
    """

    stage: int
    checkpoint: Path
    plan: WarmupPlan
    skipped: bool = False
    init: str = "random"
    resumed_at: Optional[int] = None
    loss: Optional[float] = None
    seconds: float = 0.0
    reference_arch: Optional[Dict[str, Any]] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    metric: str = ""
    search: Dict[str, Any] = field(default_factory=dict)

    def report(self) -> Dict[str, Any]:
        """Final-metric dict of a warm-up trial, **without** ``default``.

        NNI 3.0's web UI ranks trials by the final metric's ``default`` (``Trial.sortable``:
        a final metric whose ``default`` is a finite number; ``TrialManager.sort`` feeds the
        overview's "Top trials" and "Best metric"). A warm-up is not a candidate, so its numbers
        go under other keys (``warmup_search_metric``, ``warmup_search_kd_loss``, ...: the
        reference arch on the warmed supernet, on the search split) and it never appears in
        that ranking. The progressive search takes a final metric without ``default`` from a
        warm-up as its success (``strategies.core``), and ``nas.records`` keeps it SUCCEEDED.
        """
        out: Dict[str, Any] = {}
        for key, value in self.search.items():
            out[f"warmup_{key}"] = value
        out.update({"warmup": True, "stage": self.stage, "steps": self.plan.total_steps,
                    "skipped": self.skipped, "init": self.init})
        if self.loss is not None:
            out["kd_loss"] = self.loss
        out["seconds"] = round(self.seconds, 3)
        return out


class _ArchSampler:
    """Archs with fixed labels, inside the budget; step ``k`` of a phase is reproducible.

    ``balanced`` (``warmup.path_sampling: balanced``) draws every choice of every label equally
    often (:func:`~nni_effbert.strategies.sampler.balanced_arch`); a balanced arch outside the
    parameter budget is replaced by a uniform one inside it, so a tight budget tilts the balance
    towards the choices that fit. Otherwise every label is drawn uniformly and independently.
    """

    def __init__(self, space, fixed: Mapping[str, Any], budget: Optional[List[float]], seed: int, stage: int,
                 phase: int, max_tries: int, balanced: bool = False):

        self.space, self.fixed, self.budget = space, dict(fixed), tuple(budget) if budget else None
        self.seed, self.stage, self.phase, self.max_tries = int(seed), int(stage), int(phase), int(max_tries)
        self.balanced = bool(balanced)
        self._in_budget, self._random = in_budget, random_arch_in_budget

    def __call__(self, step: int) -> Dict[str, Any]:
        accept = lambda a: self._in_budget(self.space, a, self.budget)  # noqa: E731
        if self.balanced:
            arch = balanced_arch(self.space, (self.seed, self.stage, self.phase), step, self.fixed)
            if accept(arch):
                return arch
        rng = np.random.default_rng([self.seed, self.stage, self.phase, int(step)])
        arch = self._random(self.space, rng, self.fixed, accept, self.max_tries)
        if arch is None:
            raise ConfigError(
                f"warm-up of stage {self.stage}: no architecture with the fixed choices fits search.param_budget "
                f"{list(self.budget)} after {self.max_tries} tries; widen the budget"
            )
        return arch


def _reference_arch(space, fixed: Mapping[str, Any], budget: Optional[List[float]],
                    sampler: _ArchSampler) -> Dict[str, Any]:
    """BERT's expression at full width, stack 1, with the fixed labels held; a sampled arch if
    that is outside the budget."""

    arch = space.bert_arch()
    arch.update(fixed)
    arch = space.validate_arch(arch)
    if in_budget(space, arch, tuple(budget) if budget else None):
        return arch
    return sampler(0)


def _init_weights(setup: KDSetup, cfg: ExperimentConfig, stage: int, experiment: Optional[str] = None,
                  old_layout: bool = False) -> str:
    """Load the starting weights of a fresh warm-up; returns where they came from."""
    wd, space = setup.workdir, setup.space
    key = None if old_layout else experiment  # where the earlier stages of this experiment are
    previous = wd.latest_supernet_checkpoint(stage - 1, key) if stage > 0 else None
    if previous is not None:
        load_supernet_checkpoint(space, wd.supernet_checkpoint(previous, key),
                                 what=f"supernet checkpoint of stage {previous}",
                                 teacher_fingerprint=setup.teacher_fingerprint, experiment=experiment)
        logger.info("stage %d warm-up starts from the stage %d supernet", stage, previous)
        return f"stage {previous} checkpoint"
    named = cfg.warmup.checkpoint
    if named:
        if not Path(named).is_file():
            raise CheckpointError(
                f"warmup.checkpoint names {named}, which does not exist; fix the path or empty warmup.checkpoint "
                "to start from random weights"
            )
        load_supernet_checkpoint(space, named, what="warmup.checkpoint", teacher_fingerprint=setup.teacher_fingerprint)
        logger.info("stage %d warm-up starts from warmup.checkpoint %s", stage, named)
        return f"warmup.checkpoint {named}"
    setup.reset_space()
    mode = warmup_init_mode(cfg.warmup)
    if mode == "teacher":
        info = start_from_teacher(setup, progress=setup.progress)
        logger.info("stage %d warm-up starts from the teacher's weights (layers %s, %s importance)", stage,
                    info["layer_map"], info["importance"])
        return f"teacher ({info['importance']} importance)"
    if mode == "teacher_embeddings":
        init_embeddings_from_teacher(space.supernet, setup.teacher_model())
        logger.info("stage %d warm-up starts from random weights with the teacher's embeddings (truncated SVD)",
                    stage)
        return "random, teacher embeddings"
    logger.warning("stage %d warm-up starts from random weights (no earlier stage checkpoint, no warmup.checkpoint)",
                   stage)
    return "random"


def _unlabeled_source(setup: KDSetup, cfg: ExperimentConfig, plan: WarmupPlan, steps: Optional[int] = None):
    """(dataset, teacher source, description) of the warm-up's unlabeled text."""
    if plan.corpus:
        # The corpus lines a phase of `steps` batches can see (a seeded subset), with the teacher's
        # outputs cached like the task's: one teacher pass, shared by every stage and process.
        rows = None if steps is None else max(1, int(steps) * plan.batch_size)
        texts = unlabeled_texts(cfg, setup.tokenizer, cache_dir=str(setup.workdir.datasets_cache), corpus=plan.corpus,
                                key="warmup.corpus_file", max_rows=rows, seed=plan.seed)
        cache = setup.open_cache(texts, texts._fingerprint, f"corpus{plan.max_seq_length}")
        files = ", ".join(corpus_files(plan.corpus))
        return texts, CachedTeacher(cache, setup.device), f"corpus {files} ({len(texts)} lines, cached teacher)"
    if plan.max_seq_length == cfg.task.max_seq_length:
        return setup.task.train, setup.cached_teacher(), "task train sentences (cached teacher)"
    if setup.task.spec.is_span:  # QA: the question + context windows at task.max_seq_length
        return setup.task.train, setup.cached_teacher(), "task train windows at task.max_seq_length (cached teacher)"

    texts = unlabeled_texts(cfg, setup.tokenizer, cache_dir=str(setup.workdir.datasets_cache))
    cache = setup.open_cache(texts, texts._fingerprint, f"unlabeled{plan.max_seq_length}")
    return texts, CachedTeacher(cache, setup.device), "task train sentences at warmup.max_seq_length (cached teacher)"


def _phases(setup: KDSetup, cfg: ExperimentConfig, plan: WarmupPlan):
    """List of (name, steps, dataset, teacher, loss_fn, description)."""
    phases = []
    n_student = setup.space.config.num_hidden_layers
    n_teacher = int(setup.teacher_config.num_hidden_layers)
    regression = bool(setup.task.spec.is_regression)
    if plan.general_steps:
        general_kd = dataclasses.replace(cfg.kd, prediction_weight=0.0)
        if general_kd.attention_weight == 0 and general_kd.hidden_weight == 0:
            raise ConfigError("general warm-up KD needs kd.attention_weight or kd.hidden_weight > 0 "
                              "(it has no predictions to distil)")
        ds, teacher, desc = _unlabeled_source(setup, cfg, plan, plan.general_steps)
        phases.append(("general", plan.general_steps, ds, teacher,
                       KDLoss(general_kd, n_student, n_teacher, regression=regression), desc))
        task_ds, task_teacher, task_desc = setup.task.train, setup.cached_teacher(), "task train split (cached teacher)"
    else:
        task_ds, task_teacher, task_desc = _unlabeled_source(setup, cfg, plan, plan.steps) if plan.steps else (None, None, "")
    if plan.steps:
        phases.append(("task", plan.steps, task_ds, task_teacher, setup.loss_fn, task_desc))
    return phases


def _read_state(path: Path, plan: Mapping[str, Any], kind: str = _STATE_KIND) -> Optional[Dict[str, Any]]:
    """The resumable state at ``path`` when it was written (as ``kind``) for ``plan`` (a dict), else None."""
    if not path.is_file():
        return None
    try:
        state = load_torch(path, "warm-up resume state")
    except CheckpointError as exc:
        logger.warning("ignoring unreadable warm-up state (%s); starting the stage over", exc)
        return None
    if not isinstance(state, dict) or state.get("kind") != kind or state.get("plan") != plan:
        logger.warning("ignoring warm-up state %s: it was written for another plan; starting the stage over", path)
        return None
    return state


def _resumed_at(state: Mapping[str, Any], general_steps: int) -> int:
    """Steps a resumable state had done over the whole warm-up (general phase first)."""
    done_before = general_steps if _PHASES[state["phase_index"]] == "task" else 0
    return done_before + (int(state["train"]["step"]) if state["train"] else 0)


def _resume_point(state: Optional[Mapping[str, Any]], phase_index: int):
    """``(skip, resume)`` of a phase under a resumable state: skip a phase that finished before the
    interruption; resume (a :class:`TrainState`) the one it stopped in."""
    if state is None or phase_index > state["phase_index"]:
        return False, None
    if phase_index < state["phase_index"]:
        return True, None
    return False, TrainState.from_dict(state["train"]) if state["train"] else None


def _checkpoint_interval(given: Optional[int], total_steps: int) -> int:
    """Steps between resumable states: ``given``, else a tenth of the run, at least 25."""
    return given if given is not None else max(25, math.ceil(total_steps / 10))


def run_warmup(
    cfg: ExperimentConfig,
    stage: int,
    *,
    fixed: Optional[Mapping[str, Any]] = None,
    steps: Optional[int] = None,
    general_steps: Optional[int] = None,
    force: bool = False,
    checkpoint_interval: Optional[int] = None,
    progress: bool = True,
    setup: Optional[KDSetup] = None,
    experiment: Optional[str] = None,
) -> WarmupResult:
    """Warm up the supernet of ``stage`` and write ``supernet/<experiment>/stage{stage}.pt``.

    Parameters
    ----------
    cfg : ExperimentConfig
    stage : int
        Zero-based stage of ``search.stages``.
    fixed : dict, optional
        Labels held fixed while sampling (the stage's fixed choices).
    steps, general_steps : int, optional
        Override the stage's ``warmup_steps`` / ``general_warmup_steps``.
    force : bool
        Warm up again even if a checkpoint for the same plan exists.
    checkpoint_interval : int, optional
        Steps between resumable states; default a tenth of the run, at least 25 steps.
    progress : bool
        Progress bars.
    setup : KDSetup, optional
        An already loaded setup (its space's weights are overwritten).
    experiment : str, optional
        The experiment that owns the checkpoint; default :func:`.supernets.experiment_key`
        (``$NNI_EXP_ID`` inside an NNI trial, else none: ``supernet/stage{stage}.pt``).

    Returns
    -------
    WarmupResult

    Raises
    ------
    ConfigError
        Unknown stage, bad fixed choices, a budget no arch can meet.
    CheckpointError
        No fine-tuned teacher, a named ``warmup.checkpoint`` that is missing, or a checkpoint
        of another space.
    TrialFailure
        If the KD loss diverges.
    """
    started = time.perf_counter()
    _check_stage(cfg, stage)
    setup = setup or KDSetup.from_config(cfg, progress=progress)
    space = setup.space
    fixed = _validate_fixed(space, fixed or {})
    plan = plan_warmup(cfg, stage, fixed=fixed, steps=steps, general_steps=general_steps)
    wd: WorkDir = setup.workdir
    experiment = experiment_key(experiment)
    ckpt = wd.supernet_checkpoint(stage, experiment)
    # An experiment without a supernet folder ran before checkpoints were keyed: its earlier
    # stages are in the old layout (checked before the folder is created below).
    old_layout = experiment is not None and not wd.supernet_folder(experiment).is_dir()
    wd.supernet_folder(experiment).mkdir(parents=True, exist_ok=True)
    max_tries = int(cfg.search.sampler.max_tries)
    balanced = cfg.warmup.path_sampling == "balanced"
    samplers = [_ArchSampler(space, fixed, plan.budget, plan.seed, stage, i, max_tries, balanced)
                for i in range(len(_PHASES))]
    sampler_of = dict(zip(_PHASES, samplers))
    sampler_of["task"](0)  # fail now, before any training, when the budget cannot be met
    if plan.total_steps == 0:
        logger.warning("stage %d: warm-up has 0 steps; the checkpoint holds the starting weights", stage)

    with FileLock(str(wd.warmup_lock(stage, experiment))):
        if ckpt.is_file() and not force:
            existing = read_supernet_checkpoint(ckpt, f"supernet checkpoint of stage {stage}")
            check_owner(existing, ckpt, experiment, what=f"supernet checkpoint of stage {stage}")
            if existing.get("plan") == plan.to_dict() and existing.get("space_config") == space.config.to_dict():
                logger.info("stage %d is already warmed up (%s); nothing to do (force=True redoes it)", stage, ckpt)
                load_supernet_checkpoint(space, ckpt, what=f"supernet checkpoint of stage {stage}")
                return _finish(setup, plan, ckpt, started, sampler_of["task"], skipped=True,
                               init=str(existing.get("init")), loss=existing.get("loss"))
            logger.warning("stage %d checkpoint %s was made with other settings; warming up again", stage, ckpt)

        state_path = wd.warmup_state(stage, experiment)
        state = None if force else _read_state(state_path, plan.to_dict())
        resumed_at: Optional[int] = None
        if state is not None:
            space.supernet.load_state_dict(state["state_dict"])
            init = str(state["init"])
            resumed_at = _resumed_at(state, plan.general_steps)
            logger.info("stage %d: resuming warm-up after %d of %d steps", stage, resumed_at, plan.total_steps)
        else:
            init = _init_weights(setup, cfg, stage, experiment, old_layout)

        interval = _checkpoint_interval(checkpoint_interval, plan.total_steps)
        loss: Optional[float] = None
        for name, n_steps, dataset, teacher, loss_fn, desc in _phases(setup, cfg, plan):
            phase_index = _PHASES.index(name)
            skip, resume = _resume_point(state, phase_index)
            if skip:
                continue  # finished before the interruption
            logger.info("stage %d %s warm-up: %d steps on %s", stage, name, n_steps, desc)

            def save_state(ts: Optional[TrainState], _phase_index: int = phase_index) -> None:
                atomic_save_torch({"kind": _STATE_KIND, "plan": plan.to_dict(), "init": init,
                                   "phase_index": _phase_index, "train": ts.to_dict() if ts else None,
                                   "state_dict": space.supernet.state_dict()}, state_path)
                logger.debug("stage %d: warm-up state saved (%s phase)", stage, _PHASES[_phase_index])

            settings = TrainSettings(
                steps=n_steps, learning_rate=plan.learning_rate, batch_size=plan.batch_size,
                seed=plan.seed * 1_000_003 + stage * 1009 + phase_index, checkpoint_interval=interval,
                desc=f"warm-up stage {stage} ({name})", progress=progress,
            )
            out = kd_train(space, teacher, dataset, loss_fn, settings, pad_token_id=setup.pad_token_id,
                           arch_sampler=sampler_of[name], on_checkpoint=save_state, resume=resume,
                           device=setup.device, runtime=setup.runtime)
            loss = out.loss if out.loss is not None else loss
            if name == "general" and plan.steps:
                # Persist the phase boundary: an interruption in the task phase must not redo it.
                save_state(None, _PHASES.index("task"))
        write_supernet_checkpoint(ckpt, setup, plan, init, loss, experiment)
        state_path.unlink(missing_ok=True)

    return _finish(setup, plan, ckpt, started, sampler_of["task"], skipped=False, init=init, loss=loss,
                   resumed_at=resumed_at)


def run_warmup_parameters(cfg: ExperimentConfig, params: Mapping[str, Any], *, stage: Optional[int] = None,
                          report: bool = True,
                          progress: bool = True, setup: Optional[KDSetup] = None,
                          experiment: Optional[str] = None) -> Dict[str, Any]:
    """Run a warm-up trial's parameters (``{"_warmup_stage": N, ...}``) and return its metric dict.

    The labels in ``params`` are the stage's fixed choices; ``_warmup_steps`` and
    ``_general_warmup_steps`` override the stage's budget, ``stage`` overrides
    ``_warmup_stage``. With ``report`` the metric dict goes to ``nni.report_final_result``.
    ``experiment`` owns the checkpoint (default: this trial's NNI experiment).
    """
    if WARMUP_KEY not in params:
        raise ConfigError(f"warm-up parameters need {WARMUP_KEY}, got keys {sorted(params)}")
    fixed = split_arch(params)
    warm_stage = int_meta(params, WARMUP_KEY) if stage is None else stage
    logger.info("warm-up trial of stage %s (%s)", warm_stage, stage_name(params, "?"))
    result = run_warmup(cfg, warm_stage, fixed=fixed, steps=int_meta(params, WARMUP_STEPS_KEY),
                        general_steps=int_meta(params, GENERAL_WARMUP_STEPS_KEY), progress=progress, setup=setup,
                        experiment=experiment)
    metrics = {**result.report(), **echoed_ids(params)}
    if report:
        import nni  # local: only a trial inside NNI reports

        nni.report_final_result(metrics)
    return metrics


def _finish(setup: KDSetup, plan: WarmupPlan, ckpt: Path, started: float, sampler: "_ArchSampler", *,
            skipped: bool, init: str, loss: Optional[float], resumed_at: Optional[int] = None) -> WarmupResult:
    """Score the reference arch on the warmed supernet (search split, never dev) and build the result."""
    space = setup.space
    reference = _reference_arch(space, plan.fixed, plan.budget, sampler)
    search = search_metric_dict(setup.score_search(space, reference), setup.task.spec.metric)
    metrics = {"default": search["search_metric"]}
    seconds = time.perf_counter() - started
    logger.info("stage %d %s in %.1fs: %s (reference arch on the search split: %s = %.4f, KD loss %.4f)",
                plan.stage, "already warmed up" if skipped else "warmed up", seconds, ckpt, setup.task.spec.metric,
                search["search_metric"], search["search_kd_loss"])
    return WarmupResult(plan.stage, ckpt, plan, skipped=skipped, init=init, resumed_at=resumed_at, loss=loss,
                        seconds=seconds, reference_arch=reference, metrics=metrics, metric=setup.task.spec.metric,
                        search=search)
