"""Stages of the progressive coarse-to-fine search, as data.

Every number of the paper's schedule lives here, in plain dataclasses whose fields are YAML
types (int, float, str, bool, lists, nested dataclasses), so that the experiment config
(``search:`` in ``effbert.yml``, loaded by :func:`nni_effbert.config.load_config`), the
``nnictl`` tuner's ``classArgs`` and the Python API all describe a search the same way.

The default schedule follows EfficientBERT (Dong et al., Findings of EMNLP 2021, Sec. 3.3):

1. ``joint``: expression, width and stack of every layer, under the parameter budget;
2. ``expression``: per-layer expressions, with width and stack fixed to stage 1's best;
3. ``size``: per-layer width and stack, with expressions fixed to stage 2's best, scored with
   weights inherited from the stage's warmed-up supernet and no per-candidate training
   (``train_steps: 0``).

Stage numbers are zero-based everywhere in code and in trial parameters (``_stage: 0`` is the
first stage), like the ``layer{i}`` labels.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import List, Optional

from .search_errors import SearchConfigError

__all__ = ["STAGE_KINDS", "OBJECTIVE_KINDS", "Stage", "SamplerConfig", "ObjectiveConfig", "SearchConfig",
           "paper_stages", "nni_trial_budget"]

#: ``joint``: search every label; ``expression``: sizes fixed to the previous stage's best;
#: ``size``: expressions fixed to the previous stage's best.
STAGE_KINDS = ("joint", "expression", "size")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SearchConfigError(msg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def nni_trial_budget(trials: int) -> int:
    """``maxTrialNumber`` for a search of ``trials`` trials: room for the placeholder and
    re-proposed trials that faults cost (``strategies.nni.broker``); a search that reaches NNI's
    limit first would be cut short. The advisor lowers it to the jobs NNI ran once the search
    is done, so the experiment ends ``DONE``."""
    return int(trials) + max(8, int(trials) // 4)


@dataclass
class Stage:
    """One stage of the progressive search.

    Attributes
    ----------
    name : str
        Shown in logs, the web UI (``_stage_name`` of warm-up trials) and reports.
    kind : {'joint', 'expression', 'size'}
        Which labels the stage searches; the others are fixed to the previous stage's best.
    trials : int
        Candidate trials of the stage (its warm-up trial not included).
    warmup : bool
        Submit a warm-up trial (KD of the stage's weight-sharing supernet) before any
        candidate. Candidates go out only once it has succeeded.
    warmup_steps : int or None
        Task-KD steps of the warm-up, passed to the trial as ``_warmup_steps``. ``None``: the
        experiment's ``warmup.steps`` (the key is then left out).
    general_warmup_steps : int
        General-KD steps on unlabeled text before the task KD (the paper's stage 3), passed
        as ``_general_warmup_steps``.
    train_steps : int or None
        Per-candidate KD steps, passed as ``_train_steps``. ``None``: the evaluator's own
        budget (the key is then left out); ``0``: score inherited weights without training.
    init_trials : int or None
        Candidates of the stage's initial population (seeds, the previous stage's best archs,
        then uniform samples) before the learned sampler takes over. ``None``: a third of
        ``trials``, at least 2.
    handoff_top_k : int
        How many of the previous stage's best archs seed this stage's initial population,
        projected onto this stage's fixed choices (the best one first; it is re-scored
        because scores of different stages come from different supernets).
    tasks : list of str or None
        With a ``tasks:`` config, the keys of the tasks this stage warms up on and scores its
        candidates on (the paper scores stages 1-2 on MNLI and warms stage 3 up on every task).
        ``None``: every task.
    """

    name: str
    kind: str
    trials: int
    warmup: bool = True
    warmup_steps: Optional[int] = None
    general_warmup_steps: int = 0
    train_steps: Optional[int] = None
    init_trials: Optional[int] = None
    handoff_top_k: int = 3
    tasks: Optional[List[str]] = None

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and bool(self.name.strip()),
              f"stage name must be a non-empty string, got {self.name!r}")
        _need(self.kind in STAGE_KINDS,
              f"stage {self.name!r}: kind must be one of {list(STAGE_KINDS)}, got {self.kind!r}")
        _need(_is_int(self.trials) and self.trials >= 1,
              f"stage {self.name!r}: trials must be an int >= 1, got {self.trials!r}")
        _need(isinstance(self.warmup, bool), f"stage {self.name!r}: warmup must be true or false, got {self.warmup!r}")
        _need(self.warmup_steps is None or (_is_int(self.warmup_steps) and self.warmup_steps >= 0),
              f"stage {self.name!r}: warmup_steps must be empty (warmup.steps) or an int >= 0, "
              f"got {self.warmup_steps!r}")
        for key in ("general_warmup_steps", "handoff_top_k"):
            value = getattr(self, key)
            _need(_is_int(value) and value >= 0, f"stage {self.name!r}: {key} must be an int >= 0, got {value!r}")
        _need(self.train_steps is None or (_is_int(self.train_steps) and self.train_steps >= 0),
              f"stage {self.name!r}: train_steps must be empty (the evaluator's budget) or an int >= 0, "
              f"got {self.train_steps!r}")
        _need(self.tasks is None or (isinstance(self.tasks, list) and bool(self.tasks)
                                     and all(isinstance(t, str) and t for t in self.tasks)
                                     and len(set(self.tasks)) == len(self.tasks)),
              f"stage {self.name!r}: tasks must be empty (every task) or a list of distinct task keys, "
              f"got {self.tasks!r}")
        _need(self.init_trials is None or (_is_int(self.init_trials) and 0 <= self.init_trials <= self.trials),
              f"stage {self.name!r}: init_trials must be empty or an int in [0, trials={self.trials}], "
              f"got {self.init_trials!r}")

    @property
    def initial_population(self) -> int:
        """Number of candidates drawn before the learned sampler is used."""
        if self.init_trials is not None:
            return self.init_trials
        return min(self.trials, max(2, self.trials // 3))


def paper_stages() -> List[Stage]:
    """The paper's three stages, with trial budgets sized for a laptop (all configurable).

    The size stage scores candidates on inherited weights without training (a trial is mostly
    one dev pass), so it gets several times the candidates of the KD-scored stages.
    """
    return [
        Stage("coarse", "joint", trials=24),
        Stage("expression", "expression", trials=16),
        Stage("size", "size", trials=96, general_warmup_steps=200, train_steps=0),
    ]


@dataclass
class SamplerConfig:
    """Settings of the learned space-partition sampler (:mod:`.sampler`).

    Attributes
    ----------
    exploration : float
        UCB exploration constant ``c`` in ``mean + c * sqrt(2 ln N / n)`` over scores that
        are min-max normalised within the stage. 0 always descends into the better region.
    max_depth : int
        Depth of the partition tree (number of median splits along a path).
    min_leaf : int
        A node is split only if each side keeps at least this many evaluated archs.
    refit_every : int
        Refit the tree after this many new results (the paper refits its classifiers
        periodically as well).
    n_estimators, tree_depth, learning_rate
        Of each node's ``sklearn.ensemble.GradientBoostingClassifier``.
    mutation_rate : float
        Per-label probability of resampling a label when mutating a parent (at least one
        label always changes).
    num_candidates : int
        Mutants generated per proposal; the one the classifiers place deepest in the chosen
        region is submitted.
    num_parents : int
        Best archs of the chosen region that are mutated.
    bert_seeds : int
        Stage-1 initial population: at most this many BERT-expression archs (uniform width
        and stack) that fit the budget.
    max_tries : int
        Rejection-sampling attempts for an arch that fits the budget and is new.
    ridge_alpha : float
        Regularisation of the ridge-regression surrogate (one-hot archs -> scores) that picks, among
        the mutants inside the chosen region, the one predicted best.
    """

    exploration: float = 0.5
    max_depth: int = 3
    min_leaf: int = 3
    refit_every: int = 3
    n_estimators: int = 20
    tree_depth: int = 2
    learning_rate: float = 0.2
    mutation_rate: float = 0.3
    num_candidates: int = 48
    num_parents: int = 3
    bert_seeds: int = 2
    max_tries: int = 2000
    ridge_alpha: float = 1.0

    def __post_init__(self) -> None:
        _need(isinstance(self.exploration, (int, float)) and not isinstance(self.exploration, bool)
              and math.isfinite(self.exploration) and self.exploration >= 0,
              f"sampler.exploration must be a number >= 0, got {self.exploration!r}")
        for key, low in (("max_depth", 0), ("min_leaf", 1), ("refit_every", 1), ("n_estimators", 1),
                         ("tree_depth", 1), ("num_candidates", 1), ("num_parents", 1), ("bert_seeds", 0),
                         ("max_tries", 1)):
            value = getattr(self, key)
            _need(_is_int(value) and value >= low, f"sampler.{key} must be an int >= {low}, got {value!r}")
        _need(isinstance(self.ridge_alpha, (int, float)) and not isinstance(self.ridge_alpha, bool)
              and self.ridge_alpha > 0, f"sampler.ridge_alpha must be a number > 0, got {self.ridge_alpha!r}")
        for key in ("mutation_rate", "learning_rate"):
            value = getattr(self, key)
            _need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1,
                  f"sampler.{key} must be a number in (0, 1], got {value!r}")


#: ``score``: the dev metric alone; ``linear``: ``score - weight * latency_ms``; ``mnas``:
#: ``score * (latency_ms / target_ms) ** weight`` (MnasNet, Tan et al., CVPR 2019, Eq. 2).
OBJECTIVE_KINDS = ("score", "linear", "mnas")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ObjectiveConfig:
    """What the search maximises: the candidate's score, or the score traded against its latency.

    The latency is the predicted one (``nni_effbert.latency.table``: deterministic, so two
    trials of the same arch get the same objective), in milliseconds.

    Attributes
    ----------
    kind : {'score', 'linear', 'mnas'}
        ``score``: the dev metric (default). ``linear``: ``score - weight * latency_ms`` (the
        Lagrangian form, e.g. ProxylessNAS / FBNet's latency term, made additive).
        ``mnas``: MnasNet's soft constraint ``score * (latency_ms / target) ** weight``
        (Tan et al., CVPR 2019, Eq. 2, with ``alpha = beta = weight``; the paper uses -0.07:
        twice the latency costs about 5% of the score).
    weight : float, optional
        ``linear``: score per millisecond (required, > 0). ``mnas``: the exponent (default -0.07,
        must be < 0).
    target_ms : float, optional
        ``mnas``: the latency target in ms. Give it or ``target_speedup``.
    target_speedup : float, optional
        ``mnas``: the target as a speed-up over the teacher (``target = teacher_ms / speedup``),
        using the teacher's latency measured with the same settings.
    """

    kind: str = "score"
    weight: Optional[float] = None
    target_ms: Optional[float] = None
    target_speedup: Optional[float] = None

    def __post_init__(self) -> None:
        _need(self.kind in OBJECTIVE_KINDS,
              f"objective.kind must be one of {list(OBJECTIVE_KINDS)}, got {self.kind!r}")
        for key in ("weight", "target_ms", "target_speedup"):
            value = getattr(self, key)
            _need(value is None or _number(value), f"objective.{key} must be a number or empty, got {value!r}")
        for key in ("target_ms", "target_speedup"):
            value = getattr(self, key)
            _need(value is None or value > 0, f"objective.{key} must be > 0, got {value!r}")
        if self.kind == "linear":
            _need(self.weight is not None and self.weight > 0,
                  f"objective.kind linear needs objective.weight > 0 (score lost per ms of latency), "
                  f"got {self.weight!r}")
        if self.kind == "mnas":
            if self.weight is None:
                self.weight = -0.07
            _need(self.weight < 0, f"objective.weight of kind mnas is MnasNet's exponent and must be < 0 "
                                   f"(the paper: -0.07), got {self.weight!r}")
            _need((self.target_ms is None) != (self.target_speedup is None),
                  "objective.kind mnas needs exactly one of objective.target_ms or objective.target_speedup")

    @property
    def uses_latency(self) -> bool:
        return self.kind != "score"

    def target(self, teacher_latency_ms: Optional[float]) -> Optional[float]:
        """The ``mnas`` target in ms (``target_speedup`` resolved against the teacher's latency)."""
        if self.kind != "mnas":
            return None
        if self.target_ms is not None:
            return float(self.target_ms)
        _need(teacher_latency_ms is not None and teacher_latency_ms > 0,
              "objective.target_speedup needs the teacher's latency; fine-tune the teacher first "
              "(`nni-effbert teacher -c CONFIG`) and run `nni-effbert latency -c CONFIG`")
        return float(teacher_latency_ms) / float(self.target_speedup)

    def value(self, score: float, latency_ms: Optional[float], target_ms: Optional[float] = None) -> float:
        """The objective of a candidate with ``score`` and predicted ``latency_ms``."""
        if self.kind == "score":
            return float(score)
        _need(latency_ms is not None and latency_ms > 0,
              f"objective {self.kind} needs a positive latency, got {latency_ms!r}")
        if self.kind == "linear":
            return float(score) - float(self.weight) * float(latency_ms)
        _need(target_ms is not None and target_ms > 0, "objective mnas needs its target latency")
        return float(score) * (float(latency_ms) / float(target_ms)) ** float(self.weight)


@dataclass
class SearchConfig:
    """The whole progressive search.

    Attributes
    ----------
    param_budget : list of two numbers, optional
        ``[min, max]`` parameters of the student (``space.count_params``, embeddings
        included). Empty: no budget. A budget no arch can meet is an error before any trial.
    stages : list of Stage
        Run in order; the first must be ``joint`` (later stages fix labels to the previous
        stage's best).
    trial_concurrency : int
        Trials run at once (what the ``nnictl`` config should use).
    seed : int
        Seeds every random choice of the search.
    sampler : SamplerConfig
        The learned sampler.
    share_workdir : bool
        Let this search run while another one runs on the same work directory (default: a
        second search is refused at start, see :mod:`nni_effbert.search_lock`).
    latency_budget_ms : list of two numbers, optional
        ``[min, max]`` predicted latency of the student in ms (the work directory's latency
        table, :mod:`nni_effbert.latency.table`, at ``evaluator.latency_*``). Like
        ``param_budget``: no proposal lies outside it, and a budget no arch can meet is an error
        before any trial.
    speedup : float, optional
        The student must be at least this many times faster than the teacher (predicted student
        latency <= teacher latency / speedup, the teacher measured with the same settings);
        combined with ``latency_budget_ms`` when both are given.
    objective : ObjectiveConfig
        What the search maximises (default: the score alone).
    gpus_per_trial : int
        GPUs NNI gives each trial, warm-ups included (``trialGpuNumber``; 0: trials see no GPU).
    gpu_indices : list of int, optional
        GPUs NNI may use (local ``trainingService.gpuIndices``); empty: all.
    use_active_gpu : bool
        Schedule trials on GPUs other processes already use (``useActiveGpu``).
    max_trials_per_gpu : int
        Trials sharing one GPU at once (``maxTrialNumberPerGpu``; needs ``gpus_per_trial``).
    tie_margin : float, optional
        Candidates whose scores lie within this margin of a stage's best tie, and the cheapest of
        them (lowest predicted latency, else fewest parameters) is the stage's answer and the
        exported student (:mod:`.ties`). Empty: the default of ``evaluator.objective``
        (:data:`~nni_effbert.strategies.ties.TIE_MARGINS`, about twice the score's own
        seed-to-seed spread, measured on SST-2), filled in when the experiment config is loaded; 0:
        strict ranking. The spread depends on the task (MNLI-m's ``kd`` margin is 0.0045):
        ``nni-effbert fidelity --repeat 2`` prints the margin that fits a task.
        A stage scored with ``train_steps: 0`` is always ranked strictly (its scores do not
        move with the evaluator seed; :func:`~nni_effbert.strategies.ties.stage_margin`).
    noise_rescores : int
        0 (default): the margin above. K >= 2: the search measures the margin on the task it
        searches. When a stage's candidates have been scored, its K best (strict ranking) are
        scored again with the next evaluator seed (K more trials per stage, marked ``_rescore_of``
        in their parameters, never ranked as candidates), and that stage's margin is twice the
        standard deviation of (re-score - score) over them
        (:func:`~nni_effbert.strategies.ties.measured_margin`); ``tie_margin`` stays the fallback
        when fewer than 2 re-scores succeed. One-shot stages (``train_steps: 0``) are not
        re-scored. ``export`` reads the same re-scores back from the experiment and picks the
        same arch.
    warm_worker : bool
        Fork trial processes from a warm worker whose imports are done (default; see
        ``nni_effbert.nas.warm_worker``); false: every trial starts a fresh interpreter.
    """

    param_budget: Optional[List[float]] = None
    stages: List[Stage] = field(default_factory=paper_stages)
    trial_concurrency: int = 1
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    share_workdir: bool = False
    latency_budget_ms: Optional[List[float]] = None
    speedup: Optional[float] = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gpus_per_trial: int = 0
    gpu_indices: Optional[List[int]] = None
    use_active_gpu: bool = False
    max_trials_per_gpu: int = 1
    tie_margin: Optional[float] = None
    noise_rescores: int = 0
    warm_worker: bool = True

    def __post_init__(self) -> None:
        if self.param_budget is not None:
            budget = self.param_budget
            _need(isinstance(budget, (list, tuple)) and len(budget) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in budget),
                  f"param_budget must be [min, max] (two numbers) or empty, got {budget!r}")
            lo, hi = (float(v) for v in budget)
            _need(math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi,
                  f"param_budget must satisfy 0 <= min <= max, got [{lo}, {hi}]")
            self.param_budget = [lo, hi]
        _need(isinstance(self.stages, list) and len(self.stages) >= 1 and all(isinstance(s, Stage) for s in self.stages),
              f"stages must be a non-empty list of stages, got {self.stages!r}")
        _need(self.stages[0].kind == "joint",
              f"the first stage must be of kind 'joint' (later stages fix labels to the previous stage's "
              f"best arch, which the first stage has none of); got {self.stages[0].kind!r}")
        names = [s.name for s in self.stages]
        _need(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        _need(_is_int(self.trial_concurrency) and self.trial_concurrency >= 1,
              f"trial_concurrency must be an int >= 1, got {self.trial_concurrency!r}")
        _need(_is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        _need(isinstance(self.sampler, SamplerConfig), f"sampler must be a sampler mapping, got {self.sampler!r}")
        _need(isinstance(self.share_workdir, bool), f"share_workdir must be true or false, got {self.share_workdir!r}")
        _need(isinstance(self.warm_worker, bool), f"warm_worker must be true or false, got {self.warm_worker!r}")
        if self.latency_budget_ms is not None:
            budget = self.latency_budget_ms
            _need(isinstance(budget, (list, tuple)) and len(budget) == 2 and all(_number(v) for v in budget),
                  f"latency_budget_ms must be [min, max] (two numbers, ms) or empty, got {budget!r}")
            lo, hi = (float(v) for v in budget)
            _need(0 <= lo <= hi, f"latency_budget_ms must satisfy 0 <= min <= max, got [{lo}, {hi}]")
            self.latency_budget_ms = [lo, hi]
        _need(self.speedup is None or (_number(self.speedup) and self.speedup > 0),
              f"speedup must be a number > 0 (times faster than the teacher) or empty, got {self.speedup!r}")
        _need(isinstance(self.objective, ObjectiveConfig), f"objective must be a mapping, got {self.objective!r}")
        _need(self.tie_margin is None or (_number(self.tie_margin) and math.isfinite(self.tie_margin)
                                          and self.tie_margin >= 0),
              f"tie_margin must be a number >= 0 (score units) or empty, got {self.tie_margin!r}")
        _need(_is_int(self.noise_rescores) and (self.noise_rescores == 0 or self.noise_rescores >= 2),
              f"noise_rescores must be 0 (off) or an int >= 2 (candidates re-scored per stage), got "
              f"{self.noise_rescores!r}")

        self._check_gpus()

    @property
    def needs_latency(self) -> bool:
        """True when the search needs a latency predictor (a latency budget or objective)."""
        return self.latency_budget_ms is not None or self.speedup is not None or self.objective.uses_latency

    def latency_budget(self, teacher_latency_ms: Optional[float] = None) -> Optional[tuple]:
        """``(min, max)`` predicted ms from ``latency_budget_ms`` and ``speedup``, or None.

        Raises
        ------
        SearchConfigError
            ``speedup`` is set but the teacher's latency is not known.
        """
        lo, hi = 0.0, math.inf
        if self.latency_budget_ms is None and self.speedup is None:
            return None
        if self.latency_budget_ms is not None:
            lo, hi = self.latency_budget_ms
        if self.speedup is not None:
            _need(teacher_latency_ms is not None and teacher_latency_ms > 0,
                  "search.speedup needs the teacher's latency; fine-tune the teacher first "
                  "(`nni-effbert teacher -c CONFIG`) and run `nni-effbert latency -c CONFIG`")
            hi = min(hi, float(teacher_latency_ms) / float(self.speedup))
        return (float(lo), float(hi))

    def _check_gpus(self) -> None:
        _need(_is_int(self.gpus_per_trial) and self.gpus_per_trial >= 0,
              f"gpus_per_trial must be an int >= 0, got {self.gpus_per_trial!r}")
        if self.gpu_indices is not None:
            idx = self.gpu_indices
            _need(isinstance(idx, (list, tuple)) and len(idx) > 0 and all(_is_int(i) and i >= 0 for i in idx)
                  and len(set(idx)) == len(idx),
                  f"gpu_indices must be a non-empty list of distinct GPU indices >= 0 (or empty for all), got {idx!r}")
            self.gpu_indices = [int(i) for i in idx]
            _need(self.gpus_per_trial <= len(idx),
                  f"gpus_per_trial ({self.gpus_per_trial}) exceeds the {len(idx)} GPU(s) of gpu_indices {idx}")
        _need(isinstance(self.use_active_gpu, bool), f"use_active_gpu must be true or false, got {self.use_active_gpu!r}")
        _need(_is_int(self.max_trials_per_gpu) and self.max_trials_per_gpu >= 1,
              f"max_trials_per_gpu must be an int >= 1, got {self.max_trials_per_gpu!r}")
        _need(self.max_trials_per_gpu == 1 or self.gpus_per_trial > 0,
              f"max_trials_per_gpu ({self.max_trials_per_gpu}) needs gpus_per_trial > 0 (NNI shares GPUs only "
              "between trials that get one)")

    @property
    def budget(self) -> Optional[tuple]:
        """``(min, max)`` or None."""
        return tuple(self.param_budget) if self.param_budget is not None else None

    def total_trials(self) -> int:
        """Trials of the whole search, warm-ups and re-scores included (at most: a stage with fewer
        successful candidates re-scores fewer; see :meth:`max_trial_jobs` for NNI)."""
        return sum(s.trials + (1 if s.warmup else 0) + self.rescores_of(s) for s in self.stages)

    def rescores_of(self, stage: Stage) -> int:
        """Re-scores planned for ``stage`` (``noise_rescores``; none for a one-shot stage)."""
        if not self.noise_rescores or stage.train_steps == 0:
            return 0
        return min(int(self.noise_rescores), int(stage.trials))

    def max_trial_jobs(self, extra: int = 0) -> int:
        """NNI's ``maxTrialNumber`` for this search (plus ``extra`` trials, e.g. the teacher's):
        see :func:`nni_trial_budget`."""
        return nni_trial_budget(self.total_trials() + int(extra))

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        """Build from plain data (``classArgs``, JSON): nested mappings become dataclasses.

        Raises
        ------
        SearchConfigError
            On unknown keys (named, with the allowed ones) or invalid values.
        """
        if data is None:
            return cls()
        _need(isinstance(data, dict), f"search settings must be a mapping, got {type(data).__name__}")
        _check_keys(data, cls, "search")
        data = dict(data)
        if "stages" in data:
            stages = data["stages"]
            _need(isinstance(stages, list), f"search.stages must be a list, got {type(stages).__name__}")
            built = []
            for i, s in enumerate(stages):
                _need(isinstance(s, dict), f"search.stages.{i} must be a mapping, got {type(s).__name__}")
                _check_keys(s, Stage, f"search.stages.{i}")
                built.append(Stage(**s))
            data["stages"] = built
        if "sampler" in data:
            s = data["sampler"]
            _need(isinstance(s, dict), f"search.sampler must be a mapping, got {type(s).__name__}")
            _check_keys(s, SamplerConfig, "search.sampler")
            data["sampler"] = SamplerConfig(**s)
        if "objective" in data:
            o = data["objective"]
            _need(isinstance(o, dict), f"search.objective must be a mapping, got {type(o).__name__}")
            _check_keys(o, ObjectiveConfig, "search.objective")
            data["objective"] = ObjectiveConfig(**o)
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain JSON/YAML data that :meth:`from_dict` reads back."""
        return asdict(self)


def _check_keys(data: dict, cls: type, where: str) -> None:
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    _need(not unknown, f"{where}: unknown key(s) {unknown}; allowed keys: {allowed}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    _need(not missing, f"{where}: missing key(s) {missing}")
