"""EfficientBERT's progressive coarse-to-fine search strategy.

Installed as ``nni_effbert.strategies``.
"""
