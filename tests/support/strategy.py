"""Test doubles for the strategy tests: a small fake space and a synthetic objective.

``FakeSpace`` has the arch API of ``EfficientBertSpace`` (labels, choices, expression/size
labels, random/BERT archs, parameter count, fingerprint) on a space small enough to know its
optimum exactly, so the strategy can be tested in milliseconds without torch. The tests here
check the fake itself, so the other strategy tests stand on something verified.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pytest

HIDDEN = 16
BASE_PARAMS = 1000


@dataclass
class _Cfg:
    num_hidden_layers: int


class FakeSpace:
    """``layer{i}_{pre_act, mid_act, post_binary, post_operand, width, stack}`` per layer.

    ``post_operand`` is irrelevant when ``post_binary == 'none'``: the fingerprint ignores it
    then, like the real space's equivalence classes.
    """

    ACTS = ["identity", "gelu", "relu", "tanh", "swish"]
    BINARY = ["none", "add", "mul"]
    OPERANDS = ["x", "input"]
    WIDTHS = [64, 32, 16, 8]
    STACKS = [1, 2]

    def __init__(self, layers: int = 2):
        self.config = _Cfg(layers)
        self.choices: Dict[str, List[Any]] = {}
        for i in range(layers):
            self.choices[f"layer{i}_pre_act"] = list(self.ACTS)
            self.choices[f"layer{i}_mid_act"] = list(self.ACTS)
            self.choices[f"layer{i}_post_binary"] = list(self.BINARY)
            self.choices[f"layer{i}_post_operand"] = list(self.OPERANDS)
            self.choices[f"layer{i}_width"] = list(self.WIDTHS)
            self.choices[f"layer{i}_stack"] = list(self.STACKS)
        self.labels = list(self.choices)
        self.count_calls = 0

    def expression_labels(self, i: int) -> List[str]:
        return [f"layer{i}_pre_act", f"layer{i}_mid_act", f"layer{i}_post_binary", f"layer{i}_post_operand"]

    def size_labels(self, i: int) -> List[str]:
        return [f"layer{i}_width", f"layer{i}_stack"]

    def validate_arch(self, arch: Mapping[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(arch) - set(self.choices))
        if unknown:
            raise ValueError(f"unknown label(s) {unknown}")
        out = {}
        for label, values in self.choices.items():
            if label not in arch:
                raise ValueError(f"architecture is missing label {label!r}; allowed values: {values}")
            if arch[label] not in values:
                raise ValueError(f"label {label!r} has value {arch[label]!r}; allowed values: {values}")
            out[label] = arch[label]
        return out

    def random_arch(self, rng, fixed: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        fixed = dict(fixed or {})
        return {l: fixed[l] if l in fixed else v[rng.randint(len(v))] for l, v in self.choices.items()}

    def bert_arch(self, width: Optional[int] = None, stack: int = 1) -> Dict[str, Any]:
        arch = {}
        for i in range(self.config.num_hidden_layers):
            arch.update({f"layer{i}_pre_act": "identity", f"layer{i}_mid_act": "gelu",
                         f"layer{i}_post_binary": "none", f"layer{i}_post_operand": "x",
                         f"layer{i}_width": width or max(self.WIDTHS), f"layer{i}_stack": stack})
        return arch

    def count_params(self, arch: Mapping[str, Any]) -> int:
        self.count_calls += 1
        arch = self.validate_arch(arch)
        total = BASE_PARAMS
        for i in range(self.config.num_hidden_layers):
            w, s = arch[f"layer{i}_width"], arch[f"layer{i}_stack"]
            total += s * (2 * HIDDEN * w + w + HIDDEN)
        return total

    def fingerprint(self, arch: Mapping[str, Any]) -> str:
        arch = dict(self.validate_arch(arch))
        for i in range(self.config.num_hidden_layers):
            if arch[f"layer{i}_post_binary"] == "none":
                arch[f"layer{i}_post_operand"] = "x"
        return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()

    def describe(self, arch: Mapping[str, Any]) -> List[Dict[str, Any]]:
        return [{"expression": f"{arch[f'layer{i}_mid_act']}(...)", "width": arch[f"layer{i}_width"],
                 "stack": arch[f"layer{i}_stack"]} for i in range(self.config.num_hidden_layers)]

    def nni_search_space(self) -> Dict[str, Dict[str, Any]]:
        return {l: {"_type": "choice", "_value": list(v)} for l, v in self.choices.items()}


class SyntheticObjective:
    """A known score of an arch: per-layer expression tables plus a size term.

    Expression scores come from a seeded table in which BERT's expression is not the best; the
    size term grows with width and stack, so under a parameter budget the best sizes are a
    trade-off across layers. Archs with equal fingerprints score the same.
    """

    def __init__(self, space: FakeSpace, seed: int = 123):
        self.space = space
        rng = np.random.RandomState(seed)
        n = space.config.num_hidden_layers
        self.pre = [dict(zip(space.ACTS, rng.uniform(0, 1, len(space.ACTS)))) for _ in range(n)]
        self.mid = [dict(zip(space.ACTS, rng.uniform(0, 1, len(space.ACTS)))) for _ in range(n)]
        post = []
        for _ in range(n):
            table = {(b, o): float(rng.uniform(0, 1)) for b in space.BINARY for o in space.OPERANDS}
            table[("none", "input")] = table[("none", "x")]
            post.append(table)
        self.post = post

    def __call__(self, arch: Mapping[str, Any]) -> float:
        total = 0.0
        for i in range(self.space.config.num_hidden_layers):
            total += self.pre[i][arch[f"layer{i}_pre_act"]] + self.mid[i][arch[f"layer{i}_mid_act"]]
            total += self.post[i][(arch[f"layer{i}_post_binary"], arch[f"layer{i}_post_operand"])]
            total += 2.0 * math.sqrt(arch[f"layer{i}_width"] * arch[f"layer{i}_stack"] / 128)
        return total

    def optimum(self, budget) -> float:
        """Exact best score under ``budget`` (expression and size terms are separable)."""
        n = self.space.config.num_hidden_layers
        expr = sum(max(self.pre[i].values()) + max(self.mid[i].values()) + max(self.post[i].values())
                   for i in range(n))
        best_size = -math.inf
        sizes = list(itertools.product(self.space.WIDTHS, self.space.STACKS))
        for combo in itertools.product(sizes, repeat=n):
            arch = self.space.bert_arch()
            for i, (w, s) in enumerate(combo):
                arch[f"layer{i}_width"], arch[f"layer{i}_stack"] = w, s
            n_params = self.space.count_params(arch)
            if budget is None or budget[0] <= n_params <= budget[1]:
                best_size = max(best_size, sum(2.0 * math.sqrt(w * s / 128) for w, s in combo))
        return expr + best_size


#: A budget under which no layer pair can both take the largest size.
BUDGET = [3000, 6500]


def test_fake_space_is_consistent():
    space = FakeSpace()
    rng = np.random.RandomState(0)
    arch = space.random_arch(rng)
    assert space.validate_arch(arch) == arch
    other = dict(arch, layer0_post_binary="none", layer0_post_operand="input")
    same = dict(arch, layer0_post_binary="none", layer0_post_operand="x")
    assert space.fingerprint(other) == space.fingerprint(same)
    with pytest.raises(ValueError, match="layer0_width"):
        space.validate_arch(dict(arch, layer0_width=7))
    assert space.count_params(space.bert_arch(width=8)) < space.count_params(space.bert_arch(width=64, stack=2))


def test_synthetic_optimum_is_exact_and_respects_budget():
    space = FakeSpace()
    objective = SyntheticObjective(space)
    rng = np.random.RandomState(1)
    best = objective.optimum(BUDGET)
    for _ in range(3000):
        arch = space.random_arch(rng)
        n = space.count_params(arch)
        if BUDGET[0] <= n <= BUDGET[1]:
            assert objective(arch) <= best + 1e-9
    assert objective.optimum(None) > best  # the budget binds
