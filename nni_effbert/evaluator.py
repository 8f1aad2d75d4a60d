"""The README's import path of the KD evaluator: ``from nni_effbert.evaluator import KDEvaluator``.

The evaluator lives in :mod:`nni_effbert.nas.kd_evaluator`.
"""
from .nas.kd_evaluator import ArchError, KDEvaluator, evaluate_nni_model

__all__ = ["ArchError", "KDEvaluator", "evaluate_nni_model"]
