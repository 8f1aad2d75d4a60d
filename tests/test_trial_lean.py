"""An nnictl trial process imports what it uses: no ``nni.nas``, no pytorch_lightning.

Trials run as subprocesses of a small driver that imports ``nni_effbert.trial``, runs its
``main`` (a warm-up trial with ``--arch``, then a candidate under a file-backed NNI trial
channel, so ``nni.get_next_parameter`` / ``nni.report_*`` are used as under nnictl) and prints
which heavy modules ended up in ``sys.modules``. A control process shows the check can fail:
the NAS path (``EfficientBertSpace``) does load pytorch_lightning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
#: Modules a trial must not import (nni.nas imports pytorch_lightning, which imports torchmetrics
#: and, through it, matplotlib).
NOT_IN_A_TRIAL = ("pytorch_lightning", "lightning_fabric", "nni.nas", "torchmetrics", "matplotlib")

DRIVER = f"""
import json, sys
import nni_effbert.trial as entry
rc = entry.main(sys.argv[1:])
loaded = sorted(m for m in {NOT_IN_A_TRIAL!r} if m in sys.modules)
print("MODULES " + json.dumps({{"rc": rc, "loaded": loaded, "nni": "nni" in sys.modules}}), flush=True)
sys.exit(rc)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _modules_lines(stdout: str):
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("MODULES ")]


def test_trial_processes_do_not_import_nni_nas(tmp_path, base_teacher, glue_dir):
    from nni_effbert import cli

    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=64", "--set=task.max_dev_rows=32"]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    # A warm-up trial (--arch: outside NNI), as the search's first trial of stage 0.
    (tmp_path / "warmup.json").write_text(json.dumps({"_warmup_stage": 0, "_warmup_steps": 2}))
    p = subprocess.run([sys.executable, str(driver), "-c", TINY, "-q", *sets, "--arch", str(tmp_path / "warmup.json")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = _modules_lines(p.stdout)
    assert line == {"rc": 0, "loaded": [], "nni": False}, line

    # A candidate under an NNI trial channel (parameters from nni.get_next_parameter). Inside NNI
    # the trial runs in a supervised child: both processes print their modules.
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.config import load_config

    space = KDSetup.from_config(load_config(TINY, [s.split("=", 1)[1] for s in sets]), progress=False).space
    (tmp_path / "params.json").write_text(json.dumps({**space.bert_arch(), "_stage": 0, "_train_steps": 2}))
    env = _env(NNI_TRIAL_COMMAND_CHANNEL="import://test_trial_e2e.FileTrialChannel", NNI_TRIAL_JOB_ID="job-lean",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               EFFBERT_TEST_PARAMS=str(tmp_path / "params.json"), EFFBERT_TEST_METRICS=str(tmp_path / "m.jsonl"))
    p = subprocess.run([sys.executable, str(driver), "-c", TINY, "-q", *sets], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = _modules_lines(p.stdout)
    assert len(lines) == 2, p.stdout[-2000:]  # the trial process, then its supervisor
    for line in lines:
        assert line["rc"] == 0 and line["loaded"] == [], line
    assert lines[0]["nni"]  # the trial reported through NNI's trial API
    finals = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines() if '"FINAL"' in l]
    assert len(finals) == 1


def test_the_nas_space_still_loads_nni_nas():
    """Control: the check above sees pytorch_lightning when the NAS path imports it."""
    code = ("import sys; import nni_effbert.search_spaces as s; import nni_effbert.nas.trial_runner; "
            "before = 'pytorch_lightning' in sys.modules; s.EfficientBertSpace; "
            "print(before, 'pytorch_lightning' in sys.modules, 'nni.nas' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["False", "True", "True"]
