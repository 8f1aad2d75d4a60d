"""Deploy runtimes: ONNX / int8 exports of a tiny student and teacher, and latency under ONNX Runtime.

Tolerances: the fp32 graph must reproduce PyTorch's logits within 1e-4 on tiny models (the
export itself refuses > 1e-3); the int8 graph must predict PyTorch's class on at least 80% of
the 64 SST-2 dev rows below (a random tiny model has small logit margins, so int8 rounding
flips some rows; a trained model agrees far more often).
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nni_effbert import cli
from nni_effbert.errors import EffBertError
from nni_effbert.latency import runtimes as latency_onnx
from nni_effbert.latency import check as ltk
from nni_effbert.latency import components as ltc
from nni_effbert.latency import settings as lts
from nni_effbert.latency import table as lt
from nni_effbert.product import onnx as onnx_mod
from nni_effbert.product.export import export_student
from nni_effbert.search_spaces import EfficientBertSupernet
from nni_effbert.search_spaces.space_config import preset_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
INT8_MIN_AGREEMENT = 0.8
N_ROWS = 64


@pytest.fixture(scope="module")
def dev_rows(glue_dir):
    """The first 64 SST-2 dev rows: a fixed tiny set of real task inputs."""
    with open(glue_dir / "SST-2" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:N_ROWS]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    space = EfficientBertSupernet(preset_config("tiny"))
    with torch.no_grad():  # weights far from init, so logits differ between rows
        for p in space.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    arch = space.bert_arch(width=space.config.widths[0], stack=2)
    arch["layer0_post_act"] = "tanh"
    arch["layer1_mid_binary"] = "mul"
    folder = tmp_path_factory.mktemp("onnx") / "student"
    export_student(space, arch, space, folder, tokenizer=tiny_tokenizer, label_names=["negative", "positive"])
    return folder


def _logits(model, ids):
    mask = torch.ones_like(ids)
    mask[-1, ids.shape[1] // 2:] = 0
    with torch.no_grad():
        return model(ids, mask, torch.zeros_like(ids)).numpy(), (ids, mask, torch.zeros_like(ids))


def _assert_matches_pytorch(folder, out, torch_model, vocab):
    fp32 = onnx_mod.OnnxModel(out.onnx_path)
    for batch in (1, 3):
        for seq in (5, 40):
            ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch + seq))
            want, inputs = _logits(torch_model, ids)
            got = fp32(*inputs)
            assert got.shape == want.shape == (batch, 2)
            assert np.max(np.abs(got - want)) < 1e-4, (batch, seq)


def test_student_onnx_matches_pytorch_and_int8_agrees(student_folder, dev_rows):
    texts, labels = dev_rows
    out = onnx_mod.export_onnx(student_folder, int8=True, rows=texts, labels=labels, rows_source="sst2 dev rows")
    assert out.onnx_path == student_folder / "model.onnx" and out.int8_path == student_folder / "model.int8.onnx"
    assert not [p for p in student_folder.iterdir() if p.name.endswith(".tmp")]
    from nni_effbert.product.loader import load_exported

    model = latency_onnx.LogitsModule(load_exported(student_folder).model).eval()
    _assert_matches_pytorch(student_folder, out, model, 400)

    check = json.loads((student_folder / "onnx_check.json").read_text())
    assert check["rows"] == N_ROWS and check["rows_source"] == "sst2 dev rows"
    assert check["fp32"]["max_abs_diff"] < 1e-4 and len(check["fp32"]["shapes"]) == 4
    assert check["int8"]["agreement"] >= INT8_MIN_AGREEMENT
    # The int8 graph is really another model (quantized weights), and smaller.
    assert check["int8"]["max_abs_diff"] > 0
    assert out.int8_path.stat().st_size < out.onnx_path.stat().st_size
    assert 0.0 <= check["int8"]["accuracy"] <= 1.0 and "ONNX Runtime" in (student_folder / "README.md").read_text()
    assert onnx_mod.onnx_files(student_folder) == {"onnxruntime": out.onnx_path, "onnxruntime-int8": out.int8_path}


def test_teacher_onnx_matches_pytorch(base_teacher, tmp_path, dev_rows):
    from transformers import AutoModelForSequenceClassification

    texts, labels = dev_rows
    out = onnx_mod.export_onnx(base_teacher, int8=True, rows=texts[:16], labels=labels[:16], out_dir=tmp_path)
    assert not (base_teacher / "model.onnx").exists()  # the teacher folder is left alone
    model = AutoModelForSequenceClassification.from_pretrained(str(base_teacher), attn_implementation="eager")
    _assert_matches_pytorch(base_teacher, out, latency_onnx.LogitsModule(model).eval(), model.config.vocab_size)
    assert out.check["kind"] == "teacher" and "agreement" in out.check["int8"]


def test_onnx_folder_runs_without_torch_transformers_or_nni(student_folder, base_teacher, tmp_path, dev_rows):
    """The README example: onnxruntime + tokenizers only (torch, transformers and nni are blocked)."""
    teacher_out = tmp_path / "teacher"
    teacher_out.mkdir()
    for f in base_teacher.iterdir():
        if f.suffix in (".json", ".txt"):
            (teacher_out / f.name).write_bytes(f.read_bytes())
    onnx_mod.export_onnx(base_teacher, out_dir=teacher_out)
    from transformers import AutoTokenizer

    text = dev_rows[0][0]
    enc = AutoTokenizer.from_pretrained(str(base_teacher))(text, return_tensors="pt")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base_teacher), attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(**enc).logits.numpy().tolist()
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "nni", "nni_effbert"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import json, numpy as np, onnxruntime as ort
        from tokenizers import Tokenizer
        folder = {str(teacher_out)!r}
        enc = Tokenizer.from_file(folder + "/tokenizer.json").encode({text!r})
        sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        feeds = {{"input_ids": np.array([enc.ids]), "attention_mask": np.array([enc.attention_mask]),
                  "token_type_ids": np.array([enc.type_ids])}}
        used = {{i.name for i in sess.get_inputs()}}
        print(json.dumps(sess.run(["logits"], {{k: v for k, v in feeds.items() if k in used}})[0].tolist()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    assert np.max(np.abs(got - np.array(want))) < 1e-4


def test_fp32_mismatch_writes_nothing(student_folder, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(student_folder, folder)
    for name in ("model.onnx", "model.int8.onnx", "onnx_check.json"):
        (folder / name).unlink(missing_ok=True)
    from nni_effbert.product.export import record_added_files

    record_added_files(folder)  # the copy's file record without the ONNX files an earlier test added
    monkeypatch.setattr(onnx_mod, "FP32_ATOL", -1.0)
    with pytest.raises(EffBertError, match="disagrees with PyTorch"):
        onnx_mod.export_onnx(folder, int8=True)
    assert not [p.name for p in folder.iterdir() if "onnx" in p.name]


def test_missing_deploy_extra_is_one_line(monkeypatch, tmp_path, capsys, base_teacher):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(latency_onnx.DeployMissingError, match=r"nni-effbert\[deploy\]"):
        latency_onnx.require_deploy()
    rc = cli.main(["latency", "-q", "-c", TINY, f"--set=workdir={tmp_path}", f"--set=teacher.model={base_teacher}",
                   "--set=evaluator.latency_runtime=onnxruntime"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nni-effbert[deploy]" in err


def test_bad_latency_runtime_is_one_line(tmp_path, capsys, base_teacher):
    rc = cli.main(["latency", "-q", "-c", TINY, f"--set=workdir={tmp_path}", f"--set=teacher.model={base_teacher}",
                   "--set=evaluator.latency_runtime=tensorrt"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "evaluator.latency_runtime" in err and "onnxruntime-int8" in err
    with pytest.raises(EffBertError, match="latency_runtime"):
        lts.LatencySettings(runtime="tvm")


def test_onnxruntime_table_is_keyed_by_runtime_and_predicts_any_arch(tmp_path, monkeypatch):
    monkeypatch.setattr(ltc, "ROUNDS", 3)
    monkeypatch.setattr(ltc, "ROUND_MS", 1.0)
    monkeypatch.setattr(ltc, "CALIBRATION_ARCHS", 2)
    config = preset_config("tiny", max_position_embeddings=32)
    ort_settings = lts.LatencySettings(threads=1, seq_length=16, runtime="onnxruntime")
    torch_settings = lts.LatencySettings(threads=1, seq_length=16)
    path = lts.table_path(tmp_path, config, ort_settings)
    assert path != lts.table_path(tmp_path, config, torch_settings)
    assert "runtime" not in lts.table_key(config, torch_settings)  # torch tables keep their old key
    table = lt.build_table(config, ort_settings, path, progress=False)
    assert table.complete and table.key["runtime"] == "onnxruntime" and table.key["onnxruntime"]
    assert json.loads(path.read_text())["key"]["runtime"] == "onnxruntime"
    assert lt.load_table(path, config, torch_settings) is None  # another runtime's table is not read
    lo, hi = table.latency_range()
    assert 0 < lo < hi and math.isfinite(hi)
    for arch in ltc.random_archs(config, 20, seed=3):
        ms = table.predict(arch)
        assert math.isfinite(ms) and lo - 1e-9 <= ms <= hi + 1e-9
    # The check measures whole models in the same runtime.
    result = ltk.check_table(table, ltc.random_archs(config, 2, seed=5), ort_settings, repeats=3, progress=False)
    assert result.settings["runtime"] == "onnxruntime" and all(p["measured_ms"] > 0 for p in result.pairs)


def test_measure_latency_in_each_runtime():
    from nni_effbert.latency.measure import measure_latency
    from nni_effbert.search_spaces import EfficientBertModel

    config = preset_config("tiny")
    model = EfficientBertModel(config, EfficientBertSupernet(config).bert_arch())
    for runtime in latency_onnx.RUNTIMES:
        for training in (True, False):
            model.train(training)
            r = measure_latency(model, seq_length=16, repeats=3, warmup=1, runtime=runtime)
            assert r.runtime == runtime and r.median_ms > 0 and len(r.times_ms) == 3
            # the caller's mode is restored, in every submodule
            assert all(m.training == training for m in model.modules()), (runtime, training)


def test_runtime_rows_give_the_int8_teacher_its_own_row(student_folder, base_teacher, tmp_path, dev_rows,
                                                        tiny_tokenizer):
    from nni_effbert.data.tasks import get_task_spec

    import shutil

    student_folder = Path(shutil.copytree(student_folder, tmp_path / "student"))
    texts, labels = dev_rows
    teacher_out = tmp_path / "teacher"
    teacher_out.mkdir()
    onnx_mod.export_onnx(base_teacher, int8=True, out_dir=teacher_out)
    onnx_mod.export_onnx(student_folder, int8=True)
    enc = tiny_tokenizer(texts[:32], padding=True, truncation=True, max_length=32, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"][i:i + 16], "attention_mask": enc["attention_mask"][i:i + 16],
                "token_type_ids": enc["token_type_ids"][i:i + 16], "labels": torch.tensor(labels[i:i + 16])}
               for i in (0, 16)]
    models = [{"name": "teacher", "role": "teacher", "folder": teacher_out, "dev_metric": 0.5, "latency_ms": 4.0},
              {"name": "searched student", "role": "searched", "folder": student_folder, "dev_metric": 0.5,
               "latency_ms": 2.0}]
    rows = onnx_mod.runtime_rows(models, batches, get_task_spec("sst2"), vocab_size=400, seq_length=16, repeats=3)
    assert [(r["role"], r["precision"]) for r in rows] == [("teacher", "fp32"), ("teacher", "int8"),
                                                          ("searched", "fp32"), ("searched", "int8")]
    t32, t8, s32, s8 = rows
    assert t32["onnxruntime_speedup"] == 1.0 and t32["torch_speedup"] == 1.0 and s32["torch_speedup"] == 2.0
    assert t8["torch_ms"] is None and t8["onnxruntime_speedup"] == pytest.approx(t32["onnxruntime_ms"] / t8["onnxruntime_ms"])
    assert all(0.0 <= r["dev_metric"] <= 1.0 and r["onnxruntime_ms"] > 0 for r in rows)
    md = onnx_mod.runtime_markdown(rows, metric_name="dev accuracy", seq_length=16)
    assert md.count("| teacher |") == 2 and "| teacher | int8 |" in md and "fp32 teacher in the same runtime" in md
    # Weights changed after the export: the files no longer count as this folder's model.
    weights = student_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    import os
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert onnx_mod.onnx_files(student_folder) == {"onnxruntime": None, "onnxruntime-int8": None}


def test_teacher_latency_in_onnx_runtimes(base_teacher):
    """The teacher (a Hugging Face model) is timed in ONNX Runtime too: speed-up targets compare
    the student with the teacher in the same runtime."""
    from transformers import AutoModelForSequenceClassification

    from nni_effbert.latency.measure import measure_latency

    model = AutoModelForSequenceClassification.from_pretrained(str(base_teacher), attn_implementation="eager").eval()
    for runtime in ("onnxruntime", "onnxruntime-int8"):
        r = measure_latency(model, seq_length=16, repeats=3, warmup=1, runtime=runtime)
        assert r.median_ms > 0 and r.runtime == runtime
    assert not model.training


def test_cli_bad_input_is_one_line(tmp_path, capsys, base_teacher, glue_dir):
    sets = [f"--set=workdir={tmp_path / 'w'}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}"]
    cases = [(["export-teacher", "-c", TINY, *sets, "--int8"], "no fine-tuned teacher"),
             (["export", "-c", TINY, *sets, "--onnx", "--name", "nothing"], "holds no model")]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


# ---------------------------------------------------------------------------------------------
# Span QA: start / end logits over the sequence, for students and HF QA teachers
# ---------------------------------------------------------------------------------------------

#: Share of questions whose int8 graph picks PyTorch's best start and end token on a random tiny
#: span model (a flip of either token counts as a miss; the logits of a random model are close).
INT8_MIN_SPAN_AGREEMENT = 0.5


@pytest.fixture(scope="module")
def qa_rows(squad_small):
    """(question, context) pairs of the first 24 questions of the small SQuAD dev file."""
    doc = json.loads(Path(squad_small[1]).read_text(encoding="utf-8"))
    rows = [(q["question"], p["context"]) for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    return rows[:24]


def _assert_span_matches(out, torch_model, vocab):
    fp32 = onnx_mod.OnnxModel(out.onnx_path)
    for batch, seq in ((1, 5), (3, 40)):
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch + seq))
        want, inputs = _logits(torch_model, ids)
        got = fp32(*inputs)
        assert got.shape == want.shape == (batch, seq, 2)  # the sequence axis is dynamic on the output too
        assert np.max(np.abs(got - want)) < 1e-4, (batch, seq)


def test_span_student_onnx_gives_start_end_logits_and_int8_agrees(tmp_path, qa_tokenizer, qa_rows):
    from nni_effbert.product.loader import load_exported

    torch.manual_seed(0)
    space = EfficientBertSupernet(preset_config("tiny", head="span", vocab_size=len(qa_tokenizer)))
    with torch.no_grad():
        for p in space.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = export_student(space, space.bert_arch(), space, tmp_path / "qa", tokenizer=qa_tokenizer)
    out = onnx_mod.export_onnx(folder, int8=True, rows=qa_rows, rows_source="squad dev questions")
    check = out.check
    assert check["output"] == "span" and check["rows"] == len(qa_rows) and check["fp32"]["max_abs_diff"] < 1e-4
    assert check["fp32"]["agreement"] == 1.0 and check["int8"]["agreement"] >= INT8_MIN_SPAN_AGREEMENT
    assert "accuracy" not in check["int8"] and "answer span" in out.summary()
    _assert_span_matches(out, latency_onnx.LogitsModule(load_exported(folder).model).eval(), len(qa_tokenizer))
    readme = (folder / "README.md").read_text()
    assert "ONNX Runtime" in readme and "enc.offsets[start]" in readme


def test_qa_teacher_onnx_stacks_start_and_end_logits(tmp_path, qa_tokenizer, qa_rows):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=37, vocab_size=len(qa_tokenizer),
                                                max_position_embeddings=128))
    teacher = tmp_path / "teacher"
    model.save_pretrained(teacher)
    qa_tokenizer.save_pretrained(teacher)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = onnx_mod.export_onnx(teacher, int8=False, rows=qa_rows[:8], out_dir=out_dir, rows_source="squad dev questions")
    assert out.check["kind"] == "teacher" and out.check["output"] == "span"
    reloaded = BertForQuestionAnswering.from_pretrained(str(teacher), attn_implementation="eager")
    _assert_span_matches(out, latency_onnx.LogitsModule(reloaded).eval(), len(qa_tokenizer))
