"""The shipped examples run as written (issue 17).

* ``nnictl create --config nnictl.yml`` on a copy of ``examples/tiny/`` through the real NNI
  manager: only ``teacher.model`` (a tiny in-test BERT) and ``task.data_dir`` are set, no
  ``nni-effbert teacher``, no registration, no path edits. The first trial fine-tunes the
  teacher; nothing starts before it succeeded; warm-ups and candidates follow; DONE.
* the examples' ``search_space.json`` equal ``space.nni_search_space()`` of their presets, and
  the advisor accepts them.
* the README's step-by-step block, copied as a user would, on the tiny config.
* ``-q`` silences the ``datasets`` progress bars (and they show without it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from nni_effbert.config import load_config
from nni_effbert.nas.experiments import free_port, student_space
from nni_effbert.strategies.nni.factory import check_search_space, resolve_config_path
from support.reliability import parameters_ran

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.parent for p in (REPO / "examples").glob("*/nnictl.yml"))


def _nnictl(args, env, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180, **kw)


def _get(port, api):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{api}", timeout=10) as r:
        return json.loads(r.read().decode())


#: ``nnictl`` with more patience for the manager's start: NNI 3.0's launcher polls the new
#: manager's REST server only 3 times, a second apart (``_check_rest_server(retry=3)``), and gives
#: up with "Create experiment failed" when the node process needs longer, as it does on this
#: shared 2-core machine under load. Everything else is nnictl's own ``create``.
PATIENT_NNICTL = ("import sys, nni.experiment.launcher as launcher; launcher._check_rest_server.__defaults__ = "
                  "(60, None); from nni.tools.nnictl.nnictl import parse_args; parse_args()")


def _create(env, cwd, attempts=8):
    """``nnictl create --config nnictl.yml`` in ``cwd``, until its first trial is submitted;
    returns ``(experiment id, port)``.

    Start-up failures of NNI itself on a machine under load are retried: besides the launcher's
    patience above, NNI 3.0's manager gives the dispatcher 10 s to connect
    (``tuner_command_channel.js``), and ``python -m nni`` alone took 10-20 s at load 13-17 here,
    where three starts in a row missed it.
    """
    plain = ""
    for _ in range(attempts):
        port = free_port()
        created = subprocess.run([sys.executable, "-c", PATIENT_NNICTL, "create", "--config", "nnictl.yml",
                                  "--port", str(port)], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", created.stdout + created.stderr)
        found = re.search(r'nnictl stop (\w+)"', plain)
        assert created.returncode == 0 and found, plain
        exp_id = found.group(1)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # polling a REST API with a deadline
            status = _get(port, "check-status")
            if _get(port, "trial-jobs"):
                return exp_id, port
            if status["status"] == "ERROR":
                break
            time.sleep(1)
        plain = json.dumps(status)
        _nnictl(["stop", exp_id], env)
        _nnictl(["experiment", "delete", exp_id], env, input="y\n")
        assert "Tuner did not connect" in plain, plain
    raise AssertionError(f"the experiment did not start {attempts} times; last status: {plain}")


def _shim_bin(folder: Path) -> Path:
    """``python3`` and ``nni-effbert`` on PATH as this interpreter, the way an activated venv
    has them (the examples' trialCommand says ``python3``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, line in (("python3", f'exec "{sys.executable}" "$@"'),
                       ("nni-effbert", f'exec "{sys.executable}" -m nni_effbert.cli "$@"')):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def _user_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), OMP_NUM_THREADS="1",
               PATH=f"{_shim_bin(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return env


def _copy_examples(tmp_path: Path, base_teacher: Path, glue_dir: Path) -> Path:
    """``examples/`` copied to ``tmp_path/examples`` (so ``../../runs/tiny`` stays inside
    ``tmp_path``); the tiny config gets only ``teacher.model`` and ``task.data_dir``."""
    root = tmp_path / "examples"
    shutil.copytree(REPO / "examples", root)
    yml = root / "tiny" / "effbert.yml"
    text = yml.read_text()
    text, n1 = re.subn(r"(?m)^  model: .*$", f"  model: {base_teacher}", text, count=1)
    text, n2 = re.subn(r"(?m)^  data_dir: .*$", f"  data_dir: {glue_dir}", text, count=1)
    assert n1 == n2 == 1, "examples/tiny/effbert.yml no longer has teacher.model / task.data_dir lines"
    yml.write_text(text)
    return root


# -- search spaces ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_search_space_file_matches_its_preset(example):
    conf = yaml.safe_load((example / "nnictl.yml").read_text())
    assert "searchSpace" not in conf, "use searchSpaceFile, written from space.nni_search_space()"
    space_file = example / conf["searchSpaceFile"]
    space = student_space(load_config(example / "effbert.yml", check_paths=False))
    on_disk = json.loads(space_file.read_text())
    assert on_disk == space.nni_search_space(), (
        f"{space_file} is out of date; run `python scripts/write_example_search_spaces.py`")
    check_search_space(space, on_disk)  # what the advisor does on NNI's search space
    # The registered-free advisor form, and the paths NNI and the advisor resolve.
    assert conf["tuner"]["className"] == "nni_effbert.strategies.nni.advisor.ProgressiveAdvisor"
    assert not Path(conf["tuner"]["classArgs"]["config"]).is_absolute()
    assert "ABSOLUTE" not in (example / "nnictl.yml").read_text()
    cfg = load_config(example / "effbert.yml", check_paths=False)
    assert conf["maxTrialNumber"] == cfg.search.max_trial_jobs(extra=1)  # + the teacher trial


def test_relative_class_args_config_resolves_against_trial_code_directory(tmp_path, monkeypatch):
    import base64

    from nni_effbert.strategies.nni.factory import nni_experiment_params

    code = tmp_path / "examples" / "code"  # its effbert.yml's ../../runs/tiny stays in tmp_path
    params = {"trialCodeDirectory": str(code), "trialConcurrency": 1}
    argv = ["--exp_params", base64.b64encode(json.dumps(params).encode()).decode()]
    assert nni_experiment_params(argv) == params
    assert nni_experiment_params(["--other"]) is None
    assert resolve_config_path("effbert.yml", params) == str(code / "effbert.yml")
    assert resolve_config_path(str(tmp_path / "a.yml"), params) == str(tmp_path / "a.yml")
    # Outside a dispatcher (no --exp_params): relative to the working directory, unchanged.
    monkeypatch.setattr(sys, "argv", ["x"])
    assert resolve_config_path("effbert.yml") == "effbert.yml"
    # As the dispatcher sees it.
    monkeypatch.setattr(sys, "argv", ["-m", *argv])
    code.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "tiny" / "effbert.yml", code / "effbert.yml")
    from nni_effbert.strategies.nni.factory import build_broker

    broker = build_broker("effbert.yml", state_path=str(tmp_path / "state.json"))
    assert broker.search.space.config.num_hidden_layers == 2
    first = broker.request([None, None])
    assert [p for _, p in first] == [{"_teacher": True, "_parameter_id": 0}]  # no teacher in ../../runs/tiny yet
    monkeypatch.chdir(tmp_path)
    from nni_effbert.strategies.search_errors import SearchConfigError

    with pytest.raises(SearchConfigError, match="resolved against trialCodeDirectory"):
        build_broker("missing.yml")


# -- nnictl create on the example -------------------------------------------------------------


@pytest.mark.integration
def test_nnictl_create_on_the_tiny_example_runs_teacher_warmups_and_candidates(tmp_path, base_teacher, glue_dir):
    examples = _copy_examples(tmp_path, base_teacher, glue_dir)
    tiny = examples / "tiny"
    env = _user_env(tmp_path)
    exp_id, port = _create(env, tiny)
    exp_dir = tmp_path / "runs" / "tiny" / "nni-experiments" / exp_id
    try:
        deadline = time.monotonic() + 2400  # ~15 s a trial on an idle machine, minutes at load 15
        status = None
        while time.monotonic() < deadline:  # polling a REST API with a deadline
            status = _get(port, "check-status")["status"]
            if status in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(2)
        jobs = _get(port, "trial-jobs")
        logs = {name: (exp_dir / "log" / name).read_text()[-2000:] if (exp_dir / "log" / name).exists() else "-"
                for name in ("dispatcher.log", "nnimanager.log")}
        context = f"status {_get(port, 'check-status')}; logs: {logs}; trials: {jobs}"
        assert status == "DONE", context

        ran_by_job = parameters_ran(jobs)

        def params(job):
            return ran_by_job[job["trialJobId"]]

        jobs.sort(key=lambda j: j["startTime"])
        assert all(j["status"] == "SUCCEEDED" for j in jobs), context
        teacher, rest = jobs[0], jobs[1:]
        assert params(teacher) == {"_teacher": True, "_parameter_id": 0}, context
        # Every trial echoes the parameter id it ran in its final metric (the search's pairing check),
        # on its own channel, and no two trials ran the same parameters.
        ran = []
        for job in jobs:
            final = json.loads(json.loads(job["finalMetricData"][0]["data"]))
            assert final["parameter_id"] == int(job["finalMetricData"][0]["parameterId"]), job
            ran.append(final["parameter_id"])
        assert len(ran) == len(set(ran)), ran
        assert not any(params(j).get("_teacher") for j in rest)
        assert all(j["startTime"] >= teacher["endTime"] for j in rest)  # nothing before it succeeded
        final = json.loads(json.loads(teacher["finalMetricData"][0]["data"]))
        assert final["teacher"] is True and 0.0 <= final["default"] <= 1.0 and final["reused"] is False
        warmups = [params(j)["_warmup_stage"] for j in rest if "_warmup_stage" in params(j)]
        cands = [j for j in rest if "_warmup_stage" not in params(j)]
        assert warmups == [0, 1, 2]
        scored = [j for j in cands if j.get("finalMetricData")]
        assert len(scored) >= 4 and len({params(j)["_stage"] for j in scored}) >= 2
        # The teacher is in the work directory, and the teacher trial is never the best trial.
        assert (tmp_path / "runs" / "tiny" / "teacher" / "effbert_teacher.json").is_file()
        from nni_effbert.nas.records import read_nni_trials
        from nni_effbert.nas.ranking import best_trial

        trials = read_nni_trials(exp_id, port=port)
        assert [t["teacher"] for t in trials][:1] == [True] and trials[0]["warmup"]
        assert not best_trial(trials)["teacher"]
        state = json.loads((exp_dir / "checkpoint" / "progressive_search.json").read_text())
        # (``done`` is set on the advisor's next ask; NNI asks no more once maxTrialNumber trials ran)
        assert state["search"]["teacher"] == "done"
        assert [r["status"] for r in state["search"]["records"]] == ["succeeded"] * len(jobs)
        # A plain nnictl config gets no warm worker (`nni-effbert search` starts one): trials run fresh.
        def stderr_of(job):  # NNI 3.0 local: <exp>/environments/local-env/trials/<id>/trial.stderr
            return next(exp_dir.rglob(f"trials/{job['trialJobId']}/trial.stderr")).read_text()

        assert "this trial starts a fresh process" in stderr_of(jobs[-1]), stderr_of(jobs[-1])[-2000:]
    finally:
        from nni_effbert.nas import warm_worker

        warm_worker.stop(exp_dir / "warm-worker", "trial")
        _nnictl(["stop", exp_id], env)
        _nnictl(["experiment", "delete", exp_id], env, input="y\n")


# -- the teacher trial, against a simulated manager --------------------------------------------


def _advisor_without_teacher(tmp_path, **kw):
    import nni
    from nni.runtime.tuner_command_channel import CommandType

    from nni_effbert.strategies.nni.advisor import ProgressiveAdvisor

    class Recording(ProgressiveAdvisor):
        def send(self, command, data):
            self.__dict__.setdefault("sent", []).append(
                (command, data if command in (CommandType.Error, CommandType.Initialized) else nni.load(data)))

    yml = tmp_path / "effbert.yml"
    yml.write_text("workdir: run\nstudent: {preset: tiny}\nsearch:\n  seed: 0\n  stages:\n"
                   "    - {name: a, kind: joint, trials: 3, warmup_steps: 1}\n"
                   "    - {name: b, kind: size, trials: 2, warmup_steps: 1}\n")
    adv = Recording(config=str(yml), state_path=str(tmp_path / "state.json"),
                    command_channel_url="ws://_unittest_progressive", **kw)
    adv.__dict__.setdefault("sent", [])
    return adv, CommandType


def _new_jobs(adv, CommandType):
    return [d for c, d in adv.sent if c == CommandType.NewTrialJob]


def test_teacher_trial_comes_first_and_holds_every_slot(tmp_path):
    import nni

    adv, CT = _advisor_without_teacher(tmp_path)
    adv.handle_request_trial_jobs(3)  # trialConcurrency 3
    jobs = _new_jobs(adv, CT)
    assert [j["parameters"] for j in jobs] == [{"_teacher": True, "_parameter_id": jobs[0]["parameter_id"]}]
    teacher_pid = jobs[0]["parameter_id"]
    # Its metric is the teacher's dev metric: recorded, never ranked.
    adv.handle_report_metric_data({"type": "FINAL", "parameter_id": teacher_pid,
                                   "value": nni.dump({"default": 0.99, "teacher": True})})
    assert len(_new_jobs(adv, CT)) == 1  # still nothing before it *ended* successfully
    adv.handle_trial_end({"hyper_params": nni.dump({"parameter_id": teacher_pid}), "event": "SUCCEEDED"})
    adv.handle_request_trial_jobs(1)  # NNI asks for one more trial per ended trial
    jobs = _new_jobs(adv, CT)
    # A slot kept as credit is filled at once with stage 0's warm-up; the others wait for it.
    assert [j["parameters"].get("_warmup_stage") for j in jobs[1:]] == [0]
    adv.handle_trial_end({"hyper_params": nni.dump({"parameter_id": jobs[1]["parameter_id"]}), "event": "SUCCEEDED"})
    adv.handle_request_trial_jobs(1)
    jobs = _new_jobs(adv, CT)
    assert len(jobs) == 2 + 3 and all("_stage" in j["parameters"] for j in jobs[2:])  # all three slots busy
    for j in jobs[2:]:
        adv.handle_report_metric_data({"type": "FINAL", "parameter_id": j["parameter_id"],
                                       "value": nni.dump({"default": 0.5})})
    ranked = adv.broker.search.ranking(0)
    assert ranked and all(not r.teacher and not r.warmup for r in ranked)
    assert adv.broker.search.best().score == 0.5


def test_failed_teacher_trial_stops_the_experiment_with_its_reason(tmp_path):
    import nni

    adv, CT = _advisor_without_teacher(tmp_path)
    adv.handle_request_trial_jobs(2)
    pid = _new_jobs(adv, CT)[0]["parameter_id"]
    adv.handle_trial_end({"hyper_params": nni.dump({"parameter_id": pid}), "event": "FAILED"})
    assert len(_new_jobs(adv, CT)) == 1
    commands = [c for c, _ in adv.sent]
    assert CT.NoMoreTrialJobs in commands
    errors = [d for c, d in adv.sent if c == CT.Error]
    assert errors and "teacher fine-tuning" in errors[0] and "trial ended FAILED" in errors[0]
    # Fix the cause and resume: the teacher trial is proposed again, from the saved state.
    again, CT = _advisor_without_teacher(tmp_path)
    again.load_checkpoint()
    again.handle_request_trial_jobs(1)
    assert [{k: v for k, v in j["parameters"].items() if k != "_parameter_id"} for j in _new_jobs(again, CT)] \
        == [{"_teacher": True}]


def test_existing_teacher_means_no_teacher_trial(tmp_path):
    from nni_effbert.kd.teacher import MARKER_FILE
    from nni_effbert.workdir import WorkDir

    assert WorkDir(tmp_path).teacher_marker == tmp_path / "teacher" / MARKER_FILE
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    (tmp_path / "run" / "teacher" / "effbert_teacher.json").write_text("{}")
    adv, CT = _advisor_without_teacher(tmp_path)
    adv.handle_request_trial_jobs(1)
    assert [j["parameters"].get("_warmup_stage") for j in _new_jobs(adv, CT)] == [0]


def test_trial_records_mark_the_teacher_trial(tmp_path):
    from nni_effbert.nas.experiments import format_trials
    from nni_effbert.nas.ranking import best_trial
    from nni_effbert.nas.records import _trial_from_nni

    teacher = _trial_from_nni("T", "SUCCEEDED", 0, {"_teacher": True}, json.dumps({"default": 0.9, "teacher": True}),
                              None)
    cand = _trial_from_nni("C", "SUCCEEDED", 1, {"layer0_width": 8, "_stage": 0}, json.dumps({"default": 0.6}), None)
    assert teacher["teacher"] and teacher["warmup"] and teacher["stage"] is None and teacher["metric"] == 0.9
    assert best_trial([teacher, cand])["trial_id"] == "C"
    assert "teacher" in format_trials([teacher, cand]).splitlines()[2]


# -- -q ---------------------------------------------------------------------------------------


def test_quiet_silences_datasets_and_transformers_progress_bars(tmp_path, base_teacher, glue_dir):
    """``nni-effbert teacher`` on fresh work directories (so ``datasets`` generates its splits
    and tokenizes): the bars are there without ``-q`` and gone with it; the result is printed."""
    tiny = str(REPO / "examples" / "tiny" / "effbert.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNI_", "HF_DATASETS_DISABLE", "HF_HUB_DISABLE"))}
    runs = {}
    for quiet in (False, True):
        cmd = [sys.executable, "-m", "nni_effbert.cli", "teacher", *(["-q"] if quiet else []), "-c", tiny,
               f"--set=workdir={tmp_path / ('quiet' if quiet else 'loud')}", f"--set=teacher.model={base_teacher}",
               f"--set=task.data_dir={glue_dir}"]
        runs[quiet] = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert runs[quiet].returncode == 0, runs[quiet].stderr[-2000:]
        assert "dev accuracy" in runs[quiet].stdout
    loud, quiet = runs[False].stderr, runs[True].stderr
    assert "Generating train split" in loud and "tokenize sst2 train" in loud and "Loading weights" in loud
    for bar in ("Generating train split", "Generating dev split", "tokenize", "Map", "Loading weights",
                "Writing model shards", "it/s]"):
        assert bar not in quiet, quiet


def test_unregistered_name_error_names_the_command(tmp_path):
    from nni_effbert.nas.nnictl_search import _error_reason
    from nni_effbert.strategies.nni.registration import not_registered_hint

    log = tmp_path / "exp" / "log"
    log.mkdir(parents=True)
    # What NNI 3.0's dispatcher (nni/tools/package_utils/tuner_factory.py) logs for an unknown name.
    (log / "dispatcher.log").write_text(
        "[2026-01-01 00:00:01] ERROR (nni.main/MainThread) Builtin name is not found: efficientbertprogressive\n"
        "RuntimeError: Builtin name is not found: efficientbertprogressive\n")
    reason = _error_reason(free_port(), tmp_path / "exp")
    assert "`nni-effbert register-tuner`" in reason and "className" in reason and "\n" not in reason
    assert not_registered_hint("Builtin name is not found: tpe") is None


# -- the README's step-by-step ------------------------------------------------------------------


def _readme_steps():
    """The bash block under "## Using it step by step" of the README, one command per line."""
    section = (REPO / "README.md").read_text().split("## Using it step by step", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.integration
def test_readme_step_by_step_runs_as_written_on_the_tiny_config(tmp_path, base_teacher, glue_dir):
    """Each line of the block, as a user copies it, with ``sst2`` read as ``tiny`` and the
    experiment id typed in where it says ``ID``. The tiny config's ``teacher.model: ./teacher``
    is where the tiny BERT is put, so the config is not edited at all."""
    steps = _readme_steps()
    assert [s.split()[1] for s in steps if s.startswith("nni-effbert")] == [
        "teacher", "search", "export", "distill", "report"]
    root = tmp_path / "repo"
    shutil.copytree(REPO / "examples", root / "examples")
    shutil.copytree(base_teacher, root / "examples" / "tiny" / "teacher")
    env = _user_env(tmp_path)
    exp_id = None
    try:
        for line in steps:
            line = (line.replace("examples/sst2", "examples/tiny").replace("runs/sst2", "runs/tiny")
                    .replace("/path/to/glue", str(glue_dir)))
            if re.search(r"\bID\b", line):
                assert exp_id, "the search printed no experiment id"
                line = re.sub(r"\bID\b", exp_id, line)
            exported = re.match(r"export (\w+)=(\S+)", line)
            if exported:
                env[exported.group(1)] = exported.group(2)
                continue
            run = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=2700)  # search: 10 trials, ~15 s each idle, minutes at load 15
            assert run.returncode == 0, f"{line}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
            found = re.search(r"experiment (\w+) started", run.stdout)
            exp_id = found.group(1) if found else exp_id
        work = root / "runs" / "tiny"
        assert (work / "exports" / "searched" / "config.json").is_file()
        assert json.loads((work / "exports" / "searched" / "export_meta.json").read_text())
        assert (work / "reports" / "report.md").is_file()
    finally:
        if exp_id:
            _nnictl(["experiment", "delete", exp_id], env, input="y\n")
