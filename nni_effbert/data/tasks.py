"""The nine GLUE tasks and the two SQuAD tasks as data: input columns, labels and metric of each.

Two spellings of every column exist: the one of the GLUE TSV files (``#1 String``,
``gold_label``, ...) and the one of the ``datasets`` hub (``sentence1``, ``label``, ...).
Loaded data always uses the hub spelling, so code downstream sees one layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..typed_yaml import (Checked, checked_field, fraction, non_negative, one_of, optional_fraction, path_field,
                          positive)

__all__ = [
    "TaskConfig",
    "QA_MAX_SEQ_LENGTH",
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


@dataclass
class TaskConfig(Checked):
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

    name: str = checked_field(_task_name, "sst2")
    data_dir: Optional[str] = path_field(None)
    max_seq_length: int = checked_field(positive, 128)
    train_fraction: float = checked_field(fraction, 1.0)
    dev_fraction: float = checked_field(fraction, 1.0)
    max_train_rows: Optional[int] = checked_field(positive, None)
    max_dev_rows: Optional[int] = checked_field(positive, None)
    seed: Optional[int] = None
    # custom tasks (name: custom)
    train_file: Optional[str] = path_field(None)
    dev_file: Optional[str] = path_field(None)
    text_columns: List[str] = field(default_factory=list)
    label_column: str = "label"
    metric: Optional[str] = checked_field(one_of(*METRICS), None)
    regression: bool = False
    # Held-out search split, carved (seeded) from the train rows after the subset: candidates are
    # scored on it and no student ever trains on it; dev stays for the final report. Rows, or a
    # fraction of the train rows (give one); capped at half the train rows; 0 = no search split.
    search_rows: Optional[int] = checked_field(non_negative, 1000)
    search_fraction: Optional[float] = checked_field(optional_fraction, None)
    # Span QA (name: squad / squad_v2; docs/guides/squad.md): contexts longer than max_seq_length
    # (default 384 for QA) are cut into windows that overlap by doc_stride tokens, as run_qa does;
    # answers are the best of n_best_size start and end logits, at most max_answer_length tokens.
    # train_file / dev_file name SQuAD-format JSON files; the search split is held out by article.
    doc_stride: int = checked_field(positive, 128)
    max_answer_length: int = checked_field(positive, 30)  # span QA: longest answer, in tokens
    n_best_size: int = checked_field(positive, 20)  # span QA: start and end candidates per window

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
