"""The EfficientBERT student: a BERT encoder whose feed-forward MLPs follow a searched arch.

Pure torch (no nni, no transformers): export folders carry this file and ``ops.py`` as
Hugging Face remote code, so a model loads where nni is not installed.

One implementation serves both the fixed student and the weight-sharing supernet: every module
owns full-size weights and its ``forward`` may be given a (smaller) architecture, in which case it
uses the first ``width`` units of ``linear1``, the matching columns of ``linear2`` and the first
``stack`` MLPs of the layer. A fixed student is simply built at the sizes of its own arch.

Architectures are flat ``label -> value`` dicts. Labels of layer ``i`` (zero-based):

``layer{i}_{slot}_act``
    unary op of slot ``pre`` / ``mid`` / ``post`` (``identity`` = none).
``layer{i}_{slot}_binary``
    binary op of the slot: ``none``, ``add``, ``mul`` or ``max``.
``layer{i}_{slot}_order``
    ``act_first``: ``binary(operand, act(h))``; ``binary_first``: ``act(binary(h, operand))``.
``layer{i}_{slot}_operand``
    second operand of the binary op of ``mid`` / ``post``: ``x`` (the MLP's input) or ``input``
    (the slot's own input ``h``). The ``pre`` slot's input is ``x`` itself, so it has no such label.
``layer{i}_width``
    units of ``linear1``.
``layer{i}_stack``
    number of stacked MLPs, each with its own residual + LayerNorm, all with the layer's expression.

One slot applies at most one activation, and slots are separated by ``linear1`` / ``linear2``, so
no activation is ever applied directly to another activation (the paper's rule).
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import NO_BINARY, UNARY_OPS, apply_binary

SLOTS = ("pre", "mid", "post")
#: Output heads: ``sequence`` (pooler + classifier over [CLS]: classification / regression) or
#: ``span`` (start / end logits per token: extractive question answering, as BERT's ``qa_outputs``).
HEADS = ("sequence", "span")
ORDERS = ("act_first", "binary_first")
OPERANDS = ("x", "input")


@dataclass(frozen=True)
class SlotSpec:
    """One slot of the expression template: an optional activation and an optional binary op."""

    act: str = "identity"
    binary: str = NO_BINARY
    operand: str = "x"
    order: str = "act_first"

    def __call__(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        act = UNARY_OPS[self.act]
        if self.binary == NO_BINARY:
            return act(h)
        other = x if self.operand == "x" else h
        if self.order == "act_first":
            return apply_binary(self.binary, other, act(h))
        return act(apply_binary(self.binary, h, other))

    def out_width(self, h_width: int, x_width: int) -> int:
        """Width of the slot's output for inputs of the given widths."""
        if self.binary != NO_BINARY and self.operand == "x":
            return min(h_width, x_width)
        return h_width


@dataclass(frozen=True)
class LayerArch:
    """The searched choices of one layer, read from a flat arch dict."""

    pre: SlotSpec
    mid: SlotSpec
    post: SlotSpec
    width: int
    stack: int

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any], layer: int) -> "LayerArch":
        p = f"layer{layer}_"
        slots = {}
        for slot in SLOTS:
            slots[slot] = SlotSpec(
                act=arch[f"{p}{slot}_act"],
                binary=arch[f"{p}{slot}_binary"],
                # The pre slot's input is x, so its operand is always x.
                operand=arch.get(f"{p}{slot}_operand", "x") if slot != "pre" else "x",
                order=arch[f"{p}{slot}_order"],
            )
        return cls(width=int(arch[f"{p}width"]), stack=int(arch[f"{p}stack"]), **slots)

    def linear2_in(self, hidden_size: int) -> int:
        """Input width of ``linear2``: the mid slot may truncate ``linear1``'s output."""
        return self.mid.out_width(self.width, hidden_size)


@dataclass
class StudentOutput:
    """What the student returns: everything knowledge distillation needs.

    Attributes
    ----------
    logits : Tensor
        ``[batch, num_labels]`` (``num_labels == 1`` for regression); with the ``span`` head
        ``[batch, seq, 2]``: start and end logits of every token (:attr:`start_logits`,
        :attr:`end_logits`).
    hidden_states : tuple of Tensor or None
        ``num_layers + 1`` tensors ``[batch, seq, fit_size]``: the embedding output first, then
        every layer's output, each projected by ``fit_dense`` to the teacher's hidden size.
    attentions : tuple of Tensor or None
        ``num_layers`` attention-probability tensors ``[batch, heads, seq, seq]``.
    """

    logits: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None

    @property
    def start_logits(self) -> torch.Tensor:
        """``[batch, seq]`` answer-start logits (``span`` head only)."""
        return self.logits[..., 0]

    @property
    def end_logits(self) -> torch.Tensor:
        """``[batch, seq]`` answer-end logits (``span`` head only)."""
        return self.logits[..., 1]


class Embeddings(nn.Module):
    """Factorized embeddings: token vectors of ``embedding_size`` projected up to ``hidden_size``.

    MobileBERT also factorizes its embedding table; it uses a 3-gram convolution before the
    projection, which we leave out (a plain projection, as in ALBERT), since the search does not
    touch the embeddings.
    """

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.embedding_transformation = nn.Linear(config.embedding_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embedding_transformation(self.word_embeddings(input_ids))
        h = h + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention with residual + LayerNorm (BERT's SelfAttention + SelfOutput)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}; choose sizes that divide"
            )
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # [b, t, hidden] -> [b, heads, t, head_size]
            return proj(x).view(b, t, self.num_heads, self.head_size).transpose(1, 2)

        scores = heads(self.query) @ heads(self.key).transpose(-1, -2) / math.sqrt(self.head_size)
        probs = torch.softmax(scores + mask_bias, dim=-1)  # [b, heads, t, t]
        context = (self.attn_dropout(probs) @ heads(self.value)).transpose(1, 2).reshape(b, t, -1)
        return self.LayerNorm(self.dropout(self.dense(context)) + x), probs


class EfficientMLPBlock(nn.Module):
    """One MLP of a layer's stack: the searched expression, then residual + LayerNorm."""

    def __init__(self, config, width: int):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, width)
        self.linear2 = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, arch: LayerArch) -> torch.Tensor:
        # Slicing is a no-op for a fixed student built at its arch's sizes; in the supernet it
        # selects the first `width` units of linear1 and the matching columns of linear2.
        h = arch.pre(x, x)
        h = F.linear(h, self.linear1.weight[: arch.width], self.linear1.bias[: arch.width])
        h = arch.mid(h, x)
        h = F.linear(h, self.linear2.weight[:, : h.shape[-1]], self.linear2.bias)
        h = arch.post(h, x)
        return self.LayerNorm(self.dropout(h) + x)


class StudentLayer(nn.Module):
    def __init__(self, config, width: int, stack: int):
        super().__init__()
        self.attention = SelfAttention(config)
        self.mlps = nn.ModuleList(EfficientMLPBlock(config, width) for _ in range(stack))

    def forward(self, x, mask_bias, arch: LayerArch):
        h, probs = self.attention(x, mask_bias)
        for mlp in self.mlps[: arch.stack]:
            h = mlp(h, arch)
        return h, probs


class EfficientBertModel(nn.Module):
    """The student network (or, built at the largest sizes, the supernet's weights).

    Parameters
    ----------
    config
        Any object with the fields of ``EfficientBertConfig`` (a dataclass or an HF config);
        ``head`` (default ``sequence``) picks the output head, see :data:`HEADS`.
    arch : dict
        Flat ``label -> value`` architecture; modules are built at its widths and stack numbers.
    """

    def __init__(self, config, arch: Mapping[str, Any]):
        super().__init__()
        self.config = config
        self.arch = dict(arch)
        self.layer_archs = [LayerArch.from_arch(arch, i) for i in range(config.num_hidden_layers)]
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(
            StudentLayer(config, la.width, la.stack) for la in self.layer_archs
        )
        self.fit_dense = nn.Linear(config.hidden_size, config.fit_size)
        self.head = getattr(config, "head", None) or "sequence"
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.head == "span":
            self.qa_outputs = nn.Linear(config.hidden_size, 2)  # start, end
        else:
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
            self.classifier_dropout = nn.Dropout(config.hidden_dropout_prob)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        arch: Optional[Mapping[str, Any]] = None,
        return_kd: bool = True,
    ) -> StudentOutput:
        """Run the student; ``arch`` (supernet use) overrides the model's own architecture."""
        layer_archs = self.layer_archs if arch is None else [
            LayerArch.from_arch(arch, i) for i in range(len(self.layers))
        ]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)
        # [b, t] -> additive bias [b, 1, 1, t]: padded keys get the dtype's lowest value.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        hidden, attentions = [h], []
        for layer, la in zip(self.layers, layer_archs):
            h, probs = layer(h, mask_bias, la)
            hidden.append(h)
            attentions.append(probs)
        if self.head == "span":
            logits = self.qa_outputs(h)  # [b, t, 2]
        else:
            logits = self.classifier(self.classifier_dropout(torch.tanh(self.pooler(h[:, 0]))))
        if not return_kd:
            return StudentOutput(logits=logits)
        return StudentOutput(
            logits=logits,
            hidden_states=tuple(self.fit_dense(x) for x in hidden),
            attentions=tuple(attentions),
        )


def slice_state_dict(source: Mapping[str, torch.Tensor], target: nn.Module) -> Dict[str, torch.Tensor]:
    """Take from ``source`` (supernet weights) the leading slice of each of ``target``'s tensors.

    Every tensor of a subnet is a prefix slice of the supernet tensor with the same name: the
    first ``width`` rows of ``linear1``, the first columns of ``linear2``, the first ``stack`` MLPs.
    """
    out = {}
    for name, tensor in target.state_dict().items():
        if name not in source:
            raise KeyError(f"supernet has no tensor {name!r} for the subnet")
        src = source[name]
        if src.dim() != tensor.dim() or any(s < t for s, t in zip(src.shape, tensor.shape)):
            raise ValueError(f"cannot slice supernet tensor {name!r} of shape {tuple(src.shape)} "
                             f"to {tuple(tensor.shape)}")
        out[name] = src[tuple(slice(0, n) for n in tensor.shape)].clone()
    return out

