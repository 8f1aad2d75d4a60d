"""``nni-effbert search`` on a tiny SQuAD task, through NasExperiment (``--python``: an in-process
warm-up and two candidate trials) and through nnictl (warm-up and candidate trials), each followed by
export, distill and report on the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from nni_effbert.nas.experiments import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
STAGES = "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 2}]"


@pytest.fixture(scope="module")
def qa_teacher(tmp_path_factory, qa_tokenizer):
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(qa_tokenizer), max_position_embeddings=128))
    folder = tmp_path_factory.mktemp("qa_teacher")
    model.save_pretrained(folder)
    qa_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("driver", ["python", "nnictl"])
def test_qa_search_export_distill_report(tmp_path, qa_teacher, squad_small, driver, capsys):
    from nni_effbert import cli
    from nni_effbert.nas.records import is_scored, normalize_trial, read_nni_trials

    train, dev = squad_small
    work = tmp_path / "work"
    sets = [f"--set={s}" for s in (
        f"workdir={work}", f"teacher.model={qa_teacher}", "task.name=squad", f"task.train_file={train}",
        f"task.dev_file={dev}", "task.max_seq_length=96", "task.doc_stride=24", "task.search_rows=12",
        "task.max_train_rows=48", "task.max_dev_rows=12", "evaluator.latency_repeats=1",
        "evaluator.latency_seq_length=96", "evaluator.objective=metric", "distill.general_steps=2",
        "distill.task_steps=2", "distill.eval_interval=0", STAGES)]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    if driver == "python":
        proc = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *sets, "--python",
                               "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=400,
                              cwd=tmp_path)
        found = re.search(r"NAS experiment (\w+)", proc.stdout)
        assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        capsys.readouterr()
        code = cli.main(["search", "-q", "-c", TINY, *sets, "--wait", "--timeout", "600"])
        found = re.search(r"^experiment (\S+): (\S+)$", capsys.readouterr().out, re.M)
        assert code == 0 and found
    try:
        exp_id = found.group(1)
        if driver == "python":
            trials = [normalize_trial(t) for t in json.loads((work / "trials.json").read_text())["trials"]]
        else:
            trials = [normalize_trial(t) for t in read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")]
        cands = [t for t in trials if not t["warmup"] and not t.get("teacher")]
        assert len(cands) == 2 and all(is_scored(t) for t in cands), trials
        for t in cands:  # objective metric = F1 on the search split
            assert t["final"]["objective"] == "metric" and t["final"]["default"] == t["final"]["search_f1"]
        if driver == "python":
            # export --experiment reads NNI's trial records, which hold a NasExperiment's serialized model
            # spaces rather than archs: export the best candidate's arch with that experiment's supernet.
            best = max(cands, key=lambda t: t["metric"])
            arch_file = tmp_path / "best_arch.json"
            arch_file.write_text(json.dumps(best["arch"]))
            export = ["export", "--arch", str(arch_file), "--stage", str(best["stage"]), "--experiment", exp_id]
            report = ["report"]
        else:
            export, report = ["export", "--experiment", exp_id], ["report", "--experiment", exp_id]
        for command in (export, ["distill", "--export", str(work / "exports" / "searched")], report):
            assert cli.main([command[0], "-q", "-c", TINY, *sets, *command[1:]]) == 0, command
        report = next((work / "reports").rglob("report.md")).read_text()
        assert "| model | dev EM | dev F1 |" in report
        # The deployment runtimes of span QA: every model in ONNX Runtime fp32 and int8, dev F1 each.
        runtimes = json.loads(next((work / "reports").rglob("runtimes.json")).read_text())["rows"]
        assert {("teacher", "int8"), ("searched", "fp32"), ("searched", "int8")} <= {
            (r["role"], r["precision"]) for r in runtimes}
        assert all(0.0 <= r["dev_metric"] <= 1.0 for r in runtimes) and "dev F1 (ONNX Runtime)" in report
        config = json.loads((work / "exports" / "searched" / "config.json").read_text())
        assert "AutoModelForQuestionAnswering" in config["auto_map"]
    finally:
        if found:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", found.group(1)],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)
