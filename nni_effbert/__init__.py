"""nni-effbert: EfficientBERT (Dong et al., Findings of EMNLP 2021) as a Microsoft NNI plugin."""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
