"""Final distillation of an exported student.

``nni-effbert distill -c exp.yml --export DIR`` runs EfficientBERT's final two-step KD (Dong et
al., 2021, Sec. 3.4, after TinyBERT) on the student exported into ``DIR``:

1. **general KD** (``distill.general_steps``): hidden states (through ``fit_dense``) and
   attention maps on unlabeled text -- ``distill.corpus_file`` (else ``warmup.corpus_file``;
   one file or a list, the ``general_steps x batch_size`` lines of a seeded subset) when set,
   else the task's train sentences, both through the shared teacher-output cache;
2. **transfer KD** (``distill.transfer_steps``, optional): the task-KD loss (predictions included)
   on unlabeled in-domain text (``distill.transfer_file``) against the teacher's soft labels, a
   transfer set in Hinton et al.'s sense and TinyBERT's task distillation on more text than the
   labelled rows; single-sentence tasks only, lines equal to a dev or search-split row dropped;
3. **task KD** (``distill.task_steps``): hidden states, attentions and predictions (``kd``) on
   the task's train split.

Both phases are :func:`~nni_effbert.kd.train.kd_train`. The distilled student is scored on dev,
its CPU latency measured (``evaluator.latency_seq_length``, batch 1, median), and the folder is
re-exported atomically with the new weights; ``export_meta.json`` then holds, under
``extra.distill``, the plan, the dev metric, the latency and the training curve.

Departure from the paper: the paper's general KD runs on Wikipedia for many epochs and starts
from the supernet; here it starts from the exported weights (the supernet slice of the
architecture) and runs on whatever text the config gives, for the configured steps.

The hand-designed baselines the report compares with are built in :mod:`.baselines` and
distilled here with the same budget.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from nni_effbert.search_spaces.space_config import config_differences

from ..config import ExperimentConfig
from ..data.corpus import corpus_files, unlabeled_texts
from ..errors import CheckpointError, ConfigError
from ..latency.measure import measure_latency
from ..kd.losses import KDLoss
from ..kd.setup import KDSetup
from ..kd.sources import CachedTeacher
from ..kd.train import TrainSettings, kd_train
from .export import export_student
from .loader import load_exported

__all__ = [
    "DISTILL_KEY",
    "DistillPlan",
    "DistillResult",
    "plan_distill",
    "run_distill",
    "distill_record",
]

logger = logging.getLogger(__name__)

#: Key under ``export_meta.json``'s ``extra`` holding the final-distillation record.
DISTILL_KEY = "distill"


@dataclass
class DistillPlan:
    """What one final distillation does; equal plans on the same export give the same result.

    Attributes
    ----------
    general_steps, task_steps : int
    learning_rate : float
    batch_size : int
    eval_interval : int
    seed : int
        ``distill.seed`` (default: the top-level ``seed``).
    corpus : str, list of str or None
        ``distill.corpus_file`` (else ``warmup.corpus_file``) of the general phase (None: the
        task's train sentences).
    transfer_steps : int
        ``distill.transfer_steps`` (0: no transfer phase).
    transfer : str, list of str or None
        ``distill.transfer_file``.
    """

    general_steps: int
    task_steps: int
    learning_rate: float
    batch_size: int
    eval_interval: int
    seed: int
    corpus: Any
    transfer_steps: int = 0
    transfer: Any = None

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.transfer_steps:  # plans without a transfer phase keep their earlier records' form
            out.pop("transfer_steps")
            out.pop("transfer")
        return out


@dataclass
class DistillResult:
    """Outcome of :func:`run_distill`.

    Attributes
    ----------
    path : Path
        The export folder (rewritten with the distilled weights).
    metric : str
        Name of the task metric.
    dev_metric : float
        Dev metric after distillation.
    before : float or None
        Dev metric of the exported weights before distillation.
    latency_ms : float
        Median CPU latency (batch 1, ``seq_length`` tokens).
    seq_length : int
    params, non_embedding_params : int
    plan : DistillPlan
    skipped : bool
        True if the folder was already distilled with the same plan (nothing trained).
    seconds : float
    curve : list of (int, float)
        ``(task step, dev metric)`` of the periodic evaluations.
    """

    path: Path
    metric: str
    dev_metric: float
    before: Optional[float]
    latency_ms: float
    seq_length: int
    params: int
    non_embedding_params: int
    plan: DistillPlan
    skipped: bool = False
    seconds: float = 0.0
    curve: List[Tuple[int, float]] = field(default_factory=list)


def distill_record(meta: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The distillation record of an export's metadata (``extra.distill``), or None."""
    record = (meta.get("extra") or {}).get(DISTILL_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def plan_distill(cfg: ExperimentConfig) -> DistillPlan:
    """The plan of ``cfg.distill`` (plus the seed and the general-KD corpus)."""
    d = cfg.distill
    if d.general_steps + d.task_steps == 0:
        raise ConfigError("distill.general_steps and distill.task_steps are both 0: nothing to distil; "
                          "give at least one of them steps")
    if d.general_steps and cfg.kd.attention_weight == 0 and cfg.kd.hidden_weight == 0:
        raise ConfigError("distill.general_steps needs kd.attention_weight or kd.hidden_weight > 0 "
                          "(general KD has no predictions to distil); set distill.general_steps=0 or a weight")
    seed = cfg.seed if d.seed is None else d.seed  # load_config fills distill.seed; a hand-built cfg may not
    transfer_steps = int(getattr(d, "transfer_steps", 0) or 0)
    return DistillPlan(general_steps=int(d.general_steps), task_steps=int(d.task_steps),
                       learning_rate=float(d.learning_rate), batch_size=int(d.batch_size),
                       eval_interval=int(d.eval_interval), seed=int(seed), corpus=_corpus(cfg),
                       transfer_steps=transfer_steps,
                       transfer=getattr(d, "transfer_file", None) if transfer_steps else None)


def _corpus(cfg: ExperimentConfig):
    """The general-KD corpus: ``distill.corpus_file``, else ``warmup.corpus_file`` (None: task sentences)."""
    return getattr(cfg.distill, "corpus_file", None) or cfg.warmup.corpus_file


def _check_compatible(exported, setup) -> None:
    """The export must be a student of this experiment's space (same teacher, vocabulary, task)."""

    details = config_differences(exported.config.to_dict(), setup.space.config.to_dict())
    if details:
        raise CheckpointError(
            f"the student in {exported.path} belongs to another student space than this config's ({details}); "
            "distil it with the config it was exported with, or re-export it with this one"
        )


def _general_source(setup, cfg: ExperimentConfig, plan: Optional[DistillPlan] = None):
    """(dataset, teacher source, description) of the general-KD text."""
    plan = plan or plan_distill(cfg)
    if plan.corpus:
        # The lines general_steps batches can see (a seeded subset), teacher outputs cached like
        # the task's, so the baseline and every distill seed share one teacher pass.
        key = "distill.corpus_file" if getattr(cfg.distill, "corpus_file", None) else "warmup.corpus_file"
        texts = unlabeled_texts(cfg, setup.tokenizer, cache_dir=str(setup.workdir.datasets_cache), corpus=plan.corpus,
                                key=key, max_rows=max(1, plan.general_steps * plan.batch_size), seed=int(cfg.seed))
        max_len = cfg.warmup.max_seq_length or cfg.task.max_seq_length
        cache = setup.open_cache(texts, texts._fingerprint, f"corpus{max_len}")
        files = ", ".join(corpus_files(plan.corpus))
        return texts, CachedTeacher(cache, setup.device), f"corpus {files} ({len(texts)} lines, cached teacher)"
    # The task's train sentences at the task's length: exactly what the shared cache holds,
    # so no teacher forward is paid again.
    return setup.task.train, setup.cached_teacher(), "task train sentences (cached teacher)"


def _transfer_source(setup, cfg: ExperimentConfig, plan: DistillPlan):
    """(dataset, teacher source, description) of the transfer set.

    The seeded subset of ``transfer_steps x batch_size`` lines, without any line whose tokens equal
    a dev or search-split row's (those rows are held out: a student must not see them, even
    unlabelled), with the teacher's outputs cached once like the general corpus's.

    Raises
    ------
    ConfigError
        A sentence-pair task (corpus lines are single sentences), or a transfer set left empty
        by the held-out filter.
    """
    spec = setup.task.spec
    if len(spec.text_columns) != 1:
        raise ConfigError(
            f"distill.transfer_file: task {spec.name!r} has sentence pairs ({', '.join(spec.text_columns)}) but a "
            "transfer file holds single sentences; transfer sets are supported for single-sentence tasks only "
            "(set distill.transfer_steps=0)")
    texts = unlabeled_texts(cfg, setup.tokenizer, cache_dir=str(setup.workdir.datasets_cache), corpus=plan.transfer,
                            key="distill.transfer_file", max_rows=max(1, plan.transfer_steps * plan.batch_size),
                            seed=int(cfg.seed) + 1)
    held_out = {tuple(ids) for split in (setup.task.dev, getattr(setup.task, "search", None)) if split is not None
                for ids in split["input_ids"]}
    kept = texts.filter(lambda ids: tuple(ids) not in held_out, input_columns="input_ids",
                        desc="drop held-out rows", new_fingerprint=f"{texts._fingerprint}-heldout-{len(held_out)}")
    if len(kept) < len(texts):
        logger.info("transfer set: dropped %d line(s) equal to a dev or search-split row", len(texts) - len(kept))
    if len(kept) == 0:
        raise ConfigError(f"distill.transfer_file: every line of {', '.join(corpus_files(plan.transfer))} equals a "
                          "dev or search-split row; give in-domain text that is not the evaluation data")
    max_len = cfg.warmup.max_seq_length or cfg.task.max_seq_length
    cache = setup.open_cache(kept, kept._fingerprint, f"transfer{max_len}")
    files = ", ".join(corpus_files(plan.transfer))
    return kept, CachedTeacher(cache, setup.device), f"transfer set {files} ({len(kept)} lines, cached teacher)"


def run_distill(cfg: ExperimentConfig, export_dir, *, force: bool = False, progress: bool = True,
                setup=None) -> DistillResult:
    """Distil the student of an export folder (general KD, then task KD) and re-export it.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (teacher, task, ``kd``, ``distill``, latency settings).
    export_dir : str or Path
        A folder written by ``nni-effbert export`` (:func:`~nni_effbert.product.export.export_student`).
    force : bool
        Distil again even if the folder was already distilled with the same plan (a second
        distillation continues from the distilled weights).
    progress : bool
        Progress bars.
    setup : KDSetup, optional
        An already loaded experiment (shared by several distillations).

    Returns
    -------
    DistillResult

    Raises
    ------
    CheckpointError
        Missing or corrupt export folder, no fine-tuned teacher, or a student of another space.
    ConfigError
        A distill budget of 0 steps.
    TrialFailure
        If the KD loss diverges (nothing is written).
    """

    started = time.perf_counter()
    folder = Path(export_dir).expanduser().absolute()
    exported = load_exported(folder)
    record = distill_record(exported.meta)
    plan = plan_distill(cfg)
    if record is not None and not force:
        if record.get("plan") == plan.to_dict():
            logger.info("%s is already distilled with the same plan; nothing to do (force=True redoes it)", folder)
            return DistillResult(
                path=folder, metric=str(record["metric"]), dev_metric=float(record["dev_metric"]),
                before=record.get("before"), latency_ms=float(record["latency_ms"]),
                seq_length=int(record["latency_seq_length"]), params=int(exported.meta["params"]),
                non_embedding_params=int(exported.meta["non_embedding_params"]), plan=plan, skipped=True,
                seconds=time.perf_counter() - started, curve=[tuple(x) for x in record.get("curve", [])])
        logger.warning("%s was distilled with another plan; distilling it again from its current weights", folder)

    setup = setup or KDSetup.from_config(cfg, progress=progress)
    _check_compatible(exported, setup)
    model = exported.model.to(setup.device)
    spec = setup.task.spec
    metric_name = "f1" if spec.is_span else spec.metric  # span QA: F1 (EM is in dev_scores)
    before = setup.evaluate(model)["default"]
    logger.info("%s: dev %s before distillation = %.4f", folder.name, metric_name, before)

    n_student = exported.config.num_hidden_layers
    n_teacher = int(setup.teacher_config.num_hidden_layers)
    curve: List[Tuple[int, float]] = []
    last_scores: Dict[str, Any] = {}  # the latest full dev metric dict (QA: exact and f1)
    phases = []
    if plan.general_steps:
        general_kd = dataclasses.replace(cfg.kd, prediction_weight=0.0)
        ds, teacher, desc = _general_source(setup, cfg, plan)
        phases.append(("general", plan.general_steps, ds, teacher,
                       KDLoss(general_kd, n_student, n_teacher, regression=bool(spec.is_regression)), desc))
    if plan.transfer_steps:
        ds, teacher, desc = _transfer_source(setup, cfg, plan)
        phases.append(("transfer", plan.transfer_steps, ds, teacher, setup.loss_fn, desc))
    if plan.task_steps:
        phases.append(("task", plan.task_steps, setup.task.train, setup.cached_teacher(), setup.loss_fn,
                       "task train split (cached teacher)"))
    losses: Dict[str, Optional[float]] = {}
    for index, (name, steps, dataset, teacher, loss_fn, desc) in enumerate(phases):
        logger.info("%s: %s KD, %d steps on %s", folder.name, name, steps, desc)
        settings = TrainSettings(
            steps=steps, learning_rate=plan.learning_rate, batch_size=plan.batch_size,
            seed=plan.seed * 1_000_003 + 7919 + index,  # distinct from warm-up and trial seeds
            eval_interval=plan.eval_interval if name == "task" else 0,
            desc=f"distill {folder.name} ({name})", progress=progress,
        )

        def evaluate_fn(step: int) -> Dict[str, float]:
            metrics = setup.evaluate(model)
            curve.append((step, metrics["default"]))
            last_scores.clear()
            last_scores.update(metrics, step=step)
            return metrics

        out = kd_train(model, teacher, dataset, loss_fn, settings, pad_token_id=setup.pad_token_id,
                       evaluate_fn=evaluate_fn if name == "task" else None, device=setup.device,
                       runtime=setup.runtime)
        losses[name] = out.loss
    model.eval()
    # The reported score is the final model's (no dev-based checkpoint picking: dev is what
    # the report compares on).
    if not (curve and curve[-1][0] == plan.task_steps):
        last_scores.clear()
        last_scores.update(setup.evaluate(model), step=plan.task_steps)
        curve.append((plan.task_steps, float(last_scores["default"])))
    final = curve[-1][1]
    dev_scores = {k: float(v) for k, v in last_scores.items() if k != "step"}
    seq = int(cfg.evaluator.latency_seq_length)
    model = model.cpu()
    latency = measure_latency(model, seq_length=seq, repeats=int(cfg.evaluator.latency_repeats)).median_ms
    seconds = time.perf_counter() - started
    record = {
        "plan": plan.to_dict(), "metric": metric_name, "dev_metric": float(final), "before": float(before),
        "dev_scores": dev_scores,  # every component of the dev metric (QA: exact, f1, HasAns/NoAns)
        "latency_ms": float(latency), "latency_seq_length": seq, "latency_batch_size": 1,
        "kd_loss": losses, "curve": [list(c) for c in curve], "seconds": round(seconds, 1),
        "teacher_fingerprint": setup.teacher_fingerprint, "task_fingerprint": setup.task.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    extra = dict(exported.meta.get("extra") or {})
    extra[DISTILL_KEY] = record
    export_student(exported.config, exported.arch, model, folder, tokenizer=setup.tokenizer,
                   label_names=exported.label_names,
                   task=spec, extra_meta=extra)
    logger.info("%s distilled in %.0fs: dev %s %.4f -> %.4f, latency %.2f ms", folder.name, seconds, metric_name,
                before, final, latency)
    return DistillResult(path=folder, metric=metric_name, dev_metric=float(final), before=float(before),
                         latency_ms=float(latency), seq_length=seq, params=int(exported.meta["params"]),
                         non_embedding_params=int(exported.meta["non_embedding_params"]), plan=plan,
                         seconds=seconds, curve=curve)


# ---------------------------------------------------------------------------------------------
# The hand-designed baseline
# ---------------------------------------------------------------------------------------------


