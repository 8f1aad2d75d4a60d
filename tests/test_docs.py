"""The documentation site builds cleanly and stays complete.

* ``docs/`` builds with Sphinx, warnings as errors (a broken reference, a page outside every
  toctree, a docstring autodoc cannot read all fail the build);
* the generated config reference documents every key of the YAML schema;
* ``bench/README.md`` lists every benchmark script.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _build(src: Path, out: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="the docs extra is not installed: pip install -e '.[docs]'")
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(src), str(out)],
        capture_output=True, text=True, timeout=600,
    )


def test_docs_build_without_warnings(tmp_path):
    run = _build(DOCS, tmp_path / "html")
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "html" / "reference" / "config.html").is_file()
    assert (tmp_path / "html" / "api.html").is_file()


def test_a_broken_reference_fails_the_build(tmp_path):
    """The build above would pass vacuously if warnings were not errors: a copy of the docs with
    one page that references a missing document must fail."""
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build"))
    (src / "guides" / "broken.md").write_text("# Broken\n\nSee {doc}`no-such-page`.\n", encoding="utf-8")
    # The included bench README is found relative to the copied tree's parent.
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "README.md", tmp_path / "bench" / "README.md")
    run = _build(src, tmp_path / "html")
    assert run.returncode != 0
    assert "no-such-page" in run.stderr


def _config_reference():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    return config_reference


def test_config_reference_documents_every_key():
    from nni_effbert.config import ExperimentConfig

    ref = _config_reference()
    assert ref.undocumented(ExperimentConfig) == []
    page = ref.render(ExperimentConfig)
    for key in ("workdir", "task.search_rows", "evaluator.objective", "search.stages[].trials", "runtime.device"):
        assert f"`{key}`" in page


def test_config_reference_reads_comments_and_docstrings():
    """Both sources of a field's meaning reach the page, and a field with neither is reported."""
    import dataclasses

    ref = _config_reference()

    @dataclasses.dataclass
    class Section:
        """A section.

        Attributes
        ----------
        a, b : int
            From the docstring.
        """

        a: int = 1
        b: int = 2
        # From a comment.
        c: str = "x"
        d: float = 0.5  # trailing comment
        e: bool = False

    rows = {row[0]: row for s in ref.sections(Section) for row in s.rows}
    assert rows["a"][3] == rows["b"][3] == "From the docstring."
    assert rows["c"][3] == "From a comment."
    assert rows["d"][3] == "trailing comment"
    assert rows["c"][2] == "`'x'`" and rows["e"][2] == "false"
    assert ref.undocumented(Section) == ["e"]


def test_bench_readme_lists_every_script():
    listed = (REPO / "bench" / "README.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
    missing = [name for name in scripts if f"`{name}" not in listed]
    assert not missing, f"bench/README.md does not list {missing}"


def test_setup_and_test_commands_agree_with_the_scripts():
    """The README and the docs site's getting-started page describe ``scripts/setup.sh`` and
    ``scripts/test.sh`` alike, and name the extras the script really installs."""
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    extras = re.findall(r'-e "\.\[([a-z,]+)\]"', setup)
    assert len(extras) == 1, "scripts/setup.sh should install the package once, with its extras"
    for page in (REPO / "README.md", DOCS / "getting-started.md"):
        text = page.read_text(encoding="utf-8")
        described = re.findall(r'`scripts/setup.sh` runs .*?`pip install -e "\.\[([a-z,]+)\]"`', text)
        assert described == extras, f"{page.name}: setup.sh described with extras {described}, installs {extras}"
        assert "bash scripts/test.sh --fast" in text, f"{page.name} does not give the fast test command"
        assert "bash scripts/setup.sh && nni-effbert quickstart" in text, f"{page.name} lacks the quickstart command"
