"""EfficientBERT's MLP search space, declared with NNI mutables.

Installed as ``nni_effbert.search_spaces``.
"""
