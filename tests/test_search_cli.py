"""``nni-effbert search --wait`` end to end: the real NNI manager (``nnictl create``), the
registered EfficientBertProgressive advisor, trialConcurrency 2 and the REAL trial entry
(``python -m nni_effbert.trial``) on the tiny preset with a tiny teacher fine-tuned in-test.

Two stages: ``coarse`` (warm-up + 2 candidates, KD fine-tuned) and ``size`` (warm-up with a
general-KD phase + 1 candidate scored on inherited weights, ``train_steps: 0``): 5 trials.
After the CLI has stopped the experiment, ``nnictl view`` serves its records again, and the
REST API must show every trial SUCCEEDED with the metric dict the trial entry reports.
Teardown stops and deletes the experiment and removes its folder, also when the test fails.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from nni_effbert.nas.launcher import format_trials, free_port, nnictl_config
from support.reliability import parameters_ran

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
STAGES = ("search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 2}, "
          "{name: size, kind: size, trials: 1, warmup_steps: 2, general_warmup_steps: 1, train_steps: 0}]")
N_TRIALS = 2 + 1 + 1 + 1


def _nnictl(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def _get(port, api):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{api}", timeout=10) as r:
        return json.loads(r.read().decode())


@pytest.fixture
def workdir_with_teacher(tmp_path, base_teacher, glue_dir):  # noqa: F811 - the imported fixture
    from nni_effbert import cli

    work = tmp_path / "work"
    sets = [f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
            "search.trial_concurrency=2", "evaluator.latency_repeats=1", STAGES]
    assert cli.main(["teacher", "-q", "-c", TINY, *[f"--set={s}" for s in sets]]) == 0
    return work, sets


@pytest.fixture
def search_run(tmp_path, workdir_with_teacher):
    """Runs the CLI; yields (completed process, experiment id, env); always cleans up."""
    work, sets = workdir_with_teacher
    # A private NNI config folder: the search registers the tuner there, not in the venv.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *[f"--set={s}" for s in sets],
           "--wait", "--timeout", "300", "--port", str(free_port())]
    out = tmp_path / "search.out"
    started = time.perf_counter()
    with open(out, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=360, cwd=tmp_path)
    wall = time.perf_counter() - started
    text = out.read_text()
    found = re.search(r"experiment (\w+) started", text)
    try:
        yield proc, text, found.group(1) if found else None, env, work, wall
    finally:
        if found:
            _nnictl(["stop", found.group(1)], env)
            _nnictl(["experiment", "delete", found.group(1)], env, input="y\n")
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)


def test_search_cli_runs_real_trials_through_nnictl(search_run, capsys):
    from nni_effbert.config import load_config
    from nni_effbert.nas.records import read_nni_trials

    proc, text, exp_id, env, work, wall = search_run
    assert proc.returncode == 0 and exp_id, text[-4000:]
    assert f"experiment {exp_id}: DONE" in text and "web UI http://localhost:" in text
    # The CLI stopped the experiment: nothing answers on its port any more, the records stay.
    port = int(re.search(r"web UI http://localhost:(\d+)", text).group(1))
    with pytest.raises(OSError):
        _get(port, "check-status")
    assert (work / "nni-experiments" / exp_id / "db" / "nni.sqlite").is_file()
    # the experiment's own config snapshot, what `--experiment ID` commands and its trials read
    assert load_config(work / "nni-experiments" / exp_id / "effbert.yml").to_dict() == \
        load_config(work / "config.yml").to_dict()

    # The nnictl config it wrote, and the saved experiment config every trial read.
    conf = yaml.safe_load((work / "nnictl" / "nnictl.yml").read_text())
    assert conf["tuner"]["name"] == "EfficientBertProgressive" and conf["trialConcurrency"] == 2
    assert conf["trialCommand"].endswith(f"--config {work / 'config.yml'}")
    cfg = load_config(work / "config.yml")
    assert cfg.search.total_trials() == N_TRIALS

    # The REST API of the stopped experiment, served again by `nnictl view`.
    view_port = free_port()
    viewed = _nnictl(["view", exp_id, "--port", str(view_port)], env)
    assert viewed.returncode == 0, viewed.stdout + viewed.stderr
    jobs = _get(view_port, "trial-jobs")
    assert len(jobs) == N_TRIALS
    assert all(j["status"] == "SUCCEEDED" for j in jobs), [(j["trialJobId"], j["status"]) for j in jobs]

    from nni_effbert.kd.setup import KDSetup

    space = KDSetup.from_config(cfg, progress=False).space
    ran = parameters_ran(jobs)  # NNI may list a job with a sibling's parameters
    warmups, cands = [], []
    for j in jobs:
        assert j.get("finalMetricData"), j
        metric = json.loads(json.loads(j["finalMetricData"][0]["data"]))
        assert metric["parameter_id"] == int(j["finalMetricData"][0]["parameterId"]), j
        params = ran[j["trialJobId"]]
        (warmups if "_warmup_stage" in params else cands).append((params, metric))
    assert sorted(p["_warmup_stage"] for p, _ in warmups) == [0, 1]
    assert sorted(p["_stage"] for p, _ in cands) == [0, 0, 1]

    # NNI 3.0's web UI ranks a trial ("Top trials", "Best metric") iff its final metric's default is a
    # finite number (Trial.sortable); no warm-up may be rankable, so none can outrank a candidate.
    def rankable(metric):
        value = metric.get("default") if isinstance(metric, dict) else metric
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    assert not any(rankable(m) for _, m in warmups), warmups
    assert all(rankable(m) for _, m in cands)
    for _, metric in warmups:  # the warm-up still reports its reference arch, under other keys
        assert metric["warmup"] is True and 0.0 <= metric["warmup_search_metric"] <= 1.0
    for params, metric in cands:
        arch = {k: v for k, v in params.items() if not k.startswith("_")}
        assert metric["params"] == space.count_params(arch)
        assert metric["stage"] == params["_stage"] and 0.0 <= metric["search_metric"] <= 1.0
        assert metric["objective"] == "kd" and metric["default"] == -metric["search_kd_loss"]
        assert len(metric["expressions"]) == space.config.num_hidden_layers
        assert metric["train_steps"] == (0 if params["_stage"] == 1 else cfg.evaluator.train_steps)
    # What export/report read: the experiment's records, by id, once stopped (here: viewed).
    trials = read_nni_trials(exp_id, port=view_port)
    assert sum(not t["warmup"] and t["status"] == "SUCCEEDED" for t in trials) == 3
    assert sum(t["warmup"] and t["status"] == "SUCCEEDED" for t in trials) == 2  # the report knows they succeeded
    with capsys.disabled():
        print(f"\nnni-effbert search --wait ({N_TRIALS} trials, concurrency 2): {wall:.1f} s wall\n"
              + format_trials(trials))


def test_nnictl_config_fields(tmp_path):
    from nni_effbert.config import load_config

    cfg = load_config(TINY, [f"workdir={tmp_path / 'w'}", "search.trial_concurrency=3"], check_paths=False)
    conf = nnictl_config(cfg, tmp_path / "w" / "config.yml")
    assert conf["trialConcurrency"] == 3 and conf["maxTrialNumber"] == cfg.search.max_trial_jobs() > cfg.search.total_trials()
    assert conf["tuner"] == {"name": "EfficientBertProgressive",
                             "classArgs": {"config": str(tmp_path / "w" / "config.yml")}}
    assert conf["trialCommand"].endswith(f"-m nni_effbert.trial --config {tmp_path / 'w' / 'config.yml'}")
    assert conf["experimentWorkingDirectory"] == str(tmp_path / "w" / "nni-experiments")
    assert conf["trainingService"] == {"platform": "local", "useActiveGpu": False, "maxTrialNumberPerGpu": 1}
    assert conf["trialGpuNumber"] == 0  # trials see no GPU unless search.gpus_per_trial asks for them
    assert "searchSpaceFile" not in conf


def test_search_without_teacher_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY,
                           f"--set=workdir={tmp_path / 'w'}", "--set=teacher.model=minilm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("nni-effbert search: error: no fine-tuned teacher in") and "nni-effbert teacher" in lines[-1]


def test_error_reason_falls_back_to_the_dispatcher_log(tmp_path):
    from nni_effbert.nas.nnictl_search import _error_reason

    log = tmp_path / "exp" / "log"
    log.mkdir(parents=True)
    (log / "dispatcher.log").write_text(
        "[2026-01-01 00:00:00] INFO (x) started\n"
        "[2026-01-01 00:00:09] ERROR (nni_effbert.strategies.nni.advisor) EfficientBertProgressive stops the "
        "experiment: warm-up of stage 0 failed (trial abc FAILED)\n")
    reason = _error_reason(free_port(), tmp_path / "exp")  # nothing listens there: the log is read
    assert "warm-up of stage 0 failed" in reason and "\n" not in reason


def test_format_trials_lists_warmups_and_candidates():
    table = format_trials([
        {"trial_id": "a1", "stage": 0, "stage_name": "coarse", "warmup": True, "status": "SUCCEEDED"},
        {"trial_id": "b2", "stage": 0, "stage_name": "coarse", "warmup": False, "status": "SUCCEEDED",
         "metric": 0.8125, "params": 31970},
        {"trial_id": "c3", "stage": 0, "warmup": False, "status": "FAILED"}])
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "stage", "status", "metric", "params"] and len(lines) == 5
    assert "0 coarse (warm-up)" in lines[2] and lines[3].split()[-2:] == ["0.8125", "31,970"]
    assert lines[4].split()[-3:] == ["FAILED", "-", "-"]


def test_resume_of_an_unknown_or_other_kind_of_experiment_is_a_one_line_error(tmp_path, workdir_with_teacher, capsys):
    from nni_effbert import cli

    work, sets = workdir_with_teacher
    args = ["search", "-q", "-c", TINY, *[f"--set={s}" for s in sets]]
    (work / "nni-experiments" / "abc123" / "db").mkdir(parents=True)  # an nnictl experiment's folder
    cases = [
        (["--resume", "nosuch1"], "no experiment nosuch1 in this work directory (experiments in"),
        (["--resume", "../x"], "an experiment id is letters and digits"),
        (["--resume", "abc123", "--python"], "experiment abc123 has no NasExperiment checkpoint"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli.main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nni-effbert search: error: --resume") and message in err[0], err
    (work / "nni-experiments" / "abc123" / "checkpoint").mkdir()
    (work / "nni-experiments" / "abc123" / "checkpoint" / "state.ckpt.torch").write_bytes(b"x")
    assert cli.main([*args, "--resume", "abc123"]) == 2
    assert "is a NasExperiment (--python) search; resume it with --python" in capsys.readouterr().err
