"""Nothing lost across experiments (issue 18): supernets owned by their experiment, one live
search per work directory.

* Two experiments in one work directory: the second's warm-ups do not change the first's
  checkpoints (sha1 before and after), and exporting the first gives the first's logits.
* Every reader checks the owner: a checkpoint copied into another experiment's folder is
  refused; a missing one is a one-line error saying it is gone; an old-layout checkpoint (no
  owner) is read as before with a note, once.
* Inside a trial the key is ``$NNI_EXP_ID`` (the real trial entry, in a subprocess).
* A second search on a work directory whose search runs is refused at start (one line, exit 2);
  a stale lock (dead process, manager gone) is taken over with a log line; a real ``nnictl``
  search and a second ``nni-effbert search`` on the same work directory (integration).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from support.reliability import REPO, prepare_work, trial_env


def _sha1(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_file, glue_dir):
    return prepare_work(tmp_path_factory.mktemp("experiments"), tiny_vocab_file, glue_dir)


def _cli(*argv):
    from nni_effbert import cli

    return cli.main(list(argv))


def _logits(folder_or_space, arch=None):
    """Logits of an export folder (through transformers) or of ``space.subnet(arch)`` on fixed input."""
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    if arch is None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(folder_or_space), trust_remote_code=True)
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    sub = folder_or_space.subnet(arch).eval()
    with torch.no_grad():
        return sub(ids, mask).logits


def test_two_experiments_in_one_workdir_keep_their_supernets(prepared, tmp_path, capsys):
    from nni_effbert.config import load_config
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.supernets import load_supernet_checkpoint

    exp, work = str(prepared["exp"]), prepared["work"]
    # Experiment A warms up stage 0; B warms up stage 0 with other settings (as a second search of
    # the same work directory would, 3 s later, with an edited config).
    assert _cli("warmup", "-q", "-c", exp, "--stage", "0", "--experiment", "expA") == 0
    a_ckpt = work / "supernet" / "expA" / "stage0.pt"
    before = _sha1(a_ckpt)
    standalone = _sha1(work / "supernet" / "stage0.pt")
    assert _cli("warmup", "-q", "-c", exp, "--stage", "0", "--experiment", "expB", "--steps", "6",
                "--set", "warmup.learning_rate=0.002") == 0
    b_ckpt = work / "supernet" / "expB" / "stage0.pt"
    assert b_ckpt.is_file() and _sha1(b_ckpt) != before
    assert _sha1(a_ckpt) == before  # B's warm-up left A's checkpoint alone
    assert _sha1(work / "supernet" / "stage0.pt") == standalone
    assert torch.load(a_ckpt, weights_only=True)["owner"]["experiment"] == "expA"

    # Exporting A's arch with A's supernets gives A's logits, not B's.
    cfg = load_config(exp)
    space = KDSetup.from_config(cfg, progress=False).space
    arch = space.bert_arch()
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert _cli("export", "-q", "-c", exp, "--experiment", "expA", "--arch", str(tmp_path / "arch.json"),
                "--name", "a") == 0
    folder = work / "exports" / "a"
    meta = json.loads((folder / "export_meta.json").read_text())
    assert meta["extra"]["supernet_experiment"] == "expA"
    assert meta["extra"]["supernet_checkpoint"]["sha1"] == before
    exported = _logits(folder)
    load_supernet_checkpoint(space, a_ckpt, experiment="expA")
    a_logits = _logits(space, arch)
    load_supernet_checkpoint(space, b_ckpt, experiment="expB")
    b_logits = _logits(space, arch)
    assert torch.allclose(exported, a_logits, atol=1e-5)
    assert not torch.allclose(exported, b_logits, atol=1e-3)

    # A candidate of A scored twice, with B's warm-up in between: the same score.
    capsys.readouterr()
    assert _cli("trial", "-q", "-c", exp, "--arch", str(tmp_path / "arch.json"), "--experiment", "expA",
                "--train-steps", "0") == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _cli("warmup", "-q", "-c", exp, "--stage", "0", "--experiment", "expB", "--force") == 0
    assert _cli("trial", "-q", "-c", exp, "--arch", str(tmp_path / "arch.json"), "--experiment", "expA",
                "--train-steps", "0") == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["default"] == second["default"] and first["supernet"]["sha1"] == before
    assert first["supernet"]["owner"]["experiment"] == "expA"


def test_readers_check_the_owner_and_name_a_missing_supernet(prepared, tmp_path, capsys):
    exp, work = str(prepared["exp"]), prepared["work"]
    (tmp_path / "arch.json").write_text(json.dumps({"_stage": 0}))
    assert _cli("warmup", "-q", "-c", exp, "--stage", "0", "--experiment", "expOwn") == 0
    # A checkpoint moved into another experiment's folder is refused (it names its owner).
    (work / "supernet" / "expCopy").mkdir(parents=True)
    shutil.copy(work / "supernet" / "expOwn" / "stage0.pt", work / "supernet" / "expCopy" / "stage0.pt")
    from nni_effbert.search_spaces import EfficientBertSpace

    (tmp_path / "arch.json").write_text(json.dumps(EfficientBertSpace.preset("tiny").bert_arch()))
    cases = [
        ("expCopy", "belongs to experiment expOwn"),
        ("expGone", "experiment expGone has no supernet of stage 0"),
    ]
    (work / "supernet" / "expGone2").mkdir()
    cases.append(("expGone2", "experiment expGone2's supernet of stage 0 (coarse) is gone"))
    for key, needle in cases:
        capsys.readouterr()
        assert _cli("trial", "-q", "-c", exp, "--arch", str(tmp_path / "arch.json"), "--experiment", key,
                    "--train-steps", "0") == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    # export --experiment of an experiment whose supernets are gone: the same one-line error.
    assert _cli("export", "-q", "-c", exp, "--experiment", "expGone2", "--arch", str(tmp_path / "arch.json")) == 2
    assert "expGone2's supernet of stage 0 (coarse) is gone" in capsys.readouterr().err


def test_old_layout_checkpoint_is_read_with_a_one_time_note(prepared, tmp_path, capsys, caplog):
    from nni_effbert.config import load_config
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.io import atomic_save_torch

    exp, work = str(prepared["exp"]), prepared["work"]
    legacy = tmp_path / "legacy_work"
    shutil.copytree(work, legacy, ignore=shutil.ignore_patterns("supernet", "exports", "trials"))
    data = torch.load(work / "supernet" / "stage0.pt", weights_only=True)
    data.pop("owner")  # what this version's predecessors wrote
    atomic_save_torch(data, legacy / "supernet" / "stage0.pt")
    cfg = load_config(exp, [f"workdir={legacy}"])
    ev = KDEvaluator(cfg, report=False, progress=False, latency=False, experiment="oldexp1")
    caplog.set_level(logging.WARNING, logger="nni_effbert.nas.supernets")
    arch = ev.space.bert_arch()
    r1 = ev.evaluate(arch, train_steps=0, trial_id="a")
    ev2 = KDEvaluator(cfg, report=False, progress=False, latency=False, experiment="oldexp1", setup=ev.setup)
    r2 = ev2.evaluate(arch, train_steps=0, trial_id="b")
    notes = [r for r in caplog.records if "written before supernets were kept per experiment" in r.getMessage()]
    assert len(notes) == 1 and r1["default"] == r2["default"]
    assert r1["supernet"]["path"] == str(legacy / "supernet" / "stage0.pt") and r1["supernet"]["owner"] is None
    # Once the experiment has supernets of its own (it ran a warm-up since), the old file is not used.
    (legacy / "supernet" / "oldexp1").mkdir()
    ev3 = KDEvaluator(cfg, report=False, progress=False, latency=False, experiment="oldexp1", setup=ev.setup)
    with pytest.raises(Exception, match="is gone"):
        ev3.evaluate(arch, train_steps=0, trial_id="c")


def test_trial_inside_nni_uses_its_experiment_id(prepared, tmp_path):
    """The real trial entry with ``NNI_EXP_ID`` set (as NNI sets it): the warm-up trial writes
    ``supernet/<id>/stage0.pt`` with its trial id, and a candidate of that id inherits it."""
    exp, work = str(prepared["exp"]), prepared["work"]
    env = trial_env(NNI_EXP_ID="envExp1", NNI_TRIAL_JOB_ID="wUp01")
    (tmp_path / "w.json").write_text(json.dumps({"_warmup_stage": 0}))
    from nni_effbert.search_spaces import EfficientBertSpace

    (tmp_path / "c.json").write_text(json.dumps({**EfficientBertSpace.preset("tiny").bert_arch(), "_stage": 0}))
    for name in ("w.json", "c.json"):
        proc = subprocess.run([sys.executable, "-m", "nni_effbert.trial", "-q", "-c", exp, "--arch",
                               str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = work / "supernet" / "envExp1" / "stage0.pt"
    owner = torch.load(ckpt, weights_only=True)["owner"]
    assert owner["experiment"] == "envExp1" and owner["trial"] == "wUp01"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["supernet"]["path"] == str(ckpt) and result["supernet"]["sha1"] == _sha1(ckpt)


# ---------------------------------------------------------------------------------------------
# One live search per work directory
# ---------------------------------------------------------------------------------------------


class _FakeManager(http.server.BaseHTTPRequestHandler):
    """Answers NNI's REST API as a running experiment ``exp`` would."""

    experiment, status = "runExp1", "RUNNING"

    def do_GET(self):  # noqa: N802 - http.server's name
        body = {"/api/v1/nni/experiment": {"id": self.experiment},
                "/api/v1/nni/check-status": {"status": self.status},
                "/api/v1/nni/trial-jobs": []}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_manager():
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeManager)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _lock(work, **fields):
    import socket

    data = {"experiment": None, "port": None, "pid": os.getpid(), "host": socket.gethostname(),
            "kind": "advisor", "started": time.time(), **fields}
    (work / "search.lock").write_text(json.dumps(data))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_search_is_refused_and_a_stale_lock_taken_over(prepared, tmp_path, fake_manager, capsys, caplog):
    from nni_effbert import search_lock
    from nni_effbert.workdir import WorkDir

    exp = str(prepared["exp"])
    work = tmp_path / "w"
    work.mkdir()
    sets = [f"--set=workdir={work}"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # A live advisor (its process alive, its manager answering RUNNING): refused, one line, exit 2.
        _lock(work, experiment="runExp1", port=fake_manager, pid=sleeper.pid)
        for extra in ([], ["--python"]):
            capsys.readouterr()
            assert _cli("search", "-q", "-c", exp, *sets, *extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith("nni-effbert search: error: another search is running on work directory")
            assert f"experiment runExp1 on port {fake_manager}" in err[0] and "RUNNING" in err[0]
        assert not (work / "config.yml").exists()  # refused before anything was written
        # A --python search's process alive (no manager yet: warm-up in progress): refused too.
        _lock(work, experiment="pyExp1", port=None, pid=sleeper.pid, kind="python")
        with pytest.raises(search_lock.SearchRunningError, match="experiment pyExp1"):
            search_lock.acquire(WorkDir.of(work), kind="starting", port=1)
        # Sharing on purpose: nothing refused.
        assert search_lock.acquire(WorkDir.of(work), kind="starting", share=True) is None
    finally:
        sleeper.kill()
        sleeper.wait()

    caplog.set_level(logging.WARNING, logger="nni_effbert.search_lock")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # alive, not a search
    try:
        stale = [
            dict(experiment="deadExp1", port=fake_manager, pid=_dead_pid()),      # dispatcher died (nnictl stop)
            dict(experiment="otherExp", port=fake_manager, pid=other.pid),        # manager runs another experiment
            dict(experiment="goneExp1", port=1, pid=other.pid),                   # nothing answers at its port
            dict(experiment=None, port=None, pid=_dead_pid(), kind="starting"),   # a starter that died
            dict(experiment="pyGone1", port=None, pid=_dead_pid(), kind="python"),  # a --python search killed
        ]
        for fields in stale:
            _lock(work, **fields)
            caplog.clear()
            held = search_lock.acquire(WorkDir.of(work), kind="advisor", experiment="newExp1", port=2)
            assert held.experiment == "newExp1"
            assert json.loads((work / "search.lock").read_text())["experiment"] == "newExp1"
            lines = [r.getMessage() for r in caplog.records if "taking over the stale search lock" in r.getMessage()]
            assert len(lines) == 1, (fields, [r.getMessage() for r in caplog.records])
        # A finished experiment (DONE) holds nothing either.
        _FakeManager.status = "DONE"
        try:
            _lock(work, experiment="runExp1", port=fake_manager, pid=other.pid)
            search_lock.acquire(WorkDir.of(work), kind="python", port=3)
        finally:
            _FakeManager.status = "RUNNING"
    finally:
        other.kill()
        other.wait()
    # The advisor adopts the lock its own `nni-effbert search` took while starting (same port).
    _lock(work, experiment=None, port=4444, pid=os.getpid() + 100000, kind="starting")
    caplog.clear()
    search_lock.acquire(WorkDir.of(work), kind="advisor", experiment="mine1", port=4444)
    assert not [r for r in caplog.records if "stale" in r.getMessage()]


@pytest.mark.integration
def test_second_nnictl_search_on_a_running_workdir_is_refused(tmp_path, base_teacher, glue_dir):
    """A real ``nni-effbert search`` (nnictl, the advisor holding the lock) and, while it runs, a
    second one on the same work directory: exit 2, one line naming the first and its port. After
    ``nnictl stop`` the lock is stale and a new search takes it over."""
    from nni_effbert import search_lock
    from nni_effbert.workdir import WorkDir

    tiny = str(REPO / "examples" / "tiny" / "effbert.yml")
    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=evaluator.latency_repeats=1",
            "--set=search.stages=[{name: coarse, kind: joint, trials: 30, warmup_steps: 2}]"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), OMP_NUM_THREADS="1")

    def search(*extra):
        return subprocess.run([sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", tiny, *sets, *extra],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert _cli("teacher", "-q", "-c", tiny, *sets) == 0
    first = search()
    assert first.returncode == 0, first.stdout + first.stderr
    exp_id, port = re.search(r"experiment (\w+) started: web UI http://localhost:(\d+)", first.stdout).groups()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the advisor takes the lock over from the starter
            held = search_lock.read_holder(WorkDir.of(work))
            if held is not None and held.kind == "advisor":
                break
            time.sleep(1)  # poll period of a file the advisor writes once
        assert held is not None and held.kind == "advisor" and held.experiment == exp_id, held
        config_before = (work / "config.yml").read_text()
        second = search("--set=seed=5")
        assert second.returncode == 2, second.stdout + second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"experiment {exp_id} on port {port}" in err[0], err
        assert (work / "config.yml").read_text() == config_before  # the running search's config untouched
    finally:
        subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", "stop", exp_id], env=env,
                       capture_output=True, timeout=120)
    held = search_lock.read_holder(WorkDir.of(work))
    assert held is not None and held.experiment == exp_id  # the stopped dispatcher left it behind
    assert not search_lock.is_live(held)[0]
    search_lock.release(WorkDir.of(work), search_lock.acquire(WorkDir.of(work), kind="starting", port=9))
