"""What every KD command loads from a config: :class:`KDSetup` (work directory, fine-tuned
teacher, tokenizer, tokenized task, student space, KD loss, runtime) and :func:`build_space`,
the student space sized for the teacher and the task.

A setup is loaded once per process; the heavy parts (teacher model, teacher-output caches, the
dev batches) on first use. Its :meth:`KDSetup.evaluate` / :meth:`KDSetup.score_search` call the
scorers of :mod:`nni_effbert.kd.scoring` with the config's batch sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer

from nni_effbert.search_spaces.supernet import EfficientBertSupernet

from ..config import ExperimentConfig, single_task
from ..data.batches import length_sorted_batches
from ..data.prepared import load_prepared_task
from ..data.qa_answers import score_span_model, span_answers
from ..data.qa import load_qa_task
from ..data.tasks import QA_TASKS
from ..errors import CheckpointError, ConfigError
from ..runtime import Runtime, resolve_runtime
from ..workdir import WorkDir
from .cache import TeacherCache
from .losses import KDLoss
from .scoring import evaluate, predict, score_span_split, score_split
from .sources import Arch, Batch, CachedTeacher, LiveTeacher
from .teacher import FINGERPRINT_MEMO, MARKER_FILE, load_teacher, prepare_teacher, read_teacher_marker
from .student_start import student_preset
from .train import student_forward

__all__ = ["build_space", "KDSetup"]

# Student fields that must agree with the teacher and the task (set automatically).
_DERIVED = ("vocab_size", "fit_size", "num_labels", "pad_token_id", "type_vocab_size", "head")


def build_space(cfg: ExperimentConfig, teacher_config, spec):
    """The student space of an experiment, sized for its teacher and task.

    ``student.preset`` plus ``student.overrides``, with ``vocab_size``, ``type_vocab_size``
    and ``pad_token_id`` taken from the teacher, ``fit_size`` = the teacher's hidden size
    (hidden-state distillation goes through ``fit_dense``) and ``num_labels`` from the task.

    Parameters
    ----------
    cfg : ExperimentConfig
    teacher_config : transformers.PretrainedConfig
        The (fine-tuned) teacher's config.
    spec : TaskSpec

    Returns
    -------
    EfficientBertSupernet
        The space without NNI mutables (same API and weights as ``EfficientBertSpace``), so a
        trial process never imports ``nni.nas``; ``KDEvaluator.space`` turns it into an
        ``EfficientBertSpace`` sharing its weights, for ``NasExperiment``.

    Raises
    ------
    ConfigError
        Unknown preset or override, an override contradicting the teacher or task, or a
        sequence length beyond the student's position table.
    """

    derived = {
        "vocab_size": int(teacher_config.vocab_size),
        "type_vocab_size": int(getattr(teacher_config, "type_vocab_size", 2) or 2),
        "pad_token_id": int(getattr(teacher_config, "pad_token_id", 0) or 0),
        "fit_size": int(teacher_config.hidden_size),
        "num_labels": 1 if spec.is_regression else int(spec.num_labels),
        # Span QA: start / end logits over the last hidden states instead of pooler + classifier.
        "head": "span" if getattr(spec, "is_span", False) else "sequence",
    }
    preset, overrides = student_preset(cfg, teacher_config)  # student.preset: teacher -> the teacher's sizes
    for key in _DERIVED:
        if key in overrides and overrides[key] != derived[key]:
            raise ConfigError(
                f"student.overrides.{key} = {overrides[key]!r} contradicts the teacher/task ({derived[key]!r}); "
                f"leave {key} out: it is set from the teacher and the task"
            )
    try:
        space = EfficientBertSupernet.preset(preset, **{**overrides, **derived})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"student: {exc}") from None
    longest = max(cfg.task.max_seq_length, cfg.warmup.max_seq_length or 0)
    if longest > space.config.max_position_embeddings:
        raise ConfigError(
            f"task.max_seq_length / warmup.max_seq_length ({longest}) exceed the student's "
            f"max_position_embeddings ({space.config.max_position_embeddings}); lower them or set "
            "student.overrides.max_position_embeddings"
        )
    return space


@dataclass
class KDSetup:
    """What every KD command loads from a config, loaded once.

    Use :meth:`from_config`. Heavy parts (the teacher model, the teacher-output cache) are
    loaded on first use.

    Attributes
    ----------
    cfg : ExperimentConfig
    workdir : WorkDir
    teacher_dir : Path
        The fine-tuned teacher.
    teacher_marker : dict
        Its ``effbert_teacher.json``.
    tokenizer
        The teacher's tokenizer.
    teacher_config
        The teacher's HF config.
    task : TaskData
        The task, tokenized with the teacher's tokenizer.
    space : EfficientBertSupernet
        The student supernet (random weights until a checkpoint is loaded).
    loss_fn : KDLoss
    pad_token_id : int
    device : torch.device
    runtime : Runtime
        Device, precision and loader settings of every model this setup trains or runs
        (:func:`nni_effbert.runtime.resolve_runtime` of ``cfg``).
    """

    cfg: ExperimentConfig
    workdir: WorkDir
    teacher_dir: Path
    teacher_marker: Dict[str, Any]
    tokenizer: Any
    teacher_config: Any
    task: Any
    space: Any
    loss_fn: KDLoss
    pad_token_id: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    _teacher_model: Optional[nn.Module] = field(default=None, repr=False)
    _train_cache: Any = field(default=None, repr=False)
    _dev_batches: Any = field(default=None, repr=False)
    _search_cache: Any = field(default=None, repr=False)
    runtime: Any = None

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = Runtime(self.device)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, progress: bool = True) -> "KDSetup":
        """Load the teacher's config and tokenizer, the task data and the student space.

        Raises
        ------
        CheckpointError
            If the work directory holds no fine-tuned teacher, or one fine-tuned for other
            task data (run ``nni-effbert teacher`` first).
        ConfigError, DataError
            From the config, the data or the space.
        RuntimeConfigError
            If ``runtime`` asks for a device or precision this machine lacks.
        """

        single_task(cfg, "a KD setup")
        runtime = resolve_runtime(cfg)
        wd = WorkDir.of(cfg).ensure()
        teacher_dir = wd.teacher_dir
        hint = "run `nni-effbert teacher -c <config>` first"
        marker = read_teacher_marker(teacher_dir) if teacher_dir.is_dir() else None
        if marker is None:
            raise CheckpointError(f"no fine-tuned teacher in {teacher_dir} (no {MARKER_FILE}); {hint}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
            teacher_config = AutoConfig.from_pretrained(str(teacher_dir))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"the teacher in {teacher_dir} cannot be loaded ({exc}); delete it and {hint}") from exc
        # Tokenized once per work directory; later processes (every trial) read it from disk.
        identity = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(teacher_dir.iterdir())
                    if p.is_file() and p.name != FINGERPRINT_MEMO]
        if cfg.task.name in QA_TASKS:  # windows saved once per work directory (a snapshot per fingerprint)
            task = load_qa_task(cfg.task, tokenizer, cache_dir=str(wd.datasets_cache),
                                store_dir=wd.datasets_cache / "tasks")
        else:
            task = load_prepared_task(cfg.task, tokenizer, store_dir=wd.datasets_cache / "tasks", identity=identity,
                                      cache_dir=str(wd.datasets_cache))
        if marker.get("task_fingerprint") != task.fingerprint:
            raise CheckpointError(
                f"the teacher in {teacher_dir} was fine-tuned for other task data (fingerprint "
                f"{marker.get('task_fingerprint')}, the config gives {task.fingerprint}); re-run "
                "`nni-effbert teacher -c <config>` to fine-tune it for this config"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))  # a reproducible random start, the caller's RNG untouched
            space = build_space(cfg, teacher_config, task.spec)
        loss_fn = KDLoss(cfg.kd, space.config.num_hidden_layers, int(teacher_config.num_hidden_layers),
                         regression=bool(task.spec.is_regression))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(cfg=cfg, workdir=wd, teacher_dir=teacher_dir, teacher_marker=marker, tokenizer=tokenizer,
                   teacher_config=teacher_config, task=task, space=space, loss_fn=loss_fn, pad_token_id=int(pad),
                   progress=progress, device=runtime.device, runtime=runtime)

    @property
    def teacher_fingerprint(self) -> Optional[str]:
        return self.teacher_marker.get("teacher_fingerprint")

    def teacher_model(self) -> nn.Module:
        """The fine-tuned teacher, frozen, in eval mode (loaded on first call)."""
        if self._teacher_model is None:

            model, _ = load_teacher(str(self.teacher_dir))
            self._teacher_model = prepare_teacher(model).to(self.device)
        return self._teacher_model

    def train_cache(self):
        """The teacher-output cache of the task's train split (built on first use, shared)."""
        if self._train_cache is None:
            self._train_cache = self.open_cache(self.task.train, self.task.fingerprint, "train")
        return self._train_cache

    def open_cache(self, dataset, data_fingerprint: str, split: str):
        """Open (or build, once for all processes) the teacher-output cache of ``dataset``."""

        return TeacherCache.open_or_build(
            self.workdir.root, self.teacher_dir, dataset,
            data_fingerprint=data_fingerprint, split=split,
            hidden_layers=self.loss_fn.teacher_hidden_layers,
            attention_layers=self.loss_fn.teacher_attention_layers,
            pad_token_id=self.pad_token_id,
            batch_size=int(self.cfg.evaluator.batch_size),
            model=self._teacher_model,
            progress=self.progress,
            device=self.device,
        )

    def cached_teacher(self) -> CachedTeacher:
        """Teacher source over the train split's cache."""
        return CachedTeacher(self.train_cache(), self.device)

    def live_teacher(self) -> LiveTeacher:
        """Teacher source running the teacher model itself."""
        return LiveTeacher(self.teacher_model(), self.loss_fn.teacher_hidden_layers,
                           self.loss_fn.teacher_attention_layers, self.device)

    def reset_space(self) -> None:
        """Reset the supernet to its random initialisation, seeded by ``cfg.seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.seed))
            supernet = self.space.supernet
            supernet.apply(supernet._init_weights)

    def _dev_batches_once(self) -> list:
        if self._dev_batches is None:
            ev = self.cfg.evaluator
            size = int(ev.eval_batch_size or ev.batch_size)
            self._dev_batches = length_sorted_batches(self.task.dev, size, self.pad_token_id)[0] \
                if len(self.task.dev) else []
        return self._dev_batches

    def evaluate(self, model: nn.Module, arch: Optional[Arch] = None) -> Dict[str, float]:
        """Dev metric of ``model`` (see :func:`evaluate`), in batches of ``evaluator.eval_batch_size``
        rows sorted by length (built once per setup). For the final report only: the search
        scores on the search split (:meth:`score_search`). Span QA: EM / F1 on dev questions
        (``default`` = F1), the v2.0 null threshold tuned on the search split."""
        if self.task.spec.is_span:
            return self._evaluate_span(model, arch)
        return evaluate(model, self.task.dev, self.task.spec, batch_size=int(self.cfg.evaluator.batch_size),
                        pad_token_id=self.pad_token_id, arch=arch, device=self.device, batches=self._dev_batches_once(),
                        runtime=self.runtime)

    def predict_dev(self, model: nn.Module, *, arch: Optional[Arch] = None,
                    call: Optional[Callable[[nn.Module, Batch], Tensor]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Dev predictions of ``model`` in dev row order, and the labels (see :func:`predict`)."""
        return predict(model, self.task.dev, self.task.spec, batch_size=int(self.cfg.evaluator.batch_size),
                       pad_token_id=self.pad_token_id, arch=arch, device=self.device,
                       batches=self._dev_batches_once(), runtime=self.runtime, call=call)

    # -- the held-out search split ------------------------------------------------------------

    def search_split(self):
        """The task's search split (carved from train, never trained on).

        Raises
        ------
        ConfigError
            If it is empty (``task.search_rows: 0`` or a single train row).
        """
        search = getattr(self.task, "search", None)
        if search is None or len(search) == 0:
            raise ConfigError(
                "the task has no search split (task.search_rows is 0 or the train split has fewer than 2 rows); "
                "the search scores candidates on rows held out from train, never on dev: set task.search_rows "
                "(e.g. 1000) or task.search_fraction"
            )
        return search

    def search_cache(self):
        """The teacher-output cache of the search split (built on first use, shared)."""
        if self._search_cache is None:
            self._search_cache = self.open_cache(self.search_split(), self.task.fingerprint, "search")
        return self._search_cache

    def _run_span(self, run, model: nn.Module, arch: Optional[Arch]):
        """``run(forward, batch_size) -> {split: ...}`` with ``model`` (``arch`` on a supernet) in eval
        mode on the runtime's device; its dev entry."""
        rt = self.runtime
        was_training = model.training
        model.eval()

        def forward(batch: Batch) -> Tensor:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with rt.autocast():
                return student_forward(model, batch, arch, return_kd=False).logits

        try:
            out = run(forward, int(self.cfg.evaluator.eval_batch_size or self.cfg.evaluator.batch_size))
        finally:
            model.train(was_training)
        if "dev" not in out:
            raise ConfigError("cannot evaluate on an empty split")
        return out["dev"]

    def _evaluate_span(self, model: nn.Module, arch: Optional[Arch]) -> Dict[str, float]:
        return self._run_span(lambda forward, size: score_span_model(
            forward, self.task, self.cfg.task, size, self.pad_token_id, splits=("dev",)), model, arch)

    def dev_span_answers(self, model: nn.Module, arch: Optional[Arch] = None) -> Dict[str, str]:
        """Question id -> the answer a span-QA student gives on the dev split, exactly as its dev EM / F1
        score it (the v2.0 null threshold tuned on the search split)."""
        return self._run_span(lambda forward, size: span_answers(
            forward, self.task, self.cfg.task, size, self.pad_token_id, splits=("dev",))[0], model, arch)

    def score_search(self, model: nn.Module, arch: Optional[Arch] = None) -> Dict[str, Any]:
        """Task metric and KD losses of ``model`` on the search split (see :func:`score_split`;
        :func:`score_span_split` for span QA)."""
        if self.task.spec.is_span:
            return score_span_split(model, self.task, "search", self.cfg.task,
                                    CachedTeacher(self.search_cache(), self.device), self.loss_fn,
                                    batch_size=int(self.cfg.evaluator.batch_size), pad_token_id=self.pad_token_id,
                                    arch=arch, device=self.device)
        return score_split(model, self.search_split(), self.task.spec, CachedTeacher(self.search_cache(), self.device),
                           self.loss_fn, batch_size=int(self.cfg.evaluator.batch_size),
                           pad_token_id=self.pad_token_id, arch=arch, device=self.device, split="search")
