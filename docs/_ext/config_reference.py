"""Generate the config reference page from the experiment config's dataclasses.

Every key of the YAML schema (:class:`nni_effbert.config.ExperimentConfig` and the section
dataclasses it nests) becomes a table row: dotted key, type, default and meaning. The meaning is
read from the code, never copied by hand: the field's entry in the class docstring's numpydoc
``Attributes`` / ``Parameters`` section when there is one, else the comment lines right above the
field and its trailing ``# ...`` comment. A field with neither shows an empty meaning, which the
docs test reports (see ``undocumented``).

The page is written to ``docs/reference/config.md`` when Sphinx starts (``builder-inited``), so
it always matches the installed code; the file is generated, and git ignores it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

OUT = Path(__file__).resolve().parents[1] / "reference" / "config.md"

HEADER = """# Config reference

One YAML file describes an experiment (`examples/sst2/effbert.yml` is a commented example).
Relative paths resolve against the YAML file's folder. Unknown keys, wrong types, non-finite
numbers and missing files are errors naming `file:dotted.key`. Every key can also be set on the
command line with `--set dotted.key=value`.

This page is generated from the config dataclasses (`nni_effbert.config.ExperimentConfig` and
the sections it holds) each time the docs are built: the meanings are the code's own docstrings
and comments.
"""


# ---------------------------------------------------------------------------------------------
# Reading the code
# ---------------------------------------------------------------------------------------------


def _numpydoc_fields(cls: type) -> Dict[str, str]:
    """``name -> description`` from the ``Attributes`` / ``Parameters`` sections of a docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    found: Dict[str, str] = {}
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("Attributes", "Parameters") and i + 1 < len(lines) and set(
            lines[i + 1].strip()
        ) == {"-"}:
            i += 2
            name: Optional[str] = None
            while i < len(lines):
                line = lines[i]
                if line.strip() and set(line.strip()) == {"-"}:  # the next section's underline
                    if name:
                        found[name] = found[name].rsplit("\n", 1)[0]
                    name = None
                    break
                head = re.match(r"^(\w+(?:\s*,\s*\w+)*)\s*(:.*)?$", line)
                if head and not line.startswith(" "):
                    name = head.group(1)
                    found[name] = ""
                elif name is not None:
                    found[name] = (found[name] + "\n" + line.strip()).strip()
                i += 1
            continue
        i += 1
    out: Dict[str, str] = {}
    for names, text in found.items():
        for name in names.split(","):  # ``a, b, c`` documents several fields at once
            if text:
                out[name.strip()] = " ".join(text.split())
    return out


def _comment_fields(cls: type) -> Dict[str, str]:
    """``name -> the comments above the field's line and at its end``, read from the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    found: Dict[str, str] = {}
    for node in getattr(body, "body", []):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: List[str] = []
        j = node.lineno - 2
        while j >= 0 and lines[j].strip().startswith("#"):
            above.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        end = lines[node.end_lineno - 1]
        inline = ""
        match = re.search(r"#\s*(.*)$", end)
        if match and end.count('"') % 2 == 0 and end.count("'") % 2 == 0:
            inline = match.group(1).strip()
        text = " ".join(part for part in (" ".join(above), inline) if part)
        if text:
            found[node.target.id] = text
    return found


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(names)
        return f"{text}, optional" if type(None) in args else text
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    if origin in (tuple, Tuple):
        return "list"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return "(required)"
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _single_dataclass(tp: Any) -> Optional[type]:
    """The dataclass a field holds (directly or as ``List[...]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


@dataclasses.dataclass
class Section:
    """One table of the page: a dataclass reached through ``key``."""

    key: str
    cls: type
    rows: List[Tuple[str, str, str, str]]


def sections(cls: type, key: str = "") -> Iterator[Section]:
    """The sections of ``cls`` (itself first), depth first, each with its rows."""
    hints = typing.get_type_hints(cls)
    docs = {**_comment_fields(cls), **_numpydoc_fields(cls)}
    rows: List[Tuple[str, str, str, str]] = []
    nested: List[Tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp = hints.get(f.name, f.type)
        sub = _single_dataclass(tp)
        dotted = f"{key}.{f.name}" if key else f.name
        if sub is not None:
            is_list = typing.get_origin(tp) in (list, List)
            nested.append((f"{dotted}[]" if is_list else dotted, sub))
            if is_list:  # a list of sections is a key of its own too (e.g. search.stages)
                rows.append((dotted, f"list of {sub.__name__}", "see below", docs.get(f.name, "")))
            continue
        rows.append((dotted, _type_name(tp), _default(f), docs.get(f.name, "")))
    yield Section(key, cls, rows)
    for sub_key, sub in nested:
        yield from sections(sub, sub_key)


def undocumented(root: type) -> List[str]:
    """Dotted keys whose field has neither a docstring entry nor a comment."""
    return [row[0] for s in sections(root) for row in s.rows if not row[3]]


def _markdown(text: str) -> str:
    """reST inline markup of docstrings as Markdown: roles and double back-quotes become code."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def render(root: type) -> str:
    """The whole page as MyST Markdown."""
    out = [HEADER]
    for s in sections(root):
        title = f"`{s.key}`" if s.key else "Top level"
        summary = _markdown(inspect.cleandoc(s.cls.__doc__ or "").split("\n\n")[0].replace("\n", " "))
        out.append(f"\n## {title}\n\n{summary}\n")
        if not s.rows:
            continue
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, tp, default, doc in s.rows:
            out.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(doc)} |")
    return "\n".join(out) + "\n"


def write_page(path: Path = OUT) -> Path:
    """Write the page for the installed :class:`nni_effbert.config.ExperimentConfig`."""
    from nni_effbert.config import ExperimentConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    text = render(ExperimentConfig)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def setup(app: Any) -> Dict[str, Any]:
    """Sphinx hook: generate the page before the sources are read."""
    app.connect("builder-inited", lambda _app: write_page())
    return {"parallel_read_safe": True, "parallel_write_safe": True}
