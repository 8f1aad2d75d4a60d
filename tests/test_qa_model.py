"""The span (QA) head: supernet, subnets, parameter counts, and the exported
``AutoModelForQuestionAnswering`` with nni blocked (plus ``pipeline("question-answering")`` where the
installed transformers still has it: version 5 removed that pipeline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nni_effbert.product.export import export_student

from nni_effbert.product.loader import load_exported
from nni_effbert.search_spaces.space_config import EfficientBertConfig, preset_config
from nni_effbert.search_spaces.supernet import EfficientBertSupernet

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "where is the movie set ?"
CONTEXT = "the movie is set in a small town . it was not what i expected at all , but the film is good ."


@pytest.fixture(scope="module")
def span_space():
    torch.manual_seed(0)
    space = EfficientBertSupernet(preset_config("tiny", head="span"))
    with torch.no_grad():
        for p in space.supernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return space


def test_span_head_shapes_counts_and_weight_sharing(span_space):
    space = span_space
    arch = space.random_arch(np.random.RandomState(0))
    sub = space.subnet(arch).eval()
    assert not hasattr(sub, "pooler") and not hasattr(sub, "classifier")
    assert space.count_params(arch) == sum(p.numel() for p in sub.parameters())
    ids = torch.randint(5, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    space.eval()
    with torch.no_grad():
        out = sub(ids, mask, torch.zeros_like(ids))
        ref = space(ids, mask, torch.zeros_like(ids), arch=arch)
    assert out.logits.shape == (2, 11, 2)
    assert out.start_logits.shape == out.end_logits.shape == (2, 11)
    torch.testing.assert_close(out.logits, ref.logits)
    assert len(out.hidden_states) == space.config.num_hidden_layers + 1


def test_head_default_keeps_saved_configs_equal():
    """Configs saved before span heads existed (no ``head`` key) still load and compare equal."""
    seq = preset_config("tiny")
    assert "head" not in seq.to_dict()
    assert EfficientBertConfig.from_dict(seq.to_dict()) == seq
    span = preset_config("tiny", head="span")
    assert span.to_dict()["head"] == "span" and EfficientBertConfig.from_dict(span.to_dict()) == span
    with pytest.raises(ValueError, match="head"):
        preset_config("tiny", head="tokens")


LOADER = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("nni", "nni_effbert"):
                raise ImportError(f"{name} is blocked: the export must load without nni")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

    folder, question, context = sys.argv[1:4]
    model = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    enc = tok(question, context, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, start_positions=torch.tensor([9]), end_positions=torch.tensor([11]))
    # The best span of at most 30 context tokens, read back through the tokenizer's offsets: what an
    # application does with the model (and what pipeline("question-answering") did before transformers 5).
    enc_off = tok(question, context, return_offsets_mapping=True)
    ctx = [i for i, s in enumerate(enc_off.sequence_ids()) if s == 1]
    s_log, e_log = out.start_logits[0], out.end_logits[0]
    s, e = max(((s, e) for s in ctx for e in ctx if s <= e < s + 30), key=lambda p: float(s_log[p[0]] + e_log[p[1]]))
    off = enc_off["offset_mapping"]
    answer = {"answer": context[off[s][0]:off[e][1]], "start": off[s][0], "end": off[e][1]}
    try:
        qa = pipeline("question-answering", model=folder, trust_remote_code=True, device="cpu")
    except KeyError:  # transformers 5 removed the question-answering pipeline
        piped = None
    else:
        piped = qa(question=question, context=context)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("nni", "nni_effbert"))
    assert not leaked, leaked
    print("RESULT" + json.dumps({"model_class": type(model).__name__, "start": out.start_logits.tolist(),
                                 "end": out.end_logits.tolist(), "loss": out.loss.item(), "answer": answer,
                                 "pipeline": piped}))
    """
)


def test_export_answers_through_pipeline_without_nni(tmp_path, span_space, tiny_tokenizer):
    space = span_space
    arch = space.random_arch(np.random.RandomState(1))
    folder = export_student(space, arch, space, tmp_path / "qa", tokenizer=tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForQuestionAnswering"].endswith("EfficientBertForQuestionAnswering")
    assert "AutoModelForSequenceClassification" not in config["auto_map"] and config["head"] == "span"
    assert "Span head" in (folder / "architecture.md").read_text()
    student = load_exported(folder).model

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", LOADER, str(folder), QUESTION, CONTEXT], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
    assert result["model_class"] == "EfficientBertForQuestionAnswering"

    enc = tiny_tokenizer(QUESTION, CONTEXT, return_tensors="pt")
    with torch.no_grad():
        want = student(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], return_kd=False)
    torch.testing.assert_close(torch.tensor(result["start"]), want.start_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["end"]), want.end_logits, rtol=0, atol=1e-5)
    ce = torch.nn.functional.cross_entropy
    loss = (ce(want.start_logits, torch.tensor([9])) + ce(want.end_logits, torch.tensor([11]))) / 2
    assert result["loss"] == pytest.approx(loss.item(), abs=1e-5)
    answer = result["answer"]
    assert answer["answer"] and CONTEXT[answer["start"]:answer["end"]] == answer["answer"]
    if result["pipeline"] is not None:  # transformers < 5: the pipeline finds the same best span
        assert result["pipeline"]["answer"] == answer["answer"]


def test_span_kd_loss_by_hand():
    from types import SimpleNamespace

    from nni_effbert.kd.losses import KDLoss, TeacherBatch, span_prediction_loss
    from nni_effbert.search_spaces.modeling import StudentOutput

    ln3 = float(np.log(3))
    # One row of 3 tokens, the last one padding (its logits must not count).
    teacher = torch.tensor([[[0.0, 0.0], [ln3, 0.0], [99.0, 7.0]]])
    student = torch.tensor([[[0.0, ln3], [0.0, 0.0], [-5.0, 3.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # start: target (1/4, 3/4), student (1/2, 1/2) -> ln 2; end: target (1/2, 1/2), student (3/4, 1/4).
    end = -(0.5 * np.log(0.75) + 0.5 * np.log(0.25))
    want = (np.log(2) + end) / 2
    assert span_prediction_loss(student, teacher, mask).item() == pytest.approx(want, abs=1e-6)
    # Temperature 2 divides every logit by 2 before both softmaxes.
    t2 = span_prediction_loss(student, teacher, mask, temperature=2.0).item()
    assert t2 == pytest.approx(span_prediction_loss(student / 2, teacher / 2, mask).item(), abs=1e-6)

    cfg = SimpleNamespace(temperature=1.0, attention_weight=0.0, hidden_weight=0.0, prediction_weight=2.0,
                          hidden_loss="mse", layer_map=None)
    out = KDLoss(cfg, 2, 2)(StudentOutput(logits=student), TeacherBatch(teacher, [], []), mask)
    assert out.prediction.item() == pytest.approx(want, abs=1e-6) and out.total.item() == pytest.approx(2 * want, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
        span_prediction_loss(student, teacher[:, :2], mask)


def test_latency_table_key_ignores_the_head():
    """The nnictl tuner builds the space without the task's head: it must find the trials' table."""
    from nni_effbert.latency.settings import LatencySettings, table_key

    settings = LatencySettings(device="cpu", threads=1, batch_size=1, seq_length=96)
    assert table_key(preset_config("tiny"), settings) == table_key(preset_config("tiny", head="span"), settings)
