"""The warm worker through a real NNI manager (``integration``): one tiny ``nni-effbert search
--wait`` (nnictl, two trials at once) serves every check:

* its trials are forked by the worker the search started (each trial's stderr records its
  process's parent: the worker's pid);
* a running candidate cancelled through NNI's REST API ends ``USER_CANCELED`` and its forked
  process is gone;
* the worker, SIGKILLed mid-search: the next trials fall back to fresh processes (one line
  each says why) and succeed;
* every scored trial reports the ``parameter_id`` it ran on its own NNI channel and no two ran
  the same parameters (two concurrent forked trials' channels do not cross), and the search
  succeeds.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")

pytestmark = pytest.mark.integration


def _rest(port, api, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/nni/{api}", method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read().decode()
    return json.loads(body) if body else None


def _params(job):
    return json.loads(job["hyperParameters"][0])["parameters"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _until(what, check, port=None, timeout=1200.0, period=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # polling the manager's REST API and the trial folders
        got = check()
        if got:
            return got
        if port is not None and _rest(port, "check-status")["status"] == "ERROR":
            raise AssertionError(f"the experiment ended in ERROR before {what}: {_rest(port, 'check-status')}")
        time.sleep(period)
    raise AssertionError(f"timed out waiting for {what}")


def test_search_trials_fork_from_the_warm_worker_survive_a_cancel_and_the_workers_death(
        tmp_path, base_teacher, glue_dir):
    from nni_effbert import cli
    from nni_effbert.nas import warm_worker

    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=evaluator.latency_repeats=1", "--set=search.trial_concurrency=2",
            # Long enough for a candidate to be caught running and cancelled (4 steps take ~1 s).
            "--set=evaluator.train_steps=150", "--set=evaluator.eval_interval=150",
            "--set=search.stages=[{name: coarse, kind: joint, trials: 6, warmup_steps: 2}]"]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), OMP_NUM_THREADS="1", NNI_EFFBERT_WARM_IDLE_S="120")
    started = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *sets], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, started.stdout + started.stderr
    exp_id, port = re.search(r"experiment (\w+) started: web UI http://localhost:(\d+)", started.stdout).groups()
    port = int(port)
    pid_file = work / "warm-worker" / "trial.pid"
    exp_dir = work / "nni-experiments" / exp_id

    def stderr_of(trial_id):  # NNI 3.0 local: <exp>/environments/local-env/trials/<id>/trial.stderr
        found = list(exp_dir.rglob(f"trials/{trial_id}/trial.stderr"))
        return found[0].read_text() if found else ""

    try:
        first_worker = int(pid_file.read_text())  # the search started it before nnictl create

        def running_candidate():
            for job in _rest(port, "trial-jobs") or []:
                forked = re.search(r"warm worker (\d+): trial process (\d+)", stderr_of(job["trialJobId"]))
                if job["status"] == "RUNNING" and forked and "_warmup_stage" not in _params(job):
                    return job["trialJobId"], int(forked.group(2))
            return None

        # 1. Cancel a running candidate through NNI: USER_CANCELED, its forked process gone. (A
        #    candidate may end on its own between the poll and the cancel: then the next one.)
        status = None
        for _ in range(4):
            cancelled, child = _until("a running candidate", running_candidate, port)
            _rest(port, f"trial-jobs/{cancelled}", method="DELETE")
            _until("the cancel", lambda: {j["trialJobId"]: j["status"] for j in _rest(port, "trial-jobs")}
                   .get(cancelled) in ("USER_CANCELED", "SUCCEEDED", "FAILED"), port)
            status = {j["trialJobId"]: j["status"] for j in _rest(port, "trial-jobs")}[cancelled]
            if status != "SUCCEEDED":
                break
        assert status == "USER_CANCELED", (cancelled, status, stderr_of(cancelled))
        _until("the cancelled trial's process to end", lambda: not _alive(child), timeout=30)

        # 2. SIGKILL the worker while no warm-up runs (a failed warm-up would end the search).
        def no_warmup_running():
            jobs = _rest(port, "trial-jobs") or []
            return not any(j["status"] in ("RUNNING", "WAITING") and "_warmup_stage" in _params(j) for j in jobs)

        _until("a moment without a warm-up", no_warmup_running, port)
        before_kill = {j["trialJobId"] for j in _rest(port, "trial-jobs")}
        os.kill(first_worker, signal.SIGKILL)

        def ended():
            status = _rest(port, "check-status")["status"]
            jobs = _rest(port, "trial-jobs") or []
            done = status in ("DONE", "NO_MORE_TRIAL") and all(
                j["status"] not in ("RUNNING", "WAITING", "UNKNOWN") for j in jobs)
            return jobs if done else None

        jobs = sorted(_until("the end of the search", ended, port, timeout=2400), key=lambda j: j["startTime"])
    finally:
        subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "stop", exp_id], env=env,
                       capture_output=True, timeout=180)
        warm_worker.stop(work / "warm-worker", "trial")

    later = [j for j in jobs if j["trialJobId"] not in before_kill]
    assert later, "no trial started after the worker was killed"
    def fell_back(err):  # the one line a trial without a usable worker writes
        return re.search(r"^warm worker: .*; this trial starts a fresh process$", err, re.M)

    # Trials listed before the kill: forked by the search's worker (the cancelled one included),
    # or, when one asked just as the worker died, a fresh process that says why.
    for job in jobs:
        if job["trialJobId"] in before_kill:
            err = stderr_of(job["trialJobId"])
            assert f"forked (parent {first_worker})" in err or fell_back(err), err
    # The trials after the kill: never forked by the dead worker; the first ones are fresh
    # processes, one line saying why; every one succeeds.
    assert all(f"forked (parent {first_worker})" not in stderr_of(j["trialJobId"]) for j in later)
    fallback = [j for j in jobs if fell_back(stderr_of(j["trialJobId"]))]
    assert fallback, [stderr_of(j["trialJobId"])[-500:] for j in later]
    assert all("forked (parent" not in stderr_of(j["trialJobId"]) for j in fallback)
    assert all(j["status"] == "SUCCEEDED" for j in later + fallback), \
        [(j["trialJobId"], j["status"]) for j in later + fallback]
    # Channels do not cross: each scored trial's metric reached NNI on its own channel, with the
    # parameter id it ran, and no two trials ran the same parameters. (Which queued parameters a
    # trial gets is NNI 3.0's choice: whichever trial asks first takes the next, so the id NNI
    # lists for a job may be a sibling's; strategies.nni.broker reads the echoed id for that.)
    scored = [j for j in jobs if j.get("finalMetricData")]
    assert len(scored) >= 4
    assert all(len(j["finalMetricData"]) == 1 for j in scored), [j["finalMetricData"] for j in scored]
    ran = []
    for job in scored:
        final = json.loads(json.loads(job["finalMetricData"][0]["data"]))
        assert final["parameter_id"] == int(job["finalMetricData"][0]["parameterId"]), job
        ran.append(final["parameter_id"])
    assert len(ran) == len(set(ran)), ran
    assert set(ran) <= {_params(j)["_parameter_id"] for j in jobs}, ran
