"""The nnictl adapters (advisor and tuner) against a simulated NNI manager, on the real tiny
EfficientBertSpace, plus the registration helper."""
from __future__ import annotations

import json
from collections import deque

import nni
import numpy as np
import pytest
from nni.runtime.tuner_command_channel import CommandType

from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.strategies.nni.advisor import ProgressiveAdvisor, ProgressiveClassArgsValidator
from nni_effbert.strategies.search_errors import SearchConfigError, WarmupFailedError
from nni_effbert.strategies.nni.registration import BUILTIN_NAME, is_registered, meta_file, register_tuner, unregister_tuner
from nni_effbert.strategies.stages import SearchConfig
from nni_effbert.strategies.nni.tuner import ProgressiveTuner

SEARCH = {"seed": 0, "stages": [
    {"name": "coarse", "kind": "joint", "trials": 6, "warmup_steps": 3},
    {"name": "expression", "kind": "expression", "trials": 4, "warmup_steps": 3},
    {"name": "size", "kind": "size", "trials": 3, "warmup_steps": 3, "train_steps": 0},
]}
TOTAL = SearchConfig.from_dict(SEARCH).total_trials()


class TableObjective:
    """A seeded score per (label, value), summed: a known function of the arch."""

    def __init__(self, space, seed=7):
        rng = np.random.RandomState(seed)
        self.table = {(l, repr(v)): float(rng.uniform()) for l, vs in space.choices.items() for v in vs}

    def __call__(self, params):
        return sum(self.table[(l, repr(v))] for l, v in params.items() if not l.startswith("_"))


def report(params, objective):
    """What the real trial reports: a warm-up's dict has no ``default``, a candidate's has its score."""
    echo = {"parameter_id": params["_parameter_id"]} if "_parameter_id" in params else {}
    if "_warmup_stage" in params:
        return {"search_metric": 0.5, **echo}
    return {"default": objective(params), **echo}


class RecordingAdvisor(ProgressiveAdvisor):
    """The advisor with its channel replaced by a list of sent commands."""

    def send(self, command, data):
        # NewTrialJob / NoMoreTrialJobs carry JSON; Error carries the plain message.
        self.__dict__.setdefault("sent", []).append(
            (command, data if command in (CommandType.Error, CommandType.Initialized) else nni.load(data)))


def make_advisor(tmp_path=None, **kw):
    kw.setdefault("preset", "tiny")
    kw.setdefault("search", SEARCH)
    if tmp_path is not None:
        kw.setdefault("state_path", str(tmp_path / "state.json"))
    adv = RecordingAdvisor(command_channel_url="ws://_unittest_progressive", **kw)
    adv.__dict__.setdefault("sent", [])
    return adv


class FakeManager:
    """NNI's manager loop in miniature: asks ``concurrency`` trials, then one per ended trial."""

    def __init__(self, advisor, concurrency, objective, fail=lambda p: False, max_trials=None):
        self.adv, self.concurrency, self.objective, self.fail = advisor, concurrency, objective, fail
        self.max_trials = max_trials  # as NNI's: no more requests once that many jobs were submitted
        self.queue, self.running, self.started, self.max_running = deque(), deque(), [], 0
        self.read = 0

    def pump(self):
        for command, data in self.adv.sent[self.read:]:
            if command == CommandType.NewTrialJob:
                self.queue.append(data)
        self.read = len(self.adv.sent)
        while self.queue and len(self.running) < self.concurrency:
            trial = self.queue.popleft()
            params = trial["parameters"]
            if "_warmup_stage" not in params:
                # The gate: no candidate of a stage starts while that stage's warm-up runs.
                assert not any(r["parameters"].get("_warmup_stage") == params["_stage"] for r in self.running)
            self.running.append(trial)
            self.started.append(trial)
        self.max_running = max(self.max_running, len(self.running))

    def finish_one(self):
        trial = self.running.popleft()
        pid, params = trial["parameter_id"], trial["parameters"]
        hyper = json.dumps({"parameter_id": pid, "parameters": params})
        if self.fail(params):
            self.adv.handle_trial_end({"trial_job_id": str(pid), "event": "FAILED", "hyper_params": hyper})
        else:
            if "_noop" not in params:  # a placeholder exits without reporting, as nas.trial_runner does
                self.adv.handle_report_metric_data({"parameter_id": pid, "trial_job_id": str(pid), "type": "FINAL",
                                                    "sequence": 0, "value": nni.dump(report(params, self.objective))})
            self.adv.handle_trial_end({"trial_job_id": str(pid), "event": "SUCCEEDED", "hyper_params": hyper})
        if self.max_trials is None or len(self.started) < self.max_trials:
            self.adv.handle_request_trial_jobs(1)
        self.pump()

    def run(self, limit=1000):
        self.adv.handle_initialize({})
        self.adv.handle_request_trial_jobs(self.concurrency)
        self.pump()
        for _ in range(limit):
            if not self.running:
                break
            self.finish_one()


def arch_of(trial):
    """A served trial's parameters without its parameter id."""
    return {k: v for k, v in trial["parameters"].items() if k != "_parameter_id"}


def commands(adv, kind):
    return [data for command, data in adv.sent if command == kind]


def test_advisor_waits_for_the_warmup_with_concurrency_2_and_keeps_both_slots(tmp_path):
    adv = make_advisor(tmp_path)
    adv.handle_initialize(EfficientBertSpace.preset("tiny").nni_search_space())
    adv.handle_request_trial_jobs(2)
    first = commands(adv, CommandType.NewTrialJob)
    assert len(first) == 1 and first[0]["parameters"]["_warmup_stage"] == 0
    assert adv.broker.credit == 1  # the second slot waits, it is not lost
    hyper = json.dumps({"parameter_id": first[0]["parameter_id"], "parameters": first[0]["parameters"]})
    adv.handle_report_metric_data({"parameter_id": first[0]["parameter_id"], "trial_job_id": "w0", "type": "FINAL",
                                   "sequence": 0, "value": nni.dump({"search_metric": 0.5})})
    adv.handle_trial_end({"trial_job_id": "w0", "event": "SUCCEEDED", "hyper_params": hyper})
    after = commands(adv, CommandType.NewTrialJob)[1:]
    assert len(after) == 1 and after[0]["parameters"]["_stage"] == 0  # the waiting slot filled at once
    adv.handle_request_trial_jobs(1)  # the manager's request for the slot the warm-up freed
    assert len(commands(adv, CommandType.NewTrialJob)) == 3
    assert not commands(adv, CommandType.NoMoreTrialJobs)


def test_advisor_full_search_through_a_simulated_manager(tmp_path):
    adv = make_advisor(tmp_path)
    space = adv.broker.search.space
    manager = FakeManager(adv, 2, TableObjective(space), fail=lambda p: p.get("_stage") == 0 and
                          p.get("layer0_pre_act") == "identity" and p.get("layer0_width") == 8)
    manager.run()
    assert len(manager.started) == TOTAL
    assert manager.max_running == 2
    assert len(commands(adv, CommandType.NoMoreTrialJobs)) == 1 and not commands(adv, CommandType.Error)
    done = adv.broker.done
    assert done is not None and not done.failed
    params = [t["parameters"] for t in manager.started]
    assert [p["_warmup_stage"] for p in params if "_warmup_stage" in p] == [0, 1, 2]
    for p in params:  # every candidate is a valid arch of the real space, JSON as the web UI shows it
        if "_warmup_stage" not in p:
            space.validate_arch({k: v for k, v in p.items() if not k.startswith("_")})
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["search"]["done"]["cause"] == "finished"


@pytest.mark.parametrize("last_warmup", [True, False])
@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_search_ends_when_its_last_results_arrive_after_nni_stopped_asking(tmp_path, concurrency, last_warmup):
    """maxTrialNumber = exactly the search's jobs: NNI asks for no job after the last one is
    submitted, so the last results come in with no slot open; the search still ends (and says so
    in its saved state) instead of waiting for an ask that never comes."""
    search = {**SEARCH, "stages": [*SEARCH["stages"][:-1], {**SEARCH["stages"][-1], "warmup": last_warmup}]}
    total = SearchConfig.from_dict(search).total_trials()
    adv = make_advisor(tmp_path, search=search)
    manager = FakeManager(adv, concurrency, TableObjective(adv.broker.search.space), max_trials=total)
    manager.run()
    assert len(manager.started) == total and not manager.running
    assert adv.broker.done is not None and not adv.broker.done.failed
    assert len(commands(adv, CommandType.NoMoreTrialJobs)) == 1
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["search"]["done"]["cause"] == "finished"


@pytest.mark.parametrize("concurrency", [1, 3])
def test_noise_rescores_run_as_jobs_within_max_trial_number(tmp_path, concurrency):
    """search.noise_rescores: 2 re-scores per fine-tuned stage are served as trial jobs with
    ``_rescore_of``, inside maxTrialNumber = total_trials(), and the search still ends."""
    search = {**SEARCH, "noise_rescores": 2}
    total = SearchConfig.from_dict(search).total_trials()
    assert total == TOTAL + 4  # stages 0 and 1; the one-shot size stage is not re-scored
    adv = make_advisor(tmp_path, search=search)
    manager = FakeManager(adv, concurrency, TableObjective(adv.broker.search.space), max_trials=total)
    manager.run()
    assert len(manager.started) == total and not manager.running
    assert adv.broker.done is not None and not adv.broker.done.failed
    params = [arch_of(t) for t in manager.started]
    again = [p for p in params if "_rescore_of" in p]
    assert sorted(p["_stage"] for p in again) == [0, 0, 1, 1]
    records = {r.trial_id: r for r in adv.broker.search.records}
    for p in again:  # the arch of a stage-leading candidate of the same stage
        target = records[p["_rescore_of"]]
        assert target.rescore_of is None and target.stage == p["_stage"]
        assert {k: v for k, v in p.items() if not k.startswith("_")} == target.arch


def test_advisor_failed_warmup_stops_the_experiment_with_the_reason(tmp_path):
    adv = make_advisor(tmp_path)
    manager = FakeManager(adv, 2, TableObjective(adv.broker.search.space),
                          fail=lambda p: p.get("_warmup_stage") == 1)
    manager.run()
    errors = commands(adv, CommandType.Error)
    assert len(errors) == 1 and "warm-up of stage 1 (expression)" in errors[0] and "FAILED" in errors[0]
    # The warm-up's job ended before reporting: one placeholder proved nothing else would run it.
    assert sum("_noop" in t["parameters"] for t in manager.started) == 1
    assert len(commands(adv, CommandType.NoMoreTrialJobs)) == 1
    assert not any(t["parameters"].get("_stage") == 1 for t in manager.started)


def test_advisor_resume_keeps_rerun_trials_and_reproposes_lost_ones(tmp_path):
    adv = make_advisor(tmp_path)
    manager = FakeManager(adv, 2, TableObjective(adv.broker.search.space))
    adv.handle_initialize({})
    adv.handle_request_trial_jobs(2)
    manager.pump()
    for _ in range(3):
        manager.finish_one()
    running = list(manager.running)  # two candidates in flight when the experiment stops
    assert len(running) == 2
    finished = {json.dumps(arch_of(t), sort_keys=True) for t in manager.started if t not in running}

    resumed = make_advisor(tmp_path)
    resumed.load_checkpoint()
    resumed.handle_initialize({})
    # NNI re-runs the first of them (it was RUNNING); the second never reached the trainer.
    resumed.handle_add_customized_trial([json.dumps({"parameter_id": running[0]["parameter_id"],
                                                     "parameter_source": "resumed",
                                                     "parameters": running[0]["parameters"]})])
    resumed.handle_request_trial_jobs(2)
    sent = commands(resumed, CommandType.NewTrialJob)
    assert arch_of(sent[0]) == arch_of(running[1])  # the lost one, proposed again
    assert all(s["parameter_id"] > max(t["parameter_id"] for t in manager.started) for s in sent)
    assert all(s["parameters"]["_parameter_id"] == s["parameter_id"] for s in sent)
    assert not {json.dumps(arch_of(s), sort_keys=True) for s in sent} & finished
    # The re-run trial still reports under its old id.
    pid = running[0]["parameter_id"]
    resumed.handle_report_metric_data({"parameter_id": pid, "type": "FINAL", "trial_job_id": "r",
                                       "sequence": 0, "value": nni.dump(1.5)})
    trial = resumed.broker.trial_of(pid)
    assert resumed.broker.search.record(trial).score == 1.5


def test_advisor_rejects_a_mismatching_search_space_and_bad_class_args(tmp_path):
    adv = make_advisor(tmp_path)
    bad = EfficientBertSpace.preset("tiny").nni_search_space()
    bad["layer0_width"]["_value"] = [1, 2]
    with pytest.raises(SearchConfigError, match="layer0_width"):
        adv.handle_update_search_space(bad)
    with pytest.raises(SearchConfigError, match="unknown classArgs"):
        ProgressiveClassArgsValidator().validate_class_args(preset="tiny", sampler={})
    with pytest.raises(SearchConfigError, match="config file not found"):
        ProgressiveClassArgsValidator().validate_class_args(config=str(tmp_path / "missing.yml"))
    with pytest.raises(SearchConfigError, match="no architecture|cannot be met"):
        make_advisor(tmp_path, search={"param_budget": [1, 2]})


def test_class_args_from_the_experiment_yaml(tmp_path):
    from nni_effbert.config import load_config  # noqa: F401  (the loader the tuner uses)

    cfg = tmp_path / "effbert.yml"
    cfg.write_text("workdir: run\nstudent: {preset: tiny}\nsearch:\n  seed: 3\n  stages:\n"
                   "    - {name: a, kind: joint, trials: 2}\n    - {name: b, kind: size, trials: 2}\n")
    adv = make_advisor(tmp_path, preset=None, search={"seed": 4}, config=str(cfg))
    assert adv.broker.search.config.seed == 4
    assert [s.name for s in adv.broker.search.config.stages] == ["a", "b"]
    assert adv.broker.search.space.config.num_hidden_layers == 2


def test_tuner_defers_slots_through_st_callback_and_finishes(tmp_path):
    tuner = ProgressiveTuner(preset="tiny", search=SEARCH, state_path=str(tmp_path / "t.json"))
    tuner.update_search_space(EfficientBertSpace.preset("tiny").nni_search_space())
    objective = TableObjective(tuner.broker.search.space)
    running, started, ids = deque(), [], iter(range(10**6))

    def start(pid, params):
        running.append((pid, params))
        started.append(params)

    def request(n):  # what NNI's MsgDispatcher does on RequestTrialJobs
        wanted = [next(ids) for _ in range(n)]
        for pid, params in zip(wanted, tuner.generate_multiple_parameters(wanted, st_callback=start)):
            start(pid, params)

    request(2)
    assert len(running) == 1 and running[0][1]["_warmup_stage"] == 0  # id 1 waits for the warm-up
    with pytest.raises(nni.NoMoreTrialError):
        tuner.generate_parameters(next(ids))
    while running:
        pid, params = running.popleft()
        if "_warmup_stage" not in params:
            assert not any(p.get("_warmup_stage") == params["_stage"] for _, p in running)
            tuner.receive_trial_result(pid, params, {"default": objective(params)})
        tuner.trial_end(pid, True)
        if pid == 0:  # the warm-up: both deferred slots are sent through st_callback at once
            assert [p for p, _ in running] == [1, 2]
        request(1)
    assert len(started) == TOTAL
    assert tuner.broker.done is not None and not tuner.broker.done.failed


def test_tuner_failed_warmup_raises_in_the_dispatcher(tmp_path):
    tuner = ProgressiveTuner(preset="tiny", search=SEARCH)
    [warmup] = tuner.generate_multiple_parameters([0], st_callback=lambda *a: None)
    with pytest.raises(WarmupFailedError, match="warm-up of stage 0"):
        tuner.trial_end(0, False)


def test_tuner_resume_requeues_running_trials(tmp_path):
    path = str(tmp_path / "t.json")
    tuner = ProgressiveTuner(preset="tiny", search=SEARCH, state_path=path)
    tuner.generate_multiple_parameters([0], st_callback=lambda *a: None)
    tuner.trial_end(0, True)
    a, b = tuner.generate_multiple_parameters([1, 2])
    tuner.receive_trial_result(1, a, 0.5)
    tuner.trial_end(1, True)
    again = ProgressiveTuner(preset="tiny", search=SEARCH, state_path=path)
    again.load_checkpoint()
    [c] = again.generate_multiple_parameters([10])
    assert c["_parameter_id"] == 10 and b["_parameter_id"] == 2
    assert {**c, "_parameter_id": 0} == {**b, "_parameter_id": 0}  # the interrupted candidate, proposed again
    assert again.broker.search.record(again.broker.trial_of(1)).score == 0.5
    # NNI replays the finished trial's result on resume: already known, nothing changes.
    again.import_data([{"parameter": a, "value": "0.5"}])
    assert len(again.broker.search.ranking(0)) == 1


def test_register_tuner_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("NNI_CONFIG_DIR", str(tmp_path))
    assert meta_file().is_file()
    assert not is_registered()
    meta = register_tuner()
    assert meta["builtinName"] == BUILTIN_NAME and meta["className"].endswith("ProgressiveAdvisor")
    assert register_tuner() == meta
    from nni.tools.package_utils.tuner_factory import get_builtin_module_class_name

    assert get_builtin_module_class_name("tuners", BUILTIN_NAME.lower()) == (
        "nni_effbert.strategies.nni.advisor", "ProgressiveAdvisor")
    text = (tmp_path / "registered_algorithms.yml").read_text()
    assert text.count(BUILTIN_NAME) == 1
    assert unregister_tuner() and not is_registered()
    with pytest.raises(ValueError, match="built into NNI"):
        bad = tmp_path / "meta.yml"
        bad.write_text("algoType: tuner\nbuiltinName: TPE\nclassName: nni_effbert.strategies.nni.tuner.ProgressiveTuner\n")
        register_tuner(bad)


class FifoManager:
    """NNI 3.0's manager with its local training service (``V3asV1``), in miniature: parameters are
    queued when a job is submitted and handed to whichever job asks first; jobs start, ask, report
    and end in a seeded random order, and some are killed before or after they ask."""

    def __init__(self, advisor, concurrency, objective, seed, kill_before=0.0, kill_after=0.0):
        self.adv, self.concurrency, self.objective = advisor, concurrency, objective
        self.rng = np.random.RandomState(seed)
        self.kill_before, self.kill_after = kill_before, kill_after
        self.waiting, self.fifo, self.jobs, self.read, self.next_job = deque(), deque(), [], 0, 0
        self.warm, self.ran, self.killed = set(), [], 0

    def pump(self):
        for command, data in self.adv.sent[self.read:]:
            if command == CommandType.NewTrialJob:
                self.waiting.append(data)
        self.read = len(self.adv.sent)
        while self.waiting and len(self.jobs) < self.concurrency:
            form = self.waiting.popleft()
            self.fifo.append(form)  # V3asV1.submitTrialJob: this.parameters.push(...)
            self.jobs.append({"id": f"job{self.next_job}", "form": form, "got": None})
            self.next_job += 1

    def end(self, job, event):
        self.jobs.remove(job)
        hyper = json.dumps({"parameter_id": job["form"]["parameter_id"], "parameters": job["form"]["parameters"]})
        self.adv.handle_trial_end({"trial_job_id": job["id"], "event": event, "hyper_params": hyper})
        self.adv.handle_request_trial_jobs(1)
        self.pump()

    def step(self):
        job = self.jobs[self.rng.randint(len(self.jobs))]
        if job["got"] is None:
            if self.rng.uniform() < self.kill_before:
                self.killed += 1
                return self.end(job, "FAILED")
            job["got"] = self.fifo.popleft()  # onRequestParameter: this.parameters.shift()
            params = job["got"]["parameters"]
            if "_stage" in params and "_warmup_stage" not in params:
                # No candidate ever runs before its stage's warm-up has finished.
                assert params["_stage"] in self.warm, (params["_stage"], self.warm)
            return None
        params = job["got"]["parameters"]
        if "_noop" in params:
            return self.end(job, "SUCCEEDED")
        if "_warmup_stage" not in params and self.rng.uniform() < self.kill_after:
            self.killed += 1
            return self.end(job, "FAILED")
        self.ran.append(params)
        if "_warmup_stage" in params:
            self.warm.add(params["_warmup_stage"])
        self.adv.handle_report_metric_data({"parameter_id": job["got"]["parameter_id"], "trial_job_id": job["id"],
                                            "type": "FINAL", "sequence": 0,
                                            "value": nni.dump(report(params, self.objective))})
        return self.end(job, "SUCCEEDED")

    def run(self, limit=5000):
        self.adv.handle_initialize({})
        self.adv.handle_request_trial_jobs(self.concurrency)
        self.pump()
        for _ in range(limit):
            if not self.jobs:
                return
            self.step()
        raise AssertionError("the simulated experiment did not end")


@pytest.mark.parametrize("seed,concurrency,kill_before,kill_after", [
    (0, 2, 0.0, 0.0), (1, 3, 0.0, 0.0), (2, 2, 0.15, 0.0), (3, 3, 0.1, 0.1), (4, 2, 0.2, 0.1)])
def test_advisor_attributes_results_to_the_parameters_each_job_really_ran(tmp_path, seed, concurrency,
                                                                           kill_before, kill_after):
    """NNI's local training service hands queued parameters to whichever trial asks first, and a
    trial killed before it asks shifts every later one: the search still scores each arch with
    its own result, runs no candidate before its warm-up, and ends."""
    adv = make_advisor(tmp_path)
    objective = TableObjective(adv.broker.search.space)
    manager = FifoManager(adv, concurrency, objective, seed, kill_before, kill_after)
    manager.run()
    done = adv.broker.done
    assert done is not None and not done.failed, done
    assert len(commands(adv, CommandType.NoMoreTrialJobs)) == 1 and not commands(adv, CommandType.Error)
    scored = [r for r in adv.broker.search.records if r.status == "succeeded" and not r.warmup]
    assert scored
    for record in scored:  # the score of each arch is its own, whichever job ran it
        assert record.score == pytest.approx(objective(record.parameters))
    runs = [json.dumps({k: v for k, v in p.items() if k != "_parameter_id"}, sort_keys=True)
            for p in manager.ran if "_warmup_stage" not in p]
    assert len(runs) == len(set(runs))  # no candidate ran twice
    if kill_before == 0 and kill_after == 0:
        assert len(scored) == TOTAL - 3  # nothing lost: every candidate of the three stages scored


def test_a_reported_failure_stops_on_the_trials_own_reason_without_placeholders(tmp_path):
    """nas.trial_runner reports ``{"failed": true, "reason": ...}`` before it exits 1: the search knows
    which parameters failed and why, at once."""
    adv = make_advisor(tmp_path)
    adv.handle_initialize({})
    adv.handle_request_trial_jobs(2)
    [warmup] = commands(adv, CommandType.NewTrialJob)
    pid = warmup["parameter_id"]
    adv.handle_report_metric_data({"parameter_id": pid, "trial_job_id": "w", "type": "FINAL", "sequence": 0,
                                   "value": nni.dump({"failed": True, "reason": "loss diverged at step 3",
                                                      "parameter_id": pid})})
    adv.handle_trial_end({"trial_job_id": "w", "event": "FAILED",
                          "hyper_params": json.dumps({"parameter_id": pid, "parameters": warmup["parameters"]})})
    adv.handle_request_trial_jobs(1)
    errors = commands(adv, CommandType.Error)
    assert len(errors) == 1 and "warm-up of stage 0" in errors[0] and "loss diverged at step 3" in errors[0]
    assert len(commands(adv, CommandType.NewTrialJob)) == 1  # no placeholder, no candidate


def test_the_old_advisor_and_tuner_class_paths_still_import():
    # registered_algorithms.yml written before the adapters moved to strategies/nni/ names this path
    import importlib

    old = importlib.import_module("nni_effbert.strategies.advisor")
    assert old.ProgressiveAdvisor is ProgressiveAdvisor
    assert old.ProgressiveClassArgsValidator is ProgressiveClassArgsValidator
    assert importlib.import_module("nni_effbert.strategies.tuner").ProgressiveTuner is ProgressiveTuner
