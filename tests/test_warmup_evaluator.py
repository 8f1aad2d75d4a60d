"""Warm-up of the supernet and KDEvaluator on the tiny preset, RTE pairs, a tiny fine-tuned teacher."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nni_effbert.nas import warmup as warmup_mod
from nni_effbert.config import load_config
from nni_effbert.errors import CheckpointError, ConfigError
from nni_effbert.nas.kd_evaluator import ArchError, KDEvaluator
from nni_effbert.nas.nni_evaluator import StageAwareEvaluator
from nni_effbert.io import load_torch
from nni_effbert.search_spaces import EfficientBertModel
from nni_effbert.kd.setup import KDSetup
from nni_effbert.nas.warmup import _ArchSampler, run_warmup
from nni_effbert.workdir import WorkDir
from conftest import finetune_teacher_into

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(work, base_teacher, glue_dir, *extra):
    return load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}", "task.name=rte",
        "task.max_train_rows=48", "task.max_dev_rows=24", "warmup.batch_size=8", "evaluator.batch_size=8",
        *extra])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, base_teacher, glue_dir):
    cfg = _cfg(tmp_path_factory.mktemp("work"), base_teacher, glue_dir)
    finetune_teacher_into(cfg)
    return cfg


@pytest.fixture(scope="module")
def setup(cfg):
    return KDSetup.from_config(cfg, progress=False)


@pytest.fixture(scope="module")
def stage0(cfg, setup):
    return run_warmup(cfg, 0, progress=False, setup=setup)


def test_warmup_writes_stage_checkpoint_and_is_not_redone(cfg, setup, stage0):
    assert setup.task.spec.is_pair  # RTE: sentence pairs
    wd = WorkDir.of(cfg)
    assert stage0.checkpoint == wd.supernet_checkpoint(0) and stage0.checkpoint.is_file()
    assert not wd.warmup_state(0).exists()  # the resumable state is gone once the stage is done
    assert stage0.init == "random, teacher embeddings" and not stage0.skipped  # warmup.init_embeddings: teacher
    assert math.isfinite(stage0.loss) and 0.0 <= stage0.metrics["default"] <= 1.0
    report = stage0.report()
    # No "default": NNI's web UI would rank the warm-up with the candidates (its numbers go under warmup_*).
    assert report["warmup"] is True and report["stage"] == 0 and "default" not in report
    assert report["warmup_search_metric"] == stage0.metrics["default"] and report["warmup_search_rows"] > 0
    ckpt = load_torch(stage0.checkpoint, "checkpoint")
    assert ckpt["stage"] == 0 and ckpt["space_config"] == setup.space.config.to_dict()
    assert ckpt["plan"]["steps"] == cfg.search.stages[0].warmup_steps
    mtime = stage0.checkpoint.stat().st_mtime_ns
    again = run_warmup(cfg, 0, progress=False, setup=setup)
    assert again.skipped and stage0.checkpoint.stat().st_mtime_ns == mtime
    assert again.metrics["default"] == stage0.metrics["default"]


def test_interrupted_warmup_resumes_where_it_stopped(cfg, setup, stage0, monkeypatch):
    real_save = warmup_mod.atomic_save_torch
    calls = []

    def dying_save(obj, path):
        real_save(obj, path)
        calls.append(Path(path).name)
        if calls.count("stage1.resume.pt") == 2:
            raise KeyboardInterrupt  # killed right after the second periodic state hit the disk

    monkeypatch.setattr(warmup_mod, "atomic_save_torch", dying_save)
    kw = dict(steps=6, general_steps=2, checkpoint_interval=2, progress=False, setup=setup)
    with pytest.raises(KeyboardInterrupt):
        run_warmup(cfg, 1, **kw)
    # First the general phase (2 steps) ended, then the task phase saved its step 2 and died.
    assert calls == ["stage1.resume.pt", "stage1.resume.pt"]
    state = load_torch(WorkDir.of(cfg).warmup_state(1), "state")
    assert warmup_mod._PHASES[state["phase_index"]] == "task" and state["train"]["step"] == 2
    monkeypatch.setattr(warmup_mod, "atomic_save_torch", real_save)

    resumed = run_warmup(cfg, 1, **kw)
    assert resumed.resumed_at == 4 and resumed.init == "stage 0 checkpoint"
    assert not WorkDir.of(cfg).warmup_state(1).exists()
    resumed_weights = load_torch(resumed.checkpoint, "checkpoint")["state_dict"]
    straight = run_warmup(cfg, 1, force=True, **{k: v for k, v in kw.items() if k != "checkpoint_interval"})
    assert straight.resumed_at is None and straight.plan == resumed.plan
    straight_weights = load_torch(straight.checkpoint, "checkpoint")["state_dict"]
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-5), name


def test_sampled_archs_hold_fixed_choices_and_budget(setup):
    space = setup.space
    fixed = {"layer0_width": space.config.widths[-1], "layer1_stack": 2}
    lo, hi = space.param_range()
    budget = [lo, lo + (hi - lo) * 0.5]
    sampler = _ArchSampler(space, fixed, budget, seed=0, stage=1, phase=1, max_tries=500)
    archs = [sampler(k) for k in range(20)]
    assert all(a["layer0_width"] == fixed["layer0_width"] and a["layer1_stack"] == 2 for a in archs)
    assert all(budget[0] <= space.count_params(a) <= budget[1] for a in archs)
    assert sampler(7) == archs[7]  # step k is reproducible (resume)
    assert len({json.dumps(a, sort_keys=True) for a in archs}) > 10
    impossible = _ArchSampler(space, fixed, [0, 1], seed=0, stage=1, phase=1, max_tries=20)
    with pytest.raises(ConfigError, match="fits search.param_budget"):
        impossible(0)


def test_general_kd_on_a_corpus_and_on_longer_text(cfg, setup, stage0, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a gripping , funny film .\n\nthe plot is thin but the actors are good .\n" * 10)
    calls = []
    real_live = KDSetup.live_teacher

    def counting_live(self):
        calls.append("live")
        return real_live(self)

    monkeypatch.setattr(KDSetup, "live_teacher", counting_live)
    with_corpus = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup, corpus_file=str(corpus)))
    result = run_warmup(with_corpus, 2, steps=2, general_steps=2, progress=False, setup=setup)
    # issue 13: corpus text gets a teacher-output cache of its own, like the task's; no live teacher
    assert calls == [] and result.plan.corpus == str(corpus) and math.isfinite(result.loss)
    assert any(p.name.startswith("corpus32-") and p.is_dir() for p in (WorkDir.of(cfg).root / "cache").iterdir())
    assert result.init in ("stage 0 checkpoint", "stage 1 checkpoint")
    # Unlabeled text at another length than the task's gets a cache of its own.
    longer = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup, max_seq_length=16))
    before = {p.name for p in (WorkDir.of(cfg).root / "cache").iterdir()}
    run_warmup(longer, 2, steps=1, general_steps=0, force=True, progress=False, setup=setup)
    added = {p.name for p in (WorkDir.of(cfg).root / "cache").iterdir()} - before
    assert any(name.startswith("unlabeled16-") and not name.endswith(".lock") for name in added)
    WorkDir.of(cfg).supernet_checkpoint(2).unlink()  # later tests need stage 2 un-warmed


def test_named_checkpoint_missing_is_an_error_not_a_random_start(cfg, setup, stage0):
    broken = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup, checkpoint="/nonexistent/super.pt"))
    with pytest.raises(CheckpointError, match="warmup.checkpoint names /nonexistent/super.pt, which does not exist"):
        run_warmup(broken, 0, force=True, progress=False, setup=setup)
    with pytest.raises(ConfigError, match="stage 7 does not exist"):
        run_warmup(cfg, 7, progress=False, setup=setup)
    with pytest.raises(ConfigError, match="unknown label"):
        run_warmup(cfg, 0, fixed={"layer9_width": 8}, progress=False, setup=setup)


def test_evaluator_scores_inherited_weights(cfg, setup, stage0):
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, setup=setup)
    space = setup.space
    arch = space.random_arch(np.random.default_rng(5))
    result = evaluator.evaluate(arch, train_steps=0, trial_id="t-inherit")
    assert result["params"] == space.count_params(arch)
    assert result["non_embedding_params"] == space.count_params(arch, exclude_embeddings=True)
    assert result["params"] == sum(p.numel() for p in space.subnet(arch).parameters())
    assert math.isfinite(result["default"]) and result["latency_ms"] > 0
    assert result["expressions"] == [layer["expression"] for layer in space.describe(arch)]
    assert result["widths"] == [arch["layer0_width"], arch["layer1_width"]]
    assert result["stacks"] == [arch["layer0_stack"], arch["layer1_stack"]]
    assert result["stage"] == 0 and result["train_steps"] == 0 and result["inherited_from"] == "stage 0 supernet"
    record = json.loads((WorkDir.of(cfg).trial_dir("t-inherit") / "result.json").read_text())
    assert record["status"] == "succeeded" and record["arch"] == arch
    # The score is the stage checkpoint's, whatever the in-memory supernet holds meanwhile.
    ckpt = load_torch(stage0.checkpoint, "checkpoint")["state_dict"]
    student = space.subnet(arch)
    student.load_state_dict({k: ckpt[k][tuple(slice(0, n) for n in v.shape)] for k, v in student.state_dict().items()})
    scored = setup.score_search(student)
    assert scored["metrics"]["default"] == result["search_metric"]
    assert result["objective"] == cfg.evaluator.objective == "kd" and result["default"] == -scored["kd_loss"]

    trained = evaluator.evaluate(arch, trial_id="t-train")  # evaluator.train_steps = 4, eval every 2
    assert trained["train_steps"] == 4 and math.isfinite(trained["kd_loss"])


def test_a_one_shot_score_does_not_move_with_the_evaluator_seed(cfg, setup, stage0):
    """Why a one-shot stage has no tie margin (strategies.ties.stage_margin): with 0 fine-tune
    steps the same arch scores the same under every evaluator seed; after a fine-tune it need not."""
    arch = setup.space.random_arch(np.random.default_rng(7))
    scores = [KDEvaluator(dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, seed=seed)), stage=0,
                          report=False, progress=False, setup=setup).evaluate(arch, train_steps=0)["default"]
              for seed in (1, 2)]
    assert scores[0] == scores[1]


def test_a_rescore_fine_tunes_with_the_next_evaluator_seed(cfg, setup, stage0):
    """A re-score (``_rescore_of``, search.noise_rescores) is the same arch scored as if
    evaluator.seed were one higher, and its metric says which trial it scores again."""
    from nni_effbert.nas.trial_runner import run_parameters

    arch = setup.space.random_arch(np.random.default_rng(9))
    base = cfg.seed if cfg.evaluator.seed is None else cfg.evaluator.seed
    params = {**arch, "_stage": 0, "_train_steps": 4}
    first = run_parameters(cfg, params, report=False, progress=False, setup=setup)
    again = run_parameters(cfg, {**params, "_rescore_of": 3}, report=False, progress=False, setup=setup)
    shifted = KDEvaluator(dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, seed=base + 1)),
                          stage=0, report=False, progress=False, setup=setup).evaluate(arch, train_steps=4)
    assert first["evaluator_seed"] == base and "rescore_of" not in first
    assert again["evaluator_seed"] == base + 1 and again["rescore_of"] == 3 and again["train_steps"] == 4
    assert again["default"] == pytest.approx(shifted["default"], abs=1e-6)


def test_nni_functional_evaluator_inherits_from_checkpoint(cfg, setup, stage0, monkeypatch):
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, setup=setup)
    scored = []
    real_score = setup.score_search

    def spy(model, arch=None):
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_score(model, arch)

    monkeypatch.setattr(setup, "score_search", spy)
    arch = setup.space.bert_arch(width=setup.space.config.widths[1], stack=2)
    direct = evaluator.evaluate(arch, train_steps=0)
    nas = evaluator.as_nni_evaluator(train_steps=0)
    from nni.nas.evaluator import FunctionalEvaluator

    assert isinstance(nas, FunctionalEvaluator)
    torch.manual_seed(123)
    fresh = EfficientBertModel(setup.space.config, arch)  # what NNI builds: random weights
    via_nni = nas.evaluate(fresh)
    assert via_nni["default"] == direct["default"] and via_nni["inherited_from"] == "stage 0 supernet"
    ckpt = load_torch(stage0.checkpoint, "checkpoint")["state_dict"]
    for name, tensor in scored[-1].items():  # the scored weights are the checkpoint's slices ...
        assert torch.equal(tensor, ckpt[name][tuple(slice(0, n) for n in tensor.shape)]), name
    q = "layers.0.attention.query.weight"
    assert not torch.equal(scored[-1][q], fresh.state_dict()[q])  # ... not NNI's fresh initialisation

    class Frozen:  # what NasExperiment executes: a frozen space carrying the strategy's sample
        sample = {**arch, "_stage": 0, "_train_steps": 0}

        def executable_model(self):
            return EfficientBertModel(setup.space.config, arch)

    seen = {}
    probe = StageAwareEvaluator(lambda model, **kw: seen.update(kw, arch=model.arch) or 1.0, config={}, stage=None,
                                train_steps=None)
    probe._execute(Frozen())
    assert seen["stage"] == 0 and seen["train_steps"] == 0 and seen["arch"] == arch and "rescore_of" not in seen
    Frozen.sample = {**arch, "_stage": 0, "_train_steps": 0, "_rescore_of": 5}
    probe._execute(Frozen())
    assert seen["rescore_of"] == 5


def test_evaluator_stage_checkpoint_rules(cfg, setup, stage0, caplog):
    evaluator = KDEvaluator(cfg, report=False, progress=False, setup=setup)
    with pytest.raises(CheckpointError, match=r"supernet checkpoint of stage 2 \(size\) not found.*warmup -c <config> --stage 2"):
        evaluator.load_stage(2)
    with pytest.raises(ArchError, match="missing label"):
        evaluator.evaluate({"layer0_width": 8}, train_steps=0)
    # A stage without warm-up inherits the nearest earlier supernet ...
    no_warm = dataclasses.replace(cfg, search=dataclasses.replace(
        cfg.search, stages=[cfg.search.stages[0], cfg.search.stages[1], dataclasses.replace(cfg.search.stages[2], warmup=False)]))
    ev2 = KDEvaluator(no_warm, report=False, progress=False, setup=setup)
    assert ev2.load_stage(2).endswith("supernet (stage 2 has no warm-up)")
    # ... and with no checkpoint at all, the run is allowed but logged as one without warm-up.
    empty = dataclasses.replace(no_warm, workdir=str(Path(cfg.workdir) / "no-supernet"))
    shutil.copytree(WorkDir.of(cfg).teacher_dir, WorkDir.of(empty).teacher_dir)
    ev3 = KDEvaluator(empty, stage=2, report=False, progress=False)
    with caplog.at_level(logging.WARNING, logger="nni_effbert.nas.kd_evaluator"):
        result = ev3.evaluate(setup.space.bert_arch(), train_steps=0)
    assert result["inherited_from"] == "random initialisation (no warm-up)"
    assert "WITHOUT warm-up" in caplog.text
