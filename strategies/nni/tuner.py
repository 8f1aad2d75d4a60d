"""``nnictl`` adapter as a plain NNI ``Tuner`` (the ``className`` form), over the same core.

Use it as::

    tuner:
      className: nni_effbert.strategies.nni.tuner.ProgressiveTuner
      codeDirectory: .
      classArgs: {config: effbert.yml}

The registered ``EfficientBertProgressive`` is the advisor (:mod:`.advisor`); this class is
for setups that need a ``Tuner`` (an assessor next to it, tools that expect one).

How it waits. When the manager asks for trials during a warm-up or a stage hand-off, the tuner
keeps the parameter ids it could not fill and raises ``NoMoreTrialError`` for them, then fills
them later through the ``st_callback`` NNI's dispatcher passes to
``generate_multiple_parameters`` -- the mechanism of NNI's own evolution tuner. No slot is
lost and no candidate runs before its stage's warm-up succeeded.

Trade-offs against the advisor, all from NNI's ``MsgDispatcher``:

* while slots wait the manager shows ``TUNER_NO_MORE_TRIAL`` and logs a warning when the
  deferred trials arrive (it then returns to ``RUNNING``);
* trial ends and final metrics arrive on two threads; a metric that comes after its trial's
  end still counts (see :data:`~nni_effbert.strategies.core.NO_METRIC`);
* a failed warm-up stops the experiment by raising :class:`~nni_effbert.strategies.search_errors.WarmupFailedError` in the
  dispatcher (the manager then reports the tuner as crashed; the reason is in
  ``dispatcher.log``) -- a tuner has no channel to report an error cleanly;
* on ``nnictl resume`` NNI hides the ends of re-run trials from tuners, so trials that were
  running are proposed again as new trials (results of the re-runs NNI still reports are
  ignored); the advisor keeps them instead.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, List, Optional

import nni
from nni.tuner import Tuner

from nni_effbert.params import stage_of

from .factory import build_broker, check_search_space

__all__ = ["ProgressiveTuner"]

logger = logging.getLogger(__name__)


class ProgressiveTuner(Tuner):
    """EfficientBERT's progressive search as an NNI ``Tuner`` (see the module docstring).

    Parameters
    ----------
    config, preset, space_overrides, search, state_path
        ``classArgs``, see :mod:`.factory`.
    """

    def __init__(self, *, config: Optional[str] = None, preset: Optional[str] = None,
                 space_overrides: Optional[dict] = None, search: Optional[dict] = None,
                 state_path: Optional[str] = None):
        super().__init__()
        self.broker = build_broker(config, preset, space_overrides, search, state_path)
        self._send: Optional[Callable[[int, Dict[str, Any]], None]] = None

    # -- NNI API ----------------------------------------------------------------------------

    def update_search_space(self, search_space: Dict[str, Any]) -> None:
        """Check NNI's ``searchSpace`` against the space of ``classArgs`` (or accept it empty)."""
        check_search_space(self.broker.search.space, search_space)

    def generate_multiple_parameters(self, parameter_id_list: List[int], **kwargs: Any) -> List[Dict[str, Any]]:
        """Fill what can be filled now; the rest is filled later through ``st_callback``."""
        if "st_callback" in kwargs:
            self._send = kwargs["st_callback"]
        requested = list(parameter_id_list)
        with self.broker.lock:
            served = self.broker.request(requested)
            self._raise_if_failed()
            now = [params for pid, params in served if pid in set(requested)]
            self._send_deferred([(pid, p) for pid, p in served if pid not in set(requested)])
        # Served slots are the oldest first, so those of this request are a prefix of it, which
        # is how NNI's dispatcher pairs the returned list with the ids.
        return now

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> Dict[str, Any]:
        params = self.generate_multiple_parameters([parameter_id], **kwargs)
        if not params:
            raise nni.NoMoreTrialError("the progressive search is waiting for running trials or has ended")
        return params[0]

    def receive_trial_result(self, parameter_id: int, parameters: Dict[str, Any], value: Any, **kwargs: Any) -> None:
        with self.broker.lock:
            self.broker.result(parameter_id, value)
            self._send_deferred(self.broker.flush())

    def trial_end(self, parameter_id: int, success: bool, **kwargs: Any) -> None:
        with self.broker.lock:
            self.broker.end(parameter_id, "SUCCEEDED" if success else "FAILED")
            self._raise_if_failed()
            self._send_deferred(self.broker.flush())

    def import_data(self, data: List[Dict[str, Any]]) -> None:
        """Results NNI replays on resume: applied to trials this search still waits for."""
        entries = []
        for entry in data:
            value = entry.get("value")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            entries.append({"parameter": entry.get("parameter"), "value": value})
        with self.broker.lock:
            self.broker.import_results(entries)
            self._send_deferred(self.broker.flush())

    def load_checkpoint(self) -> None:
        """Restore the search on ``nnictl resume``; trials that were running are proposed again."""
        if self.broker.load():
            self.broker.search.requeue_running()
            self.broker.save()

    def save_checkpoint(self) -> None:
        self.broker.save()

    # -- internals --------------------------------------------------------------------------

    def _send_deferred(self, served) -> None:
        for pid, params in served:
            if self._send is None:
                raise RuntimeError("NNI's dispatcher gave no st_callback, so deferred trials cannot be sent")
            logger.info("deferred trial %d sent (stage %s)", pid, stage_of(params))
            self._send(pid, params)

    def _raise_if_failed(self) -> None:
        done = self.broker.done
        if done is not None and done.failed:
            logger.error("EfficientBertProgressive stops the experiment: %s", done.reason)
            raise done.error()
