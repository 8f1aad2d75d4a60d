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
from nni_effbert.strategies.core import Done
from nni_effbert.strategies.search_errors import SearchConfigError
from nni_effbert.strategies.ties import TIE_MARGINS, measured_margin, noise_sd, order_with_ties, stage_margin


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


# -- the margin the search measures itself (search.noise_rescores) -------------------------------


def test_measured_margin_is_twice_the_spread_of_the_score_differences():
    assert noise_sd([0.01]) is None and measured_margin([(1.0, 1.1)]) is None
    assert noise_sd([0.01, 0.03]) == pytest.approx(np.std([0.01, 0.03], ddof=1))
    # A shift every re-score shares cannot change a ranking: no margin from it.
    assert measured_margin([(-1.0, -0.5), (-2.0, -1.5), (-3.0, -2.5)]) == pytest.approx(0.0)
    assert measured_margin([(-1.0, -1.02), (-1.01, -1.0)]) == pytest.approx(2 * np.std([-0.02, 0.01], ddof=1))


def _rescored_stage(space, rescores):
    """One fine-tuned stage of 4 candidates with noise_rescores=2 and a fallback margin of 0: the
    dearer of the two leaders scored 0.010 above the cheaper; ``rescores`` maps "dear" / "cheap" to
    their re-scores. Returns the search, the proposals by name and the re-score proposals."""
    cfg = SearchConfig(stages=[Stage("coarse", "joint", trials=4, train_steps=60)], tie_margin=0.0, noise_rescores=2)
    search = ProgressiveSearch(space, cfg, latency_fn=lambda arch: space.count_params(arch) / 1e5)
    search.tell(search.ask().trial_id, None)  # the warm-up
    cands = [search.ask() for _ in range(4)]
    assert all(isinstance(c, Proposal) and "_rescore_of" not in c.parameters for c in cands)
    cands.sort(key=lambda p: space.count_params(p.arch))
    named = {"cheap": cands[0], "dear": cands[3], "low1": cands[1], "low2": cands[2]}
    scores = {"dear": -1.000, "cheap": -1.010, "low1": -1.2, "low2": -1.3}
    for name, prop in named.items():
        search.tell(prop.trial_id, {"default": scores[name], "train_steps": 60})
    again = []
    while isinstance(action := search.ask(), Proposal):
        again.append(action)
        of = action.parameters["_rescore_of"]
        name = next(n for n, p in named.items() if p.trial_id == of)
        search.tell(action.trial_id, {"default": rescores[name], "train_steps": 60, "rescore_of": of})
    assert isinstance(action, Done) and not action.failed
    return search, named, again


def test_the_search_rescores_its_two_leaders_and_ties_within_the_margin_they_measure(space):
    # The two leaders' scores move in opposite directions on the next seed (by -0.020 and +0.010):
    # the measured margin (0.042) covers their 0.010 gap, and the cheaper one is chosen.
    search, named, again = _rescored_stage(space, {"dear": -1.020, "cheap": -1.000})
    assert sorted(p.parameters["_rescore_of"] for p in again) == sorted(
        [named["dear"].trial_id, named["cheap"].trial_id])
    assert all(p.arch == next(n for n in named.values() if n.trial_id == p.parameters["_rescore_of"]).arch
               for p in again)
    assert search.tie_margin(0) == pytest.approx(2 * np.std([-0.020, 0.010], ddof=1))
    assert [r.trial_id for r in search.ranking(0)][0] == named["cheap"].trial_id
    assert len(search.ranking(0)) == 4  # re-scores are never ranked as candidates
    # Both shift by the same +0.010: no noise between them, a margin of 0, the best score wins.
    search, named, _ = _rescored_stage(space, {"dear": -0.990, "cheap": -1.000})
    assert search.tie_margin(0) == pytest.approx(0.0)
    assert search.ranking(0)[0].trial_id == named["dear"].trial_id


def test_export_ranks_with_the_margin_the_re_scores_measured(space):
    """nas.ranking.best_trial (export's pick, from NNI's records) pairs each re-score with the
    candidate of the same arch and picks what the search picked."""
    for rescores, winner in (({"dear": -1.020, "cheap": -1.000}, "cheap"), ({"dear": -0.990, "cheap": -1.000}, "dear")):
        search, named, _ = _rescored_stage(space, rescores)
        trials = [{"trial_id": f"t{r.trial_id}", "status": "SUCCEEDED", "metric": r.score, "stage": 0,
                   "arch": r.arch, "latency_ms": r.latency_ms, "rescore_of": r.rescore_of,
                   "final": {"train_steps": 60}} for r in search.records if not r.warmup]
        assert len(trials) == 6
        assert best_trial(trials, tie_margin=0.0)["trial_id"] == f"t{named[winner].trial_id}"
        assert best_trial(trials, tie_margin=0.0)["trial_id"] == f"t{search.ranking(0)[0].trial_id}"


def test_no_rescores_for_a_one_shot_stage_and_a_one_line_error_for_one(space):
    cfg = SearchConfig(stages=[Stage("coarse", "joint", trials=3), Stage("size", "size", trials=5, train_steps=0)],
                       noise_rescores=2)
    assert cfg.total_trials() == (3 + 1 + 2) + (5 + 1)
    with pytest.raises(SearchConfigError, match="noise_rescores"):
        SearchConfig(noise_rescores=1)


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


def test_a_re_score_read_back_from_nni_is_neither_a_candidate_nor_a_failure():
    from nni_effbert.nas.records import _trial_from_nni, is_failed, is_rescore, is_scored

    # nnictl: the parameters carry _rescore_of; NasExperiment: only the final metric does.
    for params, final in (({"w": 1, "_stage": 0, "_rescore_of": 3}, {"default": -1.0, "rescore_of": 3}),
                          ({"w": 1}, {"default": -1.0, "stage": 0, "rescore_of": 3})):
        trial = _trial_from_nni("ab", "SUCCEEDED", 5, params, final, None)
        assert trial["rescore_of"] == 3 and trial["stage"] == 0 and trial["status"] == "SUCCEEDED"
        assert is_rescore(trial) and not is_scored(trial) and not is_failed(trial)
    plain = _trial_from_nni("cd", "SUCCEEDED", 6, {"w": 1, "_stage": 0}, {"default": -1.0}, None)
    assert is_scored(plain) and not is_rescore(plain)
    broken = _trial_from_nni("ef", "SUCCEEDED", 7, {"w": 1, "_stage": 0, "_rescore_of": 3}, {"default": None}, None)
    assert is_failed(broken) and not is_rescore(broken)


# -- the latency-matched baseline's width ---------------------------------------------------------


class _WidthTable:
    """A latency table whose prediction is the sum of the MLP widths and stacks (ms), enough to order archs."""

    def predict(self, arch):
        return float(sum(v * arch.get(k.replace("width", "stack"), 1) for k, v in arch.items() if k.endswith("_width")))


@pytest.mark.parametrize("stack, expected", [(2, "widest"), (1, "nearest")])
def test_latency_baseline_outside_the_widths_range_is_the_nearest_end_without_measuring(space, stack, expected):
    """A stacked student slower than every BERT-MLP width gets the widest one; no measurement (with
    settings None, measuring would fail), so noise between two widths that both miss cannot pick the
    narrower. Inside the range, the nearest by prediction is shortlisted and measured."""
    from nni_effbert.product.baselines import latency_baseline_arch

    widths = sorted(space.config.widths)
    target = space.bert_arch(width=widths[-1], stack=stack)
    if expected == "widest":
        choice = latency_baseline_arch(space, _WidthTable(), target, settings=None, measure=True)
        assert choice.width == widths[-1] and choice.measured_ms is None
    else:
        choice = latency_baseline_arch(space, _WidthTable(), space.bert_arch(width=widths[1], stack=1), measure=False)
        assert choice.width == widths[1]
