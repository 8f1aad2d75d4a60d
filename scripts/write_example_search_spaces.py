"""Write ``examples/*/search_space.json`` from ``space.nni_search_space()`` of each example's preset.

The nnictl examples name these files as ``searchSpaceFile`` so the NNI web UI shows the space;
the advisor checks them against the space it builds from ``classArgs.config``.
``tests/test_examples_run.py`` fails when one is out of date; run this script to refresh them::

    python scripts/write_example_search_spaces.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nni_effbert.config import load_config
from nni_effbert.nas.experiments import student_space

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_search_space(effbert_yml: Path) -> dict:
    """``nni_search_space()`` of the student space an example's ``effbert.yml`` describes."""
    return student_space(load_config(effbert_yml, check_paths=False)).nni_search_space()


def render(space: dict) -> str:
    return json.dumps(space, indent=1) + "\n"


def main() -> int:
    for yml in sorted(EXAMPLES.glob("*/effbert.yml")):
        out = yml.parent / "search_space.json"
        out.write_text(render(example_search_space(yml)), encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
