"""Atomic writes and checkpoint reads (issue 6, item 6: no loss of data)."""
import argparse
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nni_effbert import io
from nni_effbert.errors import CheckpointError


def _tmp_leftovers(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_atomic_save_and_load_roundtrip(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    io.atomic_save_torch({"w": torch.arange(5.0), "step": 3}, path)
    obj = io.load_torch(path, "test checkpoint")
    assert obj["step"] == 3 and torch.equal(obj["w"], torch.arange(5.0))
    assert _tmp_leftovers(path.parent) == []
    assert (path.stat().st_mode & 0o777) == 0o644


def test_exception_inside_block_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "a.json"
    io.atomic_write_json({"v": 1}, path)
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_write(path, "w") as f:
            f.write('{"v": 2, "trunc')
            raise RuntimeError("boom")
    assert io.load_json(path, "marker") == {"v": 1}
    assert _tmp_leftovers(tmp_path) == []


def test_unserialisable_json_does_not_touch_file(tmp_path):
    path = tmp_path / "a.json"
    io.atomic_write_json({"v": 1}, path)
    with pytest.raises(TypeError):
        io.atomic_write_json({"v": object()}, path)
    assert io.load_json(path, "marker") == {"v": 1}


def test_append_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="append"):
        with io.atomic_write(tmp_path / "x", "ab"):
            pass


WRITER = textwrap.dedent(
    """
    import sys, torch
    from nni_effbert.io import atomic_write
    path = sys.argv[1]
    payload = b"x" * (1 << 20)
    with atomic_write(path, "wb") as f:
        f.write(payload[: len(payload) // 2])  # half of the new content
        f.flush()
        print("partial", flush=True)
        sys.stdin.read()  # parent SIGKILLs us while we block here
        f.write(payload[len(payload) // 2 :])
    """
)


def test_sigkill_mid_write_leaves_old_complete_file(tmp_path):
    path = tmp_path / "state.pt"
    old = {"weights": torch.randn(64, 64), "step": 7}
    io.atomic_save_torch(old, path)
    before = path.read_bytes()

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "partial"
        # The partial write really happened: a temp file holds the half payload.
        leftovers = _tmp_leftovers(tmp_path)
        assert len(leftovers) == 1 and leftovers[0].stat().st_size == (1 << 19)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    loaded = io.load_torch(path, "state")
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], old["weights"])


def test_load_torch_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"supernet checkpoint not found.*nope\.pt.*warmup"):
        io.load_torch(tmp_path / "nope.pt", "supernet checkpoint", hint="run warmup first")


def test_load_torch_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    io.atomic_save_torch({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is truncated or corrupt"):
        io.load_torch(path, "supernet checkpoint")


def test_load_torch_garbage_and_empty(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        io.load_torch(path, "checkpoint")
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        io.load_torch(path, "checkpoint")


def test_load_torch_refusal_of_pickled_objects_is_explained(tmp_path):
    path = tmp_path / "obj.pt"
    io.atomic_save_torch({"x": argparse.Namespace(a=1)}, path)  # not an allow-listed type
    with pytest.raises(CheckpointError, match=r"holds a pickled Python object \(argparse\.Namespace\)") as err:
        io.load_torch(path, "state")
    assert "weights_only" not in str(err.value)  # never advice to unpickle it anyway


def test_load_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        io.load_json(tmp_path / "m.json", "marker")
    (tmp_path / "m.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        io.load_json(tmp_path / "m.json", "marker")


def _fill(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_replace_dir(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io, "_rename_exchange", lambda a, b: False)
    final = tmp_path / "teacher"
    tmp = io.make_tmp_dir(final)
    _fill(tmp, "a.txt", "one")
    io.atomic_replace_dir(tmp, final)
    assert (final / "a.txt").read_text() == "one" and not tmp.exists()

    tmp2 = io.make_tmp_dir(final)
    _fill(tmp2, "b.txt", "two")
    io.atomic_replace_dir(tmp2, final)
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


def test_replace_dir_recovers_from_crash_between_renames(tmp_path):
    final = tmp_path / "teacher"
    # State left by a crash after "final -> .old" and before "tmp -> final".
    _fill(tmp_path / ".teacher.old-123", "a.txt", "old")
    new = io.make_tmp_dir(final)
    _fill(new, "b.txt", "new")
    io._recover_dir(final)
    assert (final / "a.txt").read_text() == "old"
    io.atomic_replace_dir(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
    assert (final / "b.txt").read_text() == "new"
