"""Where a KD step gets its teacher's outputs.

:class:`CachedTeacher` reads the shared teacher-output cache
(:class:`~nni_effbert.kd.cache.TeacherCache`) by the batch's ``idx`` column (task data);
:class:`LiveTeacher` runs the teacher itself (unlabeled text that is not cached). Both satisfy
:class:`TeacherSource`, what :func:`~nni_effbert.kd.train.kd_train` and the scorers of
:mod:`nni_effbert.kd.scoring` take.
"""
from __future__ import annotations

from typing import Any, Dict, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .losses import TeacherBatch
from .teacher import teacher_outputs

__all__ = ["Arch", "Batch", "TeacherSource", "CachedTeacher", "LiveTeacher"]

#: An architecture: ``label -> value``.
Arch = Dict[str, Any]
#: A padded batch of a tokenized split.
Batch = Dict[str, Tensor]


class TeacherSource(Protocol):
    """Anything that returns the teacher's outputs for a padded batch."""

    def __call__(self, batch: Batch) -> TeacherBatch:  # pragma: no cover - protocol
        ...


class CachedTeacher:
    """Teacher outputs read from a :class:`~nni_effbert.kd.cache.TeacherCache` by the batch's ``idx``.

    Parameters
    ----------
    cache : TeacherCache
        Built over the dataset the batches come from.
    device : torch.device or str
        Where the tensors go.
    """

    def __init__(self, cache, device: Any = "cpu"):
        self.cache = cache
        self.device = torch.device(device)

    def __call__(self, batch: Batch) -> TeacherBatch:
        if "idx" not in batch:
            raise ConfigError("CachedTeacher: the batch has no 'idx' column, so cached outputs cannot be looked up")
        return self.cache.get(batch["idx"], max_len=int(batch["input_ids"].shape[1]), device=self.device)


class LiveTeacher:
    """Teacher outputs computed on the fly (for text that is not cached, e.g. a corpus file).

    Parameters
    ----------
    model : transformers model
        The teacher, prepared with :func:`nni_effbert.kd.teacher.prepare_teacher`.
    hidden_layers, attention_layers : sequence of int
        ``KDLoss.teacher_hidden_layers`` / ``teacher_attention_layers``.
    device : torch.device or str
    """

    def __init__(self, model: nn.Module, hidden_layers: Sequence[int], attention_layers: Sequence[int],
                 device: Any = "cpu"):
        self.model = model
        self.hidden_layers = list(hidden_layers)
        self.attention_layers = list(attention_layers)
        self.device = torch.device(device)

    def __call__(self, batch: Batch) -> TeacherBatch:

        out = teacher_outputs(
            self.model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch.get("token_type_ids").to(self.device) if "token_type_ids" in batch else None,
            self.hidden_layers,
            self.attention_layers,
        )
        return out
