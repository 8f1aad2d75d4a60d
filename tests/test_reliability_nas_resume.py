"""``nni-effbert search --python`` (NasExperiment through the real NNI manager) stopped
mid-stage by SIGTERM, then resumed with ``--resume ID`` on a new port: the strategy continues
in the same stage with its history, no finished candidate is re-run and the warm-up is not
redone. Tiny preset, tiny teacher, concurrency 1, one stage of 3 candidates.

Evidence: the experiment's ``checkpoint/state.ckpt`` (the strategy's saved search) at the stop,
``trials.json`` after the resume, the evaluator's per-trial records (``trials/*/result.json``),
NNI's own trial records and the supernet checkpoint's mtime.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nni_effbert.nas.launcher import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
STAGES = "search.stages=[{name: coarse, kind: joint, trials: 3, warmup_steps: 2}]"


def _records(work: Path):
    """Evaluator records of candidate trial processes: (arch JSON, status) per NNI trial."""
    out = []
    for path in sorted((work / "trials").glob("*/result.json")):
        rec = json.loads(path.read_text())
        out.append((json.dumps(rec.get("arch"), sort_keys=True), rec.get("status")))
    return out


def _candidate_saved(work: Path) -> bool:
    from nni.nas.utils.serializer import get_default_serializer

    for folder in (work / "nni-experiments").glob("*/checkpoint"):
        if not any(folder.glob("state.ckpt*")):  # NNI's serializer adds its suffix
            continue
        records = get_default_serializer().load(folder / "state.ckpt")["strategy"]["search"]["records"]
        if any(r["status"] == "succeeded" and not r["warmup"] for r in records):
            return True
    return False


def _search(args, env, cwd, **kw):
    return [sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *args, "--python",
            "--port", str(free_port())], dict(env=env, cwd=cwd, text=True, **kw)


def test_nas_experiment_sigterm_then_resume_continues_the_stage(tmp_path, base_teacher, glue_dir, capsys):
    from nni.nas.utils.serializer import get_default_serializer

    from nni_effbert import cli
    from nni_effbert.nas.records import read_nni_trials

    work = tmp_path / "work"
    sets = [f"--set={s}" for s in (f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
                                   "search.trial_concurrency=1", "evaluator.latency_repeats=1", STAGES)]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd, kw = _search(sets, env, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    exp_id = None
    try:
        # Wait until the strategy has recorded a finished candidate: the checkpoint it saves after
        # every result (atomically, so reading it while the search runs is safe) shows it.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not _candidate_saved(work):
            time.sleep(0.5)
        assert proc.poll() is None, "the search ended before its first candidate could be interrupted"
        assert _candidate_saved(work), "no candidate recorded in 240 s"
        proc.send_signal(signal.SIGTERM)  # as a scheduler or `kill` would stop it
        out, err = proc.communicate(timeout=180)
        found = re.search(r"NAS experiment (\w+)", out)
        assert found, out[-2000:] + err[-3000:]
        exp_id = found.group(1)
        assert proc.returncode == 130 and f"experiment {exp_id}: STOPPED" in out, out[-2000:] + err[-3000:]
        assert f"--python --resume {exp_id}" in out  # how to resume is printed

        ckpt = work / "nni-experiments" / exp_id / "checkpoint" / "state.ckpt"
        before = get_default_serializer().load(ckpt)["strategy"]["search"]
        assert before["stage"] == 0 and before["done"] is None  # stopped mid-stage
        finished_before = [r for r in before["records"] if r["status"] == "succeeded"]
        assert any(r["warmup"] for r in finished_before) and any(not r["warmup"] for r in finished_before)
        supernet = work / "supernet" / exp_id / "stage0.pt"  # the experiment's own supernet
        mtime = supernet.stat().st_mtime_ns

        cmd, kw = _search([*sets, "--resume", exp_id], env, tmp_path, capture_output=True, timeout=300)
        resumed = subprocess.run(cmd, **kw)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"NAS experiment {exp_id} resumed" in resumed.stdout
        assert f"experiment {exp_id}: DONE" in resumed.stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        # The warm-up was not redone: its checkpoint is untouched, one warm-up record.
        assert supernet.stat().st_mtime_ns == mtime
        trials = json.loads((work / "trials.json").read_text())
        assert trials["experiment_id"] == exp_id
        records = trials["trials"]
        assert [t["warmup"] for t in records].count(True) == 1
        cands = [t for t in records if not t["warmup"] and t["status"] == "SUCCEEDED"]
        assert len(cands) == 3 and all(t["stage"] == 0 for t in cands), records
        assert len({json.dumps(t["arch"], sort_keys=True) for t in cands}) == 3
        # candidates interrupted by the stop show as LOST and were proposed again
        assert {t["status"] for t in records if not t["warmup"]} <= {"SUCCEEDED", "LOST"}, records

        # No finished candidate ran again: each arch that had succeeded has one trial process only.
        runs = [arch for arch, _ in _records(work)]
        for r in finished_before:
            if not r["warmup"]:
                arch = json.dumps({k: v for k, v in r["parameters"].items() if not k.startswith("_")}, sort_keys=True)
                assert runs.count(arch) == 1, (r, runs)
        # Nor one that finished after the stopped process's last save (between SIGTERM and the
        # cancelling of running trials): the resume recovers its result from NNI's records.
        succeeded_runs = [arch for arch, status in _records(work) if status == "succeeded"]
        assert len(succeeded_runs) == len(set(succeeded_runs)) == 3, _records(work)
        # The history went on: the candidates finished before the stop keep their trial ids.
        after = get_default_serializer().load(ckpt)["strategy"]["search"]
        for r in finished_before:
            assert any(a["trial_id"] == r["trial_id"] and a["status"] == "succeeded" for a in after["records"])

        nni_trials = read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")
        statuses = [t["status"] for t in nni_trials]
        # the trial running at the stop was cancelled (so the manager does not re-run it on resume),
        # or it finished before the cancel reached it and its result was recovered
        assert statuses.count("SUCCEEDED") == 3 and set(statuses) <= {"SUCCEEDED", "USER_CANCELED"}, statuses
        with capsys.disabled():
            print(f"\nNasExperiment {exp_id}: before SIGTERM "
                  f"{[(r['trial_id'], r['status'], r['warmup']) for r in before['records']]}; NNI trials after "
                  f"resume {[(t['trial_id'], t['status']) for t in nni_trials]}")

        # Bad input: an id this work directory does not hold.
        assert cli.main(["search", "-q", "-c", TINY, *sets, "--python", "--resume", "nosuch1"]) == 2
    finally:
        if exp_id:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", exp_id],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)
