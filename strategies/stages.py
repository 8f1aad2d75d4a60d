"""Stages of the progressive search, as data (owned by the strategy module; first draft)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Stage:
    """One stage of the progressive search.

    kind: ``joint`` (expression + width + stack), ``expression`` (sizes fixed to the previous
    stage's best) or ``size`` (expressions fixed to the previous stage's best).
    """

    name: str
    kind: str
    trials: int
    warmup_steps: int = 200
    general_warmup_steps: int = 0  # general KD on unlabeled text before task KD (stage 3)
    train_steps: Optional[int] = None  # None: the evaluator's budget; 0: inherited weights only


def paper_stages() -> List[Stage]:
    return [
        Stage("coarse", "joint", trials=24),
        Stage("expression", "expression", trials=16),
        Stage("size", "size", trials=32, general_warmup_steps=200, train_steps=0),
    ]


@dataclass
class SearchConfig:
    param_budget: Optional[Tuple[float, float]] = None
    stages: List[Stage] = field(default_factory=paper_stages)
    trial_concurrency: int = 1
    seed: int = 0
