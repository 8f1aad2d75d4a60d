"""The ``NasExperiment`` search driver (``nni-effbert search --python``): NNI's NAS experiment
with :class:`~nni_effbert.strategies.ProgressiveStrategy`, warm-ups in this process, resumable
after SIGTERM, records in ``<workdir>/trials.json``.

See :mod:`nni_effbert.nas.launcher` for the whole picture and the NNI 3.0 gaps worked around here.
"""

import contextlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from nni_effbert.strategies import ProgressiveStrategy
from nni_effbert.params import RESCORE_OF_KEY, STAGE_KEY, split_parameters

from ..config import ExperimentConfig, save_experiment_config
from ..errors import CheckpointError, EffBertError
from ..io import atomic_write_json, load_torch
from ..latency.targets import search_latency
from ..runtime import resolve_runtime
from ..workdir import WorkDir
from .. import search_lock
from . import warm_worker
from .experiments import (EXPERIMENTS_DIR, SAFE_PATH_ENV, TRIALS_FILE, SearchResult, check_resumable, free_port,
                          prepare_workdir, web_ui_warning)
from .kd_evaluator import KDEvaluator
from .records import normalize_trial, read_nni_trials

__all__ = ["run_python"]

logger = logging.getLogger(__name__)

def _trial_results(wd: WorkDir, trial_ids: Optional[set] = None) -> Dict[Tuple[str, Any], Tuple[str, Dict[str, Any]]]:
    """``(arch JSON, stage, rescore_of) -> (NNI trial id, metric dict)`` from the evaluator's records
    (``trials/<id>/result.json``; only those of ``trial_ids`` when given), newest last so that it wins.
    ``rescore_of`` is None for a candidate and the search's trial id for a re-score of it."""
    found: Dict[Tuple[str, Any], Tuple[str, Dict[str, Any]]] = {}
    paths = sorted(wd.trials_dir.glob("*/result.json"), key=lambda p: p.stat().st_mtime) \
        if wd.trials_dir.is_dir() else []
    for path in paths:
        if trial_ids is not None and path.parent.name not in trial_ids:
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        result = rec.get("result") if isinstance(rec, dict) else None
        if rec.get("status") == "succeeded" and isinstance(result, dict) and isinstance(rec.get("arch"), dict):
            key = (json.dumps(rec["arch"], sort_keys=True), result.get("stage"), result.get("rescore_of"))
            found[key] = (path.parent.name, result)
    return found


def _records_to_trials(strategy, wd: WorkDir) -> List[Dict[str, Any]]:
    """The strategy's records as :mod:`~.report` trial dicts. NNI's NAS engine keeps only the
    ``default`` value of a metric, so the full metric dict (and NNI's trial id) comes from the
    record the evaluator wrote in the trial process."""

    results = _trial_results(wd)
    names = {i: s.name for i, s in enumerate(strategy.search_config.stages)}
    trials = []
    for seq, rec in enumerate(strategy.search.records):
        arch, _ = split_parameters(rec.parameters)
        # Only a success of this search takes a record (an older run may have scored the same arch).
        nni_id, final = results.get((json.dumps(arch, sort_keys=True), rec.stage, rec.rescore_of), (None, None)) \
            if not rec.warmup and rec.status == "succeeded" else (None, None)
        status = {"succeeded": "SUCCEEDED", "failed": "FAILED"}.get(rec.status, str(rec.status).upper())
        trial: Dict[str, Any] = {
            "trial_id": nni_id or f"{'warmup' if rec.warmup else 'strategy'}-{rec.trial_id}", "sequence": seq,
            "stage": rec.stage, "stage_name": names.get(rec.stage), "warmup": bool(rec.warmup), "status": status,
            "arch": arch, "message": rec.reason, "params": rec.params_count, "rescore_of": rec.rescore_of,
        }
        if isinstance(final, Mapping):
            trial["final"] = dict(final)
            for key in ("params", "non_embedding_params", "latency_ms"):
                if isinstance(final.get(key), (int, float)):
                    trial[key] = final[key]
            if isinstance(final.get("expressions"), list):
                trial["expressions"] = [str(e) for e in final["expressions"]]
        if rec.score is not None and math.isfinite(float(rec.score)):
            trial["metric"] = float(rec.score)
        trials.append(trial)
    return trials


def _finished_after_stop(wd: WorkDir, exp_id: str):
    """``finished_fn`` of a resumed ``--python`` search: parameters -> score of a candidate that a
    trial of experiment ``exp_id`` (NNI's records) scored and recorded as succeeded
    (``trials/<id>/result.json``); None for any other. Read before the experiment resumes.

    NNI's status of the trial does not matter: the stop may cancel a trial after its process
    wrote the record (the score is complete) and before NNI saw its final metric."""

    try:
        ours = {t["trial_id"] for t in read_nni_trials(exp_id, experiments_dir=wd.root / EXPERIMENTS_DIR)}
    except EffBertError as exc:  # then trials running at the stop are simply proposed again
        logger.warning("resume: could not read experiment %s's trials (%s); candidates left running at the stop "
                       "run again", exp_id, exc)
        ours = set()
    scores: Dict[Tuple[str, Any], float] = {}
    for key, (_, final) in _trial_results(wd, ours).items():  # this experiment's trials only
        value = final.get("default")
        if isinstance(value, (int, float)) and math.isfinite(value):
            scores[key] = float(value)

    def finished(parameters: Mapping[str, Any]) -> Optional[float]:
        arch, meta = split_parameters(parameters)
        return scores.get((json.dumps(arch, sort_keys=True), meta.get(STAGE_KEY), meta.get(RESCORE_OF_KEY)))

    return finished


class _Interrupted(KeyboardInterrupt):
    """SIGTERM seen by the ``--python`` search: handled as Ctrl-C (NNI stops and checkpoints)."""


def _save_nas_checkpoint(experiment) -> None:
    """Write the NasExperiment's ``checkpoint/state.ckpt`` atomically (temp file, then rename).

    NNI writes it only when the experiment starts and when it stops; the strategy calls this
    after every finished trial too, so a search killed outright resumes from its last result.
    """
    from nni.nas.utils.serializer import get_default_serializer  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only

    serializer = get_default_serializer()
    folder = experiment._checkpoint_directory  # pylint: disable=protected-access
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".state.ckpt.{os.getpid()}.tmp"
    written = Path(str(tmp) + serializer.suffix)  # NNI's serializers add their suffix (.torch)
    try:
        serializer.save(experiment.state_dict(), tmp)
        os.replace(written, folder / ("state.ckpt" + serializer.suffix))
    finally:
        for path in (tmp, written):
            if path.exists():
                path.unlink()


class SafeTorchSerializer:
    """NNI's ``TorchSerializer`` (same ``.torch`` files) whose ``load`` never unpickles code.

    NNI 3.0 reads a resumed experiment's ``checkpoint/state.ckpt.torch`` with a plain
    ``torch.load``, which is safe only where torch defaults to ``weights_only=True`` (2.6 and
    later). This loads it through :func:`nni_effbert.io.load_torch` (``weights_only=True`` on
    every torch version): a file holding anything but tensors and plain containers, or a damaged
    one, is a one-line :class:`~nni_effbert.errors.CheckpointError`.
    """

    suffix = ".torch"

    def save(self, data: Any, path: Path) -> None:
        torch.save(data, str(path) + self.suffix)

    def load(self, path: Path) -> Any:
        from nni.nas.utils.serializer import _find_path_with_prefix  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only

        found = _find_path_with_prefix(Path(path), self.suffix)  # FileNotFoundError: NNI skips loading
        return load_torch(found, "NAS experiment checkpoint",
                          hint="it cannot be resumed; start a new search without --resume")


def use_safe_checkpoints() -> None:
    """Make NNI save and load NAS experiment checkpoints through :class:`SafeTorchSerializer`."""
    from nni.nas.utils.serializer import set_default_serializer  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only

    set_default_serializer(SafeTorchSerializer())


def check_checkpoint_config(exp_dir: Path) -> None:
    """Refuse a resume whose ``checkpoint/config.json`` holds serialized Python objects.

    NNI reads that file with ``nni.load``, which rebuilds objects marked with keys such as
    ``__nni_obj__`` (a cloudpickle), ``__symbol__`` or ``__instance_type__`` (imports): code
    would run. The config NNI writes is plain JSON with no ``__...__`` key.

    Raises
    ------
    CheckpointError
        One line naming the file and the key.
    """
    path = Path(exp_dir) / "checkpoint" / "config.json"
    if not path.is_file():
        return  # NNI reports a missing config itself
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"NAS experiment config {path} cannot be read ({' '.join(str(exc).split())}); "
                              "it cannot be resumed; start a new search without --resume") from None
    todo = [data]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and key.startswith("__") and key.endswith("__"):
                    raise CheckpointError(
                        f"NAS experiment config {path} holds a serialized Python object ({key!r}), which NNI "
                        "would rebuild by running code; nni-effbert did not write it: start a new search "
                        "without --resume")
                todo.append(value)
        elif isinstance(node, list):
            todo.extend(node)


@contextlib.contextmanager
def _nas_channel_skips_resume_commands():
    """Work around NNI 3.0 for ``NasExperiment.resume`` through a training service.

    On resume the NNI manager sends ``ImportData`` (the finished trials) and, if trials were
    still waiting or running at the stop, ``AddCustomizedTrialJob`` (those trials, which it runs
    again) on the tuner channel. NNI 3.0's NAS channel knows neither: its listener thread dies
    on ``ValueError: Unknown command type`` and the resumed search waits forever. Both are
    skipped here, only while the resumed experiment runs: the strategy restores its history
    from the checkpoint and proposes unfinished candidates again itself (a graceful stop
    cancels them first, see :func:`_cancel_unfinished_trials`).
    """
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel  # local: NNI internals patched on the --python path only
    from nni.runtime.tuner_command_channel.command_type import CommandType

    skipped = (str(CommandType.ImportData), str(CommandType.AddCustomizedTrialJob))
    original = TunerCommandChannel.receive

    def receive(self):
        while True:
            try:
                return original(self)
            except ValueError as exc:
                if not any(name in str(exc) for name in skipped):
                    raise
                if str(CommandType.AddCustomizedTrialJob) in str(exc):
                    logger.warning("resume: the NNI manager re-runs trials left unfinished by the stopped process; "
                                   "their results are not used (the strategy proposes those candidates again)")
                else:
                    logger.info("resume: skipped NNI's ImportData (the strategy restored its own history)")

    TunerCommandChannel.receive = receive
    try:
        yield
    finally:
        TunerCommandChannel.receive = original


_UNFINISHED = ("WAITING", "RUNNING", "UNKNOWN")


def _cancel_unfinished_trials(experiment, timeout: float = 60.0) -> List[str]:
    """Cancel the trials still waiting or running in a NasExperiment's manager; returns their ids.

    Called when a ``--python`` search stops early. The NNI manager re-runs the trials it
    has as waiting or running when the experiment is resumed, while NNI's NAS engine ignores
    their results (their parameter ids belong to the stopped process) and the strategy
    proposes those candidates again itself: cancelled, they run once, not twice.
    """
    if getattr(experiment, "_proc", None) is None or not getattr(experiment, "port", None):
        return []
    try:
        pending = [j["trialJobId"] for j in experiment.list_trial_jobs_raw() if j.get("status") in _UNFINISHED]
        for trial_id in pending:
            experiment.kill_trial_job(trial_id)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            jobs = {j["trialJobId"]: j.get("status") for j in experiment.list_trial_jobs_raw()}
            if not any(jobs.get(t) in _UNFINISHED for t in pending):
                break
            time.sleep(0.5)  # polling the manager's REST API for the cancelled trials' status
        if pending:
            logger.info("cancelled unfinished trials %s; the strategy proposes them again on resume", pending)
        return pending
    except Exception:  # stopping must go on; the manager then re-runs them on resume
        logger.exception("could not cancel the unfinished trials before stopping")
        return []


def _nas_experiment_class():
    """``NasExperiment`` whose ``stop()`` first cancels the trials still waiting or running."""
    from nni.experiment import rest  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only
    from nni.nas.experiment import NasExperiment  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only

    class EffBertNasExperiment(NasExperiment):
        def list_trial_jobs_raw(self):
            return rest.get(self.port, "/trial-jobs", self.url_prefix) or []

        def stop(self) -> None:
            _cancel_unfinished_trials(self)
            super().stop()

    return EffBertNasExperiment


def _schedule_gpus(conf, cfg: ExperimentConfig) -> None:
    """Pass ``search``'s GPU scheduling to NNI (``trialGpuNumber``, local ``gpuIndices`` /
    ``useActiveGpu`` / ``maxTrialNumberPerGpu``), as the nnictl config does.

    The warm-ups of this path run in this process, on ``runtime.device``. When that is a GPU NNI
    may also give to candidates, this process occupies it, and with ``useActiveGpu: false`` NNI
    would never schedule a candidate there (with one GPU the search would wait forever), so
    ``useActiveGpu`` is turned on, with a warning.
    """
    search = cfg.search
    conf.trial_gpu_number = int(search.gpus_per_trial)
    conf.training_service.use_active_gpu = bool(search.use_active_gpu)
    conf.training_service.max_trial_number_per_gpu = int(search.max_trials_per_gpu)
    if search.gpu_indices:
        conf.training_service.gpu_indices = [int(i) for i in search.gpu_indices]
    if search.gpus_per_trial and not search.use_active_gpu and resolve_runtime(cfg).is_cuda:
        logger.warning("--python: the warm-ups run in this process on %s, which NNI then sees as an active GPU; "
                       "useActiveGpu is turned on so that candidates can still be scheduled on it",
                       resolve_runtime(cfg).device)
        conf.training_service.use_active_gpu = True


def run_python(cfg: ExperimentConfig, config_path: Optional[str], *, port: Optional[int], progress: bool,
                resume: Optional[str] = None) -> SearchResult:
    port = free_port() if port is None else int(port)
    # One live search per work directory, checked before config.yml is rewritten.
    lock = search_lock.acquire(WorkDir.of(cfg).ensure(), kind="python", experiment=resume, port=port,
                               share=cfg.search.share_workdir)
    try:
        return _run_python(cfg, config_path, port=port, progress=progress, resume=resume, lock=lock)
    finally:
        search_lock.release(WorkDir.of(cfg), lock)


def _run_python(cfg: ExperimentConfig, config_path: Optional[str], *, port: int, progress: bool, resume: Optional[str],
                lock) -> SearchResult:
    from nni.nas.experiment import NasExperimentConfig  # local: nni.nas pulls in pytorch_lightning (~6 s); --python only

    wd, _ = prepare_workdir(cfg, config_path)
    use_safe_checkpoints()
    if resume is not None:
        check_checkpoint_config(check_resumable(wd, resume, nas=True))
    # Its trials read the supernets this experiment's warm-ups write (NNI sets $NNI_EXP_ID in them).
    if cfg.tasks:  # several tasks share one supernet: candidates are scored on every task
        from .multitask_evaluator import MultiTaskEvaluator

        evaluator = MultiTaskEvaluator(cfg, progress=progress)
    else:
        evaluator = KDEvaluator(cfg, progress=progress, supernet="own")
    space = evaluator.space  # the experiment's space (teacher-sized fit_dense, task labels)
    holder: Dict[str, Any] = {}

    def checkpoint() -> None:
        try:
            _save_nas_checkpoint(holder["experiment"])
        except Exception:  # a failed save must not stop the search; NNI saves again at stop
            logger.exception("could not save the NAS experiment checkpoint")

    # arch_space: NNI hands the strategy a SimplifiedModelSpace, which lacks the arch API.
    latency_fn, teacher_ms = search_latency(cfg, build=True, progress=progress)
    strategy = ProgressiveStrategy(search=cfg.search, warmup_fn=evaluator.warmup, arch_space=space,
                                   checkpoint_fn=checkpoint, latency_fn=latency_fn, teacher_latency_ms=teacher_ms,
                                   finished_fn=_finished_after_stop(wd, resume) if resume is not None else None)
    conf = NasExperimentConfig("ts", "simplified", "local")
    # Trials start as `{envs} {python} -m nni.nas.execution.training_service trial`: through the
    # supervisor, which has them forked by the warm worker (kind "nas") when it serves.
    # The worker gets the trials' environment (PYTHONSAFEPATH included, set below for the manager):
    # a worker whose import-time variables differ from its trials' would refuse them.
    warm_env = warm_worker.for_search(wd.root, "nas", bool(cfg.search.warm_worker),
                                      env=dict(os.environ, **SAFE_PATH_ENV))
    conf._trial_command_params = {  # NNI's own hook for this template
        "envs": " ".join(f"{k}={shlex.quote(v)}" for k, v in warm_env.items()),
        "python": f"{shlex.quote(sys.executable)} -m nni_effbert.nas.supervisor"}
    conf.experiment_name = f"effbert-{cfg.task_label}-{wd.root.name}-nas"
    conf.trial_concurrency = int(cfg.search.trial_concurrency)
    conf.experiment_working_directory = str(wd.root / EXPERIMENTS_DIR)
    _schedule_gpus(conf, cfg)
    experiment = _nas_experiment_class()(space, evaluator.as_nni_evaluator(), strategy, conf, id=resume)
    holder["experiment"] = experiment
    # Warm-ups run in this process: they write this experiment's supernets, as NNI's trials of it
    # (NNI_EXP_ID) read them.
    evaluator.experiment = experiment.id
    search_lock.update(wd, lock, experiment=experiment.id)
    save_experiment_config(cfg, experiment.id)  # what `--experiment ID` commands and a resume read
    url = f"http://localhost:{port}"
    print(f"NAS experiment {experiment.id} {'resumed' if resume else 'started'}: web UI {url} "
          "(warm-ups run in this process)", flush=True)
    logger.warning(web_ui_warning(port))
    shown_config = shlex.quote(config_path) if config_path else "<config>"
    print(f"  stop it with Ctrl-C (or SIGTERM); resume with: nni-effbert search -c {shown_config} "
          f"--python --resume {experiment.id}", flush=True)
    result = SearchResult(experiment.id, url, "RUNNING", wd.root, None, port=port)

    def on_sigterm(signum, frame):
        raise _Interrupted()

    saved_env = {key: os.environ.get(key) for key in SAFE_PATH_ENV}
    previous = signal.signal(signal.SIGTERM, on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        # NNI catches Ctrl-C (and our SIGTERM) in run/resume, stops and checkpoints; None then.
        # The manager and its trials (run in this working directory) inherit PYTHONSAFEPATH, so a
        # module file here cannot shadow an installed package in them.
        os.environ.update(SAFE_PATH_ENV)
        if resume:
            with _nas_channel_skips_resume_commands():
                finished = experiment.resume(port=port)
        else:
            finished = experiment.run(port=port)
        result.status = "DONE" if finished else "STOPPED"
    except Exception as exc:  # the strategy's own failure (e.g. a failed warm-up) ends the search
        result.status, result.error = "ERROR", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        logger.error("NAS experiment %s failed: %s", experiment.id, result.error)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        experiment.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        warm_worker.stop_for_search(warm_env, "nas")
    if strategy.search is not None:
        result.trials = [normalize_trial(t) for t in _records_to_trials(strategy, wd)]
        result.trials_file = wd.root / TRIALS_FILE
        atomic_write_json({"experiment_id": experiment.id, "trials": result.trials}, result.trials_file)
        if result.status == "DONE" and strategy.search.done is not None and strategy.search.done.failed:
            result.status, result.error = "ERROR", strategy.search.done.reason
    if result.status == "STOPPED":
        print(f"NAS experiment {experiment.id} stopped; resume with: nni-effbert search -c "
              f"{shown_config} --python --resume {experiment.id}", flush=True)
    return result


