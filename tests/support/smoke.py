"""A work directory made by ``nni-effbert quickstart --budget smoke`` (no tests here).

:func:`make_smoke_workdir` runs the real command once (teacher -> nnictl search -> export ->
distill -> report, a few minutes on a busy 2-core machine); the session-scoped ``smoke_workdir``
fixture of ``tests/conftest.py`` wraps it, so every test that needs a fresh quickstart work
directory shares that one run. Tests on it must leave what the quickstart wrote as it is: write
exports under a ``--name`` of their own and never delete anything.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

__all__ = ["REUSE_ENV", "SmokeWorkdir", "make_smoke_workdir", "existing_smoke_workdir", "cli_env", "delete_experiment"]

#: Set to a work directory already made by ``nni-effbert quickstart --budget smoke`` to reuse it
#: instead of running the quickstart (while developing; tests add exports of their own to it).
REUSE_ENV = "EFFBERT_SMOKE_WORKDIR"


@dataclass(frozen=True)
class SmokeWorkdir:
    """What the smoke quickstart left.

    Attributes
    ----------
    root : Path
        The work directory (``--workdir``).
    config : Path
        ``<root>/config.yml``, the resolved config the search saved (what the README's
        ``-c <workdir>/config.yml`` commands read).
    quickstart_config : Path
        ``<root>/quickstart.yml``, the config the quickstart wrote and ran.
    experiment : str
        The search's NNI experiment id (stopped; its records in ``<root>/nni-experiments``).
    env : dict
        The environment the quickstart ran with (no ``NNI_*`` variables, one thread): run the
        CLI in subprocesses with it.
    output : str
        The quickstart's stdout and stderr.
    """

    root: Path
    config: Path
    quickstart_config: Path
    experiment: str
    env: Dict[str, str]
    output: str


def cli_env(**extra: str) -> Dict[str, str]:
    """The environment of a user's shell: this one without NNI's trial variables, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def make_smoke_workdir(root: Path, data_dir: Path, timeout: float = 2400) -> SmokeWorkdir:
    """Run ``nni-effbert quickstart -q --budget smoke --data-dir DATA --workdir ROOT``; fails the
    calling test (with the command's output) unless it exits 0."""
    env = cli_env()
    cmd = [sys.executable, "-m", "nni_effbert.cli", "quickstart", "-q", "--budget", "smoke",
           "--data-dir", str(data_dir), "--workdir", str(root)]
    proc = subprocess.run(cmd, env=env, cwd=root.parent, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    found = re.search(r"^search: experiment (\w+) ", proc.stdout, re.M)
    assert proc.returncode == 0 and found, f"the smoke quickstart failed:\n{output[-4000:]}"
    return SmokeWorkdir(root=root, config=root / "config.yml", quickstart_config=root / "quickstart.yml",
                        experiment=found.group(1), env=env, output=output)


def existing_smoke_workdir(root: Path) -> SmokeWorkdir:
    """A :class:`SmokeWorkdir` of a quickstart work directory made earlier (:data:`REUSE_ENV`): its
    experiment is the one its ``exports/searched`` came from."""
    meta = json.loads((root / "exports" / "searched" / "export_meta.json").read_text(encoding="utf-8"))
    return SmokeWorkdir(root=root, config=root / "config.yml", quickstart_config=root / "quickstart.yml",
                        experiment=str(meta["extra"]["experiment"]), env=cli_env(), output="")


def delete_experiment(exp_id: str, env: Dict[str, str]) -> None:
    """``nnictl experiment delete ID`` (its entry in NNI's manifest and its folder)."""
    subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", exp_id], env=env,
                   input="y\n", capture_output=True, text=True, timeout=120)
