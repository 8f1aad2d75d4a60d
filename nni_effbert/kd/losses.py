"""Knowledge-distillation losses of TinyBERT / EfficientBERT.

References
----------
* Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
  EMNLP 2020 (attention MSE, hidden-state MSE through a learnt projection, soft CE).
* Dong et al., "EfficientBERT: Progressively Searching Multilayer Perceptron via Warm-up
  Knowledge Distillation", Findings of EMNLP 2021 (same three terms for search and warm-up).
* Huang, Guo and Wang, "Towards Efficient Pre-Trained Language Model via Feature
  Correlation Distillation", NeurIPS 2023 (token- and sequence-level relations compared by
  correlation; the optional ``hidden_loss='correlation'`` follows its idea, see
  :func:`correlation_hidden_loss` for the exact formula used here).

Conventions
-----------
* Layers are 1-based and layer 0 is the embedding output, as in HF ``hidden_states``.
  A *layer map* lists, for student layer ``i = 1..L``, the teacher layer it learns from.
* ``mask`` is the ``[B, T]`` attention mask of the (right-padded) batch; padded positions
  never contribute to a loss.
* Per-layer terms are **summed** over mapped layer pairs (TinyBERT's and EfficientBERT's
  choice), each term being a mean over valid positions.
* The soft cross-entropy is not multiplied by ``T**2`` (TinyBERT does not either); scale
  ``prediction_weight`` if a temperature far from 1 is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "HIDDEN_LOSS_KINDS",
    "uniform_layer_map",
    "validate_layer_map",
    "attention_loss",
    "hidden_loss",
    "mse_hidden_loss",
    "correlation_hidden_loss",
    "prediction_loss",
    "span_prediction_loss",
    "TeacherBatch",
    "KDLossOutput",
    "KDLoss",
]

HIDDEN_LOSS_KINDS = ("mse", "correlation")

_EPS = 1e-8


# ---------------------------------------------------------------------------------------
# Layer maps
# ---------------------------------------------------------------------------------------


def uniform_layer_map(n_student: int, n_teacher: int) -> List[int]:
    """Uniform student-to-teacher layer map.

    Student layer ``i`` (1-based) learns from teacher layer ``i * n_teacher // n_student``,
    so the last student layer always maps to the last teacher layer.

    Parameters
    ----------
    n_student, n_teacher : int
        Numbers of transformer layers (positive).

    Returns
    -------
    list of int
        ``n_student`` teacher layer ids in ``1..n_teacher``. When the student is deeper than
        the teacher, the formula would send its first layers to 0 (the embedding output,
        which has no attention map); those are clamped to teacher layer 1.

    Examples
    --------
    >>> uniform_layer_map(4, 12)
    [3, 6, 9, 12]
    >>> uniform_layer_map(6, 6)
    [1, 2, 3, 4, 5, 6]
    """
    if n_student < 1 or n_teacher < 1:
        raise ConfigError(
            f"layer counts must be positive, got n_student={n_student}, n_teacher={n_teacher}"
        )
    return [max(1, i * n_teacher // n_student) for i in range(1, n_student + 1)]


def validate_layer_map(layer_map: Sequence[int], n_student: int, n_teacher: int) -> List[int]:
    """Check a user-given layer map (``kd.layer_map``) and return it as a list.

    Raises
    ------
    ConfigError
        If it does not have one entry per student layer or an entry is not in
        ``1..n_teacher``.
    """
    lm = [int(v) for v in layer_map]
    if len(lm) != n_student:
        raise ConfigError(
            f"kd.layer_map has {len(lm)} entries but the student has {n_student} layers; "
            f"give one teacher layer (1..{n_teacher}) per student layer, or leave it empty "
            f"for the uniform map {uniform_layer_map(n_student, n_teacher)}"
        )
    bad = [v for v in lm if not 1 <= v <= n_teacher]
    if bad:
        raise ConfigError(
            f"kd.layer_map entries {bad} are outside 1..{n_teacher} (the teacher's layers; "
            "0 is the embedding output, which is always distilled into the student's)"
        )
    return lm


# ---------------------------------------------------------------------------------------
# Individual losses
# ---------------------------------------------------------------------------------------


def _check_pairs(name: str, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
    if len(student) != len(teacher):
        raise ValueError(
            f"{name}: {len(student)} student tensors but {len(teacher)} teacher tensors; "
            "the teacher side must already be aligned to the student's layers"
        )
    if len(student) == 0:
        raise ValueError(f"{name}: no layer pairs given")


def attention_loss(student_atts: Sequence[Tensor], teacher_atts: Sequence[Tensor], mask: Tensor) -> Tensor:
    r"""MSE between attention-probability maps, summed over mapped layer pairs.

    For each pair, with valid query/key pairs :math:`V = \{(b, i, j): m_{bi} m_{bj} = 1\}`
    and :math:`H` heads,

    .. math:: \ell = \frac{1}{H |V|} \sum_{h} \sum_{(b,i,j) \in V} (S_{bhij} - T_{bhij})^2 .

    When the student and teacher head counts differ, both maps are first averaged over
    heads (:math:`H = 1`).

    Parameters
    ----------
    student_atts, teacher_atts : sequence of Tensor ``[B, H, T, T]``
        Aligned pairs (teacher layers already selected by the layer map).
    mask : Tensor ``[B, T]``
        1 for real tokens, 0 for padding.

    Returns
    -------
    Tensor
        Scalar loss.
    """
    _check_pairs("attention_loss", student_atts, teacher_atts)
    m = mask.to(torch.float32)
    pair = (m[:, :, None] * m[:, None, :])[:, None]  # [B, 1, T, T]
    n_pairs = pair.sum().clamp_min(1.0)
    total = student_atts[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_atts, teacher_atts):
        s = s.float()
        t = t.to(device=s.device, dtype=torch.float32)
        if s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
            raise ValueError(f"attention_loss: student map {tuple(s.shape)} vs teacher map {tuple(t.shape)}")
        if s.shape[1] != t.shape[1]:
            s = s.mean(dim=1, keepdim=True)
            t = t.mean(dim=1, keepdim=True)
        sq = (s - t).pow(2) * pair
        total = total + sq.sum() / (n_pairs * s.shape[1])
    return total


def mse_hidden_loss(student_h: Sequence[Tensor], teacher_h: Sequence[Tensor], mask: Tensor) -> Tensor:
    r"""MSE between hidden states over real tokens, summed over layer pairs.

    .. math:: \ell = \frac{1}{D \sum_{bt} m_{bt}} \sum_{b,t} m_{bt} \lVert s_{bt} - t_{bt} \rVert^2

    for each pair, where :math:`D` is the (teacher) hidden size.
    """
    _check_pairs("hidden_loss", student_h, teacher_h)
    m = mask.to(torch.float32)
    n_tok = m.sum().clamp_min(1.0)
    total = student_h[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_h, teacher_h):
        s = s.float()
        t = t.to(device=s.device, dtype=torch.float32)
        if s.shape != t.shape:
            raise ValueError(
                f"hidden_loss: student hidden states {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                "the student's fit_size must equal the teacher's hidden_size"
            )
        total = total + ((s - t).pow(2) * m[..., None]).sum() / (n_tok * s.shape[-1])
    return total


def _cosine_relation(x: Tensor) -> Tensor:
    """Cosine-similarity matrix of the rows of ``x`` (``[..., N, D] -> [..., N, N]``)."""
    z = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return z @ z.transpose(-1, -2)


def _row_correlation_loss(rs: Tensor, rt: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid rows of ``1 - pearson(rs[row, valid cols], rt[row, valid cols])``.

    ``valid`` is a 0/1 tensor broadcastable to the relation matrices' shape ``[..., N, N]``
    that marks valid (row, column) entries. Rows with fewer than two valid columns carry
    no correlation and are skipped.
    """
    valid = valid.expand_as(rs).to(torch.float32)
    n = valid.sum(-1)  # valid columns per row
    use = n >= 2
    if not bool(use.any()):
        return rs.new_zeros(())
    n_ = n.clamp_min(1.0)[..., None]
    cs = (rs - (rs * valid).sum(-1, keepdim=True) / n_) * valid
    ct = (rt - (rt * valid).sum(-1, keepdim=True) / n_) * valid
    cov = (cs * ct).sum(-1)
    rho = cov / (cs.norm(dim=-1) * ct.norm(dim=-1)).clamp_min(_EPS)
    return (1.0 - rho)[use].mean()


def correlation_hidden_loss(student_h: Sequence[Tensor], teacher_h: Sequence[Tensor], mask: Tensor) -> Tensor:
    r"""Token- and sequence-level feature-correlation loss, summed over layer pairs.

    For one layer pair with student states :math:`S \in \mathbb{R}^{B \times T \times D_s}`
    and teacher states :math:`T \in \mathbb{R}^{B \times T \times D_t}` (the sizes may
    differ: only relations are compared):

    1. *Token relations*, per sequence :math:`b`: the cosine-similarity matrix of its
       real tokens, :math:`R^{tok}_b[i, j] = \cos(h_{bi}, h_{bj})` for real tokens
       :math:`i, j`.
    2. *Sequence relations*, per batch: with mean-pooled features over real tokens
       :math:`p_b = \sum_t m_{bt} h_{bt} / \sum_t m_{bt}`,
       :math:`R^{seq}[a, b] = \cos(p_a, p_b)`.
    3. Each relation matrix is compared row by row with Pearson's correlation
       :math:`\rho` (over the row's valid columns) instead of MSE, so that only the
       pattern of the relations must match, not their scale:

       .. math::
          \ell = \operatorname{mean}_{b,i}\bigl(1 - \rho(R^{tok,S}_b[i], R^{tok,T}_b[i])\bigr)
               + \operatorname{mean}_{a}\bigl(1 - \rho(R^{seq,S}[a], R^{seq,T}[a])\bigr).

    Rows with fewer than two valid entries (one-token sequences, a batch of one) have no
    defined correlation and are left out. This follows the idea of Huang et al. (NeurIPS
    2023); the paper's exact relation normalisation is not reproduced.
    """
    _check_pairs("hidden_loss", student_h, teacher_h)
    m = mask.to(torch.float32)
    tok_valid = m[:, :, None] * m[:, None, :]  # [B, T, T]
    n_tok = m.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    total = student_h[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_h, teacher_h):
        s = s.float()
        t = t.to(device=s.device, dtype=torch.float32)
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"hidden_loss: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        tok = _row_correlation_loss(_cosine_relation(s), _cosine_relation(t), tok_valid)
        ps = (s * m[..., None]).sum(1) / n_tok  # [B, D]
        pt = (t * m[..., None]).sum(1) / n_tok
        seq_valid = torch.ones(1, 1, device=s.device)
        seq = _row_correlation_loss(_cosine_relation(ps), _cosine_relation(pt), seq_valid)
        total = total + tok + seq
    return total


def hidden_loss(
    student_h: Sequence[Tensor], teacher_h: Sequence[Tensor], mask: Tensor, kind: str = "mse"
) -> Tensor:
    """Hidden-state distillation loss, embedding output included.

    Parameters
    ----------
    student_h : sequence of Tensor ``[B, T, D]``
        Student hidden states, already projected by its ``fit_dense`` to the teacher's size.
    teacher_h : sequence of Tensor ``[B, T, D]``
        The mapped teacher layers, aligned with ``student_h``.
    mask : Tensor ``[B, T]``
        Attention mask.
    kind : {'mse', 'correlation'}
        :func:`mse_hidden_loss` or :func:`correlation_hidden_loss`.
    """
    if kind == "mse":
        return mse_hidden_loss(student_h, teacher_h, mask)
    if kind == "correlation":
        return correlation_hidden_loss(student_h, teacher_h, mask)
    raise ConfigError(f"kd.hidden_loss must be one of {HIDDEN_LOSS_KINDS}, not {kind!r}")


def prediction_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, regression: bool = False
) -> Tensor:
    r"""Soft cross-entropy at temperature :math:`\tau` (MSE for regression).

    .. math:: \ell = -\frac{1}{B} \sum_b \sum_c \operatorname{softmax}(t_b/\tau)_c
              \log \operatorname{softmax}(s_b/\tau)_c

    Parameters
    ----------
    student_logits, teacher_logits : Tensor ``[B, C]``
    temperature : float
        Positive softmax temperature.
    regression : bool
        If True, the mean squared error between the (single) outputs is used instead.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"prediction_loss: student logits {tuple(student_logits.shape)} vs teacher "
            f"{tuple(teacher_logits.shape)}; student and teacher must have the same num_labels"
        )
    s = student_logits.float()
    t = teacher_logits.to(device=s.device, dtype=torch.float32)
    if regression:
        return F.mse_loss(s, t)
    if not temperature > 0:
        raise ConfigError(f"kd.temperature must be positive, got {temperature}")
    target = F.softmax(t / temperature, dim=-1)
    return -(target * F.log_softmax(s / temperature, dim=-1)).sum(-1).mean()


def span_prediction_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                         temperature: float = 1.0) -> Tensor:
    r"""Soft cross-entropy of span QA: over token positions, for the start and the end logits.

    With :math:`P = \{i: m_{bi} = 1\}` the valid positions of row :math:`b`,

    .. math:: \ell = \frac{1}{2} \sum_{k \in \{start, end\}} -\frac{1}{B} \sum_b \sum_{i \in P}
              \operatorname{softmax}_P(t^k_b/\tau)_i \log \operatorname{softmax}_P(s^k_b/\tau)_i

    (the mean of the start and end terms, as BERT's QA loss averages its two cross-entropies).
    Padded positions take part in neither softmax.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor ``[B, T, 2]``
        Start (``[..., 0]``) and end (``[..., 1]``) logits per token.
    mask : Tensor ``[B, T]``
        Attention mask; 0 marks padding.
    temperature : float
        Positive softmax temperature.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3 or student_logits.shape[-1] != 2:
        raise ValueError(
            f"span_prediction_loss: student logits {tuple(student_logits.shape)} vs teacher "
            f"{tuple(teacher_logits.shape)}; both must be [B, T, 2] (start, end) over the same padded batch"
        )
    if not temperature > 0:
        raise ConfigError(f"kd.temperature must be positive, got {temperature}")
    s = student_logits.float() / temperature
    t = teacher_logits.to(device=s.device, dtype=torch.float32) / temperature
    valid = mask.to(device=s.device).bool()[..., None].expand_as(s)  # [B, T, 2]
    low = torch.finfo(torch.float32).min
    target = F.softmax(t.masked_fill(~valid, low), dim=1)
    logp = F.log_softmax(s.masked_fill(~valid, low), dim=1)
    # torch.where, not a product: 0 * log(~0) at padded positions must not turn into NaN.
    per_row = -torch.where(valid, target * logp, torch.zeros_like(logp)).sum(1)  # [B, 2]
    return per_row.mean()


# ---------------------------------------------------------------------------------------
# Combined loss
# ---------------------------------------------------------------------------------------


@dataclass
class TeacherBatch:
    """Teacher outputs for one batch, aligned with the student's layers.

    Attributes
    ----------
    logits : Tensor ``[B, C]`` (``[B, T, 2]`` start / end logits for span QA)
    hidden_states : list of Tensor ``[B, T, D]``
        One per student hidden state (embedding output first): ``L + 1`` tensors, or empty
        when hidden distillation is off.
    attentions : list of Tensor ``[B, H, T, T]``
        One per student layer (``L`` tensors), or empty when attention distillation is off.
    """

    logits: Tensor
    hidden_states: List[Tensor]
    attentions: List[Tensor]

    def to(self, device) -> "TeacherBatch":
        """Move every tensor to ``device``."""
        return TeacherBatch(
            self.logits.to(device),
            [h.to(device) for h in self.hidden_states],
            [a.to(device) for a in self.attentions],
        )


@dataclass
class KDLossOutput:
    """Weighted KD loss and its unweighted parts.

    Attributes
    ----------
    total : Tensor
        Scalar to back-propagate: the weighted sum of the enabled terms.
    attention, hidden, prediction : Tensor or None
        Unweighted terms; None when the term's weight is 0 (it is then not computed).
    """

    total: Tensor
    attention: Optional[Tensor]
    hidden: Optional[Tensor]
    prediction: Optional[Tensor]

    def as_dict(self) -> Dict[str, float]:
        """Python floats of the computed terms, for logging."""
        out = {"total": float(self.total.detach())}
        for name in ("attention", "hidden", "prediction"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach())
        return out


class KDLoss(nn.Module):
    """TinyBERT-style KD loss: weighted attention, hidden-state and prediction terms.

    Parameters
    ----------
    kd_cfg : object
        Anything with attributes ``temperature``, ``attention_weight``, ``hidden_weight``,
        ``prediction_weight``, ``hidden_loss`` (``'mse'`` or ``'correlation'``) and
        optionally ``layer_map`` (None/empty for the uniform map) -- e.g. the ``kd``
        section of :class:`~nni_effbert.config.ExperimentConfig`.
    n_student_layers, n_teacher_layers : int
        Transformer layer counts.
    regression : bool, optional
        Use MSE on the logits. By default inferred per batch from the logits' width
        (``num_labels == 1`` means regression, as in HF).

    Attributes
    ----------
    layer_map : list of int
        Teacher layer (1-based) of each student layer.
    teacher_hidden_layers : list of int
        Teacher ``hidden_states`` indices the loss needs: ``[0] + layer_map`` (empty if the
        hidden weight is 0). Pass these to the teacher cache.
    teacher_attention_layers : list of int
        Teacher layers (1-based) whose attention maps are needed (empty if the attention
        weight is 0).

    Examples
    --------
    >>> loss_fn = KDLoss(cfg.kd, n_student_layers=6, n_teacher_layers=12)  # doctest: +SKIP
    >>> out = loss_fn(student_out, teacher_batch, batch["attention_mask"])   # doctest: +SKIP
    >>> out.total.backward()                                                 # doctest: +SKIP
    """

    def __init__(self, kd_cfg, n_student_layers: int, n_teacher_layers: int, regression: Optional[bool] = None):
        super().__init__()
        self.temperature = float(kd_cfg.temperature)
        self.attention_weight = float(kd_cfg.attention_weight)
        self.hidden_weight = float(kd_cfg.hidden_weight)
        self.prediction_weight = float(kd_cfg.prediction_weight)
        self.hidden_kind = str(kd_cfg.hidden_loss)
        self.regression = regression
        for name in ("attention_weight", "hidden_weight", "prediction_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"kd.{name} must be >= 0, got {getattr(self, name)}")
        if self.attention_weight == self.hidden_weight == self.prediction_weight == 0:
            raise ConfigError("kd: all loss weights are 0; set at least one of attention/hidden/prediction_weight")
        if self.hidden_kind not in HIDDEN_LOSS_KINDS:
            raise ConfigError(f"kd.hidden_loss must be one of {HIDDEN_LOSS_KINDS}, not {self.hidden_kind!r}")
        if not self.temperature > 0:
            raise ConfigError(f"kd.temperature must be positive, got {self.temperature}")
        self.n_student_layers = int(n_student_layers)
        self.n_teacher_layers = int(n_teacher_layers)
        custom = getattr(kd_cfg, "layer_map", None)
        if custom:
            self.layer_map = validate_layer_map(custom, self.n_student_layers, self.n_teacher_layers)
        else:
            self.layer_map = uniform_layer_map(self.n_student_layers, self.n_teacher_layers)

    @property
    def teacher_hidden_layers(self) -> List[int]:
        return [0] + list(self.layer_map) if self.hidden_weight > 0 else []

    @property
    def teacher_attention_layers(self) -> List[int]:
        return list(self.layer_map) if self.attention_weight > 0 else []

    def extra_repr(self) -> str:
        return (
            f"layer_map={self.layer_map}, T={self.temperature}, weights=(att={self.attention_weight}, "
            f"hid={self.hidden_weight}, pred={self.prediction_weight}), hidden_loss={self.hidden_kind!r}"
        )

    def forward(self, student_out, teacher: TeacherBatch, attention_mask: Tensor) -> KDLossOutput:
        """Compute the loss.

        Parameters
        ----------
        student_out : StudentOutput
            ``logits [B, C]`` (span QA: ``[B, T, 2]``, scored by :func:`span_prediction_loss`),
            ``hidden_states`` (L+1 tensors ``[B, T, fit]``),
            ``attentions`` (L tensors ``[B, H, T, T]``).
        teacher : TeacherBatch
            Teacher outputs aligned with the student (see :class:`TeacherBatch`).
        attention_mask : Tensor ``[B, T]``
        """
        L = self.n_student_layers
        total = student_out.logits.new_zeros((), dtype=torch.float32)
        att = hid = pred = None
        if self.attention_weight > 0:
            if len(student_out.attentions) != L:
                raise ValueError(f"KDLoss: student returned {len(student_out.attentions)} attention maps, expected {L}")
            att = attention_loss(student_out.attentions, teacher.attentions, attention_mask)
            total = total + self.attention_weight * att
        if self.hidden_weight > 0:
            if len(student_out.hidden_states) != L + 1:
                raise ValueError(
                    f"KDLoss: student returned {len(student_out.hidden_states)} hidden states, "
                    f"expected {L + 1} (embedding output first)"
                )
            hid = hidden_loss(student_out.hidden_states, teacher.hidden_states, attention_mask, self.hidden_kind)
            total = total + self.hidden_weight * hid
        if self.prediction_weight > 0:
            if student_out.logits.dim() == 3:  # span QA: [B, T, 2] start / end logits per token
                pred = span_prediction_loss(student_out.logits, teacher.logits, attention_mask, self.temperature)
            else:
                regression = self.regression if self.regression is not None else student_out.logits.shape[-1] == 1
                pred = prediction_loss(student_out.logits, teacher.logits, self.temperature, regression)
            total = total + self.prediction_weight * pred
        return KDLossOutput(total=total, attention=att, hidden=hid, prediction=pred)
