"""Trial parameters: the flat dict a tuner sends to a trial, and the arch file that stands in
for it outside NNI. This module is the wire format: it defines every ``_``-prefixed key and the
helpers that write (the progressive search, the broker) and read (the trial, the records) them;
no other module spells a key (``tests/test_params.py`` greps the package for strays).

A dict of ``label -> value`` choices plus ``_``-prefixed meta keys written by the progressive
search (:mod:`nni_effbert.strategies.core`): ``_warmup_stage`` (with ``_warmup_steps`` and
``_general_warmup_steps``) marks a stage's warm-up trial; ``_stage``, ``_stage_name``,
``_stage_kind`` and ``_train_steps`` go with a candidate; ``_rescore_of`` (the search's id of
the trial whose arch it scores again) marks a re-score with the next evaluator seed, which
measures the score's own noise (``search.noise_rescores``); ``{"_teacher": true}`` is the trial
that fine-tunes the teacher before the search (when the work directory has none);
``{"_noop": ...}`` is a placeholder (``strategies.nni.broker``); ``_parameter_id`` is in every
dict the broker serves.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import ConfigError
from .io import read_json_object

__all__ = ["META_PREFIX", "WARMUP_KEY", "WARMUP_STEPS_KEY", "GENERAL_WARMUP_STEPS_KEY", "STAGE_KEY", "STAGE_NAME_KEY",
           "STAGE_KIND_KEY", "TRAIN_STEPS_KEY", "RESCORE_OF_KEY", "TEACHER_KEY", "NOOP_KEY", "PARAMETER_ID_KEY", "KNOWN_META",
           "teacher_parameters", "warmup_parameters", "candidate_parameters", "placeholder_parameters",
           "with_parameter_id", "without_parameter_id", "is_meta", "arch_part", "split_parameters", "stage_of",
           "stage_name", "placeholder_reason", "is_warmup", "is_teacher", "is_placeholder", "echoed_ids",
           "split_arch", "int_meta", "read_arch_file", "add_arguments"]

logger = logging.getLogger(__name__)

#: First character of every meta key; every other key is an arch label.
META_PREFIX = "_"
#: Present (the zero-based stage) in a warm-up trial's parameters.
WARMUP_KEY = "_warmup_stage"
#: Warm-up steps of the stage (only when the stage sets ``warmup_steps``).
WARMUP_STEPS_KEY = "_warmup_steps"
#: General-KD warm-up steps of the stage.
GENERAL_WARMUP_STEPS_KEY = "_general_warmup_steps"
#: The zero-based stage of a candidate.
STAGE_KEY = "_stage"
#: The stage's name and kind (warm-up trials; shown in NNI's web UI).
STAGE_NAME_KEY = "_stage_name"
STAGE_KIND_KEY = "_stage_kind"
#: KD steps of a candidate (only when the stage sets ``train_steps``).
TRAIN_STEPS_KEY = "_train_steps"
#: Present in a re-score's parameters: the search's id of the candidate it scores again, with
#: evaluator seed + 1 (``search.noise_rescores``); never a new candidate.
RESCORE_OF_KEY = "_rescore_of"
#: Present (true) in the parameters of the teacher fine-tuning trial.
TEACHER_KEY = "_teacher"
#: Present in a placeholder's parameters: the trial exits at once (``strategies.nni.broker`` serves
#: them to drain NNI's parameter queue).
NOOP_KEY = "_noop"
#: The NNI parameter id, in every parameter dict the progressive search serves.
PARAMETER_ID_KEY = "_parameter_id"
#: Meta keys the trial understands; other ``_`` keys are ignored (logged at debug level).
KNOWN_META = frozenset({WARMUP_KEY, WARMUP_STEPS_KEY, GENERAL_WARMUP_STEPS_KEY, STAGE_KEY, STAGE_NAME_KEY,
                        STAGE_KIND_KEY, TRAIN_STEPS_KEY, RESCORE_OF_KEY, TEACHER_KEY, NOOP_KEY, PARAMETER_ID_KEY})


# -- writing ------------------------------------------------------------------------------------


def teacher_parameters() -> Dict[str, Any]:
    """The teacher fine-tuning trial's parameters."""
    return {TEACHER_KEY: True}


def warmup_parameters(stage: int, name: str, kind: str, general_warmup_steps: Any,
                      warmup_steps: Optional[int] = None, fixed: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A stage's warm-up trial parameters (``warmup_steps`` only when set), plus its fixed labels."""
    params: Dict[str, Any] = {
        WARMUP_KEY: stage,
        STAGE_NAME_KEY: name,
        STAGE_KIND_KEY: kind,
        GENERAL_WARMUP_STEPS_KEY: general_warmup_steps,
    }
    if warmup_steps is not None:
        params[WARMUP_STEPS_KEY] = warmup_steps
    params.update(fixed or {})
    return params


def candidate_parameters(arch: Mapping[str, Any], stage: int, train_steps: Optional[int] = None,
                         rescore_of: Optional[int] = None) -> Dict[str, Any]:
    """A candidate's parameters: its arch labels, its stage, (when set) its KD steps and, for a
    re-score, the id of the trial it scores again."""
    params = dict(arch)
    params[STAGE_KEY] = stage
    if train_steps is not None:
        params[TRAIN_STEPS_KEY] = train_steps
    if rescore_of is not None:
        params[RESCORE_OF_KEY] = int(rescore_of)
    return params


def placeholder_parameters(parameter_id: int, why: str) -> Dict[str, Any]:
    """Parameters of a placeholder trial (nothing to run), with its parameter id."""
    return {NOOP_KEY: why, PARAMETER_ID_KEY: parameter_id}


def with_parameter_id(params: Mapping[str, Any], parameter_id: int) -> Dict[str, Any]:
    """``params`` plus the NNI parameter id the trial echoes back."""
    return {**params, PARAMETER_ID_KEY: parameter_id}


def without_parameter_id(params: Mapping[str, Any]) -> Dict[str, Any]:
    """``params`` as the search proposed them (the parameter id removed)."""
    return {k: v for k, v in params.items() if k != PARAMETER_ID_KEY}


# -- reading ------------------------------------------------------------------------------------


def is_meta(key: Any) -> bool:
    """True for a meta key (not an arch label)."""
    return str(key).startswith(META_PREFIX)


def arch_part(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The arch labels of ``params`` (every key that is not a meta key), without checks."""
    return {k: v for k, v in params.items() if not is_meta(k)}


def split_parameters(parameters: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split trial parameters into ``(arch labels, underscore-prefixed search keys)``."""
    arch = {k: v for k, v in parameters.items() if not k.startswith(META_PREFIX)}
    meta = {k: v for k, v in parameters.items() if k.startswith(META_PREFIX)}
    return arch, meta


def stage_of(params: Mapping[str, Any]) -> Any:
    """The stage of a candidate's (``_stage``) or a warm-up's (``_warmup_stage``) parameters, or None."""
    return params.get(STAGE_KEY, params.get(WARMUP_KEY))


def stage_name(params: Mapping[str, Any], default: Any = None) -> Any:
    """The stage name a warm-up's parameters carry."""
    return params.get(STAGE_NAME_KEY, default)


def placeholder_reason(params: Mapping[str, Any]) -> Any:
    """Why a placeholder was served (its ``_noop`` value)."""
    return params.get(NOOP_KEY)


def is_warmup(params: Mapping[str, Any]) -> bool:
    """True for a stage warm-up trial's parameters."""
    return WARMUP_KEY in params


def is_teacher(params: Mapping[str, Any]) -> bool:
    """True for the teacher fine-tuning trial's parameters (``{"_teacher": true}``)."""
    return bool(params.get(TEACHER_KEY))


def is_placeholder(params: Mapping[str, Any]) -> bool:
    """True for a placeholder trial's parameters (nothing to run)."""
    return NOOP_KEY in params


def echoed_ids(params: Mapping[str, Any]) -> Dict[str, Any]:
    """What a trial adds to its final metric so the search knows which parameters it ran:
    ``{"parameter_id": N}`` (NNI may hand a trial parameters queued for another; see
    ``strategies.nni.broker``), or ``{}`` for parameters without an id (``--arch`` files)."""
    pid = params.get(PARAMETER_ID_KEY)
    return {"parameter_id": pid} if isinstance(pid, int) and not isinstance(pid, bool) else {}


def split_arch(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The architecture part of trial parameters (every key not starting with ``_``)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"trial parameters must be a JSON object, got {type(params).__name__}")
    unknown = sorted(k for k in params if is_meta(k) and k not in KNOWN_META)
    if unknown:
        logger.debug("ignoring trial parameters %s", unknown)
    return arch_part(params)


def int_meta(params: Mapping[str, Any], key: str) -> Optional[int]:
    """An integer meta value (``_stage``, ``_train_steps`` ...), or None when absent."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON round trips may turn 2 into 2.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"trial parameter {key} must be an integer, got {value!r}")
    return value


def read_arch_file(path) -> Dict[str, Any]:
    """Read trial parameters from a JSON file.

    Raises
    ------
    ConfigError
        If the file is missing, not JSON, or not an object.
    """
    return read_json_object(path, "--arch")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trial's own options (``--arch``, ``--stage``, ``--train-steps``, ``--experiment``) to ``parser``."""
    parser.add_argument("--arch", metavar="ARCH.json",
                        help="run these parameters instead of asking NNI (a label -> value JSON object; "
                             "'_'-prefixed keys such as _stage or _warmup_stage are honoured)")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="zero-based stage whose supernet the candidate inherits (overrides _stage; "
                             "default: the latest warmed stage)")
    parser.add_argument("--train-steps", type=int, metavar="N",
                        help="KD steps per candidate (overrides _train_steps and evaluator.train_steps; "
                             "0 scores inherited weights)")
    parser.add_argument("--experiment", metavar="ID",
                        help="use the supernets of this NNI experiment of the work directory (default: inside NNI "
                             "the trial's own experiment; outside NNI the work directory's own warm-ups, "
                             "supernet/stage{N}.pt)")
    return parser
