"""``nnictl`` adapter that really waits: an NNI advisor (``MsgDispatcherBase``) over the core.

Why an advisor. NNI's manager asks the dispatcher for ``trialConcurrency`` trials at start and
for one more each time a trial ends; a plain ``Tuner`` must answer each request at once (or
raise ``NoMoreTrialError``, after which the manager marks the tuner exhausted and does not
ask for that slot again). While a stage's warm-up runs, the search has nothing to propose.
An advisor talks to the manager directly, as NNI's Hyperband does: it keeps the requested
slots as credit and sends ``NewTrialJob`` whenever the search has a proposal again, e.g. the
moment the warm-up succeeds, so with ``trialConcurrency: 2`` both slots fill with candidates
right after the warm-up and none ever runs on an untrained supernet.

Since NNI 3.0 the experiment config has no separate ``advisor`` field: an advisor is given as
``tuner`` and NNI's launcher runs it as the dispatcher. Registered (see :mod:`.registration`)
it is ``tuner: {name: EfficientBertProgressive, classArgs: {...}}``; unregistered,
``tuner: {className: nni_effbert.strategies.nni.advisor.ProgressiveAdvisor, codeDirectory: .}``.
``classArgs`` are described in :mod:`.factory`.

Other behaviours:

* trial events are handled on one thread in arrival order (NNI's base class splits them over
  two), so a trial's final metric is always seen before its end;
* a failed warm-up sends ``NoMoreTrialJobs`` and reports the reason to the manager, which puts
  the experiment in ``ERROR`` (the reason is in ``dispatcher.log`` and ``nnimanager.log``);
* when the search ends, ``NoMoreTrialJobs`` is sent and the advisor lowers the experiment's
  ``maxTrialNumber`` (NNI's REST API, as ``nnictl update trialnum`` does) to the trial jobs NNI
  has, so the experiment ends ``DONE`` once they end (NNI shows ``TUNER_NO_MORE_TRIAL`` until
  ``maxTrialNumber`` jobs ran). Set ``maxTrialNumber`` to ``SearchConfig.max_trial_jobs()``:
  the search's trials plus room for the placeholder and re-proposed trials that faults cost
  (:mod:`.broker`); a search that reaches NNI's limit first is cut short;
* the state is written to NNI's checkpoint folder after every change; ``nnictl resume``
  reloads it, keeps the trials NNI re-runs, applies results that arrived while stopped, and
  proposes again the trials that were lost;
* an assessor is not supported (NNI ignores assessors next to advisors);
* with ``classArgs.config``, the advisor holds the work directory's search lock while the
  experiment runs (:mod:`nni_effbert.search_lock`): a second experiment on a work
  directory whose search is running reports the running one (experiment id, port) and ends in
  ``ERROR`` at once, unless ``search.share_workdir`` is true.
"""
from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Set

import nni
from nni import ClassArgsValidator
from nni.runtime.msg_dispatcher_base import MsgDispatcherBase
from nni.runtime.tuner_command_channel import CommandType
from nni.utils import MetricType

from nni_effbert.config import load_config
from nni_effbert import search_lock
from nni_effbert.workdir import WorkDir

from ..search_errors import SearchConfigError

__all__ = ["ProgressiveAdvisor", "ProgressiveClassArgsValidator"]

logger = logging.getLogger(__name__)


class ProgressiveClassArgsValidator(ClassArgsValidator):
    """Validates ``classArgs`` early (``nnictl`` v1 configs); the classes validate them again."""

    def validate_class_args(self, **kwargs: Any) -> None:
        from .factory import CLASS_ARGS, build_space_and_search  # local: see ProgressiveAdvisor.__init__

        unknown = sorted(set(kwargs) - set(CLASS_ARGS))
        if unknown:
            raise SearchConfigError(f"unknown classArgs {unknown}; allowed: {list(CLASS_ARGS)}")

        build_space_and_search(kwargs.get("config"), kwargs.get("preset"), kwargs.get("space_overrides"),
                               kwargs.get("search"))


class ProgressiveAdvisor(MsgDispatcherBase):
    """EfficientBERT's progressive search as an NNI advisor (see the module docstring).

    Parameters
    ----------
    config, preset, space_overrides, search, state_path
        ``classArgs``, see :mod:`.factory`.
    command_channel_url : str, optional
        Set by tests; NNI passes it through the environment.
    """

    def __init__(self, *, config: Optional[str] = None, preset: Optional[str] = None,
                 space_overrides: Optional[dict] = None, search: Optional[dict] = None,
                 state_path: Optional[str] = None, command_channel_url: Optional[str] = None):
        super().__init__(command_channel_url)  # connects to the manager
        try:
            # NNI's manager waits only 10 s for the dispatcher to connect (tuner_command_channel.js),
            # counted from its start; the search (config, space: torch and nni.nas) takes seconds
            # more to import on a busy machine, so it is imported once connected.
            from .factory import build_broker  # local: connect within NNI's 10 s first

            self.broker = build_broker(config, preset, space_overrides, search, state_path)
        except Exception as err:
            # Tell the manager why, instead of leaving it to time out on a dead dispatcher.
            self.report_error(f"EfficientBertProgressive: bad classArgs: {err}")
            raise
        try:
            self._take_search_lock(config)
        except search_lock.SearchRunningError as err:
            self.report_error(f"EfficientBertProgressive: {err}")
            raise
        self._resumed = False
        self._resumed_ids: Set[int] = set()
        self._reconciled = True
        self._finished = False

    def _take_search_lock(self, config: Optional[str]) -> None:
        """Hold the work directory's search lock (only as NNI's dispatcher, with ``classArgs.config``)."""
        ckpt = os.environ.get("NNI_CHECKPOINT_DIRECTORY")
        if not config or not ckpt:
            return  # not NNI's dispatcher (tests), or no work directory to guard
        from .factory import resolve_config_path  # local: imported in __init__ already, after connecting

        cfg = load_config(resolve_config_path(config), check_paths=False)
        search_lock.acquire(WorkDir.of(cfg), kind="advisor", experiment=Path(ckpt).parent.name,
                            port=self._manager_port(), share=cfg.search.share_workdir)

    # -- plumbing ---------------------------------------------------------------------------

    def enqueue_command(self, command, data):
        # One queue for everything: NNI puts TrialEnd on a second thread, so a trial's end
        # could be handled before its final metric; arrival order keeps metric-then-end.
        self.default_command_queue.put((command, data))

    def load_checkpoint(self) -> None:
        """Called by NNI on ``nnictl resume`` before any command: restore the search."""
        if self.broker.load():
            self._resumed = True
            self._reconciled = False

    def save_checkpoint(self) -> None:
        self.broker.save()

    def _send_served(self, served) -> None:
        for pid, params in served:
            self.send(CommandType.NewTrialJob, nni.dump({
                "parameter_id": pid, "parameter_source": "algorithm", "parameters": params,
                "parameter_index": 0}))
        self._check_done()

    def _check_done(self) -> None:
        done = self.broker.done
        if done is None or self._finished:
            return
        self._finished = True
        self.send(CommandType.NoMoreTrialJobs, nni.dump({"parameter_id": None}))
        if done.failed:
            logger.error("EfficientBertProgressive stops the experiment: %s", done.reason)
            self.report_error(f"EfficientBertProgressive: {done.reason}")
        else:
            logger.info("EfficientBertProgressive: %s", done.reason)
            self._close_trial_budget()

    def _manager_port(self) -> Optional[int]:
        found = re.search(r":(\d+)/", os.environ.get("NNI_TUNER_COMMAND_CHANNEL", ""))
        return int(found.group(1)) if found else None

    def _close_trial_budget(self) -> None:
        """Lower ``maxTrialNumber`` to the jobs NNI has, so the finished experiment ends DONE."""
        port = self._manager_port()
        if port is None:
            return  # not NNI's dispatcher (tests)
        base = f"http://localhost:{port}/api/v1/nni"
        try:
            with urllib.request.urlopen(f"{base}/experiment", timeout=10) as resp:  # noqa: S310 - localhost
                profile = json.loads(resp.read().decode("utf-8"))
            with urllib.request.urlopen(f"{base}/trial-jobs", timeout=10) as resp:  # noqa: S310 - localhost
                jobs = len(json.loads(resp.read().decode("utf-8")) or [])
            params = profile.get("params") or {}
            if not jobs or int(params.get("maxTrialNumber") or 0) <= jobs:
                return
            params["maxTrialNumber"] = jobs
            request = urllib.request.Request(f"{base}/experiment?update_type=MAX_TRIAL_NUM", method="PUT",
                                             data=json.dumps(profile).encode("utf-8"),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - localhost
                pass
            logger.info("search done: maxTrialNumber lowered to the %d trial jobs NNI ran", jobs)
        except (urllib.error.URLError, OSError, ValueError, TypeError) as err:
            logger.warning("could not lower maxTrialNumber (%s); the experiment shows TUNER_NO_MORE_TRIAL "
                           "instead of DONE", err)

    def _reconcile_resume(self) -> None:
        """After a resume: trials the manager neither re-ran nor finished are proposed again."""
        if self._reconciled:
            return
        self._reconciled = True
        with self.broker.lock:
            lost = [t for p, t in self.broker.parameter_ids_of_running().items() if p not in self._resumed_ids]
            if lost:
                self.broker.search.requeue_running(lost)
                self.broker.save()

    # -- handlers ---------------------------------------------------------------------------

    def handle_initialize(self, data):
        self.handle_update_search_space(data)
        self.send(CommandType.Initialized, "")

    def handle_update_search_space(self, data):
        from .factory import check_search_space  # local: imported in __init__ already, after connecting

        check_search_space(self.broker.search.space, data)

    def handle_request_trial_jobs(self, data):
        self._reconcile_resume()
        self._send_served(self.broker.request([None] * int(data)))

    def handle_report_metric_data(self, data):
        kind = data.get("type")
        # Which parameters this job really runs (NNI may have queued others for it: see .broker).
        self.broker.observe(data.get("trial_job_id"), data.get("parameter_id"))
        if kind == MetricType.FINAL:
            self.broker.result(data.get("parameter_id"), nni.load(data["value"]))
            self._send_served(self.broker.flush())
        elif kind == MetricType.PERIODICAL:
            logger.debug("intermediate result of trial %s ignored", data.get("trial_job_id"))
        else:
            raise SearchConfigError(f"EfficientBertProgressive does not support metric type {kind!r} "
                                    f"(multi-phase trials); run one architecture per trial")

    def handle_trial_end(self, data):
        pid = nni.load(data["hyper_params"]).get("parameter_id")
        self.broker.end(pid, data["event"], job=data.get("trial_job_id"))
        self._send_served(self.broker.flush())

    def handle_import_data(self, data):
        self.broker.import_results(data)
        self._send_served(self.broker.flush())

    def handle_add_customized_trial(self, data):
        # On resume NNI re-submits the trials that were waiting or running, with their old
        # parameter ids: keep waiting for those, and number new trials above them.
        entries = data if isinstance(data, list) else [data]
        for entry in entries:
            entry = nni.load(entry) if isinstance(entry, str) else entry
            pid = entry.get("parameter_id")
            if isinstance(pid, int):
                self._resumed_ids.add(pid)
                self.broker.allocate_after(pid)
            else:
                logger.warning("customized trial %s is not part of the progressive search; its result is ignored",
                               entry.get("parameters"))
