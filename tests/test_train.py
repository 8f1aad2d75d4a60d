"""The KD training loop, evaluation, latency protocol and work-directory paths (in memory, tiny)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from nni_effbert.config import KDConfig, TaskConfig
from nni_effbert.data.loading import load_task
from nni_effbert.errors import ConfigError
from nni_effbert.latency.measure import measure_latency
from nni_effbert.kd.losses import KDLoss, TeacherBatch
from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.kd.teacher import prepare_teacher
from nni_effbert.kd.scoring import evaluate
from nni_effbert.kd.setup import build_space
from nni_effbert.kd.sources import LiveTeacher
from nni_effbert.kd.train import TrainSettings, TrialFailure, iterate_batches, kd_train
from nni_effbert.workdir import WorkDir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_vocab_file):
    # transformers 5 ignores BertTokenizerFast(vocab_file=...); from_pretrained reads vocab.txt.
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tiny_vocab_file.parent), do_lower_case=True)
    assert len(tok) > 100
    return tok


@pytest.fixture(scope="module")
def task(glue_dir, tokenizer, tmp_path_factory):
    cfg = TaskConfig(name="sst2", data_dir=str(glue_dir), max_seq_length=24, max_train_rows=48, max_dev_rows=24,
                     search_rows=0, seed=0)
    return load_task(cfg, tokenizer, cache_dir=str(tmp_path_factory.mktemp("ds")))


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=len(tokenizer), max_position_embeddings=64, num_labels=2,
                     attn_implementation="eager")
    return prepare_teacher(BertForSequenceClassification(cfg))


@pytest.fixture(scope="module")
def space(teacher, task):
    cfg = SimpleNamespace(student=SimpleNamespace(preset="tiny", overrides={}),
                          task=SimpleNamespace(max_seq_length=24), warmup=SimpleNamespace(max_seq_length=None))
    torch.manual_seed(0)
    return build_space(cfg, teacher.config, task.spec)


def _loss(space, teacher, **kw):
    return KDLoss(KDConfig(**kw), space.config.num_hidden_layers, teacher.config.num_hidden_layers)


def _live(teacher, loss_fn):
    return LiveTeacher(teacher, loss_fn.teacher_hidden_layers, loss_fn.teacher_attention_layers)


def _settings(**kw):
    base = dict(steps=6, learning_rate=2e-3, batch_size=8, seed=0, progress=False)
    base.update(kw)
    return TrainSettings(**base)


def test_build_space_takes_sizes_from_teacher_and_task(space, teacher, task):
    c = space.config
    assert (c.vocab_size, c.fit_size, c.num_labels) == (teacher.config.vocab_size, 32, 2)
    bad = SimpleNamespace(student=SimpleNamespace(preset="tiny", overrides={"fit_size": 64}),
                          task=SimpleNamespace(max_seq_length=24), warmup=SimpleNamespace(max_seq_length=None))
    with pytest.raises(ConfigError, match="student.overrides.fit_size = 64 contradicts"):
        build_space(bad, teacher.config, task.spec)
    too_long = SimpleNamespace(student=SimpleNamespace(preset="tiny", overrides={}),
                               task=SimpleNamespace(max_seq_length=512), warmup=SimpleNamespace(max_seq_length=None))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_space(too_long, teacher.config, task.spec)
    unknown = SimpleNamespace(student=SimpleNamespace(preset="huge", overrides={}),
                              task=SimpleNamespace(max_seq_length=24), warmup=SimpleNamespace(max_seq_length=None))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_space(unknown, teacher.config, task.spec)


def test_batches_are_deterministic_and_resumable(task, tokenizer):
    a = iterate_batches(task.train, 8, seed=3, pad_token_id=0)
    first = [next(a)["idx"].tolist() for _ in range(9)]  # 48 rows: 6 batches per epoch, into epoch 2
    b = iterate_batches(task.train, 8, seed=3, pad_token_id=0, start_step=4)
    assert [next(b)["idx"].tolist() for _ in range(5)] == first[4:]
    assert sorted(sum(first[:6], [])) == sorted(task.train["idx"])  # an epoch sees every row once
    assert first[6] != first[0]  # a new permutation per epoch


def test_fixed_student_distils_and_evaluates(space, teacher, task):
    student = space.subnet(space.bert_arch())
    loss_fn = _loss(space, teacher)
    seen = []

    def on_eval(step):
        seen.append(step)
        return evaluate(student, task.dev, task.spec, batch_size=8, pad_token_id=0)

    before = _loss_on_first_batch(student, teacher, task, loss_fn)
    out = kd_train(student, _live(teacher, loss_fn), task.train, loss_fn, _settings(steps=12, eval_interval=5),
                   pad_token_id=0, evaluate_fn=on_eval)
    after = _loss_on_first_batch(student, teacher, task, loss_fn)
    assert out.steps == 12 and seen == [5, 10] and [s for s, _ in out.evals] == [5, 10]
    assert math.isfinite(out.loss) and set(out.last_terms) == {"total", "attention", "hidden", "prediction"}
    assert after < before  # distillation moves the student towards the teacher
    metrics = evaluate(student, task.dev, task.spec, batch_size=8, pad_token_id=0)
    assert metrics["default"] == metrics["accuracy"] and 0.0 <= metrics["default"] <= 1.0


def _loss_on_first_batch(student, teacher, task, loss_fn):
    batch = next(iterate_batches(task.train, 16, seed=99, pad_token_id=0))
    student.eval()
    with torch.no_grad():
        out = loss_fn(student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                      _live(teacher, loss_fn)(batch), batch["attention_mask"])
    student.train()
    return float(out.total)


def test_supernet_training_samples_an_arch_per_step(space, teacher, task):
    supernet = EfficientBertSpace(space.config)
    loss_fn = _loss(space, teacher)
    steps_seen = []

    def sampler(step):
        steps_seen.append(step)
        return supernet.random_arch(np.random.default_rng(step))

    q_before = supernet.supernet.layers[0].attention.query.weight.clone()
    kd_train(supernet, _live(teacher, loss_fn), task.train, loss_fn, _settings(steps=5), pad_token_id=0,
             arch_sampler=sampler)
    assert steps_seen == [0, 1, 2, 3, 4]
    assert not torch.equal(q_before, supernet.supernet.layers[0].attention.query.weight)  # shared weights trained


class _NanAt:
    """Teacher source that returns NaN logits from its ``n``-th call on."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, batch) -> TeacherBatch:
        self.calls += 1
        out = self.inner(batch)
        if self.calls >= self.n:
            out = TeacherBatch(torch.full_like(out.logits, float("nan")), out.hidden_states, out.attentions)
        return out


def test_nan_loss_is_a_trial_failure_naming_the_step(space, teacher, task):
    student = space.subnet(space.bert_arch())
    loss_fn = _loss(space, teacher)
    with pytest.raises(TrialFailure, match=r"loss became NaN at step 3 \(.*prediction=nan"):
        kd_train(student, _NanAt(_live(teacher, loss_fn), 3), task.train, loss_fn, _settings(), pad_token_id=0)
    # A diverging learning rate is caught too, before it is ever scored.
    student = space.subnet(space.bert_arch())
    with pytest.raises(TrialFailure, match=r"(loss|gradient) became .* at step \d+"):
        kd_train(student, _live(teacher, loss_fn), task.train, loss_fn, _settings(learning_rate=1e30), pad_token_id=0)


def test_shape_mismatch_is_a_trial_failure(space, teacher, task):
    wide = EfficientBertSpace(space.config.replace(fit_size=48))  # hidden states no longer fit the teacher's 32
    student = wide.subnet(wide.bert_arch())
    loss_fn = _loss(space, teacher)
    with pytest.raises(TrialFailure, match="forward or loss failed at step 1: hidden_loss"):
        kd_train(student, _live(teacher, loss_fn), task.train, loss_fn, _settings(), pad_token_id=0)


def test_evaluate_refuses_non_finite_logits(space, task):
    student = space.subnet(space.bert_arch())
    with torch.no_grad():
        student.classifier.weight.fill_(float("nan"))
    with pytest.raises(TrialFailure, match="NaN or infinite"):
        evaluate(student, task.dev, task.spec, batch_size=8, pad_token_id=0)


def test_resume_continues_exactly(space, teacher, task):
    loss_fn = _loss(space, teacher)
    arch = space.bert_arch()
    straight = space.subnet(arch)
    kd_train(straight, _live(teacher, loss_fn), task.train, loss_fn, _settings(steps=6), pad_token_id=0)

    interrupted = space.subnet(arch)
    saved = {}

    def on_checkpoint(state):
        saved["state"] = state
        saved["weights"] = {k: v.clone() for k, v in interrupted.state_dict().items()}
        raise KeyboardInterrupt  # the process dies right after writing its checkpoint

    with pytest.raises(KeyboardInterrupt):
        kd_train(interrupted, _live(teacher, loss_fn), task.train, loss_fn, _settings(steps=6, checkpoint_interval=3),
                 pad_token_id=0, on_checkpoint=on_checkpoint)
    assert saved["state"].step == 3
    resumed = space.subnet(arch)
    resumed.load_state_dict(saved["weights"])
    torch.manual_seed(12345)  # whatever the RNG holds now, the saved state wins
    out = kd_train(resumed, _live(teacher, loss_fn), task.train, loss_fn, _settings(steps=6), pad_token_id=0,
                   resume=saved["state"])
    assert out.steps == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_latency_protocol(space, teacher):
    student = space.subnet(space.bert_arch())
    student.train()
    threads = torch.get_num_threads()
    lat = measure_latency(student, seq_length=32, repeats=5, warmup=1)
    assert lat.median_ms > 0 and len(lat.times_ms) == 5 and lat.seq_length == 32 and lat.threads == 1
    assert min(lat.times_ms) <= lat.median_ms <= max(lat.times_ms)
    assert student.training and torch.get_num_threads() == threads  # both restored
    assert measure_latency(teacher, seq_length=16, repeats=2, warmup=0).median_ms > 0  # HF models too
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings"):
        measure_latency(student, seq_length=10_000)


def test_interleaved_latency_times_every_model_once_per_round(space, teacher, monkeypatch):
    """Round-robin order (a burst of load hits every model alike), one result per model per round,
    and the two summaries are the medians they say."""
    from nni_effbert.latency import measure as lm

    order = []
    real = lm.measure_latency
    monkeypatch.setattr(lm, "measure_latency", lambda model, **kw: order.append(model) or real(model, **kw))
    student = space.subnet(space.bert_arch())
    out = lm.measure_interleaved({"s": student, "t": teacher}, rounds=3, seq_length=16, repeats=4, warmup=0)
    assert order == [student, teacher] * 3
    assert {k: len(v) for k, v in out.items()} == {"s": 3, "t": 3}
    assert all(len(r.times_ms) == 4 and r.seq_length == 16 for rs in out.values() for r in rs)
    rounds = [lm.LatencyResult(median_ms=m, times_ms=t) for m, t in ((2.0, [1.0, 2.0, 9.0]), (5.0, [4.0, 5.0, 6.0]),
                                                                     (3.0, [3.0, 3.0, 3.0]))]
    assert lm.median_of_rounds(rounds) == 3.0
    assert lm.pooled_median(rounds) == 3.0 and lm.pooled_median(rounds[:2]) == 4.5
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        lm.measure_interleaved({"s": student}, rounds=0)


def test_workdir_paths(tmp_path):
    wd = WorkDir.of(SimpleNamespace(workdir=str(tmp_path / "run")))
    assert wd.supernet_checkpoint(2) == tmp_path / "run" / "supernet" / "stage2.pt"
    assert wd.warmup_state(0).name == "stage0.resume.pt" and wd.teacher_dir.name == "teacher"
    assert wd.trial_dir("a/b c").name == "a_b_c"
    assert wd.latest_supernet_checkpoint() is None
    wd.ensure()
    wd.supernet_dir.mkdir()
    for s in (0, 2):
        wd.supernet_checkpoint(s).write_bytes(b"x")
    assert wd.latest_supernet_checkpoint() == 2 and wd.latest_supernet_checkpoint(1) == 0
    with pytest.raises(ConfigError, match="zero-based"):
        wd.supernet_checkpoint(-1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        WorkDir(blocker / "sub").ensure()
