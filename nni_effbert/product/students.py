"""The students a search produces: the best trial (or a known arch) exported with supernet
weights.

:func:`export_best` and :func:`export_arch` are ``nni-effbert export``; :func:`export_trial_arch`
exports any trial's arch (``fidelity``, the baselines of :mod:`.baselines`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from ..config import ExperimentConfig
from ..errors import CheckpointError
from ..io import load_json
from ..kd.student_start import student_origin
from ..nas.kd_evaluator import KDEvaluator
from ..params import arch_part, read_arch_file
from ..nas.ranking import best_trial, rescore_pairs, stage_tie_margin
from ..nas.records import read_nni_trials
from ..workdir import WorkDir
from .export import check_replaceable, export_student

__all__ = [
    "SEARCHED",
    "ExportInfo",
    "export_best",
    "export_arch",
    "export_trial_arch",
    "export_from_supernet",
    "export_loaded",
    "best_of_experiment",
    "experiments_dir_of",
    "supernet_experiment",
    "keep_previous_export",
]

logger = logging.getLogger(__name__)

#: Default export names inside ``<workdir>/exports``.
SEARCHED = "searched"


@dataclass
class ExportInfo:
    """What an export wrote.

    Attributes
    ----------
    path : Path
        The export folder.
    arch : dict
    params, non_embedding_params : int
    source : str
        Where the weights came from (``stage 2 supernet``).
    trial : dict or None
        The best trial it was taken from (``--experiment``).
    """

    path: Path
    arch: Dict[str, Any]
    params: int
    non_embedding_params: int
    source: str
    trial: Optional[Dict[str, Any]] = None


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_from_supernet(evaluator, arch: Dict[str, Any], stage: Optional[int], name: str, extra: Dict[str, Any], *,
            force: bool) -> ExportInfo:
    """Export ``arch`` with the supernet weights of ``stage`` into ``exports/<name>``.

    An existing ``exports/<name>`` is replaced only with ``force`` (every caller says which it
    means): without it :class:`~nni_effbert.product.export.ExportExistsError` names what would be
    lost, before any weight is loaded.
    """

    check_replaceable(WorkDir.of(evaluator.cfg).export_dir(name), force=force)  # before the teacher loads
    setup = evaluator.setup
    source = evaluator.load_stage(stage)
    if "random initialisation" in source:
        # A student sliced from an untrained supernet is not a searched result: refuse rather than
        # export random weights under a searched name.
        raise CheckpointError(
            "no warmed-up supernet to take the student's weights from; run the search (or "
            "`nni-effbert warmup -c <config>`) first"
        )
    arch = evaluator.validate_arch(arch)
    meta = {**extra, "supernet": source, "supernet_stage": evaluator._loaded_stage,
            "supernet_experiment": evaluator.experiment, "origin": student_origin(setup.cfg)}
    if evaluator.supernet is not None:
        meta["supernet_checkpoint"] = evaluator.supernet
    return export_loaded(setup, arch, name, meta, source)


def export_loaded(setup, arch: Dict[str, Any], name: str, meta: Dict[str, Any], source: str) -> ExportInfo:
    """Slice ``arch`` from the weights ``setup.space`` holds now into ``<setup's workdir>/exports/<name>``
    (``meta`` goes into the export record, with the student's origin). The caller loaded the weights
    and checked that the folder may be replaced."""
    space = setup.space
    out = setup.workdir.export_dir(name)
    meta = dict(meta)
    meta.setdefault("origin", student_origin(setup.cfg))
    export_student(space, arch, space, out, tokenizer=setup.tokenizer, task=setup.task.spec, extra_meta=meta)
    return ExportInfo(path=out, arch=arch, params=int(space.count_params(arch)),
                      non_embedding_params=int(space.count_params(arch, exclude_embeddings=True)), source=source)


def keep_previous_export(cfg: ExperimentConfig, name: str) -> Optional[Path]:
    """Move an existing ``exports/<name>`` aside, to ``exports/<name>-<its experiment>`` (or
    ``-previous``, numbered when taken), so that a pipeline rerun exports its new student under the
    usual name without destroying the previous (perhaps distilled) one. Returns the new place,
    or None when there was nothing to move."""
    wd = WorkDir.of(cfg)
    folder = wd.export_dir(name)
    if not (folder.exists() or folder.is_symlink()):
        return None
    try:
        meta = load_json(folder / "export_meta.json", "export metadata")
    except CheckpointError:
        meta = {}
    tag = str(((meta or {}).get("extra") or {}).get("experiment") or "previous") if isinstance(meta, dict) else "previous"
    target, n = wd.export_dir(f"{name}-{tag}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = wd.export_dir(f"{name}-{tag}-{n}")
    os.replace(folder, target)
    logger.warning("kept the previous export %s as %s (the new one takes its name)", folder, target)
    return target


def experiments_dir_of(cfg: ExperimentConfig, given: Optional[str]) -> Optional[str]:
    """``given``, else ``<workdir>/nni-experiments`` where ``nni-effbert search`` keeps NNI's
    experiment folders (found even when NNI's manifest in the home folder does not list them)."""
    if given:
        return given

    folder = WorkDir.of(cfg).root / "nni-experiments"
    return str(folder) if folder.is_dir() else None


def best_of_experiment(cfg: ExperimentConfig, experiment: str,
                       experiments_dir: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The best succeeded trial of an NNI experiment (:func:`~nni_effbert.nas.ranking.best_trial` under
    the stage's tie margin) and what its export records of the pick (trial, stage, the margin and
    how many re-scores measured it)."""
    trials = read_nni_trials(experiment, experiments_dir=experiments_dir_of(cfg, experiments_dir))
    margin = float(cfg.search.tie_margin or 0.0)
    best = best_trial(trials, experiment=experiment, tie_margin=margin)
    stage = best["stage"]
    return best, {"source": "experiment", "experiment": experiment, "trial_id": best["trial_id"],
                  "trial_metric": best["metric"], "stage": stage, "stage_name": best["stage_name"],
                  "tie_margin": stage_tie_margin(trials, stage, margin),
                  "tie_margin_rescores": len(rescore_pairs(trials, stage)) if stage is not None else 0}


def export_best(cfg: ExperimentConfig, experiment: str, *, name: str = SEARCHED, experiments_dir: Optional[str] = None,
                progress: bool = True, evaluator=None, force: bool = False) -> ExportInfo:
    """Export the best succeeded trial of an NNI experiment.

    An existing ``exports/<name>`` (a distilled student, say) is replaced only with ``force``.

    The trial is :func:`~nni_effbert.nas.ranking.best_trial` (last stage with results, highest search
    score, then fewest parameters; among trials within the stage's tie margin of the highest score,
    the cheapest: ``search.tie_margin``, or the margin the stage's re-scores measured under
    ``search.noise_rescores``); its weights are sliced from that stage's supernet. The export's
    record says which margin (``tie_margin``) and from how many re-scores (``tie_margin_rescores``).

    Raises
    ------
    ExperimentNotFoundError
        Unknown experiment id.
    NoSucceededTrialError
        No succeeded trial with a finite metric.
    CheckpointError
        The stage's supernet checkpoint of this experiment is missing (never another
        experiment's: :mod:`~nni_effbert.nas.supernets`).
    """

    best, extra = best_of_experiment(cfg, experiment, experiments_dir)
    # Where the trial's weights came from: a trial records it (supernet_source) since the
    # evaluator states it; NNI's strategies score on the work directory's (or a named) supernet.
    source = (best.get("final") or {}).get("supernet_source")
    if isinstance(source, Mapping) and source.get("source") in ("workdir", "experiment", "checkpoint"):
        evaluator = evaluator or KDEvaluator(cfg, progress=progress, supernet=dict(source))
        evaluator.use_supernet(dict(source))
    else:  # older trials: the weights come from this experiment's supernets, whoever built it
        evaluator = evaluator or KDEvaluator(cfg, progress=progress, experiment=experiment)
        evaluator.experiment = experiment
    info = export_from_supernet(evaluator, dict(best["arch"] or {}), best["stage"], name, extra, force=force)
    info.trial = best
    return info


def export_arch(cfg: ExperimentConfig, arch_file: str, *, name: str = SEARCHED, stage: Optional[int] = None,
                progress: bool = True, evaluator=None, experiment: Optional[str] = None,
                force: bool = False) -> ExportInfo:
    """Export the architecture of a JSON file (``label -> value``) with supernet weights.

    ``stage`` picks the supernet checkpoint (default: the latest one); ``experiment`` whose
    supernets (default: the work directory's own warm-ups, see :mod:`~nni_effbert.nas.supernets`).
    An existing ``exports/<name>`` is replaced only with ``force``.
    """

    data = read_arch_file(arch_file)
    arch = arch_part(data)
    evaluator = evaluator or KDEvaluator(cfg, progress=progress, experiment=experiment)
    extra = {"source": "arch file", "arch_file": str(Path(arch_file).absolute())}
    if experiment:
        extra["experiment"] = experiment
    return export_from_supernet(evaluator, arch, stage, name, extra, force=force)


def supernet_experiment(meta) -> Optional[str]:
    """The experiment whose supernets an export was sliced from (``export_meta.json``): recorded
    since supernets are kept per experiment; for older exports the experiment it was taken from."""
    extra = (meta or {}).get("extra") or {}
    if "supernet_experiment" in extra:
        return extra["supernet_experiment"]
    return extra.get("experiment")


def export_trial_arch(cfg: ExperimentConfig, arch: Dict[str, Any], stage: Optional[int], name: str, *,
                      extra: Optional[Dict[str, Any]] = None,
                      progress: bool = True, evaluator=None, force: bool = False) -> ExportInfo:
    """Export a trial's ``arch`` with the supernet weights of its ``stage`` into ``exports/<name>``
    (what ``nni-effbert export --experiment`` does for the best trial; ``nni-effbert fidelity``
    does it for each sampled candidate). An existing ``exports/<name>`` is replaced only with ``force``."""

    evaluator = evaluator or KDEvaluator(cfg, progress=progress)
    return export_from_supernet(evaluator, dict(arch), stage, name, dict(extra or {}), force=force)
