"""Disk full (ENOSPC) while writing: the supernet checkpoint, the teacher-output cache, the export
folder and a trial's ``result.json`` (issue 18).

Each test mounts a small tmpfs exactly where the writer writes (we run as root; skipped only
where mounting is impossible) and checks that the write fails cleanly: the previous file stays
intact, no temporary file or folder is left behind, and the trial is FAILED (exit status 1)
with ``trial failed: disk full while writing <path>`` (``export``, not a trial: exit 2 with
``disk full while writing <path>`` on one line).
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess

import pytest

from support.reliability import prepare_work, tree_digest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_file, glue_dir):
    return prepare_work(tmp_path_factory.mktemp("diskfull"), tiny_vocab_file, glue_dir)


@pytest.fixture
def tmpfs():
    """``mount(folder, kib)``: a tmpfs of ``kib`` KiB at ``folder`` (unmounted at teardown)."""
    mounted = []

    def mount(folder, kib):
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(kib)}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # busy: detach it anyway


def _fill(folder):
    """Take every free block of the file system of ``folder``."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _cli(capsys, *argv):
    from nni_effbert import cli

    capsys.readouterr()
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def _hidden(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def _arch_file(tmp_path, **meta):
    from nni_effbert.search_spaces import EfficientBertSpace

    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**EfficientBertSpace.preset("tiny").bert_arch(), **meta}))
    return path


def test_supernet_checkpoint_on_a_full_disk(prepared, tmp_path, tmpfs, capsys):
    exp, work = str(prepared["exp"]), prepared["work"]
    rc, _, err = _cli(capsys, "warmup", "-q", "-c", exp, "--stage", "0", "--experiment", "full1")
    assert rc == 0, err
    folder = work / "supernet" / "full1"
    saved = (folder / "stage0.pt").read_bytes()
    shutil.rmtree(folder)
    tmpfs(folder, (len(saved) * 3 // 2) // 1024 + 8)  # room for the old checkpoint, not for a new one
    (folder / "stage0.pt").write_bytes(saved)
    # The warm-up trial of another plan (more steps) must write a new checkpoint: the disk is full.
    (tmp_path / "w.json").write_text(json.dumps({"_warmup_stage": 0, "_warmup_steps": 3}))
    rc, _, err = _cli(capsys, "trial", "-q", "-c", exp, "--arch", str(tmp_path / "w.json"), "--experiment", "full1")
    assert rc == 1, err
    assert err[-1] == f"trial failed: disk full while writing {folder / 'stage0.pt'}; free some space (or move the " \
                      "work directory) and run it again", err
    assert (folder / "stage0.pt").read_bytes() == saved  # the previous checkpoint, intact
    assert [p for p in _hidden(folder) if p.endswith(".tmp")] == []  # no temporary file left


def test_teacher_cache_on_a_full_disk(prepared, tmp_path, tmpfs, capsys, monkeypatch):
    exp, work = str(prepared["exp"]), prepared["work"]
    arch = _arch_file(tmp_path, _stage=0)  # a KD step needs the teacher's outputs: the cache
    cache = tmpfs(work / "cache", 64)  # hides the built cache: the trial has to build it again
    (cache / "older").mkdir()
    (cache / "older" / "meta.json").write_text('{"an": "older cache"}')
    before = tree_digest(cache)

    def unchanged():  # the builders' lock files (empty, kept by filelock) aside
        return {k: v for k, v in tree_digest(cache).items() if not k.endswith(".lock")} == before

    # 1. The up-front free-space check.
    rc, _, err = _cli(capsys, "trial", "-q", "-c", exp, "--arch", str(arch), "--train-steps", "1")
    assert rc == 1 and err[-1].startswith(f"trial failed: disk full while writing {cache}/"), err
    assert unchanged() and _hidden(cache) == []
    # 2. A disk that fills while the cache is written (the check passed: another process took the
    #    space meanwhile): the memmaps are reserved up front, so it is ENOSPC, not a SIGBUS.
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    rc, _, err = _cli(capsys, "trial", "-q", "-c", exp, "--arch", str(arch), "--train-steps", "1")
    assert rc == 1 and err[-1].startswith(f"trial failed: disk full while writing {cache}/"), err
    assert unchanged() and _hidden(cache) == []


def test_export_folder_on_a_full_disk(prepared, tmp_path, tmpfs, capsys):
    exp, work = str(prepared["exp"]), prepared["work"]
    arch = _arch_file(tmp_path)
    rc, out, err = _cli(capsys, "export", "-q", "-c", exp, "--arch", str(arch), "--name", "probe")
    assert rc == 0, err
    size = sum(p.stat().st_size for p in (work / "exports" / "probe").rglob("*") if p.is_file())
    exports = tmpfs(work / "exports", (size * 3 // 2) // 1024 + 64)
    rc, _, err = _cli(capsys, "export", "-q", "-c", exp, "--arch", str(arch), "--name", "searched")
    assert rc == 0, err  # the first export fits
    before = tree_digest(exports)
    data = json.loads(arch.read_text())
    data["layer0_stack"] = 2
    arch.write_text(json.dumps(data))
    rc, _, err = _cli(capsys, "export", "-q", "-c", exp, "--arch", str(arch), "--name", "searched", "--force")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"nni-effbert export: error: disk full while writing {exports / 'searched'}"), err
    assert tree_digest(exports) == before and _hidden(exports) == []  # old export intact, no temp folder


def test_result_json_on_a_full_disk(prepared, tmp_path, tmpfs, capsys):
    from nni_effbert.config import load_config
    from nni_effbert.errors import DiskFullError
    from nni_effbert.nas.kd_evaluator import KDEvaluator

    exp, work = str(prepared["exp"]), prepared["work"]
    trials = tmpfs(work / "trials", 64)
    (trials / "t1").mkdir()
    (trials / "t1" / "result.json").write_text('{"status": "succeeded", "result": {"default": 0.5}}\n')
    _fill(trials)
    before = tree_digest(trials)
    ev = KDEvaluator(load_config(exp), report=False, progress=False, latency=False)
    with pytest.raises(DiskFullError, match=f"^disk full while writing {trials / 't1' / 'result.json'}"):
        ev.evaluate(ev.space.bert_arch(), train_steps=0, trial_id="t1")
    assert tree_digest(trials) == before and _hidden(trials) == []
    # Through the trial entry: FAILED with the reason (nothing reported).
    rc, out, err = _cli(capsys, "trial", "-q", "-c", exp, "--arch", str(_arch_file(tmp_path)), "--train-steps", "0")
    assert rc == 1 and out == "", (out, err)
    assert err[-1].startswith(f"trial failed: disk full while writing {trials}/"), err
    assert err[-1].split(";")[0].endswith("result.json"), err
    assert (trials / "t1" / "result.json").read_text().startswith('{"status": "succeeded"')
    assert [p for p in _hidden(trials) if p.endswith(".tmp")] == []
