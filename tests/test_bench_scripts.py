"""The bench scripts import only what the package has: they run for hours and no unit test runs
them, so a module move that leaves one behind would only show at its next run (``bench/squad.py``
imported ``nni_effbert.kd.latency_table`` long after it moved to ``nni_effbert.latency``)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
OURS = ("nni_effbert", "search_spaces", "strategies")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in OURS:
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    yield alias.name, None


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_script_imports_resolve(script):
    missing = []
    for module, name in _imports(script):
        try:
            found = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
            continue
        if name is not None and not hasattr(found, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{script.name} imports what does not exist: {', '.join(missing)}"


def test_export_folder_takes_a_folder_or_an_export_name(tmp_path, monkeypatch):
    """``compare_exports.py --name`` and ``deploy_exports.py --model`` name exports alike: a folder
    holding export_meta.json or an export's name under the work directory; anything else stops with
    one line naming it."""
    import sys

    from nni_effbert.workdir import WorkDir

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("_common", None)
    from _common import export_folder

    wd = WorkDir(tmp_path / "work")
    named = wd.exports_dir / "searched-seed0"
    named.mkdir(parents=True)
    (named / "export_meta.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "export_meta.json").write_text("{}")
    assert export_folder(wd, "searched-seed0") == named
    assert export_folder(wd, str(elsewhere)) == elsewhere
    with pytest.raises(SystemExit, match="'missing' is neither an export folder"):
        export_folder(wd, "missing")
    with pytest.raises(SystemExit, match="neither"):
        export_folder(wd, str(tmp_path))  # a folder, but no export in it
