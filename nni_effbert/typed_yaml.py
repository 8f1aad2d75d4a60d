"""Strict, typed YAML: nested dataclasses loaded from YAML mappings, with errors that name
``file:dotted.key``.

The schema (field types, ``path`` / ``check`` metadata, defaults) is whatever dataclasses the
caller passes; :mod:`nni_effbert.config` is the experiment schema built on it. Unknown keys,
duplicate keys, values of the wrong type and malformed YAML raise
:class:`~nni_effbert.errors.ConfigError`; ``path`` fields are resolved against a base folder;
``--set dotted.key=value`` overrides are parsed as YAML scalars and type-checked like the file.

Two YAML features are refused: anchors and aliases (``&name`` / ``*name``: nested aliases expand
exponentially, a few lines can ask for gigabytes, the "billion laughs"), and non-finite numbers
(``.nan``, ``.inf``, ``nan`` ...) anywhere, in a ``float`` field or under a free-form mapping.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "read_yaml", "apply_overrides", "field_default", "path_field", "checked_field",
           "Checked", "positive", "non_negative", "fraction", "optional_fraction", "unit_interval", "one_of"]


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


def _finite(value: float, where: str, key: str) -> float:
    if not math.isfinite(value):
        raise _err(where, key, f"must be a finite number, got {value!r}")
    return value


def _check_finite(value: Any, where: str, key: str) -> Any:
    """Refuse a non-finite float anywhere inside free-form data (``Any`` fields)."""
    if isinstance(value, float):
        _finite(value, where, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, _join(key, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, where, _join(key, i))
    return value


def _convert(tp: Any, value: Any, where: str, key: str, base_dir: Optional[Path]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _check_finite(value, where, key)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where, key, base_dir)
        for option in non_none:  # e.g. Union[str, List[str]]: the first type that fits
            try:
                return _convert(option, value, where, key, base_dir)
            except ConfigError:
                continue
        raise _err(where, key, f"expected one of {', '.join(_type_name(a) for a in non_none)}, "
                               f"got {type(value).__name__} {value!r}")
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
            return _finite(float(value), where, key)
        if isinstance(value, str):
            # PyYAML reads exponents without a dot (``1e-4``) as strings (YAML 1.1).
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(number, where, key)
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
        elif f.metadata.get("path") and isinstance(value, list):  # a list of paths
            if any(not isinstance(v, str) or not v.strip() for v in value):
                raise _err(where, sub, f"expected a list of file paths, got {value!r}")
            value = [_resolve_path(v, base, bool(f.metadata.get("maybe"))) for v in value] or None
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
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one) and anchors /
    aliases (whose nested expansion can ask for any amount of memory)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None,
                f"YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are not allowed in "
                "nni-effbert configs; write the values out", event.start_mark)
        return super().compose_node(parent, index)


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


def read_yaml(path: Path) -> Dict[str, Any]:
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
        if "anchors and aliases" in problem:
            raise ConfigError(f"{path}:line {line}: {problem}") from None
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


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], cls: type) -> Dict[str, Any]:
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
        Schema root (a dataclass).

    Returns
    -------
    dict
        ``data``, modified.
    """
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
            value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"{where}: value is not valid YAML: {' '.join(str(problem).split())}") from None

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
                        node[part] = field_default(f) or []
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
        elif is_path and isinstance(value, list):  # --set warmup.corpus_file=[a.txt,b.txt]
            parent = data
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            parent[parts[-1]] = [os.path.abspath(os.path.expanduser(v)) if isinstance(v, str) else v for v in value]
    return data


# ---------------------------------------------------------------------------------------------
# Field helpers: the metadata :func:`from_dict` reads, and common checks
# ---------------------------------------------------------------------------------------------
# ``path``: a filesystem path, resolved to an absolute one at load time.
# ``check``: callable(value) -> value, raising ValueError with a message on bad values.


def path_field(default: Any = None, **kw: Any) -> Any:
    """A dataclass field holding a filesystem path (resolved to an absolute one at load time)."""
    return dataclasses.field(default=default, metadata={"path": True, **kw})


def checked_field(check: Callable[[Any], Any], default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field whose value ``check(value)`` validates (ValueError with a message) at load time
    and, in a :class:`Checked` dataclass, on construction."""
    if "default_factory" in kw:
        return dataclasses.field(default_factory=kw.pop("default_factory"), metadata={"check": check, **kw})
    return dataclasses.field(default=default, metadata={"check": check, **kw})


def positive(value: Any) -> Any:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def non_negative(value: Any) -> Any:
    if value is not None and value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def optional_fraction(value: Optional[float]) -> Optional[float]:
    return None if value is None else fraction(value)


def unit_interval(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value}")
    return value


def check_known_keys(mapping: Any, allowed: Sequence[str], where: str) -> None:
    """Raise :class:`ConfigError` naming ``where`` if ``mapping`` has a key outside ``allowed``
    (records and tables read back from files, checked the way config sections are)."""
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def one_of(*allowed: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


class Checked:
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
