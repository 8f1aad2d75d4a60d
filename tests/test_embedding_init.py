"""Warm-up start: the student's embedding tables taken from the teacher (truncated SVD)."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from nni_effbert.errors import CheckpointError
from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.kd.teacher_init import init_embeddings_from_teacher


def _teacher(vocab=1024, hidden=32):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128))


@pytest.mark.parametrize("student_hidden", [32, 16, 48])
def test_embeddings_match_teacher_best_rank_e_fit(student_hidden):
    teacher = _teacher()
    space = EfficientBertSpace.preset("tiny", hidden_size=student_hidden, fit_size=32)
    net = space.supernet
    init_embeddings_from_teacher(net, teacher)
    words = teacher.get_input_embeddings().weight.detach()
    u, s, vt = torch.linalg.svd(words, full_matrices=False)
    e = net.embeddings.word_embeddings.embedding_dim
    rank_e = (u[:, :e] * s[:e]) @ vt[:e]
    emb = net.embeddings
    with torch.no_grad():
        back = net.fit_dense(emb.embedding_transformation(emb.word_embeddings.weight))
    if student_hidden >= e:
        # every word's vector, mapped back to the teacher's space, is its best rank-E approximation
        torch.testing.assert_close(back, rank_e, atol=1e-4, rtol=1e-4)
        # which keeps most of the table, far more than a random start
        assert (back - words).norm() < 0.9 * words.norm()
    # position vectors: the teacher's projected on the top student_hidden directions
    q = vt[:min(student_hidden, vt.shape[0])]
    pos = teacher.bert.embeddings.position_embeddings.weight.detach()
    torch.testing.assert_close(emb.position_embeddings.weight[:, :q.shape[0]], pos[:emb.position_embeddings.num_embeddings] @ q.T,
                               atol=1e-5, rtol=1e-5)


def test_the_student_still_runs_after_the_init():
    teacher = _teacher()
    space = EfficientBertSpace.preset("tiny", fit_size=32)
    init_embeddings_from_teacher(space.supernet, teacher)
    model = space.subnet(space.random_arch(np.random.RandomState(1)))
    ids = torch.randint(0, 1024, (2, 12))
    out = model(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert torch.isfinite(out.logits).all()


def test_vocabulary_mismatch_is_a_clear_error():
    teacher = _teacher(vocab=500)
    space = EfficientBertSpace.preset("tiny", fit_size=32)
    before = space.supernet.embeddings.word_embeddings.weight.clone()
    with pytest.raises(CheckpointError, match="vocabulary has 500 tokens.*1024.*init_embeddings: random"):
        init_embeddings_from_teacher(space.supernet, teacher)
    assert torch.equal(before, space.supernet.embeddings.word_embeddings.weight)
