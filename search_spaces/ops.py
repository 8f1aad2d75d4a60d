"""Op table of EfficientBERT's MLP expressions (pure torch).

This file has no dependency beyond torch: export folders carry it as Hugging Face remote code.

Unary ops are the paper's activations plus ``identity`` (an empty slot); binary ops combine the
slot's value with a second operand. When the two operands differ in width, a binary op uses
their first ``min(w1, w2)`` channels, as the paper's implementation does.
"""
from typing import Callable, Dict

import torch
import torch.nn.functional as F

UNARY_OPS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "swish": F.silu,
}

BINARY_OPS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add,
    "mul": torch.mul,
    "max": torch.maximum,
}

#: ``binary`` label value of a slot without a binary op.
NO_BINARY = "none"


def apply_binary(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Apply binary op ``name``, truncating both operands to their common width."""
    width = min(a.shape[-1], b.shape[-1])
    return BINARY_OPS[name](a[..., :width], b[..., :width])
