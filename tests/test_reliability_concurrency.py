"""Concurrency and no loss of data through the real entry points.

* Three first trials (``python -m nni_effbert.trial --arch``, separate processes started
  together) against an empty teacher-output cache: the cache is built exactly once (by one of
  them, the others wait on its lock), its files are intact, and all three read the same values
  (same arch and seed -> identical KD loss and score). ``tests/test_teacher_cache.py`` checks the
  same at the :class:`TeacherCache` level; this goes through data loading, the teacher, the
  supernet checkpoint and the evaluator, as nnictl trials do.
* A warm-up (``nni-effbert warmup``) SIGKILLed while it writes its supernet checkpoint leaves
  the previous complete checkpoint, which still loads.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from support.reliability import REPO, prepare_work, trial_env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_file, glue_dir):
    return prepare_work(tmp_path_factory.mktemp("concurrency"), tiny_vocab_file, glue_dir)


def test_three_concurrent_first_trials_build_the_cache_once(prepared, tmp_path):
    from nni_effbert.search_spaces import EfficientBertSpace

    cache = prepared["work"] / "cache"
    shutil.rmtree(cache)  # empty cache: the first trials must build it
    arch = EfficientBertSpace.preset("tiny").bert_arch()
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    cmd = [sys.executable, "-m", "nni_effbert.trial", "-q", "-c", str(prepared["exp"]), "--arch",
           str(tmp_path / "arch.json")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=trial_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    for pid, out, err, rc in outs:
        assert rc == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _, _ in outs]
    # One cache per split (train, and the search split candidates are scored on), each built once.
    folders = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: not p.name.startswith("train-"))
    assert [p.name.split("-")[0] for p in folders] == ["train", "search"], sorted(p.name for p in cache.iterdir())
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["built_by"]["pid"] in {pid for pid, *_ in outs}
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    from nni_effbert.kd.cache import TeacherCache

    import numpy as np

    full = TeacherCache(folders[0])  # opens and validates shapes: the files are complete
    assert np.isfinite(np.asarray(full.logits, dtype=np.float32)).all()
    for r in results[1:]:
        assert (r["kd_loss"], r["default"]) == (results[0]["kd_loss"], results[0]["default"])


WARMUP_KILLED_IN_SAVE = r'''
import sys, torch
import nni_effbert.io as io
import nni_effbert.nas.supernets as supernets
import nni_effbert.nas.warmup as warmup

real_save = warmup.atomic_save_torch


def half_then_block(obj, path):
    if not str(path).endswith("stage0.pt"):
        return real_save(obj, path)  # the warm-up's resume state: written as usual
    with io.atomic_write(path, "wb") as f:  # the real atomic path, stopped half-way
        torch.save(obj, f)
        f.truncate(f.tell() // 2)
        f.flush()
        print("partial", flush=True)
        sys.stdin.read()  # the parent SIGKILLs us here


warmup.atomic_save_torch = half_then_block  # the warm-up's resume state
supernets.atomic_save_torch = half_then_block  # the stage checkpoint (nas.supernets writes it)
from nni_effbert import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def test_warmup_killed_while_saving_keeps_the_old_checkpoint(prepared, tmp_path):
    from nni_effbert.io import load_torch

    ckpt = prepared["work"] / "supernet" / "stage0.pt"
    before = ckpt.read_bytes()
    (tmp_path / "killer.py").write_text(WARMUP_KILLED_IN_SAVE)
    # --force: the warm-up really trains again and rewrites stage0.pt.
    proc = subprocess.Popen([sys.executable, str(tmp_path / "killer.py"), "warmup", "-q", "-c", str(prepared["exp"]),
                             "--stage", "0", "--force"], cwd=REPO, env=trial_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "partial", proc.stderr.read()[-3000:] if proc.poll() is not None else line
        temps = [p for p in ckpt.parent.iterdir() if p.name.startswith(".stage0.pt.")]
        assert len(temps) == 1 and temps[0].stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.read_bytes() == before  # the old complete checkpoint, untouched
    assert isinstance(load_torch(ckpt, "stage 0 supernet"), dict)
