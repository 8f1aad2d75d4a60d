"""Export to plain transformers: folder layout, round trips, and loading where nni is blocked."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import nni_effbert.search_spaces
from nni_effbert.product import export as export_mod
from nni_effbert.errors import CheckpointError, ConfigError, EffBertError
from nni_effbert.product.export import export_student
from nni_effbert.product.loader import ARCHITECTURE_FILE, ARCH_FILE, META_FILE, WEIGHTS_FILE, load_exported
from nni_effbert.search_spaces import EfficientBertSpace

TEXTS = ["the movie is good", "a bad , bad film", "it was not what i expected at all !"]
PAIR_EXPRESSIONS = ["tanh(linear2(gelu(linear1(x))))", "linear2(relu(mul(linear1(x),x)))"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    """The shared tiny WordPiece tokenizer, checked to really carry its vocab."""
    assert tiny_tokenizer("the movie")["input_ids"][1] != tiny_tokenizer.unk_token_id
    return tiny_tokenizer


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    s = EfficientBertSpace.preset("tiny")
    # Non-trivial weights everywhere (LayerNorms and biases are 1 / 0 after init).
    with torch.no_grad():
        for p in s.supernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return s


@pytest.fixture(scope="module")
def arch(space):
    layers = [{"expression": e, "width": w, "stack": st}
              for e, w, st in zip(PAIR_EXPRESSIONS, (space.config.widths[1], space.config.widths[0]), (2, 1))]
    return space.arch_from_layers(layers)


def _student_logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], return_kd=False).logits


# --------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------

def test_folder_layout_and_round_trips(tmp_path, space, arch, tokenizer):
    out = export_student(space, arch, space, tmp_path / "exp", tokenizer=tokenizer,
                         label_names=["negative", "positive"], extra_meta={"dev_accuracy": 0.5})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", WEIGHTS_FILE, ARCH_FILE, ARCHITECTURE_FILE, META_FILE, "modeling.py", "ops.py",
            "configuration_effbert.py", "modeling_effbert_hf.py", "tokenizer_config.json"} <= names
    # No temporary folder left beside the export.
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]

    # The pure-torch student files are verbatim copies: the model code exists once.
    src = Path(nni_effbert.search_spaces.__file__).resolve().parent
    for name in ("modeling.py", "ops.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes()

    assert json.loads((out / ARCH_FILE).read_text()) == arch
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nni_effbert"
    assert config["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_effbert_hf.EfficientBertForSequenceClassification"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["arch"] == arch
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == space.config.max_position_embeddings

    meta = json.loads((out / META_FILE).read_text())
    assert meta["params"] == space.count_params(arch)
    assert meta["non_embedding_params"] == space.count_params(arch, exclude_embeddings=True)
    assert meta["extra"] == {"dev_accuracy": 0.5}

    loaded = load_exported(out)
    assert loaded.arch == arch
    assert loaded.id2label == {0: "negative", 1: "positive"}
    assert loaded.config == space.config
    expected = space.subnet(arch).state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_architecture_md_lists_layers_and_counts(tmp_path, space, arch):
    out = export_student(space.config, arch, space.subnet(arch), tmp_path / "exp", verify=False)
    text = (out / ARCHITECTURE_FILE).read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == space.config.num_hidden_layers
    described = space.describe(arch)
    student = space.subnet(arch)
    for i, (row, info) in enumerate(zip(rows, described)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [str(i), f"`{info['expression']}`", str(info["width"]), str(info["stack"]),
                         f"{sum(p.numel() for p in student.layers[i].parameters()):,}"]
    assert [d["expression"] for d in described] == PAIR_EXPRESSIONS

    def count(label):
        return int(re.search(rf"{label}: ([\d,]+)", text).group(1).replace(",", ""))

    assert count("Total parameters") == space.count_params(arch)
    assert count("Non-embedding parameters") == space.count_params(arch, exclude_embeddings=True)


def test_exported_model_from_trained_student(tmp_path, space, arch, tokenizer):
    student = space.subnet(arch)
    with torch.no_grad():
        student.classifier.bias.fill_(0.25)  # differs from the supernet: the student's weights win
    out = export_student(space.config.to_dict(), arch, student.state_dict(), tmp_path / "exp", tokenizer=tokenizer)
    loaded = load_exported(out)
    assert torch.equal(loaded.model.classifier.bias, student.classifier.bias)
    torch.testing.assert_close(_student_logits(loaded.model, tokenizer, TEXTS),
                               _student_logits(student, tokenizer, TEXTS), rtol=0, atol=0)
    assert loaded.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # no names given


def test_reexport_replaces_folder(tmp_path, space, arch, tokenizer, monkeypatch):
    out = tmp_path / "exp"
    export_student(space, arch, space, out, tokenizer=tokenizer, verify=False)
    prompts = []

    def no_prompt(*args):  # transformers asks before running remote code; we never want that
        prompts.append(args)
        raise EOFError

    monkeypatch.setattr("builtins.input", no_prompt)
    (out / "stale.txt").write_text("old")
    other = space.bert_arch(width=min(space.config.widths))
    export_student(space, other, space, out, tokenizer=str(out), verify=False)  # tokenizer from the old folder
    assert not prompts
    assert not (out / "stale.txt").exists()
    assert load_exported(out).arch == other
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_failed_verification_publishes_nothing(tmp_path, space, arch, monkeypatch):
    out = tmp_path / "exp"
    export_student(space, arch, space, out, verify=False)
    before = (out / WEIGHTS_FILE).read_bytes()
    real = export_mod._write_weights

    def corrupt(folder, student):
        with torch.no_grad():
            student.classifier.bias.add_(1.0)  # weights on disk no longer match the student
        try:
            real(folder, student)
        finally:
            with torch.no_grad():
                student.classifier.bias.sub_(1.0)

    monkeypatch.setattr(export_mod, "_write_weights", corrupt)
    with pytest.raises(EffBertError, match="disagrees with the student"):
        export_student(space, arch, space, out)
    assert (out / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_bad_input_is_rejected(tmp_path, space, arch, tokenizer):
    out = tmp_path / "exp"
    with pytest.raises(ConfigError, match="num_labels=2"):
        export_student(space, arch, space, out, label_names=["a", "b", "c"], verify=False)
    with pytest.raises(ConfigError, match="distinct"):
        export_student(space, arch, space, out, label_names=["a", "a"], verify=False)
    bad_arch = dict(arch, layer0_width=7)
    with pytest.raises(ValueError, match="layer0_width"):
        export_student(space, bad_arch, space, out, verify=False)
    wrong = space.subnet(space.bert_arch()).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        export_student(space, arch, wrong, out, verify=False)
    with pytest.raises(ConfigError, match="another architecture"):
        export_student(space, arch, space.subnet(space.bert_arch()), out, verify=False)
    small = EfficientBertSpace.preset("tiny", vocab_size=len(tokenizer) - 1)
    with pytest.raises(ConfigError, match="vocab_size"):
        export_student(small, small.bert_arch(), small, out, tokenizer=tokenizer, verify=False)
    with pytest.raises(ConfigError, match="JSON"):
        export_student(space, arch, space, out, extra_meta={"x": object()}, verify=False)
    with pytest.raises(ConfigError, match="weights must be"):
        export_student(space, arch, 42, out, verify=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_load_exported_errors(tmp_path, space, arch):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_exported(tmp_path / "nope")
    out = export_student(space, arch, space, tmp_path / "exp", verify=False)
    (out / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors was changed after export"):
        load_exported(out)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_exported(out, verify=False)
    (out / ARCH_FILE).unlink()
    with pytest.raises(CheckpointError, match="arch.json"):
        load_exported(out, verify=False)


def test_remote_code_is_pure_torch():
    files = export_mod._remote_code_files()
    assert sorted(p.name for p in files) == ["modeling.py", "ops.py"]


# --------------------------------------------------------------------------------------------
# A fresh process where nni (and nni_effbert) cannot be imported
# --------------------------------------------------------------------------------------------

LOADER = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("nni", "nni_effbert"):
                raise ImportError(f"{name} is blocked: the export must load without nni")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import nni  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("nni import was not blocked")

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    folders, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    result = {}
    for folder in folders:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        enc = tok(texts, padding=True, return_tensors="pt")
        n = config.num_labels
        labels = torch.tensor([0.5, -1.0, 2.0]) if n == 1 else torch.tensor([0, 1, 1])
        with torch.no_grad():
            out = model(**enc, labels=labels)
        clf = pipeline("text-classification", model=folder, trust_remote_code=True, device="cpu")
        result[folder] = {
            "model_type": config.model_type,
            "config_class": type(config).__name__,
            "model_class": type(model).__name__,
            "logits": out.logits.tolist(),
            "loss": out.loss.item(),
            "labels": labels.tolist(),
            "pipeline": clf(texts, top_k=None),
            "pipeline_top": clf(texts),
            # The tokenizer's model_max_length is capped at the position table, so truncation works.
            "long": clf(" ".join(["good"] * 600), truncation=True),
        }
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("nni", "nni_effbert"))
    assert not leaked, leaked
    print("RESULT" + json.dumps(result))
    """
)


def test_loads_in_fresh_process_without_nni(tmp_path, space, arch, tokenizer):
    clf_dir = export_student(space, arch, space, tmp_path / "clf", tokenizer=tokenizer,
                             label_names=["negative", "positive"])
    reg_space = EfficientBertSpace.preset("tiny", num_labels=1)
    torch.manual_seed(1)
    reg_arch = reg_space.random_arch(np.random.RandomState(3))
    reg_dir = export_student(reg_space, reg_arch, reg_space, tmp_path / "reg", tokenizer=tokenizer)

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps([str(clf_dir), str(reg_dir)]), json.dumps(TEXTS)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Do you wish to run the custom code" not in proc.stdout  # every loader got trust_remote_code
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    # HF copied the relative imports (modeling.py, ops.py) into the tmp module cache, not ~/.cache.
    cached = {p.name for p in (tmp_path / "hf_modules").rglob("*.py")}
    assert {"modeling.py", "ops.py", "configuration_effbert.py", "modeling_effbert_hf.py"} <= cached

    # Classification: logits, loss and pipeline scores match the plugin-side student.
    r = result[str(clf_dir)]
    assert (r["model_type"], r["config_class"], r["model_class"]) == \
        ("nni_effbert", "EfficientBertHFConfig", "EfficientBertForSequenceClassification")
    want = _student_logits(load_exported(clf_dir).model, tokenizer, TEXTS)
    torch.testing.assert_close(torch.tensor(r["logits"]), want, rtol=0, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(want, torch.tensor(r["labels"], dtype=torch.long))
    assert r["loss"] == pytest.approx(loss.item(), abs=1e-5)
    probs = want.softmax(-1)
    for i, scores in enumerate(r["pipeline"]):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == {"negative", "positive"}
        assert by_label["negative"] == pytest.approx(probs[i, 0].item(), abs=1e-5)
        assert by_label["positive"] == pytest.approx(probs[i, 1].item(), abs=1e-5)
        assert r["pipeline_top"][i]["label"] == ["negative", "positive"][int(probs[i].argmax())]

    assert r["long"][0]["label"] in ("negative", "positive")

    # Regression: one output, MSE loss, the pipeline returns the raw score.
    r = result[str(reg_dir)]
    want = _student_logits(load_exported(reg_dir).model, tokenizer, TEXTS)
    torch.testing.assert_close(torch.tensor(r["logits"]), want, rtol=0, atol=1e-5)
    mse = torch.nn.functional.mse_loss(want.squeeze(-1), torch.tensor(r["labels"]))
    assert r["loss"] == pytest.approx(mse.item(), abs=1e-5)
    for i, top in enumerate(r["pipeline_top"]):
        assert top["label"] == "score"
        assert top["score"] == pytest.approx(want[i, 0].item(), abs=1e-5)
