"""The package's import structure stays as DEVELOPERS.md describes it.

Every import in ``nni_effbert`` (``search_spaces/`` and ``strategies/`` included), at the top of a
module or inside a function, is read with :mod:`ast`. The test fails on

* a circle between modules;
* an import from a higher layer (the layers are :data:`LAYERS`, bottom first);
* an ``nni`` import in the HF remote code (``hf/``) or in the pure-torch modelling modules,
  which are copied into export folders and must load without nni;
* a function-local import without a comment saying why (outside ``cli.py``, whose module
  docstring explains why its commands import lazily);
* a circle between folders, or a folder that imports a folder above it (:data:`FOLDERS`). A
  folder is a package (``data``, ``strategies``, ``strategies.nni`` ...); a module directly in
  ``nni_effbert/`` is a folder of its own.
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
    ("foundation", ["", "errors", "io", "params", "workdir", "search_lock", "runtime", "typed_yaml", "stats", "hf", "hf.*"]),
    ("space", ["search_spaces", "search_spaces.*", "strategies", "strategies.search_errors", "strategies.stages",
               "strategies.ties", "strategies.sampler", "strategies.core", "data", "data.*"]),
    ("config", ["config"]),
    ("KD and latency", ["kd", "kd.*", "latency", "latency.*"]),
    ("NAS library", ["nas", "nas.records", "nas.ranking", "nas.warmup", "nas.kd_evaluator",
                     "nas.nni_evaluator", "nas.supernets", "nas.latency_ranking", "nas.objectives",
                     "nas.multitask_warmup", "nas.multitask_evaluator"]),
    ("product library", ["product", "product.loader", "product.export", "product.distill", "product.students",
                         "product.baselines", "product.plots", "product.compare", "product.latency_exports",
                         "product.report_page", "product.report", "product.fidelity", "product.onnx", "product.suite"]),
    ("NNI-facing", ["nas.*", "strategies.*"]),
    ("pipeline", ["product.quickstart"]),
    ("entry points", ["cli", "trial", "evaluator"]),
]

#: Folders bottom first (see :func:`folder_of`). A folder imports only folders below it.
FOLDERS: List[Tuple[str, List[str]]] = [
    ("foundation", ["", "errors", "io", "params", "workdir", "search_lock", "runtime", "typed_yaml", "stats", "hf"]),
    ("space", ["search_spaces"]),
    ("search core", ["strategies"]),
    ("data", ["data"]),
    ("config", ["config"]),
    ("KD", ["kd"]),
    ("latency", ["latency"]),
    ("NNI adapters", ["strategies.nni"]),
    ("NAS", ["nas"]),
    ("product", ["product"]),
    ("entry points", ["cli", "trial", "evaluator"]),
]

#: Modules counted in another folder than their own: the old class paths of the advisor and the
#: tuner (one-line aliases that ``registered_algorithms.yml`` or nnictl configs may still name)
#: belong to the adapters they re-export.
FOLDER_OF = {"strategies.advisor": "strategies.nni", "strategies.tuner": "strategies.nni"}

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


def folder_of(name: str, packages: Set[str]) -> str:
    """The folder of a module: its package (``data.loading`` -> ``data``, a package -> itself),
    or the module itself when it sits directly in ``nni_effbert/`` (``config`` -> ``config``)."""
    short = _short(name)
    if short in FOLDER_OF:
        return FOLDER_OF[short]
    if name in packages or "." not in short:
        return short
    return short.rsplit(".", 1)[0]


def packages_of(files: Dict[str, Path]) -> Set[str]:
    return {name for name, path in files.items() if path.name == "__init__.py"}


def folder_graph(graph: Dict[str, Set[str]], packages: Set[str]) -> Dict[str, Set[str]]:
    """Folder -> the other folders its modules import."""
    out: Dict[str, Set[str]] = {}
    for src, targets in graph.items():
        a = folder_of(src, packages)
        out.setdefault(a, set())
        for dst in targets:
            b = folder_of(dst, packages)
            if b != a:
                out[a].add(b)
    return out


def folder_level(folder: str) -> int:
    for i, (_, names) in enumerate(FOLDERS):
        if folder in names:
            return i
    raise AssertionError(f"folder {folder or 'nni_effbert'} has no place in FOLDERS; add it in {Path(__file__).name}")


def upward_folder_imports(fgraph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for src, targets in sorted(fgraph.items()):
        for dst in sorted(targets):
            if folder_level(dst) > folder_level(src):
                bad.append(f"{src or 'nni_effbert'} ({FOLDERS[folder_level(src)][0]}) imports "
                           f"{dst} ({FOLDERS[folder_level(dst)][0]})")
    return bad


def package_folder_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return folder_graph(import_graph(), packages_of(files))


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


def test_no_folder_imports_a_folder_that_imports_it_back():
    cycles = find_cycles(package_folder_graph())
    assert not cycles, "folder circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_folders_import_only_folders_below_them():
    bad = upward_folder_imports(package_folder_graph())
    assert not bad, "folders importing upward:\n" + "\n".join(bad)


#: Documented public aliases that share a name with the module they re-export.
ALIASES = {
    "evaluator": "the README's `from nni_effbert.evaluator import KDEvaluator` (nas.kd_evaluator)",
    "trial": "`python -m nni_effbert.trial`, the trialCommand of every nnictl config (nas.trial_runner)",
    "strategies.advisor": "the advisor's old class path in registered_algorithms.yml (strategies.nni.advisor)",
    "strategies.tuner": "the plain tuner's old className in nnictl configs (strategies.nni.tuner)",
}


def duplicate_names(names) -> Dict[str, List[str]]:
    """File name -> the modules that have it, for names held by more than one non-alias module."""
    by_name: Dict[str, List[str]] = {}
    for name in names:
        short = _short(name)
        by_name.setdefault(short.rsplit(".", 1)[-1], []).append(short)
    return {base: sorted(mods) for base, mods in sorted(by_name.items())
            if len([m for m in mods if m not in ALIASES]) > 1}


def test_no_two_modules_share_a_name():
    files = module_files()
    modules = [name for name, path in files.items() if path.name != "__init__.py"]
    dups = duplicate_names(modules)
    assert not dups, f"modules sharing a file name (rename one, or document an alias in ALIASES): {dups}"
    assert duplicate_names(["nni_effbert.nas.cost", "nni_effbert.product.cost"]) == {
        "cost": ["nas.cost", "product.cost"]}
    assert duplicate_names(["nni_effbert.evaluator", "nni_effbert.nas.evaluator"]) == {}


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


def test_folder_checker_fails_on_a_folder_cycle():
    files = module_files()
    packages = packages_of(files)
    graph = import_graph()
    assert not find_cycles(folder_graph(graph, packages))
    # No module circle (kd.losses does not import data.tasks), but kd/ imports data/ elsewhere.
    graph["nni_effbert.data.tasks"] = graph["nni_effbert.data.tasks"] | {"nni_effbert.kd.losses"}
    assert not any("nni_effbert.data.tasks" in c for c in find_cycles(graph))
    fgraph = folder_graph(graph, packages)
    cycles = find_cycles(fgraph)
    assert any({"data", "kd"} <= set(c) for c in cycles), cycles
    assert "data (data) imports kd (KD)" in upward_folder_imports(fgraph)


def test_folder_of():
    packages = {"nni_effbert.data", "nni_effbert.strategies", "nni_effbert.strategies.nni", "nni_effbert"}
    assert folder_of("nni_effbert.data.loading", packages) == "data"
    assert folder_of("nni_effbert.data", packages) == "data"
    assert folder_of("nni_effbert.strategies.nni.advisor", packages) == "strategies.nni"
    assert folder_of("nni_effbert.strategies.core", packages) == "strategies"
    assert folder_of("nni_effbert.config", packages) == "config"
    assert folder_of("nni_effbert", packages) == ""


@pytest.mark.parametrize("name", ["nni_effbert.cli", "nni_effbert.nas.trial_runner", "nni_effbert.kd.teacher"])
def test_known_modules_are_found(name):
    assert name in module_files()


def test_every_cfg_parameter_is_typed():
    """A function that takes the experiment config says so (``cfg: ExperimentConfig``), so readers
    and type checkers know what ``cfg.task`` / ``cfg.kd`` are."""
    untyped = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if arg.arg == "cfg" and arg.annotation is None:
                        untyped.append(f"{name}:{node.lineno} {node.name}")
    assert not untyped, "untyped cfg parameters (annotate them as ExperimentConfig):\n" + "\n".join(untyped)

