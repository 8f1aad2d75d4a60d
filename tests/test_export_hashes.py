"""Export folders record the sha256 of their files; ``nni-effbert verify-export`` and every reader
(``load_exported``: distill, report, fidelity) refuse a folder whose code, weights or config changed.

``trust_remote_code=True`` imports the folder's ``*.py`` files, so a changed file is code run in the
user's process. These tests build a tiny export in-process (no teacher) and tamper with copies of it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from nni_effbert import cli
from nni_effbert.errors import CheckpointError
from nni_effbert.product.export import export_student
from nni_effbert.product.loader import (ARCH_FILE, CONFIG_FILE, ExportIntegrityError, HASHES_KEY, META_FILE, README_FILE, WEIGHTS_FILE, load_exported, verify_export)
from nni_effbert.search_spaces import EfficientBertSpace

CODE = ("configuration_effbert.py", "modeling_effbert_hf.py", "modeling.py", "ops.py")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny export whose layer 0 uses BERT's gelu MLP (so a relu in config.json is a real change)."""
    torch.manual_seed(0)
    space = EfficientBertSpace.preset("tiny")
    arch = space.bert_arch(width=space.config.widths[0], stack=1)
    assert arch["layer0_mid_act"] == "gelu"
    return export_student(space, arch, space, tmp_path_factory.mktemp("exp") / "searched")


@pytest.fixture
def folder(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    return copy


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify_cli(folder, capsys):
    capsys.readouterr()
    code = cli.main(["verify-export", str(folder)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def _meta(folder: Path) -> dict:
    return json.loads((folder / META_FILE).read_text())


def test_meta_records_sha256_of_code_weights_and_config(exported, capsys):
    hashes = _meta(exported)[HASHES_KEY]
    for name in (*CODE, WEIGHTS_FILE, CONFIG_FILE, ARCH_FILE, README_FILE):
        assert hashes[name] == _sha(exported / name), name
    # every file but the meta itself, nothing else
    assert set(hashes) == {p.name for p in exported.iterdir() if p.name != META_FILE}
    assert verify_export(exported) == hashes
    code, out, err = _verify_cli(exported, capsys)
    assert code == 0 and err == "" and "OK" in out and "modeling.py" in out
    # the model card and architecture.md say what trust_remote_code runs and how to check it
    card = (exported / README_FILE).read_text()
    assert "trust_remote_code=True" in card and "nni-effbert verify-export" in card and "sha256sum" in card
    assert "nni-effbert verify-export" in (exported / "architecture.md").read_text()


@pytest.mark.parametrize("name", ["modeling.py", "modeling_effbert_hf.py", WEIGHTS_FILE, CONFIG_FILE])
def test_changed_code_weights_or_config_are_refused(folder, name, capsys):
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data + (b"\nimport os; os.system('touch PWNED')\n" if name.endswith(".py") else b" "))
    code, out, err = _verify_cli(folder, capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and f"{name} was changed after export" in err and "re-export" in err, err
    with pytest.raises(ExportIntegrityError, match=name):
        load_exported(folder)


def test_planted_python_file_is_refused(folder, capsys):
    (folder / "tokenization_evil.py").write_text("import os\n")
    code, _, err = _verify_cli(folder, capsys)
    assert code == 2 and "tokenization_evil.py" in err and "not exported" in err


def test_config_arch_relu_where_arch_json_says_gelu_is_refused(folder, capsys):
    """Also when the attacker updates the recorded hash: config.json must describe arch.json's model."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["arch"]["layer0_mid_act"] = "relu"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    code, _, err = _verify_cli(folder, capsys)
    assert code == 2 and "config.json was changed after export" in err
    meta = _meta(folder)
    meta[HASHES_KEY][CONFIG_FILE] = _sha(folder / CONFIG_FILE)
    (folder / META_FILE).write_text(json.dumps(meta))
    code, _, err = _verify_cli(folder, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "config.json disagrees with arch.json: layer0_mid_act is 'relu' there but 'gelu'" in err, err
    with pytest.raises(ExportIntegrityError, match="layer0_mid_act"):
        load_exported(folder)
    with pytest.raises(ExportIntegrityError, match="layer0_mid_act"):
        load_exported(folder, verify=False)  # the plugin never loads another model than arch.json's


def test_export_from_an_older_version_gives_one_line(folder, capsys):
    meta = _meta(folder)
    del meta[HASHES_KEY]
    (folder / META_FILE).write_text(json.dumps(meta))
    code, _, err = _verify_cli(folder, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "did not record file hashes" in err and "re-export" in err
    with pytest.raises(CheckpointError, match="did not record file hashes"):
        load_exported(folder)
    code, _, err = _verify_cli(folder / "nothing", capsys)
    assert code == 2 and "does not exist" in err


def test_distill_rewrites_the_hashes(folder):
    """A re-export into the folder (what distill does with new weights) records the new hashes."""
    exported = load_exported(folder)
    before = _meta(folder)[HASHES_KEY]
    with torch.no_grad():
        for p in exported.model.parameters():
            p.add_(0.01)
    export_student(exported.config, exported.arch, exported.model, folder,
                   extra_meta={**exported.meta["extra"], "distill": {"plan": {}, "created": "now"}})
    after = _meta(folder)[HASHES_KEY]
    assert after[WEIGHTS_FILE] != before[WEIGHTS_FILE] and after[WEIGHTS_FILE] == _sha(folder / WEIGHTS_FILE)
    assert after["modeling.py"] == before["modeling.py"]
    verify_export(folder)
