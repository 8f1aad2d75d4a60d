"""The teacher's latency (measured once per device and settings, stored in the work directory)
and what a search needs of latency: the table and the teacher's time, for speed-up targets and
budgets (:func:`search_latency`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from ..config import ExperimentConfig
from ..io import atomic_write_json, load_json
from ..kd.teacher import load_teacher, prepare_teacher, teacher_fingerprint
from ..workdir import WorkDir
from .measure import measure_latency
from .settings import (LATENCY_DIR, LatencySettings, device_description, key_digest, latency_settings, runtime_key,
                       torch_device)
from .table import LatencyTable, table_for_config

__all__ = ["teacher_latency_path", "teacher_latency_ms", "search_latency"]


def teacher_latency_path(cfg: ExperimentConfig, settings: LatencySettings) -> Path:
    key = {"device": device_description(settings.device), "torch": torch.__version__, "threads": settings.threads,
           "batch_size": settings.batch_size, "seq_length": settings.seq_length, **runtime_key(settings)}
    return WorkDir.of(cfg).root / LATENCY_DIR / f"teacher-{key_digest(key)}.json"


def teacher_latency_ms(cfg: ExperimentConfig, *, measure: bool = True, repeats: int = 30) -> Optional[float]:
    """The fine-tuned teacher's end-to-end latency (ms) at the config's latency settings.

    Stored beside the tables (``<workdir>/latency/teacher-<digest>.json``, with the teacher's
    fingerprint); measured when missing or stale and ``measure`` is true. None when there is no
    fine-tuned teacher in the work directory yet (or ``measure`` is false and nothing is stored).
    """
    settings = latency_settings(cfg)
    wd = WorkDir.of(cfg)
    folder = wd.teacher_dir
    if not (folder / "config.json").is_file():
        return None
    fingerprint = teacher_fingerprint(folder)
    path = teacher_latency_path(cfg, settings)
    if path.is_file():
        data = load_json(path, "teacher latency")
        if isinstance(data, dict) and data.get("fingerprint") == fingerprint:
            return float(data["median_ms"])
    if not measure:
        return None
    model, _ = load_teacher(str(folder))
    model = prepare_teacher(model).to(torch_device(settings.device))
    ms = measure_latency(model, seq_length=settings.seq_length, batch_size=settings.batch_size, repeats=repeats,
                         threads=settings.threads, runtime=settings.runtime).median_ms
    atomic_write_json({"fingerprint": fingerprint, "median_ms": ms, "device": device_description(settings.device),
                       "runtime": settings.runtime,
                       "threads": settings.threads, "batch_size": settings.batch_size,
                       "seq_length": settings.seq_length}, path)
    return float(ms)


def search_latency(cfg: ExperimentConfig, *, build: bool = True,
                   progress: bool = True) -> Tuple[Optional[LatencyTable], Optional[float]]:
    """The latency predictor and teacher latency a search of ``cfg`` needs, or ``(None, None)``.

    The table is built when missing and ``build`` is true; the teacher's latency is measured
    only for speed-up targets (``search.speedup``, ``search.objective.target_speedup``).
    """
    search = cfg.search
    if not search.needs_latency:
        return None, None
    table = table_for_config(cfg, build=build, progress=progress)
    teacher = None
    if search.speedup is not None or search.objective.target_speedup is not None:
        teacher = teacher_latency_ms(cfg, measure=build)
    return table, teacher
