"""Glue shared by the two ``nnictl`` adapters (advisor and tuner): trial slots, ids, persistence.

NNI's manager asks for trials by count (``RequestTrialJobs``) when it has free slots, and asks
again only when a trial ends. The search, however, must sometimes wait (a stage's warm-up is
running, or a stage hands over to the next). :class:`TrialBroker` keeps every slot the manager
asked for and could not be served yet as *credit*, and serves it as soon as the search has a
proposal again -- the mechanism of NNI's own Hyperband advisor (``self.credit``) and evolution
tuner (``st_callback``). So a slot asked for during a warm-up is filled when the warm-up
succeeds, concurrency is never lost, and no candidate ever runs on an untrained supernet.

The broker also maps NNI parameter ids to the search's trial ids, turns NNI's trial events
into :meth:`~nni_effbert.strategies.core.ProgressiveSearch.tell` calls, and writes the whole state as JSON after
every change (atomically, through :mod:`nni_effbert.io`) so ``nnictl resume`` continues where
the search stopped. It holds a lock: NNI calls tuners from two threads.

**Which job ran which parameters.** NNI 3.0's local (and remote) training service does not
bind a trial's parameters to its job: it queues every ``NewTrialJob``'s parameters and hands
the head of the queue to whichever trial process asks first (``V3asV1`` in NNI's
``training_service/v3/compat.js``). Two trials started together may swap parameters, and a
trial killed before it asks leaves its parameters queued, so every later trial runs its
predecessor's. NNI's trial list then shows a job with parameters it did not run, and the
``hyper_params`` of a ``TrialEnd`` name the job's *queued* parameters. The broker therefore:

* learns which parameters each job really ran from its metrics (they carry the parameter id
  the trial received) and routes results and ends by that;
* every served parameter dict carries its id (``_parameter_id``), which the trial copies into
  its final metric (``parameter_id``) so results imported on resume land right too;
* counts a job that ended SUCCEEDED without reporting as having run a placeholder (every real
  trial reports before it exits 0) and a job that failed before reporting as the end of its
  queued parameters (:data:`~nni_effbert.strategies.core.UNREPORTED`, which a later metric of them overrides);
* when the search waits on trials and no job is left to run them (their parameters are stuck
  in NNI's queue), serves *placeholder* parameters (``{"_noop": ...}``: the trial exits at
  once) so NNI starts jobs that drain the queue, as many as jobs ended unsuccessfully without
  reporting (the most stale entries the queue can hold); a trial still awaited after that
  round is dead and fails as :data:`~nni_effbert.strategies.core.UNREPORTED`.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

from nni_effbert.errors import CheckpointError
from nni_effbert.io import atomic_write_json, load_json
from nni_effbert.params import (NOOP_KEY, PARAMETER_ID_KEY, placeholder_parameters, with_parameter_id,
                                 without_parameter_id)

from ..core import NO_METRIC, UNREPORTED, Done, Failure, ProgressiveSearch, Proposal, Wait
from ..search_errors import SearchStateError

__all__ = ["TrialBroker", "NO_METRIC", "UNREPORTED", "STATE_FILE", "NOOP_KEY", "PARAMETER_ID_KEY"]

logger = logging.getLogger(__name__)

#: File name of the search state inside the checkpoint folder.
STATE_FILE = "progressive_search.json"
BROKER_VERSION = 1

Served = List[Tuple[int, Dict[str, Any]]]


class TrialBroker:
    """Serve NNI's trial requests from a :class:`~nni_effbert.strategies.core.ProgressiveSearch`, thread-safely.

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
        self._job_pid: Dict[str, int] = {}  # NNI trial job id -> the parameter id it reported with
        self._noop: Set[int] = set()  # parameter ids served as placeholders
        self._live = 0  # jobs the manager was given (or re-runs) and has not ended
        self._drain: Optional[Dict[str, Any]] = None  # the placeholder round in flight, if any
        self._unasked = 0  # jobs that ended unsuccessfully without reporting: maybe never asked
        self._unreported_end: Dict[int, str] = {}  # warm-up trial -> event of a job that ended unreported
        self._reported_failure: Dict[int, str] = {}  # trial -> the reason its job reported, told at its end

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
                pid = self._take_slot()
                self._pid_to_trial[pid] = action.trial_id
                served.append((pid, with_parameter_id(action.parameters, pid)))
            if not served:
                served = self._drain_round()
            self._live += len(served)
            if not asked and self.search.done is None and self.search.settle() is not None:
                asked = True  # the last result came in with no slot open: the search ended anyway
            if asked:
                self.save()  # ask() may also have handed a stage over or ended the search
            return served

    def _take_slot(self) -> int:
        pid = self._slots.popleft()
        if pid is None:
            pid = self._next_pid
        self._next_pid = max(self._next_pid, pid + 1)
        return pid

    def _drain_round(self) -> Served:
        """Placeholders while the search waits on trials that no job is left to run (module docs).

        NNI's queue holds one stale entry per job that died before asking for its parameters,
        so at most :attr:`_unasked` (jobs that ended unsuccessfully without reporting). A round of
        that many placeholders makes NNI hand out every stale entry; a trial still awaited after
        the round is dead and fails as :data:`~nni_effbert.strategies.core.UNREPORTED`."""
        waiting = set(self.search.running())
        if not waiting or self.search.done is not None:
            self._drain = None
            return []
        if self._drain is None:
            if self._live > 0 or not self._slots:
                return []
            self._drain = {"waiting": sorted(waiting), "left": self._unasked}
            logger.info("waiting on trial(s) %s with no job left to run them: %d placeholder trial(s) let NNI "
                        "hand out parameters still queued", sorted(waiting), self._unasked)
        served: Served = []
        while self._slots and self._drain["left"] > 0:
            pid = self._take_slot()
            self._noop.add(pid)
            self._drain["left"] -= 1
            served.append((pid, placeholder_parameters(pid, "drains NNI's parameter queue")))
        if served or self._drain["left"] > 0 or self._live > 0:
            return served
        # The round is over and no job is left: what it still waits on will never report.
        for trial in sorted(waiting & set(self._drain["waiting"])):
            event = self._unreported_end.get(trial)
            reason = f"its trial job ended {event} before reporting a result" if event else UNREPORTED
            logger.warning("trial %d: no job is left that could run it (%s); counted as failed", trial, reason)
            self.search.tell(trial, Failure(reason))
        self._drain = None
        self.save()
        return []

    def allocate_after(self, parameter_id: int) -> None:
        """Make sure broker-numbered ids stay above ``parameter_id`` (ids recovered on resume,
        whose jobs the manager runs again)."""
        with self.lock:
            self._next_pid = max(self._next_pid, int(parameter_id) + 1)
            self._live += 1

    def observe(self, job: Any, parameter_id: Any) -> None:
        """A metric of NNI job ``job`` arrived with ``parameter_id``: the parameters it really runs."""
        if job is None or parameter_id is None:
            return
        with self.lock:
            self._job_pid[str(job)] = int(parameter_id)

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
            if isinstance(value, Mapping) and value.get("failed"):
                # The trial reported why it fails (nas.trial_runner does, then exits 1); told at its end,
                # so a failure that stops the search does so after NNI saw the job end.
                self._reported_failure[trial] = str(value.get("reason") or "the trial reported a failure")
                return
            if self.search.record(trial).teacher:
                # The teacher trial counts when NNI says it SUCCEEDED (its process has exited),
                # so no other trial can start while it still runs.
                self._teacher_metric[trial] = value
                return
            self.search.tell(trial, value)
            self.save()

    def end(self, parameter_id: Any, event: str, job: Any = None) -> None:
        """NNI job ``job`` ended with status ``event`` (SUCCEEDED, FAILED, USER_CANCELED, ...);
        ``parameter_id`` is the one NNI queued for it (see the module docs for why it may differ
        from what the job ran)."""
        with self.lock:
            self._live = max(0, self._live - 1)
            ran = self._job_pid.get(str(job)) if job is not None else None
            if ran is None and job is not None:
                if event == "SUCCEEDED":
                    # Every real trial reports before it exits 0: this job ran a placeholder, and
                    # the parameters queued for it are still in NNI's queue (or it was one).
                    return
                self._unasked += 1  # it may have died before asking: its entry stays queued
                if self._drain is not None:
                    self._drain["left"] += 1  # one more entry the round must hand out
                trial = self.trial_of(parameter_id)
                if trial is None or self.search.record(trial).status != "running":
                    return
                if self.search.record(trial).warmup:
                    self._unreported_end[trial] = str(event)
                    # A failed warm-up stops the search: fail it only once no job is left that
                    # could still run its queued parameters (the placeholder round, below).
                    logger.info("job %s ended %s before reporting; the warm-up of parameter id %s is failed "
                                "unless a queued job runs it", job, event, parameter_id)
                    return
                logger.info("job %s ended %s before reporting; counted as the end of parameter id %s",
                            job, event, parameter_id)
                self.search.tell(trial, Failure(UNREPORTED))
                self.save()
                return
            if ran is not None:
                if ran != parameter_id and parameter_id is not None:
                    logger.info("job %s ran parameter id %s (NNI queued %s for it)", job, ran, parameter_id)
                parameter_id = ran
            if parameter_id is not None and int(parameter_id) in self._noop:
                return
            trial = self.trial_of(parameter_id)
            if trial is None:
                logger.info("end of parameter id %s is not from this search; ignored", parameter_id)
                return
            record = self.search.record(trial)
            if record.status != "running":
                return  # the final metric came first, as usual
            if trial in self._reported_failure:
                self.search.tell(trial, Failure(self._reported_failure.pop(trial)))
            elif event == "SUCCEEDED":
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
                echoed = value.get("parameter_id") if isinstance(value, Mapping) else None
                if isinstance(echoed, int) and not isinstance(echoed, bool):
                    # The trial says which parameters it ran (NNI's own pairing may be wrong).
                    trial = self.trial_of(echoed)
                    if trial is None or trial not in running.values():
                        continue
                    running = {k: t for k, t in running.items() if t != trial}
                else:
                    if isinstance(params, dict):
                        params = without_parameter_id(params)
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
                "job_parameter": dict(self._job_pid),
                "placeholders": sorted(self._noop),
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
                self._job_pid = {str(k): int(v) for k, v in state.get("job_parameter", {}).items()}
                self._noop = {int(p) for p in state.get("placeholders", [])}
            except SearchStateError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise SearchStateError(f"tuner state is malformed ({type(err).__name__}: {err})") from err
            # The manager asks afresh after a restart: slots of the old run are void, and so is
            # its parameter queue (the jobs it re-runs are counted by allocate_after).
            self._slots.clear()
            self._live, self._drain, self._unasked = 0, None, 0

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
