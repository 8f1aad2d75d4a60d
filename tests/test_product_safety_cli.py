"""Nothing computed is lost or silently changed, through the CLI, on one tiny work directory:

* ``export`` never replaces an existing (distilled) export without ``--force``, and names what
  would be lost;
* ``distill`` and ``report`` refuse an export whose code, weights or ``config.json`` changed;
* every experiment keeps its own config snapshot: a later search with other stages does not
  change what ``warmup/export --experiment`` of an earlier experiment read;
* a second ``report`` of unchanged students prints the same table and measures or distils nothing.

The module fixture fine-tunes a tiny teacher, warms up stage 0, exports an arch and distils it
(seconds each on the tiny preset); the tests then work on the same work directory, each with its
own export names and experiment ids.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from nni_effbert import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
ONE_STAGE = "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 4}]"

SCHEMA = """
create table TrialJobEvent (timestamp integer, trialJobId text, event text, data text, logPath text,
                            sequenceId integer, message text, environment text);
create table MetricData (timestamp integer, trialJobId text, parameterId text, type text, sequence integer,
                         data text);
"""


def _make_experiment(db: Path, jobs):
    """A stopped NNI experiment's database: ``jobs`` = [(id, params, final status, final metric or None)]."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    for i, (tid, params, status, final) in enumerate(jobs):
        hp = json.dumps({"parameter_id": i, "parameter_source": "algorithm", "parameters": params})
        for j, event in enumerate(["WAITING", "RUNNING", status]):
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (1000 * i + j, tid, event, hp if event == "WAITING" else None, "file://x", i, None, None))
        if final is not None:
            conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                         (1000 * i + 9, tid, str(i), "FINAL", 0, json.dumps(json.dumps(final))))
    conn.commit()
    conn.close()


def _run(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.fixture(scope="module")
def work(tmp_path_factory, base_teacher, glue_dir):
    """(work directory, --set args, arch file): teacher, stage-0 warm-up, exports/searched distilled."""
    from nni_effbert.search_spaces import EfficientBertSpace

    root = tmp_path_factory.mktemp("safety")
    work = root / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=96", "--set=task.max_dev_rows=48", "--set=distill.general_steps=0",
            "--set=distill.task_steps=2", "--set=distill.eval_interval=0", "--set=distill.batch_size=16",
            "--set=evaluator.latency_repeats=3"]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    assert cli.main(["warmup", "-q", "-c", TINY, *sets, "--stage", "0"]) == 0
    space = EfficientBertSpace.preset("tiny")
    arch = space.bert_arch(width=space.config.widths[1], stack=2)
    arch_file = root / "arch.json"
    arch_file.write_text(json.dumps(arch))
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--arch", str(arch_file)]) == 0
    assert cli.main(["distill", "-q", "-c", TINY, *sets, "--export", str(work / "exports" / "searched")]) == 0
    return work, sets, arch_file


def _tree_sha(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# item 6: export never replaces a (distilled) export silently
# ---------------------------------------------------------------------------------------------


def test_export_refuses_to_replace_a_distilled_student_without_force(work, capsys, caplog):
    from nni_effbert.product.loader import load_exported

    work, sets, arch_file = work
    folder = work / "exports" / "kept"
    shutil.copytree(work / "exports" / "searched", folder)  # a distilled student named "kept"
    before = _tree_sha(folder)
    assert load_exported(folder).meta["extra"]["distill"]["plan"]["task_steps"] == 2

    code, out, err = _run(capsys, "export", "-q", "-c", TINY, *sets, "--arch", arch_file, "--name", "kept")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "already exists" in err and "the distilled student (model.safetensors, dev accuracy" in err
    assert "distill record in export_meta.json" in err and "--force" in err
    assert _tree_sha(folder) == before  # nothing lost

    # export --experiment ID, the issue's path: refused before any weight is loaded
    exps = work.parent / "exps-6"
    _make_experiment(exps / "exp6" / "db" / "nni.sqlite", [
        ("T1", {**json.loads(arch_file.read_text()), "_stage": 0, "_stage_name": "coarse"}, "SUCCEEDED",
         {"default": 0.6})])
    code, _, err = _run(capsys, "export", "-q", "-c", TINY, *sets, "--experiment", "exp6", "--experiments-dir", exps,
                        "--name", "kept")
    assert code == 2 and "the distilled student" in err and _tree_sha(folder) == before

    # --force replaces it; the loss is logged, not silent
    caplog.clear()
    code, out, _ = _run(capsys, "export", "-c", TINY, *sets, "--arch", arch_file, "--name", "kept", "--force")
    assert code == 0 and out.strip().endswith(str(folder))
    assert "distill" not in load_exported(folder).meta["extra"]
    assert any("distilled student" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)

    # any existing folder, distilled or not
    code, _, err = _run(capsys, "export", "-q", "-c", TINY, *sets, "--arch", arch_file, "--name", "kept")
    assert code == 2 and "the exported weights (model.safetensors) and export_meta.json" in err


def test_pipeline_rerun_keeps_the_previous_distilled_student(work):
    """quickstart/pipeline re-export under exports/searched: the previous student is moved aside."""
    from nni_effbert.config import load_config
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.students import keep_previous_export

    work, sets, _ = work
    folder = work / "exports" / "pipe"
    shutil.copytree(work / "exports" / "searched", folder)
    cfg = load_config(TINY, [s.split("=", 1)[1] for s in sets])
    kept = keep_previous_export(cfg, "pipe")
    assert kept == work / "exports" / "pipe-previous" and not folder.exists()
    assert load_exported(kept).meta["extra"]["distill"]
    shutil.copytree(kept, folder)
    assert keep_previous_export(cfg, "pipe") == work / "exports" / "pipe-previous-2"


# ---------------------------------------------------------------------------------------------
# item 3: distill and report refuse a tampered export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["modeling.py", "model.safetensors", "config.json"])
def test_distill_and_report_refuse_a_changed_export(work, capsys, name):
    work, sets, _ = work
    folder = work / "exports" / f"tampered-{name.split('.')[0]}"
    shutil.copytree(work / "exports" / "searched", folder)
    with open(folder / name, "ab") as f:
        f.write(b"\n# changed\n" if name.endswith(".py") else b" ")
    for command in (["distill", "--export", folder, "--force"], ["report", "--export", folder]):
        code, _, err = _run(capsys, command[0], "-q", "-c", TINY, *sets, *command[1:])
        assert code == 2 and len(err.splitlines()) == 1, (command, err)
        assert f"{name} was changed after export" in err and "re-export" in err, err


# ---------------------------------------------------------------------------------------------
# item 7: each experiment reads its own config snapshot
# ---------------------------------------------------------------------------------------------


def _fake_nnictl(monkeypatch, ids):
    """``nnictl create`` that starts nothing and answers the next id of ``ids``."""
    from nni_effbert.nas import nnictl_search

    todo = list(ids)

    def fake(args, **kwargs):
        exp = todo.pop(0) if args[0] == "create" else args[1]
        text = f'Successfully started experiment!\nExperiment id: {exp}\nYou can use "nnictl stop {exp}"\n'
        return subprocess.CompletedProcess(["nnictl", *args], 0, text, "")

    monkeypatch.setattr(nnictl_search, "_nnictl", fake)
    monkeypatch.setattr(nnictl_search, "register_tuner", lambda: {"builtinName": "EfficientBertProgressive"})


def test_each_experiment_reads_its_own_config(work, capsys, monkeypatch, caplog):
    import logging

    from nni_effbert.config import load_config
    from nni_effbert import search_lock
    from nni_effbert.workdir import WorkDir

    work, sets, arch_file = work
    wd = WorkDir(work)
    _fake_nnictl(monkeypatch, ["expold1", "expnew2"])
    # search 1 (three stages), stopped; search 2 with one stage rewrites <workdir>/config.yml
    assert cli.main(["search", "-q", "-c", TINY, *sets]) == 0
    search_lock.release_experiment(wd, "expold1")
    assert cli.main(["search", "-q", "-c", TINY, *sets, f"--set={ONE_STAGE}"]) == 0
    search_lock.release_experiment(wd, "expnew2")
    latest = load_config(wd.config_file)
    assert len(latest.search.stages) == 1

    # The repro: commands given the work directory's config.yml and the earlier id. A
    # stage-2 trial of expold1, and expold1's stage-2 supernet (warmed with its own config).
    arch = json.loads(arch_file.read_text())
    _make_experiment(work / "nni-experiments" / "expold1" / "db" / "nni.sqlite", [
        ("T9", {**arch, "_stage": 2, "_stage_name": "size"}, "SUCCEEDED", {"default": 0.7})])
    for stage in ("0", "2"):  # stage 2 starts from the experiment's stage 0
        code, _, err = _run(capsys, "warmup", "-q", "-c", wd.config_file, "--stage", stage, "--experiment", "expold1")
        assert code == 0, err
    assert (work / "supernet" / "expold1" / "stage2.pt").is_file()
    code, out, err = _run(capsys, "export", "-q", "-c", wd.config_file, "--experiment", "expold1", "--name", "old")
    assert code == 0, err
    assert "best trial T9 (stage 2" in out
    from nni_effbert.config import experiment_config

    old_snapshot = wd.experiment_config_file("expold1")
    assert old_snapshot == work / "nni-experiments" / "expold1" / "effbert.yml"
    assert len(load_config(old_snapshot).search.stages) == 3
    assert len(load_config(wd.experiment_config_file("expnew2")).search.stages) == 1
    # --set overrides still apply on top of the snapshot
    cfg = experiment_config(latest, "expold1", ["evaluator.train_steps=3"])
    assert len(cfg.search.stages) == 3 and cfg.evaluator.train_steps == 3

    # a trial of expold1 inside NNI ($NNI_EXP_ID) reads the snapshot, not --config
    from nni_effbert.nas import trial_runner as trial_mod

    seen = {}
    monkeypatch.setenv("NNI_EXP_ID", "expold1")
    monkeypatch.setattr(trial_mod, "configure_threads", lambda cfg: seen.setdefault("stages", len(cfg.search.stages)))
    monkeypatch.setattr(trial_mod, "resolve_runtime", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        trial_mod.run(trial_mod.build_parser().parse_args(["--config", str(wd.config_file), "--arch", str(arch_file)]))
    assert seen["stages"] == 3
    monkeypatch.delenv("NNI_EXP_ID")

    # an experiment from before snapshots: <workdir>/config.yml, with a note
    (work / "nni-experiments" / "legacy9").mkdir()
    caplog.set_level(logging.INFO, logger="nni_effbert.config")
    assert len(experiment_config(load_config(TINY, [s.split("=", 1)[1] for s in sets]), "legacy9").search.stages) == 1
    assert any("no config snapshot" in r.getMessage() for r in caplog.records)
    code, _, err = _run(capsys, "export", "-q", "-c", wd.config_file, "--experiment", "../x", "--name", "y")
    assert code == 2 and "an experiment id is letters and digits" in err

    # the --python (NasExperiment) path writes its snapshot too (NNI itself faked: nothing runs)
    from nni_effbert.nas import python_search

    class FakeNas:
        def __init__(self, space, evaluator, strategy, conf, id=None):
            self.id = id or "exppy3"

        def run(self, port):
            return True

        def stop(self):
            pass

    monkeypatch.setattr(python_search, "_nas_experiment_class", lambda: FakeNas)
    code, _, err = _run(capsys, "search", "-q", "-c", TINY, *sets, f"--set={ONE_STAGE.replace('trials: 2', 'trials: 1')}",
                        "--python")
    assert code == 1 and "experiment exppy3 has no succeeded candidate" in err, err  # no trial ran
    assert len(load_config(wd.experiment_config_file("exppy3")).search.stages) == 1, err
    assert load_config(wd.experiment_config_file("exppy3")).search.stages[0].trials == 1

    # a resume goes on with the experiment's own config, and writes it back for NNI's advisor
    code, _, err = _run(capsys, "search", "-q", "-c", TINY, *sets, f"--set={ONE_STAGE}", "--resume", "expold1")
    assert code == 0, err
    search_lock.release_experiment(wd, "expold1")
    assert len(load_config(wd.config_file).search.stages) == 3
    assert len(load_config(old_snapshot).search.stages) == 3


# ---------------------------------------------------------------------------------------------
# item 8: a report of unchanged students is reproducible
# ---------------------------------------------------------------------------------------------


def test_second_report_reuses_measurements_and_distils_nothing(work, capsys, monkeypatch):
    from nni_effbert.latency import measure as latency_mod
    from nni_effbert.product import distill, report
    from nni_effbert.product import baselines

    work, sets, _ = work
    code, first, err = _run(capsys, "report", "-q", "-c", TINY, *sets)
    assert code == 0, err
    table1 = [line for line in first.splitlines() if line.startswith("|")]
    assert table1[0].startswith("| model") and any(line.startswith("| searched") for line in table1)

    calls = []

    def spy(name, real):
        def wrapper(*a, **kw):
            calls.append(name)
            return real(*a, **kw)
        return wrapper

    for mod in (report, distill):
        monkeypatch.setattr(mod, "measure_latency", spy(f"{mod.__name__}.measure_latency", latency_mod.measure_latency))
    monkeypatch.setattr(baselines, "measure_interleaved", spy("measure_interleaved", latency_mod.measure_interleaved))
    monkeypatch.setattr(distill, "kd_train", spy("kd_train", distill.kd_train))
    monkeypatch.setattr(baselines, "latency_baseline_arch", spy("latency_baseline_arch", baselines.latency_baseline_arch))
    code, second, err = _run(capsys, "report", "-q", "-c", TINY, *sets)
    assert code == 0, err
    assert [line for line in second.splitlines() if line.startswith("|")] == table1
    assert calls == []  # no latency measured, no width re-chosen, nothing distilled
    assert (work / "reports" / "measurements.json").is_file()

    # --remeasure measures again
    code, _, err = _run(capsys, "report", "-q", "-c", TINY, *sets, "--remeasure")
    assert code == 0, err
    assert "nni_effbert.product.report.measure_latency" in calls and "latency_baseline_arch" in calls
