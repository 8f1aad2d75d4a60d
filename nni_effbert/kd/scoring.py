"""Scoring a student: the dev metric, row-aligned predictions, and the search split's metric
with the KD losses against the teacher.

* :func:`evaluate`: the task metric on a labelled split (the final report's dev score);
* :func:`predict`: logits and labels in the split's row order (paired comparisons);
* :func:`score_split`: metric + KD losses on the held-out search split (a candidate's score);
* :func:`score_span_split`: the same for span QA (EM / F1 after post-processing, the v2.0 null
  threshold tuned on the split itself).

All run under :func:`torch.inference_mode` and leave the model's train/eval mode as they found
it. A non-finite metric or loss raises :class:`~nni_effbert.kd.train.TrialFailure`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batches import length_sorted_batches, make_loader
from ..data.metrics import compute_metrics
from ..data.qa_answers import apply_null_threshold, best_null_threshold, evaluate_predictions, postprocess_predictions
from ..errors import ConfigError
from ..runtime import Runtime
from .losses import KDLoss, prediction_loss, span_prediction_loss
from .sources import Arch, Batch, TeacherSource
from .train import TrialFailure, student_forward

__all__ = ["evaluate", "predict", "score_split", "score_span_split"]



def evaluate(model: nn.Module, dataset, spec, *, batch_size: int, pad_token_id: int,
             arch: Optional[Arch] = None, device: Any = "cpu", batches=None,
             runtime: Optional[Runtime] = None) -> Dict[str, float]:
    """Task metric of ``model`` on a labelled split (usually dev).

    Runs under :func:`torch.inference_mode` on batches of rows sorted by length
    (:func:`~nni_effbert.data.batches.length_sorted_batches`), so little compute goes to padding.

    Parameters
    ----------
    model : nn.Module
        A student (or the supernet with ``arch``).
    dataset : datasets.Dataset
        Tokenized rows with ``labels``.
    spec : TaskSpec
        ``metric`` and ``is_regression`` are used.
    batch_size, pad_token_id : int
        Inference batch size (rows per batch) and padding id.
    arch : dict, optional
        For the supernet.
    device : torch.device or str
        Used when no ``runtime`` is given.
    batches : list of dict, optional
        The split's batches already built by ``length_sorted_batches`` (reused between calls;
        ``dataset`` and ``batch_size`` are then only checked for emptiness).
    runtime : Runtime, optional
        Device, autocast precision and loader workers.

    Returns
    -------
    dict
        :func:`nni_effbert.data.metrics.compute_metrics` output (``default`` and components).

    Raises
    ------
    TrialFailure
        If the model outputs NaN or infinite logits (a diverged model would otherwise get the
        accuracy of always predicting class 0), or the metric is undefined (constant
        regression outputs).
    """

    preds, labels = predict(model, dataset, spec, batch_size=batch_size, pad_token_id=pad_token_id, arch=arch,
                            device=device, batches=batches, runtime=runtime)
    metrics = compute_metrics(spec.metric, preds, labels)
    if not math.isfinite(metrics["default"]):
        raise TrialFailure(f"dev {spec.metric} is undefined ({metrics['default']}): the model's predictions are constant")
    return {k: float(v) for k, v in metrics.items()}


def predict(model: nn.Module, dataset, spec, *, batch_size: int, pad_token_id: int,
            arch: Optional[Arch] = None, device: Any = "cpu", batches=None,
            runtime: Optional[Runtime] = None, call: Optional[Callable[[nn.Module, Batch], Tensor]] = None,
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions of ``model`` on every row of a labelled split, in the dataset's row order.

    What :func:`evaluate` scores, row by row, for paired comparisons of two models on the same
    rows (:mod:`nni_effbert.stats`). Same parameters as :func:`evaluate`, plus ``call``: how to
    get logits from a model and a batch (default: a student's forward; a Hugging Face teacher
    needs ``lambda m, b: m(**inputs).logits``).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Logits ``[N, C]`` (``[N]`` values for regression) and labels ``[N]``, row ``i`` being
        dataset row ``i``.

    Raises
    ------
    TrialFailure
        If the model outputs NaN or infinite logits.
    """
    if len(dataset) == 0:
        raise ConfigError("cannot evaluate on an empty split")
    if batches is None:
        batches, order = length_sorted_batches(dataset, batch_size, pad_token_id)
    else:
        order = None  # batches built by the caller: rows are put back in order by their lengths' sort
    rt = runtime if runtime is not None else Runtime(torch.device(device))
    forward = call or (lambda m, b: student_forward(m, b, arch, return_kd=False).logits)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for batch in batches:
                labels.append(batch["labels"])
                batch = {k: v.to(rt.device, non_blocking=rt.is_cuda) for k, v in batch.items()}
                with rt.autocast():
                    out = forward(model, batch)
                logits.append(out.float())
        logits = [x.cpu() for x in logits]  # one sync at the end, not one per batch
    finally:
        model.train(was_training)
    all_logits = torch.cat(logits)
    if not torch.isfinite(all_logits).all():
        raise TrialFailure("the model's dev logits are NaN or infinite: it diverged")
    preds = all_logits[:, 0].numpy() if spec.is_regression else all_logits.numpy()
    gold = torch.cat(labels).numpy()
    if order is None:
        lengths = np.fromiter((len(ids) for ids in dataset["input_ids"]), dtype=np.int64, count=len(dataset))
        order = np.argsort(lengths, kind="stable")  # what length_sorted_batches does
    back = np.argsort(order)
    return preds[back], gold[back]


@torch.no_grad()
def score_split(model: nn.Module, dataset, spec, teacher: TeacherSource, loss_fn: KDLoss, *, batch_size: int,
                pad_token_id: int, arch: Optional[Arch] = None, device: Any = "cpu",
                split: str = "search") -> Dict[str, Any]:
    """Task metric and KD losses of ``model`` on a labelled split, in one pass (eval mode).

    This is what a candidate is scored with on the held-out search split: the task metric and
    the distillation loss against the teacher's (cached) outputs on the same rows (DNA, Li et
    al., CVPR 2020, ranks candidates by their distillation loss).

    Parameters
    ----------
    model : nn.Module
        A student (or the supernet with ``arch``).
    dataset : datasets.Dataset
        Tokenized rows with ``labels`` and ``idx``.
    spec : TaskSpec
    teacher : TeacherSource
        Teacher outputs of the same rows (e.g. :class:`CachedTeacher` over the split's cache).
    loss_fn : KDLoss
        The experiment's KD loss (its weights give ``kd_loss``).
    batch_size, pad_token_id : int
    arch : dict, optional
    device : torch.device or str
    split : str
        Named in error messages.

    Returns
    -------
    dict
        ``metrics`` (:func:`~nni_effbert.data.metrics.compute_metrics`, ``default`` first),
        ``kd_loss`` (the weighted KD loss, mean over batches weighted by their size),
        ``kd_pred_loss`` (the prediction soft-CE alone at ``kd.temperature``, MSE for
        regression, whatever ``kd.prediction_weight`` is), and ``kd_attention_loss`` /
        ``kd_hidden_loss`` when those terms are on; ``rows``.

    Raises
    ------
    TrialFailure
        Non-finite logits or losses, or an undefined metric.
    ConfigError
        An empty split.
    """
    if len(dataset) == 0:
        raise ConfigError(f"cannot score on the empty {split} split")
    logits, labels = [], []
    regression = bool(spec.is_regression)

    def keep(batch: Batch, out: Any) -> None:
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())

    kd = _kd_pass(model, make_loader(dataset, batch_size, False, 0, pad_token_id), teacher, loss_fn, arch=arch,
                  device=device, split=split, keep=keep,
                  pred_loss=lambda s, t, batch: prediction_loss(s, t, loss_fn.temperature, regression))
    all_logits = torch.cat(logits)
    if not torch.isfinite(all_logits).all():
        raise TrialFailure(f"the model's {split} logits are NaN or infinite: it diverged")
    preds = all_logits[:, 0].numpy() if regression else all_logits.numpy()
    metrics = {k: float(v) for k, v in compute_metrics(spec.metric, preds, torch.cat(labels).numpy()).items()}
    if not math.isfinite(metrics["default"]):
        raise TrialFailure(f"{split} {spec.metric} is undefined ({metrics['default']}): the model's predictions "
                           "are constant")
    return {"metrics": metrics, **kd}


@torch.no_grad()
def score_span_split(model: nn.Module, data, split: str, task_cfg, teacher: TeacherSource, loss_fn: KDLoss, *,
                     batch_size: int, pad_token_id: int, arch: Optional[Arch] = None,
                     device: Any = "cpu") -> Dict[str, Any]:
    """:func:`score_split` of span QA: EM / F1 and KD losses of ``model`` on a QA split, in one pass.

    Features (windows) are scored against the teacher's cached start / end logits; their logits
    are post-processed into one answer per question (:func:`nni_effbert.data.qa_answers.postprocess_predictions`)
    and scored with the official rules. For SQuAD v2.0 the null threshold is the best one on
    this split (the search split is where it is tuned).

    Parameters
    ----------
    model : nn.Module
        A student with the span head (or the supernet with ``arch``).
    data : QAData
    split : str
        ``search`` (candidates) or another split of ``data``.
    task_cfg : TaskConfig
        ``n_best_size`` and ``max_answer_length``.
    teacher, loss_fn, batch_size, pad_token_id, arch, device
        As :func:`score_split`.

    Returns
    -------
    dict
        ``metrics`` (``default`` = F1, ``exact``, ``f1``, ...), ``kd_loss``, ``kd_pred_loss`` (the
        start / end soft CE), ``kd_attention_loss`` / ``kd_hidden_loss`` when on, ``rows`` (features)
        and ``questions``.
    """
    features, examples = getattr(data, split), data.examples[split]
    if len(features) == 0:
        raise ConfigError(f"cannot score on the empty {split} split")
    starts: List[np.ndarray] = []
    ends: List[np.ndarray] = []
    inputs = features.select_columns([c for c in features.column_names if c not in ("example_id", "offset_mapping")])

    def keep(batch: Batch, out: Any) -> None:
        logits = out.logits.float().cpu().numpy()
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            starts.append(logits[row, :length, 0])
            ends.append(logits[row, :length, 1])

    kd = _kd_pass(model, make_loader(inputs, batch_size, False, 0, pad_token_id), teacher, loss_fn, arch=arch,
                  device=device, split=split, keep=keep,
                  pred_loss=lambda s, t, batch: span_prediction_loss(s, t, batch["attention_mask"], loss_fn.temperature))
    if not all(np.isfinite(x).all() for x in starts + ends):
        raise TrialFailure(f"the model's {split} start/end logits are NaN or infinite: it diverged")
    preds, diffs = postprocess_predictions(examples, features, starts, ends, task_cfg.n_best_size,
                                           task_cfg.max_answer_length)
    version = data.spec.name
    threshold = None
    if version == "squad_v2":
        gold = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
        threshold, _ = best_null_threshold(preds, diffs, gold)
        preds = apply_null_threshold(preds, diffs, threshold)
    metrics = {k: float(v) for k, v in evaluate_predictions(preds, examples, version).items()}
    if threshold is not None:
        metrics["null_threshold"] = float(threshold)
    return {"metrics": metrics, **kd, "questions": len(examples)}


def _kd_pass(model: nn.Module, batches, teacher: TeacherSource, loss_fn: KDLoss, *, arch: Optional[Arch],
             device: Any, split: str, pred_loss: Callable[[Tensor, Tensor, Batch], Tensor],
             keep: Callable[[Batch, Any], None]) -> Dict[str, Any]:
    """One eval-mode pass of :func:`score_split` / :func:`score_span_split`: the KD loss terms
    against ``teacher`` (means over rows) plus the prediction loss ``pred_loss(student logits,
    teacher logits, batch)`` alone; ``keep(batch, student output)`` collects what the caller scores.

    Returns ``kd_loss``, ``kd_pred_loss``, ``kd_attention_loss`` / ``kd_hidden_loss`` when those
    terms are on, and ``rows``; raises :class:`TrialFailure` on a non-finite loss."""
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}
    n = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            t_out = teacher(batch)
            out = student_forward(model, batch, arch, return_kd=True)
            terms = loss_fn(out, t_out, batch["attention_mask"]).as_dict()
            terms["pred_soft_ce"] = float(pred_loss(out.logits, t_out.logits, batch))
            b = int(batch["input_ids"].shape[0])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
            keep(batch, out)
    finally:
        model.train(was_training)
    means = {k: v / n for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise TrialFailure(f"the model's KD loss on the {split} split is not finite ({means}): it diverged")
    out = {"kd_loss": means["total"], "kd_pred_loss": means["pred_soft_ce"], "rows": n}
    out.update({f"kd_{term}_loss": means[term] for term in ("attention", "hidden") if term in means})
    return out
