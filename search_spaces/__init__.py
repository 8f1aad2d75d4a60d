"""EfficientBERT's MLP search space, declared with NNI mutables.

Installed as ``nni_effbert.search_spaces``::

    from nni_effbert.search_spaces import EfficientBertSpace
    space = EfficientBertSpace.preset("paper")

``EfficientBertSpace`` (an NNI model space) is imported on first use: ``nni.nas`` pulls in
pytorch_lightning (seconds per process), which code that only needs the pure-torch
``EfficientBertSupernet`` / ``EfficientBertModel`` (trial processes, export) never loads.
"""
from .space_config import PRESETS, EfficientBertConfig, preset_config
from .expressions import ExpressionError, parse_expression
from .modeling import EfficientBertModel, LayerArch, SlotSpec, StudentOutput
from .ops import BINARY_OPS, UNARY_OPS
from .supernet import EfficientBertSupernet, layer_choices

__all__ = [
    "BINARY_OPS", "UNARY_OPS", "PRESETS", "EfficientBertConfig", "EfficientBertModel", "EfficientBertSpace",
    "EfficientBertSupernet", "ExpressionError", "LayerArch", "SlotSpec", "StudentOutput", "layer_choices",
    "parse_expression", "preset_config",
]


def __getattr__(name):
    if name == "EfficientBertSpace":
        from .space import EfficientBertSpace  # local: nni.nas imports pytorch_lightning; only NAS code needs it

        return EfficientBertSpace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
