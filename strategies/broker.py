"""Glue shared by the two ``nnictl`` adapters (advisor and tuner): trial slots, ids, persistence.

NNI's manager asks for trials by count (``RequestTrialJobs``) when it has free slots, and asks
again only when a trial ends. The search, however, must sometimes wait (a stage's warm-up is
running, or a stage hands over to the next). :class:`TrialBroker` keeps every slot the manager
asked for and could not be served yet as *credit*, and serves it as soon as the search has a
proposal again -- the mechanism of NNI's own Hyperband advisor (``self.credit``) and evolution
tuner (``st_callback``). So a slot asked for during a warm-up is filled when the warm-up
succeeds, concurrency is never lost, and no candidate ever runs on an untrained supernet.

The broker also maps NNI parameter ids to the search's trial ids, turns NNI's trial events
into :meth:`~.core.ProgressiveSearch.tell` calls, and writes the whole state as JSON after
every change (atomically, through :mod:`nni_effbert.io`) so ``nnictl resume`` continues where
the search stopped. It holds a lock: NNI calls tuners from two threads.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from nni_effbert.errors import CheckpointError
from nni_effbert.io import atomic_write_json, load_json

from .core import NO_METRIC, Done, Failure, ProgressiveSearch, Proposal, Wait
from .errors import SearchStateError

__all__ = ["TrialBroker", "NO_METRIC", "STATE_FILE"]

logger = logging.getLogger(__name__)

#: File name of the search state inside the checkpoint folder.
STATE_FILE = "progressive_search.json"
BROKER_VERSION = 1

Served = List[Tuple[int, Dict[str, Any]]]


class TrialBroker:
    """Serve NNI's trial requests from a :class:`~.core.ProgressiveSearch`, thread-safely.

    Parameters
    ----------
    search : ProgressiveSearch
        The search core.
    state_path : path, optional
        Where the state JSON is written after every change; None: not persisted.
    """

    def __init__(self, search: ProgressiveSearch, state_path: Optional[Union[str, Path]] = None):
        self.search = search
        self.state_path = Path(state_path) if state_path is not None else None
        self.lock = threading.RLock()
        self._slots: Deque[Optional[int]] = deque()  # requested, unserved: an NNI id or None (allocate)
        self._pid_to_trial: Dict[int, int] = {}
        self._next_pid = 0
        self._teacher_metric: Dict[int, Any] = {}  # the teacher trial's metric, told at its SUCCEEDED end

    # -- requests ---------------------------------------------------------------------------

    @property
    def credit(self) -> int:
        """Slots the manager asked for that are not served yet."""
        return len(self._slots)

    @property
    def done(self) -> Optional[Done]:
        """How the search ended, or None while it runs."""
        return self.search.done

    def request(self, parameter_ids: Iterable[Optional[int]]) -> Served:
        """Add slots (NNI parameter ids, or None to let the broker number them) and serve what
        can be served now, oldest slot first. Returns ``[(parameter_id, parameters)]``."""
        with self.lock:
            self._slots.extend(parameter_ids)
            return self.flush()

    def flush(self) -> Served:
        """Serve waiting slots while the search has proposals."""
        with self.lock:
            served: Served = []
            asked = False
            while self._slots:
                asked = True
                action = self.search.ask()
                if not isinstance(action, Proposal):
                    if isinstance(action, Wait):
                        logger.debug("%d slot(s) wait: %s", len(self._slots), action.reason)
                    break
                pid = self._slots.popleft()
                if pid is None:
                    pid = self._next_pid
                self._next_pid = max(self._next_pid, pid + 1)
                self._pid_to_trial[pid] = action.trial_id
                served.append((pid, action.parameters))
            if asked:
                self.save()  # ask() may also have handed a stage over or ended the search
            return served

    def allocate_after(self, parameter_id: int) -> None:
        """Make sure broker-numbered ids stay above ``parameter_id`` (ids recovered on resume)."""
        with self.lock:
            self._next_pid = max(self._next_pid, int(parameter_id) + 1)

    # -- events -----------------------------------------------------------------------------

    def trial_of(self, parameter_id: Any) -> Optional[int]:
        """The search's trial id of an NNI parameter id (None if not from this search)."""
        if parameter_id is None:
            return None
        return self._pid_to_trial.get(int(parameter_id))

    def result(self, parameter_id: Any, value: Any) -> None:
        """A final metric arrived for ``parameter_id`` (a number or a dict with ``default``)."""
        with self.lock:
            trial = self.trial_of(parameter_id)
            if trial is None:
                logger.info("final metric of parameter id %s is not from this search; ignored", parameter_id)
                return
            if self.search.record(trial).teacher:
                # The teacher trial counts when NNI says it SUCCEEDED (its process has exited),
                # so no other trial can start while it still runs.
                self._teacher_metric[trial] = value
                return
            self.search.tell(trial, value)
            self.save()

    def end(self, parameter_id: Any, event: str) -> None:
        """A trial ended with NNI status ``event`` (SUCCEEDED, FAILED, USER_CANCELED, ...)."""
        with self.lock:
            trial = self.trial_of(parameter_id)
            if trial is None:
                logger.info("end of parameter id %s is not from this search; ignored", parameter_id)
                return
            record = self.search.record(trial)
            if record.status != "running":
                return  # the final metric came first, as usual
            if event == "SUCCEEDED":
                # A warm-up needs no metric; a candidate that succeeded without one is unusable.
                self.search.tell(trial, self._teacher_metric.pop(trial, None) if record.warmup else Failure(NO_METRIC))
            else:
                self.search.tell(trial, Failure(f"trial ended {event}"))
            self.save()

    def import_results(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """Apply NNI's exported results (``[{parameter, value}]``) to trials still running here.

        Used on resume: results that reached NNI while the search was stopped. Entries that
        match no running trial (already known, or from elsewhere) are ignored.

        Returns
        -------
        int
            How many running trials received their result.
        """
        with self.lock:
            running = {json.dumps(self.search.record(t).parameters, sort_keys=True): t
                       for t in self.search.running()}
            applied = 0
            for entry in entries:
                params = entry.get("parameter")
                value = entry.get("value")
                if isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass
                key = json.dumps(params, sort_keys=True) if isinstance(params, dict) else None
                trial = running.pop(key, None)
                if trial is not None:
                    self.search.tell(trial, value)
                    applied += 1
            if applied:
                logger.info("imported %d result(s) of trials that finished while the search was stopped", applied)
                self.save()
            return applied

    # -- persistence ------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Search state plus the parameter-id mapping, as JSON-friendly data."""
        with self.lock:
            return {
                "broker_version": BROKER_VERSION,
                "next_parameter_id": self._next_pid,
                "parameter_to_trial": {str(k): v for k, v in self._pid_to_trial.items()},
                "search": self.search.state_dict(),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises
        ------
        SearchStateError
            If the state is malformed or belongs to another search.
        """
        with self.lock:
            try:
                if state.get("broker_version") != BROKER_VERSION:
                    raise SearchStateError(f"tuner state version {state.get('broker_version')!r} is not supported")
                self.search.load_state_dict(state["search"])
                self._next_pid = int(state["next_parameter_id"])
                self._pid_to_trial = {int(k): int(v) for k, v in state["parameter_to_trial"].items()}
            except SearchStateError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise SearchStateError(f"tuner state is malformed ({type(err).__name__}: {err})") from err
            # The manager asks afresh after a restart: slots of the old run are void.
            self._slots.clear()

    def parameter_ids_of_running(self) -> Dict[int, int]:
        """``{parameter_id: trial_id}`` of the trials the search still waits for."""
        with self.lock:
            running = set(self.search.running())
            return {p: t for p, t in self._pid_to_trial.items() if t in running}

    def save(self) -> None:
        """Write the state JSON (atomically) if a path is set."""
        if self.state_path is None:
            return
        with self.lock:
            atomic_write_json(self.state_dict(), self.state_path)

    def load(self) -> bool:
        """Load the state JSON if it exists; returns whether it did.

        Raises
        ------
        SearchStateError
            If the file exists but cannot be used.
        """
        if self.state_path is None or not self.state_path.exists():
            return False

        try:
            state = load_json(self.state_path, "progressive search state",
                              hint="delete it to restart the search from scratch")
        except CheckpointError as err:
            raise SearchStateError(str(err)) from err
        self.load_state_dict(state)
        logger.info("search state restored from %s", self.state_path)
        return True
