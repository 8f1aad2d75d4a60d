"""Trial parameters: the flat dict a tuner sends to a trial, and the arch file that stands in
for it outside NNI.

A dict of ``label -> value`` choices plus ``_``-prefixed meta keys written by the progressive
search (:mod:`nni_effbert.strategies.core`): ``_warmup_stage`` (with ``_warmup_steps`` and
``_general_warmup_steps``) marks a stage's warm-up trial; ``_stage``, ``_stage_name``,
``_stage_kind`` and ``_train_steps`` go with a candidate; ``{"_teacher": true}`` is the trial
that fine-tunes the teacher before the search (when the work directory has none).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Mapping, Optional

from .errors import ConfigError
from .io import read_json_object

__all__ = ["WARMUP_KEY", "TEACHER_KEY", "NOOP_KEY", "PARAMETER_ID_KEY", "KNOWN_META", "is_warmup", "is_teacher",
           "is_placeholder", "echoed_ids", "split_arch", "int_meta", "read_arch_file", "add_arguments"]

logger = logging.getLogger(__name__)

#: Present (the zero-based stage) in a warm-up trial's parameters.
WARMUP_KEY = "_warmup_stage"
#: Present (true) in the parameters of the teacher fine-tuning trial.
TEACHER_KEY = "_teacher"
#: Meta keys the trial understands; other ``_`` keys are ignored (logged at debug level).
#: Present in a placeholder's parameters: the trial exits at once (``strategies.broker`` serves
#: them to drain NNI's parameter queue).
NOOP_KEY = "_noop"
#: The NNI parameter id, in every parameter dict the progressive search serves.
PARAMETER_ID_KEY = "_parameter_id"
KNOWN_META = frozenset({"_warmup_stage", "_warmup_steps", "_general_warmup_steps", "_stage", "_stage_name",
                        "_stage_kind", "_train_steps", "_teacher", NOOP_KEY, PARAMETER_ID_KEY})


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
    ``strategies.broker``), or ``{}`` for parameters without an id (``--arch`` files)."""
    pid = params.get(PARAMETER_ID_KEY)
    return {"parameter_id": pid} if isinstance(pid, int) and not isinstance(pid, bool) else {}


def split_arch(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The architecture part of trial parameters (every key not starting with ``_``)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"trial parameters must be a JSON object, got {type(params).__name__}")
    unknown = sorted(k for k in params if str(k).startswith("_") and k not in KNOWN_META)
    if unknown:
        logger.debug("ignoring trial parameters %s", unknown)
    return {k: v for k, v in params.items() if not str(k).startswith("_")}


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
