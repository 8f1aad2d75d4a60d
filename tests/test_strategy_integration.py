"""``nnictl create`` with the registered EfficientBertProgressive advisor, through the real NNI
manager and local training service, trialConcurrency 2, on a synthetic trial (no training).

Proves the warm-up wait end to end: each warm-up trial writes a marker when done; a candidate
that starts before its stage's marker exists fails. The REST API must show every trial
SUCCEEDED, candidates with final metrics, the first candidates of a stage starting only after
its warm-up ended, and both slots busy again right after it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from nni_effbert.search_spaces import EfficientBertSpace
from support.reliability import parameters_ran

pytestmark = pytest.mark.integration

SEARCH = {
    "seed": 0,
    "stages": [
        {"name": "coarse", "kind": "joint", "trials": 3, "warmup_steps": 1},
        {"name": "expression", "kind": "expression", "trials": 2, "warmup_steps": 1},
        {"name": "size", "kind": "size", "trials": 1, "warmup": False, "train_steps": 0},
    ],
}
MAX_TRIALS = 3 + 1 + 2 + 1 + 1  # candidates and warm-ups

TRIAL_SCRIPT = '''
"""Synthetic trial: a warm-up writes its stage's marker; a candidate needs it, and reports a
known score of its arch."""
import hashlib, json, os, sys, time
from pathlib import Path

import nni

params = nni.get_next_parameter()
markers = Path(__file__).resolve().parent / "markers"
markers.mkdir(exist_ok=True)
if "_noop" in params:
    sys.exit(0)  # a placeholder, as nas.trial_runner handles it
if "_warmup_stage" in params:
    time.sleep(3)  # stands in for the supernet's warm-up training
    tmp = markers / f".stage{params['_warmup_stage']}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(params))
    os.replace(tmp, markers / f"stage{params['_warmup_stage']}.done")
    # Like nas.trial_runner: a warm-up reports its metric dict (no default) and the parameter id it ran.
    nni.report_final_result({"warmup": True, "parameter_id": params["_parameter_id"]})
else:
    stage = params["_stage"]
    if stage < 2 and not (markers / f"stage{stage}.done").exists():
        sys.exit(f"candidate of stage {stage} started before its warm-up finished")
    arch = {k: v for k, v in params.items() if not k.startswith("_")}
    digest = hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    nni.report_final_result({"default": int(digest[:8], 16) / 16**8, "stage": stage})
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni{path}", timeout=10) as r:
        return json.loads(r.read().decode())


def _nnictl(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.fixture
def experiment(tmp_path):
    env = dict(os.environ, NNI_CONFIG_DIR=str(tmp_path / "nni-config"))
    reg = subprocess.run([sys.executable, "-c", "from nni_effbert.strategies.nni.registration import register_tuner; "
                          "register_tuner()"], env=env, capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stderr
    code = tmp_path / "code"
    code.mkdir()
    (code / "synthetic_trial.py").write_text(TRIAL_SCRIPT)
    (code / "search_space.json").write_text(json.dumps(EfficientBertSpace.preset("tiny").nni_search_space()))
    config = {
        "experimentName": "effbert-progressive-it",
        "searchSpaceFile": str(code / "search_space.json"),
        "trialCommand": f"{sys.executable} synthetic_trial.py",
        "trialCodeDirectory": str(code),
        "trialConcurrency": 2,
        "maxTrialNumber": MAX_TRIALS,
        "maxExperimentDuration": "10m",
        "tuner": {"name": "EfficientBertProgressive", "classArgs": {"preset": "tiny", "search": SEARCH}},
        "trainingService": {"platform": "local"},
        "experimentWorkingDirectory": str(tmp_path / "experiments"),
    }
    (code / "config.json").write_text(json.dumps(config))
    # nnictl reads YAML; JSON is YAML.
    port = _free_port()
    created = _nnictl(["create", "--config", str(code / "config.json"), "--port", str(port)], env)
    assert created.returncode == 0, created.stdout + created.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", created.stdout + created.stderr)  # nnictl colours its output
    found = re.search(r'nnictl stop (\w+)"', plain)  # 'To stop experiment run "nnictl stop <id>"'
    assert found, plain
    exp_id = found.group(1)
    try:
        yield port, exp_id, tmp_path
    finally:
        stopped = _nnictl(["stop", exp_id], env)
        deleted = _nnictl(["experiment", "delete", exp_id], env, input="y\n")
        shutil.rmtree(tmp_path / "experiments", ignore_errors=True)
        assert stopped.returncode == 0 and deleted.returncode == 0, stopped.stdout + deleted.stdout


def test_nnictl_progressive_waits_for_warmups_with_concurrency_2(experiment):
    port, exp_id, tmp_path = experiment
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:  # polling a REST API with a deadline
        status = _get(port, "/check-status")["status"]
        if status in ("DONE", "ERROR", "TUNER_NO_MORE_TRIAL", "STOPPED"):
            jobs = _get(port, "/trial-jobs")
            if status != "TUNER_NO_MORE_TRIAL" or all(j["status"] not in ("WAITING", "RUNNING") for j in jobs):
                break
        time.sleep(1)
    jobs = _get(port, "/trial-jobs")
    log = (tmp_path / "experiments" / exp_id / "log" / "dispatcher.log")
    context = f"status {status}; dispatcher.log:\n{log.read_text()[-3000:] if log.exists() else '-'}"
    assert status == "DONE", context
    assert len(jobs) == MAX_TRIALS, context
    for job in jobs:
        assert job["status"] == "SUCCEEDED", (job, context)

    ran = parameters_ran(jobs)  # NNI may list a job with parameters queued for another (strategies.nni.broker)

    def params(job):
        return ran[job["trialJobId"]]

    warmups = sorted((j for j in jobs if "_warmup_stage" in params(j)), key=lambda j: j["startTime"])
    cands = sorted((j for j in jobs if "_warmup_stage" not in params(j)), key=lambda j: j["startTime"])
    assert [params(w)["_warmup_stage"] for w in warmups] == [0, 1]
    assert len(cands) == 6 and all(j.get("finalMetricData") for j in cands)
    for j in cands:
        metric = json.loads(json.loads(j["finalMetricData"][0]["data"]))
        assert metric["stage"] == params(j)["_stage"] and 0 <= metric["default"] <= 1
    t0 = min(j["startTime"] for j in jobs)
    for j in sorted(jobs, key=lambda j: j["startTime"]):  # the timeline, shown with `pytest -s`
        p = params(j)
        kind = f"warm-up {p['_warmup_stage']}" if "_warmup_stage" in p else f"stage {p['_stage']}"
        print(f"{j['trialJobId']} {kind:10} {(j['startTime'] - t0) / 1e3:6.1f}s - {(j['endTime'] - t0) / 1e3:6.1f}s "
              f"{j['status']}")
    # The stage's candidates start only after its warm-up reported (its supernet is complete by
    # then; the synthetic candidate also exits 1 without the warm-up's marker) ...
    for w in warmups:
        stage = params(w)["_warmup_stage"]
        reported = w["finalMetricData"][0]["timestamp"]
        assert all(c["startTime"] >= reported for c in cands if params(c)["_stage"] == stage)
    # ... and the slot that waited during warm-up 0 is used at once: the first two candidates overlap.
    c1, c2 = cands[:2]
    assert params(c1)["_stage"] == params(c2)["_stage"] == 0
    assert c2["startTime"] < c1["endTime"] and c1["startTime"] < c2["endTime"]
    # Stage 1 fixed the sizes to stage 0's best; the search state was checkpointed for resume.
    state = json.loads((tmp_path / "experiments" / exp_id / "checkpoint" / "progressive_search.json").read_text())
    assert state["search"]["done"]["cause"] == "finished"
    best0 = state["search"]["incumbents"][0]
    for c in cands:
        if params(c)["_stage"] == 1:
            assert params(c)["layer0_width"] == best0["layer0_width"]
