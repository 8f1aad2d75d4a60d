"""The ``runtime`` section (device, precision, threads, loader workers) and the NNI GPU keys, on CPU.

The GPU paths themselves are in ``tests/test_gpu.py`` (marked ``gpu``, skipped without CUDA).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from nni_effbert import cli
from nni_effbert.config import KDConfig, TaskConfig, load_config
from nni_effbert.data.loading import load_task
from nni_effbert.errors import ConfigError
from nni_effbert.kd.losses import KDLoss
from nni_effbert.kd.teacher import prepare_teacher
from nni_effbert.kd.setup import build_space
from nni_effbert.kd.sources import LiveTeacher
from nni_effbert.kd.train import TrainSettings, TrialFailure, iterate_batches, kd_train
from nni_effbert.nas import trial_runner as trial_mod
from nni_effbert.nas.nnictl_search import nnictl_config, write_nnictl_config
from nni_effbert.runtime import Runtime, RuntimeConfigError, configure_threads, gpu_oom_reason, resolve_runtime
from nni_effbert import runtime as runtime_mod

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "effbert.yml"
NO_CUDA = not torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(tmp_path, base_teacher, glue_dir, *extra):
    return [f"workdir={tmp_path / 'work'}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}", *extra]


def _cfg(tmp_path, base_teacher, glue_dir, *extra):
    return load_config(TINY, _sets(tmp_path, base_teacher, glue_dir, *extra))


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: auto resolves to it")
def test_auto_resolves_to_cpu_fp32_without_cuda(tmp_path, base_teacher, glue_dir):
    cfg = _cfg(tmp_path, base_teacher, glue_dir)
    assert (cfg.runtime.device, cfg.runtime.precision) == ("auto", "auto")
    rt = resolve_runtime(cfg)
    assert rt.device == torch.device("cpu") and rt.precision == "fp32"
    assert rt.sync_interval == 1 and not rt.pin_memory and not rt.grad_scaler().is_enabled()


def test_auto_respects_what_torch_sees(tmp_path, base_teacher, glue_dir, monkeypatch):
    # Inside NNI, CUDA_VISIBLE_DEVICES (-1 or empty with gpus_per_trial 0) decides what torch sees.
    cfg = _cfg(tmp_path, base_teacher, glue_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runtime(cfg).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    rt = resolve_runtime(cfg)
    assert rt.device == torch.device("cuda", 0) and rt.precision == "bf16"
    assert rt.sync_interval == runtime_mod.SYNC_INTERVAL and rt.pin_memory
    cfg.runtime.device, cfg.runtime.precision = "cuda:1", "fp16"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rt = resolve_runtime(cfg)
    assert rt.device == torch.device("cuda", 1) and rt.grad_scaler().is_enabled() is (rt.precision == "fp16")


def test_config_without_runtime_section_is_cpu():
    assert resolve_runtime(object()).device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Validation of every new key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, key", [
    ("runtime.device=gpu", "runtime.device"),
    ("runtime.device=cuda:x", "runtime.device"),
    ("runtime.device=cuda:-1", "runtime.device"),
    ("runtime.precision=fp8", "runtime.precision"),
    ("runtime.threads=0", "runtime.threads"),
    ("runtime.threads=two", "runtime.threads"),
    ("runtime.dataloader_workers=-1", "runtime.dataloader_workers"),
    ("runtime.compile=maybe", "runtime.compile"),
    ("runtime.gpu_memory_mb=0", "runtime.gpu_memory_mb"),
    ("runtime.gpus=1", "runtime.gpus"),
    ("search.gpus_per_trial=-1", "search"),
    ("search.gpus_per_trial=0.5", "search.gpus_per_trial"),
    ("search.gpu_indices=[]", "search"),
    ("search.gpu_indices=[0, 0]", "search"),
    ("search.gpu_indices=[-1]", "search"),
    ("search.use_active_gpu=sometimes", "search.use_active_gpu"),
    ("search.max_trials_per_gpu=0", "search"),
])
def test_bad_runtime_and_gpu_keys_are_config_errors(tmp_path, base_teacher, glue_dir, setting, key):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, base_teacher, glue_dir, setting)
    assert f":{key}" in str(err.value) or f"--set {setting}" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_gpu_key_combinations_are_checked(tmp_path, base_teacher, glue_dir):
    with pytest.raises(ConfigError, match="max_trials_per_gpu .* needs gpus_per_trial > 0"):
        _cfg(tmp_path, base_teacher, glue_dir, "search.max_trials_per_gpu=2")
    with pytest.raises(ConfigError, match=r"gpus_per_trial \(3\) exceeds the 2 GPU"):
        _cfg(tmp_path, base_teacher, glue_dir, "search.gpus_per_trial=3", "search.gpu_indices=[0, 1]")


def test_valid_runtime_and_gpu_keys_load_and_round_trip(tmp_path, base_teacher, glue_dir):
    cfg = _cfg(tmp_path, base_teacher, glue_dir, "runtime.device=cuda:1", "runtime.precision=fp16",
               "runtime.threads=3", "runtime.dataloader_workers=2", "runtime.compile=true",
               "runtime.gpu_memory_mb=4096", "search.gpus_per_trial=1", "search.gpu_indices=[0, 2]",
               "search.use_active_gpu=true", "search.max_trials_per_gpu=2")
    rc, s = cfg.runtime, cfg.search
    assert (rc.device, rc.precision, rc.threads, rc.dataloader_workers, rc.compile, rc.gpu_memory_mb) == \
        ("cuda:1", "fp16", 3, 2, True, 4096)
    assert (s.gpus_per_trial, s.gpu_indices, s.use_active_gpu, s.max_trials_per_gpu) == (1, [0, 2], True, 2)
    saved = tmp_path / "saved.yml"
    cfg.save(saved)
    again = load_config(saved)
    assert again.runtime == cfg.runtime and again.search.gpu_indices == [0, 2]


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, base_teacher, glue_dir):
    cfg = _cfg(tmp_path, base_teacher, glue_dir, "runtime.device=cuda")
    with pytest.raises(RuntimeConfigError, match="runtime.device: cuda requested but torch sees no CUDA device"):
        resolve_runtime(cfg)


def test_out_of_range_cuda_index_is_an_error(tmp_path, base_teacher, glue_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = _cfg(tmp_path, base_teacher, glue_dir, "runtime.device=cuda:2")
    with pytest.raises(RuntimeConfigError, match=r"cuda:2 is out of range: 2 CUDA device\(s\) visible \(cuda:0..cuda:1"):
        resolve_runtime(cfg)


def test_fp16_on_cpu_and_unsupported_bf16_are_errors(tmp_path, base_teacher, glue_dir, monkeypatch):
    cfg = _cfg(tmp_path, base_teacher, glue_dir, "runtime.device=cpu", "runtime.precision=fp16")
    with pytest.raises(RuntimeConfigError, match="fp16 needs a CUDA device; on CPU use fp32 or bf16"):
        resolve_runtime(cfg)
    cfg.runtime.precision = "bf16"
    monkeypatch.setattr(runtime_mod, "_cpu_autocast_works", lambda dtype: False)
    with pytest.raises(RuntimeConfigError, match="bf16 autocast is not available on CPU"):
        resolve_runtime(cfg)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("settings, message", [
    (["runtime.device=cuda"], "cuda requested but torch sees no CUDA device"),
    (["runtime.device=cuda:3"], "cuda:3 requested but torch sees no CUDA device"),
    (["runtime.device=cpu", "runtime.precision=fp16"], "fp16 needs a CUDA device"),
])
def test_cli_and_trial_exit_2_with_one_line(tmp_path, base_teacher, glue_dir, capsys, settings, message):
    sets = [f"--set={s}" for s in _sets(tmp_path, base_teacher, glue_dir, *settings)]
    assert cli.main(["teacher", "-q", "-c", str(TINY), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nni-effbert teacher: error: runtime.") and message in err and "\n" not in err
    arch = tmp_path / "arch.json"
    arch.write_text("{}")
    assert trial_mod.main(["-q", "-c", str(TINY), *sets, "--arch", str(arch)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nni-effbert trial: error: runtime.") and message in err and "\n" not in err
    assert not (tmp_path / "work" / "teacher").exists()  # nothing ran


def test_cuda_oom_in_a_trial_is_failed_with_the_gpu_reason(tmp_path, base_teacher, glue_dir, capsys, monkeypatch):
    fake = Runtime(torch.device("cuda", 1), precision="bf16", gpu_memory_mb=512)
    monkeypatch.setattr(trial_mod, "resolve_runtime", lambda cfg: fake)
    monkeypatch.setattr(trial_mod, "apply_gpu_memory_limit", lambda rt: rt.gpu_memory_mb)
    monkeypatch.setattr(fake.__class__, "describe", lambda self: "cuda:1 (fake)")

    def oom(*args, **kwargs):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 1 has a total "
                                         "capacity of 79.10 GiB of which 3.00 MiB is free.")
        except torch.OutOfMemoryError as exc:  # as kd_train wraps a failing forward
            raise TrialFailure("forward or loss failed at step 3: CUDA out of memory.") from exc

    monkeypatch.setattr(trial_mod, "run_parameters", oom)
    arch = tmp_path / "arch.json"
    arch.write_text("{}")
    sets = [f"--set={s}" for s in _sets(tmp_path, base_teacher, glue_dir, "evaluator.memory_limit_mb=100000")]
    assert trial_mod.main(["-q", "-c", str(TINY), *sets, "--arch", str(arch)]) == trial_mod.EXIT_FAILED
    err = capsys.readouterr().err
    assert "trial failed: out of GPU memory (512 MiB on cuda:1): CUDA out of memory. Tried to allocate" in err


def test_gpu_oom_reason_only_for_gpu_oom():
    rt = Runtime(torch.device("cuda", 0), gpu_memory_mb=2048)
    assert gpu_oom_reason(torch.OutOfMemoryError("CUDA out of memory."), rt) == \
        "out of GPU memory (2048 MiB on cuda:0): CUDA out of memory."
    assert gpu_oom_reason(RuntimeError("DefaultCPUAllocator: can't allocate memory"), rt) is None
    assert gpu_oom_reason(TrialFailure("loss became NaN at step 2"), rt) is None


# ---------------------------------------------------------------------------------------------
# NNI GPU scheduling
# ---------------------------------------------------------------------------------------------


def test_generated_nnictl_yaml_carries_the_gpu_keys(tmp_path, base_teacher, glue_dir):
    cfg = _cfg(tmp_path, base_teacher, glue_dir, "search.gpus_per_trial=2", "search.gpu_indices=[1, 3]",
               "search.use_active_gpu=true", "search.max_trials_per_gpu=2")
    path = write_nnictl_config(cfg, tmp_path / "config.yml")
    conf = yaml.safe_load(path.read_text())
    assert conf["trialGpuNumber"] == 2
    assert conf["trainingService"] == {"platform": "local", "useActiveGpu": True, "maxTrialNumberPerGpu": 2,
                                       "gpuIndices": [1, 3]}
    # Defaults: 0 GPUs per trial is written, so NNI hides the GPUs (CUDA_VISIBLE_DEVICES=-1) from trials.
    plain = nnictl_config(_cfg(tmp_path, base_teacher, glue_dir), tmp_path / "config.yml")
    assert plain["trialGpuNumber"] == 0
    assert plain["trainingService"] == {"platform": "local", "useActiveGpu": False, "maxTrialNumberPerGpu": 1}


def test_nnictl_yaml_is_valid_for_nni(tmp_path, base_teacher, glue_dir):
    from nni.experiment.config import ExperimentConfig as NniConfig

    cfg = _cfg(tmp_path, base_teacher, glue_dir, "search.gpus_per_trial=1", "search.gpu_indices=[0]",
               "search.max_trials_per_gpu=3")
    conf = nnictl_config(cfg, tmp_path / "config.yml")
    Path(conf["trialCodeDirectory"]).mkdir(parents=True, exist_ok=True)
    conf["searchSpace"] = {}
    nni_conf = NniConfig(**conf)
    canon = nni_conf.canonical_copy()  # runs NNI's own validation
    assert canon.trial_gpu_number == 1
    ts = canon.training_service
    assert ts.gpu_indices == [0] and ts.max_trial_number_per_gpu == 3 and ts.use_active_gpu is False


def test_nas_experiment_config_gets_the_gpu_keys(tmp_path, base_teacher, glue_dir, monkeypatch):
    from nni.nas.experiment import NasExperimentConfig

    from nni_effbert.nas import python_search

    cfg = _cfg(tmp_path, base_teacher, glue_dir, "search.gpus_per_trial=1", "search.gpu_indices=[2]",
               "search.max_trials_per_gpu=2")
    conf = NasExperimentConfig("ts", "simplified", "local")
    python_search._schedule_gpus(conf, cfg)
    assert conf.trial_gpu_number == 1
    ts = conf.training_service
    assert ts.gpu_indices == [2] and ts.max_trial_number_per_gpu == 2
    assert ts.use_active_gpu is (not NO_CUDA)  # warm-ups on a GPU in this process: NNI must still use it
    # With the warm-ups on a GPU, NNI would see it active and never schedule a candidate there.
    monkeypatch.setattr(python_search, "resolve_runtime", lambda c: Runtime(torch.device("cuda", 0)))
    conf = NasExperimentConfig("ts", "simplified", "local")
    python_search._schedule_gpus(conf, cfg)
    assert conf.training_service.use_active_gpu is True


# ---------------------------------------------------------------------------------------------
# Threads, loader workers, padding
# ---------------------------------------------------------------------------------------------


def test_threads_follow_runtime_threads(tmp_path, base_teacher, glue_dir, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cfg = _cfg(tmp_path, base_teacher, glue_dir, "runtime.threads=3")
        assert configure_threads(cfg) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads(cfg, concurrent=False) == 3  # the config wins over the environment
        cfg = _cfg(tmp_path, base_teacher, glue_dir, "search.trial_concurrency=2")
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime_mod.os, "cpu_count", lambda: 8)
        assert configure_threads(cfg) == 4  # a concurrent trial's share of the cores
        assert configure_threads(cfg, concurrent=False) is None  # a command keeps torch's default
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tiny_vocab_file):
    return BertTokenizerFast.from_pretrained(str(tiny_vocab_file.parent), do_lower_case=True)


@pytest.fixture(scope="module")
def task(glue_dir, tokenizer, tmp_path_factory):
    cfg = TaskConfig(name="sst2", data_dir=str(glue_dir), max_seq_length=48, max_train_rows=40, max_dev_rows=16,
                     seed=0)
    return load_task(cfg, tokenizer, cache_dir=str(tmp_path_factory.mktemp("ds")))


@pytest.fixture(scope="module")
def long_task(glue_dir, tokenizer, tmp_path_factory):
    cfg = TaskConfig(name="sst2", data_dir=str(glue_dir), max_seq_length=256, max_train_rows=40, max_dev_rows=8,
                     seed=0)
    return load_task(cfg, tokenizer, cache_dir=str(tmp_path_factory.mktemp("ds_long")))


def test_batches_are_padded_to_their_longest_row_and_workers_give_the_same(long_task, tokenizer):
    task = long_task
    plain = iterate_batches(task.train, 8, seed=1, pad_token_id=tokenizer.pad_token_id)
    pooled = iterate_batches(task.train, 8, seed=1, pad_token_id=tokenizer.pad_token_id, workers=2)
    widths = []
    for _ in range(6):  # more than one epoch (40 rows, batches of 8)
        a, b = next(plain), next(pooled)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        longest = int(a["attention_mask"].sum(1).max())
        assert a["input_ids"].shape[1] == longest  # padded to the batch's longest, not max_seq_length
        widths.append(longest)
    pooled.close()
    assert len(set(widths)) > 1 and max(widths) < 256


# ---------------------------------------------------------------------------------------------
# The KD step under a runtime
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_parts(tokenizer, task):
    torch.manual_seed(0)
    teacher = prepare_teacher(BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(tokenizer), max_position_embeddings=64, num_labels=2, attn_implementation="eager")))
    cfg = type("Cfg", (), {})()
    cfg.student = type("S", (), {"preset": "tiny", "overrides": {}})()
    cfg.task = type("T", (), {"max_seq_length": 48})()
    cfg.warmup = type("W", (), {"max_seq_length": None})()
    space = build_space(cfg, teacher.config, task.spec)
    loss_fn = KDLoss(KDConfig(), space.config.num_hidden_layers, 2)
    source = LiveTeacher(teacher, loss_fn.teacher_hidden_layers, loss_fn.teacher_attention_layers)
    return space, loss_fn, source


def _bf16_cpu_available() -> bool:
    return runtime_mod._cpu_autocast_works(torch.bfloat16)


@pytest.mark.skipif(not _bf16_cpu_available(), reason="this torch build has no bf16 autocast on CPU")
def test_bf16_autocast_on_cpu_runs_a_kd_step(kd_parts, task, tokenizer):
    space, loss_fn, source = kd_parts
    student = space.subnet(space.bert_arch())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    seen = []
    linears = [m for m in student.modules() if isinstance(m, torch.nn.Linear)]
    handle = linears[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    rt = Runtime(torch.device("cpu"), precision="bf16")
    out = kd_train(student, source, task.train, loss_fn, TrainSettings(steps=2, learning_rate=1e-3, batch_size=8),
                   pad_token_id=tokenizer.pad_token_id, runtime=rt)
    handle.remove()
    assert torch.bfloat16 in seen  # the forward really ran under bf16 autocast
    assert out.steps == 2 and out.loss is not None and math.isfinite(out.loss)
    after = student.state_dict()
    assert all(after[k].dtype == before[k].dtype for k in before)  # weights stay fp32
    assert any(not torch.equal(after[k], before[k]) for k in before)  # and were trained


class _EveryFive(Runtime):
    """A CPU runtime that synchronises like an accelerator, every 5 steps."""

    sync_interval = 5


def test_deferred_checks_still_name_the_failing_step(kd_parts, task, tokenizer, monkeypatch):
    space, loss_fn, source = kd_parts
    student = space.subnet(space.bert_arch())
    calls = {"n": 0}
    real = loss_fn.forward

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 3:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(loss_fn, "forward", poisoned)
    rt = _EveryFive(torch.device("cpu"))
    with pytest.raises(TrialFailure, match="loss became NaN at step 3"):
        kd_train(student, source, task.train, loss_fn, TrainSettings(steps=8, learning_rate=1e-3, batch_size=8),
                 pad_token_id=tokenizer.pad_token_id, runtime=rt)
    assert calls["n"] == 5  # found at the sync after step 5, not at step 3 (no per-step host sync)


def test_deferred_sync_trains_like_per_step_sync(kd_parts, task, tokenizer):
    space, loss_fn, source = kd_parts
    results = []
    for rt in (Runtime(torch.device("cpu")), _EveryFive(torch.device("cpu"))):
        student = space.subnet(space.bert_arch())
        out = kd_train(student, source, task.train, loss_fn, TrainSettings(steps=7, learning_rate=1e-3, batch_size=8),
                       pad_token_id=tokenizer.pad_token_id, runtime=rt)
        results.append((out.loss, out.last_terms, {k: v.clone() for k, v in student.state_dict().items()}))
    (la, ta, wa), (lb, tb, wb) = results
    assert la == pytest.approx(lb) and ta == pytest.approx(tb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_runtime_note_in_config_reference():
    """The runtime and GPU-scheduling keys appear, documented, in the generated config reference."""
    import sys

    sys.path.insert(0, str(REPO / "docs" / "_ext"))
    try:
        from config_reference import render
    finally:
        sys.path.pop(0)
    from nni_effbert.config import ExperimentConfig

    rows = {line.split("|")[1].strip(" `"): line.split("|")[4].strip()
            for line in render(ExperimentConfig).splitlines() if line.startswith("| `")}
    for key in ("runtime.device", "runtime.precision", "runtime.threads", "runtime.dataloader_workers",
                "runtime.compile", "runtime.gpu_memory_mb", "search.gpus_per_trial", "search.gpu_indices",
                "search.use_active_gpu", "search.max_trials_per_gpu"):
        assert rows.get(key), f"{key} missing or undocumented in the generated config reference"
