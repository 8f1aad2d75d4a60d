"""Span QA from logits to answers and scores (Hugging Face's ``utils_qa.postprocess_qa_predictions``
and the official SQuAD v1.1 / v2.0 evaluation).

* :func:`postprocess_predictions` -> answer strings: the ``n_best_size`` best start and end
  logits of every feature of an example, spans of at most ``max_answer_length`` tokens inside
  the context, scored by ``start + end``; for v2.0 the null (CLS) score against the best span
  gives ``score_diff``;
* :func:`best_null_threshold` / :func:`apply_null_threshold`: the v2.0 null-answer threshold,
  tuned on the search split, never on dev;
* :func:`evaluate_predictions` -> EM / F1 (:mod:`nni_effbert.data.metrics`);
* :func:`span_logits` / :func:`score_span_model` / :func:`span_answers` run a model (any callable from a padded batch to
  ``[B, T, 2]`` logits) over a split's features and score it (or give its answers).
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch

from .batches import length_sorted_batches
from .loading import MODEL_INPUTS
from .metrics import squad_f1_per_question, squad_metrics
from .qa import QAData
from .tasks import TaskConfig


__all__ = ["postprocess_predictions", "apply_null_threshold", "best_null_threshold", "evaluate_predictions",
           "span_logits", "score_span_model", "span_answers"]



def postprocess_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> Tuple[Dict[str, str], Dict[str, float]]:
    """Turn start/end logits of every feature into one answer string per question.

    Parameters
    ----------
    examples : datasets.Dataset
        Questions (``id, context``).
    features : datasets.Dataset
        Their features (``example_id, offset_mapping``), in the order of the logits.
    start_logits, end_logits : sequence of numpy arrays
        One 1-D array per feature (its unpadded length, or longer: positions beyond the
        feature's offsets are ignored).
    n_best_size : int
        Best start and best end positions tried per feature.
    max_answer_length : int
        Longest answer in tokens.

    Returns
    -------
    (dict, dict)
        ``predictions``: question id -> best non-null answer text (``""`` when no valid span
        exists); ``score_diff``: question id -> null score minus best span score (v2.0: answer
        ``""`` where it exceeds the tuned threshold, :func:`apply_null_threshold`).
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"{len(features)} features but {len(start_logits)} start / {len(end_logits)} end logits")
    by_example: Dict[str, List[int]] = collections.defaultdict(list)
    for i, eid in enumerate(features["example_id"]):
        by_example[eid].append(i)
    offsets_all = features["offset_mapping"]
    predictions: Dict[str, str] = {}
    score_diff: Dict[str, float] = {}
    for ex in examples:
        qid, context = ex["id"], ex["context"]
        best_text, best_score, null_score = "", -np.inf, np.inf
        for fi in by_example.get(qid, []):
            offsets = offsets_all[fi]
            start = np.asarray(start_logits[fi], dtype=np.float64)[: len(offsets)]
            end = np.asarray(end_logits[fi], dtype=np.float64)[: len(offsets)]
            # The null answer scores at CLS (position 0 for BERT-style inputs); the minimum over windows.
            null_score = min(null_score, float(start[0] + end[0]))
            for s in np.argsort(start)[::-1][:n_best_size]:
                if offsets[s] is None:
                    continue
                for e in np.argsort(end)[::-1][:n_best_size]:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start[s] + end[e])
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        predictions[qid] = best_text
        score_diff[qid] = float(null_score - best_score) if np.isfinite(best_score) else np.inf
    return predictions, score_diff


def apply_null_threshold(predictions: Mapping[str, str], score_diff: Mapping[str, float],
                         threshold: float) -> Dict[str, str]:
    """v2.0 answers: ``""`` where ``score_diff > threshold`` (run_qa's ``null_score_diff_threshold``)."""
    return {q: ("" if score_diff[q] > threshold else text) for q, text in predictions.items()}


def best_null_threshold(predictions: Mapping[str, str], score_diff: Mapping[str, float],
                        gold: Mapping[str, Sequence[str]]) -> Tuple[float, float]:
    """The ``null_score_diff_threshold`` with the best F1, as the official v2.0 script's ``find_best_thresh``.

    Tune it on the search split and apply it to dev: tuning on dev would report an optimistic score.

    Parameters
    ----------
    predictions : dict
        Question id -> best non-null answer (:func:`postprocess_predictions`).
    score_diff : dict
        Question id -> null score minus best span score.
    gold : dict
        Question id -> gold answer texts (empty for an unanswerable question).

    Returns
    -------
    (float, float)
        ``(threshold, f1)``: answering ``""`` where ``score_diff > threshold`` gives F1 ``f1``
        (a fraction) on these questions. Ties keep the lowest threshold, as the official script.
    """
    qids = list(predictions)
    if not qids:
        raise ValueError("best_null_threshold: no questions")
    answer_f1 = squad_f1_per_question(predictions, gold, "squad_v2")
    null_f1 = {q: 1.0 if not [g for g in gold[q] if g.strip()] else 0.0 for q in qids}
    # Start with every question answered "" (threshold below every diff), then move questions to their
    # span answer in increasing score_diff order; the best prefix gives the threshold.
    order = sorted(qids, key=lambda q: score_diff[q])
    total = sum(null_f1.values())
    best, best_thresh = total, -np.inf
    for q in order:
        total += answer_f1[q] - null_f1[q]
        if total > best and np.isfinite(score_diff[q]):
            best, best_thresh = total, score_diff[q]
    if not np.isfinite(best_thresh):
        # Every question is best answered "": any threshold below the smallest diff does that.
        finite = [d for d in score_diff.values() if np.isfinite(d)]
        best_thresh = (min(finite) - 1.0) if finite else 0.0
    return float(best_thresh), best / len(qids)


def evaluate_predictions(predictions: Mapping[str, str], examples: datasets.Dataset, version: str = "squad",
                         ) -> Dict[str, float]:
    """EM / F1 of answers against a split's gold answers (:func:`nni_effbert.data.metrics.squad_metrics`)."""
    gold = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
    return squad_metrics(predictions, gold, version)


def span_logits(forward: Callable[[Dict[str, torch.Tensor]], torch.Tensor], features: datasets.Dataset,
                batch_size: int, pad_token_id: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Start and end logits of every feature, unpadded, in the features' order.

    Parameters
    ----------
    forward : callable
        Takes a padded batch (:func:`nni_effbert.data.batches.collate`'s dict) and returns its
        ``[B, T, 2]`` start / end logits (a student's ``logits``, or a HF QA model's
        ``start_logits`` and ``end_logits`` stacked). Called under ``torch.inference_mode``.
    features : datasets.Dataset
        A split of :class:`QAData`.
    batch_size, pad_token_id : int

    Returns
    -------
    (list of numpy.ndarray, list of numpy.ndarray)
        Per feature, its start and its end logits (float32, one per token).
    """
    batches, order = length_sorted_batches(features.select_columns(list(MODEL_INPUTS)), batch_size, pad_token_id)
    starts: List[Optional[np.ndarray]] = [None] * len(features)
    ends: List[Optional[np.ndarray]] = [None] * len(features)
    row = 0
    with torch.inference_mode():
        for batch in batches:
            logits = forward(batch).float().cpu().numpy()
            lengths = batch["attention_mask"].sum(1).tolist()
            for b, n in enumerate(lengths):
                starts[order[row]] = logits[b, :n, 0]
                ends[order[row]] = logits[b, :n, 1]
                row += 1
    return starts, ends  # type: ignore[return-value]


def score_span_model(forward: Callable[[Dict[str, torch.Tensor]], torch.Tensor], data: QAData, task_cfg: TaskConfig,
                     batch_size: int, pad_token_id: int, splits: Sequence[str] = ("search", "dev"),
                     null_threshold: Optional[float] = None) -> Dict[str, Dict[str, float]]:
    """EM / F1 of a span model on splits of a QA task (the search split first).

    For SQuAD v2.0 the ``null_score_diff_threshold`` is tuned on the search split
    (:func:`best_null_threshold`) and applied to every split, dev included: it is never tuned on
    dev. Without a search split (``task.search_rows: 0``) or with ``null_threshold`` given,
    that threshold (default 0.0, run_qa's) is used.

    Parameters
    ----------
    forward : callable
        See :func:`span_logits`.
    data : QAData
    task_cfg : TaskConfig
        ``n_best_size`` and ``max_answer_length``.
    batch_size, pad_token_id : int
    splits : sequence of str
        Among ``train``, ``search``, ``dev``.
    null_threshold : float, optional
        A fixed v2.0 threshold instead of the tuned one.

    Returns
    -------
    dict
        Split -> :func:`nni_effbert.data.metrics.squad_metrics` (``exact``, ``f1``, ``default`` =
        ``f1``, ...); v2.0 adds ``null_threshold`` (the threshold used) to each.
    """
    version = data.spec.name
    answers, threshold = span_answers(forward, data, task_cfg, batch_size, pad_token_id, splits, null_threshold)
    out: Dict[str, Dict[str, float]] = {}
    for split, preds in answers.items():
        out[split] = evaluate_predictions(preds, data.examples[split], version)
        if version == "squad_v2":
            out[split]["null_threshold"] = float(threshold)
    return out


def span_answers(forward: Callable[[Dict[str, torch.Tensor]], torch.Tensor], data: QAData, task_cfg: TaskConfig,
                 batch_size: int, pad_token_id: int, splits: Sequence[str] = ("dev",),
                 null_threshold: Optional[float] = None) -> Tuple[Dict[str, Dict[str, str]], Optional[float]]:
    """The answer a span model gives to every question of ``splits`` (question id -> text, ``""`` =
    no answer), as :func:`score_span_model` scores them, and the v2.0 null threshold it applied
    (None for v1.1). Splits without rows are left out."""
    version = data.spec.name
    raw: Dict[str, Tuple[Dict[str, str], Dict[str, float]]] = {}
    wanted = list(splits)
    if version == "squad_v2" and null_threshold is None and len(data.search) and "search" not in wanted:
        wanted.insert(0, "search")  # needed to tune the threshold
    for split in wanted:
        feats = getattr(data, split)
        if len(feats) == 0:
            continue
        starts, ends = span_logits(forward, feats, batch_size, pad_token_id)
        raw[split] = postprocess_predictions(data.examples[split], feats, starts, ends,
                                             task_cfg.n_best_size, task_cfg.max_answer_length)
    threshold = null_threshold
    if version == "squad_v2" and threshold is None:
        if "search" in raw:
            gold = {ex["id"]: list(ex["answers"]["text"]) for ex in data.examples["search"]}
            threshold, _ = best_null_threshold(raw["search"][0], raw["search"][1], gold)
        else:
            threshold = 0.0
    answers: Dict[str, Dict[str, str]] = {}
    for split in splits:
        if split not in raw:
            continue
        preds, diffs = raw[split]
        answers[split] = apply_null_threshold(preds, diffs, float(threshold)) if version == "squad_v2" else preds
    return answers, (float(threshold) if version == "squad_v2" else None)
