"""EfficientBERT's MLP search space, declared with NNI mutables.

Installed as ``nni_effbert.search_spaces``::

    from nni_effbert.search_spaces import EfficientBertSpace
    space = EfficientBertSpace.preset("paper")
"""
from .config import PRESETS, EfficientBertConfig, preset_config
from .expressions import ExpressionError, parse_expression
from .modeling import EfficientBertModel, LayerArch, SlotSpec, StudentOutput
from .ops import BINARY_OPS, UNARY_OPS
from .space import EfficientBertSpace, layer_choices

__all__ = [
    "BINARY_OPS", "UNARY_OPS", "PRESETS", "EfficientBertConfig", "EfficientBertModel", "EfficientBertSpace",
    "ExpressionError", "LayerArch", "SlotSpec", "StudentOutput", "layer_choices", "parse_expression",
    "preset_config",
]
