"""Reuse in other NAS projects (issue 30): ``KDEvaluator`` with NNI's own strategies.

* ``KDEvaluator(cfg, supernet=...)`` states where candidates take their weights from, the
  choice travels inside the evaluator NNI serialises into each trial, and a trial never
  guesses from its experiment id;
* no warm-up yet: one line naming ``nni-effbert warmup -c CONFIG --stage 0`` when the
  evaluator is built (explicit source) or on the first sample (default), before any trial;
* integration: ``examples/nni_strategies/search.py`` runs a real ``NasExperiment`` (training
  service engine: every candidate an NNI trial process) with NNI's ``Random`` and
  ``RegularizedEvolution`` on the tiny preset and the work directory's warm-up; the trials
  report the progressive search's metric dict, ``export_top_models`` is non-empty, the top
  model's ``describe`` reads (and parses back), and ``nni-effbert export --experiment ID``
  exports the best trial from the supernet the trials used.
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

from nni_effbert.config import load_config
from nni_effbert.errors import CheckpointError, ConfigError
from nni_effbert.nas.kd_evaluator import KDEvaluator
from nni_effbert.nas.supernets import supernet_source
from nni_effbert.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "nni_strategies"
CONFIG = EXAMPLE / "effbert.yml"


def _sets(work, base_teacher, glue_dir):
    """Overrides that shrink the example config to the tiny preset and seconds-long trials."""
    return [f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}", "student.preset=tiny",
            "task.max_seq_length=32", "task.max_train_rows=64", "task.max_dev_rows=32",
            "teacher.finetune.max_steps=4", "teacher.finetune.batch_size=16", "warmup.steps=4",
            "warmup.batch_size=16", "evaluator.train_steps=2", "evaluator.eval_interval=2",
            "evaluator.batch_size=16", "evaluator.latency_repeats=1", "evaluator.latency_seq_length=32",
            "search.trial_concurrency=2",
            "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 4}]"]


@pytest.fixture
def cold_cfg(tmp_path, base_teacher, glue_dir):
    """The example config on the tiny preset, in a work directory without any warm-up."""
    return load_config(CONFIG, _sets(tmp_path / "work", base_teacher, glue_dir))


# ---------------------------------------------------------------------------------------------
# The supernet choice (no training, no NNI manager)
# ---------------------------------------------------------------------------------------------

def test_supernet_source_accepts_workdir_id_path_own_auto(tmp_path):
    assert supernet_source(None) == {"source": "auto"} == supernet_source("auto")
    assert supernet_source("workdir") == {"source": "workdir"}
    assert supernet_source("own") == {"source": "own"}
    assert supernet_source("a1b2c3d4") == {"source": "experiment", "experiment": "a1b2c3d4"}
    ckpt = tmp_path / "stage0.pt"
    assert supernet_source(ckpt) == {"source": "checkpoint", "path": str(ckpt)}
    assert supernet_source(str(ckpt)) == supernet_source(ckpt)
    assert supernet_source(supernet_source("a1b2c3d4")) == supernet_source("a1b2c3d4")  # what trials receive
    for bad in ("not an id!", 3, {"source": "experiment"}, {"source": "elsewhere"}):
        with pytest.raises(ConfigError, match="supernet= takes 'workdir'"):
            supernet_source(bad)


def test_missing_workdir_supernet_is_one_line_error_when_the_evaluator_is_built(cold_cfg):
    with pytest.raises(CheckpointError) as err:
        KDEvaluator(CONFIG, overrides=[f"workdir={cold_cfg.workdir}", "student.preset=tiny"], supernet="workdir")
    msg = str(err.value)
    assert "\n" not in msg and f"nni-effbert warmup -c {CONFIG} --stage 0" in msg, msg
    with pytest.raises(CheckpointError, match="does not exist"):
        KDEvaluator(cold_cfg, supernet=Path(cold_cfg.workdir) / "nowhere.pt")
    with pytest.raises(CheckpointError, match="experiment abc123 has no supernet of stage 0"):
        KDEvaluator(cold_cfg, supernet="abc123")
    with pytest.raises(ConfigError, match="contradict"):
        KDEvaluator(cold_cfg, supernet="workdir", experiment="abc123")
    KDEvaluator(cold_cfg)  # the default checks nothing yet: the progressive strategy warms up first


def test_workdir_source_ignores_the_trials_experiment_id(cold_cfg, monkeypatch):
    wd = WorkDir.of(cold_cfg)
    wd.supernet_checkpoint(0).parent.mkdir(parents=True, exist_ok=True)
    wd.supernet_checkpoint(0).write_bytes(b"")  # existence is all the check looks at
    monkeypatch.setenv("NNI_EXP_ID", "foreign1")  # what NNI sets in a trial of another experiment
    ev = KDEvaluator(cold_cfg, supernet={"source": "workdir"})
    assert ev.experiment is None and ev.check_supernet() == (0, wd.supernet_checkpoint(0))
    assert ev.resolved_supernet() == {"source": "workdir"}
    own = KDEvaluator(cold_cfg, supernet={"source": "own"})  # the progressive strategy's trials
    assert own.experiment == "foreign1" and own.resolved_supernet() == {"source": "experiment",
                                                                         "experiment": "foreign1"}
    wd.supernet_folder("foreign1").mkdir()  # an experiment of this layout never reads supernet/stage0.pt
    with pytest.raises(CheckpointError, match="experiment foreign1's supernet of stage 0"):
        own.check_supernet()


def test_default_evaluator_checks_on_the_first_foreign_sample_and_trials_carry_the_choice(cold_cfg):
    import nni

    ev = KDEvaluator(cold_cfg)
    nas = ev.as_nni_evaluator()
    assert nas.arguments["supernet"] == {"source": "auto"}
    # The progressive strategy's samples carry _stage: its trials read what the evaluator's
    # in-process warm-ups write (the experiment's supernets once the driver named it).
    assert nas.freeze({"layer0_width": 8, "_stage": 0}).arguments["supernet"] == {"source": "workdir"}
    ev.experiment = "exp1"  # what search --python / examples/nas_experiment.py set after NasExperiment(...)
    assert nas.freeze({"layer0_width": 8, "_stage": 0}).arguments["supernet"] == {"source": "experiment",
                                                                                   "experiment": "exp1"}
    # Any other strategy: the work directory's warm-up, checked before a trial is submitted.
    with pytest.raises(CheckpointError) as err:
        nas.freeze({"layer0_width": 8})
    assert "\n" not in str(err.value) and "nni-effbert warmup -c CONFIG --stage 0" in str(err.value)
    wd = WorkDir.of(cold_cfg)
    wd.supernet_checkpoint(0).parent.mkdir(parents=True, exist_ok=True)
    wd.supernet_checkpoint(0).write_bytes(b"")
    frozen = nas.freeze({"layer0_width": 8})
    assert frozen.arguments["supernet"] == {"source": "workdir"}
    # What NNI sends to the trial process: the choice is in the serialised evaluator.
    assert nni.load(nni.dump(frozen)).arguments["supernet"] == {"source": "workdir"}
    explicit = KDEvaluator(cold_cfg, supernet="workdir").as_nni_evaluator()
    assert explicit.freeze({"layer0_width": 8}).arguments["supernet"] == {"source": "workdir"}


def test_nas_trial_records_read_the_reported_arch():
    from nni_effbert.nas.records import _trial_from_nni

    arch = {"layer0_width": 8}
    serialised_model = {"__symbol__": "path:nni.nas.space.SimplifiedModelSpace", "__kwargs__": {}}
    final = json.dumps({"default": -1.5, "params": 10, "arch": arch, "stage": 0,
                        "supernet_source": {"source": "workdir"}})
    trial = _trial_from_nni("t1", "SUCCEEDED", 0, serialised_model, final, None)
    assert trial["arch"] == arch and trial["metric"] == -1.5 and trial["stage"] == 0


# ---------------------------------------------------------------------------------------------
# Real NasExperiments (NNI manager, trials as processes); share one warm-up
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warm(tmp_path_factory, base_teacher, glue_dir):
    """A work directory with the teacher and the work directory's own stage-0 warm-up."""
    from conftest import finetune_teacher_into
    from nni_effbert.nas.warmup import run_warmup

    work = tmp_path_factory.mktemp("nni_strategies") / "work"
    sets = _sets(work, base_teacher, glue_dir)
    cfg = load_config(CONFIG, sets)
    finetune_teacher_into(cfg)
    result = run_warmup(cfg, 0, progress=False)
    assert result.checkpoint == WorkDir.of(cfg).supernet_checkpoint(0)
    return sets, work


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_example(sets, cwd, *args):
    from nni_effbert.nas.experiments import free_port

    cmd = [sys.executable, str(EXAMPLE / "search.py"), "-c", str(CONFIG), *[f"--set={s}" for s in sets],
           "--port", str(free_port()), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=cwd)


def _trial_logs(work, limit=3000):
    """The tails of the NNI trials' stderr, for assertion messages."""
    logs = sorted((Path(work) / "nni-experiments").glob("*/trials/*/stderr"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-limit:]}" for p in logs[:4])


def _delete_experiments(work):
    root = Path(work) / "nni-experiments"
    for folder in (root.iterdir() if root.is_dir() else []):
        if folder.is_dir() and not folder.name.startswith("_"):
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", folder.name],
                           env=_env(), input="y\n", capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_nni_strategy_scores_trials_with_the_workdir_warmup(warm, strategy, tmp_path):
    from nni_effbert import cli
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.objectives import objective_value
    from nni_effbert.nas.records import is_scored, read_nni_trials

    sets, work = warm
    summary = tmp_path / "summary.json"
    proc = _run_example(sets, tmp_path, "--strategy", strategy, "--trials", "4", "--summary", str(summary))
    if proc.returncode != 0:
        logs = _trial_logs(work)
        _delete_experiments(work)
        pytest.fail(proc.stdout[-2000:] + proc.stderr[-3000:] + logs)
    data = json.loads(summary.read_text())
    exp_id = data["experiment"]
    try:
        assert data["top"], "export_top_models returned nothing"
        cfg = load_config(work / "config.yml") if (work / "config.yml").is_file() else load_config(CONFIG, sets)
        space = KDSetup.from_config(cfg, progress=False).space
        top = {k: v for k, v in data["top"][0].items() if k in space.choices}
        described = data["describe"]
        assert described == space.describe(top)
        for layer in described:  # readable: every op applied once, intermediates named
            assert layer["expression"].count("linear2(") == 1 and layer["expression"].count("linear1(") == 1, layer
        assert space.fingerprint(space.arch_from_layers(described)) == space.fingerprint(top)
        # NNI's records of the trials: the progressive search's metric dict, from the workdir's warm-up.
        trials = read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")
        scored = [t for t in trials if is_scored(t)]
        assert len(scored) >= 3, [(t["status"], t.get("message")) for t in trials]
        for t in scored:
            final = t["final"]
            assert final["objective"] == cfg.evaluator.objective
            assert final["default"] == t["metric"] == objective_value(final, cfg.evaluator.objective)
            assert math.isfinite(final["latency_ms"]) and final["params"] == space.count_params(t["arch"])
            assert final["expressions"] == [d["expression"] for d in space.describe(t["arch"])]
            assert final["supernet_source"] == {"source": "workdir"}
            assert final["supernet"]["path"] == str(WorkDir.of(cfg).supernet_checkpoint(0))
            assert final["stage"] == 0 and final["inherited_from"] == "stage 0 supernet"
        assert any(top == t["arch"] for t in scored)
        if strategy == "random":
            # export works on the experiment: the best trial, sliced from the supernet it was scored on.
            assert cli.main(["export", "-q", "-c", str(CONFIG), *[f"--set={s}" for s in sets],
                             "--experiment", exp_id]) == 0
            folder = WorkDir.of(cfg).export_dir("searched")
            # the search's tie rule (search.tie_margin): the cheapest trial within the margin of the top score
            from nni_effbert.nas.ranking import best_trial
            margin = float(cfg.search.tie_margin or 0.0)
            best = best_trial(scored, tie_margin=margin)
            assert best["metric"] >= max(t["metric"] for t in scored) - margin - 1e-12
            assert json.loads((folder / "arch.json").read_text()) == best["arch"]
            meta = json.loads((folder / "export_meta.json").read_text())["extra"]
            assert meta["experiment"] == exp_id and meta["supernet_experiment"] is None
            # the margin that ranked the stage: search.tie_margin, 0 for one-shot scores (no re-scores here)
            from nni_effbert.nas.ranking import stage_tie_margin
            assert meta["tie_margin"] == stage_tie_margin(scored, best["stage"], margin)
            assert meta["tie_margin_rescores"] == 0
            md = (folder / "architecture.md").read_text()
            assert all(d["expression"] in md for d in space.describe(best["arch"]))
    finally:
        _delete_experiments(work)


@pytest.mark.integration
def test_no_warmup_stops_the_experiment_before_any_trial(warm, tmp_path):
    from nni_effbert.nas.records import read_nni_trials

    sets, warm_work = warm
    work = tmp_path / "cold"
    shutil.copytree(warm_work / "teacher", work / "teacher")  # a teacher, but no warm-up
    cold = [s for s in sets if not s.startswith("workdir=")] + [f"workdir={work}"]
    proc = _run_example(cold, tmp_path, "--strategy", "random", "--trials", "4")
    try:
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"nni-effbert warmup -c {CONFIG} --stage 0" in line, proc.stderr[-3000:]
        folders = [p for p in (work / "nni-experiments").iterdir() if p.is_dir() and not p.name.startswith("_")]
        assert len(folders) == 1
        assert read_nni_trials(folders[0].name, experiments_dir=work / "nni-experiments") == []
    finally:
        _delete_experiments(work)


# ---------------------------------------------------------------------------------------------
# NNI's one-shot strategies (RandomOneShot / SPOS) on the space itself
# ---------------------------------------------------------------------------------------------

def test_random_one_shot_trains_sampled_paths_and_exports_an_arch():
    """RandomOneShot trains a random path of the shared weights per step (not only the largest
    arch, which is what it did before the space offered its one-shot hook) and exports an arch
    of the space."""
    import torch
    from nni.nas.evaluator.pytorch import ClassificationModule, DataLoader, Lightning, Trainer
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import RandomOneShot

    from nni_effbert.search_spaces import EfficientBertSpace

    torch.manual_seed(0)
    space = EfficientBertSpace.preset("tiny")
    before = {k: v.clone() for k, v in space.state_dict().items()}
    ran = []
    forward = space.supernet.forward

    def spy(*args, arch=None, **kwargs):
        ran.append(space.fingerprint(arch))
        return forward(*args, arch=arch, **kwargs)

    space.supernet.forward = spy

    class Logits(ClassificationModule):  # the space returns StudentOutput; NNI's module wants logits
        def forward(self, x):
            return self.model(x).logits

    data = torch.utils.data.TensorDataset(torch.randint(1, space.config.vocab_size, (16, 6)), torch.randint(0, 2, (16,)))
    evaluator = Lightning(Logits(num_classes=2),
                          Trainer(max_epochs=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                                  num_sanity_val_steps=0),
                          train_dataloaders=DataLoader(data, batch_size=4), val_dataloaders=DataLoader(data, batch_size=4))
    strategy = RandomOneShot()  # what NasExperiment(space, evaluator, RandomOneShot()).run() runs
    strategy(RawFormatModelSpace.from_model(space, evaluator), SequentialExecutionEngine())
    top = [model.sample for model in strategy.list_models()]
    assert len(ran) >= 8 and len(set(ran)) > len(ran) // 2, ran  # a new random path per step
    assert space.fingerprint(space._max_arch()) not in set(ran[:4]) or len(set(ran)) > 1
    arch = space.validate_arch(top[0])
    assert len(space.describe(arch)) == space.config.num_hidden_layers
    assert any(not torch.equal(before[k], v) for k, v in space.state_dict().items())  # the shared weights trained
