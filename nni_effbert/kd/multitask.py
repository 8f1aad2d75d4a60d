"""Several tasks, one student encoder (issue 27): :class:`MultiTaskSetup`.

A multi-task config (``tasks:``, :class:`~nni_effbert.config.TaskEntry`) gives every task a
single-task work directory of its own (:func:`~nni_effbert.config.task_config`): its teacher
fine-tuned on it, its teacher-output caches, its search split. This module loads one
:class:`~nni_effbert.kd.setup.KDSetup` per task and ties their student supernets together: the
embeddings, the layers and ``fit_dense`` are the *same* modules in every task's supernet, and
only the output head (``pooler`` + ``classifier`` or ``qa_outputs``) is the task's own. A
training step on one task moves the shared encoder for all of them, and a subnet sliced from any
task's supernet carries the shared encoder weights and that task's head.

What must agree for an encoder to be shared is checked when the setup loads, naming both tasks:
the teachers' tokenizer (its vocabulary), and every student setting other than the head
(vocabulary size, token types, padding id, ``fit_size`` = the teacher's hidden size, the preset's
sizes).

Checkpoints (:meth:`MultiTaskSetup.state_dict`): ``{"encoder": ..., "heads": {task: ...}}``, the
shared tensors once and each head under its task's key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from ..config import ExperimentConfig, task_config
from ..errors import ConfigError
from .setup import KDSetup

__all__ = ["ENCODER_MODULES", "TaskSetup", "MultiTaskSetup"]

logger = logging.getLogger(__name__)

#: Modules of the student (``EfficientBertModel``) that every task shares.
ENCODER_MODULES = ("embeddings", "layers", "fit_dense")
#: Student config fields that may differ between tasks (they shape the head only).
_HEAD_FIELDS = ("num_labels", "head")


@dataclass
class TaskSetup:
    """One task of a :class:`MultiTaskSetup`: its key, weight and single-task setup."""

    name: str
    weight: float
    setup: KDSetup


class MultiTaskSetup:
    """One :class:`~nni_effbert.kd.setup.KDSetup` per task, their supernets sharing one encoder.

    Use :meth:`from_config`.

    Attributes
    ----------
    cfg : ExperimentConfig
        The multi-task config.
    tasks : list of TaskSetup
        In the config's order; the first task's supernet owns the shared modules.
    """

    def __init__(self, cfg: ExperimentConfig, tasks: List[TaskSetup]):
        if not tasks:
            raise ConfigError("a multi-task setup needs at least one task")
        self.cfg = cfg
        self.tasks = tasks
        _check_shared(tasks)
        owner = tasks[0].setup.space.supernet
        for t in tasks[1:]:
            model = t.setup.space.supernet
            for name in ENCODER_MODULES:
                setattr(model, name, getattr(owner, name))
        logger.info("multi-task setup: %d tasks (%s) share one student encoder", len(tasks),
                    ", ".join(t.name for t in tasks))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, progress: bool = True) -> "MultiTaskSetup":
        """Load every task's setup (each needs its teacher: ``nni-effbert teacher -c CONFIG``).

        Raises
        ------
        ConfigError
            ``cfg`` names no ``tasks``, or two tasks disagree on what the shared encoder needs.
        CheckpointError
            A task has no fine-tuned teacher (from :meth:`KDSetup.from_config`).
        """
        if not cfg.tasks:
            raise ConfigError("a multi-task setup needs a config with tasks: (this one names a single task)")
        tasks = [TaskSetup(entry.key, float(entry.weight), KDSetup.from_config(task_config(cfg, entry.key),
                                                                             progress=progress))
                 for entry in cfg.tasks]
        return cls(cfg, tasks)

    # -- views ----------------------------------------------------------------------------------

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSetup:
        """The task called ``name``."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"unknown task {name!r}; the tasks are {', '.join(self.names)}")

    @property
    def weights(self) -> Dict[str, float]:
        """Task weights, normalised to sum to 1."""
        return self.weights_of(None)

    def weights_of(self, names: Optional[Sequence[str]]) -> Dict[str, float]:
        """The weights of tasks ``names`` (None: every task), normalised to sum to 1 over them."""
        chosen = [t for t in self.tasks if names is None or t.name in names]
        total = sum(t.weight for t in chosen)
        return {t.name: t.weight / total for t in chosen}

    def parameters(self) -> List[nn.Parameter]:
        """Every trainable tensor once: the shared encoder's and each task's head."""
        seen, out = set(), []
        for t in self.tasks:
            for p in t.setup.space.supernet.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``{"encoder": {name: tensor}, "heads": {task: {name: tensor}}}`` (names as in one
        task's supernet ``state_dict``; detached references, not copies)."""
        encoder: Dict[str, Any] = {}
        heads: Dict[str, Dict[str, Any]] = {}
        for i, t in enumerate(self.tasks):
            head = {}
            for name, tensor in t.setup.space.supernet.state_dict().items():
                if name.split(".", 1)[0] in ENCODER_MODULES:
                    if i == 0:
                        encoder[name] = tensor
                else:
                    head[name] = tensor
            heads[t.name] = head
        return {"encoder": encoder, "heads": heads}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output.

        Raises
        ------
        ConfigError
            A task of this setup has no head in ``state``, or a tensor does not fit.
        """
        encoder, heads = state.get("encoder"), state.get("heads")
        if not isinstance(encoder, Mapping) or not isinstance(heads, Mapping):
            raise ConfigError("a multi-task checkpoint holds 'encoder' and 'heads'; this one does not")
        missing = [t.name for t in self.tasks if t.name not in heads]
        if missing:
            raise ConfigError(f"the multi-task checkpoint has no head for task(s) {', '.join(missing)} "
                              f"(it has {', '.join(sorted(heads)) or 'none'}); warm up again for these tasks")
        for t in self.tasks:
            try:
                t.setup.space.supernet.load_state_dict({**encoder, **heads[t.name]})
            except RuntimeError as exc:
                raise ConfigError(f"task {t.name}: the multi-task checkpoint does not fit its supernet ({exc})") from None


def _check_shared(tasks: List[TaskSetup]) -> None:
    """One-line error naming both tasks when two tasks cannot share a student encoder."""
    first = tasks[0]
    vocab = first.setup.tokenizer.get_vocab()
    config = {k: v for k, v in first.setup.space.config.to_dict().items() if k not in _HEAD_FIELDS}
    for t in tasks[1:]:
        if t.setup.tokenizer.get_vocab() != vocab:
            raise ConfigError(f"tasks {first.name} and {t.name} have teachers with different tokenizers "
                              f"({first.setup.teacher_dir} vs {t.setup.teacher_dir}); the student encoder is shared, "
                              "so every task's teacher must use the same vocabulary (one teacher model family)")
        other = {k: v for k, v in t.setup.space.config.to_dict().items() if k not in _HEAD_FIELDS}
        differ = sorted(k for k in set(config) | set(other) if config.get(k) != other.get(k))
        if differ:
            key = differ[0]
            raise ConfigError(f"tasks {first.name} and {t.name} need different student encoders ({key}: "
                              f"{config.get(key)!r} vs {other.get(key)!r}; also differing: {', '.join(differ[1:]) or 'nothing'}); "
                              "their teachers must share the model family (vocabulary, hidden size)")
