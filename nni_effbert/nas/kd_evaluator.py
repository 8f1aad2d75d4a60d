"""``KDEvaluator``: score one architecture by knowledge distillation.

Given an arch (``label -> value``), the evaluator

1. loads the stage's warmed supernet of the trial's experiment (``supernet/<experiment
   id>/stage{N}.pt``, never another experiment's; see :meth:`KDEvaluator.load_stage`),
2. takes ``space.subnet(arch)``: a plain student whose weights are slices of the supernet's,
3. KD fine-tunes it on the task's student-train rows against the cached teacher outputs for
   ``evaluator.train_steps`` steps (or ``evaluator.epochs``; ``0`` scores the inherited
   weights as they are, the paper's stage 3), scoring it on the held-out search split every
   ``eval_interval`` steps and reporting that with ``nni.report_intermediate_result``,
4. reports ``nni.report_final_result`` with the ``evaluator.objective`` as ``default`` (see
   :mod:`.objectives`; every objective's ``search_*`` value is in the dict) plus parameter
   counts, CPU latency (:mod:`.latency`) and the per-layer expressions, widths and stacks.

The search never reads the dev split: it is kept for the final report.

A candidate whose loss turns NaN or whose forward fails raises
:class:`~nni_effbert.kd.train.TrialFailure` and reports nothing: NNI records the trial as
FAILED (the trial process exits non-zero) and the reason is in its log. It is never
reported as a score of 0.

The same evaluator serves ``nnictl`` trials (:mod:`nni_effbert.trial`) and ``NasExperiment``
(:meth:`KDEvaluator.as_nni_evaluator`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..config import ExperimentConfig, from_dict, load_config
from ..errors import CheckpointError, ConfigError, DiskFullError, EffBertError
from ..io import atomic_write_json
from ..latency.measure import measure_latency
from ..latency.settings import latency_settings, table_path, torch_device
from ..latency.table import load_table
from ..kd.setup import KDSetup
from ..kd.train import TrainSettings, TrialFailure, kd_train
from ..workdir import WorkDir
from .objectives import objective_value, search_metric_dict
from ..params import is_warmup
from .supernets import (experiment_key, latest_stage, load_supernet_checkpoint, missing_message, resolve_checkpoint,
                        supernet_source)
from .warmup import run_warmup_parameters, warmup_required

__all__ = ["ArchError", "KDEvaluator", "evaluate_nni_model"]

logger = logging.getLogger(__name__)

ConfigLike = Union[ExperimentConfig, str, "os.PathLike[str]", Mapping[str, Any]]


class ArchError(EffBertError, ValueError):
    """An architecture does not belong to the experiment's space (unknown, missing or
    out-of-range labels); the message names the label and the allowed values."""


def _as_config(cfg_or_path: ConfigLike, overrides: Sequence[str]) -> ExperimentConfig:
    if isinstance(cfg_or_path, ExperimentConfig):
        if overrides:
            raise ConfigError("overrides can only be applied to a config file, not to a loaded ExperimentConfig")
        return cfg_or_path
    if isinstance(cfg_or_path, Mapping):
        if overrides:
            raise ConfigError("overrides can only be applied to a config file, not to a config dict")
        return from_dict(ExperimentConfig, dict(cfg_or_path), "<config dict>")
    return load_config(cfg_or_path, list(overrides))


_standalone_runs = itertools.count()


def _trial_id() -> str:
    """NNI's trial id, or a unique name for runs outside an NNI trial process."""
    import nni  # local: only a trial inside NNI reports; export/distill never import nni

    tid = nni.get_trial_id()
    if tid and tid != "STANDALONE":
        return str(tid)
    return f"standalone-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_standalone_runs)}"


class KDEvaluator:
    """Score architectures of an experiment by KD fine-tuning + dev evaluation.

    Parameters
    ----------
    cfg_or_path : ExperimentConfig, path or dict
        The experiment config (a YAML path, a loaded config, or ``ExperimentConfig.to_dict()``).
    stage : int, optional
        Zero-based stage whose supernet candidates inherit. None: the latest stage with a
        checkpoint (stage 0 when there is none).
    overrides : sequence of str
        ``dotted.key=value`` overrides (with a path only).
    report : bool
        Send results to NNI (``nni.report_*``); outside NNI they are logged.
    progress : bool
        Progress bars.
    latency : bool
        Measure CPU latency (``evaluator.latency_repeats`` batch-1 forwards;
        ``evaluator.inherited_latency_repeats`` for a candidate scored without training).
    setup : KDSetup, optional
        An already loaded experiment of the same config, to share.
    experiment : str, optional
        The NNI experiment whose supernets candidates inherit (and warm-ups write). Default
        :func:`~.supernets.experiment_key`: ``$NNI_EXP_ID`` inside an NNI trial, else none (the
        work directory's own warm-ups, ``supernet/stage{N}.pt``). Same as ``supernet=ID``.
    supernet : str, path or dict, optional
        Where candidates take their weights from (:func:`~.supernets.supernet_source`):
        ``"workdir"`` (the work directory's warm-ups, ``nni-effbert warmup -c CONFIG --stage 0``),
        an experiment id, a checkpoint path, ``"own"`` (the running experiment's warm-ups, what
        the progressive strategy writes) or ``"auto"`` (default: ``experiment``'s rule above; in
        a ``NasExperiment``, ``"own"`` for the progressive strategy and ``"workdir"`` for any
        other strategy). ``"workdir"``, an id or a path is checked here: a missing supernet is a
        :class:`~nni_effbert.errors.CheckpointError` naming the warm-up command, before any trial.

    Examples
    --------
    >>> evaluator = KDEvaluator("examples/sst2/effbert.yml", stage=0)   # doctest: +SKIP
    >>> evaluator.evaluate(space.bert_arch())["default"]                 # doctest: +SKIP
    0.81
    >>> NasExperiment(space, evaluator.as_nni_evaluator(), strategy)      # doctest: +SKIP

    Any NNI strategy, on the work directory's warm-up (``nni-effbert warmup -c CONFIG --stage 0``):

    >>> evaluator = KDEvaluator("effbert.yml", supernet="workdir")          # doctest: +SKIP
    >>> NasExperiment(evaluator.space, evaluator.as_nni_evaluator(), Random())  # doctest: +SKIP
    """

    def __init__(self, cfg_or_path: ConfigLike, stage: Optional[int] = None, *, overrides: Sequence[str] = (),
                 report: bool = True, progress: bool = True, latency: bool = True,
                 setup: Optional[KDSetup] = None, experiment: Optional[str] = None, supernet: Any = None):
        self.cfg = _as_config(cfg_or_path, overrides)
        #: How to name the config in messages (``nni-effbert warmup -c CONFIG``).
        self.config_hint = str(cfg_or_path) if isinstance(cfg_or_path, (str, os.PathLike)) else "CONFIG"
        self.stage = stage
        self.report = report
        #: Added to the reported final metric (the trial sets which parameters it ran, see nni_effbert.params).
        self.reported_extra: Dict[str, Any] = {}
        self.progress = progress
        self.latency = latency
        self._setup: Optional[KDSetup] = setup
        self._loaded_stage: Optional[int] = None
        #: The checkpoint the last :meth:`load_stage` read: path, sha1, owner, created (None: none).
        self.supernet: Optional[Dict[str, Any]] = None
        self.use_supernet(supernet, experiment=experiment)

    def __repr__(self) -> str:
        return (f"KDEvaluator(workdir={self.cfg.workdir!r}, stage={self.stage}, experiment={self.experiment!r}, "
                f"supernet={self.supernet_source!r})")

    def use_supernet(self, supernet: Any = None, *, experiment: Optional[str] = None, check: bool = True) -> None:
        """Choose where candidates take their weights from (see the class parameters).

        Raises
        ------
        ConfigError
            ``supernet`` is not a source, or it contradicts ``experiment``.
        CheckpointError
            ``check`` and a ``"workdir"`` / experiment / checkpoint source has no supernet yet.
        """
        source = supernet_source(supernet)
        kind = source["source"]
        explicit = kind != "auto"  # only a stated supernet= is checked here (experiment= keeps its old contract)
        if experiment and kind not in ("auto", "experiment"):
            raise ConfigError(f"KDEvaluator: experiment={experiment!r} and supernet={supernet!r} contradict "
                              "each other; pass one of them")
        if experiment and kind == "experiment" and source["experiment"] != experiment:
            raise ConfigError(f"KDEvaluator: experiment={experiment!r} and supernet={supernet!r} name two "
                              "experiments; pass one of them")
        if kind == "auto" and experiment:
            source = {"source": "experiment", "experiment": experiment_key(experiment)}
            kind = "experiment"
        #: The normalised ``supernet=`` choice (:func:`~.supernets.supernet_source`).
        self.supernet_source: Dict[str, Any] = source
        if kind == "experiment":
            self.experiment = experiment_key(source["experiment"])
        elif kind in ("workdir", "checkpoint"):
            self.experiment = None  # never $NNI_EXP_ID: the trial runs in another experiment than the warm-up
        else:  # auto, own: the experiment this process runs in, else the work directory's
            self.experiment = experiment_key(None)
        self._loaded = None
        if check and explicit and kind in ("workdir", "experiment", "checkpoint"):
            self.check_supernet()

    @property
    def setup(self) -> KDSetup:
        """The loaded experiment (teacher config, data, space), on first use."""
        if self._setup is None:
            self._setup = KDSetup.from_config(self.cfg, progress=self.progress)
        return self._setup

    @property
    def space(self):
        """The experiment's student space as an NNI model space (``EfficientBertSpace``, sharing
        the weights of the last loaded stage), for ``NasExperiment`` and NNI strategies.

        Asking for it imports ``nni.nas`` (pytorch_lightning); the evaluator itself works on
        ``setup.space``, the same space without NNI mutables, so trials never load them.
        """
        from nni_effbert.search_spaces.space import EfficientBertSpace  # local: nni.nas; never in a trial

        setup = self.setup
        setup.space = EfficientBertSpace.from_supernet(setup.space)  # the same weights, one object
        return setup.space

    # -- supernet --------------------------------------------------------------------------

    def load_stage(self, stage: Optional[int] = None) -> str:
        """Load the supernet weights candidates of ``stage`` inherit; returns where they came from.

        Checkpoints are those of :attr:`experiment` (``supernet/<id>/stage{N}.pt``; an
        experiment from before that layout reads ``supernet/stage{N}.pt``, with a note); one
        owned by another experiment is refused.

        * the stage's checkpoint if it exists;
        * else, if the stage warms up its supernet (``search.stages[N].warmup``), an error;
        * else the nearest earlier stage's checkpoint, else ``warmup.checkpoint``, else the
          random initialisation (logged as a run without warm-up).

        Raises
        ------
        CheckpointError
            The stage's checkpoint is missing although its warm-up is required, a named
            ``warmup.checkpoint`` is missing, or a checkpoint is corrupt or for another space.
        ConfigError
            The stage does not exist.
        """
        stage, source, desc, owned, legacy = self._locate(stage)
        setup = self.setup
        wd: WorkDir = setup.workdir
        cfg = self.cfg
        exp = self.experiment
        key = (stage, str(source) if source else None, source.stat().st_mtime_ns if source else None)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        if source is not None:
            owner_kw = {"experiment": exp} if owned else {}
            if owned and legacy:
                owner_kw["missing"] = missing_message(wd, stage, exp, cfg.search.stages[stage].name)
            data = load_supernet_checkpoint(setup.space, source, what=desc,
                                            teacher_fingerprint=setup.teacher_fingerprint,
                                            hint=f"re-run `nni-effbert warmup -c <config> --stage {stage}`", **owner_kw)
            # What exactly was inherited (the trial's record keeps it): a reader can tell which
            # warm-up trial wrote the weights and that the file was the complete one.
            self.supernet = {"path": str(source), "sha1": _sha1(source), "owner": data.get("owner"),
                             "created": data.get("created")}
        else:
            setup.reset_space()
            self.supernet = None
            logger.warning("stage %d: running WITHOUT warm-up: candidates start from randomly initialised weights",
                           stage)
        self._loaded = (key, desc)
        self._loaded_stage = stage
        logger.info("stage %d candidates inherit weights from %s", stage, desc)
        return desc

    def check_supernet(self, stage: Optional[int] = None) -> Tuple[int, Optional[Path]]:
        """Check, without loading anything, that the supernet candidates of ``stage`` inherit
        is there; returns ``(stage, checkpoint or None for a run without warm-up)``.

        Raises
        ------
        CheckpointError
            One line naming the missing file and the command that writes it.
        ConfigError
            The stage does not exist.
        """
        stage, source, _, _, _ = self._locate(stage)
        return stage, source

    def _locate(self, stage: Optional[int]) -> Tuple[int, Optional[Path], str, bool, bool]:
        """``(stage, source, description, owned, legacy)`` of :meth:`load_stage` (raises the same errors)."""
        wd = WorkDir.of(self.cfg)  # not self.setup: checking must stay cheap (no data, no teacher)
        cfg = self.cfg
        exp = self.experiment
        kind = self.supernet_source["source"]
        n = len(cfg.search.stages)
        if stage is None:
            stage = self.stage
        if stage is None and kind != "checkpoint":
            latest = latest_stage(wd, exp)
            stage = latest if latest is not None else 0
        elif stage is None:
            stage = 0
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < n:
            raise ConfigError(f"stage {stage!r} does not exist: the config has {n} stage(s), numbered 0..{n - 1}")
        if kind == "checkpoint":
            path = Path(self.supernet_source["path"])
            if not path.is_file():
                raise CheckpointError(f"KDEvaluator(supernet={str(path)!r}): the checkpoint does not exist; pass an "
                                      "existing supernet checkpoint (supernet/stage{N}.pt of a work directory) or "
                                      f"warm one up with `nni-effbert warmup -c {self.config_hint} --stage 0`")
            return stage, path, f"supernet checkpoint {path}", False, False
        path, legacy = resolve_checkpoint(wd, stage, exp)
        if path.is_file():
            return stage, path, f"stage {stage} supernet", True, legacy
        if warmup_required(cfg, stage):
            name = cfg.search.stages[stage].name
            if kind == "workdir":
                raise CheckpointError(
                    f"KDEvaluator(supernet='workdir'): the work directory {wd.root} has no supernet of stage {stage} "
                    f"({name}) yet ({path} does not exist); warm it up once before the experiment: `nni-effbert "
                    f"warmup -c {self.config_hint} --stage {stage}` (or pass supernet=EXPERIMENT_ID or a checkpoint path)")
            raise CheckpointError(missing_message(wd, stage, exp, name))
        earlier = latest_stage(wd, exp, stage - 1) if stage > 0 else None
        if earlier is not None:
            source, legacy = resolve_checkpoint(wd, earlier, exp)
            return stage, source, f"stage {earlier} supernet (stage {stage} has no warm-up)", True, legacy
        if cfg.warmup.checkpoint:
            if not Path(cfg.warmup.checkpoint).is_file():
                raise CheckpointError(
                    f"warmup.checkpoint names {cfg.warmup.checkpoint}, which does not exist; fix the path or "
                    "empty warmup.checkpoint"
                )
            return stage, Path(cfg.warmup.checkpoint), f"warmup.checkpoint {cfg.warmup.checkpoint}", False, False
        return stage, None, "random initialisation (no warm-up)", True, False

    # -- evaluation ------------------------------------------------------------------------

    def train_steps(self, override: Optional[int] = None) -> int:
        """KD steps per candidate: ``override`` (the trial's ``_train_steps``), else
        ``evaluator.train_steps``, else ``evaluator.epochs`` over the train split."""
        ev = self.cfg.evaluator
        if override is not None:
            if isinstance(override, bool) or not isinstance(override, int) or override < 0:
                raise ConfigError(f"train steps must be an integer >= 0, got {override!r}")
            return override
        if ev.train_steps is not None:
            return int(ev.train_steps)
        per_epoch = math.ceil(len(self.setup.task.train) / ev.batch_size)
        return max(1, math.ceil(float(ev.epochs) * per_epoch))

    def validate_arch(self, arch: Mapping[str, Any]) -> Dict[str, Any]:
        """Check ``arch`` against the experiment's space.

        Raises
        ------
        ArchError
            Naming the bad label and the allowed values.
        """
        try:
            return self.setup.space.validate_arch(arch)
        except ValueError as exc:
            raise ArchError(f"invalid architecture: {exc}") from None

    def evaluate(self, arch: Mapping[str, Any], *, stage: Optional[int] = None, train_steps: Optional[int] = None,
                 trial_id: Optional[str] = None, rescore_of: Optional[int] = None) -> Dict[str, Any]:
        """Score ``arch`` and report it to NNI.

        Parameters
        ----------
        arch : dict
            ``label -> value`` (validated).
        stage : int, optional
            Overrides the evaluator's stage.
        train_steps : int, optional
            Overrides the KD budget (``0``: score inherited weights).
        trial_id : str, optional
            Name of the record folder ``trials/<id>/``; default the NNI trial id.
        rescore_of : int, optional
            This evaluation scores again the arch of the search's trial ``rescore_of``
            (``_rescore_of``, ``search.noise_rescores``): its KD fine-tune uses the next evaluator
            seed, and the result says so (``rescore_of``).

        Returns
        -------
        dict
            The final metric dict: ``default`` (the ``evaluator.objective`` on the search split),
            ``objective``, ``search_metric`` (+ ``search_<component>``), ``search_kd_loss``,
            ``search_kd_pred_loss`` (+ attention / hidden terms), ``search_rows``, ``params``, ``non_embedding_params``, ``latency_ms``, ``expressions``, ``widths``,
            ``stacks``, ``stage``, ``train_steps``, ``evaluator_seed``, ``inherited_from``, ``seconds``
            (and ``rescore_of`` for a re-score).

        Raises
        ------
        ArchError
            The arch is not in the space.
        TrialFailure
            The loss diverged or the forward failed (nothing is reported).
        CheckpointError
            The stage's supernet is missing (see :meth:`load_stage`).
        """
        started = time.perf_counter()
        setup = self.setup
        arch = self.validate_arch(arch)
        stage = self.stage if stage is None else stage
        steps = self.train_steps(train_steps)
        record = setup.workdir.trial_dir(trial_id or _trial_id()) / "result.json"
        try:
            inherited = self.load_stage(stage)
            stage = self._loaded_stage
            result = self._score(arch, stage, steps, inherited, seed_offset=0 if rescore_of is None else 1)
            if rescore_of is not None:
                result["rescore_of"] = int(rescore_of)
        except TrialFailure as exc:
            _write_record(record, {"status": "failed", "reason": str(exc), "arch": arch, "stage": stage})
            raise
        result["seconds"] = round(time.perf_counter() - started, 3)
        _write_record(record, {"status": "succeeded", "result": result, "arch": arch})
        if self.report:
            import nni  # local: only a trial inside NNI reports; export/distill never import nni

            nni.report_final_result({**result, **self.reported_extra})
        logger.info("search split: %s = %.4f, KD loss %.4f; default (%s) = %.4f (%d params, %.2f ms)",
                    setup.task.spec.metric, result["search_metric"], result["search_kd_loss"], result["objective"],
                    result["default"], result["params"], result.get("latency_ms", float("nan")))
        return result

    def evaluate_model(self, model, **kwargs) -> Dict[str, Any]:
        """:meth:`evaluate` the arch of a frozen student (``model.arch``); its own weights are
        ignored: candidates always inherit the stage's supernet."""
        arch = getattr(model, "arch", None)
        if not isinstance(arch, Mapping):
            raise ArchError(f"expected an EfficientBertModel with an .arch dict, got {type(model).__name__}")
        return self.evaluate(arch, **kwargs)

    def _score(self, arch: Dict[str, Any], stage: int, steps: int, inherited: str,
               seed_offset: int = 0) -> Dict[str, Any]:
        setup, cfg = self.setup, self.cfg
        ev = cfg.evaluator
        seed = (cfg.seed if ev.seed is None else ev.seed) + int(seed_offset)
        space = setup.space
        try:
            student = space.subnet(arch)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrialFailure(f"cannot build the subnet: {exc}") from exc
        student.to(setup.device)
        spec = setup.task.spec
        last_eval: Dict[str, Any] = {}
        objective = ev.objective

        def periodic(step: int) -> Dict[str, float]:
            scored = search_metric_dict(setup.score_search(student), spec.metric)
            last_eval.update(step=step, scored=scored)
            value = objective_value(scored, objective)
            logger.info("step %d/%d: search %s = %.4f, KD loss %.4f", step, steps, spec.metric,
                        scored["search_metric"], scored["search_kd_loss"])
            if self.report:
                import nni  # local: only a trial inside NNI reports; export/distill never import nni

                nni.report_intermediate_result({"default": value, "step": step, "search_metric": scored["search_metric"],
                                                "search_kd_loss": scored["search_kd_loss"]})
            return {"default": value}

        loss = None
        if steps > 0:
            settings = TrainSettings(
                steps=steps, learning_rate=ev.learning_rate, batch_size=ev.batch_size, seed=seed,
                eval_interval=ev.eval_interval, desc=f"KD stage {stage}", progress=self.progress,
            )
            out = kd_train(student, setup.cached_teacher(), setup.task.train, setup.loss_fn, settings,
                           pad_token_id=setup.pad_token_id, evaluate_fn=periodic, device=setup.device,
                           runtime=setup.runtime)
            loss = out.loss
        if last_eval.get("step") == steps and steps > 0:
            scored = last_eval["scored"]  # the periodic evaluation already scored the final weights
        else:
            scored = search_metric_dict(setup.score_search(student), spec.metric)
        result: Dict[str, Any] = {"default": objective_value(scored, objective), "objective": objective}
        result.update(scored)
        result["params"] = int(space.count_params(arch))
        result["non_embedding_params"] = int(space.count_params(arch, exclude_embeddings=True))
        if self.latency:
            settings = latency_settings(cfg)
            student.to(torch_device(settings.device))
            repeats = ev.latency_repeats if steps > 0 else (ev.inherited_latency_repeats or ev.latency_repeats)
            lat = measure_latency(student, seq_length=settings.seq_length, repeats=repeats,
                                  seed=cfg.seed, threads=settings.threads, batch_size=settings.batch_size,
                                  runtime=settings.runtime)
            result["latency_ms"] = round(lat.median_ms, 4)
            result["latency_runtime"] = settings.runtime
            table = self.latency_table()
            if table is not None:
                result["predicted_latency_ms"] = round(table.predict(arch), 4)
        described = space.describe(arch)
        result["expressions"] = [layer["expression"] for layer in described]
        result["widths"] = [int(layer["width"]) for layer in described]
        result["stacks"] = [int(layer["stack"]) for layer in described]
        result["stage"] = stage
        result["train_steps"] = steps
        result["evaluator_seed"] = seed
        if loss is not None:
            result["kd_loss"] = loss
        result["inherited_from"] = inherited
        if self.supernet is not None:
            result["supernet"] = dict(self.supernet)
        result["supernet_source"] = self.resolved_supernet()
        return result

    def resolved_supernet(self) -> Dict[str, Any]:
        """The supernet source as a reader of the trial's record can use it again (``export``):
        ``{"source": "experiment", "experiment": ID}``, ``{"source": "workdir"}`` or
        ``{"source": "checkpoint", "path": ...}``; ``auto`` / ``own`` resolved."""
        if self.supernet_source["source"] == "checkpoint":
            return dict(self.supernet_source)
        if self.experiment:
            return {"source": "experiment", "experiment": self.experiment}
        return {"source": "workdir"}

    #: Whose work directory holds the latency table (default: this config's; a multi-task
    #: search's tasks read the table of the multi-task work directory, which its tuner uses).
    latency_root: Optional[str] = None

    def latency_table(self):
        """The work directory's complete latency table for this config, or None (never built here:
        ``nni-effbert latency`` and ``nni-effbert search`` build it)."""
        if not hasattr(self, "_latency_table"):
            settings = latency_settings(self.cfg)
            config = self.setup.space.config  # not self.space: that builds the NNI space (nni.nas)
            root = self.latency_root or self.cfg.workdir
            table = load_table(table_path(root, config, settings), config, settings)
            self._latency_table = table if table is not None and table.complete else None
        return self._latency_table

    # -- NNI -------------------------------------------------------------------------------

    def warmup(self, parameters: Mapping[str, Any]) -> Dict[str, Any]:
        """Run a warm-up trial's parameters (``{"_warmup_stage": N, ...}``) in this process.

        This is the ``warmup_fn`` of :class:`~nni_effbert.strategies.nni.strategy.ProgressiveStrategy`
        (``NasExperiment`` path); it reuses this evaluator's loaded data and returns the
        warm-up's metric dict.
        """
        if not is_warmup(parameters):
            raise ConfigError(f"warm-up parameters need _warmup_stage, got keys {sorted(parameters)}")
        self._loaded = None  # the warm-up overwrites the supernet weights held in memory
        return run_warmup_parameters(self.cfg, parameters, report=False, progress=self.progress, setup=self.setup,
                                     experiment=self.experiment)

    def as_nni_evaluator(self, stage: Optional[int] = None, train_steps: Optional[int] = None):
        """This evaluator as an NNI NAS evaluator (a ``FunctionalEvaluator``) for ``NasExperiment``.

        The evaluation function receives the frozen ``EfficientBertModel`` NNI builds for a
        sample, reads ``model.arch`` and scores it with weights inherited from the stage's
        supernet checkpoint (never the freshly initialised weights NNI created). A sample's
        ``_stage`` / ``_train_steps`` keys (set by ``ProgressiveStrategy``) choose the stage and
        budget of each candidate.

        The evaluator's ``supernet=`` choice travels with it to every trial (its ``supernet``
        argument), resolved before NNI submits the trial. ``auto`` / ``own``: a sample of the
        progressive strategy (``_stage``) reads what this evaluator's warm-ups wrote (its
        :attr:`experiment`'s supernets, else the work directory's); with ``auto`` any other
        strategy's sample reads the work directory's, and a missing one stops the experiment
        at its first sample with one line naming ``nni-effbert warmup -c CONFIG --stage 0``.

        Parameters
        ----------
        stage : int, optional
            Stage when the sample names none. Default: the evaluator's stage (None: the
            latest warmed stage).
        train_steps : int, optional
            KD budget when the sample names none (default ``evaluator.train_steps``).
        """
        # Local: nni.nas.evaluator imports pytorch_lightning (about 6 s), which an nnictl trial
        # never needs; only the NasExperiment path comes here.
        from .nni_evaluator import StageAwareEvaluator

        stage = self.stage if stage is None else stage
        nas = StageAwareEvaluator(evaluate_nni_model, config=self.cfg.to_dict(), stage=stage, train_steps=train_steps,
                                  supernet=self._trial_supernet())

        checked: Dict[str, Any] = {}

        def resolve_supernet(progressive: bool) -> Dict[str, Any]:
            """The concrete source a sample's trial is told (see StageAwareEvaluator.freeze)."""
            if self.supernet_source["source"] == "own" or progressive:
                # Where this evaluator's warm-ups (the progressive strategy's warmup_fn) write.
                return self.resolved_supernet()
            if not checked:  # another strategy: the work directory's warm-up, checked once
                probe = KDEvaluator(self.cfg, stage, report=False, progress=False, latency=False)
                probe.config_hint = self.config_hint
                probe.use_supernet("workdir")
                checked["workdir"] = True
            return {"source": "workdir"}

        nas.resolve_supernet = resolve_supernet
        return nas

    def _trial_supernet(self) -> Dict[str, Any]:
        """What the trials of :meth:`as_nni_evaluator` are told: the explicit source, or ``auto``
        (resolved per sample by the NNI evaluator) / ``own`` as given."""
        source = dict(self.supernet_source)
        if source["source"] == "experiment":
            source["experiment"] = self.experiment  # run_python may have set the experiment afterwards
        return source


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_record(path: Path, data: Dict[str, Any]) -> None:
    try:
        atomic_write_json(data, path)
    except DiskFullError:
        # The trial fails (``disk full while writing .../result.json``) before it reports: the
        # --python search and a resumed one read their results from this record.
        raise
    except OSError as exc:  # otherwise a record is a convenience; never fail a scored trial over it
        logger.warning("could not write trial record %s: %s", path, exc)


# One evaluator per (config, stage) per process: NasExperiment's in-process engines call the
# evaluation function once per model, and reloading data and teacher each time is wasteful.
_EVALUATORS: Dict[str, KDEvaluator] = {}


def evaluate_nni_model(model, config: Mapping[str, Any], stage: Optional[int] = None,
                       train_steps: Optional[int] = None, supernet: Any = None,
                       rescore_of: Optional[int] = None) -> Dict[str, Any]:
    """Evaluation function of :meth:`KDEvaluator.as_nni_evaluator` (module level, so NNI can
    serialise it): scores ``model.arch`` with the supernet the evaluator was told
    (``supernet``, see :func:`~.supernets.supernet_source`) and reports it to NNI, with the arch
    (NNI's NAS trial parameters are the serialised model, not the ``label -> value`` dict)."""
    key = json.dumps([config, stage, supernet], sort_keys=True, default=str)
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        evaluator = _EVALUATORS[key] = KDEvaluator(config, stage, supernet=supernet)
    arch = getattr(model, "arch", None)
    evaluator.reported_extra["arch"] = dict(arch) if isinstance(arch, Mapping) else None
    return evaluator.evaluate_model(model, train_steps=train_steps, rescore_of=rescore_of)
