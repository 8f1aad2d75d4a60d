"""Paired comparisons of the report's models on the dev rows: intervals and p-values.

The report's table gives each model's dev metric; this module says which differences the dev set
can resolve. Every model (the teacher, each baseline, the searched student) predicts the same dev
rows; :mod:`nni_effbert.stats` pairs them row by row (and distill seed by distill seed where a
model has several) and gives each difference a 95% bootstrap interval and a two-sided paired
permutation p-value.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.metrics import compute_metrics, squad_f1_per_question
from ..kd.setup import KDSetup
from ..stats import PairedResult, format_paired_table, paired_metric, paired_scores
from .loader import load_exported

__all__ = ["teacher_logits", "dev_predictions", "dev_row_scores", "compare_predictions", "comparisons_markdown"]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def teacher_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a Hugging Face sequence-classification teacher on one batch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits


def dev_predictions(setup: KDSetup, source: Union[PathLike, str]) -> np.ndarray:
    """Dev predictions in dev row order: class ids, or values for a regression task.

    ``source`` is ``"teacher"`` (the work directory's fine-tuned teacher) or an export folder.
    """
    if str(source) == "teacher":
        logits, _ = setup.predict_dev(setup.teacher_model(), call=teacher_logits)
    else:
        model = load_exported(source).model.to(setup.device)
        logits, _ = setup.predict_dev(model)
    return logits if setup.task.spec.is_regression else np.asarray(logits).argmax(axis=-1)


def dev_row_scores(setup: KDSetup, source: Union[PathLike, str]) -> Optional[np.ndarray]:
    """Per-row dev scores of an export folder whose mean is its dev metric, in dev row order: 1 / 0
    correctness (accuracy) or each question's F1 (span QA, the official rules); None for a metric
    that is not a mean over rows (Matthews, F1 of a class, correlations)."""
    if setup.task.spec.is_span:
        answers = setup.dev_span_answers(load_exported(source).model.to(setup.device))
        examples = setup.task.examples["dev"]
        f1 = squad_f1_per_question(answers, {ex["id"]: list(ex["answers"]["text"]) for ex in examples},
                                   setup.task.spec.name)
        return np.array([f1[ex["id"]] for ex in examples], dtype=float)
    if setup.task.spec.metric != "accuracy":
        return None
    return (dev_predictions(setup, source) == np.asarray(setup.task.dev["labels"])).astype(float)


def compare_predictions(predictions: Mapping[str, np.ndarray], labels: np.ndarray, metric: str,
                        pairs: Sequence[Tuple[str, str]], *, seed: int = 0) -> List[PairedResult]:
    """Paired comparisons of named models' predictions on the same rows.

    Parameters
    ----------
    predictions : mapping of str to array
        Model name -> predictions ``[rows]`` or ``[seeds, rows]`` (class ids or regression values).
    labels : array
        Gold labels of the rows.
    metric : str
        The task metric (:func:`nni_effbert.data.metrics.compute_metrics`); ``accuracy`` is compared
        row by row (correct / wrong), any other metric recomputed on each resample.
    pairs : sequence of (str, str)
        Which models to compare, A minus B.
    seed : int
        Seeds the resampling, so the same predictions always give the same intervals.
    """
    out: List[PairedResult] = []
    gold = np.asarray(labels)
    for a, b in pairs:
        pa, pb = np.asarray(predictions[a]), np.asarray(predictions[b])
        if metric == "accuracy":
            out.append(paired_scores((pa == gold).astype(float), (pb == gold).astype(float), name_a=a, name_b=b,
                                     seed=seed))
        else:
            out.append(paired_metric(lambda p, y: compute_metrics(metric, p, y)["default"], pa, pb, gold,
                                     name_a=a, name_b=b, seed=seed))
    return out


def comparisons_markdown(setup: KDSetup, models: Mapping[str, Union[PathLike, str]],
                         pairs: Sequence[Tuple[str, str]], *, seed: int = 0) -> Tuple[str, List[PairedResult]]:
    """The report's "Paired comparisons" section for ``models`` (name -> ``"teacher"`` or export folder)."""
    predictions: Dict[str, np.ndarray] = {name: dev_predictions(setup, src) for name, src in models.items()}
    labels = np.asarray(setup.task.dev["labels"])
    metric = setup.task.spec.metric
    results = compare_predictions(predictions, labels, metric, pairs, seed=seed)
    table = format_paired_table(results, f"dev {metric}")
    text = ("### Paired comparisons on the dev rows\n\n"
            "Each model predicts the same dev rows; A - B is the difference of the dev metric, with a 95% "
            "percentile-bootstrap interval over rows and a two-sided paired permutation p-value "
            f"({results[0].n_resamples if results else 0} resamples each, `nni_effbert.stats`). One distill seed per "
            "student: the interval covers the dev rows' sampling, not the distillation's seed-to-seed spread.\n\n"
            + table + "\n")
    return text, results
