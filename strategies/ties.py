"""Choosing among candidates whose search scores tie within the score's own repeatability.

A search score is noisy: the same arch re-scored with another evaluator seed moves by about as
much as many candidates differ. Ranking strictly by score then picks, among candidates the score
cannot tell apart, whichever the noise favoured, often a larger, slower one. The rule here: the
candidates within ``margin`` of the best score tie, and the cheapest of them (lowest predicted
latency, else fewest parameters) is chosen; outside any tie the best score wins as before.

:data:`TIE_MARGINS` gives each ``evaluator.objective`` its default margin: about twice the standard
deviation of the difference between two scorings of the same arch with different evaluator seeds,
as ``nni-effbert fidelity --repeat`` measures it (the figures are on the docs' results page). They
were measured on SST-2 and the noise depends on the task: on MNLI-m the ``kd`` score's is five times
smaller (a fitting margin 0.0045, not 0.022), so ``fidelity --repeat`` prints the margin that fits
the task it ran on (``tie_margin_suggested``), to set as ``search.tie_margin``.
Candidates scored without any fine-tuning (``train_steps: 0``, the one-shot size stage) have no
such noise: their score is the inherited weights' loss on fixed rows, the same for every
evaluator seed, so their margin is 0 (:func:`stage_margin`).

A search can also measure the margin itself (``search.noise_rescores: K``): the strategy re-scores
the K best candidates of each fine-tuned stage with another evaluator seed, and the stage's margin
is twice the spread of their score differences (:func:`noise_sd`, :func:`measured_margin`), the
same definition as the defaults and as ``fidelity --repeat``, on the task being searched.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

__all__ = ["TIE_MARGINS", "NOISE_FACTOR", "default_tie_margin", "is_one_shot", "stage_margin", "noise_sd", "measured_margin",
           "order_with_ties"]

T = TypeVar("T")

#: Default ``search.tie_margin`` per ``evaluator.objective`` (score units of that objective).
TIE_MARGINS = {"kd": 0.022, "kd_pred": 0.014, "metric": 0.012}
#: A margin is this many standard deviations of (re-score - score), the shared shift removed.
NOISE_FACTOR = 2.0


def default_tie_margin(objective: str) -> float:
    """The default margin of an ``evaluator.objective`` (0 for an unknown one: strict ranking)."""
    return float(TIE_MARGINS.get(objective, 0.0))


def is_one_shot(train_steps: Iterable[Optional[int]]) -> bool:
    """True when every candidate was scored with 0 fine-tune steps (at least one candidate, every
    step count known): scores that do not move with the evaluator seed."""
    steps = list(train_steps)
    return bool(steps) and all(s is not None and int(s) == 0 for s in steps)


def stage_margin(margin: float, train_steps: Iterable[Optional[int]]) -> float:
    """The tie margin for candidates scored with these ``train_steps`` (one per candidate).

    ``margin`` is the score's seed-to-seed repeatability after a KD fine-tune. When every
    candidate was scored with 0 fine-tune steps, re-scoring with another evaluator seed gives the
    same value, and the margin is 0: the ranking is strict. (On MNLI-m the 8 one-shot candidates
    of a size stage spread over 0.016, all inside the 0.022 ``kd`` margin, and the tie handed the
    stage to its lowest-scoring, smallest candidate: ``docs/guides/selection-bias.md``.) An
    unknown step count (None) keeps ``margin``.
    """
    return 0.0 if is_one_shot(train_steps) else float(margin)


def noise_sd(differences: Sequence[float]) -> Optional[float]:
    """The spread of one arch's score relative to another's, from re-scores.

    ``differences`` are (re-score - score) of several archs, each re-scored with the same other
    evaluator seed. A shift all of them share cannot change a ranking and is removed: the result
    is their sample standard deviation (``ddof=1``). None with fewer than 2 differences.
    """
    values = [float(d) for d in differences]
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def measured_margin(pairs: Iterable[Tuple[float, float]]) -> Optional[float]:
    """The tie margin measured from ``(score, re-score)`` pairs: :data:`NOISE_FACTOR` times
    :func:`noise_sd` of their differences; None with fewer than 2 pairs."""
    sd = noise_sd([rescore - score for score, rescore in pairs])
    return None if sd is None else NOISE_FACTOR * sd


def order_with_ties(items: Sequence[T], score: Callable[[T], float], cost: Callable[[T], Optional[float]],
                    margin: float, tiebreak: Callable[[T], object] = lambda item: 0) -> List[T]:
    """``items`` best first, where "best" lets the cheapest of the tied leaders go first.

    Parameters
    ----------
    items : sequence
        Scored candidates (higher score is better).
    score, cost : callable
        A candidate's score, and its cost (lower is better; None when unknown, which ranks as the
        most expensive).
    margin : float
        Candidates with ``score >= best - margin`` tie; 0 is the strict ranking.
    tiebreak : callable
        Orders candidates of equal score and cost (e.g. the trial id: earliest first).

    Returns
    -------
    list
        The chosen candidate first (the cheapest of the tie; on equal cost the higher score), then
        every other candidate by score, best first.
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"the tie margin must be a finite number >= 0, got {margin}")
    by_score = sorted(items, key=lambda it: (-score(it), tiebreak(it)))
    if not by_score:
        return []
    top = score(by_score[0])
    tied = [it for it in by_score if score(it) >= top - margin]

    def cost_key(it: T) -> float:
        value = cost(it)
        return math.inf if value is None else float(value)

    chosen = min(tied, key=lambda it: (cost_key(it), -score(it), tiebreak(it)))
    return [chosen] + [it for it in by_score if it is not chosen]
