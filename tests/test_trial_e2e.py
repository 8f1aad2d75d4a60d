"""End to end on the tiny preset and SST-2: teacher -> warm-up -> trials as separate processes.

Trials run as ``python -m nni_effbert.trial`` subprocesses, as ``nnictl`` runs them: one
with ``--arch`` (outside NNI), two under a file-backed NNI trial channel (the
``NNI_TRIAL_COMMAND_CHANNEL=import://...`` hook of NNI 3.0), so parameters come from
``nni.get_next_parameter()`` and metrics go through ``nni.report_*``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


from nni.runtime.trial_command_channel.base import TrialCommandChannel

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")


class FileTrialChannel(TrialCommandChannel):
    """NNI trial channel for tests: parameters from ``$EFFBERT_TEST_PARAMS``, metrics appended
    as JSON lines to ``$EFFBERT_TEST_METRICS``."""

    def receive_parameter(self):
        params = json.loads(Path(os.environ["EFFBERT_TEST_PARAMS"]).read_text())
        return {"parameter_id": 7, "parameter_source": "algorithm", "parameters": params, "parameter_index": 0}

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value):  # noqa: A002 - NNI's name
        with open(os.environ["EFFBERT_TEST_METRICS"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"type": type, "parameter_id": parameter_id, "trial": trial_job_id,
                                "sequence": sequence, "value": value}) + "\n")


def _snapshot(folder: Path):
    """(inode, mtime, size) of every file under the cache folder."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _trial_cmd(sets, *extra):
    return [sys.executable, "-m", "nni_effbert.trial", "-c", TINY, "-q", *sets, *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"  # two trials at once on a small machine
    env.update(extra)
    return env


def test_teacher_warmup_and_trials_end_to_end(tmp_path, base_teacher, glue_dir, capsys):
    from nni_effbert import cli

    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=160", "--set=task.max_dev_rows=48", "--set=evaluator.batch_size=16"]

    # 1. teacher, 2. warm-up of stage 0 (in-process: the CLI functions themselves).
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    out = capsys.readouterr().out
    assert "teacher (fine-tuned)" in out and "dev accuracy = " in out
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    assert "teacher (reused)" in capsys.readouterr().out
    assert cli.main(["warmup", "-q", "-c", TINY, *sets, "--stage", "0"]) == 0
    assert "stage 0 supernet (4 steps from random, teacher embeddings)" in capsys.readouterr().out
    cache = work / "cache"
    before = _snapshot(cache)
    assert any(name.endswith("hidden.npy") for name in before)  # the warm-up built the train cache

    import torch

    from nni_effbert.config import load_config
    from nni_effbert.kd.setup import KDSetup

    space = KDSetup.from_config(load_config(TINY, [s.split("=", 1)[1] for s in sets]), progress=False).space
    torch.manual_seed(0)
    import numpy as np

    arch1 = space.bert_arch(width=space.config.widths[1], stack=2)
    arch2 = space.random_arch(np.random.default_rng(11))
    (tmp_path / "arch1.json").write_text(json.dumps(arch1))
    (tmp_path / "p2.json").write_text(json.dumps({**arch2, "_stage": 0, "_train_steps": 2}))
    (tmp_path / "pnan.json").write_text(json.dumps({**arch2, "_stage": 0}))

    # 3. one trial outside NNI (--arch): metrics printed as JSON.
    started = time.perf_counter()
    p1 = subprocess.run(_trial_cmd(sets, "--arch", str(tmp_path / "arch1.json")), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - started
    assert p1.returncode == 0, p1.stderr[-3000:]
    r1 = json.loads(p1.stdout.strip().splitlines()[-1])
    assert r1["params"] == space.count_params(arch1)
    assert r1["non_embedding_params"] == space.count_params(arch1, exclude_embeddings=True)
    assert all(math.isfinite(r1[k]) for k in ("default", "latency_ms", "kd_loss"))
    assert r1["widths"] == [space.config.widths[1]] * 2 and r1["stacks"] == [2, 2] and r1["train_steps"] == 4
    with capsys.disabled():
        print(f"\none tiny trial (subprocess, imports included): {wall:.1f} s wall, {r1['seconds']:.1f} s in evaluate")

    # 4. two trials at once under an NNI channel: a good one and one whose loss diverges.
    channel = "import://test_trial_e2e.FileTrialChannel"
    pythonpath = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    procs = {}
    for name, params, more in (("good", "p2.json", []), ("nan", "pnan.json", ["--set=evaluator.learning_rate=1e30"])):
        env = _env(NNI_TRIAL_COMMAND_CHANNEL=channel, NNI_TRIAL_JOB_ID=f"job-{name}", PYTHONPATH=pythonpath,
                   EFFBERT_TEST_PARAMS=str(tmp_path / params), EFFBERT_TEST_METRICS=str(tmp_path / f"{name}.jsonl"))
        procs[name] = subprocess.Popen(_trial_cmd(sets + more), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {name: (p.wait(timeout=180), *p.communicate()) for name, p in procs.items()}

    rc, stdout, stderr = results["good"]
    assert rc == 0, stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "good.jsonl").read_text().splitlines()]
    finals = [m for m in metrics if m["type"] == "FINAL"]
    assert len(finals) == 1 and finals[0]["parameter_id"] == 7 and finals[0]["trial"] == "job-good"
    final = finals[0]["value"]
    if isinstance(final, str):  # NNI serialises dict metrics
        final = json.loads(final)
    assert final["params"] == space.count_params(arch2) and final["train_steps"] == 2 and final["stage"] == 0
    assert math.isfinite(final["default"])
    assert [m["value"]["step"] if isinstance(m["value"], dict) else json.loads(m["value"])["step"]
            for m in metrics if m["type"] == "PERIODICAL"] == [2]  # eval_interval 2

    rc, stdout, stderr = results["nan"]
    assert rc == 1
    assert "trial failed: loss became NaN at step 2" in stderr or "trial failed: gradient became" in stderr
    assert stdout.strip() == ""  # no metric dict
    sent = (tmp_path / "nan.jsonl").read_text().splitlines() if (tmp_path / "nan.jsonl").exists() else []
    finals = [json.loads(m)["value"] for m in sent if json.loads(m)["type"] == "FINAL"]
    # Never a score: only the failure, its reason, and (from the search) the parameter id it ran.
    assert all(isinstance(v, dict) and v.get("failed") is True and "default" not in v for v in finals), finals
    assert len(finals) == 1 and "became" in finals[0]["reason"]
    record = json.loads((work / "trials" / "job-nan" / "result.json").read_text())
    assert record["status"] == "failed" and "became" in record["reason"]

    # 5. the teacher cache was reused, never rewritten.
    assert _snapshot(cache) == before

    # 6. a warm-up trial through the trial entry: stage 1, from stage 0, with a fixed label.
    warm = {"_warmup_stage": 1, "_stage_name": "expression", "_warmup_steps": 2, "_general_warmup_steps": 1,
            "layer0_width": space.config.widths[-1]}
    (tmp_path / "warm.json").write_text(json.dumps(warm))
    assert cli.main(["trial", "-q", "-c", TINY, *sets, "--arch", str(tmp_path / "warm.json")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["warmup"] is True and report["stage"] == 1 and report["init"] == "stage 0 checkpoint"
    # A warm-up reports no `default` (it must not rank in NNI's web UI); its score is a warmup_ key.
    assert report["steps"] == 3 and "default" not in report and math.isfinite(report["warmup_search_metric"])
    assert (work / "supernet" / "stage1.pt").is_file()
    assert _snapshot(cache) == before

    # 7. a bad arch from a tuner: one-line error, exit status 2.
    (tmp_path / "bad.json").write_text(json.dumps({**arch1, "layer1_width": 999}))
    assert cli.main(["trial", "-q", "-c", TINY, *sets, "--arch", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nni-effbert trial: error: invalid architecture: label 'layer1_width' has value 999")
