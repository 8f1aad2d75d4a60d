"""Sphinx configuration of the nni-effbert documentation (MyST Markdown pages + autodoc).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (the ``docs`` extra installs
what it needs; ``tests/test_docs.py`` runs the same build with warnings as errors).
"""
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))  # the config-reference generator below

project = "nni-effbert"
author = "nni-effbert developers"
copyright = "2026, nni-effbert developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "config_reference",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# numpydoc docstrings, read by napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # signatures carry the types; numpydoc sections describe them
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "alabaster"
html_title = "nni-effbert"
