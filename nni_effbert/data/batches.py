"""Padded torch batches of a tokenized split: :func:`collate` (pad to the batch's longest row),
:func:`make_loader` (a ``DataLoader``, seeded when shuffled) and :func:`length_sorted_batches`
(rows sorted by length, for evaluation with little padding).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from .loading import MODEL_INPUTS

__all__ = ["collate", "make_loader", "length_sorted_batches"]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def _as_rows(features: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]) -> Dict[str, List[Any]]:
    if isinstance(features, Mapping):  # a dataset slice: dict of lists
        return {k: list(v) for k, v in features.items()}
    if not features:
        raise ValueError("collate: empty batch")
    return {k: [f[k] for f in features] for k in features[0]}


def collate(
    features: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]],
    pad_token_id: int,
) -> Dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence.

    Parameters
    ----------
    features : list of dicts, or dict of lists
        Rows of a :class:`TaskData` split (``input_ids`` etc. as int lists).
    pad_token_id : int
        Filler of ``input_ids``; ``token_type_ids`` and ``attention_mask`` pad with 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids, token_type_ids, attention_mask`` as ``[B, T]`` long tensors; ``labels``
        (long, or float for regression), ``start_positions`` / ``end_positions`` (span QA) and
        ``idx`` as ``[B]`` tensors when present. Other columns (QA's ``example_id``,
        ``offset_mapping``) are left out.
    """
    cols = _as_rows(features)
    lengths = [len(ids) for ids in cols["input_ids"]]
    width = max(lengths)
    batch: Dict[str, torch.Tensor] = {}
    for name in MODEL_INPUTS:
        if name not in cols:
            if name == "token_type_ids":  # tokenizers without segment ids (RoBERTa-style)
                cols[name] = [[0] * n for n in lengths]
            elif name == "attention_mask":
                cols[name] = [[1] * n for n in lengths]
            else:
                raise KeyError(f"collate: batch has no {name!r}; columns: {sorted(cols)}")
        fill = pad_token_id if name == "input_ids" else 0
        out = torch.full((len(lengths), width), fill, dtype=torch.long)
        for i, seq in enumerate(cols[name]):
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        batch[name] = out
    if "labels" in cols:
        labels = cols["labels"]
        is_float = any(isinstance(v, float) for v in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
    for name in ("start_positions", "end_positions"):  # span QA targets (nni_effbert.data.qa)
        if name in cols:
            batch[name] = torch.tensor(cols[name], dtype=torch.long)
    if "idx" in cols:
        batch["idx"] = torch.tensor(cols["idx"], dtype=torch.long)
    return batch


def make_loader(
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_token_id: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A torch DataLoader over a tokenized split, padded per batch (to the batch's longest row).

    Batches are read from Arrow a slice at a time (one ``dataset[indices]`` call per batch),
    which is much faster than row by row. The shuffle order depends only on ``seed``.
    ``num_workers`` / ``pin_memory`` are DataLoader's (``runtime.dataloader_workers``; pinned
    batches copy to a GPU without blocking).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if shuffle:
        base = RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
    else:
        base = SequentialSampler(dataset)
    sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole index lists
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory),
    )


def length_sorted_batches(dataset: datasets.Dataset, batch_size: int, pad_token_id: int) -> Tuple[List[Dict[str, torch.Tensor]], np.ndarray]:
    """Padded batches of a split with its rows sorted by length, for inference.

    Rows of similar length share a batch, so little compute goes to padding (dev sentences of
    SST-2 range from a few to 60+ tokens). The split is read from Arrow once.

    Parameters
    ----------
    dataset : datasets.Dataset
        A tokenized split (see :class:`TaskData`).
    batch_size : int
        Rows per batch (> 0).
    pad_token_id : int

    Returns
    -------
    (list of dict, numpy.ndarray)
        The batches (as :func:`collate` returns them) and ``order``: batch rows, concatenated,
        are the dataset's rows ``order`` (so ``out[np.argsort(order)]`` restores dataset order).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    cols = dataset[:]
    lengths = np.fromiter((len(ids) for ids in cols["input_ids"]), dtype=np.int64, count=len(dataset))
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size].tolist()
        batches.append(collate({k: [v[i] for i in rows] for k, v in cols.items()}, pad_token_id))
    return batches, order
