"""Where an experiment's student starts, as the config asks and as an export records it.

* :func:`warmup_init_mode`: ``warmup.init`` (``teacher`` / ``teacher_embeddings`` / ``random``);
* :func:`start_from_teacher`: the supernet sliced from the teacher, most important units first
  (:func:`~nni_effbert.kd.teacher_init.init_from_teacher`), with the teacher's unit importance
  computed once per work directory (:func:`experiment_importance`, cached under ``cache/``);
* :func:`student_preset`: ``student.preset`` (``teacher``: the teacher's own sizes);
* :func:`student_origin` / :func:`origin_line`: the provenance an export and the report record.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from transformers import AutoConfig
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data.batches import make_loader
from ..errors import ConfigError
from ..io import atomic_save_torch, load_torch
from ..workdir import WorkDir
from .teacher import read_teacher_marker, resolve_teacher
from .teacher_init import (Importance, init_from_teacher, magnitude_importance, taylor_importance,
                           teacher_student_fields)

__all__ = ["TEACHER_PRESET", "warmup_init_mode", "experiment_importance", "start_from_teacher", "student_preset",
           "student_origin", "origin_line"]

logger = logging.getLogger(__name__)



#: ``student.preset`` value that takes the student's sizes from the teacher.
TEACHER_PRESET = "teacher"


def warmup_init_mode(warmup_cfg) -> str:
    """``warmup.init`` with its default: ``teacher_embeddings`` when ``init_embeddings: teacher``."""
    mode = getattr(warmup_cfg, "init", None)
    if mode:
        return str(mode)
    return "teacher_embeddings" if warmup_cfg.init_embeddings == "teacher" else "random"


def _importance_path(setup, method: str, batches: int, batch_size: int, seed: int) -> Path:
    key = json.dumps([setup.teacher_fingerprint, setup.task.fingerprint, method, batches, batch_size, seed])
    return Path(setup.workdir.root) / "cache" / f"importance-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def experiment_importance(setup, *, progress: bool = True) -> Importance:
    """The teacher's unit importance for an experiment (``warmup.importance``), cached in the work directory.

    Taylor importance runs the fine-tuned teacher forward and backward on
    ``warmup.importance_batches`` task batches of ``warmup.batch_size`` (seeded by ``seed``) and
    is stored under ``<workdir>/cache/importance-<key>.pt``, so every stage, process and student
    of the same teacher and data reuses it.
    """
    cfg = setup.cfg
    teacher = setup.teacher_model()
    if cfg.warmup.importance == "magnitude":
        return magnitude_importance(teacher)
    batches, batch_size, seed = int(cfg.warmup.importance_batches), int(cfg.warmup.batch_size), int(cfg.seed)
    path = _importance_path(setup, "taylor", batches, batch_size, seed)
    if path.is_file():
        logger.info("using cached teacher importance %s", path)
        return Importance.from_dict(load_torch(path, "teacher importance"))
    loader = make_loader(setup.task.train, batch_size, True, seed, setup.pad_token_id)
    n = min(batches, len(loader))
    if n < batches:
        logger.warning("Taylor importance: the train split has only %d batches of %d (asked for %d)", n,
                       batch_size, batches)
    bar = tqdm(itertools.islice(loader, n), total=n, desc="teacher importance", disable=not progress, leave=False)
    imp = taylor_importance(teacher, bar, regression=bool(setup.task.spec.is_regression), device=setup.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_torch(imp.to_dict(), path)
    return imp


def start_from_teacher(setup, *, progress: bool = True) -> Dict[str, Any]:
    """``warmup.init: teacher``: initialise ``setup.space.supernet`` from the fine-tuned teacher.

    Returns
    -------
    dict
        :func:`init_from_teacher`'s summary.

    Span QA maps the teacher's ``qa_outputs`` onto the student's span head; its Taylor importance
    uses the start / end positions' cross-entropy.
    """
    imp = experiment_importance(setup, progress=progress)
    return init_from_teacher(setup.space.supernet, setup.teacher_model(), imp, layer_map=setup.cfg.kd.layer_map)


def _teacher_config(cfg: ExperimentConfig):
    """The HF config of the experiment's teacher: the fine-tuned one if there is one, else the base model."""
    teacher_dir = WorkDir.of(cfg).teacher_dir
    source = str(teacher_dir) if read_teacher_marker(teacher_dir) is not None else resolve_teacher(cfg.teacher.model)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"student.preset: teacher: cannot read the teacher's config from {source!r} ({exc})") from None


def student_preset(cfg: ExperimentConfig, teacher_config=None) -> Tuple[str, Dict[str, Any]]:
    """``(preset, overrides)`` for :meth:`EfficientBertSpace.preset` from ``cfg.student``.

    ``student.preset: teacher`` becomes the ``paper`` preset (the dataclass defaults) overridden
    by :func:`teacher_student_fields` of the teacher's config, then by ``student.overrides``
    (e.g. ``{num_hidden_layers: 3}``). Other presets pass through unchanged.
    """
    overrides = dict(cfg.student.overrides)
    if cfg.student.preset != TEACHER_PRESET:
        return cfg.student.preset, overrides
    config = teacher_config if teacher_config is not None else _teacher_config(cfg)
    return "paper", {**teacher_student_fields(config), **overrides}


def student_origin(cfg: ExperimentConfig) -> Dict[str, Any]:
    """How an experiment's students are shaped and started (recorded in exports and reports)."""
    mode = warmup_init_mode(cfg.warmup)
    origin: Dict[str, Any] = {"student_preset": cfg.student.preset, "student_overrides": dict(cfg.student.overrides),
                              "warmup_init": mode}
    if cfg.warmup.checkpoint:
        origin["warmup_init"] = f"warmup.checkpoint {cfg.warmup.checkpoint}"
    elif mode == "teacher":
        origin["importance"] = cfg.warmup.importance
        if cfg.warmup.importance == "taylor":
            origin["importance_batches"] = int(cfg.warmup.importance_batches)
    return origin


def origin_line(origin: Mapping[str, Any]) -> str:
    """One sentence naming the student preset and the supernet init of :func:`student_origin`."""
    overrides = origin.get("student_overrides") or {}
    preset = f"`{origin.get('student_preset')}`" + (f" with overrides `{json.dumps(overrides, sort_keys=True)}`"
                                                    if overrides else "")
    init = f"`{origin.get('warmup_init')}`"
    if origin.get("importance"):
        init += f" ({origin['importance']} importance"
        init += f" on {origin['importance_batches']} task batches)" if origin.get("importance_batches") else ")"
    return f"Student preset {preset}; supernet init {init}."
