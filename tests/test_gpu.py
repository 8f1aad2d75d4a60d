"""The training paths on CUDA, fp32 and bf16, against the same run on the CPU (marked ``gpu``).

Skipped where torch sees no CUDA device; ``scripts/gpu_check.sh`` runs them. One tiny
experiment (tiny preset, SST-2 rows, a teacher fine-tuned on the CPU and shared, dropout off so
that CPU and GPU see the same computation) goes through warm-up, a candidate trial and
distillation per (device, precision); a teacher fine-tune runs on each too, and a trial that
runs out of GPU memory must be reported FAILED.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nni_effbert.config import load_config
from nni_effbert.kd.teacher_finetune import finetune_from_config
from nni_effbert.kd.setup import KDSetup
from nni_effbert.nas.kd_evaluator import KDEvaluator
from nni_effbert.nas.warmup import run_warmup
from nni_effbert.product.distill import run_distill
from nni_effbert.product.export import export_student
from nni_effbert.runtime import resolve_runtime
from nni_effbert.workdir import WorkDir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "effbert.yml"
RUNS = [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")]
# |GPU - CPU| allowed on the KD losses (relative) and on dev accuracy (absolute, 64 dev rows).
LOSS_RTOL = {"fp32": 0.02, "bf16": 0.15}
METRIC_ATOL = {"fp32": 2 / 64, "bf16": 8 / 64}


def _sets(work: Path, base_teacher, glue_dir, device: str, precision: str, *extra):
    return [f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
            "task.max_train_rows=128", "task.max_dev_rows=64", "warmup.steps=12", "evaluator.train_steps=8",
            "distill.general_steps=4", "distill.task_steps=8", "distill.eval_interval=0",
            "student.overrides={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
            f"runtime.device={device}", f"runtime.precision={precision}", *extra]


@pytest.fixture(scope="module")
def shared_teacher(tmp_path_factory, base_teacher, glue_dir) -> Path:
    """One teacher fine-tuned on the CPU, copied into every run (its own dropout would differ per device)."""
    work = tmp_path_factory.mktemp("teacher_cpu")
    cfg = load_config(TINY, _sets(work, base_teacher, glue_dir, "cpu", "fp32"))
    finetune_from_config(cfg, progress=False)
    return WorkDir.of(cfg).teacher_dir


def _pipeline(work: Path, base_teacher, glue_dir, teacher_dir: Path, device: str, precision: str):
    cfg = load_config(TINY, _sets(work, base_teacher, glue_dir, device, precision))
    shutil.copytree(teacher_dir, WorkDir.of(cfg).ensure().teacher_dir)
    setup = KDSetup.from_config(cfg, progress=False)
    assert setup.device.type == device and setup.runtime.precision == precision
    warm = run_warmup(cfg, 0, progress=False, setup=setup)
    assert next(setup.space.parameters()).device.type == device  # the supernet trained there
    ev = KDEvaluator(cfg, stage=0, report=False, progress=False, setup=setup)
    arch = setup.space.bert_arch()
    trial = ev.evaluate(arch)
    out = export_student(setup.space, arch, setup.space, setup.workdir.export_dir("g"), tokenizer=setup.tokenizer,
                         task=setup.task.spec)
    dist = run_distill(cfg, out, progress=False, setup=setup)
    return {"warm_loss": warm.loss, "warm_metric": warm.metrics["default"], "trial_loss": trial["kd_loss"],
            "trial_metric": trial["default"], "latency_ms": trial["latency_ms"], "distill_metric": dist.dev_metric}


@pytest.fixture(scope="module")
def results(tmp_path_factory, base_teacher, glue_dir, shared_teacher):
    return {run: _pipeline(tmp_path_factory.mktemp(f"{run[0]}_{run[1]}"), base_teacher, glue_dir, shared_teacher, *run)
            for run in RUNS}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_warmup_trial_and_distill_on_cuda_match_cpu(results, precision):
    cpu, gpu = results[("cpu", "fp32")], results[("cuda", precision)]
    for key in ("warm_loss", "trial_loss"):
        assert math.isfinite(gpu[key])
        assert gpu[key] == pytest.approx(cpu[key], rel=LOSS_RTOL[precision]), (key, cpu, gpu)
    for key in ("warm_metric", "trial_metric", "distill_metric"):
        assert abs(gpu[key] - cpu[key]) <= METRIC_ATOL[precision] + 1e-9, (key, cpu, gpu)
    assert gpu["latency_ms"] > 0  # latency is measured on the CPU whatever the device


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_teacher_finetune_on_cuda(tmp_path, base_teacher, glue_dir, shared_teacher, precision):
    cfg = load_config(TINY, _sets(tmp_path / "work", base_teacher, glue_dir, "cuda", precision))
    result = finetune_from_config(cfg, progress=False)
    cpu = json.loads((shared_teacher / "effbert_teacher.json").read_text())["dev_metric"]
    # Dropout draws differ between the CPU and CUDA generators: only the outcome is compared.
    assert math.isfinite(result.dev_metric) and abs(result.dev_metric - cpu) <= 0.15


def test_cache_reads_are_pinned_and_non_blocking(tmp_path, base_teacher, glue_dir, shared_teacher):
    cfg = load_config(TINY, _sets(tmp_path / "work", base_teacher, glue_dir, "cuda", "fp32"))
    shutil.copytree(shared_teacher, WorkDir.of(cfg).ensure().teacher_dir)
    setup = KDSetup.from_config(cfg, progress=False)
    cache = setup.train_cache()
    idx = torch.tensor(setup.task.train["idx"][:4])
    got = cache.get(idx, device=setup.device)
    want = cache.get(idx)
    assert got.logits.device.type == "cuda" and got.hidden_states[0].dtype == want.hidden_states[0].dtype
    assert torch.equal(got.hidden_states[0].cpu(), want.hidden_states[0])  # same dtype and values as on disk


def test_cuda_oom_trial_is_reported_failed(tmp_path, base_teacher, glue_dir, shared_teacher):
    """A trial capped at a few MiB of GPU memory (runtime.gpu_memory_mb) runs out: FAILED, exit 1."""
    work = tmp_path / "work"
    sets = _sets(work, base_teacher, glue_dir, "cuda", "fp32", "runtime.gpu_memory_mb=1",
                 "evaluator.batch_size=64")
    cfg = load_config(TINY, sets)
    shutil.copytree(shared_teacher, WorkDir.of(cfg).ensure().teacher_dir)
    setup = KDSetup.from_config(cfg, progress=False)
    run_warmup(cfg, 0, progress=False, setup=KDSetup.from_config(
        load_config(TINY, _sets(work, base_teacher, glue_dir, "cpu", "fp32")), progress=False))
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(setup.space.bert_arch()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    proc = subprocess.run([sys.executable, "-m", "nni_effbert.trial", "-q", "-c", str(TINY),
                           *[f"--set={s}" for s in sets], "--arch", str(arch)],
                          capture_output=True, text=True, env=env, timeout=600)
    index = resolve_runtime(cfg).device.index
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"trial failed: out of GPU memory (1 MiB on cuda:{index})" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""  # no metric printed (nothing would be reported to NNI)
