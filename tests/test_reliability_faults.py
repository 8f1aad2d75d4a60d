"""Trial faults end as FAILED trials with their reason; the search goes on and ranks without them.

Faults are injected by a small wrapper around ``python -m nni_effbert.trial`` chosen by the
trial's NNI sequence number (``NNI_TRIAL_SEQ_ID``): a SIGKILL at the first intermediate
report (mid-training), a diverging learning rate (NaN loss), and a 200 MB address-space cap
(``evaluator.memory_limit_mb``). Outside NNI the same faults are checked on the exit status and
the message; through ``nnictl`` on the REST API, the trial logs, the advisor's state and
:func:`nni_effbert.nas.ranking.best_trial`. A warm-up that fails stops the experiment (ERROR) before
any candidate is sent.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from support.reliability import (REPO, NniExperiment, params_of, prepare_work, trial_env,
                                      write_config)

FAULT_WRAPPER = '''
"""Runs nni_effbert.trial with the fault faults.json names for this trial's sequence number."""
import json, os, signal, sys
from pathlib import Path

import nni
from nni_effbert import trial

seq = os.environ.get("NNI_TRIAL_SEQ_ID", "-1")
fault = json.loads((Path(__file__).resolve().parent / "faults.json").read_text()).get(seq)
argv = sys.argv[1:]
if fault == "nan":
    argv += ["--set", "evaluator.learning_rate=1e30"]
elif fault == "warmup_nan":
    argv += ["--set", "warmup.learning_rate=1e30"]
elif fault == "oom":
    argv += ["--set", "evaluator.memory_limit_mb=200"]
elif fault == "kill":
    def _kill(*args, **kwargs):
        print("fault injection: SIGKILL at the first intermediate report", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    nni.report_intermediate_result = _kill
print(f"trial seq {seq}: fault {fault}", file=sys.stderr, flush=True)
sys.exit(trial.main(argv))
'''


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_file, glue_dir):
    return prepare_work(tmp_path_factory.mktemp("faults"), tiny_vocab_file, glue_dir)


def _experiment(tmp_path, prepared, glue_dir, faults, search, max_trials, concurrency):
    shutil.copytree(prepared["work"], tmp_path / "work")
    exp = write_config(tmp_path / "exp.yml", tmp_path / "work", prepared["teacher"], glue_dir, search=search)
    (tmp_path / "fault_trial.py").write_text(FAULT_WRAPPER)
    (tmp_path / "faults.json").write_text(json.dumps(faults))
    return NniExperiment(tmp_path, exp, concurrency=concurrency, max_trials=max_trials,
                         trial_command=f"{sys.executable} fault_trial.py --config {exp}")


@pytest.mark.parametrize("fault, expected", [
    ("nan", "trial failed: loss became"),
    ("oom", "trial failed: out of memory (limit 200 MB)"),
])
def test_fault_outside_nni_exit_1_with_reason(tmp_path, prepared, fault, expected):
    from nni_effbert.search_spaces import EfficientBertSpace

    arch = EfficientBertSpace.preset("tiny").bert_arch()
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    more = {"nan": "evaluator.learning_rate=1e30", "oom": "evaluator.memory_limit_mb=200"}[fault]
    p = subprocess.run([sys.executable, "-m", "nni_effbert.trial", "-q", "-c", str(prepared["exp"]), "--set", more,
                        "--arch", str(tmp_path / "arch.json")], cwd=REPO, env=trial_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 1, p.stderr[-3000:]
    assert expected in p.stderr and p.stdout.strip() == "", p.stderr[-3000:]


@pytest.mark.integration
def test_nnictl_failed_candidates_are_failed_and_excluded(tmp_path, prepared, glue_dir):
    from nni_effbert.nas.ranking import best_trial
    from nni_effbert.nas.records import read_nni_trials

    search = {"trial_concurrency": 2, "seed": 0,
              "stages": [{"name": "coarse", "kind": "joint", "trials": 4, "warmup_steps": 2}]}
    faults = {"1": "kill", "2": "nan", "3": "oom"}  # seq 0 is the warm-up, seq 4 a healthy candidate
    exp = _experiment(tmp_path, prepared, glue_dir, faults, search, max_trials=5, concurrency=2)
    try:
        exp.create()
        status, jobs = exp.wait_finished(timeout=300)
        by_seq = {j["sequenceId"]: j for j in jobs}
        context = f"{status}\n{[(j['sequenceId'], j['trialJobId'], j['status']) for j in jobs]}\n{exp.logs()}"
        assert sorted(by_seq) == [0, 1, 2, 3, 4], context
        assert "_warmup_stage" in params_of(by_seq[0]) and by_seq[0]["status"] == "SUCCEEDED", context
        for seq in (1, 2, 3):
            assert by_seq[seq]["status"] == "FAILED", context
            assert not by_seq[seq].get("finalMetricData"), context  # a failure is never a score
        assert by_seq[4]["status"] == "SUCCEEDED" and by_seq[4].get("finalMetricData"), context
        assert by_seq[4]["startTime"] >= min(by_seq[s]["endTime"] for s in (1, 2, 3)), context  # ran after a failure
        logs = {seq: exp.trial_log(by_seq[seq]["trialJobId"]) for seq in (1, 2, 3)}
        assert "fault injection: SIGKILL" in logs[1], logs[1][-2000:]
        assert "trial failed: trial process killed by SIGKILL" in logs[1], logs[1][-2000:]
        assert "trial failed: loss became" in logs[2] or "trial failed: gradient became" in logs[2], logs[2][-2000:]
        assert "trial failed: out of memory (limit 200 MB)" in logs[3], logs[3][-2000:]
        print("\n" + "\n".join(f"{j['trialJobId']} seq {j['sequenceId']} {j['status']}" for j in jobs))
        assert status["status"] == "DONE", context

        # Ranking: read back through the report module and from the advisor's persisted state.
        best = best_trial(read_nni_trials(port=exp.port))
        assert best["trial_id"] == by_seq[4]["trialJobId"], best
        state = exp.settled_state()
        records = {r["trial_id"]: r for r in state["records"]}
        assert [records[i]["status"] for i in sorted(records)] == ["succeeded", "failed", "failed", "failed",
                                                                  "succeeded"], records
        assert all(records[i]["score"] is None for i in (1, 2, 3)), records
        # The search's own answer is the surviving candidate (failed ones have no score to rank).
        assert [i for i, r in records.items() if r["score"] is not None and not r["warmup"]] == [4], records
    finally:
        exp.close()


@pytest.mark.integration
def test_nnictl_failed_warmup_stops_the_experiment(tmp_path, prepared, glue_dir):
    search = {"trial_concurrency": 2, "seed": 0,
              "stages": [{"name": "coarse", "kind": "joint", "trials": 2, "warmup_steps": 2}]}
    exp = _experiment(tmp_path, prepared, glue_dir, {"0": "warmup_nan"}, search, max_trials=3, concurrency=2)
    (tmp_path / "work" / "supernet" / "stage0.pt").unlink()  # the warm-up must really train
    try:
        exp.create()
        status, jobs = exp.wait(lambda s, j: s["status"] in ("ERROR", "STOPPED") and s.get("errors") and all(
            x["status"] not in ("WAITING", "RUNNING") for x in j), timeout=240, what="ERROR")
        assert len(jobs) == 1 and "_warmup_stage" in params_of(jobs[0]), jobs  # no candidate submitted
        assert jobs[0]["status"] == "FAILED"
        # NNI 3.0's manager logs a dispatcher's reported error as "Dispatcher error: <reason>" in
        # nnimanager.log and then fails the experiment with its generic "Dispatcher stream error,
        # tuner may have crashed." -- that generic line is all /check-status `errors` shows.
        manager_log = (exp.experiments / exp.id / "log" / "nnimanager.log").read_text()
        reason = re.search(r"Dispatcher error: (EfficientBertProgressive: warm-up of stage 0 .*)", manager_log)
        assert reason and "failed" in reason.group(1), manager_log[-3000:]
        assert "EfficientBertProgressive stops the experiment: warm-up of stage 0" in exp.logs()
        print(f"\n{jobs[0]['trialJobId']} {jobs[0]['status']}; experiment {status['status']} {status['errors']}; "
              f"nnimanager.log: {reason.group(0)[:200]}")
        log = exp.trial_log(jobs[0]["trialJobId"])
        assert "trial failed:" in log, log[-2000:]
    finally:
        exp.close()


def test_supervisor_turns_a_signal_death_into_a_failed_trial(capfd):
    """What NNI runs inside a trial: a child killed by SIGKILL -> exit 1 with the reason (NNI 3.0
    would otherwise record USER_CANCELED, exit code null, and no reason); other codes pass through."""
    from nni_effbert.nas.trial_runner import EXIT_FAILED, supervise

    killed = supervise([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed == EXIT_FAILED
    assert "trial failed: trial process killed by SIGKILL" in capfd.readouterr().err
    assert supervise([sys.executable, "-c", "import sys; sys.exit(2)"]) == 2
    assert supervise([sys.executable, "-c", "pass"]) == 0
