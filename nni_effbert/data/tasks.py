"""The nine GLUE tasks and the two SQuAD tasks as data: input columns, labels and metric of each.

Two spellings of every column exist: the one of the GLUE TSV files (``#1 String``,
``gold_label``, ...) and the one of the ``datasets`` hub (``sentence1``, ``label``, ...).
Loaded data always uses the hub spelling, so code downstream sees one layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import ConfigError

__all__ = [
    "TaskSpec",
    "GLUE_TASKS",
    "TASK_NAMES",
    "CUSTOM_TASK",
    "DATA_DIR_ENV",
    "QA_TASKS",
    "METRICS",
    "canonical_task_name",
    "get_task_spec",
    "custom_task_spec",
]

#: Name of the user-data task (files and columns given in the config).
CUSTOM_TASK = "custom"

#: Environment variable naming a GLUE-layout data root, used when ``task.data_dir`` is empty.
DATA_DIR_ENV = "EFFBERT_DATA_DIR"

#: Metric names understood by :func:`nni_effbert.data.metrics.compute_metrics`.
METRICS: Tuple[str, ...] = (
    "accuracy",
    "f1",
    "matthews",
    "pearson",
    "spearman",
    "acc_f1",
    "pearson_spearman",
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to load and score one task.

    Parameters
    ----------
    name : str
        Canonical lower-case name (``sst2``, ``rte``, ... or ``custom``).
    glue_dir : str or None
        Folder name of the task in a GLUE-layout data root (``SST-2``); None for custom tasks.
    text_columns : list of str
        One or two input text columns, in the hub spelling used after loading.
    label_list : list of str or None
        Class names in label-id order (the hub's order); None for regression.
    num_labels : int
        Number of classes, 1 for regression.
    metric : str
        One of :data:`METRICS`; its value is the task's primary score.
    is_regression : bool
        True when labels are floats (STS-B).
    tsv_text_columns : list of str
        Input columns as named in the GLUE TSV files, aligned with ``text_columns``.
    tsv_label_column : str
        Label column of the GLUE TSV files.
    tsv_column_names : list of str or None
        Column names of a headerless TSV (CoLA); None when the file has a header row.
    tsv_splits : dict
        Split (``train``/``dev``) to TSV file stem (MNLI's dev set is ``dev_matched``).
    hub_splits : dict
        Split (``train``/``dev``) to the hub's split name.
    kind : str
        ``sequence`` (classification / regression: GLUE, custom) or ``span`` (extractive
        question answering: SQuAD; ``metric`` is then ``f1``, the official SQuAD F1, with exact
        match beside it; ``name`` says which version's rules apply).
    """

    name: str
    glue_dir: Optional[str]
    text_columns: List[str]
    label_list: Optional[List[str]]
    num_labels: int
    metric: str
    is_regression: bool = False
    tsv_text_columns: List[str] = field(default_factory=list)
    tsv_label_column: str = "label"
    tsv_column_names: Optional[List[str]] = None
    tsv_splits: Dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "dev"})
    hub_splits: Dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation"})
    kind: str = "sequence"

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks."""
        return len(self.text_columns) == 2

    @property
    def is_span(self) -> bool:
        """True for span question answering (SQuAD): start/end logits instead of class logits."""
        return self.kind == "span"

    @property
    def allows_no_answer(self) -> bool:
        """True for SQuAD v2.0, whose questions may have no answer in the context."""
        return self.is_span and self.name == "squad_v2"


# Label lists follow the hub's class order so that TSV string labels and hub integer labels
# map to the same ids (GLUE TSVs of SST-2, CoLA, MRPC, QQP and WNLI already store 0/1).
GLUE_TASKS: Dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "CoLA", ["sentence"], ["unacceptable", "acceptable"], 2, "matthews",
        tsv_text_columns=["sentence"], tsv_label_column="label",
        # CoLA's TSVs have no header row: source, label, original label, sentence.
        tsv_column_names=["source", "label", "label_notes", "sentence"],
    ),
    "sst2": TaskSpec(
        "sst2", "SST-2", ["sentence"], ["negative", "positive"], 2, "accuracy",
        tsv_text_columns=["sentence"],
    ),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"], 2, "acc_f1",
        tsv_text_columns=["#1 String", "#2 String"], tsv_label_column="Quality",
    ),
    "qqp": TaskSpec(
        "qqp", "QQP", ["question1", "question2"], ["not_duplicate", "duplicate"], 2, "acc_f1",
        tsv_text_columns=["question1", "question2"], tsv_label_column="is_duplicate",
    ),
    "stsb": TaskSpec(
        "stsb", "STS-B", ["sentence1", "sentence2"], None, 1, "pearson_spearman",
        is_regression=True, tsv_text_columns=["sentence1", "sentence2"], tsv_label_column="score",
    ),
    "mnli": TaskSpec(
        "mnli", "MNLI", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"], 3,
        "accuracy", tsv_text_columns=["sentence1", "sentence2"], tsv_label_column="gold_label",
        tsv_splits={"train": "train", "dev": "dev_matched"},
        hub_splits={"train": "train", "dev": "validation_matched"},
    ),
    "qnli": TaskSpec(
        "qnli", "QNLI", ["question", "sentence"], ["entailment", "not_entailment"], 2, "accuracy",
        tsv_text_columns=["question", "sentence"],
    ),
    "rte": TaskSpec(
        "rte", "RTE", ["sentence1", "sentence2"], ["entailment", "not_entailment"], 2, "accuracy",
        tsv_text_columns=["sentence1", "sentence2"],
    ),
    "wnli": TaskSpec(
        "wnli", "WNLI", ["sentence1", "sentence2"], ["not_entailment", "entailment"], 2, "accuracy",
        tsv_text_columns=["sentence1", "sentence2"],
    ),
}

#: Span question answering (:mod:`nni_effbert.data.qa`). ``glue_dir`` is unused; the hub names
#: are those of ``datasets.load_dataset``; ``tsv_splits`` holds the official file names.
QA_TASKS: Dict[str, TaskSpec] = {
    name: TaskSpec(
        name, None, ["question", "context"], None, 2, "f1", kind="span",
        tsv_splits={"train": f"train-v{version}.json", "dev": f"dev-v{version}.json"},
    )
    for name, version in (("squad", "1.1"), ("squad_v2", "2.0"))
}

#: Every accepted canonical task name.
TASK_NAMES: Tuple[str, ...] = tuple(GLUE_TASKS) + tuple(QA_TASKS) + (CUSTOM_TASK,)


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Accept the GLUE folder spellings (SST-2, STS-B, CoLA...) and hub names alike.
_ALIASES: Dict[str, str] = {_squash(n): n for n in TASK_NAMES}
_ALIASES.update({_squash(s.glue_dir): n for n, s in GLUE_TASKS.items() if s.glue_dir})


def canonical_task_name(name: str) -> str:
    """Return the canonical name of a task given in any accepted spelling.

    Parameters
    ----------
    name : str
        ``sst2``, ``SST-2``, ``sts-b``, ``squad``, ``squad_v2``, ``custom`` ...

    Raises
    ------
    ConfigError
        For a name that is no GLUE or SQuAD task nor ``custom``; the message lists the valid names.
    """
    if not isinstance(name, str) or _squash(name) not in _ALIASES:
        raise ConfigError(
            f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)} "
            "(GLUE folder spellings such as 'SST-2' are accepted too)"
        )
    return _ALIASES[_squash(name)]


def get_task_spec(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of a GLUE or SQuAD task (any accepted spelling)."""
    canonical = canonical_task_name(name)
    if canonical == CUSTOM_TASK:
        raise ConfigError("the 'custom' task has no fixed spec; build it with custom_task_spec()")
    return QA_TASKS[canonical] if canonical in QA_TASKS else GLUE_TASKS[canonical]


def custom_task_spec(
    text_columns: List[str],
    label_list: Optional[List[str]],
    metric: Optional[str] = None,
    regression: bool = False,
) -> TaskSpec:
    """Build the spec of a user task.

    Parameters
    ----------
    text_columns : list of str
        One or two input columns of the user's files.
    label_list : list of str or None
        Class names (sorted unique train labels); None for regression.
    metric : str, optional
        Default ``accuracy`` (classification) or ``pearson_spearman`` (regression).
    regression : bool
        Float labels and a single output.
    """
    if len(text_columns) not in (1, 2):
        raise ConfigError(f"a custom task needs one or two text columns, got {list(text_columns)}")
    if metric is None:
        metric = "pearson_spearman" if regression else "accuracy"
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not regression and not label_list:
        raise ConfigError("a custom classification task needs at least one label")
    return TaskSpec(
        name=CUSTOM_TASK,
        glue_dir=None,
        text_columns=list(text_columns),
        label_list=None if regression else list(label_list or []),
        num_labels=1 if regression else len(label_list or []),
        metric=metric,
        is_regression=regression,
        tsv_text_columns=list(text_columns),
    )
