"""Start a student (or the supernet) from the teacher's own weights, most important units first.

Pure weight surgery: what the experiment asks for (``warmup.init: teacher``, ``student.preset:
teacher``) and the provenance an export records are read in :mod:`nni_effbert.kd.student_start`,
which calls :func:`init_from_teacher` on the supernet before its first warm-up and builds the
student's sizes from the teacher's config with :func:`teacher_student_fields`.

The approach is DynaBERT's (Hou et al., "DynaBERT: Dynamic BERT with Adaptive Width and
Depth", NeurIPS 2020, Sec. 2.1) and NNI's own pruning + distillation: the student's layers are
slices of the teacher's, with attention heads and FFN neurons *rewired* so that the most
important ones come first. The supernet's nested width slices (the first ``width`` units of
``linear1``) then keep the most important neurons at every width.

Importance (:func:`taylor_importance`, the default)
    First-order Taylor importance of a unit: a mask ``m`` (all ones) multiplies the unit's
    output, and the importance is ``I = sum over batches |dL/dm|`` with ``L`` the task loss of
    the fine-tuned teacher (Molchanov et al., "Importance Estimation for Neural Network
    Pruning", CVPR 2019; Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS
    2019, for heads). DynaBERT uses exactly this for heads and, for neurons, the same
    expression written with weight gradients (its ``w2 * w2.grad`` term equals our mask on the
    FFN activation; it adds a second ``|w1 * w1.grad + b1 * b1.grad|`` term that we leave
    out). The masks sit on: each head's context vector (heads and value dims), each query
    output dim (query/key dims within a head), each FFN activation (neurons), and one mask
    shared by every LayerNorm output of the residual stream (hidden units, as CoFi's shared
    hidden mask: Xia et al., "Structured Pruning Learns Compact and Accurate Models", ACL
    2022). Batches are drawn from the task's train split with a seeded order; the teacher is in
    eval mode (no dropout), so the scores are deterministic for a seed.
:func:`magnitude_importance`
    Weight magnitude (no data): products of the L2 norms of a unit's input rows and output
    columns. Cheaper, usually worse (DynaBERT Table 6 compares both for heads).

Mapping (:func:`init_from_teacher`)
    * student layer ``i`` takes teacher layer ``layer_map[i]`` (``kd.layer_map``; uniform by
      default, :func:`~nni_effbert.kd.losses.uniform_layer_map`);
    * hidden units: the student's ``hidden_size`` teacher coordinates with the largest hidden
      importance, the same ones in every layer (the residual stream must be one basis);
      ``fit_dense`` maps them back to the teacher's coordinates (the identity when the sizes
      match);
    * attention: the ``num_attention_heads`` most important heads (all heads, in the teacher's
      order, when the counts match, so attention maps stay comparable head by head), and within
      each head the most important query/key dims and value dims when the student's heads are
      narrower; the query is scaled by ``sqrt(d_student / d_teacher)`` so the kept part of the
      dot product keeps the teacher's ``1 / sqrt(d_teacher)`` temperature;
    * MLP: ``linear1`` rows / ``linear2`` columns are the teacher FFN neurons in decreasing
      importance (a permutation when the widths match, which computes the same function);
      **stacked MLPs beyond the first start as copies of the first**: the supernet samples the
      stack depth independently of the width, so every stacked MLP must also have its most
      important units first; a copy is the only teacher-derived MLP whose input distribution
      (the output of a teacher FFN block) matches what it sees, whereas the next teacher
      layer's FFN expects the output of that layer's attention; and at stack 1 (the BERT
      baseline) the extra copies are unused;
    * embeddings: the teacher's tables at the kept coordinates; with a factorised table
      (``embedding_size < hidden_size``) the word table is their best rank-``E`` fit (truncated
      SVD) and ``embedding_transformation`` its right singular vectors; LayerNorms, pooler and
      classifier (span QA: ``qa_outputs``, start / end per token) are the teacher's at the kept
      coordinates.

With a student of the teacher's shape (same layers, hidden, heads, intermediate size,
``embedding_size = hidden_size``, stack 1, BERT's expression) the student computes the teacher's
function exactly (up to float rounding) for BERT and MiniLM teachers: the modelling code is
BERT's (post-LayerNorm, exact-erf GELU, tanh pooler over ``[CLS]``). Where a teacher family
departs from BERT the student cannot follow exactly and the init is only a close start: GELU
variants other than ``gelu`` (``hidden_act``), DistilBERT's and ELECTRA's classification heads
(ReLU / GELU instead of the tanh pooler), and RoBERTa's position ids (which start at
``padding_idx + 1``: we shift the table, exact for right-padded batches).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from .losses import uniform_layer_map, validate_layer_map

__all__ = [
    "IMPORTANCE_METHODS",
    "init_embeddings_from_teacher",
    "TeacherParts",
    "Importance",
    "teacher_parts",
    "teacher_student_fields",
    "taylor_importance",
    "magnitude_importance",
    "init_from_teacher",
]


logger = logging.getLogger(__name__)

IMPORTANCE_METHODS = ("taylor", "magnitude")

# Teacher families whose position ids start after the padding index (HF create_position_ids_from_input_ids).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


# ---------------------------------------------------------------------------------------------
# The teacher's modules, whatever the family
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerParts:
    """The linear / LayerNorm modules of one teacher transformer layer (post-LN BERT block)."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    attn_ln: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_ln: nn.LayerNorm


@dataclass
class TeacherParts:
    """Where a BERT-family teacher keeps what the student needs.

    Attributes
    ----------
    word, position, token_type : nn.Embedding (token_type may be None)
    embed_ln : nn.LayerNorm
    position_offset : int
        Row of the teacher's position table used for position 0 (RoBERTa: ``pad + 1``).
    layers : list of LayerParts
    pooler : nn.Linear or None
        The dense layer applied to the first token before the classifier.
    classifier : nn.Linear
        The output layer: the classifier, or a QA model's ``qa_outputs`` (start / end logits).
    num_heads : int
    hidden_act : str
    span : bool
        ``classifier`` is a QA model's ``qa_outputs`` (start / end logits per token, no pooler).
    """

    word: nn.Embedding
    position: nn.Embedding
    token_type: Optional[nn.Embedding]
    embed_ln: nn.LayerNorm
    position_offset: int
    layers: List[LayerParts]
    pooler: Optional[nn.Linear]
    classifier: nn.Linear
    num_heads: int
    hidden_act: str
    span: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.word.embedding_dim)

    @property
    def intermediate_size(self) -> int:
        return int(self.layers[0].ffn_in.out_features)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_norms(self) -> List[nn.LayerNorm]:
        """Every LayerNorm whose output is the residual stream."""
        return [self.embed_ln] + [ln for lp in self.layers for ln in (lp.attn_ln, lp.ffn_ln)]


def teacher_parts(teacher: nn.Module) -> TeacherParts:
    """Find the embedding, layer and head modules of a Hugging Face BERT-family teacher.

    Supports the BERT layout (``encoder.layer[i].attention.self.query`` ...: BERT, MiniLM,
    RoBERTa, XLM-R, ELECTRA, CamemBERT, ...) and DistilBERT's (``transformer.layer[i].attention.q_lin``).

    Raises
    ------
    CheckpointError
        If the model has neither layout.
    """
    config = teacher.config
    base = getattr(teacher, "base_model", teacher)
    emb = getattr(base, "embeddings", None)
    layers: List[LayerParts] = []
    encoder = getattr(base, "encoder", None)
    if emb is not None and encoder is not None and hasattr(encoder, "layer") and \
            hasattr(encoder.layer[0].attention, "self"):
        for layer in encoder.layer:
            att = layer.attention
            layers.append(LayerParts(att.self.query, att.self.key, att.self.value, att.output.dense,
                                     att.output.LayerNorm, layer.intermediate.dense, layer.output.dense,
                                     layer.output.LayerNorm))
    elif emb is not None and hasattr(base, "transformer") and hasattr(base.transformer, "layer"):
        for layer in base.transformer.layer:  # DistilBERT
            att = layer.attention
            layers.append(LayerParts(att.q_lin, att.k_lin, att.v_lin, att.out_lin, layer.sa_layer_norm,
                                     layer.ffn.lin1, layer.ffn.lin2, layer.output_layer_norm))
    else:
        raise CheckpointError(
            f"warmup.init: teacher: {type(teacher).__name__} has no BERT-style layers "
            "(encoder.layer[i].attention.self.query or DistilBERT's transformer.layer[i]); "
            "use warmup.init: teacher_embeddings or random"
        )
    head = getattr(teacher, "classifier", None)
    pooler = None
    span = isinstance(getattr(teacher, "qa_outputs", None), nn.Linear)
    if span:  # span QA: start / end per token, no pooler
        classifier = teacher.qa_outputs
    elif isinstance(head, nn.Linear):  # BERT: pooler.dense + tanh, then classifier
        classifier = head
        pooler_mod = getattr(base, "pooler", None)
        pooler = getattr(pooler_mod, "dense", None)
    elif head is not None and hasattr(head, "out_proj"):  # RoBERTa / ELECTRA heads
        classifier, pooler = head.out_proj, head.dense
    else:
        raise CheckpointError(f"warmup.init: teacher: cannot find the classifier of {type(teacher).__name__}")
    if hasattr(teacher, "pre_classifier"):  # DistilBERT
        pooler = teacher.pre_classifier
    model_type = str(getattr(config, "model_type", ""))
    offset = int(getattr(config, "pad_token_id", 0) or 0) + 1 if model_type in _OFFSET_POSITIONS else 0
    act = getattr(config, "hidden_act", None) or getattr(config, "activation", "gelu")
    return TeacherParts(
        word=emb.word_embeddings, position=emb.position_embeddings,
        token_type=getattr(emb, "token_type_embeddings", None), embed_ln=emb.LayerNorm,
        position_offset=offset, layers=layers, pooler=pooler, classifier=classifier,
        num_heads=int(getattr(config, "num_attention_heads", None) or getattr(config, "n_heads")),
        hidden_act=str(act), span=span,
    )


def teacher_student_fields(teacher_config) -> Dict[str, Any]:
    """``EfficientBertConfig`` fields of ``student.preset: teacher``: the teacher's own shape.

    Hidden size, layers, heads, ``intermediate_size`` (the FFN size, which the width choices
    are fractions of), vocabulary, positions, token types, LayerNorm epsilon and dropout come
    from the teacher; ``embedding_size`` is the hidden size (no factorisation, so
    ``warmup.init: teacher`` copies the embedding table exactly; set
    ``student.overrides.embedding_size`` to factorise it).
    """
    c = teacher_config
    hidden = int(c.hidden_size if hasattr(c, "hidden_size") else c.dim)
    fields = {
        "vocab_size": int(c.vocab_size),
        "embedding_size": hidden,
        "hidden_size": hidden,
        "num_hidden_layers": int(getattr(c, "num_hidden_layers", None) or c.n_layers),
        "num_attention_heads": int(getattr(c, "num_attention_heads", None) or c.n_heads),
        "intermediate_size": int(getattr(c, "intermediate_size", None) or c.hidden_dim),
        "max_position_embeddings": int(c.max_position_embeddings),
        "type_vocab_size": int(getattr(c, "type_vocab_size", 2) or 2),
        "layer_norm_eps": float(getattr(c, "layer_norm_eps", 1e-12)),
        "hidden_dropout_prob": float(getattr(c, "hidden_dropout_prob", getattr(c, "dropout", 0.1))),
        "attention_probs_dropout_prob": float(getattr(c, "attention_probs_dropout_prob",
                                                      getattr(c, "attention_dropout", 0.1))),
        "fit_size": hidden,
    }
    offset = int(getattr(c, "pad_token_id", 0) or 0) + 1 if str(getattr(c, "model_type", "")) in _OFFSET_POSITIONS else 0
    fields["max_position_embeddings"] -= offset  # rows before the offset are never used
    return fields


# ---------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Importance scores of a teacher's units (larger = more important).

    Attributes
    ----------
    heads : Tensor ``[layers, heads]``
    qk_dims, v_dims : Tensor ``[layers, hidden]``
        Per query/key dim and per value dim (head ``h`` owns columns ``h*d .. (h+1)*d - 1``).
    neurons : Tensor ``[layers, intermediate]``
    hidden : Tensor ``[hidden]``
    method : str
    batches : int
    """

    heads: Tensor
    qk_dims: Tensor
    v_dims: Tensor
    neurons: Tensor
    hidden: Tensor
    method: str
    batches: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"heads": self.heads, "qk_dims": self.qk_dims, "v_dims": self.v_dims, "neurons": self.neurons,
                "hidden": self.hidden, "method": self.method, "batches": self.batches, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Importance":
        return cls(**{k: d[k] for k in ("heads", "qk_dims", "v_dims", "neurons", "hidden", "method", "batches")},
                   meta=dict(d.get("meta") or {}))


def _model_inputs(batch: Mapping[str, Tensor], device) -> Dict[str, Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def taylor_importance(teacher: nn.Module, batches: Iterable[Mapping[str, Tensor]], *, regression: bool = False,
                      device: Any = "cpu") -> Importance:
    """First-order Taylor importance of heads, dims, neurons and hidden units (see the module doc).

    Parameters
    ----------
    teacher : transformers model
        The fine-tuned teacher (kept in eval mode; its weights are not changed).
    batches : iterable of dict
        Padded task batches with ``labels`` (``data.make_loader`` batches).
    regression : bool
        MSE loss on the single logit instead of cross-entropy.

    Returns
    -------
    Importance
        ``I = sum over batches |dL/dm|`` for a mask ``m`` on each unit.
    """
    parts = teacher_parts(teacher)
    n_l, h, d, n_i = len(parts.layers), parts.hidden_size, parts.head_size, parts.intermediate_size
    masks = {
        "q": torch.ones(n_l, h, requires_grad=True),
        "ctx": torch.ones(n_l, h, requires_grad=True),
        "ffn": torch.ones(n_l, n_i, requires_grad=True),
        "hidden": torch.ones(h, requires_grad=True),
    }
    sums = {"heads": torch.zeros(n_l, parts.num_heads, dtype=torch.float64),
            "qk": torch.zeros(n_l, h, dtype=torch.float64), "v": torch.zeros(n_l, h, dtype=torch.float64),
            "ffn": torch.zeros(n_l, n_i, dtype=torch.float64), "hidden": torch.zeros(h, dtype=torch.float64)}
    handles = []

    def out_mask(m):
        return lambda _mod, _inp, out: out * m.to(out.dtype)

    def in_mask(m):
        return lambda _mod, inp: (inp[0] * m.to(inp[0].dtype),) + tuple(inp[1:])

    for i, lp in enumerate(parts.layers):
        handles.append(lp.query.register_forward_hook(out_mask(masks["q"][i])))
        handles.append(lp.attn_out.register_forward_pre_hook(in_mask(masks["ctx"][i])))
        handles.append(lp.ffn_out.register_forward_pre_hook(in_mask(masks["ffn"][i])))
    for ln in parts.layer_norms():
        handles.append(ln.register_forward_hook(out_mask(masks["hidden"])))
    was_training = teacher.training
    teacher.eval()
    n = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                out = teacher(**_model_inputs(batch, device), output_hidden_states=False, output_attentions=False)
                if getattr(out, "start_logits", None) is not None:  # span QA: the start and end positions' CE
                    loss = (F.cross_entropy(out.start_logits.float(), batch["start_positions"].to(device).long())
                            + F.cross_entropy(out.end_logits.float(), batch["end_positions"].to(device).long())) / 2
                else:
                    labels = batch["labels"].to(device)
                    logits = out.logits.float()
                    loss = F.mse_loss(logits[:, 0], labels.float()) if regression else \
                        F.cross_entropy(logits, labels.long())
                grads = torch.autograd.grad(loss, [masks[k] for k in ("q", "ctx", "ffn", "hidden")])
                gq, gc, gf, gh = (g.detach().double().cpu() for g in grads)
                sums["qk"] += gq.abs()
                sums["v"] += gc.abs()
                sums["heads"] += gc.view(n_l, parts.num_heads, d).sum(-1).abs()
                sums["ffn"] += gf.abs()
                sums["hidden"] += gh.abs()
                n += 1
    finally:
        for hd in handles:
            hd.remove()
        teacher.train(was_training)
    if n == 0:
        raise CheckpointError("Taylor importance needs at least one batch of task data; the train split is empty")
    return Importance(heads=sums["heads"].float(), qk_dims=sums["qk"].float(), v_dims=sums["v"].float(),
                      neurons=sums["ffn"].float(), hidden=sums["hidden"].float(), method="taylor", batches=n)


@torch.no_grad()
def magnitude_importance(teacher: nn.Module) -> Importance:
    """Weight-magnitude importance (no data): norms of each unit's input rows times output columns."""
    parts = teacher_parts(teacher)
    d = parts.head_size
    heads, qk, v, ffn = [], [], [], []
    for lp in parts.layers:
        wq, wk, wv, wo = (m.weight.detach().float().cpu() for m in (lp.query, lp.key, lp.value, lp.attn_out))
        qk_i = wq.norm(dim=1) * wk.norm(dim=1)
        v_i = wv.norm(dim=1) * wo.norm(dim=0)
        qk.append(qk_i)
        v.append(v_i)
        heads.append((qk_i + v_i).view(parts.num_heads, d).sum(-1))
        ffn.append(lp.ffn_in.weight.detach().float().cpu().norm(dim=1) * lp.ffn_out.weight.detach().float().cpu().norm(dim=0))
    hidden = parts.word.weight.detach().float().cpu().norm(dim=0)
    return Importance(heads=torch.stack(heads), qk_dims=torch.stack(qk), v_dims=torch.stack(v),
                      neurons=torch.stack(ffn), hidden=hidden, method="magnitude")


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, largest first; ties keep the lower index (deterministic)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k]


# ---------------------------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------------------------


def _check(condition: bool, what: str, student: Any, teacher: Any) -> None:
    if not condition:
        raise CheckpointError(
            f"warmup.init: teacher: the student's {what} ({student}) does not fit the teacher's ({teacher}); "
            "shrink the student (student.overrides) or use warmup.init: teacher_embeddings"
        )


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, importance: Optional[Importance] = None,
                      layer_map: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Overwrite ``student``'s weights with (slices of) the teacher's, most important units first.

    Parameters
    ----------
    student : EfficientBertModel
        A student or the supernet (``space.supernet``); changed in place.
    teacher : transformers model
        A BERT-family sequence-classification teacher (see :func:`teacher_parts`).
    importance : Importance, optional
        Unit scores; default :func:`magnitude_importance` (needs no data). Only used where the
        student is narrower than the teacher.
    layer_map : sequence of int, optional
        1-based teacher layer per student layer (``kd.layer_map``); default uniform.

    Returns
    -------
    dict
        What was mapped: ``layer_map``, ``hidden_units``, ``heads`` per layer, ``importance``.

    Raises
    ------
    CheckpointError
        On another vocabulary, a student wider than the teacher anywhere (hidden size, heads,
        head size, FFN size, positions, labels), or a teacher without BERT-style layers; the
        message names both shapes. Nothing is written in that case.
    """
    parts = teacher_parts(teacher)
    cfg = student.config
    h_t, h_s = parts.hidden_size, int(cfg.hidden_size)
    a_t, a_s = parts.num_heads, int(cfg.num_attention_heads)
    d_t, d_s = h_t // a_t, h_s // a_s
    n_t, n_s = len(parts.layers), len(student.layers)
    vocab_t = parts.word.num_embeddings
    _check(vocab_t == int(cfg.vocab_size), "vocabulary", f"{cfg.vocab_size} tokens", f"{vocab_t} tokens")
    _check(h_s <= h_t, "hidden size", h_s, h_t)
    _check(a_s <= a_t, "attention heads", a_s, a_t)
    _check(d_s <= d_t, "attention head size", d_s, d_t)
    w_s = student.layers[0].mlps[0].linear1.out_features
    _check(w_s <= parts.intermediate_size, "MLP width (intermediate_size)", w_s, parts.intermediate_size)
    n_pos = parts.position.num_embeddings - parts.position_offset
    _check(student.embeddings.position_embeddings.num_embeddings <= n_pos, "max_position_embeddings",
           student.embeddings.position_embeddings.num_embeddings, n_pos)
    span = getattr(student, "head", "sequence") == "span"
    _check(span == parts.span, "head", "span (start / end logits)" if span else "sequence classifier",
           "span (start / end logits)" if parts.span else "sequence classifier")
    student_head = student.qa_outputs if span else student.classifier
    _check(student_head.out_features == parts.classifier.out_features, "number of labels",
           student_head.out_features, parts.classifier.out_features)
    if student.fit_dense.out_features != h_t:
        raise CheckpointError(f"warmup.init: teacher: the student's fit_size ({student.fit_dense.out_features}) "
                              f"must be the teacher's hidden size ({h_t})")
    lmap = uniform_layer_map(n_s, n_t) if layer_map is None else validate_layer_map(layer_map, n_s, n_t)
    if importance is None:
        importance = magnitude_importance(teacher)
    if parts.hidden_act != "gelu":
        logger.warning("teacher hidden_act is %r; the student's BERT expression uses exact (erf) gelu, so the "
                       "initialised student approximates the teacher", parts.hidden_act)

    def t(x: Tensor) -> Tensor:
        return x.detach().float().cpu()

    sel = torch.arange(h_t) if h_s == h_t else torch.sort(_top(importance.hidden, h_s)).values
    # --- embeddings --------------------------------------------------------------------------
    emb = student.embeddings
    words = t(parts.word.weight)[:, sel]  # [V, H_s]
    e = emb.word_embeddings.embedding_dim
    if e >= h_s:
        word = torch.zeros(words.shape[0], e)
        word[:, :h_s] = words
        transform = torch.zeros(h_s, e)
        transform[:, :h_s] = torch.eye(h_s)
    else:  # factorised table: the best rank-E fit of the kept columns
        u, s, vt = torch.linalg.svd(words, full_matrices=False)
        word = u[:, :e] * s[:e]
        transform = vt[:e].T.contiguous()
    emb.word_embeddings.weight.copy_(word)
    emb.embedding_transformation.weight.copy_(transform)
    emb.embedding_transformation.bias.zero_()
    n_pos_s = emb.position_embeddings.num_embeddings
    off = parts.position_offset
    emb.position_embeddings.weight.copy_(t(parts.position.weight)[off:off + n_pos_s][:, sel])
    if parts.token_type is not None:
        n_tt = min(emb.token_type_embeddings.num_embeddings, parts.token_type.num_embeddings)
        emb.token_type_embeddings.weight.zero_()
        emb.token_type_embeddings.weight[:n_tt].copy_(t(parts.token_type.weight)[:n_tt][:, sel])
    else:
        emb.token_type_embeddings.weight.zero_()
    _copy_ln(emb.LayerNorm, parts.embed_ln, sel)

    # --- layers -------------------------------------------------------------------------------
    scale = math.sqrt(d_s / d_t)
    heads_used = []
    for i, layer in enumerate(student.layers):
        ti = lmap[i] - 1
        lp = parts.layers[ti]
        heads = torch.arange(a_t) if a_s == a_t else _top(importance.heads[ti], a_s)
        heads_used.append([int(x) for x in heads])
        q_rows, v_rows = [], []
        for hd in heads.tolist():
            cols = torch.arange(hd * d_t, (hd + 1) * d_t)
            if d_s == d_t:
                q_rows.append(cols)
                v_rows.append(cols)
            else:
                q_rows.append(cols[torch.sort(_top(importance.qk_dims[ti][cols], d_s)).values])
                v_rows.append(cols[torch.sort(_top(importance.v_dims[ti][cols], d_s)).values])
        q_idx, v_idx = torch.cat(q_rows), torch.cat(v_rows)
        att = layer.attention
        att.query.weight.copy_(t(lp.query.weight)[q_idx][:, sel] * scale)
        att.query.bias.copy_(t(lp.query.bias)[q_idx] * scale)
        att.key.weight.copy_(t(lp.key.weight)[q_idx][:, sel])
        att.key.bias.copy_(t(lp.key.bias)[q_idx])
        att.value.weight.copy_(t(lp.value.weight)[v_idx][:, sel])
        att.value.bias.copy_(t(lp.value.bias)[v_idx])
        att.dense.weight.copy_(t(lp.attn_out.weight)[sel][:, v_idx])
        att.dense.bias.copy_(t(lp.attn_out.bias)[sel])
        _copy_ln(att.LayerNorm, lp.attn_ln, sel)
        order = _top(importance.neurons[ti], w_s)
        w1, b1 = t(lp.ffn_in.weight)[order][:, sel], t(lp.ffn_in.bias)[order]
        w2, b2 = t(lp.ffn_out.weight)[sel][:, order], t(lp.ffn_out.bias)[sel]
        for mlp in layer.mlps:  # stacked MLPs beyond the first: copies (see the module docstring)
            mlp.linear1.weight.copy_(w1)
            mlp.linear1.bias.copy_(b1)
            mlp.linear2.weight.copy_(w2)
            mlp.linear2.bias.copy_(b2)
            _copy_ln(mlp.LayerNorm, lp.ffn_ln, sel)

    # --- head and fit_dense --------------------------------------------------------------------
    if parts.pooler is not None and not span:
        student.pooler.weight.copy_(t(parts.pooler.weight)[sel][:, sel])
        student.pooler.bias.copy_(t(parts.pooler.bias)[sel])
    student_head.weight.copy_(t(parts.classifier.weight)[:, sel])
    student_head.bias.copy_(t(parts.classifier.bias))
    fit = torch.zeros(h_t, h_s)
    fit[sel, torch.arange(h_s)] = 1.0
    student.fit_dense.weight.copy_(fit)
    student.fit_dense.bias.zero_()
    return {"layer_map": lmap, "hidden_units": h_s, "heads": heads_used, "importance": importance.method,
            "importance_batches": importance.batches}


def _copy_ln(ours: nn.LayerNorm, theirs: nn.LayerNorm, sel: Tensor) -> None:
    ours.weight.copy_(theirs.weight.detach().float().cpu()[sel])
    ours.bias.copy_(theirs.bias.detach().float().cpu()[sel])



@torch.no_grad()
def init_embeddings_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Start the student's embedding tables from the teacher's, in place.

    A student trained on CPU budgets sees a few thousand sentences, far too few to learn a
    30k-token table from random; the teacher's table already holds what the tokens mean. With
    the SVD of the teacher's word table ``W = U S V^T`` (rows: tokens, columns: the teacher's
    hidden size ``H_t``) and ``Q`` = the top ``H_s`` right singular vectors (``H_s`` x ``H_t``,
    zero rows where ``H_s > H_t``):

    * ``word_embeddings`` (factorised, width ``E``) = ``U_E S_E``, the best rank-``E`` fit of ``W``;
    * ``embedding_transformation`` = ``Q V_E``, which writes those coordinates in the student's
      hidden basis (``[I; 0]`` when ``E <= H_s``), with zero bias;
    * position and token-type tables = the teacher's, projected onto ``Q``;
    * ``fit_dense`` (student hidden -> teacher hidden, used by the hidden-state loss) = ``Q^T``,
      so the embedding output already matches the teacher's up to the projection.

    The attention and MLP weights stay random: the searched MLPs have no teacher counterpart.

    Raises
    ------
    CheckpointError
        If the teacher has no BERT-style embeddings or its vocabulary differs from the student's.
    """
    emb = student.embeddings
    t_emb = getattr(getattr(teacher, "base_model", teacher), "embeddings", None)
    words = teacher.get_input_embeddings().weight.detach().float().cpu()
    if t_emb is None or not hasattr(t_emb, "position_embeddings"):
        raise CheckpointError("warmup.init_embeddings: teacher: the teacher has no BERT-style embeddings "
                              "(position_embeddings); set warmup.init_embeddings: random")
    if words.shape[0] != emb.word_embeddings.num_embeddings:
        raise CheckpointError(
            f"warmup.init_embeddings: teacher: the teacher's vocabulary has {words.shape[0]} tokens, the "
            f"student's {emb.word_embeddings.num_embeddings}; set warmup.init_embeddings: random"
        )
    e, h_s, h_t = emb.word_embeddings.embedding_dim, emb.embedding_transformation.out_features, words.shape[1]
    u, s, vt = torch.linalg.svd(words, full_matrices=False)  # vt: (min(V, H_t), H_t)
    q = torch.zeros(h_s, h_t)
    k = min(h_s, vt.shape[0])
    q[:k] = vt[:k]
    r = min(e, vt.shape[0])
    word = torch.zeros(words.shape[0], e)
    word[:, :r] = u[:, :r] * s[:r]
    emb.word_embeddings.weight.copy_(word)
    transform = torch.zeros(h_s, e)
    transform[:, :r] = q @ vt[:r].T
    emb.embedding_transformation.weight.copy_(transform)
    emb.embedding_transformation.bias.zero_()
    for name in ("position_embeddings", "token_type_embeddings"):
        ours, theirs = getattr(emb, name), getattr(t_emb, name, None)
        if theirs is None:
            continue
        n = min(ours.num_embeddings, theirs.num_embeddings)
        ours.weight[:n].copy_(theirs.weight[:n].detach().float().cpu() @ q.T)
    fit = getattr(student, "fit_dense", None)
    if fit is not None and fit.out_features == h_t:
        fit.weight.copy_(q.T)
        fit.bias.zero_()
