"""Candidate generation: initial populations and a learned space-partition sampler.

EfficientBERT (Dong et al., Findings of EMNLP 2021, Sec. 3.3) speeds up its search with a tree
of LightGBM classifiers: the evaluated archs are split at the median score, a classifier learns
the good side from the bad side, and the good region is split again; new candidates are drawn
from the promising regions. This module keeps that idea with the tools of our stack and the
selection rule of LA-MCTS (Wang et al., NeurIPS 2020, reference code
``facebookresearch/LaMCTS``):

* archs are one-hot encoded over the labels the stage searches;
* each node of a small tree fits a ``sklearn.ensemble.GradientBoostingClassifier`` that
  separates archs scoring above the node's median from the others; the node's archs are
  routed by the classifier's prediction, so every node is a *region* of the space;
* a leaf is chosen by descending the tree with UCB, ``mean + c * sqrt(2 ln N / n)`` on
  min-max-normalised scores, with an explicit exploration constant ``c``;
* candidates are proposed by mutating the best archs of the chosen leaf; among the mutants
  that are new and fit the parameter budget, the one the classifiers place most confidently
  inside the chosen region is returned;
* the tree is refit every ``refit_every`` new results.

Where this departs from the paper: LightGBM becomes scikit-learn gradient boosting (no extra
dependency), and candidates come from mutation inside a region rather than from sampling the
paper's per-region distributions, which keeps every proposal a valid arch by construction.

Everything random goes through the ``numpy.random.RandomState`` the caller passes in; the
classifiers get integer seeds derived from the search seed, the stage and the refit count, so
a tree can be rebuilt identically after a resume.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .search_errors import BudgetError
from .stages import SamplerConfig

__all__ = [
    "ArchEncoder",
    "PartitionSampler",
    "mutate",
    "check_budget",
    "bert_seed_archs",
    "random_arch_in_budget",
]

logger = logging.getLogger(__name__)

Arch = Dict[str, Any]
Accept = Callable[[Arch], bool]


# ---------------------------------------------------------------------------------------------
# Encoding and mutation
# ---------------------------------------------------------------------------------------------


class ArchEncoder:
    """One-hot encoding of the searched labels of an arch.

    Parameters
    ----------
    labels : sequence of str
        The labels a stage searches, in a stable order.
    choices : mapping
        ``label -> list of allowed values`` (``space.choices``).
    """

    def __init__(self, labels: Sequence[str], choices: Mapping[str, Sequence[Any]]):
        self.labels = list(labels)
        self._index: Dict[str, Dict[str, int]] = {}
        offset = 0
        for label in self.labels:
            values = list(choices[label])
            # JSON keys: encode by repr so 1 and "1" or True stay distinct but 2 and 2.0 do not.
            self._index[label] = {self._key(v): offset + j for j, v in enumerate(values)}
            offset += len(values)
        self.dim = offset

    @staticmethod
    def _key(value: Any) -> str:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return repr(value)

    def encode(self, archs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``[len(archs), dim]`` float array of one-hot blocks."""
        out = np.zeros((len(archs), self.dim), dtype=np.float64)
        for row, arch in enumerate(archs):
            for label in self.labels:
                out[row, self._index[label][self._key(arch[label])]] = 1.0
        return out


def mutate(parent: Mapping[str, Any], labels: Sequence[str], choices: Mapping[str, Sequence[Any]],
           rate: float, rng: np.random.RandomState) -> Arch:
    """Resample each of ``labels`` with probability ``rate`` (to a different value); at least one
    label changes when any label has more than one choice."""
    child = dict(parent)
    mutable = [l for l in labels if len(choices[l]) > 1]
    if not mutable:
        return child
    flips = rng.random_sample(len(mutable)) < rate
    if not flips.any():
        flips[rng.randint(len(mutable))] = True
    for label, flip in zip(mutable, flips):
        if flip:
            others = [v for v in choices[label] if v != parent[label]]
            child[label] = others[rng.randint(len(others))]
    return child


# ---------------------------------------------------------------------------------------------
# Budget and seeds
# ---------------------------------------------------------------------------------------------


def _uniform_size_archs(space: Any) -> List[Arch]:
    """BERT-expression archs with the same width and stack at every layer, one per (w, s)."""
    widths = space.choices[space.size_labels(0)[0]]
    stacks = space.choices[space.size_labels(0)[1]]
    return [space.bert_arch(width=w, stack=s) for w in widths for s in stacks]


def _param_range(space: Any) -> Tuple[int, int]:
    """Smallest and largest parameter count of the space.

    Uses ``space.param_range()`` when the space provides it (exact); otherwise the uniform-size
    BERT archs, which are the extremes when parameters grow with width and stack and
    expressions carry no weights (true for EfficientBERT's op set).
    """
    if hasattr(space, "param_range"):
        lo, hi = space.param_range()
        return int(lo), int(hi)
    counts = [space.count_params(a) for a in _uniform_size_archs(space)]
    return min(counts), max(counts)


def in_budget(space: Any, arch: Mapping[str, Any], budget: Optional[Tuple[float, float]]) -> bool:
    """True if ``budget`` is None or ``space.count_params(arch)`` lies in ``[min, max]``."""
    if budget is None:
        return True
    n = space.count_params(arch)
    return budget[0] <= n <= budget[1]


def check_budget(space: Any, budget: Optional[Tuple[float, float]], rng: np.random.RandomState,
                 tries: int = 2000) -> Tuple[int, int]:
    """Fail fast when no arch of ``space`` can meet ``budget``.

    Returns
    -------
    (int, int)
        The space's achievable parameter range.

    Raises
    ------
    BudgetError
        If the budget lies outside the achievable range, or no arch inside it is found among
        the uniform-size BERT archs and ``tries`` random archs.
    """
    lo, hi = _param_range(space)
    if budget is None:
        return lo, hi
    bmin, bmax = budget
    fix = (f"achievable parameter counts of this space are [{lo}, {hi}]; set search.param_budget "
           f"to a range that overlaps it (or leave it empty for no budget)")
    if bmax < lo or bmin > hi:
        raise BudgetError(f"param_budget [{bmin:g}, {bmax:g}] cannot be met: {fix}")
    if any(in_budget(space, a, budget) for a in _uniform_size_archs(space)):
        return lo, hi
    for _ in range(tries):
        if in_budget(space, space.random_arch(rng), budget):
            return lo, hi
    raise BudgetError(f"param_budget [{bmin:g}, {bmax:g}]: no architecture with a parameter count in it was "
                      f"found among the uniform-size archs and {tries} random archs; the range is probably "
                      f"narrower than the gap between achievable sizes ({fix})")


def bert_seed_archs(space: Any, budget: Optional[Tuple[float, float]], n: int,
                    fits: Optional[Accept] = None) -> List[Arch]:
    """Up to ``n`` BERT-expression archs of uniform width and stack that fit ``budget``
    (and ``fits``, e.g. a latency budget, when given).

    Spread over the feasible sizes (largest first, then evenly down to the smallest), since the
    best size is unknown but BERT's expression is the natural baseline at every size.
    """
    feasible = [a for a in _uniform_size_archs(space) if in_budget(space, a, budget) and (fits is None or fits(a))]
    feasible.sort(key=space.count_params, reverse=True)
    if n <= 0 or not feasible:
        return []
    if len(feasible) <= n:
        return feasible
    picks = np.linspace(0, len(feasible) - 1, n).round().astype(int)
    return [feasible[i] for i in dict.fromkeys(picks.tolist())]


def latency_in_budget(latency_fn: Optional[Callable[[Mapping[str, Any]], float]], arch: Mapping[str, Any],
                      budget: Optional[Tuple[float, float]]) -> bool:
    """True if ``budget`` is None or the predicted latency ``latency_fn(arch)`` lies in ``[min, max]``."""
    if budget is None:
        return True
    ms = float(latency_fn(arch))
    return budget[0] <= ms <= budget[1]


def check_latency_budget(space: Any, budget: Optional[Tuple[float, float]], latency_fn: Callable[[Mapping[str, Any]], float],
                         rng: np.random.RandomState, tries: int = 2000,
                         param_budget: Optional[Tuple[float, float]] = None) -> Optional[Tuple[float, float]]:
    """Fail fast when no arch of ``space`` can meet the latency ``budget`` (with ``param_budget``).

    The achievable range comes from ``latency_fn.latency_range()`` when the predictor has it (a
    :class:`~nni_effbert.latency.table.LatencyTable` computes it exactly), else from the
    uniform-size BERT archs and ``tries`` random archs.

    Returns
    -------
    (float, float) or None
        The achievable predicted-latency range (None without a budget).

    Raises
    ------
    BudgetError
        If the budget lies outside the achievable range, or no arch meeting it (and the
        parameter budget) is found among the uniform-size archs and ``tries`` random archs.
    """
    if budget is None:
        return None
    if hasattr(latency_fn, "latency_range"):
        lo, hi = (float(v) for v in latency_fn.latency_range())
        samples: List[Arch] = []
    else:
        samples = _uniform_size_archs(space) + [space.random_arch(rng) for _ in range(min(tries, 200))]
        ms = [float(latency_fn(a)) for a in samples]
        lo, hi = min(ms), max(ms)
    bmin, bmax = budget
    fix = (f"predicted latencies of this space lie in [{lo:.3f}, {hi:.3f}] ms on the latency table's device; set "
           f"search.latency_budget_ms / search.speedup to a range that overlaps it (or leave them empty)")
    if bmax < lo or bmin > hi:
        raise BudgetError(f"latency budget [{bmin:.3f}, {bmax:.3f}] ms cannot be met: {fix}")

    def fits(arch: Mapping[str, Any]) -> bool:
        return in_budget(space, arch, param_budget) and latency_in_budget(latency_fn, arch, budget)

    if any(fits(a) for a in _uniform_size_archs(space)) or any(fits(a) for a in samples):
        return lo, hi
    for _ in range(tries):
        if fits(space.random_arch(rng)):
            return lo, hi
    both = " together with param_budget" if param_budget is not None else ""
    raise BudgetError(f"latency budget [{bmin:.3f}, {bmax:.3f}] ms{both}: no architecture meeting it was found "
                      f"among the uniform-size archs and {tries} random archs; the range is probably narrower "
                      f"than the gaps between achievable latencies or disjoint from the parameter budget ({fix})")


def random_arch_in_budget(space: Any, rng: np.random.RandomState, fixed: Mapping[str, Any],
                          accept: Accept, tries: int) -> Optional[Arch]:
    """A uniform arch with ``fixed`` labels held, for which ``accept`` is true, or None."""
    for _ in range(tries):
        arch = space.random_arch(rng, fixed=dict(fixed))
        if accept(arch):
            return arch
    return None


def balanced_arch(space: Any, key: Sequence[int], step: int, fixed: Mapping[str, Any]) -> Arch:
    """Step ``step`` of a sequence of archs that draws every choice of every label equally often.

    Each free label with ``k`` values takes them in a seeded random order that is reshuffled every
    ``k`` steps (``key + (label index, block)`` seeds it), so after any multiple of ``k`` steps
    every value has been drawn exactly as often as every other, and within a block no value
    repeats. Uniform independent draws (:meth:`random_arch`) reach the same frequencies only on
    average. Stateless: step ``k`` is the same arch on a resumed warm-up. Labels in ``fixed`` are
    held.
    """
    arch: Dict[str, Any] = {}
    for i, (label, values) in enumerate(space.choices.items()):
        if label in fixed:
            arch[label] = fixed[label]
            continue
        block, position = divmod(int(step), len(values))
        order = np.random.default_rng([*map(int, key), i, block]).permutation(len(values))
        arch[label] = values[int(order[position])]
    return space.validate_arch(arch)


# ---------------------------------------------------------------------------------------------
# The partition tree
# ---------------------------------------------------------------------------------------------


@dataclass
class _Node:
    indices: np.ndarray  # rows of the fitted data that fall in this region
    depth: int
    classifier: Any = None  # predicts True = the good side
    children: List["_Node"] = field(default_factory=list)  # [good, bad] when split

    @property
    def is_leaf(self) -> bool:
        return not self.children


class PartitionSampler:
    """Learned space-partition sampler over the labels one stage searches.

    Parameters
    ----------
    labels : sequence of str
        Searched labels (the stage's free labels).
    choices : mapping
        ``label -> allowed values``.
    config : SamplerConfig
        Tree and mutation settings.
    seed : int
        Base of the classifiers' integer seeds (combine the search seed and the stage).

    Notes
    -----
    The sampler keeps no copy of the results: :meth:`propose` receives the stage's successful
    results in completion order each time. Its state is the number of fits and how many results
    the last fit used, enough to rebuild the same tree after a resume.
    """

    def __init__(self, labels: Sequence[str], choices: Mapping[str, Sequence[Any]], config: SamplerConfig,
                 seed: int):
        self.labels = list(labels)
        self.choices = {l: list(choices[l]) for l in self.labels}
        self.config = config
        self.seed = int(seed)
        self.encoder = ArchEncoder(self.labels, self.choices)
        self.fit_count = 0
        self.fitted_on = 0
        self._root: Optional[_Node] = None
        self._y: Optional[np.ndarray] = None

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Fit count and how many results the last fit used (the tree is rebuilt from them)."""
        return {"fit_count": self.fit_count, "fitted_on": self.fitted_on}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the tree is rebuilt on the next proposal."""
        self.fit_count = int(state["fit_count"])
        self.fitted_on = int(state["fitted_on"])
        self._root = None  # rebuilt from the same results and seed on the next proposal

    # -- fitting ----------------------------------------------------------------------------

    def _fit(self, archs: Sequence[Arch], scores: Sequence[float], fit_index: int) -> None:
        from sklearn.ensemble import GradientBoostingClassifier  # local: sklearn costs ~2 s; trials import this module

        X = self.encoder.encode(archs)
        y = np.asarray(scores, dtype=np.float64)
        span = y.max() - y.min()
        self._y = (y - y.min()) / span if span > 0 else np.zeros_like(y)
        cfg = self.config
        seed_base = (self.seed * 1_000_003 + fit_index * 7919) % (2**31 - 1)
        counter = [0]

        def split(node: _Node) -> None:
            idx = node.indices
            if node.depth >= cfg.max_depth or len(idx) < 2 * cfg.min_leaf:
                return
            ys = y[idx]
            good = ys > np.median(ys)
            if good.all() or not good.any():
                return  # all scores tie: nothing to learn here
            counter[0] += 1
            clf = GradientBoostingClassifier(
                n_estimators=cfg.n_estimators, max_depth=cfg.tree_depth, learning_rate=cfg.learning_rate,
                random_state=(seed_base + counter[0]) % (2**31 - 1))
            clf.fit(X[idx], good)
            pred = clf.predict(X[idx]).astype(bool)
            if pred.sum() < cfg.min_leaf or (~pred).sum() < cfg.min_leaf:
                return  # the classifier cannot separate the node into two usable regions
            node.classifier = clf
            node.children = [_Node(idx[pred], node.depth + 1), _Node(idx[~pred], node.depth + 1)]
            for child in node.children:
                split(child)

        self._root = _Node(np.arange(len(y)), 0)
        split(self._root)
        logger.debug("partition tree fit #%d on %d results: %d leaves", fit_index, len(y), self.num_leaves)

    @property
    def num_leaves(self) -> int:
        """Regions of the current tree (0 before the first fit)."""
        if self._root is None:
            return 0
        stack, n = [self._root], 0
        while stack:
            node = stack.pop()
            if node.is_leaf:
                n += 1
            stack.extend(node.children)
        return n

    def _maybe_refit(self, archs: Sequence[Arch], scores: Sequence[float]) -> None:
        cfg = self.config
        if self._root is None and self.fit_count > 0:
            # Resumed: rebuild the last tree exactly as it was (same results, same seeds).
            self._fit(archs[:self.fitted_on], scores[:self.fitted_on], self.fit_count)
        n = len(archs)
        due = self.fit_count == 0 and n >= 2 * cfg.min_leaf
        due = due or (self.fit_count > 0 and n - self.fitted_on >= cfg.refit_every)
        if due:
            self.fit_count += 1
            self.fitted_on = n
            self._fit(archs, scores, self.fit_count)

    # -- proposing --------------------------------------------------------------------------

    def _select_path(self) -> List[Tuple[_Node, int]]:
        """Descend by UCB; returns ``[(node, side)]`` with side 0 = good, 1 = bad."""
        assert self._root is not None and self._y is not None
        path, node = [], self._root
        while not node.is_leaf:
            n_parent = len(node.indices)
            best, best_side = -math.inf, 0
            for side, child in enumerate(node.children):
                mean = float(self._y[child.indices].mean())
                ucb = mean + self.config.exploration * math.sqrt(2.0 * math.log(n_parent) / len(child.indices))
                if ucb > best:
                    best, best_side = ucb, side
            path.append((node, best_side))
            node = node.children[best_side]
        return path

    def propose(self, archs: Sequence[Arch], scores: Sequence[float], rng: np.random.RandomState,
                accept: Accept) -> Optional[Arch]:
        """One new candidate, or None when mutation finds nothing acceptable.

        Parameters
        ----------
        archs, scores : sequences
            The stage's successful results, in completion order (full archs, fixed labels
            included; mutation changes only the searched labels).
        rng : numpy.random.RandomState
            Every random choice.
        accept : callable
            ``accept(arch) -> bool``: false for duplicates and archs outside the budget.
        """
        if not archs:
            return None
        self._maybe_refit(archs, scores)
        cfg = self.config
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        path: List[Tuple[_Node, int]] = []
        if self._root is not None:
            path = self._select_path()
            leaf = path[-1][0].children[path[-1][1]] if path else self._root
            fitted_scores = np.asarray(scores[:self.fitted_on])
            members = leaf.indices[np.argsort(-fitted_scores[leaf.indices], kind="stable")]
        else:
            members = order  # too few results for a tree: mutate the best so far
        parents = [archs[i] for i in members[:cfg.num_parents]]

        mutants, keys = [], set()
        for _ in range(cfg.num_candidates):
            child = mutate(parents[rng.randint(len(parents))], self.labels, self.choices, cfg.mutation_rate, rng)
            key = tuple(repr(child[l]) for l in self.labels)
            if key in keys or not accept(child):
                continue
            keys.add(key)
            mutants.append(child)
        if not mutants:
            return None
        X = self.encoder.encode(mutants)
        # Confidence of being inside the chosen region: the product over the path of the
        # probability each node's classifier gives to the chosen side.
        confidence = np.ones(len(mutants))
        for node, side in path:
            proba = node.classifier.predict_proba(X)
            col = list(node.classifier.classes_).index(side == 0)
            confidence *= proba[:, col]
        inside = confidence >= 0.5 ** len(path) if path else np.ones(len(mutants), dtype=bool)
        if not inside.any():
            inside = confidence >= confidence.max()
        # Among the mutants inside the region, take the one a ridge regression over the one-hot
        # encoding predicts best: a cheap additive surrogate that uses every result's score,
        # where the classifiers only see which side of a median an arch falls.
        predicted = self._surrogate(archs, scores).predict(X)
        predicted[~inside] = -np.inf
        return mutants[int(np.argmax(predicted))]

    def _surrogate(self, archs: Sequence[Arch], scores: Sequence[float]):
        from sklearn.linear_model import Ridge  # local: sklearn costs ~2 s; trials import this module

        model = Ridge(alpha=self.config.ridge_alpha)
        model.fit(self.encoder.encode(archs), np.asarray(scores, dtype=np.float64))
        return model
