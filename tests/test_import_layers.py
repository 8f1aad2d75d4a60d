"""The package's import structure stays as DEVELOPERS.md describes it.

Every import in ``nni_effbert`` (``search_spaces/`` and ``strategies/`` included), at the top of a
module or inside a function, is read with :mod:`ast`. The test fails on

* a circle between modules;
* an import from a higher layer (the layers are :data:`LAYERS`, bottom first);
* an ``nni`` import in the HF remote code (``hf/``) or in the pure-torch modelling modules,
  which are copied into export folders and must load without nni;
* a function-local import without a comment saying why (outside ``cli.py``, whose module
  docstring explains why its commands import lazily).
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Import name -> source folder (``setup.py``'s ``package_dir``).
PACKAGE_DIRS = {
    "nni_effbert.search_spaces": REPO / "search_spaces",
    "nni_effbert.strategies": REPO / "strategies",
    "nni_effbert": REPO / "nni_effbert",
}

#: Bottom first. A module may import modules of its own layer or of layers below it. Names are
#: relative to ``nni_effbert``; ``*`` matches within a package; the first matching layer wins.
LAYERS: List[Tuple[str, List[str]]] = [
    ("foundation", ["", "errors", "io", "workdir", "runtime", "typed_yaml", "hf", "hf.*"]),
    ("space", ["search_spaces", "search_spaces.*", "strategies", "strategies.errors", "strategies.stages",
               "strategies.sampler", "strategies.core", "data", "data.tasks", "data.metrics"]),
    ("config", ["config"]),
    ("data and KD", ["data.qa", "data.*", "kd", "kd.*"]),
    ("NAS library", ["nas", "nas.params", "nas.records", "nas.ranking", "nas.warmup", "nas.evaluator",
                     "nas.nni_evaluator", "nas.supernets", "nas.search_lock", "nas.cost", "nas.objectives"]),
    ("product library", ["product", "product.export", "product.distill", "product.students", "product.plots",
                         "product.cost", "product.report", "product.fidelity"]),
    ("NNI-facing", ["nas.*", "strategies.*"]),
    ("pipeline", ["product.quickstart"]),
    ("entry points", ["cli", "trial", "evaluator"]),
]

#: Imported by the HF remote code from the export folder it is copied into (verbatim copies of
#: ``search_spaces/modeling.py`` and ``ops.py``), not from the package.
EXPORT_ONLY = {"nni_effbert.hf.modeling", "nni_effbert.hf.ops"}

#: Copied verbatim into export folders (HF remote code): no nni, ever.
NO_NNI = ["hf.*", "search_spaces.ops", "search_spaces.modeling"]


def module_files() -> Dict[str, Path]:
    """``nni_effbert.x.y`` -> source file, for every module of the installed package."""
    found: Dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            found.setdefault(name, path)  # search_spaces/ and strategies/ are not under nni_effbert/
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: Set[str]) -> List[Tuple[str, int, bool]]:
    """``(imported nni_effbert module, line, function-local)`` for every import in a module."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out: List[Tuple[str, int, bool]] = []

    def resolve(base: str, names: Sequence[str]) -> List[str]:
        targets = []
        for n in names:
            sub = f"{base}.{n}"
            targets.append(sub if sub in modules else base)
        return targets

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("nni_effbert"):
                        mod = alias.name
                        while mod not in modules and "." in mod:
                            mod = mod.rsplit(".", 1)[0]
                        out.append((mod, child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (child.level - 1)] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.startswith("nni_effbert"):
                    out.extend((t, child.lineno, local) for t in resolve(base, [a.name for a in child.names]))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    modules = set(files)
    graph = {name: {t for t, _, _ in imports_of(name, path, modules) if t != name and t not in EXPORT_ONLY}
             for name, path in files.items()}
    unknown = sorted(f"{src} -> {dst}" for src, dst_set in graph.items() for dst in dst_set if dst not in modules)
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    return graph


def _short(name: str) -> str:
    return name[len("nni_effbert."):] if name.startswith("nni_effbert.") else ""


def layer_of(name: str) -> int:
    short = _short(name)
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(short, p) for p in patterns):
            return i
    raise AssertionError(f"module {name} belongs to no layer; add it to LAYERS in {Path(__file__).name}")


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan), as sorted lists."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if layer_of(dst) > layer_of(src):
                bad.append(f"{_short(src) or 'nni_effbert'} ({LAYERS[layer_of(src)][0]}) imports "
                           f"{_short(dst)} ({LAYERS[layer_of(dst)][0]})")
    return bad


# ---------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    for name in module_files():
        layer_of(name)


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(map(_short, c)) for c in cycles)


def test_imports_point_down_the_layers():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_remote_code_never_imports_nni():
    files = module_files()
    for name, path in files.items():
        if not any(fnmatch.fnmatchcase(_short(name), p) for p in NO_NNI):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "nni" or n.startswith("nni.") for n in names), f"{path}:{node.lineno} imports nni"


def test_function_local_imports_say_why():
    files = module_files()
    missing = []
    for name, path in files.items():
        if _short(name) == "cli":
            continue  # its module docstring says why every command imports lazily
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    window = lines[max(0, node.lineno - 4): node.end_lineno]
                    if not any("#" in line for line in window):
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, "function-local imports without a comment saying why: " + ", ".join(sorted(set(missing)))


# ---------------------------------------------------------------------------------------------
# The checker itself
# ---------------------------------------------------------------------------------------------


def test_checker_finds_a_circle_and_an_upward_import():
    graph = {"nni_effbert.config": {"nni_effbert.kd.train"}, "nni_effbert.kd.train": {"nni_effbert.config"},
             "nni_effbert.errors": set()}
    assert find_cycles(graph) == [["nni_effbert.config", "nni_effbert.kd.train"]]
    assert upward_imports({"nni_effbert.errors": {"nni_effbert.cli"}}) == [
        "errors (foundation) imports cli (entry points)"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_checker_reads_relative_and_local_imports(tmp_path):
    pkg = tmp_path / "nni_effbert" / "kd"
    pkg.mkdir(parents=True)
    src = pkg / "train.py"
    src.write_text("from ..config import load_config\n"
                   "from . import cache\n"
                   "def f():\n"
                   "    from ..product.report import build_report  # local: test\n")
    modules = {"nni_effbert.config", "nni_effbert.kd.cache", "nni_effbert.product.report", "nni_effbert.kd.train"}
    found = imports_of("nni_effbert.kd.train", src, modules)
    assert found == [("nni_effbert.config", 1, False), ("nni_effbert.kd.cache", 2, False),
                     ("nni_effbert.product.report", 4, True)]


@pytest.mark.parametrize("name", ["nni_effbert.cli", "nni_effbert.nas.trial", "nni_effbert.kd.teacher"])
def test_known_modules_are_found(name):
    assert name in module_files()
