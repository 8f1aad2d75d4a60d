"""ProgressiveStrategy in-process: FunctionalEvaluator + SequentialExecutionEngine, as NNI's own
strategy sanity tests do, on the synthetic objective; NNI's Random strategy as the baseline."""
from __future__ import annotations

import json

import nni
import numpy as np
import pytest
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution import SequentialExecutionEngine
from nni.nas.space import RawFormatModelSpace
from nni.nas.strategy import Random

from nni_effbert.strategies import ProgressiveStrategy, SearchConfig, Stage
from nni_effbert.strategies.core import split_parameters
from nni_effbert.strategies.search_errors import SearchConfigError, WarmupFailedError
from support.spaces import LightNasSpace
from support.strategy import BUDGET, FakeSpace, SyntheticObjective


STAGES = [Stage("coarse", "joint", trials=20), Stage("expression", "expression", trials=14),
          Stage("size", "size", trials=10, train_steps=0)]


def make_evaluator(objective, seen):
    # Candidates using layer 0's worst pre-activation crash: failures that must not be ranked
    # (chosen so the optimum itself never crashes).
    crashing = min(objective.pre[0], key=objective.pre[0].get)

    def evaluate(model):
        arch, meta = split_parameters(model.sample)
        seen.append(meta)
        n = objective.space.count_params(arch)
        penalty = 1.0 if BUDGET[0] <= n <= BUDGET[1] else 0.5  # what Random gets outside the budget
        if arch["layer0_pre_act"] == crashing:
            raise RuntimeError("synthetic crash")
        nni.report_final_result(objective(arch) * penalty)
    return FunctionalEvaluator(evaluate)


def run_strategy(strategy, seen, max_models=None):
    space = LightNasSpace(FakeSpace())  # the fake space as an NNI model space: one nni.choice per label
    objective = SyntheticObjective(space.arch_space)
    model_space = RawFormatModelSpace.from_model(space, make_evaluator(objective, seen))
    engine = SequentialExecutionEngine(max_model_count=max_models, continue_on_failure=True)
    strategy(model_space, engine)
    return engine, objective


def best_so_far(engine, objective, warmups=0):
    """Per trial, the best metric so far (warm-ups, run in-process here, count as trials)."""
    values = [-np.inf] * warmups
    for model in engine.list_models():
        values.append(model.metric if model.metric is not None else -np.inf)
    return np.maximum.accumulate(values)


def trials_to(curve, target):
    hits = np.nonzero(curve >= target)[0]
    return int(hits[0]) + 1 if len(hits) else len(curve) + 1


def test_progressive_strategy_runs_in_process_and_beats_nni_random():
    prog_trials, rand_trials, total_crashed = [], [], 0
    for seed in range(3):
        seen, calls = [], []
        strategy = ProgressiveStrategy(search=SearchConfig(param_budget=BUDGET, stages=STAGES, seed=seed),
                                       warmup_fn=calls.append)
        engine, objective = run_strategy(strategy, seen)
        target = 0.95 * objective.optimum(BUDGET)
        # Warm-ups ran in-process, one per stage, with their fixed choices.
        assert [c["_warmup_stage"] for c in calls] == [0, 1, 2]
        assert "layer0_width" in calls[1] and "layer0_mid_act" in calls[2]
        # The evaluator saw stage and train steps through model.sample.
        assert [m["_stage"] for m in seen] == sorted(m["_stage"] for m in seen)
        assert all(m.get("_train_steps") == 0 for m in seen if m["_stage"] == 2)
        models = list(engine.list_models())
        assert len(models) == 44
        crashed = sum(m.metric is None for m in models)
        records = [r for r in strategy.search.records if not r.warmup]
        failed = [r for r in records if r.status == "failed"]
        assert len(failed) == crashed
        total_crashed += crashed
        assert all("failed" in r.reason for r in failed)
        ranked = {r.trial_id for s in range(3) for r in strategy.search.ranking(s)}
        assert ranked == {r.trial_id for r in records if r.status == "succeeded"}
        assert not ranked & {r.trial_id for r in failed}
        prog_trials.append(trials_to(best_so_far(engine, objective, warmups=3), target))

        rand_seen = []
        rand_engine, _ = run_strategy(Random(seed=seed), rand_seen, max_models=47)
        rand_trials.append(trials_to(best_so_far(rand_engine, objective), target))
    assert total_crashed >= 1
    assert np.mean(prog_trials) < np.mean(rand_trials), (prog_trials, rand_trials)


def test_failed_warmup_fn_stops_the_strategy_with_its_reason():
    def warmup(params):
        if params["_warmup_stage"] == 1:
            raise OSError("disk full while writing the supernet")

    strategy = ProgressiveStrategy(search=SearchConfig(param_budget=BUDGET, stages=STAGES), warmup_fn=warmup)
    with pytest.raises(WarmupFailedError, match="stage 1.*disk full"):
        run_strategy(strategy, [])
    assert not any(r.stage == 1 and not r.warmup for r in strategy.search.records)


def test_strategy_state_dict_resume_continues_without_repeating():
    seen = []
    cfg = SearchConfig(param_budget=BUDGET, stages=STAGES, seed=4)
    first = ProgressiveStrategy(search=cfg)
    engine, _ = run_strategy(first, seen, max_models=25)  # stops in stage 1
    state = json.loads(json.dumps(first.state_dict()))
    assert state["search"]["stage"] == 1
    done_before = {json.dumps(split_parameters(m.sample)[0], sort_keys=True) + str(m.sample["_stage"])
                   for m in engine.list_models()}

    seen2 = []
    second = ProgressiveStrategy(search=cfg)
    second.load_state_dict(state)  # before initialize, as NasExperiment resume does
    engine2, _ = run_strategy(second, seen2)
    again = [json.dumps(split_parameters(m.sample)[0], sort_keys=True) + str(m.sample["_stage"])
             for m in engine2.list_models()]
    assert not set(again) & done_before
    assert min(m["_stage"] for m in seen2) == 1
    assert second.search.done is not None and not second.search.done.failed
    assert len(engine.list_models()) + len(engine2.list_models()) == 44


def test_noise_rescores_reach_the_evaluator_through_model_sample():
    """search.noise_rescores under NasExperiment's engine: the re-scores are models like any other,
    their sample carries ``_rescore_of``, and they are neither ranked nor counted as candidates."""
    seen = []
    strategy = ProgressiveStrategy(search=SearchConfig(param_budget=BUDGET, stages=STAGES, seed=1, noise_rescores=3))
    engine, _ = run_strategy(strategy, seen)
    assert strategy.search.done is not None and not strategy.search.done.failed
    again = [m for m in seen if "_rescore_of" in m]
    assert sorted(m["_stage"] for m in again) == [0, 0, 0, 1, 1, 1]  # the one-shot stage 2: none
    assert len(list(engine.list_models())) == 44 + 6
    records = strategy.search.records
    ranked = {r.trial_id for s in range(3) for r in strategy.search.ranking(s)}
    assert not ranked & {r.trial_id for r in records if r.rescore_of is not None}
    assert all(strategy.search.tie_margin(s) >= 0 for s in (0, 1)) and strategy.search.tie_margin(2) == 0


def test_checkpoint_fn_sees_every_recorded_result():
    """What ``search --python`` saves after each result: the state then holds that result, so a
    search killed outright resumes from its last finished trial."""
    cfg = SearchConfig(param_budget=BUDGET, stages=STAGES[:1], seed=1)
    saved = []
    strategy = ProgressiveStrategy(search=cfg, checkpoint_fn=lambda: saved.append(strategy.state_dict()))
    engine, _ = run_strategy(strategy, [], max_models=6)
    finished = [len([r for r in s["search"]["records"] if r["status"] in ("succeeded", "failed")]) for s in saved]
    # one save per recorded result (the in-process warm-up + 6 candidates), each one more than the last
    assert finished == list(range(1, 8)), finished
    last = ProgressiveStrategy(search=cfg)
    last.load_state_dict(json.loads(json.dumps(saved[-1])))
    engine2, _ = run_strategy(last, [])
    assert not {json.dumps(m.sample, sort_keys=True) for m in engine2.list_models()} & \
        {json.dumps(m.sample, sort_keys=True) for m in engine.list_models()}
    with pytest.raises(SearchConfigError, match="checkpoint_fn must be callable"):
        ProgressiveStrategy(checkpoint_fn="state.ckpt")


def test_finished_fn_recovers_a_trial_that_ended_after_the_stop():
    """A candidate still running in the saved state (it finished after the stopped process's last
    save): with ``finished_fn`` knowing its score it is recorded, not run again; without, it is."""
    cfg = SearchConfig(param_budget=BUDGET, stages=STAGES[:1], seed=2)
    first = ProgressiveStrategy(search=cfg)
    engine, _ = run_strategy(first, [], max_models=6)
    state = json.loads(json.dumps(first.state_dict()))
    last = max((r for r in state["search"]["records"] if r["status"] == "succeeded" and not r["warmup"]),
               key=lambda r: r["finish_seq"])
    score = last["score"]
    last.update(status="running", score=None, finish_seq=None)  # as saved before its result came in
    key = json.dumps(last["parameters"], sort_keys=True)
    asked = []

    def finished(parameters):
        asked.append(parameters)
        return score if json.dumps(parameters, sort_keys=True) == key else None

    def resumed(**kw):
        strategy = ProgressiveStrategy(search=cfg, **kw)
        strategy.load_state_dict(json.loads(json.dumps(state)))
        engine2, _ = run_strategy(strategy, [])
        return strategy, [json.dumps(m.sample, sort_keys=True) for m in engine2.list_models()]

    recovered, runs = resumed(finished_fn=finished)
    assert asked == [last["parameters"]] and key not in runs
    record = recovered.search.record(last["trial_id"])
    assert (record.status, record.score) == ("succeeded", score)
    assert recovered.search.done is not None and not recovered.search.done.failed
    _, runs_again = resumed()  # no finished_fn: the candidate is proposed again
    assert runs_again.count(key) == 1
    with pytest.raises(SearchConfigError, match="finished_fn must be callable"):
        ProgressiveStrategy(finished_fn={})


def test_strategy_arguments_are_validated():
    with pytest.raises(TypeError):
        ProgressiveStrategy(SearchConfig())  # keyword-only
    with pytest.raises(SearchConfigError, match="warmup_fn must be callable"):
        ProgressiveStrategy(warmup_fn="warmup.py")
    with pytest.raises(SearchConfigError, match="unknown key"):
        ProgressiveStrategy(search={"stagez": []})
    assert "coarse:jointx24" in repr(ProgressiveStrategy())
