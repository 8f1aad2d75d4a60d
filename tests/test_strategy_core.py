"""The progressive search core on a synthetic objective: stages, budgets, failures, resume."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from nni_effbert.strategies.core import NO_METRIC, Done, Failure, ProgressiveSearch, Proposal, Wait
from nni_effbert.strategies.search_errors import BudgetError, SearchConfigError, SearchStateError, WarmupFailedError
from nni_effbert.strategies.stages import SamplerConfig, SearchConfig, Stage
from support.strategy import BUDGET, FakeSpace, SyntheticObjective


def stages(joint=20, expression=14, size=10):
    return [Stage("coarse", "joint", trials=joint), Stage("expression", "expression", trials=expression),
            Stage("size", "size", trials=size, train_steps=0, general_warmup_steps=5)]


def make(seed=0, budget=BUDGET, **kw):
    space = FakeSpace()
    cfg = SearchConfig(param_budget=budget, stages=kw.pop("stages", stages()), seed=seed, **kw)
    return space, ProgressiveSearch(space, cfg)


def drive(search, objective, concurrency=1, fail=lambda p: False, warmup_fails=lambda p: False, stop_after=None,
          log=None):
    """Run the search with up to ``concurrency`` trials in flight, finishing the oldest first.

    Asserts the warm-up gate: no candidate of a stage is proposed while its warm-up runs.
    Returns the proposals in order.
    """
    running = deque()
    proposals = [] if log is None else log
    while True:
        action = search.ask() if len(running) < concurrency else Wait("slots full")
        if isinstance(action, Proposal):
            if not action.warmup:
                assert not any(p.warmup and p.stage == action.stage for p in running), "candidate during warm-up"
            proposals.append(action)
            running.append(action)
            if stop_after is not None and len(proposals) >= stop_after:
                return proposals, running
            continue
        if isinstance(action, Done):
            assert not running
            return proposals, running
        assert running, f"waiting ({action.reason}) with nothing running"
        p = running.popleft()
        if p.warmup:
            search.tell(p.trial_id, Failure("warm-up crashed") if warmup_fails(p) else None)
        elif fail(p):
            search.tell(p.trial_id, Failure("killed"))
        else:
            search.tell(p.trial_id, {"default": objective(p.arch), "params": 1})


def test_stages_hand_off_the_best_arch_and_fix_the_other_labels():
    space, search = make()
    objective = SyntheticObjective(space)
    proposals, _ = drive(search, objective)
    assert search.done == Done(search.done.reason, failed=False, cause="finished")
    warmups = [p for p in proposals if p.warmup]
    assert [w.parameters["_warmup_stage"] for w in warmups] == [0, 1, 2]
    assert warmups[2].parameters["_general_warmup_steps"] == 5
    best0, best1, best2 = search.incumbents
    assert search.ranking(0)[0].arch == best0 and search.ranking(1)[0].arch == best1
    sizes = [l for i in range(2) for l in space.size_labels(i)]
    exprs = [l for l in space.labels if l not in sizes]
    for p in proposals:
        if p.stage == 1:
            assert {l: p.parameters[l] for l in sizes} == {l: best0[l] for l in sizes}
        if p.stage == 2:
            assert {l: p.parameters[l] for l in exprs} == {l: best1[l] for l in exprs}
    # Warm-ups carry the fixed choices of their stage; candidates carry stage and train steps.
    assert {l: warmups[1].parameters[l] for l in sizes} == {l: best0[l] for l in sizes}
    assert not set(exprs) & set(warmups[1].parameters)
    cands = [p for p in proposals if not p.warmup]
    assert all(p.parameters["_stage"] == p.stage for p in cands)
    assert all(p.parameters["_train_steps"] == 0 for p in cands if p.stage == 2)
    assert all("_train_steps" not in p.parameters for p in cands if p.stage < 2)
    # The stage-1 best opens stage 2 (re-scored on the new stage's supernet).
    assert cands[[p.stage for p in cands].index(1)].arch == best0
    assert [sum(p.stage == s for p in cands) for s in range(3)] == [20, 14, 10]
    json.dumps([p.parameters for p in proposals])  # web-UI friendly


def test_budget_respected_and_no_duplicates_submitted():
    space, search = make(seed=3)
    proposals, _ = drive(search, SyntheticObjective(space), concurrency=3)
    seen = set()
    for p in proposals:
        if p.warmup:
            continue
        n = space.count_params(p.arch)
        assert BUDGET[0] <= n <= BUDGET[1]
        key = (p.stage, space.fingerprint(p.arch))
        assert key not in seen, "duplicate submitted"
        seen.add(key)
    # The BERT expression at the sizes that fit opens stage 1.
    first = [p.arch for p in proposals if not p.warmup][:2]
    assert all(a["layer0_mid_act"] == "gelu" and a["layer0_pre_act"] == "identity" for a in first)


def test_unreachable_budget_is_caught_before_any_trial():
    space = FakeSpace()
    with pytest.raises(BudgetError, match=r"achievable parameter counts of this space are \[\d+, \d+\]"):
        ProgressiveSearch(space, SearchConfig(param_budget=[10, 20], stages=stages()))
    # Inside the range but between achievable sizes.
    counts = sorted({space.count_params(space.random_arch(np.random.RandomState(i))) for i in range(400)})
    gap = next((a + 1, b - 1) for a, b in zip(counts, counts[1:]) if b - a > 2)
    with pytest.raises(BudgetError, match="no architecture"):
        ProgressiveSearch(space, SearchConfig(param_budget=list(gap), stages=stages(),
                                              sampler=SamplerConfig(max_tries=300)))


def test_warmup_gate_with_concurrency():
    space, search = make()
    first = search.ask()
    assert isinstance(first, Proposal) and first.warmup and first.parameters["_warmup_stage"] == 0
    for _ in range(3):  # a second slot asks while the warm-up runs: it must wait
        action = search.ask()
        assert isinstance(action, Wait) and "warm-up" in action.reason
    search.tell(first.trial_id, None)
    a, b = search.ask(), search.ask()
    assert isinstance(a, Proposal) and isinstance(b, Proposal) and not a.warmup and not b.warmup
    objective = SyntheticObjective(space)
    search.tell(a.trial_id, objective(a.arch))
    search.tell(b.trial_id, objective(b.arch))
    drive(search, SyntheticObjective(space), concurrency=2)  # the gate holds for the later stages too


def test_failed_candidates_are_recorded_never_ranked_and_the_search_goes_on():
    space, search = make(seed=1)
    proposals, _ = drive(search, SyntheticObjective(space), concurrency=2, fail=lambda p: p.trial_id % 3 == 0)
    assert search.done is not None and not search.done.failed
    failed = [r for r in search.records if r.status == "failed"]
    assert failed and all(r.reason == "killed" and r.score is None for r in failed)
    ranked_ids = {r.trial_id for s in range(3) for r in search.ranking(s)}
    assert not ranked_ids & {r.trial_id for r in failed}
    assert all(search.ranking(s) for s in range(3))
    # Failures still count against the stage budget.
    assert sum(1 for r in search.records if r.stage == 0 and not r.warmup) == 20


def test_bad_metrics_are_failures_and_a_late_metric_still_counts():
    space, search = make()
    search.tell(search.ask().trial_id, None)
    a, b, c = search.ask(), search.ask(), search.ask()
    search.tell(a.trial_id, float("nan"))
    search.tell(b.trial_id, "n/a")
    search.tell(c.trial_id, Failure(NO_METRIC))  # end event first ...
    search.tell(c.trial_id, 0.7)  # ... metric after it: counted
    assert search.record(a.trial_id).status == "failed" and "not finite" in search.record(a.trial_id).reason
    assert search.record(b.trial_id).status == "failed"
    assert search.record(c.trial_id).status == "succeeded" and search.record(c.trial_id).score == 0.7
    search.tell(c.trial_id, 0.1)  # a repeated report is ignored
    assert search.record(c.trial_id).score == 0.7
    search.tell(12345, 0.5)  # unknown ids are ignored


def test_failed_warmup_stops_the_search_with_its_reason():
    space, search = make()
    proposals, _ = drive(search, SyntheticObjective(space), warmup_fails=lambda p: p.stage == 1)
    done = search.done
    assert done.failed and done.cause == "warmup_failed"
    assert "warm-up of stage 1 (expression)" in done.reason and "warm-up crashed" in done.reason
    assert isinstance(done.error(), WarmupFailedError)
    assert not any(p.stage == 1 and not p.warmup for p in proposals)
    assert isinstance(search.ask(), Done)
    # Resuming after fixing the cause proposes that warm-up again.
    again = ProgressiveSearch(space, search.config)
    again.load_state_dict(json.loads(json.dumps(search.state_dict())))
    retry = again.ask()
    assert isinstance(retry, Proposal) and retry.warmup and retry.stage == 1


def test_a_stage_with_no_successful_candidate_ends_the_search():
    space, search = make(stages=stages(joint=4))
    drive(search, SyntheticObjective(space), fail=lambda p: True)
    assert search.done.failed and search.done.cause == "stage_failed"
    assert "no successful candidate" in search.done.reason


@pytest.mark.parametrize("cut", [1, 9, 24, 40])
def test_resume_from_state_dict_continues_identically(cut):
    """Stop after ``cut`` proposals (in any stage), reload from JSON, and finish: the proposals
    equal those of an uninterrupted run, finished trials are not repeated."""
    space = FakeSpace()
    objective = SyntheticObjective(space)
    cfg = SearchConfig(param_budget=BUDGET, stages=stages(), seed=5)
    reference = ProgressiveSearch(space, cfg)
    full, _ = drive(reference, objective)

    first = ProgressiveSearch(space, cfg)
    log, running = drive(first, objective, stop_after=cut)
    while running:  # let what runs finish, as NNI does before a clean stop
        p = running.popleft()
        first.tell(p.trial_id, None if p.warmup else objective(p.arch))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ProgressiveSearch(FakeSpace(), cfg)
    resumed.load_state_dict(state)
    assert resumed.stage_index == first.stage_index
    drive(resumed, objective, log=log)
    assert [(p.stage, p.warmup, p.parameters) for p in log] == [(p.stage, p.warmup, p.parameters) for p in full]
    assert resumed.incumbents == reference.incumbents and resumed.done == reference.done


def test_resume_requeues_interrupted_trials_without_repeating_finished_ones():
    space, search = make(seed=2)
    objective = SyntheticObjective(space)
    log, running = drive(search, objective, concurrency=3, stop_after=12)
    interrupted = [p for p in running]
    assert interrupted
    resumed = ProgressiveSearch(space, search.config)
    resumed.load_state_dict(json.loads(json.dumps(search.state_dict())))
    lost = resumed.requeue_running()
    assert sorted(lost) == sorted(p.trial_id for p in interrupted)
    rest, _ = drive(resumed, objective, concurrency=3)
    finished = [p for p in log if p not in interrupted]
    again = {json.dumps(p.parameters, sort_keys=True) for p in rest}
    assert not any(json.dumps(p.parameters, sort_keys=True) in again for p in finished), "finished trial repeated"
    # Interrupted candidates are proposed again, first thing.
    redo = [p for p in interrupted if not p.warmup]
    assert [p.parameters for p in rest[:len(redo)]] == [p.parameters for p in redo] or any(p.warmup for p in interrupted)
    assert resumed.done is not None and not resumed.done.failed
    total = sum(1 for r in resumed.records if not r.warmup and r.status != "lost")
    assert total == 20 + 14 + 10


def test_state_from_other_settings_is_refused():
    space, search = make()
    drive(search, SyntheticObjective(space), stop_after=5)
    state = search.state_dict()
    other = ProgressiveSearch(space, SearchConfig(param_budget=BUDGET, stages=stages()[:2]))
    with pytest.raises(SearchStateError, match="stages"):
        other.load_state_dict(state)
    with pytest.raises(SearchStateError, match="malformed"):
        ProgressiveSearch(space, search.config).load_state_dict({**state, "records": [{"bogus": 1}]})


def _trials_to_reach(objective_values, target):
    for i, v in enumerate(objective_values, 1):
        if v >= target:
            return i
    return len(objective_values) + 1


def test_progressive_reaches_near_optimum_in_fewer_trials_than_uniform_random():
    """Averaged over seeds, trials (warm-ups counted) until a candidate within 5% of the exact
    optimum, against uniform random search on the same trial budget and objective."""
    space = FakeSpace()
    objective = SyntheticObjective(space)
    optimum = objective.optimum(BUDGET)
    target = 0.95 * optimum
    budget_trials = 20 + 14 + 10 + 3

    def penalised(arch):  # what a random sampler that ignores the budget is scored with
        n = space.count_params(arch)
        return objective(arch) if BUDGET[0] <= n <= BUDGET[1] else 0.5 * objective(arch)

    prog, rand = [], []
    for seed in range(6):
        log, _ = drive(ProgressiveSearch(space, SearchConfig(param_budget=BUDGET, stages=stages(), seed=seed)),
                       objective)
        prog.append(_trials_to_reach([-1.0 if p.warmup else objective(p.arch) for p in log], target))
        rng = np.random.RandomState(seed)
        rand.append(_trials_to_reach([penalised(space.random_arch(rng)) for _ in range(budget_trials)], target))
    assert np.mean(prog) < np.mean(rand), (prog, rand)
    assert sum(p <= budget_trials for p in prog) >= 4, prog


def test_stage_settings_are_validated_with_clear_messages():
    with pytest.raises(SearchConfigError, match="kind must be one of"):
        Stage("x", "width", trials=3)
    with pytest.raises(SearchConfigError, match="trials must be an int >= 1"):
        Stage("x", "joint", trials=0)
    with pytest.raises(SearchConfigError, match="first stage must be of kind 'joint'"):
        SearchConfig(stages=[Stage("x", "size", trials=3)])
    with pytest.raises(SearchConfigError, match=r"param_budget must satisfy 0 <= min <= max"):
        SearchConfig(param_budget=[5, 1])
    with pytest.raises(SearchConfigError, match="unknown key"):
        SearchConfig.from_dict({"stages": [{"name": "a", "kind": "joint", "trials": 2, "trails": 3}]})
    with pytest.raises(SearchConfigError, match="exploration"):
        SamplerConfig(exploration=-1)
    cfg = SearchConfig.from_dict({"param_budget": [1, 2], "sampler": {"exploration": 0.1}})
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.total_trials() == 24 + 16 + 96 + 3


def test_on_the_real_tiny_space_budget_fingerprints_and_bert_seeds():
    from nni_effbert.search_spaces import EfficientBertSpace

    space = EfficientBertSpace.preset("tiny")
    lo, hi = space.param_range()
    budget = [lo, lo + 0.5 * (hi - lo)]
    cfg = SearchConfig(param_budget=budget, seed=1, stages=[
        Stage("coarse", "joint", trials=8), Stage("expression", "expression", trials=6),
        Stage("size", "size", trials=4, train_steps=0)])
    search = ProgressiveSearch(space, cfg)
    rng = np.random.RandomState(0)
    table = {(l, repr(v)): rng.uniform() for l, vs in space.choices.items() for v in vs}
    proposals, _ = drive(search, lambda arch: sum(table[(l, repr(v))] for l, v in arch.items()), concurrency=2)
    assert not search.done.failed
    cands = [p for p in proposals if not p.warmup]
    assert all(budget[0] <= space.count_params(p.arch) <= budget[1] for p in cands)
    keys = [(p.stage, space.fingerprint(p.arch)) for p in cands]
    assert len(keys) == len(set(keys))  # equal functions count as duplicates, not only equal dicts
    assert space.describe(cands[0].arch)[0]["expression"] == "linear2(gelu(linear1(x)))"
    with pytest.raises(BudgetError, match=f"\\[{lo}, {hi}\\]"):
        ProgressiveSearch(space, SearchConfig(param_budget=[hi + 1, hi + 2]))
