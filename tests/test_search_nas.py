"""``nni-effbert search --python``: ``NasExperiment(space, KDEvaluator(...).as_nni_evaluator(),
ProgressiveStrategy(...))`` through the real NNI manager (training-service engine, candidates
as trial processes, concurrency 2), warm-ups inside the strategy's process, on the tiny preset
with a tiny teacher fine-tuned in-test. One stage: an in-process warm-up + 2 candidates.

Run as a subprocess (NasExperiment starts an NNI manager and registers atexit hooks); the
test checks the printed table, ``trials.json`` (what report/export read for this path) and
NNI's own records of the experiment, then deletes the experiment.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nni_effbert.nas.launcher import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
STAGES = "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 2}]"


def test_search_python_runs_nas_experiment(tmp_path, base_teacher, glue_dir, capsys):  # noqa: F811
    from nni_effbert import cli
    from nni_effbert.config import load_config
    from nni_effbert.nas.records import is_scored, normalize_trial, read_nni_trials
    from nni_effbert.kd.setup import KDSetup

    work = tmp_path / "work"
    sets = [f"--set={s}" for s in (f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
                                   "search.trial_concurrency=2", "evaluator.latency_repeats=1", STAGES)]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *sets, "--python",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    wall = time.perf_counter() - started
    found = re.search(r"NAS experiment (\w+)", proc.stdout)
    try:
        assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
        exp_id = found.group(1)
        assert f"experiment {exp_id}: DONE" in proc.stdout
        # The warm-up ran in the strategy's process and wrote the stage checkpoint.
        assert (work / "supernet" / exp_id / "stage0.pt").is_file()
        data = json.loads((work / "trials.json").read_text())
        assert data["experiment_id"] == exp_id
        trials = [normalize_trial(t) for t in data["trials"]]
        assert [t["warmup"] for t in trials] == [True, False, False]
        cands = [t for t in trials if not t["warmup"]]
        assert all(is_scored(t) and t["status"] == "SUCCEEDED" and t["stage"] == 0 for t in cands), cands
        space = KDSetup.from_config(load_config(work / "config.yml"), progress=False).space
        for t in cands:
            assert t["params"] == space.count_params(t["arch"]) == t["final"]["params"]
            assert t["final"]["default"] == t["metric"] and t["final"]["stage"] == 0
            assert len(t["expressions"]) == space.config.num_hidden_layers
        # NNI's own records of the candidates (2 trial processes), readable once stopped.
        nni_trials = read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")
        assert [t["status"] for t in nni_trials] == ["SUCCEEDED", "SUCCEEDED"]
        assert sorted(t["metric"] for t in nni_trials) == sorted(t["metric"] for t in cands)
        # Both candidate processes were forked by the search's warm worker (kind nas), which
        # the search stopped with the experiment.
        log = (work / "warm-worker" / "nas.log").read_text()
        worker = int(re.search(r"warm worker (\d+) \(nas\) serving", log).group(1))
        stderrs = [p.read_text() for p in (work / "nni-experiments" / exp_id).rglob("trials/*/trial.stderr")]
        assert len(stderrs) == 2 and all(f"forked (parent {worker})" in e for e in stderrs), stderrs
        deadline = time.monotonic() + 30
        while "exits (asked to)" not in log and time.monotonic() < deadline:  # its last log line
            time.sleep(0.5)
            log = (work / "warm-worker" / "nas.log").read_text()
        assert re.search(rf"warm worker {worker} exits \(asked to\)", log), log
        with capsys.disabled():
            print(f"\nnni-effbert search --python (in-process warm-up + 2 candidate trials, concurrency 2): "
                  f"{wall:.1f} s wall")
    finally:
        if found:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", found.group(1)],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)


def test_search_python_measures_its_tie_margin_with_noise_rescores(tmp_path, base_teacher, glue_dir):  # noqa: F811
    """``search.noise_rescores: 2`` through the real NNI manager: after 3 candidates the 2 best are
    scored again with evaluator seed + 1 (their metric says ``rescore_of``), trials.json keeps them
    apart from the candidates, and ``export --experiment`` ranks with the margin they measured."""
    from nni_effbert import cli
    from nni_effbert.nas.ranking import best_trial, rescore_pairs
    from nni_effbert.nas.records import is_rescore, is_scored, normalize_trial
    from nni_effbert.strategies.ties import measured_margin

    work = tmp_path / "work"
    sets = [f"--set={s}" for s in (f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
                                   "evaluator.latency_repeats=1", "evaluator.train_steps=3", "search.noise_rescores=2",
                                   "search.stages=[{name: coarse, kind: joint, trials: 3, warmup_steps: 2}]")]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *sets, "--python",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    found = re.search(r"NAS experiment (\w+)", proc.stdout)
    try:
        assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
        trials = [normalize_trial(t) for t in json.loads((work / "trials.json").read_text())["trials"]]
        cands = [t for t in trials if is_scored(t)]
        again = [t for t in trials if is_rescore(t)]
        assert len(cands) == 3 and len(again) == 2, [(t["status"], t["rescore_of"]) for t in trials]
        leaders = sorted(cands, key=lambda t: -t["metric"])[:2]
        assert sorted(json.dumps(t["arch"], sort_keys=True) for t in again) == sorted(
            json.dumps(t["arch"], sort_keys=True) for t in leaders)
        base = {t["final"]["evaluator_seed"] for t in cands}
        assert len(base) == 1 and {t["final"]["evaluator_seed"] for t in again} == {base.pop() + 1}
        pairs = rescore_pairs(trials, 0)
        assert len(pairs) == 2
        assert cli.main(["export", "-q", "-c", str(work / "config.yml"), "--experiment", found.group(1)]) == 0
        folder = work / "exports" / "searched"
        meta = json.loads((folder / "export_meta.json").read_text())["extra"]
        assert meta["tie_margin_rescores"] == 2 and meta["tie_margin"] == pytest.approx(measured_margin(pairs))
        assert json.loads((folder / "arch.json").read_text()) == best_trial(trials, tie_margin=0.5)["arch"]
    finally:
        if found:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", found.group(1)],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)
