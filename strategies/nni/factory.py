"""Build a search from ``nnictl`` ``classArgs``, shared by the advisor and the tuner.

``classArgs`` (all optional, all keyword-only):

``config``
    Path to the experiment YAML (``effbert.yml``). The student space comes from its
    ``student`` section and the search settings from its ``search`` section. Loaded with
    :func:`nni_effbert.config.load_config` (paths not checked: the dispatcher does not need the
    teacher or the data). A relative path is resolved against the experiment's
    ``trialCodeDirectory``, as the trials' own ``--config effbert.yml`` is, and NNI resolves a
    relative ``trialCodeDirectory`` against the nnictl config's folder; so with
    ``trialCodeDirectory: .`` it is relative to the nnictl config file (see
    :func:`resolve_config_path`). When the work directory it names has no fine-tuned teacher,
    the search's first trial fine-tunes it (``{"_teacher": true}``).
``preset`` / ``space_overrides``
    Without ``config``: ``EfficientBertSpace.preset(preset, **space_overrides)``
    (default preset ``quickstart``).
``search``
    A mapping of :class:`~nni_effbert.strategies.stages.SearchConfig` fields. With ``config`` it overrides that
    file's ``search`` section key by key (``stages`` is replaced as a whole).
``state_path``
    Where to keep the search state JSON. Default: NNI's checkpoint folder of the experiment
    (``$NNI_CHECKPOINT_DIRECTORY``, what ``nnictl resume`` restores), else not persisted.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from nni_effbert.config import each_task, load_config
from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.workdir import WorkDir

from ..core import ProgressiveSearch
from ..search_errors import SearchConfigError
from ..stages import SearchConfig
from .broker import STATE_FILE, TrialBroker

__all__ = ["CLASS_ARGS", "build_space_and_search", "build_broker", "check_search_space", "default_state_path",
           "nni_experiment_params", "resolve_config_path", "needs_teacher_trial"]

logger = logging.getLogger(__name__)

#: The ``classArgs`` both nnictl adapters accept.
CLASS_ARGS = ("config", "preset", "space_overrides", "search", "state_path")


def nni_experiment_params(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """The experiment config NNI 3.0 gave this dispatcher process, or None outside one.

    NNI's manager starts a tuner or advisor as ``python -m nni --exp_params <base64 JSON>``
    (``nni_node/common/utils.js: getMsgDispatcherCommand``, read back by ``nni/__main__.py``).
    The JSON is the canonical experiment config (v2 field names, ``searchSpace`` left out) in
    which NNI has already made every path field absolute against the nnictl config's folder:
    ``trialCodeDirectory``, ``searchSpaceFile``, ``experimentWorkingDirectory``,
    ``tuner.codeDirectory``. The config file's own path is not passed, nor is the folder
    ``nnictl`` was started in (the dispatcher runs in the experiment's log folder).
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--exp_params")
    args, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if not args.exp_params:
        return None
    try:
        params = json.loads(base64.b64decode(args.exp_params).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as err:
        logger.warning("cannot decode NNI's --exp_params (%s); relative paths resolve against %s", err, os.getcwd())
        return None
    return params if isinstance(params, dict) else None


def resolve_config_path(config: Any, exp_params: Optional[Mapping[str, Any]] = None) -> Any:
    """``classArgs.config`` as a path the dispatcher can open.

    Absolute paths are kept. A relative one is resolved against the experiment's
    ``trialCodeDirectory`` (from :func:`nni_experiment_params`): the folder the trials run in,
    where their ``--config effbert.yml`` resolves too, so the advisor and the trials read the
    same file. NNI resolves a relative ``trialCodeDirectory`` against the nnictl config's folder,
    so with the examples' ``trialCodeDirectory: .`` the path is relative to the nnictl config
    file. Outside NNI (tests, Python) it is relative to the working directory.
    """
    if not isinstance(config, (str, os.PathLike)) or Path(config).is_absolute():
        return config
    params = nni_experiment_params() if exp_params is None else exp_params
    base = (params or {}).get("trialCodeDirectory")
    if isinstance(base, str) and base:
        return str(Path(base) / config)
    return config


def needs_teacher_trial(config: Any) -> bool:
    """True when ``classArgs.config`` names a work directory without a fine-tuned teacher (for a
    multi-task config: a task without one)."""
    if config is None:
        return False
    cfg = load_config(config, check_paths=False)
    return not all(WorkDir.of(one).teacher_marker.is_file() for _, one in each_task(cfg))


def build_space_and_search(config: Optional[str] = None, preset: Optional[str] = None,
                           space_overrides: Optional[Mapping[str, Any]] = None,
                           search: Optional[Mapping[str, Any]] = None) -> Tuple[Any, SearchConfig]:
    """The space and the search settings named by ``classArgs`` (see the module docstring).

    Raises
    ------
    SearchConfigError
        On contradicting or malformed arguments (the message names the argument).
    nni_effbert.errors.ConfigError
        When the experiment YAML is invalid.
    """

    if search is not None and not isinstance(search, Mapping):
        raise SearchConfigError(f"classArgs.search must be a mapping of search settings, got {type(search).__name__}")
    if space_overrides is not None and not isinstance(space_overrides, Mapping):
        raise SearchConfigError(f"classArgs.space_overrides must be a mapping of EfficientBertConfig fields, "
                                f"got {type(space_overrides).__name__}")
    if config is not None:
        if preset is not None or space_overrides:
            raise SearchConfigError("classArgs: give either config (the experiment YAML, whose student section "
                                    "defines the space) or preset/space_overrides, not both")
        given, config = config, resolve_config_path(config)
        if not isinstance(config, (str, os.PathLike)) or not Path(config).is_file():
            where = "" if given == config else f", resolved against trialCodeDirectory to {str(config)!r}"
            raise SearchConfigError(f"classArgs.config: experiment config file not found: {given!r}{where} (give "
                                    f"the path of effbert.yml, absolute or relative to trialCodeDirectory)")

        cfg = load_config(config, check_paths=False)
        preset, overrides = cfg.student.preset, dict(cfg.student.overrides)
        if preset == "teacher":
            # local: kd imports transformers and datasets (seconds); the nnictl tuner must connect in 10 s
            from nni_effbert.kd.student_start import student_preset

            preset, overrides = student_preset(cfg)  # the teacher's sizes, then the overrides
        space = EfficientBertSpace.preset(preset, **overrides)
        data = cfg.search.to_dict()
        data.update(dict(search or {}))
        return space, SearchConfig.from_dict(data)
    try:
        space = EfficientBertSpace.preset(preset or "quickstart", **dict(space_overrides or {}))
    except (ValueError, TypeError) as err:
        raise SearchConfigError(f"classArgs.preset/space_overrides: {err}") from err
    return space, SearchConfig.from_dict(dict(search or {}))


def check_search_space(space: Any, search_space: Optional[Mapping[str, Any]]) -> None:
    """Check that the ``searchSpace`` of an nnictl config matches the space of ``classArgs``.

    The tuner builds its space from ``classArgs``; NNI's ``searchSpace`` only has to agree with
    it (``space.nni_search_space()``) or be empty.

    Raises
    ------
    SearchConfigError
        Naming the labels that differ.
    """
    if not search_space:
        return
    if not isinstance(search_space, Mapping):
        raise SearchConfigError(f"searchSpace must be a mapping of label -> choice, got {type(search_space).__name__}")
    expected = space.nni_search_space()
    missing = sorted(set(expected) - set(search_space))
    extra = sorted(set(search_space) - set(expected))
    differ = sorted(l for l in set(expected) & set(search_space)
                    if list(search_space[l].get("_value", [])) != list(expected[l]["_value"])
                    or search_space[l].get("_type") != "choice")
    if missing or extra or differ:
        raise SearchConfigError(
            "searchSpace of the nnictl config does not match the space of the tuner's classArgs "
            f"(missing labels: {missing[:5]}, unknown labels: {extra[:5]}, other choices: {differ[:5]}); "
            "write it with space.nni_search_space() of the same preset, or leave searchSpace out")


def default_state_path(state_path: Optional[str]) -> Optional[Path]:
    """``state_path`` if given, else ``$NNI_CHECKPOINT_DIRECTORY/progressive_search.json``."""
    if state_path is not None:
        return Path(state_path)
    ckpt = os.environ.get("NNI_CHECKPOINT_DIRECTORY")
    if ckpt and os.path.isdir(ckpt):
        return Path(ckpt) / STATE_FILE
    logger.warning("no NNI checkpoint folder and no classArgs.state_path: the search state is not persisted, "
                   "so `nnictl resume` would restart the search")
    return None


def build_broker(config: Optional[str] = None, preset: Optional[str] = None,
                 space_overrides: Optional[Mapping[str, Any]] = None, search: Optional[Mapping[str, Any]] = None,
                 state_path: Optional[str] = None) -> TrialBroker:
    """Space, settings, search core and broker from ``classArgs``."""
    space, settings = build_space_and_search(config, preset, space_overrides, search)
    latency_fn, teacher_ms = None, None
    if settings.needs_latency:
        if config is None:
            raise SearchConfigError("classArgs: a latency budget or objective needs classArgs.config (the experiment "
                                    "YAML, whose work directory holds the latency table)")
        # local: the latency table pulls in transformers and scipy; NNI gives its dispatcher 10 s to
        # connect, so searches without a latency budget or objective must not pay for the import.
        from nni_effbert.latency.targets import search_latency

        cfg = load_config(config, check_paths=False)
        cfg.search = settings
        # `nni-effbert search` builds the table before nnictl starts; building here is the fallback.
        latency_fn, teacher_ms = search_latency(cfg, build=True, progress=False)
    teacher = needs_teacher_trial(resolve_config_path(config))
    if teacher:
        logger.info("no fine-tuned teacher in the work directory: the first trial fine-tunes it")
    core = ProgressiveSearch(space, settings, np.random.RandomState(settings.seed), latency_fn=latency_fn,
                             teacher_latency_ms=teacher_ms, teacher_trial=teacher)
    return TrialBroker(core, default_state_path(state_path))
