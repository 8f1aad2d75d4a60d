"""``EfficientBertSupernet``: the search space's logic and weights as a plain ``torch.nn.Module``.

Everything :class:`~.space.EfficientBertSpace` does except being an NNI model space: the
labels and their choices, arch validation, sampling, the paper's notation, fingerprints,
parameter counts, and the weight-sharing supernet (``forward(..., arch=...)``,
:meth:`~EfficientBertSupernet.subnet`). It imports torch and numpy, not nni: a trial process
(``python -m nni_effbert.trial``), export and distillation use it and never load ``nni.nas``,
whose import pulls in pytorch_lightning (about 6 s per process on a 2-core machine).
:class:`~.space.EfficientBertSpace` subclasses it and adds one ``nni.choice`` per label.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .space_config import EfficientBertConfig, preset_config
from .expressions import ExpressionError, expression_to_string, parse_expression, slot_classes
from .modeling import ORDERS, OPERANDS, SLOTS, EfficientBertModel, LayerArch, StudentOutput, slice_state_dict
from .ops import NO_BINARY

__all__ = ["EfficientBertSupernet", "layer_choices"]


def _label(layer: int, name: str) -> str:
    return f"layer{layer}_{name}"


#: BERT's own MLP in the space's notation: the hand-designed reference a search has to beat.
REFERENCE_EXPRESSION = "linear2(gelu(linear1(x)))"


def layer_choices(config: EfficientBertConfig, layer: int) -> Dict[str, List[Any]]:
    """The labels of one layer with their allowed values, in a stable order."""
    choices: Dict[str, List[Any]] = {}
    for slot in SLOTS:
        choices[_label(layer, f"{slot}_act")] = list(config.unary_ops)
        choices[_label(layer, f"{slot}_binary")] = [NO_BINARY, *config.binary_ops]
        if slot != "pre":
            choices[_label(layer, f"{slot}_operand")] = list(OPERANDS)
        choices[_label(layer, f"{slot}_order")] = list(ORDERS)
    choices[_label(layer, "width")] = config.widths
    choices[_label(layer, "stack")] = list(range(1, config.max_stack + 1))
    return choices


class EfficientBertSupernet(nn.Module):
    """EfficientBERT's student supernet without NNI: searchable MLP expression, width and stack per layer.

    The same labels, choices, methods and state dict as :class:`~.space.EfficientBertSpace`
    (which subclasses it), so a supernet checkpoint loads into either.

    Parameters
    ----------
    config : EfficientBertConfig, optional
        Sizes and search ranges; defaults to the paper's (``preset('paper')``).
    **overrides
        Field overrides applied to ``config``.

    Examples
    --------
    >>> space = EfficientBertSupernet.preset("tiny")
    >>> arch = space.bert_arch()
    >>> student = space.subnet(arch)          # plain nn.Module, weights inherited
    >>> space.count_params(arch) == sum(p.numel() for p in student.parameters())
    True
    """

    def __init__(self, config: Optional[EfficientBertConfig] = None, **overrides):
        super().__init__()
        self.config = _resolve_config(config, overrides)
        self.choices: Dict[str, List[Any]] = {}
        for i in range(self.config.num_hidden_layers):
            for label, values in layer_choices(self.config, i).items():
                self._declare_choice(label, values)
                self.choices[label] = values
        self.labels: List[str] = list(self.choices)
        # Full-size weights: the largest width and stack everywhere.
        self.supernet = EfficientBertModel(self.config, self._max_arch())

    def _declare_choice(self, label: str, values: List[Any]) -> None:
        """Hook called once per label while building (``EfficientBertSpace`` registers an ``nni.choice``)."""

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides):
        """A named preset: ``paper`` (hidden 540, 6 layers, fit 768), ``quickstart``
        (hidden 192, 4 layers, fit 384 for all-MiniLM-L6-v2) or ``tiny`` (tests)."""
        return cls(preset_config(name, **overrides))

    def _max_arch(self) -> Dict[str, Any]:
        arch = self.bert_arch()
        for i in range(self.config.num_hidden_layers):
            arch[_label(i, "width")] = max(self.config.widths)
            arch[_label(i, "stack")] = self.config.max_stack
        return arch

    # ----------------------------------------------------------------------------------------
    # Architectures
    # ----------------------------------------------------------------------------------------

    def validate_arch(self, arch: Mapping[str, Any]) -> Dict[str, Any]:
        """Check a ``label -> value`` dict and return a clean copy.

        Raises
        ------
        ValueError
            On a missing or unknown label or a value outside the label's choices; the message
            names the label and the allowed values.
        """
        return _validate(self.config, arch)

    def random_arch(self, rng: np.random.RandomState | np.random.Generator,
                    fixed: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Uniform sample, with the labels in ``fixed`` held at their given values."""
        fixed = dict(fixed or {})
        unknown = sorted(set(fixed) - set(self.choices))
        if unknown:
            raise ValueError(f"fixed labels {unknown} are not labels of this space")
        arch = {}
        for label, values in self.choices.items():
            arch[label] = fixed[label] if label in fixed else values[_randint(rng, len(values))]
        return self.validate_arch(arch)

    def bert_arch(self, width: Optional[int] = None, stack: int = 1) -> Dict[str, Any]:
        """BERT's ``linear2(gelu(linear1(x)))`` at every layer (width defaults to the largest)."""
        layers = [{"expression": REFERENCE_EXPRESSION,
                   "width": width or max(self.config.widths), "stack": stack}] * self.config.num_hidden_layers
        return self.arch_from_layers(layers)

    def expression_labels(self, layer: int) -> List[str]:
        """Labels of layer ``layer`` that decide its expression."""
        return [l for l in layer_choices(self.config, layer) if not l.endswith(("_width", "_stack"))]

    def size_labels(self, layer: int) -> List[str]:
        """Labels of layer ``layer`` that decide its size: ``layer{i}_width``, ``layer{i}_stack``."""
        return [_label(layer, "width"), _label(layer, "stack")]

    def layer_archs(self, arch: Mapping[str, Any]) -> List[LayerArch]:
        arch = self.validate_arch(arch)
        return [LayerArch.from_arch(arch, i) for i in range(self.config.num_hidden_layers)]

    def describe(self, arch: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """Per layer ``{expression, width, stack}`` in the paper's notation.

        Each slot is printed in the simplest form of its function (see :meth:`fingerprint`),
        so ``elu(max(x,x))`` reads ``elu(x)``; archs with equal fingerprints read the same.
        """
        return [{"expression": expression_to_string(*slots), "width": la.width, "stack": la.stack}
                for la, slots in self._canonical_layers(arch)]

    def _canonical_layers(self, arch: Mapping[str, Any]):
        """(layer arch, its slots replaced by their class representatives) per layer."""
        cfg = self.config
        classes = {pre: slot_classes(tuple(cfg.unary_ops), tuple(cfg.binary_ops), pre) for pre in (True, False)}
        return [(la, [classes[slot == "pre"][getattr(la, slot)] for slot in SLOTS]) for la in self.layer_archs(arch)]

    def arch_from_layers(self, layers: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        """Inverse of :meth:`describe`: an arch from per-layer ``{expression, width, stack}``.

        Raises
        ------
        ValueError
            If there is not one entry per layer, or an expression, width or stack is not in the
            space (the message names the layer and what is allowed).
        """
        n = self.config.num_hidden_layers
        if len(layers) != n:
            raise ValueError(f"expected {n} layers, got {len(layers)}")
        arch: Dict[str, Any] = {}
        for i, layer in enumerate(layers):
            missing = {"expression", "width", "stack"} - set(layer)
            if missing:
                raise ValueError(f"layer {i}: missing key(s) {sorted(missing)}; each layer needs expression, width, stack")
            try:
                slots = dict(zip(SLOTS, parse_expression(layer["expression"])))
            except ExpressionError as e:
                raise ValueError(f"layer {i}: {e}") from None
            for slot, spec in slots.items():
                arch[_label(i, f"{slot}_act")] = spec.act
                arch[_label(i, f"{slot}_binary")] = spec.binary
                if slot != "pre":
                    arch[_label(i, f"{slot}_operand")] = spec.operand
                arch[_label(i, f"{slot}_order")] = spec.order
            arch[_label(i, "width")] = layer["width"]
            arch[_label(i, "stack")] = layer["stack"]
        return self.validate_arch(arch)

    def fingerprint(self, arch: Mapping[str, Any]) -> str:
        """A hash equal for archs that compute the same function, different otherwise.

        Each slot is replaced by the representative of its class of numerically equal slot
        functions (:func:`.expressions.slot_classes`); width, stack and the width reaching
        ``linear2`` complete the key.
        """
        key = []
        for la, slots in self._canonical_layers(arch):
            key.append([[s.act, s.binary, s.operand, s.order] for s in slots]
                       + [la.width, la.stack, la.linear2_in(self.config.hidden_size)])
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()

    # ----------------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------------

    def count_params(self, arch: Mapping[str, Any], *, exclude_embeddings: bool = False) -> int:
        """Parameters of ``subnet(arch)``, computed from the config without building it.

        ``exclude_embeddings`` leaves out the word, position and token-type tables.
        """
        c = self.config
        h = c.hidden_size
        tables = c.vocab_size * c.embedding_size + c.max_position_embeddings * h + c.type_vocab_size * h
        total = 0 if exclude_embeddings else tables
        total += c.embedding_size * h + h + 2 * h  # up-projection + LayerNorm
        for la in self.layer_archs(arch):
            total += 4 * (h * h + h) + 2 * h  # q, k, v, output dense + LayerNorm
            mlp = h * la.width + la.width + la.linear2_in(h) * h + h + 2 * h
            total += la.stack * mlp
        total += h * c.fit_size + c.fit_size  # fit_dense
        if c.head == "span":
            total += h * 2 + 2  # qa_outputs (start, end)
        else:
            total += h * h + h  # pooler
            total += h * c.num_labels + c.num_labels  # classifier
        return total

    def param_range(self) -> tuple:
        """(smallest, largest) parameter count over the whole space."""
        # Size depends on width, stack and whether the mid slot truncates to hidden_size;
        # the extremes take every layer at its extreme independently.
        c = self.config
        lo = self.bert_arch(width=min(c.widths), stack=1)
        hi = self.bert_arch(width=max(c.widths), stack=c.max_stack)
        if min(c.widths) > c.hidden_size:  # the mid slot can truncate linear2's input to hidden
            for i in range(c.num_hidden_layers):
                lo[_label(i, "mid_binary")] = c.binary_ops[0]
                lo[_label(i, "mid_operand")] = "x"
        return self.count_params(lo), self.count_params(hi)

    # ----------------------------------------------------------------------------------------
    # Models
    # ----------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, arch: Optional[Mapping[str, Any]] = None,
                return_kd: bool = True) -> StudentOutput:
        """Run ``arch`` (default: the largest BERT-expression arch) on the shared weights."""
        arch = self._max_arch() if arch is None else self.validate_arch(arch)
        return self.supernet(input_ids, attention_mask, token_type_ids, arch=arch, return_kd=return_kd)

    def subnet(self, arch: Mapping[str, Any]) -> EfficientBertModel:
        """A plain ``torch.nn.Module`` for ``arch`` whose weights are slices of the supernet's.

        ``linear1`` keeps its first ``width`` units, ``linear2`` the matching columns, and each
        layer its first ``stack`` MLPs. The copy is independent: training it leaves the
        supernet untouched.
        """
        model = EfficientBertModel(self.config, self.validate_arch(arch))
        model.load_state_dict(slice_state_dict(self.supernet.state_dict(), model))
        return model

    def nni_search_space(self) -> Dict[str, Dict[str, Any]]:
        """The legacy JSON search space for ``nnictl`` (``{label: {_type: choice, _value: [...]}}``)."""
        return {label: {"_type": "choice", "_value": list(values)} for label, values in self.choices.items()}


def _randint(rng: np.random.RandomState | np.random.Generator, n: int) -> int:
    return int(rng.integers(n) if isinstance(rng, np.random.Generator) else rng.randint(n))


def _resolve_config(config: Optional[EfficientBertConfig], overrides: Mapping[str, Any]) -> EfficientBertConfig:
    if config is None:
        config = EfficientBertConfig()
    elif isinstance(config, Mapping):
        config = EfficientBertConfig.from_dict(dict(config))
    elif not isinstance(config, EfficientBertConfig):
        raise TypeError(f"config must be an EfficientBertConfig or a dict, got {type(config).__name__}")
    return config.replace(**overrides)


def _validate(config: EfficientBertConfig, arch: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(arch, Mapping):
        raise ValueError(f"an architecture must be a dict of label -> value, got {type(arch).__name__}")
    choices: Dict[str, List[Any]] = {}
    for i in range(config.num_hidden_layers):
        choices.update(layer_choices(config, i))
    unknown = sorted(set(arch) - set(choices))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown} in architecture; labels look like "
                         f"'layer0_width' (layers 0..{config.num_hidden_layers - 1})")
    out = {}
    for label, values in choices.items():
        if label not in arch:
            raise ValueError(f"architecture is missing label {label!r}; allowed values: {values}")
        value = arch[label]
        # JSON round trips may turn ints into floats (2.0) or numpy scalars: accept equal values.
        match = [v for v in values if type(v) is type(value) and v == value] or \
                [v for v in values if not isinstance(v, str) and not isinstance(value, (str, bool)) and v == value]
        if not match:
            raise ValueError(f"label {label!r} has value {value!r}; allowed values: {values}")
        out[label] = match[0]
    return out
