"""Supernet checkpoints: their format, reading and writing, which experiment owns one, and
which checkpoint a reader may use (the paths are :class:`~nni_effbert.workdir.WorkDir`'s).

A stage's warmed supernet belongs to the NNI experiment whose warm-up trial wrote it. Two
searches in one work directory (one after the other, or on purpose at once) must never read
or overwrite each other's weights, so:

* checkpoints live in a folder per experiment: ``supernet/<experiment id>/stage{N}.pt`` (with
  its ``.resume.pt`` state and ``.lock``);
* every checkpoint carries its owner: ``{"experiment": id, "trial": warm-up trial id, "pid",
  "host"}``; every reader checks it against the experiment it reads for
  (:func:`check_owner`), so a file copied or moved to another experiment's folder is refused.

The experiment key (:func:`experiment_key`):

* an explicit ``--experiment ID`` (``nni-effbert warmup`` / ``trial`` / ``export``), else
* ``$NNI_EXP_ID``, which NNI sets in every trial process (what ``nni.get_experiment_id()``
  returns there; read from the environment so that nothing here imports nni), else
* None: a warm-up or trial run by hand outside NNI. Its supernets are the work directory's
  own, ``supernet/stage{N}.pt``, with owner experiment None; no experiment ever reads them.

Where a :class:`~.evaluator.KDEvaluator` takes its supernet (``supernet=``, :func:`supernet_source`):

* ``"workdir"``: the work directory's own warm-ups (``supernet/stage{N}.pt``, written by
  ``nni-effbert warmup -c CONFIG --stage N``), whatever experiment the trial runs in;
* an experiment id: that experiment's supernets (``supernet/<id>/stage{N}.pt``);
* a checkpoint path (``*.pt``): that file, whichever stage asks;
* ``"own"``: the supernets of the experiment the trial runs in (``$NNI_EXP_ID``), which
  the progressive strategy's warm-ups write;
* ``"auto"`` (default): the evaluator's :func:`experiment_key` (``--experiment``, else
  ``$NNI_EXP_ID``, else the work directory's). Inside a ``NasExperiment``,
  :class:`~.nni_evaluator.StageAwareEvaluator` replaces it, per sample, by ``"own"`` when
  the progressive strategy sent the sample (it carries ``_stage``) and by ``"workdir"``
  otherwise (any other strategy), before the trial is submitted.

The choice travels to the trial as a dict (``{"source": "workdir"}``, ``{"source":
"experiment", "experiment": ID}``, ``{"source": "checkpoint", "path": ...}``, ``{"source":
"own"}``), and the trial's final metric records what it resolved to (``supernet_source``).

Work directories from before this layout hold ``supernet/stage{N}.pt`` without an owner.
An experiment that has no supernet folder of its own (it ran before the change) reads those,
with a note logged once per file and process: which experiment wrote them is not recorded.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Set, Tuple

import torch

from nni_effbert.search_spaces.space_config import config_differences

from ..errors import CheckpointError, ConfigError
from ..io import atomic_save_torch, load_torch
from ..workdir import EXPERIMENT_ID, WorkDir, check_experiment_id

if TYPE_CHECKING:
    from ..kd.setup import KDSetup
    from .warmup import WarmupPlan

__all__ = ["EXPERIMENT_ENV", "SUPERNET_FORMAT", "SUPERNET_SOURCES", "experiment_key", "owner", "resolve_checkpoint",
           "check_owner", "describe_key", "read_supernet_checkpoint", "load_supernet_checkpoint", "checkpoint_payload",
           "write_supernet_checkpoint", "supernet_source"]

logger = logging.getLogger(__name__)

#: Set by NNI in every trial process (and by nni-effbert's ``--python`` search for its warm-ups).
EXPERIMENT_ENV = "NNI_EXP_ID"
_TRIAL_ENV = "NNI_TRIAL_JOB_ID"
_noted: Set[str] = set()

#: Version of the supernet checkpoint layout.
SUPERNET_FORMAT = 1
_KIND = "nni-effbert-supernet"


def experiment_key(explicit: Optional[str] = None) -> Optional[str]:
    """The experiment whose supernets this process reads and writes (see the module docstring).

    Raises
    ------
    ConfigError
        If ``explicit`` is not an experiment id (letters, digits, ``_`` and ``-``).
    """
    if explicit:
        return check_experiment_id(str(explicit))
    env = os.environ.get(EXPERIMENT_ENV, "")
    if env and env.upper() != "STANDALONE" and EXPERIMENT_ID.fullmatch(env):
        return env
    return None


#: The ``source`` values of :func:`supernet_source`.
SUPERNET_SOURCES = ("auto", "own", "workdir", "experiment", "checkpoint")


def supernet_source(value: Any) -> Dict[str, Any]:
    """Normalise ``KDEvaluator(supernet=...)`` into the dict trials carry (module docstring).

    Parameters
    ----------
    value : None, str, path or dict
        None / ``"auto"``, ``"own"``, ``"workdir"``, an experiment id, a checkpoint path
        (a ``Path``, or a string ending in ``.pt`` or holding a path separator), or a dict
        this function returned.

    Raises
    ------
    ConfigError
        If ``value`` is none of these (one line, naming what is accepted).
    """
    accepted = ("supernet= takes 'workdir' (the work directory's warm-ups), an experiment id, a checkpoint path "
                "(*.pt), 'own' (the running experiment's warm-ups) or 'auto'")
    if value is None:
        return {"source": "auto"}
    if isinstance(value, Mapping):
        kind = value.get("source")
        if kind in ("auto", "own", "workdir"):
            return {"source": kind}
        if kind == "experiment" and isinstance(value.get("experiment"), str) and EXPERIMENT_ID.fullmatch(value["experiment"]):
            return {"source": kind, "experiment": value["experiment"]}
        if kind == "checkpoint" and isinstance(value.get("path"), str) and value["path"]:
            return {"source": kind, "path": value["path"]}
        raise ConfigError(f"supernet={dict(value)!r} is not a supernet source; {accepted}")
    if isinstance(value, os.PathLike):
        return {"source": "checkpoint", "path": str(Path(value).expanduser().absolute())}
    if isinstance(value, str):
        if value in ("auto", "own", "workdir"):
            return {"source": value}
        if value.endswith(".pt") or os.sep in value or "/" in value:
            return {"source": "checkpoint", "path": str(Path(value).expanduser().absolute())}
        if EXPERIMENT_ID.fullmatch(value):
            return {"source": "experiment", "experiment": value}
    raise ConfigError(f"supernet={value!r} is not a supernet source; {accepted}")


def describe_key(experiment: Optional[str]) -> str:
    """``experiment X`` or ``no experiment (the work directory's own warm-ups)`` for messages."""
    return f"experiment {experiment}" if experiment else "no experiment (warm-ups run by hand)"


def owner(experiment: Optional[str]) -> Dict[str, Any]:
    """The owner record a new checkpoint carries."""
    trial = os.environ.get(_TRIAL_ENV) or None
    return {"experiment": experiment, "trial": trial, "pid": os.getpid(), "host": socket.gethostname()}


def resolve_checkpoint(wd: WorkDir, stage: int, experiment: Optional[str]) -> Tuple[Path, bool]:
    """``(path, legacy)``: the checkpoint of ``stage`` that ``experiment`` reads.

    The experiment's own ``supernet/<id>/stage{N}.pt``; for an experiment with no supernet
    folder at all (it ran before checkpoints were keyed), the old ``supernet/stage{N}.pt``
    (``legacy`` True). The path may not exist: the caller decides what a missing one means.
    """
    own = wd.supernet_checkpoint(stage, experiment)
    if experiment is None or own.is_file() or wd.supernet_folder(experiment).is_dir():
        return own, False
    old = wd.supernet_checkpoint(stage)
    return (old, True) if old.is_file() else (own, False)


def latest_stage(wd: WorkDir, experiment: Optional[str], up_to_stage: Optional[int] = None) -> Optional[int]:
    """Highest stage ``<= up_to_stage`` with a checkpoint ``experiment`` may read, or None."""
    found = wd.latest_supernet_checkpoint(up_to_stage, experiment)
    if found is None and experiment is not None and not wd.supernet_folder(experiment).is_dir():
        found = wd.latest_supernet_checkpoint(up_to_stage)  # an experiment from before the layout
    return found


def check_owner(data: Mapping[str, Any], path: Path, experiment: Optional[str], *, what: str,
                missing: Optional[str] = None) -> None:
    """Refuse a checkpoint that belongs to another experiment than ``experiment``.

    A checkpoint without an owner predates the layout: it is read as before, with a note
    (once per file and process). ``missing`` (the message of :func:`missing_message`) is raised
    instead for an old-layout path that turns out to hold a new, owned checkpoint: the
    experiment's own supernet is then simply not there.

    Raises
    ------
    CheckpointError
        Naming the owner and the experiment it was read for.
    """
    rec = data.get("owner")
    if not isinstance(rec, Mapping):
        if str(path) not in _noted:
            _noted.add(str(path))
            logger.warning("%s %s was written before supernets were kept per experiment: which experiment "
                           "wrote it is not recorded; it is used for %s as before", what, path,
                           describe_key(experiment))
        return
    theirs = rec.get("experiment")
    if missing is not None and theirs != experiment:
        raise CheckpointError(missing)
    if theirs != experiment:
        raise CheckpointError(
            f"{what} {path} belongs to {describe_key(theirs)} (warm-up trial {rec.get('trial') or '-'}), not to "
            f"{describe_key(experiment)}; it is never used across experiments. Use that experiment's id "
            "(--experiment) or warm up this one's supernet"
        )


def missing_message(wd: WorkDir, stage: int, experiment: Optional[str], name: str) -> str:
    """Why the stage's supernet of ``experiment`` is missing, and what to do (one line)."""
    path = wd.supernet_checkpoint(stage, experiment)
    if experiment is None:
        others = sorted(p.name for p in wd.supernet_dir.iterdir() if p.is_dir()) if wd.supernet_dir.is_dir() else []
        where = f"; experiments with supernets here: {', '.join(others)} (pass --experiment ID)" if others else ""
        return (f"supernet checkpoint of stage {stage} ({name}) not found: {path}. Outside NNI, trials and "
                f"exports use the work directory's own warm-ups; run `nni-effbert warmup -c <config> --stage "
                f"{stage}` first{where}")
    if wd.supernet_folder(experiment).is_dir():
        return (f"experiment {experiment}'s supernet of stage {stage} ({name}) is gone: {path} does not exist; "
                f"resume the experiment (`nni-effbert search -c <config> --resume {experiment}`) to warm it up "
                "again. Another experiment's supernets are never used instead")
    return (f"experiment {experiment} has no supernet of stage {stage} ({name}) in this work directory: {path} "
            f"does not exist; its warm-up trial writes it (is {experiment} an experiment of this work "
            "directory?)")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def read_supernet_checkpoint(path, what: str = "supernet checkpoint", hint: Optional[str] = None) -> Dict[str, Any]:
    """Load a supernet checkpoint written by :func:`run_warmup` (or a plain state dict).

    Returns
    -------
    dict
        With at least ``state_dict``; nni-effbert checkpoints also carry ``space_config``,
        ``stage``, ``plan``, ``teacher_fingerprint`` and ``task_fingerprint``.
    """
    data = load_torch(path, what, hint=hint)
    if isinstance(data, dict) and data.get("kind") == _KIND:
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"state_dict": data}  # a bare supernet state dict (e.g. from another tool)
    raise CheckpointError(f"{what} at {path} is not an nni-effbert supernet checkpoint nor a state dict")


_ANY_OWNER = object()


def load_supernet_checkpoint(space, path, *, what: str = "supernet checkpoint", hint: Optional[str] = None,
                             teacher_fingerprint: Optional[str] = None,
                             experiment: Any = _ANY_OWNER, missing: Optional[str] = None) -> Dict[str, Any]:
    """Load a supernet checkpoint into ``space``'s shared weights.

    ``experiment`` (an id, or None for the work directory's own warm-ups) is the experiment the
    checkpoint is read for: one owned by another is refused (:func:`check_owner`).
    Leave it out for a file the user named (``warmup.checkpoint``). ``missing``: see
    :func:`check_owner`.

    Raises
    ------
    CheckpointError
        Missing, corrupt, made for another student space (the message names the
        differing fields), or owned by another experiment.
    """
    data = read_supernet_checkpoint(path, what, hint)
    if experiment is not _ANY_OWNER:
        check_owner(data, Path(path), experiment, what=what, missing=missing)
    saved = data.get("space_config")
    if saved is not None:

        details = config_differences(saved, space.config.to_dict())
        if details:
            raise CheckpointError(
                f"{what} at {path} was trained for another student space ({details}); re-run its warm-up "
                "with this config or point the config at a matching checkpoint"
            )
    saved_teacher = data.get("teacher_fingerprint")
    if teacher_fingerprint and saved_teacher and saved_teacher != teacher_fingerprint:
        logger.warning("%s at %s was distilled from another teacher (%s, now %s); its weights are used anyway",
                       what, path, saved_teacher, teacher_fingerprint)
    try:
        space.supernet.load_state_dict(data["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{what} at {path} does not fit this student space ({first})") from exc
    return data


def checkpoint_payload(setup: KDSetup, plan: WarmupPlan, init: str, loss: Optional[float],
                        experiment: Optional[str] = None) -> Dict[str, Any]:
    """What a warm-up writes: the supernet's weights, its space, plan, teacher, task and owner."""
    return {
        "owner": owner(experiment),
        "kind": _KIND,
        "format": SUPERNET_FORMAT,
        "stage": plan.stage,
        "plan": plan.to_dict(),
        "space_config": setup.space.config.to_dict(),
        "state_dict": setup.space.supernet.state_dict(),
        "teacher_fingerprint": setup.teacher_fingerprint,
        "task_fingerprint": setup.task.fingerprint,
        "init": init,
        "loss": loss,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_supernet_checkpoint(path, setup: KDSetup, plan: WarmupPlan, init: str, loss: Optional[float],
                              experiment: Optional[str] = None) -> None:
    """Write a warmed stage's checkpoint (:func:`checkpoint_payload`) atomically."""
    atomic_save_torch(checkpoint_payload(setup, plan, init, loss, experiment), path)
