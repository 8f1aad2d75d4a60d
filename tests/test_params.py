"""The trial wire format (``nni_effbert.params``): one module spells every ``_`` key.

The package is read with :mod:`ast`; a string constant equal to a trial-parameter key anywhere
but ``nni_effbert/params.py`` (docstrings aside) is a stray: it would drift from the one
definition the search, the broker, the trial and the records share.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, List

from nni_effbert import params as wire
from nni_effbert.params import (KNOWN_META, arch_part, candidate_parameters, echoed_ids, int_meta, is_placeholder,
                                is_teacher, is_warmup, placeholder_parameters, placeholder_reason, split_arch,
                                split_parameters, stage_name, stage_of, teacher_parameters, warmup_parameters,
                                with_parameter_id, without_parameter_id)

REPO = Path(__file__).resolve().parents[1]
#: The package's source folders (``setup.py``'s ``package_dir``).
PACKAGE_FOLDERS = [REPO / "nni_effbert", REPO / "search_spaces", REPO / "strategies"]

#: (file relative to the repository, key) -> why that literal is not a trial parameter.
ALLOWED = {
    ("nni_effbert/product/report_page.py", "_teacher"): "a flag of a report-table row, not a trial parameter",
    ("nni_effbert/nas/supervisor.py", "_noop"): "the standard-library supervisor answers a placeholder before any "
                                                "package import; tests/test_warm_worker.py checks it is params.NOOP_KEY",
}


def _docstring_nodes(tree: ast.AST) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def stray_keys(paths: Iterable[Path], keys: Iterable[str] = KNOWN_META) -> List[str]:
    """``file:line key`` for every string constant in ``paths`` equal to one of ``keys``."""
    keys = set(keys)
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstring_nodes(tree)
        rel = path.resolve().relative_to(REPO).as_posix() if path.resolve().is_relative_to(REPO) else path.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys
                    and id(node) not in docs and (rel, node.value) not in ALLOWED):
                found.append(f"{rel}:{node.lineno} {node.value}")
    return found


def test_no_trial_parameter_key_is_spelled_outside_the_wire_module():
    own = Path(wire.__file__).resolve()
    paths = [p for folder in PACKAGE_FOLDERS for p in sorted(folder.rglob("*.py")) if p.resolve() != own]
    assert len(paths) > 50
    strays = stray_keys(paths)
    assert not strays, "trial-parameter keys spelled outside nni_effbert/params.py (import them):\n" + "\n".join(strays)


def test_the_grep_finds_a_stray(tmp_path):
    src = tmp_path / "stray.py"
    src.write_text('"""Docstrings may name ``"_train_steps"``."""\n'
                   'def f(params):\n'
                   '    """``_stage`` in a docstring is fine."""\n'
                   '    return params.get("_train_steps"), params["_stage"]\n')
    assert [s.split(":", 1)[1] for s in stray_keys([src])] == ["4 _train_steps", "4 _stage"]
    assert stray_keys([Path(wire.__file__)])  # the wire module itself spells them all


def test_written_parameters_read_back():
    warm = warmup_parameters(1, "mlp", "expression", 30, warmup_steps=12, fixed={"layer0_width": 2})
    assert is_warmup(warm) and not is_teacher(warm) and not is_placeholder(warm)
    assert int_meta(warm, wire.WARMUP_KEY) == 1 and int_meta(warm, wire.WARMUP_STEPS_KEY) == 12
    assert stage_of(warm) == 1 and stage_name(warm) == "mlp"
    assert split_arch(warm) == {"layer0_width": 2}
    assert wire.WARMUP_STEPS_KEY not in warmup_parameters(0, "a", "b", 0)

    cand = candidate_parameters({"layer0_width": 3}, 2, train_steps=5)
    arch, meta = split_parameters(cand)
    assert arch == {"layer0_width": 3} and meta == {wire.STAGE_KEY: 2, wire.TRAIN_STEPS_KEY: 5}
    assert stage_of(cand) == 2 and not is_warmup(cand)
    assert wire.TRAIN_STEPS_KEY not in candidate_parameters({}, 0)
    again = candidate_parameters({"layer0_width": 3}, 2, train_steps=5, rescore_of=4)
    assert split_parameters(again)[0] == arch and int_meta(again, wire.RESCORE_OF_KEY) == 4
    assert wire.RESCORE_OF_KEY not in cand

    served = with_parameter_id(cand, 7)
    assert echoed_ids(served) == {"parameter_id": 7} and without_parameter_id(served) == cand
    assert arch_part(served) == arch
    assert is_teacher(teacher_parameters()) and echoed_ids(teacher_parameters()) == {}
    noop = placeholder_parameters(9, "drain")
    assert is_placeholder(noop) and placeholder_reason(noop) == "drain" and echoed_ids(noop) == {"parameter_id": 9}
    every = {**warm, **served, **again, **teacher_parameters(), **noop, wire.STAGE_KIND_KEY: "x"}
    assert set(split_parameters(every)[1]) == KNOWN_META


def test_strategies_core_keeps_its_public_names():
    from nni_effbert.strategies import core
    assert core.split_parameters is split_parameters and core.WARMUP_KEY == wire.WARMUP_KEY
