"""A candidate's multi-task fitness (issue 27): one score from every task of a ``tasks:`` config.

:class:`MultiTaskEvaluator` scores an arch on each task as :class:`~.kd_evaluator.KDEvaluator`
does for one (the subnet sliced from the shared multi-task supernet, that task's head, an
optional KD fine-tune on the task's train rows, the objective on the task's own search split),
then combines the tasks. Loss and metric scales differ between tasks, so each task's objective is
first normalised against the reference arch (BERT's MLP at full width, stack 1) scored the same
way on the same supernet (:func:`combine`)::

    default = sum_t  w_t * (objective_t - reference_t) / |reference_t|,   sum_t w_t = 1

0 is "as good as the reference on average", +0.01 "1% better". The metric dict carries every
task's values (``<task>_default``, ``<task>_search_metric``, ``<task>_search_kd_loss``), so NNI's
web UI shows them, and ``reference`` (the reference's objective per task; computed once per stage,
fine-tune length and evaluator seed, and kept beside the stage checkpoint).

The multi-task search's candidate trials run it (:mod:`.trial_runner`, ``nni-effbert search`` with a
``tasks:`` config).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from filelock import FileLock

from ..config import ExperimentConfig
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_json, load_torch
from ..kd.multitask import MultiTaskSetup
from ..kd.train import TrialFailure
from ..workdir import WorkDir
from .kd_evaluator import KDEvaluator, _as_config, _trial_id, _write_record
from .multitask_warmup import MULTITASK_KIND, run_multitask_warmup_parameters, stage_tasks
from .supernets import check_owner, experiment_key

__all__ = ["combine", "MultiTaskEvaluator", "evaluate_multitask_nni_model"]

logger = logging.getLogger(__name__)

#: Per-task values copied into the flat metric dict as ``<task>_<key>``.
_FLAT_KEYS = ("default", "search_metric", "search_kd_loss")


def combine(objectives: Mapping[str, float], references: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted mean over tasks of ``(objective - reference) / |reference|``.

    Raises
    ------
    ConfigError
        A task without a reference or a weight, a reference of 0 or non-finite values.
    """
    total = sum(float(weights[t]) for t in objectives)
    if not objectives or not math.isfinite(total) or total <= 0:
        raise ConfigError(f"cannot combine task objectives {dict(objectives)} with weights {dict(weights)}")
    out = 0.0
    for task, value in objectives.items():
        if task not in references or task not in weights:
            raise ConfigError(f"task {task}: no reference score or weight to normalise its objective with")
        ref = float(references[task])
        if not math.isfinite(ref) or ref == 0 or not math.isfinite(float(value)):
            raise ConfigError(f"task {task}: cannot normalise objective {value!r} by reference {ref!r}")
        out += float(weights[task]) / total * (float(value) - ref) / abs(ref)
    return out


class MultiTaskEvaluator:
    """Scores archs on every task of a multi-task config, on one stage's multi-task supernet.

    Parameters
    ----------
    cfg : ExperimentConfig
        A config with ``tasks``.
    stage : int
        The stage whose checkpoint (``run_multitask_warmup``) candidates inherit.
    progress : bool
    multi : MultiTaskSetup, optional
        An already loaded setup (its weights are overwritten by the stage's).
    experiment : str, optional
        Whose supernets (default: as :class:`~.kd_evaluator.KDEvaluator`, ``$NNI_EXP_ID`` or the
        work directory's own).
    """

    def __init__(self, cfg: ExperimentConfig, stage: int = 0, *, progress: bool = True,
                 multi: Optional[MultiTaskSetup] = None, experiment: Optional[str] = None):
        cfg = _as_config(cfg, ())
        if not cfg.tasks:
            raise ConfigError("MultiTaskEvaluator needs a config with tasks:; use KDEvaluator for one task")
        self.cfg = cfg
        self.stage = int(stage)
        self.progress = progress
        self.multi = multi or MultiTaskSetup.from_config(cfg, progress=progress)
        self.experiment = experiment_key(experiment)
        self.wd = WorkDir.of(cfg)
        # One single-task evaluator per task over the shared weights; _per_task says which measures latency.
        self.evaluators = {t.name: KDEvaluator(t.setup.cfg, self.stage, report=False, progress=progress,
                                               latency=False, setup=t.setup)
                           for t in self.multi.tasks}
        for ev in self.evaluators.values():  # the table the search built (and its tuner reads)
            ev.latency_root = cfg.workdir
        self._loaded: Optional[str] = None

    @property
    def checkpoint(self) -> Path:
        return self.wd.supernet_checkpoint(self.stage, self.experiment)

    def load_stage(self) -> str:
        """Load the stage's multi-task checkpoint into every task's supernet (once)."""
        path = self.checkpoint
        if not path.is_file():
            raise CheckpointError(f"no multi-task supernet of stage {self.stage}: {path} does not exist; warm it up "
                                  "first (nni_effbert.nas.multitask_warmup.run_multitask_warmup)")
        key = f"{path}:{path.stat().st_mtime_ns}"
        if self._loaded != key:
            data = load_torch(path, f"multi-task supernet checkpoint of stage {self.stage}")
            if not isinstance(data, dict) or data.get("kind") != MULTITASK_KIND:
                raise CheckpointError(f"{path} is not a multi-task supernet checkpoint; warm up the stage with "
                                      "run_multitask_warmup")
            check_owner(data, path, self.experiment, what=f"multi-task supernet checkpoint of stage {self.stage}")
            self.multi.load_state_dict(data["state"])
            self._loaded = key
        return f"stage {self.stage} multi-task supernet"

    @property
    def task_names(self) -> List[str]:
        """The tasks this stage scores on (``search.stages[N].tasks``, else every task)."""
        return stage_tasks(self.cfg, self.stage)

    def _per_task(self, arch: Mapping[str, Any], steps: int, seed_offset: int) -> Dict[str, Dict[str, Any]]:
        inherited = self.load_stage()
        names = self.task_names
        for name, ev in self.evaluators.items():  # the stage's first task measures latency
            ev.latency = name == names[0]
        return {name: self.evaluators[name]._score(dict(arch), self.stage, steps, inherited, seed_offset=seed_offset)
                for name in names}

    def reference(self, steps: int, seed_offset: int = 0) -> Dict[str, float]:
        """Each task's objective for the reference arch (BERT's MLP, full width, stack 1) on this
        stage's supernet with ``steps`` fine-tune steps; computed once and kept in
        ``stage{N}.reference.json`` beside the checkpoint (keyed by the checkpoint's mtime, the
        steps, the objective and the evaluator seed)."""
        self.load_stage()
        path = self.checkpoint.with_suffix(".reference.json")
        key = (f"{self._loaded}|steps={steps}|objective={self.cfg.evaluator.objective}|seed+{seed_offset}"
               f"|tasks={','.join(self.task_names)}")
        with FileLock(str(path) + ".lock"):
            known: Dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
            if key not in known:
                arch = self.multi.tasks[0].setup.space.bert_arch()
                scored = self._per_task(arch, steps, seed_offset)
                known[key] = {name: float(r["default"]) for name, r in scored.items()}
                atomic_write_json(known, path)
                logger.info("stage %d: reference arch scored on every task: %s", self.stage, known[key])
        return dict(known[key])

    # -- NNI: the --python search (NasExperiment) ----------------------------------------------

    @property
    def space(self):
        """The shared student space as an NNI model space (the first task's supernet, its weights),
        for ``NasExperiment``: only the arch of a sample matters, every task scores it."""
        from nni_effbert.search_spaces.space import EfficientBertSpace  # local: nni.nas; never in a trial

        setup = self.multi.tasks[0].setup
        setup.space = EfficientBertSpace.from_supernet(setup.space)  # the same weights, one object
        return setup.space

    def warmup(self, parameters: Mapping[str, Any]) -> Dict[str, Any]:
        """A warm-up trial's parameters run in this process (``warmup_fn`` of the progressive
        strategy on the ``--python`` path); returns the warm-up's metric dict."""
        self._loaded = None  # the warm-up overwrites the weights held in memory
        return run_multitask_warmup_parameters(self.cfg, parameters, progress=self.progress, multi=self.multi,
                                               experiment=self.experiment)

    def as_nni_evaluator(self):
        """This evaluator as an NNI NAS evaluator for ``NasExperiment``: every trial rebuilds a
        :class:`MultiTaskEvaluator` from the config and scores the sample's arch on the supernets
        of its own experiment (``$NNI_EXP_ID``), which the in-process warm-ups wrote."""
        from .nni_evaluator import StageAwareEvaluator  # local: pytorch_lightning, --python only

        return StageAwareEvaluator(evaluate_multitask_nni_model, config=self.cfg.to_dict(), stage=self.stage,
                                   train_steps=None, supernet={"source": "own"})

    # -- scoring -------------------------------------------------------------------------------

    def evaluate(self, arch: Mapping[str, Any], *, train_steps: Optional[int] = None,
                 rescore_of: Optional[int] = None, trial_id: Optional[str] = None) -> Dict[str, Any]:
        """Score ``arch`` on every task and combine them (:func:`combine`); the result is also
        recorded in ``<workdir>/trials/<trial id>/result.json`` (what ``--python`` and a resume read).

        Returns
        -------
        dict
            ``default`` (the combined score), ``objective``, ``tasks`` (each task's metric dict),
            ``<task>_default`` / ``_search_metric`` / ``_search_kd_loss``, ``reference``, ``weights``,
            and from the stage's first task: ``params`` (with its head), ``latency_ms`` and
            ``predicted_latency_ms``, ``expressions``, ``widths``, ``stacks``, ``stage``, ``train_steps``,
            ``evaluator_seed``; ``rescore_of`` for a re-score. Only the stage's tasks are scored
            (``search.stages[N].tasks``), their weights normalised over them.
        """
        started = time.perf_counter()
        names = self.task_names
        first = self.evaluators[names[0]]
        steps = first.train_steps(train_steps)
        offset = 0 if rescore_of is None else 1
        arch = first.validate_arch(arch)
        record = self.wd.trial_dir(trial_id or _trial_id()) / "result.json"
        try:
            references = self.reference(steps, offset)
            per_task = self._per_task(arch, steps, offset)
        except TrialFailure as exc:
            _write_record(record, {"status": "failed", "reason": str(exc), "arch": arch, "stage": self.stage})
            raise
        weights = self.multi.weights_of(names)
        result: Dict[str, Any] = {key: per_task[names[0]][key]
                                  for key in ("params", "non_embedding_params", "latency_ms", "latency_runtime",
                                              "predicted_latency_ms", "expressions", "widths", "stacks", "stage",
                                              "train_steps", "evaluator_seed")
                                  if key in per_task[names[0]]}
        result.update(default=combine({t: r["default"] for t, r in per_task.items()}, references, weights),
                      objective=f"multitask:{self.cfg.evaluator.objective}", reference=references, weights=weights,
                      tasks=per_task)
        for name, r in per_task.items():
            for key in _FLAT_KEYS:
                if key in r:
                    result[f"{name}_{key}"] = r[key]
        if rescore_of is not None:
            result["rescore_of"] = int(rescore_of)
        result["seconds"] = round(time.perf_counter() - started, 3)
        _write_record(record, {"status": "succeeded", "result": result, "arch": arch})
        logger.info("stage %d: combined default %.4f over %s", self.stage, result["default"],
                    {t: round(float(r["default"]), 4) for t, r in per_task.items()})
        return result


# One evaluator per (config, stage) per process, as kd_evaluator's (data and teachers load once).
_EVALUATORS: Dict[str, MultiTaskEvaluator] = {}


def evaluate_multitask_nni_model(model, config: Mapping[str, Any], stage: Optional[int] = None,
                                 train_steps: Optional[int] = None, supernet: Any = None,
                                 rescore_of: Optional[int] = None) -> Dict[str, Any]:
    """Evaluation function of :meth:`MultiTaskEvaluator.as_nni_evaluator` (module level, so NNI can
    serialise it): scores ``model.arch`` on every task and reports the metric dict, arch included."""
    import nni  # local: only a trial reports

    key = json.dumps([config, stage], sort_keys=True, default=str)
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        evaluator = _EVALUATORS[key] = MultiTaskEvaluator(config, int(stage or 0), progress=False)
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping):
        raise ConfigError(f"expected an EfficientBertModel with an .arch dict, got {type(model).__name__}")
    result = evaluator.evaluate(dict(arch), train_steps=train_steps, rescore_of=rescore_of)
    nni.report_final_result({**result, "arch": dict(arch)})
    return result
