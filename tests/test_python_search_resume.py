"""A resumed ``--python`` search does not run again a candidate its trial already scored, even
when the stop cancelled the trial before NNI saw the final metric (the integration test
``test_reliability_nas_resume`` hit this under load: one arch ran twice)."""
from __future__ import annotations

import json

from nni_effbert.nas import python_search
from nni_effbert.params import STAGE_KEY
from nni_effbert.workdir import WorkDir


def _record(wd, trial_id, arch, status="succeeded", default=-1.25, stage=0):
    folder = wd.trial_dir(trial_id)
    folder.mkdir(parents=True)
    body = {"status": status, "arch": arch}
    if status == "succeeded":
        body["result"] = {"default": default, "stage": stage}
    (folder / "result.json").write_text(json.dumps(body))


def test_a_candidate_scored_before_its_trial_was_cancelled_is_not_run_again(tmp_path, monkeypatch):
    wd = WorkDir(tmp_path)
    scored_then_cancelled = {"layer0_width": 8}
    failed = {"layer0_width": 16}
    other_experiment = {"layer0_width": 32}
    _record(wd, "tCanc", scored_then_cancelled)
    _record(wd, "tFail", failed, status="failed")
    _record(wd, "tElse", other_experiment)  # a trial of another experiment in the same work directory
    nni_trials = [{"trial_id": "tCanc", "status": "USER_CANCELED"}, {"trial_id": "tFail", "status": "FAILED"}]
    monkeypatch.setattr(python_search, "read_nni_trials", lambda exp_id, experiments_dir: nni_trials)

    finished = python_search._finished_after_stop(wd, "exp1")

    assert finished({**scored_then_cancelled, STAGE_KEY: 0}) == -1.25
    assert finished({**scored_then_cancelled, STAGE_KEY: 1}) is None  # another stage's score is not this one's
    assert finished({**failed, STAGE_KEY: 0}) is None
    assert finished({**other_experiment, STAGE_KEY: 0}) is None
