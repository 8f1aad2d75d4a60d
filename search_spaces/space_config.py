"""Configuration of the EfficientBERT student supernet and its presets."""
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any, Dict, List, Tuple

from .ops import UNARY_OPS, BINARY_OPS


@dataclass(frozen=True)
class EfficientBertConfig:
    """Sizes of the student (Hugging Face BERT field names) and the ranges searched.

    ``intermediate_size`` is the MLP's "ffn hidden size" whose fractions the width choices are.
    The paper sets it equal to ``hidden_size`` (540), not BERT's 4x.
    """

    vocab_size: int = 30522
    embedding_size: int = 128  # factorized embeddings: tokens live in 128-d, projected to hidden
    hidden_size: int = 540
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 540
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    fit_size: int = 768  # the teacher's hidden size: fit_dense projects student states to it
    num_labels: int = 2  # 1 = regression head
    pad_token_id: int = 0
    head: str = "sequence"  # "span": start/end logits per token (SQuAD) instead of pooler + classifier
    # Search ranges.
    width_ratios: Tuple[float, ...] = (1.0, 1 / 2, 1 / 3, 1 / 4)
    max_stack: int = 4
    unary_ops: Tuple[str, ...] = tuple(UNARY_OPS)
    binary_ops: Tuple[str, ...] = tuple(BINARY_OPS)

    def __post_init__(self):
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "fit_size", "num_labels", "max_stack"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EfficientBertConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"EfficientBertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head not in ("sequence", "span"):
            raise ValueError(f"EfficientBertConfig.head must be 'sequence' or 'span', got {self.head!r}")
        if not self.width_ratios or any(not 0 < r <= 1 for r in self.width_ratios):
            raise ValueError(f"EfficientBertConfig.width_ratios must be fractions in (0, 1], got {self.width_ratios!r}")
        unknown = [op for op in self.unary_ops if op not in UNARY_OPS]
        if unknown or "identity" not in self.unary_ops:
            raise ValueError(f"EfficientBertConfig.unary_ops must include 'identity' and come from "
                             f"{sorted(UNARY_OPS)}; got {list(self.unary_ops)!r}")
        unknown = [op for op in self.binary_ops if op not in BINARY_OPS]
        if unknown:
            raise ValueError(f"EfficientBertConfig.binary_ops must come from {sorted(BINARY_OPS)}; "
                             f"unknown: {unknown}")

    @property
    def widths(self) -> List[int]:
        """Width choices of ``linear1`` in units, largest first, without duplicates."""
        units = {max(1, round(Fraction(r).limit_denominator(64) * self.intermediate_size)) for r in self.width_ratios}
        return sorted(units, reverse=True)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("width_ratios", "unary_ops", "binary_ops"):
            d[k] = list(d[k])
        if d["head"] == "sequence":
            # Written only when it is not the default, so that configs saved before span heads
            # existed (supernet checkpoints, exports) still compare equal to today's.
            del d["head"]
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "EfficientBertConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EfficientBertConfig field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        for k in ("width_ratios", "unary_ops", "binary_ops"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)

    def replace(self, **overrides) -> "EfficientBertConfig":
        return replace(self, **overrides) if overrides else self


def config_differences(saved: Dict[str, Any], current: Dict[str, Any], limit: int = 5) -> str:
    """``""`` when two config dicts agree, else ``"field: saved vs current, ..."`` (first ``limit``)."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in diff[:limit])


PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's supernet: hidden 540, 6 layers, 12 heads, embedding 128, fit 768 (BERT-base).
    "paper": dict(),
    # Sized for a CPU trial well under a minute, distilled from all-MiniLM-L6-v2 (hidden 384,
    # 12 heads): the same head count keeps attention maps comparable head by head.
    "quickstart": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=12,
                       intermediate_size=192, embedding_size=128, fit_size=384),
    # For tests: a few thousand parameters per layer.
    "tiny": dict(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, embedding_size=16, fit_size=32, max_position_embeddings=128,
                 max_stack=2),
}


def preset_config(name: str, **overrides) -> EfficientBertConfig:
    """Config of a named preset (``paper``, ``quickstart``, ``tiny``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return EfficientBertConfig.from_dict({**PRESETS[name], **overrides})
