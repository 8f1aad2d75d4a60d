"""``nni-effbert search``: run the progressive search through NNI's experiment manager.

Two paths, one result (:class:`SearchResult`):

``nnictl`` (default)
    :func:`run_search` saves the resolved experiment config into the work directory
    (``<workdir>/config.yml``), writes an ``nnictl create`` config beside it
    (``<workdir>/nnictl/nnictl.yml``, see :func:`nnictl_config`), registers the
    ``EfficientBertProgressive`` advisor with NNI if needed and runs ``nnictl create``. Every
    trial is ``python -m nni_effbert.trial --config <workdir>/config.yml``: stage warm-ups
    are trials of their own, visible in the web UI. NNI's experiment folders go to
    ``<workdir>/nni-experiments`` (NNI's manifest of experiment ids stays in
    ``~/nni-experiments/.experiment``, where ``nnictl`` and :func:`~nni_effbert.nas.records.read_nni_trials`
    look them up). With ``wait=True`` it polls ``/api/v1/nni/check-status`` until the
    experiment ended, stops it (freeing the port; its records stay readable by id) and
    returns the trials.

``python=True``
    ``NasExperiment(space, KDEvaluator(cfg).as_nni_evaluator(), ProgressiveStrategy(...))``
    with NNI's training-service execution engine and the ``simplified`` model format: the
    NNI manager runs every candidate as a trial process (web UI as above), while the stage
    warm-ups run **inside this process**, through ``warmup_fn=KDEvaluator.warmup``, while no
    candidate runs. A NAS experiment always blocks until the strategy is done, whatever
    ``wait`` says. NNI stores a NAS trial's parameters as a serialised model, which
    :func:`~nni_effbert.nas.records.read_nni_trials` cannot read as an arch, so the strategy's records (arch,
    stage, status, final metric dict from the evaluator's ``trials/<id>/result.json``) are
    also written to ``<workdir>/trials.json`` as ``{"experiment_id", "trials": [...]}`` with
    :mod:`~nni_effbert.nas.records` trial dicts.
"""
from __future__ import annotations

from typing import Optional

from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.strategies.core import ProgressiveSearch

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..latency.targets import search_latency
from .experiments import (
    EXPERIMENTS_DIR,
    NNICTL_DIR,
    TERMINAL_TRIAL_STATUSES,
    TRIALS_FILE,
    SearchError,
    SearchResult,
    format_trials,
    free_port,
)
from .nnictl_search import nnictl_config, run_nnictl, write_nnictl_config
from .python_search import run_python

__all__ = [
    "SearchError",
    "SearchResult",
    "NNICTL_DIR",
    "EXPERIMENTS_DIR",
    "TRIALS_FILE",
    "TERMINAL_TRIAL_STATUSES",
    "free_port",
    "nnictl_config",
    "write_nnictl_config",
    "run_search",
    "format_trials",
]

def check_latency_search(cfg: ExperimentConfig, *, progress: bool = True) -> None:
    """Build the latency table a latency budget or objective needs, and refuse a budget no arch can
    meet, before NNI starts (the tuner in NNI's dispatcher then finds the table).

    Without a latency budget or objective nothing is built (tests and quick searches stay fast);
    trials still report ``predicted_latency_ms`` whenever the work directory has a complete table
    for their settings (``nni-effbert latency -c CONFIG``).
    """
    if not cfg.search.needs_latency:
        return
    table, teacher_ms = search_latency(cfg, build=True, progress=progress)
    space = EfficientBertSpace.preset(cfg.student.preset, **dict(cfg.student.overrides))
    ProgressiveSearch(space, cfg.search, latency_fn=table, teacher_latency_ms=teacher_ms)  # raises BudgetError


def run_search(cfg: ExperimentConfig, *, config_path: Optional[str], wait: bool, python: bool = False,
               port: Optional[int] = None,
               progress: bool = True, timeout: Optional[float] = None, resume: Optional[str] = None) -> SearchResult:
    """Run the progressive search of an experiment through NNI (see the module docstring).

    Parameters
    ----------
    cfg : ExperimentConfig
    config_path : str, optional
        The YAML it was loaded from (for messages).
    wait : bool
        Block until the experiment ended, then stop it and return its trials (nnictl path;
        the ``python`` path always blocks).
    python : bool
        Run ``NasExperiment`` in this process instead of ``nnictl create``.
    port : int, optional
        Web UI / REST port (default: a free one).
    progress : bool
        A progress bar over trials ended / total.
    timeout : float, optional
        With ``wait``: give up (and stop the experiment) after this many seconds.
    resume : str, optional
        Resume this stopped experiment of the work directory instead of creating one
        (``nnictl resume``, or ``NasExperiment.resume`` with ``python``): the strategy goes on
        with its saved history; finished trials are not re-run, warm-ups not redone.

    Returns
    -------
    SearchResult

    Raises
    ------
    CheckpointError
        No fine-tuned teacher in the work directory.
    SearchError
        ``nnictl create`` failed, or the manager stopped answering.
    """
    if port is not None and not (0 < int(port) < 65536):
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    check_latency_search(cfg, progress=progress)
    if python:
        return run_python(cfg, config_path, port=port, progress=progress, resume=resume)
    return run_nnictl(cfg, config_path, wait=wait, port=port, progress=progress, timeout=timeout, resume=resume)


