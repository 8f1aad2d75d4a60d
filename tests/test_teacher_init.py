"""``warmup.init: teacher``, ``student.preset: teacher`` and corpus files (issue 13), on tiny teachers."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, \
    RobertaForSequenceClassification

from nni_effbert.config import load_config
from nni_effbert.data.batches import make_loader
from nni_effbert.data.corpus import unlabeled_texts
from nni_effbert.data.loading import load_task
from nni_effbert.errors import CheckpointError, ConfigError, DataError
from nni_effbert.kd.losses import KDLoss, uniform_layer_map
from nni_effbert.kd.teacher import teacher_outputs
from nni_effbert.kd.student_start import origin_line, start_from_teacher, student_origin, student_preset
from nni_effbert.kd.teacher_init import (init_from_teacher, magnitude_importance, taylor_importance, teacher_parts,
                                         teacher_student_fields)
from nni_effbert.kd.setup import KDSetup
from nni_effbert.nas.warmup import run_warmup
from nni_effbert.product.export import architecture_markdown
from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.workdir import WorkDir
from conftest import finetune_teacher_into

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(layers=2, hidden=32, heads=4, inter=48, vocab=300, seed=0, std=0.2, cls=BertForSequenceClassification,
          config_cls=BertConfig, **kw):
    # A larger init range than BERT's 0.02 so that logits, attention maps and importances are
    # far from trivial (a random 0.02 teacher is nearly constant).
    torch.manual_seed(seed)
    model = cls(config_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, max_position_embeddings=64, num_labels=2, initializer_range=std,
                           attn_implementation="eager", **kw))
    return model.eval()


def _student(teacher, **overrides):
    fields = {**teacher_student_fields(teacher.config), "num_labels": 2, "pad_token_id": 0, "max_stack": 2,
              **overrides}
    return EfficientBertSpace(**fields)


def _batch(vocab=300, seed=1, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row
    mask[3, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.randint(0, 2, (b,), generator=g)}


def _batches(n=6, **kw):
    return [_batch(seed=100 + i, **kw) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# A student of the teacher's shape computes the teacher's function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_student_of_the_teachers_shape_reproduces_its_logits(importance):
    teacher = _bert()
    space = _student(teacher)
    imp = taylor_importance(teacher, _batches()) if importance == "taylor" else magnitude_importance(teacher)
    # the FFN neurons are reordered by importance (a permutation) -- make sure they really move
    assert not torch.equal(torch.argsort(-imp.neurons[0], stable=True), torch.arange(48))
    init_from_teacher(space.supernet, teacher, imp)
    student = space.subnet(space.bert_arch()).eval()  # same layers, full width, stack 1, BERT's MLP
    batch = _batch()
    with torch.no_grad():
        ours = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], output_hidden_states=True, output_attentions=True)
    assert theirs.logits.abs().max() > 0.05 and theirs.logits.std() > 0.01  # a teacher with something to match
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    valid = batch["attention_mask"].bool()
    for s, t in zip(ours.hidden_states, theirs.hidden_states):  # fit_dense is the identity here
        torch.testing.assert_close(s[valid], t[valid], atol=1e-4, rtol=0)
    for s, t in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(s, t, atol=1e-5, rtol=0)
    torch.testing.assert_close(space.supernet.fit_dense.weight, torch.eye(32))
    # the KD losses against the teacher's own outputs are finite, and zero up to rounding
    kd = dataclasses.make_dataclass("KD", [("temperature", float, 1.0), ("attention_weight", float, 1.0),
                                          ("hidden_weight", float, 1.0), ("prediction_weight", float, 1.0),
                                          ("hidden_loss", str, "mse"), ("layer_map", object, None)])()
    loss_fn = KDLoss(kd, 2, 2, regression=False)
    tb = teacher_outputs(teacher, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         loss_fn.teacher_hidden_layers, loss_fn.teacher_attention_layers)
    out = loss_fn(ours, tb, batch["attention_mask"])
    assert torch.isfinite(out.total)
    assert out.as_dict()["hidden"] < 1e-8 and out.as_dict()["attention"] < 1e-8


def test_span_student_of_a_qa_teachers_shape_reproduces_its_start_and_end_logits():
    from transformers import BertForQuestionAnswering

    teacher = _bert(cls=BertForQuestionAnswering)
    space = _student(teacher, head="span")
    batches = [{**b, "start_positions": b["labels"] + 2, "end_positions": b["labels"] + 4} for b in _batches()]
    imp = taylor_importance(teacher, batches)  # span QA: CE of the start and end positions
    assert torch.isfinite(imp.neurons[0]).all() and imp.neurons[0].abs().sum() > 0
    init_from_teacher(space.supernet, teacher, imp)
    student = space.subnet(space.bert_arch()).eval()
    batch = _batch()
    with torch.no_grad():
        ours = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits  # [b, t, 2]
        theirs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"])
    assert theirs.start_logits.std() > 0.01
    torch.testing.assert_close(ours[..., 0], theirs.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[..., 1], theirs.end_logits, atol=1e-4, rtol=0)
    # A span student cannot start from a classification teacher (nor the other way round): one line.
    with pytest.raises(CheckpointError, match="head"):
        init_from_teacher(_student(_bert(), head="span").supernet, _bert())


def test_roberta_teacher_with_offset_positions_is_reproduced():
    teacher = _bert(cls=RobertaForSequenceClassification, config_cls=RobertaConfig, pad_token_id=1, vocab=300)
    fields = teacher_student_fields(teacher.config)
    assert fields["max_position_embeddings"] == 64 - 2  # rows 0..pad are never used by RoBERTa
    space = _student(teacher, pad_token_id=1, type_vocab_size=int(teacher.config.type_vocab_size))
    init_from_teacher(space.supernet, teacher)
    batch = _batch()
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)  # RoBERTa pads with id 1
    types = torch.zeros_like(ids)
    with torch.no_grad():
        ours = space.subnet(space.bert_arch()).eval()(ids, batch["attention_mask"], types).logits
        theirs = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# A smaller student keeps the most important units
# ---------------------------------------------------------------------------------------------


def _dynabert_neuron_importance(teacher, batches):
    """DynaBERT's neuron score written with weight gradients: sum over batches |sum_rows w2 * dL/dw2|."""
    parts = teacher_parts(teacher)
    w2s = [lp.ffn_out.weight for lp in parts.layers]
    for w in w2s:
        w.requires_grad_(True)
    scores = torch.zeros(len(w2s), w2s[0].shape[1], dtype=torch.float64)
    for batch in batches:
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, batch["labels"]), w2s)
        for i, (w, g) in enumerate(zip(w2s, grads)):
            scores[i] += (w.detach() * g).sum(0).abs().double()
    for w in w2s:
        w.requires_grad_(False)
    return scores


def test_smaller_student_keeps_the_top_k_neurons_heads_and_hidden_units():
    teacher = _bert(layers=2, hidden=32, heads=4, inter=48)
    batches = _batches()
    imp = taylor_importance(teacher, batches)
    expected = _dynabert_neuron_importance(teacher, batches)
    torch.testing.assert_close(imp.neurons.double(), expected, rtol=1e-4, atol=1e-7)  # same score, two ways
    # 1 layer of 2, half the FFN width, half the hidden size, 2 of 4 heads (head size 8 as the teacher's)
    space = _student(teacher, num_hidden_layers=1, intermediate_size=24, hidden_size=16, num_attention_heads=2,
                     embedding_size=16)
    info = init_from_teacher(space.supernet, teacher, imp)
    assert info["layer_map"] == uniform_layer_map(1, 2) == [2]
    t_layer = teacher_parts(teacher).layers[1]
    hidden = torch.sort(torch.argsort(-imp.hidden, stable=True)[:16]).values
    top = torch.argsort(-expected[1], stable=True)[:24]  # most important first
    for mlp in space.supernet.layers[0].mlps:  # every stacked MLP starts as the same copy
        torch.testing.assert_close(mlp.linear1.weight, t_layer.ffn_in.weight[top][:, hidden])
        torch.testing.assert_close(mlp.linear2.weight, t_layer.ffn_out.weight[hidden][:, top])
    # a nested slice (the supernet's first 12 units) holds the 12 most important neurons
    sub = space.subnet({**space.bert_arch(width=12)})
    torch.testing.assert_close(sub.layers[0].mlps[0].linear1.weight,
                               t_layer.ffn_in.weight[top[:12]][:, hidden])
    heads = torch.argsort(-imp.heads[1], stable=True)[:2]
    assert info["heads"] == [heads.tolist()]
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads.tolist()])
    torch.testing.assert_close(space.supernet.layers[0].attention.value.weight, t_layer.value.weight[rows][:, hidden])
    # hidden units: the kept teacher coordinates, and fit_dense maps them back
    fit = space.supernet.fit_dense.weight
    assert fit.shape == (32, 16) and torch.equal(fit[hidden, torch.arange(16)], torch.ones(16))
    # still a working student, with finite KD losses
    out = space(_batch()["input_ids"], arch=space.bert_arch(width=12, stack=2))
    assert torch.isfinite(out.logits).all()


def test_narrower_heads_scale_the_query_and_keep_important_dims():
    teacher = _bert(hidden=32, heads=4, inter=48)
    imp = taylor_importance(teacher, _batches(3))
    space = _student(teacher, hidden_size=16, num_attention_heads=4, embedding_size=8, intermediate_size=48)
    init_from_teacher(space.supernet, teacher, imp)  # head size 4 of 8; factorised embeddings (E = 8 < 16)
    hidden = torch.sort(torch.argsort(-imp.hidden, stable=True)[:16]).values
    q0 = torch.sort(torch.argsort(-imp.qk_dims[0][:8], stable=True)[:4]).values
    torch.testing.assert_close(space.supernet.layers[0].attention.query.weight[:4],
                               teacher_parts(teacher).layers[0].query.weight[q0][:, hidden] * math.sqrt(4 / 8))
    emb = space.supernet.embeddings
    words = teacher.bert.embeddings.word_embeddings.weight[:, hidden]
    u, s, vt = torch.linalg.svd(words, full_matrices=False)
    torch.testing.assert_close(emb.embedding_transformation(emb.word_embeddings.weight), (u[:, :8] * s[:8]) @ vt[:8],
                               atol=1e-4, rtol=1e-4)
    assert torch.isfinite(space(_batch()["input_ids"], arch=space.bert_arch()).logits).all()


def test_importance_is_deterministic_for_a_seed(tiny_tokenizer, glue_dir, tmp_path):
    teacher = _bert(vocab=len(tiny_tokenizer))
    cfg = _cfg(tmp_path, tmp_path, glue_dir, check_paths=False)
    task = load_task(cfg.task, tiny_tokenizer, cache_dir=str(tmp_path / "ds"))

    def run(seed):
        return taylor_importance(teacher, list(make_loader(task.train, 8, True, seed, 0))[:4])

    a, b, c = run(0), run(0), run(1)
    for name in ("heads", "qk_dims", "v_dims", "neurons", "hidden"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.neurons, c.neurons)  # other batches, other scores
    assert torch.equal(torch.argsort(-a.neurons, dim=1, stable=True), torch.argsort(-b.neurons, dim=1, stable=True))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_incompatible_shapes_and_vocabulary_are_one_line_errors():
    teacher = _bert()
    other_vocab = _student(teacher, vocab_size=500)
    before = other_vocab.supernet.layers[0].attention.query.weight.clone()
    with pytest.raises(CheckpointError, match=r"vocabulary \(500 tokens\).*teacher's \(300 tokens\)") as err:
        init_from_teacher(other_vocab.supernet, teacher)
    assert "\n" not in str(err.value)
    assert torch.equal(before, other_vocab.supernet.layers[0].attention.query.weight)  # nothing written
    with pytest.raises(CheckpointError, match=r"hidden size \(64\).*teacher's \(32\)"):
        init_from_teacher(_student(teacher, hidden_size=64, embedding_size=64).supernet, teacher)
    with pytest.raises(CheckpointError, match=r"MLP width \(intermediate_size\) \(96\).*\(48\)"):
        init_from_teacher(_student(teacher, intermediate_size=96).supernet, teacher)
    with pytest.raises(CheckpointError, match=r"attention heads \(8\).*\(4\)"):
        init_from_teacher(_student(teacher, num_attention_heads=8).supernet, teacher)


# ---------------------------------------------------------------------------------------------
# Through the config: student.preset: teacher, warm-up with init: teacher on a corpus
# ---------------------------------------------------------------------------------------------


def _cfg(work, teacher, glue_dir, *extra, check_paths=True):
    return load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={work}", f"teacher.model={teacher}", f"task.data_dir={glue_dir}",
        "task.max_train_rows=48", "task.max_dev_rows=24", "warmup.batch_size=8", "evaluator.batch_size=8",
        *extra], check_paths=check_paths)


@pytest.fixture(scope="module")
def teacher_cfg(tmp_path_factory, base_teacher, glue_dir):
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "a.txt").write_text("a gripping , funny film .\n\nthe plot is thin .\n" * 8, encoding="utf-8")
    (corpus / "b.txt").write_text("the actors are good .\nit is a long movie .\n" * 8, encoding="utf-8")
    cfg = _cfg(tmp_path_factory.mktemp("work"), base_teacher, glue_dir, "student.preset=teacher",
               "student.overrides={num_hidden_layers: 1, max_stack: 2}", "warmup.init=teacher",
               "warmup.importance_batches=3", f"warmup.corpus_file=[{corpus / 'a.txt'},{corpus / 'b.txt'}]")
    finetune_teacher_into(cfg)
    return cfg


def test_teacher_preset_takes_the_teachers_sizes_then_the_overrides(teacher_cfg):
    setup = KDSetup.from_config(teacher_cfg, progress=False)
    c = setup.space.config
    t = setup.teacher_config  # conftest's base teacher: hidden 32, 2 heads, intermediate 37
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.vocab_size) == \
           (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.vocab_size)
    assert c.num_hidden_layers == 1 and c.max_stack == 2 and c.embedding_size == t.hidden_size
    preset, overrides = student_preset(teacher_cfg)
    assert preset == "paper" and overrides["hidden_size"] == 32 and overrides["num_hidden_layers"] == 1
    assert student_preset(dataclasses.replace(teacher_cfg, student=dataclasses.replace(
        teacher_cfg.student, preset="tiny")))[0] == "tiny"  # the other presets are untouched


def test_warmup_from_the_teacher_on_a_corpus_list(teacher_cfg):
    setup = KDSetup.from_config(teacher_cfg, progress=False)
    result = run_warmup(teacher_cfg, 2, steps=2, general_steps=2, progress=False, setup=setup)
    assert result.init == "teacher (taylor importance)" and math.isfinite(result.loss)
    assert result.plan.init == "teacher" and result.plan.importance_batches == 3
    cache = WorkDir.of(teacher_cfg).root / "cache"
    names = [p.name for p in cache.iterdir()]
    assert any(n.startswith("corpus32-") and not n.endswith(".lock") for n in names)  # corpus outputs cached
    assert any(n.startswith("importance-") for n in names)  # Taylor scores cached for later stages / students


def test_the_initialised_supernet_reproduces_the_fine_tuned_teacher(teacher_cfg):
    cfg = dataclasses.replace(teacher_cfg, student=dataclasses.replace(teacher_cfg.student, overrides={"max_stack": 1}))
    setup = KDSetup.from_config(cfg, progress=False)
    start_from_teacher(setup, progress=False)
    setup.space.eval()  # no dropout
    teacher = setup.teacher_model()
    batch = _batch(vocab=int(setup.teacher_config.vocab_size))
    with torch.no_grad():
        ours = setup.space(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           arch=setup.space.bert_arch()).logits
        theirs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Corpus files
# ---------------------------------------------------------------------------------------------


def _corpus_cfg(tmp_path, glue_dir, value):
    return _cfg(tmp_path / "w", tmp_path, glue_dir, f"warmup.corpus_file={value}", check_paths=False)


def test_corpus_one_file_and_a_list(tmp_path, glue_dir, tiny_tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the film is good .\n\n   \nthe plot is thin .\n", encoding="utf-8")
    b.write_text("a long movie .\n", encoding="utf-8")
    one = unlabeled_texts(_corpus_cfg(tmp_path, glue_dir, a), tiny_tokenizer, cache_dir=str(tmp_path / "ds"))
    assert len(one) == 2  # blank lines dropped
    both = unlabeled_texts(_corpus_cfg(tmp_path, glue_dir, f"[{a},{b}]"), tiny_tokenizer, cache_dir=str(tmp_path / "ds"))
    assert len(both) == 3 and both._fingerprint != one._fingerprint
    ids = tiny_tokenizer("a long movie .", truncation=True, max_length=32)["input_ids"]
    assert list(both["input_ids"][2]) == ids  # the same tokenizer, same ids
    sub = unlabeled_texts(_corpus_cfg(tmp_path, glue_dir, f"[{a},{b}]"), tiny_tokenizer,
                          cache_dir=str(tmp_path / "ds"), max_rows=2, seed=0)
    assert len(sub) == 2


def test_corpus_list_in_yaml_resolves_relative_paths(tmp_path):
    (tmp_path / "c").mkdir()
    for name in ("x.txt", "y.txt"):
        (tmp_path / "c" / name).write_text("a line .\n")
    (tmp_path / "exp.yml").write_text("workdir: w\nteacher: {model: minilm}\nwarmup:\n  corpus_file: [c/x.txt, c/y.txt]\n"
                                      "distill:\n  corpus_file: c/x.txt\n")
    cfg = load_config(tmp_path / "exp.yml", check_paths=False)
    assert cfg.warmup.corpus_file == [str(tmp_path / "c" / "x.txt"), str(tmp_path / "c" / "y.txt")]
    assert cfg.distill.corpus_file == str(tmp_path / "c" / "x.txt")
    (tmp_path / "bad.yml").write_text("workdir: w\nwarmup:\n  corpus_file: [c/x.txt, 3]\n")
    with pytest.raises(ConfigError, match="corpus_file"):
        load_config(tmp_path / "bad.yml", check_paths=False)
    (tmp_path / "missing.yml").write_text("workdir: w\nteacher: {model: minilm}\nwarmup:\n"
                                          "  corpus_file: [c/x.txt, c/nope.txt]\n")
    with pytest.raises(ConfigError, match=r"warmup.corpus_file: file not found: .*nope.txt"):
        load_config(tmp_path / "missing.yml")


@pytest.mark.parametrize("kind", ["empty", "blank", "missing", "binary", "folder"])
def test_bad_corpus_files_are_clear_errors(tmp_path, glue_dir, tiny_tokenizer, kind):
    good = tmp_path / "good.txt"
    good.write_text("a fine sentence .\n")
    bad = tmp_path / f"{kind}.txt"
    if kind == "empty":
        bad.write_text("")
    elif kind == "blank":
        bad.write_text("\n   \n\n")
    elif kind == "binary":
        bad.write_bytes(b"PK\x03\x04\x00\x00\xff\xfe" * 100)
    elif kind == "folder":
        bad.mkdir()
    message = {"empty": "is empty", "blank": "is empty", "missing": "file not found", "binary": "binary",
               "folder": "is not a file"}[kind]
    with pytest.raises(DataError, match=f"warmup.corpus_file: .*{message}") as err:
        unlabeled_texts(_corpus_cfg(tmp_path, glue_dir, f"[{good},{bad}]"), tiny_tokenizer,
                        cache_dir=str(tmp_path / "ds"))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_the_shared_corpus_files_load(tmp_path, glue_dir, tiny_tokenizer):
    files = [CORPUS / "movie_reviews.txt", CORPUS / "wikitext2.txt"]
    assert all(f.is_file() for f in files), f"shared corpus missing under {CORPUS}"
    texts = unlabeled_texts(_corpus_cfg(tmp_path, glue_dir, f"[{files[0]},{files[1]}]"), tiny_tokenizer,
                            cache_dir=str(tmp_path / "ds"), max_rows=50, seed=3)
    assert len(texts) == 50 and all(len(ids) >= 2 for ids in texts["input_ids"])


def test_architecture_md_and_report_name_the_preset_and_init(teacher_cfg):
    origin = student_origin(teacher_cfg)
    assert origin == {"student_preset": "teacher", "student_overrides": {"num_hidden_layers": 1, "max_stack": 2},
                      "warmup_init": "teacher", "importance": "taylor", "importance_batches": 3}
    line = origin_line(origin)
    assert "Student preset `teacher`" in line and "supernet init `teacher` (taylor importance on 3 task batches)" in line
    space = EfficientBertSpace.preset("tiny")
    assert line in architecture_markdown(space, space.bert_arch(), origin=origin)
    assert "Student preset" not in architecture_markdown(space, space.bert_arch())
