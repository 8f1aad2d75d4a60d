"""Nothing run from untrusted input, and the documented commands on a quickstart work directory
(issue 23, items 1, 2, 4, 5 and 9).

* Every command line written for NNI / a shell is quoted: a work directory holding a space,
  ``;`` and ``#`` runs its trials (nothing injected), and a module planted in the trial code
  directory (``<workdir>/nnictl/yaml.py``) is never imported by a trial.
* A search whose candidates all failed ends with a one-line error and exit status 1.
* ``nni-effbert search`` warns that NNI's web UI / REST API is open to the network and says how
  to reach it safely.
* Experiment ids are checked before any path is built from them; system folders and the home
  folder are refused as work directories.
* Every documented command runs on a work directory made by ``nni-effbert quickstart --budget
  smoke`` (``fidelity`` failed there: it looked for ``supernet/stage0.pt``).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nni_effbert import cli
from nni_effbert.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
#: A work-directory name a shell would split and run: a space, ``;`` and ``$(...)``.
HOSTILE = "w x;touch INJECTED;$(touch INJECTED)"
#: A ``yaml.py`` planted in the trial code directory: imported, it leaves a marker and kills the trial.
PLANTED_YAML = ("import pathlib, sys\n"
                "pathlib.Path(__file__).with_name('PLANTED_MODULE_RAN').write_text('imported')\n"
                "sys.exit(97)\n")


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"nni-effbert {command}: error:"), err
    return lines[0]


def _user_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), OMP_NUM_THREADS="1")
    return env


# -- item 1 / 4: the trial command --------------------------------------------------------------


def test_trial_command_is_quoted_and_ignores_modules_in_the_code_directory(tmp_path):
    """The ``trialCommand`` written into nnictl.yml, run the way NNI's trial keeper runs it
    (``/bin/bash`` in the trial code directory): the hostile path reaches the trial as one
    argument, nothing after ``;`` runs, and the planted ``yaml.py`` is not imported."""
    import yaml

    from nni_effbert.config import load_config
    from nni_effbert.nas.nnictl_search import nnictl_config

    work = tmp_path / "runs" / HOSTILE
    code = work / "nnictl"
    code.mkdir(parents=True)
    (code / "yaml.py").write_text(PLANTED_YAML)
    cfg = load_config(TINY, [f"workdir={work}"], check_paths=False)
    config_file = work / "config.yml"
    cfg.save(config_file)
    conf = nnictl_config(cfg, config_file)
    assert conf["trialCodeDirectory"] == str(code)
    assert shlex.split(conf["trialCommand"])[-2:] == ["--config", str(config_file)]
    # What NNI does with it: spawn(command, {shell: '/bin/bash', cwd: codeDirectory}).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNI_", "PYTHONSAFEPATH"))}
    run = subprocess.run(["/bin/bash", "-c", conf["trialCommand"]], cwd=code, env=env, capture_output=True,
                         text=True, timeout=300)
    assert not list(tmp_path.rglob("INJECTED")), "the work-directory path ran a shell command"
    assert not (code / "PLANTED_MODULE_RAN").exists(), "the trial imported yaml.py from its code directory"
    # Outside NNI the trial stops at the config (its teacher is not there): the whole path reached it.
    assert run.returncode == 2 and f"error: {config_file}:" in run.stderr, run.stderr[-2000:]
    # The header's command line is quoted too.
    from nni_effbert.nas.nnictl_search import write_nnictl_config

    path = write_nnictl_config(cfg, config_file)
    header = path.read_text().splitlines()[1]
    assert shlex.split(header.lstrip("# "))[:4] == ["nnictl", "create", "--config", str(path)]
    assert yaml.safe_load(path.read_text())["trialCommand"] == conf["trialCommand"]


def test_search_whose_candidates_all_failed_exits_1_and_says_so(tmp_path, monkeypatch, capsys, glue_dir):
    from nni_effbert.nas import launcher as search_mod
    from nni_effbert.nas.experiments import SearchResult

    failed = [{"trial_id": f"t{i}", "status": "FAILED", "stage": 0, "warmup": False,
               "message": "trial failed: unrecognized arguments: x;touch"} for i in range(3)]
    warmup = {"trial_id": "w0", "status": "SUCCEEDED", "stage": 0, "warmup": True}
    result = SearchResult("abc123xy", "http://localhost:1", "DONE", tmp_path, None, port=1,
                          trials=[warmup, *failed])
    monkeypatch.setattr(search_mod, "run_search", lambda *a, **k: result)
    rc = cli.main(["search", "-q", "-c", TINY, f"--set=workdir={tmp_path / 'w'}", f"--set=teacher.model={tmp_path}",
                   f"--set=task.data_dir={glue_dir}", "--wait"])
    captured = capsys.readouterr()
    assert rc == 1
    line = _one_error_line(captured.err, "search")
    assert "no candidate was scored: 3 trial(s) failed" in line and "unrecognized arguments" in line
    assert str(tmp_path / "nni-experiments" / "abc123xy") in line


# -- item 5: experiment ids and work directories -----------------------------------------------


@pytest.mark.parametrize("argv", [
    ["export", "--pareto", "--experiment", "../../outside_exp"],
    ["export", "--experiment", "../outside_exp"],
    ["report", "--experiment", "a/../../b"],
    ["fidelity", "--experiment", ".."],
    ["trial", "--arch", "arch.json", "--experiment", "../x"],
    ["warmup", "--stage", "0", "--experiment", "x/../../y"],
    ["search", "--resume", "../../outside_exp"],
], ids=lambda a: a[0] + ("-resume" if "--resume" in a else ""))
def test_experiment_id_that_is_a_path_is_refused_before_reading_anything(tmp_path, capsys, argv):
    work = tmp_path / "a" / "b" / "work"
    # A database where ../../outside_exp points from <workdir>/nni-experiments.
    outside = tmp_path / "a" / "outside_exp" / "db"
    outside.mkdir(parents=True)
    (outside / "nni.sqlite").write_bytes(b"")
    rc = cli.main([argv[0], "-q", "-c", TINY, f"--set=workdir={work}", *argv[1:]])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert "an experiment id is letters and digits" in line
    assert not work.exists()


def test_library_checks_experiment_ids_too(tmp_path):
    from nni_effbert.nas.records import read_nni_trials
    from nni_effbert.nas.supernets import experiment_key
    from nni_effbert.workdir import WorkDir, check_experiment_id

    for bad in ("../x", "a/b", "..", ".hidden", "-rf", "", "a b", "x" * 65):
        with pytest.raises(ConfigError, match="experiment id"):
            check_experiment_id(bad)
    with pytest.raises(ConfigError, match="experiment id"):
        read_nni_trials("../../outside", experiments_dir=tmp_path)
    with pytest.raises(ConfigError, match="experiment id"):
        WorkDir(tmp_path).supernet_checkpoint(0, "../other")
    with pytest.raises(ConfigError, match="experiment id"):
        experiment_key("../x")
    assert check_experiment_id("kz7m01yh") == "kz7m01yh" and experiment_key("run_2-b") == "run_2-b"


@pytest.mark.parametrize("root", ["/", "/usr", "/etc", "/tmp", "/var/", "/usr/../etc", "HOME"])
def test_system_folder_as_workdir_is_refused(root, capsys):
    root = str(Path.home()) if root == "HOME" else root
    rc = cli.main(["export", "-q", "-c", TINY, f"--set=workdir={root}", "--pareto", "--experiment", "abc123xy"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "workdir:" in line and ("system folder" in line or "home folder" in line) and "runs/sst2" in line


def test_workdir_with_a_hash_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    """The issue's ``workdir: 'runs/w;touch INJECTED;#'``: NNI 3.0's channel loses trial results
    at a ``#`` in their paths, so the search is refused at once, with one line."""
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["search", "-q", "-c", TINY, "--set=workdir='runs/w;touch INJECTED;#'", "--wait"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "search")
    assert "contains '#'" in line
    assert not list(tmp_path.rglob("*INJECTED*"))


def test_ordinary_workdirs_are_accepted(tmp_path):
    from nni_effbert.workdir import WorkDir, check_workdir_root

    for ok in (tmp_path / "w", Path.home() / "runs" / "sst2", Path("/tmp/x/y")):
        assert check_workdir_root(ok) == ok
    assert WorkDir.of(str(tmp_path / "w")).root == tmp_path / "w"


# -- items 1, 2, 4 through a real nnictl search -------------------------------------------------


@pytest.mark.integration
def test_search_on_a_hostile_workdir_runs_its_trials_and_nothing_else(tmp_path, base_teacher, glue_dir):
    """``nni-effbert search --wait`` (real NNI manager, real trials) on a work directory named
    ``w x;touch INJECTED;$(touch INJECTED)`` with a ``yaml.py`` planted in its trial code directory: every trial
    succeeds, no ``INJECTED`` file appears, the planted module never runs, and the search warns
    about the open web UI with the SSH-tunnel command."""
    from nni_effbert.nas.records import read_nni_trials

    work = tmp_path / "runs" / HOSTILE
    sets = [f"--set=workdir='{work}'", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=64", "--set=task.max_dev_rows=32", "--set=evaluator.train_steps=1",
            "--set=evaluator.latency_repeats=1", "--set=search.trial_concurrency=1",
            "--set=search.stages=[{name: only, kind: joint, trials: 2, warmup_steps: 1}]"]
    env = _user_env(tmp_path)
    teacher = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "teacher", "-q", "-c", TINY, *sets],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    (work / "nnictl").mkdir(parents=True, exist_ok=True)
    (work / "nnictl" / "yaml.py").write_text(PLANTED_YAML)
    search = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", TINY, *sets,
                             "--wait", "--timeout", "900"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=1000)
    text = search.stdout + search.stderr
    found = re.search(r"experiment (\w+) started: web UI http://localhost:(\d+)", text)
    try:
        assert not list(tmp_path.rglob("INJECTED")), "the work-directory path ran a shell command"
        assert not list(tmp_path.rglob("PLANTED_MODULE_RAN")), "a trial imported yaml.py from its code directory"
        assert search.returncode == 0 and found, text[-4000:]
        exp_id, port = found.group(1), found.group(2)
        assert f"experiment {exp_id}: DONE" in search.stdout
        warning = [line for line in search.stderr.splitlines() if "no authentication" in line]
        assert len(warning) == 1 and f"ssh -L {port}:localhost:{port}" in warning[0], search.stderr[-2000:]
        trials = read_nni_trials(exp_id, experiments_dir=work / "nni-experiments")
        assert len(trials) == 3 and all(t["status"] == "SUCCEEDED" for t in trials), trials
    finally:
        if found:
            subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "experiment", "delete", found.group(1)],
                           env=env, input="y\n", capture_output=True, text=True, timeout=120)


# -- item 9: every documented command on a quickstart work directory -----------------------------


@pytest.mark.integration
def test_documented_commands_run_on_a_smoke_quickstart_workdir(smoke_workdir, capsys):
    """The README's step-by-step (teacher, export, distill, report), ``fidelity``, ``export
    --pareto`` and ``trial --arch --experiment``, each as documented with ``-c
    <workdir>/config.yml`` and the quickstart's experiment id."""
    w = smoke_workdir
    c, exp = ["-c", str(w.config)], w.experiment
    assert (w.root / "supernet" / exp).is_dir() and not (w.root / "supernet" / "stage0.pt").exists()

    def run(*argv):
        rc = cli.main([argv[0], "-q", *c, *argv[1:]])
        out = capsys.readouterr()
        assert rc == 0, f"nni-effbert {' '.join(argv)} exited {rc}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
        return out.out

    # README step by step (the search is the quickstart's; this export gets a name of its own).
    assert "dev" in run("teacher")
    folder = Path(run("export", "--experiment", exp, "--name", "readme-steps").strip().splitlines()[-1])
    assert folder == w.root / "exports" / "readme-steps" and (folder / "config.json").is_file()
    run("distill", "--export", str(folder))
    assert "distill" in json.loads((folder / "export_meta.json").read_text())["extra"]
    assert "| teacher" in run("report", "--experiment", exp)
    assert (w.root / "reports" / "report.md").is_file()
    # fidelity, as documented (it read supernet/stage0.pt and failed).
    run("fidelity", "--experiment", exp, "--sample", "2", "--steps", "2")
    # export --pareto
    assert f"Pareto front of experiment {exp}" in run("export", "--experiment", exp, "--pareto")
    # trial --arch --experiment, with the exported arch.
    out = run("trial", "--arch", str(folder / "arch.json"), "--experiment", exp, "--train-steps", "0")
    assert isinstance(json.loads(out.strip().splitlines()[-1])["default"], float)
    # An id that is a path, on this work directory: one line, exit 2, nothing read.
    rc = cli.main(["export", "-q", *c, "--pareto", "--experiment", f"../../{exp}"])
    assert rc == 2 and "experiment id" in _one_error_line(capsys.readouterr().err, "export")


def test_python_search_gives_nni_safe_path_and_warns_about_the_web_ui(tmp_path, glue_dir, monkeypatch, capsys,
                                                                       caplog):
    """``nni-effbert search --python``: the NNI manager (and so every trial it starts in this
    working directory) is started with ``PYTHONSAFEPATH=1``, restored afterwards, and the open
    web UI is warned about. NNI, the evaluator and the strategy are stand-ins here; the real
    manager inherits ``os.environ`` (``nni/experiment/launcher.py``: ``Popen`` without ``env``)."""
    from nni_effbert.nas import python_search

    seen = {}

    class FakeExperiment:
        def __init__(self, *args, id=None, **kwargs):
            self.id = "pyexp123"

        def run(self, port):
            seen["env"] = os.environ.get("PYTHONSAFEPATH")
            return True

        def stop(self):
            pass

    class FakeEvaluator:
        def __init__(self, *args, **kwargs):
            self.space, self.experiment = object(), None

        def warmup(self, *args, **kwargs):
            pass

        def as_nni_evaluator(self):
            return None

    class FakeStrategy:
        search = None

        def __init__(self, *args, **kwargs):
            pass

    work = tmp_path / "w"
    (work / "teacher").mkdir(parents=True)
    (work / "teacher" / "effbert_teacher.json").write_text("{}")
    monkeypatch.setattr(python_search, "KDEvaluator", FakeEvaluator)
    monkeypatch.setattr(python_search, "ProgressiveStrategy", FakeStrategy)
    monkeypatch.setattr(python_search, "search_latency", lambda *a, **k: (None, None))
    monkeypatch.setattr(python_search, "_nas_experiment_class", lambda: FakeExperiment)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    caplog.set_level("WARNING")
    rc = cli.main(["search", "-q", "-c", TINY, f"--set=workdir={work}", f"--set=teacher.model={tmp_path}",
                   f"--set=task.data_dir={glue_dir}", "--python", "--port", "18765"])
    assert rc == 1  # the stand-in strategy scored nothing
    assert seen["env"] == "1" and "PYTHONSAFEPATH" not in os.environ
    warnings = [r.getMessage() for r in caplog.records if "no authentication" in r.getMessage()]
    assert len(warnings) == 1 and "ssh -L 18765:localhost:18765" in warnings[0]


def test_nnictl_search_gives_nni_safe_path_and_warns_about_the_web_ui(tmp_path, glue_dir, monkeypatch, capsys,
                                                                       caplog):
    """``nni-effbert search`` (nnictl path, not waited for): ``nnictl create`` (whose NNI manager,
    dispatcher and trials inherit its environment) runs with ``PYTHONSAFEPATH=1``, and the open
    web UI is warned about with the SSH-tunnel command. nnictl itself is a stand-in here."""
    from nni_effbert.nas import nnictl_search

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs.get("env") or {}))
        return subprocess.CompletedProcess(cmd, 0, stdout='Run "nnictl stop abcd1234" to stop it', stderr="")

    work = tmp_path / "w"
    (work / "teacher").mkdir(parents=True)
    (work / "teacher" / "effbert_teacher.json").write_text("{}")
    monkeypatch.setattr(nnictl_search.subprocess, "run", fake_run)
    monkeypatch.setattr(nnictl_search, "register_tuner", lambda: {"builtinName": "EfficientBertProgressive"})
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    caplog.set_level("WARNING")
    rc = cli.main(["search", "-q", "-c", TINY, f"--set=workdir={work}", f"--set=teacher.model={tmp_path}",
                   f"--set=task.data_dir={glue_dir}", "--port", "18766"])
    assert rc == 0 and "experiment abcd1234 started" in capsys.readouterr().out
    create = [env for cmd, env in calls if "create" in cmd]
    assert len(create) == 1 and create[0].get("PYTHONSAFEPATH") == "1"
    warnings = [r.getMessage() for r in caplog.records if "no authentication" in r.getMessage()]
    assert len(warnings) == 1 and "ssh -L 18766:localhost:18766" in warnings[0]
    from nni_effbert import search_lock

    search_lock.release_experiment(nnictl_search.WorkDir(work), "abcd1234")
