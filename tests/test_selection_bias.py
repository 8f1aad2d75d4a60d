"""What the search prefers when it cannot tell: balanced warm-up paths, the tie rule, and the
report's mark of a student that kept BERT's own MLP expression (issue 31)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nni_effbert.nas.ranking import best_trial
from nni_effbert.search_spaces import EfficientBertSupernet, preset_config
from nni_effbert.search_spaces.supernet import REFERENCE_EXPRESSION
from nni_effbert.strategies.core import ProgressiveSearch, Proposal
from nni_effbert.strategies.sampler import balanced_arch
from nni_effbert.strategies.stages import SearchConfig, Stage
from nni_effbert.strategies.ties import TIE_MARGINS, order_with_ties, stage_margin


@pytest.fixture(scope="module")
def space():
    return EfficientBertSupernet(preset_config("tiny"))


# -- balanced warm-up paths ---------------------------------------------------------------------


def _counts(archs, label):
    return Counter(repr(a[label]) for a in archs)


def test_balanced_paths_draw_every_choice_of_every_label_equally_often(space):
    """Tolerance: after any number of steps, each choice of a label with k values is drawn within
    one draw of steps / k (exactly steps / k at a multiple of k)."""
    steps = 97
    archs = [balanced_arch(space, (0, 0, 0), step, {}) for step in range(steps)]
    for label, values in space.choices.items():
        counts = _counts(archs, label)
        assert set(counts) == {repr(v) for v in values}, label
        assert max(counts.values()) - min(counts.values()) <= 1, (label, counts)
    # Independent uniform draws are balanced only on average: over the same steps some label is
    # off by more than one draw (which is what balancing removes).
    rng = np.random.default_rng(0)
    uniform = [space.random_arch(rng) for _ in range(steps)]
    spread = max(max(c.values()) - min(c.values()) for c in (_counts(uniform, l) for l in space.choices))
    assert spread > 1


def test_balanced_paths_are_reproducible_per_step_and_hold_fixed_labels(space):
    label = next(l for l in space.choices if l.endswith("_width"))
    fixed = {label: space.choices[label][0]}
    a = [balanced_arch(space, (3, 1, 0), s, fixed) for s in range(20)]
    b = [balanced_arch(space, (3, 1, 0), s, fixed) for s in reversed(range(20))][::-1]
    assert a == b  # step k is the same arch whatever came before it (a resumed warm-up)
    assert all(x[label] == fixed[label] for x in a)
    assert a != [balanced_arch(space, (4, 1, 0), s, fixed) for s in range(20)]


def test_warmup_sampler_keeps_the_budget_when_balanced(space):
    from nni_effbert.nas.warmup import _ArchSampler

    lo, hi = space.param_range()
    budget = [lo, lo + 0.3 * (hi - lo)]
    sampler = _ArchSampler(space, {}, budget, seed=0, stage=0, phase=0, max_tries=2000, balanced=True)
    archs = [sampler(k) for k in range(30)]
    assert all(budget[0] <= space.count_params(a) <= budget[1] for a in archs)
    assert sampler(5) == archs[5]


# -- the tie rule --------------------------------------------------------------------------------


def test_ties_choose_the_cheapest_within_the_margin_and_the_best_score_otherwise():
    items = [("big", -1.000, 18.0), ("small", -1.015, 11.0), ("worse", -1.100, 5.0)]
    score, cost = (lambda it: it[1]), (lambda it: it[2])
    assert [it[0] for it in order_with_ties(items, score, cost, margin=0.02)] == ["small", "big", "worse"]
    assert order_with_ties(items, score, cost, margin=0.0)[0][0] == "big"
    assert order_with_ties(items, score, cost, margin=0.01)[0][0] == "big"
    # an unknown cost ranks as the most expensive
    assert order_with_ties([("a", 1.0, None), ("b", 0.99, 3.0)], score, cost, margin=0.05)[0][0] == "b"
    with pytest.raises(ValueError, match="margin"):
        order_with_ties(items, score, cost, margin=-1)


def test_the_search_hands_the_cheaper_of_two_tied_archs_to_the_next_stage(space):
    """Two stage-0 candidates, the more expensive one scored 0.015 higher: within a 0.02 margin
    the cheaper one is the stage's answer; with no margin the higher score is."""

    def run(margin):
        cfg = SearchConfig(stages=[Stage("coarse", "joint", trials=2), Stage("size", "size", trials=1, train_steps=0)],
                           tie_margin=margin)
        search = ProgressiveSearch(space, cfg, latency_fn=lambda arch: space.count_params(arch) / 1e5)
        warmup = search.ask()
        assert isinstance(warmup, Proposal) and warmup.warmup
        search.tell(warmup.trial_id, None)
        a, b = search.ask(), search.ask()
        cheap, dear = sorted((a, b), key=lambda p: space.count_params(p.arch))
        assert space.count_params(cheap.arch) < space.count_params(dear.arch)
        search.tell(dear.trial_id, {"default": -1.000, "params": space.count_params(dear.arch)})
        search.tell(cheap.trial_id, {"default": -1.015, "params": space.count_params(cheap.arch)})
        return search.ranking(0)[0].trial_id, cheap.trial_id, dear.trial_id

    chosen, cheap, _ = run(0.02)
    assert chosen == cheap
    chosen, _, dear = run(0.0)
    assert chosen == dear


def test_one_shot_scores_are_ranked_strictly():
    """0 fine-tune steps: the score does not move with the evaluator seed, so nothing ties."""
    assert stage_margin(0.022, [0, 0, 0]) == 0.0
    assert stage_margin(0.022, [0, 60]) == 0.022
    assert stage_margin(0.022, [0, None]) == 0.022 and stage_margin(0.022, []) == 0.022


def test_a_one_shot_stage_hands_on_its_best_score_not_its_cheapest(space):
    """A stage scored with train_steps 0 (one-shot, as the size stage): the dearer candidate scored 0.015 higher wins even
    within a 0.02 margin, whether the trials report their steps or only the stage plans them."""

    def run(report_steps):
        cfg = SearchConfig(stages=[Stage("coarse", "joint", trials=2, train_steps=0)], tie_margin=0.02)
        search = ProgressiveSearch(space, cfg, latency_fn=lambda arch: space.count_params(arch) / 1e5)
        search.tell(search.ask().trial_id, None)  # the warm-up
        a, b = search.ask(), search.ask()
        cheap, dear = sorted((a, b), key=lambda p: space.count_params(p.arch))
        extra = {"train_steps": 0} if report_steps else {}
        search.tell(dear.trial_id, {"default": -1.000, "params": space.count_params(dear.arch), **extra})
        search.tell(cheap.trial_id, {"default": -1.015, "params": space.count_params(cheap.arch), **extra})
        return search.ranking(0)[0].trial_id, dear.trial_id

    for report_steps in (True, False):
        chosen, dear = run(report_steps)
        assert chosen == dear


def test_best_trial_prefers_the_lower_latency_trial_within_the_margin():
    trials = [
        {"trial_id": "slow", "status": "SUCCEEDED", "metric": -1.00, "params": 5_000_000, "latency_ms": 18.0,
         "stage": 2},
        {"trial_id": "fast", "status": "SUCCEEDED", "metric": -1.01, "params": 5_100_000, "latency_ms": 11.0,
         "stage": 2},
    ]
    assert best_trial(trials)["trial_id"] == "slow"
    assert best_trial(trials, tie_margin=0.02)["trial_id"] == "fast"
    assert best_trial(trials, tie_margin=0.005)["trial_id"] == "slow"
    one_shot = [{**t, "final": {"train_steps": 0}} for t in trials]
    assert best_trial(one_shot, tie_margin=0.02)["trial_id"] == "slow"
    tuned = [{**t, "final": {"train_steps": 60}} for t in trials]
    assert best_trial(tuned, tie_margin=0.02)["trial_id"] == "fast"


def test_tie_margin_defaults_to_the_objective_s_repeatability(tmp_path):
    from nni_effbert.config import ConfigError, load_config

    cfg_file = tmp_path / "e.yml"
    cfg_file.write_text("workdir: w\nteacher: {model: bert-base-uncased}\n", encoding="utf-8")
    assert load_config(cfg_file).search.tie_margin == TIE_MARGINS["kd"]
    assert load_config(cfg_file, ["evaluator.objective=metric"]).search.tie_margin == TIE_MARGINS["metric"]
    assert load_config(cfg_file, ["search.tie_margin=0"]).search.tie_margin == 0
    with pytest.raises(ConfigError, match="tie_margin"):
        load_config(cfg_file, ["search.tie_margin=-0.1"])


# -- the report's mark -------------------------------------------------------------------------


def test_report_marks_a_student_that_kept_the_reference_expression(space):
    from nni_effbert.product.report_page import format_table
    from nni_effbert.product.report import reference_note

    layers = [{"expression": REFERENCE_EXPRESSION, "width": 64, "stack": 2}] * 2
    note = reference_note({"layers": layers})
    assert note and "reference expression" in note
    assert reference_note({"layers": [layers[0], {"expression": "linear2(relu(linear1(x)))"}]}) is None
    row = {"name": "searched student", "role": "searched", "dev_metric": 0.8, "params": 1, "non_embedding_params": 1,
           "latency_ms": 1.0, "note": note}
    teacher = {"name": "teacher", "role": "teacher", "dev_metric": 0.9, "params": 2, "non_embedding_params": 2,
               "latency_ms": 2.0}
    assert "reference expression" in format_table([teacher, row])
