"""Shared helpers of the benches: machine info, in-process NNI strategy runs, curves.

The arch-only NNI model space comes from ``tests/support/spaces.py`` (shared with the tests)."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from nni.nas.execution import SequentialExecutionEngine

from nni_effbert.latency.settings import cpu_model

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support: the helpers the benches share with the tests
from tests.support.spaces import FrozenArch, LightNasSpace  # noqa: E402,F401  (re-exported to the benches)


def machine_info() -> Dict[str, Any]:
    return {"cpu_model": cpu_model() or "unknown", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "python": platform.python_version(), "torch": torch.__version__}


def load_now() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def link_shared(root, shared, names=("teacher", "cache", "datasets")) -> None:
    """Make ``root/<name>`` a symbolic link to ``shared/<name>`` (created if missing) for each of
    ``names``: work directories that share one fine-tuned teacher, its caches and datasets."""
    from pathlib import Path

    root, shared = Path(root), Path(shared)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (shared / name).mkdir(parents=True, exist_ok=True)
        if not (root / name).exists():
            os.symlink(shared / name, root / name)


def run_in_process(strategy, model_space, max_models=None):
    """Run ``strategy`` on ``model_space`` (already bound to an evaluator) in this process."""
    engine = SequentialExecutionEngine(max_model_count=max_models, continue_on_failure=True)
    strategy(model_space, engine)
    return engine


def metrics_of(engine) -> List[float]:
    out = []
    for model in engine.list_models():
        m = model.metric
        if isinstance(m, dict):
            m = m.get("default")
        out.append(float(m) if m is not None else float("-inf"))
    return out


def best_so_far(values) -> np.ndarray:
    return np.maximum.accumulate(np.asarray(values, dtype=float))


def trials_to(curve, target) -> int | None:
    """1-based trial at which ``curve`` first reaches ``target``; None if never."""
    hits = np.nonzero(np.asarray(curve) >= target - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


def export_folder(workdir, spec: str) -> Path:
    """An export named on a bench's command line: a folder holding ``export_meta.json``, or the name of
    an export under the work directory (``<workdir>/exports/NAME``); one line and exit otherwise."""
    named = workdir.exports_dir / spec
    for folder in (Path(spec), named):
        if (folder / "export_meta.json").is_file():
            return folder
    raise SystemExit(f"{spec!r} is neither an export folder (with export_meta.json) nor an export in "
                     f"{workdir.exports_dir}; pass a folder written by `nni-effbert export` or one of its names there")
