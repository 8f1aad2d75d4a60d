"""Several tasks in one experiment (issue 27): the ``tasks:`` config, ``--task``, every task's
teacher, and the multi-task setup whose tasks share one student encoder."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from nni_effbert import cli
from nni_effbert.config import ConfigError, load_config, single_task, task_config
from nni_effbert.kd.multitask import ENCODER_MODULES, MultiTaskSetup

REPO = Path(__file__).resolve().parents[1]


def write_multitask(tmp_path, glue_dir, teacher, **extra):
    """A tiny two-task config (SST-2 weight 2, RTE weight 1) built on examples/tiny."""
    data = yaml.safe_load((REPO / "examples" / "tiny" / "effbert.yml").read_text())
    task = data.pop("task")
    data.update(workdir=str(tmp_path / "work"), teacher={**data["teacher"], "model": str(teacher)})
    data["tasks"] = [
        {"name": "sst2", "weight": 2.0, "task": {**task, "data_dir": str(glue_dir)}},
        {"name": "rte", "task": {**task, "name": "rte", "data_dir": str(glue_dir)}},
    ]
    data.update(extra)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, glue_dir, base_teacher):
    """Both tasks' teachers fine-tuned once for the module (``<workdir>/tasks``)."""
    root = tmp_path_factory.mktemp("multitask_teachers")
    assert cli.main(["teacher", "-q", "-c", str(write_multitask(root, glue_dir, base_teacher))]) == 0
    return root / "work" / "tasks"


def with_teachers(tmp_path, glue_dir, base_teacher, tuned):
    """A fresh multi-task work directory holding the module's fine-tuned teachers; its config."""
    import shutil

    path = write_multitask(tmp_path, glue_dir, base_teacher)
    shutil.copytree(tuned, tmp_path / "work" / "tasks")
    return path


def test_a_tasks_list_gives_each_task_a_single_task_config(tmp_path, glue_dir, base_teacher):
    cfg = load_config(write_multitask(tmp_path, glue_dir, base_teacher))
    assert cfg.task_keys == ["sst2", "rte"] and [t.weight for t in cfg.tasks] == [2.0, 1.0]
    rte = task_config(cfg, "rte")
    assert rte.tasks is None and rte.task.name == "rte" and rte.task.seed == cfg.seed
    assert Path(rte.workdir) == tmp_path / "work" / "tasks" / "rte"
    assert rte.teacher.model == str(base_teacher) and rte.search == cfg.search
    assert task_config(rte, None) is rte  # a single-task config stays as it is
    cfg.save(tmp_path / "saved.yml")  # what a search snapshots and its tuner reads back
    assert load_config(tmp_path / "saved.yml") == cfg
    with pytest.raises(ConfigError, match="several.*--task NAME"):
        task_config(cfg, None)
    with pytest.raises(ConfigError, match="--task qnli: not a task of this config; its tasks are sst2, rte"):
        task_config(cfg, "qnli")
    with pytest.raises(ConfigError, match="several"):
        single_task(cfg, "a KD setup")


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "a", "task": {"name": "sst2"}}, {"name": "a", "task": {"name": "rte"}}],
     r"tasks.1.name: tasks 0 and 1 are both named 'a'"),
    ([{"task": {"name": "custom", "train_file": "t.tsv", "dev_file": "d.tsv", "text_columns": ["s"],
                "label_column": "y"}}], r"tasks.0.name: a custom task needs a name"),
    ([{"name": "Bad Name", "task": {"name": "sst2"}}], r"tasks.0.name: 'Bad Name' is not a task key"),
    ([{"name": "a", "weight": 0, "task": {"name": "sst2"}}], r"tasks.0.weight"),
    ([], r"tasks: name at least one task"),
])
def test_bad_task_lists_get_one_line_errors(tmp_path, tasks, message):
    path = tmp_path / "e.yml"
    path.write_text(yaml.safe_dump({"workdir": "w", "teacher": {"model": "bert-base-uncased"}, "tasks": tasks}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, check_paths=False)
    assert "\n" not in str(err.value)


def test_task_and_tasks_together_are_refused(tmp_path):
    path = tmp_path / "e.yml"
    path.write_text(yaml.safe_dump({"workdir": "w", "task": {"name": "sst2"},
                                    "tasks": [{"name": "rte", "task": {"name": "rte"}}]}))
    with pytest.raises(ConfigError, match="either task .* or tasks"):
        load_config(path, check_paths=False)


def test_teacher_fine_tunes_every_task_and_the_tasks_share_one_encoder(tmp_path, glue_dir, base_teacher, capsys):
    path = write_multitask(tmp_path, glue_dir, base_teacher)
    assert cli.main(["teacher", "-q", "-c", str(path), "--task", "rte"]) == 0
    assert "[" not in capsys.readouterr().out  # one task: printed as a single-task run
    assert (tmp_path / "work" / "tasks" / "rte" / "teacher").is_dir()
    assert not (tmp_path / "work" / "tasks" / "sst2").exists()
    assert cli.main(["teacher", "-q", "-c", str(path)]) == 0  # every task; rte's is reused
    out = capsys.readouterr().out
    assert "[sst2] teacher (fine-tuned)" in out and "[rte] teacher (reused)" in out
    # Any other command needs --task with a multi-task config, in one line.
    assert cli.main(["fidelity", "-q", "-c", str(path), "--experiment", "abcdefgh"]) == 2
    err = capsys.readouterr().err
    assert "names several tasks (sst2, rte); choose one with --task NAME" in err and err.count("\n") == 1

    multi = MultiTaskSetup.from_config(load_config(path), progress=False)
    assert multi.names == ["sst2", "rte"] and multi.weights == pytest.approx({"sst2": 2 / 3, "rte": 1 / 3})
    sst2, rte = (multi.task(n).setup.space.supernet for n in ("sst2", "rte"))
    for name in ENCODER_MODULES:
        assert getattr(sst2, name) is getattr(rte, name)
    assert sst2.classifier is not rte.classifier
    # A step on one task moves the shared encoder for both, and only that task's head.
    before = {k: v.clone() for k, v in rte.state_dict().items()}
    with torch.no_grad():
        sst2.layers[0].attention.query.weight.add_(1.0)
        sst2.classifier.weight.add_(1.0)
    after = rte.state_dict()
    assert not torch.equal(after["layers.0.attention.query.weight"], before["layers.0.attention.query.weight"])
    assert torch.equal(after["classifier.weight"], before["classifier.weight"])
    heads = sum(p.numel() for m in (sst2.pooler, sst2.classifier, rte.pooler, rte.classifier) for p in m.parameters())
    assert sum(p.numel() for p in multi.parameters()) == sum(p.numel() for p in sst2.parameters()) + heads // 2
    # Checkpoint: the encoder once, a head per task; it loads back into a fresh setup.
    state = {k: {n: t.clone() for n, t in v.items()} if k == "encoder" else
             {task: {n: t.clone() for n, t in h.items()} for task, h in v.items()} for k, v in multi.state_dict().items()}
    assert set(state["heads"]) == {"sst2", "rte"}
    assert all(n.split(".")[0] in ENCODER_MODULES for n in state["encoder"])
    assert all(n.split(".")[0] not in ENCODER_MODULES for h in state["heads"].values() for n in h)
    fresh = MultiTaskSetup.from_config(load_config(path), progress=False)
    fresh.load_state_dict(state)
    for n in ("sst2", "rte"):
        for k, v in multi.task(n).setup.space.supernet.state_dict().items():
            assert torch.equal(fresh.task(n).setup.space.supernet.state_dict()[k], v), (n, k)
    with pytest.raises(ConfigError, match="no head for task.*rte"):
        fresh.load_state_dict({"encoder": state["encoder"], "heads": {"sst2": state["heads"]["sst2"]}})


def test_tasks_whose_teachers_differ_in_hidden_size_cannot_share_an_encoder(tmp_path, glue_dir, base_teacher,
                                                                             tiny_vocab_file):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tiny_vocab_file.parent), do_lower_case=True)
    wider = tmp_path / "wider_teacher"
    BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=37, vocab_size=len(tok), max_position_embeddings=64,
                                             num_labels=2)).save_pretrained(wider)
    tok.save_pretrained(wider)
    path = write_multitask(tmp_path, glue_dir, base_teacher)
    data = yaml.safe_load(path.read_text())
    data["tasks"][1]["teacher"] = {"model": str(wider), "finetune": dict(data["teacher"]["finetune"])}
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["teacher", "-q", "-c", str(path)]) == 0
    with pytest.raises(ConfigError, match="tasks sst2 and rte need different student encoders \\(fit_size: 32 vs 48"):
        MultiTaskSetup.from_config(load_config(path), progress=False)


def _streams(multi, names=("sst2", "rte")):
    from nni_effbert.kd.train import TaskStream

    out = []
    for name in names:
        t = multi.task(name)
        out.append(TaskStream(name, t.setup.space, t.setup.cached_teacher(), t.setup.task.train, t.setup.loss_fn,
                              t.weight))
    return out


def test_multitask_kd_draws_tasks_by_weight_and_resumes_exactly(tmp_path, glue_dir, base_teacher, tuned):
    """kd_train_tasks: each step trains the task task_of_step draws (weights 2:1), through that
    task's supernet and loss; an interrupted run resumed from its state ends with the same weights."""
    from torch import nn

    from nni_effbert.kd.train import TrainSettings, kd_train_tasks, task_of_step

    path = with_teachers(tmp_path, glue_dir, base_teacher, tuned)
    cfg = load_config(path)

    def fresh():
        multi = MultiTaskSetup.from_config(cfg, progress=False)
        return multi, nn.ModuleList([t.setup.space for t in multi.tasks])

    arch_of = lambda step, space=fresh()[0].tasks[0].setup.space: space.bert_arch()  # noqa: E731
    settings = dict(learning_rate=1e-3, batch_size=8, seed=3, progress=False)
    drawn = [task_of_step([2.0, 1.0], 3, k) for k in range(40)]
    assert drawn == [task_of_step([2.0, 1.0], 3, k) for k in range(40)]  # from (seed, step) alone
    assert 15 <= drawn.count(0) <= 36 and drawn.count(1) >= 4

    multi, container = fresh()
    rte_head = multi.task("rte").setup.space.supernet.classifier.weight.detach().clone()
    out = kd_train_tasks(container, _streams(multi), TrainSettings(steps=8, **settings), pad_token_id=0,
                         arch_sampler=arch_of)
    assert out.steps == 8 and sum(out.task_steps.values()) == 8
    assert out.task_steps == {"sst2": drawn[:8].count(0), "rte": drawn[:8].count(1)}
    assert math.isfinite(out.loss)
    moved = not torch.equal(multi.task("rte").setup.space.supernet.classifier.weight, rte_head)
    assert moved == (out.task_steps["rte"] > 0)
    straight = {k: v.clone() for k, v in container.state_dict().items()}

    multi2, container2 = fresh()
    saved = {}

    def on_checkpoint(state):
        saved["state"] = state
        saved["weights"] = {k: v.clone() for k, v in container2.state_dict().items()}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kd_train_tasks(container2, _streams(multi2), TrainSettings(steps=8, checkpoint_interval=5, **settings),
                       pad_token_id=0, arch_sampler=arch_of, on_checkpoint=on_checkpoint)
    multi3, container3 = fresh()
    container3.load_state_dict(saved["weights"])
    out = kd_train_tasks(container3, _streams(multi3), TrainSettings(steps=8, **settings), pad_token_id=0,
                         arch_sampler=arch_of, resume=saved["state"])
    assert out.steps == 8 and sum(out.task_steps.values()) == 3
    for name, value in container3.state_dict().items():
        assert torch.allclose(value, straight[name], atol=1e-6), name


def test_multitask_warmup_writes_one_encoder_and_a_head_per_task(tmp_path, glue_dir, base_teacher, tuned):
    from nni_effbert.io import load_torch
    from nni_effbert.nas.multitask_warmup import MULTITASK_KIND, run_multitask_warmup

    path = with_teachers(tmp_path, glue_dir, base_teacher, tuned)
    cfg = load_config(path)
    multi = MultiTaskSetup.from_config(cfg, progress=False)
    first = run_multitask_warmup(cfg, 0, steps=6, general_steps=2, progress=False, multi=multi)
    assert not first.skipped and sum(first.task_steps.values()) == 6 and math.isfinite(first.loss)
    data = load_torch(first.checkpoint, "checkpoint")
    assert data["kind"] == MULTITASK_KIND and data["tasks"] == ["sst2", "rte"]
    assert data["plan"]["tasks"] == [["sst2", 2.0], ["rte", 1.0]] and data["plan"]["general_steps"] == 2
    assert set(data["state"]["heads"]) == {"sst2", "rte"}
    assert first.checkpoint == tmp_path / "work" / "supernet" / "stage0.pt"
    # The same plan again: nothing trained, the checkpoint's weights loaded into a fresh setup.
    fresh = MultiTaskSetup.from_config(cfg, progress=False)
    again = run_multitask_warmup(cfg, 0, steps=6, general_steps=2, progress=False, multi=fresh)
    assert again.skipped
    for n in ("sst2", "rte"):
        want = multi.task(n).setup.space.supernet.state_dict()
        for k, v in fresh.task(n).setup.space.supernet.state_dict().items():
            assert torch.equal(v, want[k]), (n, k)
    # Stage 1 starts from stage 0's multi-task supernet.
    fixed = {k: v for k, v in fresh.tasks[0].setup.space.bert_arch().items() if k.endswith(("_width", "_stack"))}
    second = run_multitask_warmup(cfg, 1, fixed=fixed, steps=3, general_steps=0, progress=False, multi=fresh)
    assert second.init == "stage 0 checkpoint" and sum(second.task_steps.values()) == 3
    # A single-task checkpoint where a multi-task one is expected: one line, no silent start.
    torch.save({"kind": "something else"}, tmp_path / "work" / "supernet" / "stage2.pt")
    with pytest.raises(Exception, match="not a multi-task supernet checkpoint"):
        run_multitask_warmup(cfg, 2, steps=1, general_steps=0, progress=False, multi=fresh)


def test_an_interrupted_multitask_warmup_resumes_as_if_never_stopped(tmp_path, glue_dir, base_teacher, tuned,
                                                                    monkeypatch):
    from nni_effbert.io import load_torch
    from nni_effbert.nas import multitask_warmup as mw
    from nni_effbert.workdir import WorkDir

    cfg = load_config(with_teachers(tmp_path, glue_dir, base_teacher, tuned))
    state_path = WorkDir.of(cfg).warmup_state(0)
    real_save, calls = mw.atomic_save_torch, []

    def dying_save(obj, path):
        real_save(obj, path)
        calls.append(Path(path).name)
        if calls.count(state_path.name) == 2:
            raise KeyboardInterrupt  # killed right after the second resumable state hit the disk

    monkeypatch.setattr(mw, "atomic_save_torch", dying_save)
    kw = dict(steps=6, general_steps=2, checkpoint_interval=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        mw.run_multitask_warmup(cfg, 0, multi=MultiTaskSetup.from_config(cfg, progress=False), **kw)
    # The general phase (2 steps) ended, then the task phase saved its step 2 and died.
    state = load_torch(state_path, "state")
    assert state["kind"] == mw.STATE_KIND and state["train"]["step"] == 2
    assert not WorkDir.of(cfg).supernet_checkpoint(0).exists()
    monkeypatch.setattr(mw, "atomic_save_torch", real_save)

    resumed = mw.run_multitask_warmup(cfg, 0, multi=MultiTaskSetup.from_config(cfg, progress=False), **kw)
    assert resumed.resumed_at == 4 and resumed.report()["resumed_at"] == 4 and not state_path.exists()
    resumed_data = load_torch(resumed.checkpoint, "checkpoint")
    straight = mw.run_multitask_warmup(cfg, 0, force=True, multi=MultiTaskSetup.from_config(cfg, progress=False),
                                       steps=6, general_steps=2, progress=False)
    assert straight.resumed_at is None and straight.plan == resumed.plan
    assert straight.task_steps == resumed.task_steps and sum(resumed.task_steps.values()) == 6
    straight_state = load_torch(straight.checkpoint, "checkpoint")["state"]
    flat = lambda d, pre="": {f"{pre}{k}": v for k, v in d.items() if torch.is_tensor(v)} | {  # noqa: E731
        x: y for k, v in d.items() if isinstance(v, dict) for x, y in flat(v, f"{pre}{k}.").items()}
    want, got = flat(straight_state), flat(resumed_data["state"])
    assert want.keys() == got.keys() and want
    for name, tensor in want.items():
        assert torch.allclose(tensor, got[name], atol=1e-5), name


def test_latency_of_a_multitask_config_builds_the_one_table_its_search_reads(tmp_path, glue_dir, base_teacher,
                                                                            tuned, capsys):
    from nni_effbert.latency.table import table_for_config

    path = with_teachers(tmp_path, glue_dir, base_teacher, tuned)
    assert cli.main(["latency", "-q", "-c", str(path), "--set=evaluator.latency_threads=1"]) == 0
    out = capsys.readouterr().out
    assert "teacher of sst2:" in out and "teacher of rte:" in out
    work = tmp_path / "work"
    assert len(list((work / "latency").glob("table-*.json"))) == 1
    assert not list((work / "tasks").glob("*/latency/table-*.json"))
    # The search's evaluators find it without building one (build=False raises when missing).
    cfg = load_config(path, ["evaluator.latency_threads=1"])
    assert table_for_config(cfg, build=False).complete


def test_combined_score_is_the_weighted_relative_gain_over_the_reference():
    from nni_effbert.nas.multitask_evaluator import combine

    assert combine({"a": -0.9, "b": -1.8}, {"a": -1.0, "b": -2.0}, {"a": 2.0, "b": 1.0}) == pytest.approx(0.1)
    assert combine({"a": 0.8, "b": 0.5}, {"a": 0.8, "b": 0.4}, {"a": 1.0, "b": 3.0}) == pytest.approx(0.75 * 0.25)
    with pytest.raises(ConfigError, match="task b: no reference"):
        combine({"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ConfigError, match="cannot normalise"):
        combine({"a": 1.0}, {"a": 0.0}, {"a": 1.0})


def test_multitask_evaluator_scores_every_task_against_the_reference(tmp_path, glue_dir, base_teacher, tuned):
    from nni_effbert.nas.multitask_evaluator import MultiTaskEvaluator, combine
    from nni_effbert.nas.multitask_warmup import run_multitask_warmup

    path = with_teachers(tmp_path, glue_dir, base_teacher, tuned)
    cfg = load_config(path)
    multi = MultiTaskSetup.from_config(cfg, progress=False)
    with pytest.raises(Exception, match="no multi-task supernet of stage 0"):
        MultiTaskEvaluator(cfg, 0, progress=False, multi=multi).evaluate(multi.tasks[0].setup.space.bert_arch())
    run_multitask_warmup(cfg, 0, steps=4, general_steps=0, progress=False, multi=multi)
    evaluator = MultiTaskEvaluator(cfg, 0, progress=False, multi=multi)
    space = multi.tasks[0].setup.space
    ref = evaluator.evaluate(space.bert_arch(), train_steps=2)
    assert ref["default"] == pytest.approx(0.0, abs=1e-9)  # the reference against itself
    stored = evaluator.checkpoint.with_suffix(".reference.json")
    assert stored.is_file()
    mtime = stored.stat().st_mtime_ns
    other = space.bert_arch(width=min(space.config.widths), stack=2)
    result = evaluator.evaluate(other, train_steps=2)
    assert stored.stat().st_mtime_ns == mtime  # the reference is computed once
    assert set(result["tasks"]) == {"sst2", "rte"} and result["weights"] == pytest.approx({"sst2": 2 / 3, "rte": 1 / 3})
    assert result["default"] == pytest.approx(combine({t: r["default"] for t, r in result["tasks"].items()},
                                                      result["reference"], {"sst2": 2.0, "rte": 1.0}))
    assert result["sst2_default"] == result["tasks"]["sst2"]["default"] and "rte_search_metric" in result
    assert result["params"] == space.count_params(other) and result["train_steps"] == 2
    again = evaluator.evaluate(other, train_steps=2, rescore_of=7)
    assert again["rescore_of"] == 7 and again["evaluator_seed"] == result["evaluator_seed"] + 1


def test_warmup_command_warms_one_supernet_for_every_task_or_one_task(tmp_path, glue_dir, base_teacher, tuned, capsys):
    path = with_teachers(tmp_path, glue_dir, base_teacher, tuned)
    common = ["-q", "-c", str(path), "--stage", "0", "--steps", "2", "--general-steps", "0"]
    assert cli.main(["warmup", *common]) == 0
    assert "stage 0 multi-task supernet (steps per task" in capsys.readouterr().out
    assert (tmp_path / "work" / "supernet" / "stage0.pt").is_file()
    assert cli.main(["warmup", *common, "--task", "rte"]) == 0  # the single-task warm-up of one task
    assert (tmp_path / "work" / "tasks" / "rte" / "supernet" / "stage0.pt").is_file()


STAGE = {"stages": [{"name": "coarse", "kind": "joint", "trials": 2, "warmup_steps": 2}], "trial_concurrency": 1,
         "seed": 0}


@pytest.mark.integration
@pytest.mark.parametrize("driver", ["nnictl", "python"])
def test_search_scores_candidates_on_every_task(tmp_path, glue_dir, base_teacher, tuned, driver, capsys):
    """``nni-effbert search`` (nnictl and ``--python``) with a ``tasks:`` config: a multi-task warm-up,
    then candidates whose ``default`` combines both tasks' objectives against the reference arch."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from nni_effbert.nas.launcher import free_port
    from nni_effbert.nas.multitask_evaluator import combine
    from nni_effbert.nas.records import is_scored, normalize_trial, read_nni_trials

    path = write_multitask(tmp_path, glue_dir, base_teacher, search=STAGE,
                           distill={"general_steps": 2, "task_steps": 2, "eval_interval": 0, "batch_size": 8})
    shutil.copytree(tuned, tmp_path / "work" / "tasks")
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    if driver == "python":
        proc = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", str(path), "--python",
                               "--port", str(free_port())], env={**env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        found = re.search(r"NAS experiment (\w+)", proc.stdout)
        ok, why = proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        capsys.readouterr()
        ok = cli.main(["search", "-q", "-c", str(path), "--wait", "--timeout", "600"]) == 0
        captured = capsys.readouterr()
        found = re.search(r"^experiment (\S+): (\S+)$", captured.out, re.M)
        why = captured.out[-3000:] + captured.err[-3000:]
    try:
        assert ok and found, why
        exp_id = found.group(1)
        if driver == "python":
            trials = [normalize_trial(t) for t in json.loads((work / "trials.json").read_text())["trials"]]
        else:
            trials = [normalize_trial(t) for t in read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")]
            assert "experimentName: effbert-sst2+rte-work" in (work / "nnictl" / "nnictl.yml").read_text()
        warm = [t for t in trials if t["warmup"]]
        cands = [t for t in trials if not t["warmup"] and not t.get("teacher")]
        assert len(warm) == 1 and (work / "supernet" / exp_id / "stage0.pt").is_file()  # one shared supernet
        assert len(cands) == 2 and all(is_scored(t) for t in cands), trials
        for t in cands:
            final = t["final"]
            per_task = {task: final[f"{task}_default"] for task in ("sst2", "rte")}
            assert final["default"] == pytest.approx(combine(per_task, final["reference"], {"sst2": 2.0, "rte": 1.0}))
            assert final["objective"] == "multitask:kd" and "rte_search_metric" in final
        for task in ("sst2", "rte"):  # each task's teacher outputs cached once, in its own work directory
            assert len(list((work / "tasks" / task / "cache").glob("train-*[!k]"))) == 1
        if driver == "nnictl":
            _export_and_distill_every_task(path, work, exp_id, cands, capsys)
    finally:
        if found:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", found.group(1)],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)
        shutil.rmtree(work / "nni-experiments", ignore_errors=True)


LOAD_WITHOUT_NNI = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nni", "nni_effbert"):
            raise ImportError(name + " is blocked")

sys.meta_path.insert(0, Block())
from transformers import pipeline

print(json.dumps({f: pipeline("text-classification", model=f, trust_remote_code=True, device="cpu")("fine")
                  for f in sys.argv[1:]}))
"""


def _export_and_distill_every_task(path, work, exp_id, cands, capsys):
    """The search's best arch exported for every task, distilled (general KD once), loaded without nni."""
    import json
    import subprocess
    import sys

    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.suite import MULTITASK_GENERAL_KEY

    assert cli.main(["export", "-q", "-c", str(path), "--experiment", exp_id]) == 0
    folders = {t: work / "tasks" / t / "exports" / "searched" for t in ("sst2", "rte")}
    exported = {t: load_exported(f) for t, f in folders.items()}
    best = max(cands, key=lambda t: t["metric"])  # 2 candidates: the tie margin picks the best or a cheaper one
    assert exported["sst2"].arch == exported["rte"].arch and exported["sst2"].arch in [c["arch"] for c in cands]
    assert exported["sst2"].meta["extra"]["tasks"] == ["sst2", "rte"] and best["metric"] is not None
    assert exported["rte"].config.num_labels == 2 and exported["rte"].meta["extra"]["task"] == "rte"
    # Without --task, the single-task choices refuse in one line.
    capsys.readouterr()
    assert cli.main(["export", "-q", "-c", str(path), "--experiment", exp_id, "--pareto"]) == 2
    assert "--min-speedup go with --task NAME" in capsys.readouterr().err
    assert cli.main(["distill", "-q", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[sst2]" in out and "[rte]" in out
    # ONNX (fp32 + int8) of every task's distilled student and of every task's teacher, without --task.
    assert cli.main(["export", "-q", "-c", str(path), "--int8"]) == 0
    assert cli.main(["export-teacher", "-q", "-c", str(path), "--int8"]) == 0
    out = capsys.readouterr().out
    for task, folder in folders.items():
        assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
        assert out.count(f"[{task}] check: ") == 2  # its student and its teacher
    general = load_exported(work / "exports" / "searched")  # the task-agnostic general student
    assert general.meta["extra"]["distill"]["plan"]["general_steps"] == 2
    assert general.meta["extra"]["distill"]["plan"]["task_steps"] == 0
    for task, folder in folders.items():
        meta = load_exported(folder).meta["extra"]
        assert meta[MULTITASK_GENERAL_KEY]["student"] == str(work / "exports" / "searched")
        assert meta["distill"]["plan"]["general_steps"] == 0 and meta["distill"]["plan"]["task_steps"] == 2
    # A second run finds everything done (no general KD again, no task KD again).
    mtime = (work / "exports" / "searched" / "export_meta.json").stat().st_mtime_ns
    assert cli.main(["distill", "-q", "-c", str(path)]) == 0
    assert (work / "exports" / "searched" / "export_meta.json").stat().st_mtime_ns == mtime
    # The suite report: the latency-matched baseline through the same steps, every task, the average.
    capsys.readouterr()
    assert cli.main(["report", "-q", "-c", str(path)]) == 0
    suite = json.loads((work / "reports" / "suite.json").read_text())
    assert set(suite["tasks"]) == {"sst2", "rte"}
    assert suite["paired_average"]["n_rows"] == sum(suite["tasks"][t]["paired"]["n_rows"] for t in ("sst2", "rte"))
    for label in ("teacher", "baseline", "searched"):
        expected = (2 * suite["tasks"]["sst2"][label] + suite["tasks"]["rte"][label]) / 3
        assert suite["average"][label] == pytest.approx(expected)
    baselines = {t: load_exported(work / "tasks" / t / "exports" / "baseline-latency") for t in ("sst2", "rte")}
    assert baselines["sst2"].arch == baselines["rte"].arch  # one baseline arch, through the same steps
    for b in baselines.values():
        assert b.meta["extra"][MULTITASK_GENERAL_KEY]["student"] == str(work / "exports" / "baseline-latency")
        assert b.meta["extra"]["distill"]["plan"]["task_steps"] == 2
    assert "| **weighted average** |" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_NNI, *map(str, folders.values())], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(loaded) == {str(f) for f in folders.values()}


def test_a_stage_can_warm_up_and_score_on_some_tasks(tmp_path, glue_dir, base_teacher, tuned):
    """The paper's protocol: early stages on one task, the last on every task (``stages[N].tasks``)."""
    import shutil

    from nni_effbert.nas.multitask_evaluator import MultiTaskEvaluator
    from nni_effbert.nas.multitask_warmup import run_multitask_warmup, stage_tasks

    stages = {"stages": [{"name": "one", "kind": "joint", "trials": 2, "warmup_steps": 2, "tasks": ["rte"]},
                         {"name": "all", "kind": "size", "trials": 2, "warmup_steps": 2}]}
    path = write_multitask(tmp_path, glue_dir, base_teacher, search=stages)
    shutil.copytree(tuned, tmp_path / "work" / "tasks")
    cfg = load_config(path)
    assert stage_tasks(cfg, 0) == ["rte"] and stage_tasks(cfg, 1) == ["sst2", "rte"]
    multi = MultiTaskSetup.from_config(cfg, progress=False)
    warm = run_multitask_warmup(cfg, 0, general_steps=0, progress=False, multi=multi)
    assert warm.task_steps == {"rte": 2} and warm.report()["tasks"] == ["rte"]
    result = MultiTaskEvaluator(cfg, 0, progress=False, multi=multi).evaluate(
        multi.tasks[0].setup.space.bert_arch(width=min(multi.tasks[0].setup.space.config.widths)), train_steps=1)
    assert set(result["tasks"]) == {"rte"} and result["weights"] == {"rte": 1.0}
    assert "latency_ms" in result and "sst2_default" not in result
    (tmp_path / "bad").mkdir()
    bad = write_multitask(tmp_path / "bad", glue_dir, base_teacher,
                          search={"stages": [{"name": "x", "kind": "joint", "trials": 2, "tasks": ["qnli"]}]})
    with pytest.raises(ConfigError, match=r"search.stages.0.tasks: qnli not a task of this config; its tasks are "
                                          r"sst2, rte"):
        load_config(bad, check_paths=False)


def test_a_span_qa_task_shares_the_encoder_with_a_classification_task(tmp_path, glue_dir, qa_tokenizer, squad_small):
    """SST-2 + SQuAD in one experiment: each task's teacher (a classifier, a QA model from the same base),
    one warm-up over both heads, and candidates scored on both."""
    from transformers import BertConfig, BertForSequenceClassification

    from nni_effbert.nas.multitask_evaluator import MultiTaskEvaluator
    from nni_effbert.nas.multitask_warmup import run_multitask_warmup

    torch.manual_seed(0)  # one base for both tasks, with room for question + context windows
    base = tmp_path / "base"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=37, vocab_size=len(qa_tokenizer),
                                             max_position_embeddings=128)).save_pretrained(base)
    qa_tokenizer.save_pretrained(base)
    train, dev = squad_small
    qa = {"name": "squad", "train_file": str(train), "dev_file": str(dev), "max_seq_length": 96, "doc_stride": 24,
          "search_rows": 12, "max_train_rows": 48, "max_dev_rows": 12}
    path = write_multitask(tmp_path, glue_dir, base)
    data = yaml.safe_load(path.read_text())
    data["tasks"][1] = {"name": "squad", "task": qa}
    data["distill"] = {"general_steps": 2, "task_steps": 3, "batch_size": 8, "eval_interval": 0}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert cli.main(["teacher", "-q", "-c", str(path)]) == 0
    cfg = load_config(path)
    multi = MultiTaskSetup.from_config(cfg, progress=False)
    heads = {t.name: t.setup.space.config.head for t in multi.tasks}
    assert heads == {"sst2": "sequence", "squad": "span"}
    warm = run_multitask_warmup(cfg, 0, steps=6, general_steps=0, progress=False, multi=multi, experiment="mix")
    assert set(warm.task_steps) == {"sst2", "squad"} and math.isfinite(warm.loss)
    evaluator = MultiTaskEvaluator(cfg, 0, progress=False, multi=multi, experiment="mix")
    space = multi.tasks[0].setup.space
    arch = space.bert_arch(width=min(space.config.widths), stack=2)
    result = evaluator.evaluate(arch, train_steps=2)
    assert set(result["tasks"]) == {"sst2", "squad"} and math.isfinite(result["default"])
    assert 0.0 <= result["squad_search_metric"] <= 1.0

    # One student for both: export, general KD once, task KD each; the baseline the same way; the suite's
    # paired average covers the QA task through its per-question F1.
    from nni_effbert.product.suite import distill_multitask, ensure_multitask_baseline, export_multitask, suite_report

    export_multitask(cfg, "mix", arch=arch, stage=0, progress=False)
    distill_multitask(cfg, progress=False)
    ensure_multitask_baseline(cfg, progress=False)
    suite = suite_report(cfg, progress=False)
    assert suite["tasks"]["squad"]["metric"] == "f1" and "paired" in suite["tasks"]["squad"]
    assert suite["paired_average"] is not None and suite["paired_average"]["n_rows"] > 0
