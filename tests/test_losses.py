"""KD losses against hand-computed values on small tensors."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nni_effbert.errors import ConfigError
from nni_effbert.kd.losses import (
    KDLoss,
    TeacherBatch,
    attention_loss,
    correlation_hidden_loss,
    hidden_loss,
    prediction_loss,
    uniform_layer_map,
    validate_layer_map,
)


def kd_cfg(**kw):
    base = dict(
        temperature=1.0, attention_weight=1.0, hidden_weight=1.0, prediction_weight=1.0,
        hidden_loss="mse", layer_map=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "ns,nt,expected",
    [(4, 12, [3, 6, 9, 12]), (6, 6, [1, 2, 3, 4, 5, 6]), (3, 4, [1, 2, 4]), (2, 6, [3, 6]), (4, 2, [1, 1, 1, 2])],
)
def test_uniform_layer_map(ns, nt, expected):
    assert uniform_layer_map(ns, nt) == expected


def test_validate_layer_map_errors():
    assert validate_layer_map([2, 4], 2, 4) == [2, 4]
    with pytest.raises(ConfigError, match="2 entries but the student has 3"):
        validate_layer_map([2, 4], 3, 4)
    with pytest.raises(ConfigError, match=r"\[0, 5\] are outside 1..4"):
        validate_layer_map([0, 5], 2, 4)


def test_attention_loss_hand_computed_with_padding():
    # B=1, H=1, T=2; the second token is padding, so only the (0, 0) entry counts.
    s = torch.tensor([[[[0.5, 0.5], [9.0, 9.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[1, 0]])
    assert attention_loss([s], [t], mask).item() == pytest.approx(0.25)
    # Two layer pairs are summed.
    assert attention_loss([s, s], [t, t], mask).item() == pytest.approx(0.5)
    # Without padding: mean over the 4 entries.
    full = torch.tensor([[1, 1]])
    expected = (0.25 + 0.25 + 81 + 81) / 4
    assert attention_loss([s], [t], full).item() == pytest.approx(expected)


def test_attention_loss_two_heads_and_head_mismatch():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    t2 = torch.full((1, 2, 2, 2), 0.5)
    mask = torch.ones(1, 2)
    # same head count: every entry differs by 0.5 -> 0.25
    assert attention_loss([s], [t2], mask).item() == pytest.approx(0.25)
    # teacher with 3 heads: head-averaged maps; student mean is all 0.5
    t3 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]] * 3])  # [1, 3, 2, 2]
    expected = ((0.5 - 1) ** 2 + 0.5**2 + (0.5 - 1) ** 2 + 0.5**2) / 4
    assert attention_loss([s], [t3], mask).item() == pytest.approx(expected)


def test_mse_hidden_loss_hand_computed():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.zeros(1, 2, 2)
    assert hidden_loss([s], [t], torch.tensor([[1, 1]])).item() == pytest.approx(30 / 4)
    assert hidden_loss([s], [t], torch.tensor([[1, 0]])).item() == pytest.approx(5 / 2)
    with pytest.raises(ValueError, match="fit_size"):
        hidden_loss([s], [torch.zeros(1, 2, 3)], torch.tensor([[1, 1]]))
    with pytest.raises(ConfigError, match="hidden_loss"):
        hidden_loss([s], [t], torch.tensor([[1, 1]]), kind="cosine")


def _np_corr_loss_reference(S, T, mask):
    """Straightforward loop version of correlation_hidden_loss for one layer pair."""

    def cos(a):
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        return a @ a.T

    def row_loss(rs, rt):
        vals = [1 - np.corrcoef(rs[i], rt[i])[0, 1] for i in range(rs.shape[0]) if rs.shape[1] >= 2]
        return vals

    tok = []
    for b in range(S.shape[0]):
        n = int(mask[b].sum())
        tok += row_loss(cos(S[b, :n]), cos(T[b, :n]))
    ps = np.stack([S[b, : int(mask[b].sum())].mean(0) for b in range(S.shape[0])])
    pt = np.stack([T[b, : int(mask[b].sum())].mean(0) for b in range(S.shape[0])])
    seq = row_loss(cos(ps), cos(pt))
    return np.mean(tok) + np.mean(seq)


def test_correlation_hidden_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    T = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)  # sizes may differ
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    got = correlation_hidden_loss([S], [T], mask).item()
    ref = _np_corr_loss_reference(S.numpy(), T.numpy(), mask.numpy())
    assert got == pytest.approx(ref, rel=1e-5)
    assert got > 0.1
    # padded positions must not matter
    S2 = S.clone()
    S2[1, 3:] = 100.0
    assert correlation_hidden_loss([S2], [T], mask).item() == pytest.approx(got, rel=1e-6)


def test_correlation_hidden_loss_ignores_scale_and_rotation():
    g = torch.Generator().manual_seed(1)
    T = torch.randn(4, 6, 8, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    S = 3.0 * T @ Q  # same relations, different scale and basis
    mask = torch.ones(4, 6)
    assert correlation_hidden_loss([S], [T], mask).item() == pytest.approx(0.0, abs=1e-5)
    assert hidden_loss([S], [T], mask, kind="correlation").item() == pytest.approx(0.0, abs=1e-5)
    assert hidden_loss([S], [T], mask, kind="mse").item() > 1.0


def test_prediction_loss_hand_computed():
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    # target (0.5, 0.5); student probs (0.75, 0.25)
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert prediction_loss(s, t, temperature=1.0).item() == pytest.approx(expected)
    # T = 2: student probs softmax(ln3/2, 0) = (sqrt3, 1)/(sqrt3+1)
    r3 = math.sqrt(3.0)
    expected_t2 = -(0.5 * math.log(r3 / (r3 + 1)) + 0.5 * math.log(1 / (r3 + 1)))
    assert prediction_loss(s, t, temperature=2.0).item() == pytest.approx(expected_t2)
    # batch mean
    s2 = torch.cat([s, torch.zeros(1, 2)])
    t2 = torch.zeros(2, 2)
    assert prediction_loss(s2, t2, 1.0).item() == pytest.approx((expected + math.log(2)) / 2)
    # regression -> MSE
    assert prediction_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), regression=True).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="num_labels"):
        prediction_loss(torch.zeros(1, 2), torch.zeros(1, 3))


def _outputs(B=2, T=3, L=2, H=2, D=4, C=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(B, T, D, generator=g) for _ in range(L + 1))
    atts = tuple(torch.softmax(torch.randn(B, H, T, T, generator=g), -1) for _ in range(L))
    logits = torch.randn(B, C, generator=g)
    return SimpleNamespace(logits=logits, hidden_states=hidden, attentions=atts)


def test_kdloss_combines_weighted_terms():
    st, te = _outputs(seed=0), _outputs(seed=1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    teacher = TeacherBatch(te.logits, list(te.hidden_states), list(te.attentions))
    fn = KDLoss(kd_cfg(attention_weight=2.0, hidden_weight=0.5, prediction_weight=3.0, temperature=2.0), 2, 4)
    assert fn.layer_map == [2, 4]
    assert fn.teacher_hidden_layers == [0, 2, 4] and fn.teacher_attention_layers == [2, 4]
    out = fn(st, teacher, mask)
    att = attention_loss(st.attentions, te.attentions, mask)
    hid = hidden_loss(st.hidden_states, te.hidden_states, mask)
    pred = prediction_loss(st.logits, te.logits, 2.0)
    assert out.attention.item() == pytest.approx(att.item())
    assert out.hidden.item() == pytest.approx(hid.item())
    assert out.prediction.item() == pytest.approx(pred.item())
    assert out.total.item() == pytest.approx(2 * att.item() + 0.5 * hid.item() + 3 * pred.item())
    assert set(out.as_dict()) == {"total", "attention", "hidden", "prediction"}


def test_kdloss_gradients_flow_to_student():
    st, te = _outputs(seed=0), _outputs(seed=1)
    leaf = st.hidden_states[1].clone().requires_grad_(True)
    st.hidden_states = (st.hidden_states[0], leaf, st.hidden_states[2])
    out = KDLoss(kd_cfg(), 2, 2)(st, TeacherBatch(te.logits, list(te.hidden_states), list(te.attentions)), torch.ones(2, 3))
    out.total.backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_kdloss_disabled_terms_and_regression():
    st, te = _outputs(C=1), _outputs(C=1, seed=3)
    fn = KDLoss(kd_cfg(attention_weight=0.0, hidden_weight=0.0), 2, 2)
    assert fn.teacher_hidden_layers == [] and fn.teacher_attention_layers == []
    out = fn(st, TeacherBatch(te.logits, [], []), torch.ones(2, 3))
    assert out.attention is None and out.hidden is None
    expected = torch.mean((st.logits - te.logits) ** 2).item()  # regression inferred from C == 1
    assert out.total.item() == pytest.approx(expected)


def test_kdloss_bad_settings():
    with pytest.raises(ConfigError, match="all loss weights are 0"):
        KDLoss(kd_cfg(attention_weight=0, hidden_weight=0, prediction_weight=0), 2, 2)
    with pytest.raises(ConfigError, match="temperature"):
        KDLoss(kd_cfg(temperature=0), 2, 2)
    with pytest.raises(ConfigError, match="hidden_loss"):
        KDLoss(kd_cfg(hidden_loss="l1"), 2, 2)
    with pytest.raises(ConfigError, match="layer_map"):
        KDLoss(kd_cfg(layer_map=[1, 2, 3]), 2, 4)
    st, te = _outputs(), _outputs(L=3)
    with pytest.raises(ValueError, match="aligned"):
        KDLoss(kd_cfg(), 2, 3)(st, TeacherBatch(te.logits, list(te.hidden_states), list(te.attentions)), torch.ones(2, 3))
