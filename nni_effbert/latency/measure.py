"""CPU inference latency: the median of repeated batch-1 forwards.

The protocol, used for every latency nni-effbert reports (trials, report table, bench):

* batch size 1, a fixed sequence length (128 by default: ``evaluator.latency_seq_length``),
  all tokens real (attention mask of ones), token ids drawn from a seeded generator;
* ``torch.no_grad()``, the model in ``eval()`` mode, on CPU;
* ``warmup`` untimed forwards first (allocator and kernel selection), then ``repeats`` timed
  ones with :func:`time.perf_counter`; the **median** is reported, which a background
  process disturbing a few runs does not move;
* a fixed intra-op thread count, **1 by default**: it makes figures comparable between
  machines with different core counts and between trials that run concurrently on one
  machine (``trialConcurrency > 1`` would otherwise make them fight over the cores). The
  caller's thread setting is restored afterwards.

Students are timed without their distillation outputs (``return_kd=False``), teachers
without hidden states or attention maps: what a deployed model computes.

``runtime`` (``evaluator.latency_runtime``) picks what runs the forwards: PyTorch eager (``torch``,
the default), or the model exported to ONNX and run by ONNX Runtime, fp32 (``onnxruntime``) or
after dynamic int8 quantization (``onnxruntime-int8``); see :mod:`nni_effbert.latency.runtimes`.
The ONNX runtimes time ``InferenceSession.run`` with ``threads`` intra-op threads on the CPU.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Mapping, Optional, TypeVar

import torch

from nni_effbert.search_spaces.modeling import EfficientBertModel

from ..errors import ConfigError
from .runtimes import DEFAULT_RUNTIME, INPUT_NAMES, LogitsModule, check_runtime, model_runner

__all__ = ["DEFAULT_THREADS", "LatencyResult", "measure_interleaved", "measure_latency", "median_of_rounds", "pooled_median"]

logger = logging.getLogger(__name__)

#: Intra-op threads used while timing (see the module docstring).
DEFAULT_THREADS = 1


@dataclass
class LatencyResult:
    """Timings of one model.

    Attributes
    ----------
    median_ms : float
        Median wall time of one forward, in milliseconds (the reported figure).
    times_ms : list of float
        Every timed forward, in order.
    seq_length, batch_size, threads : int
        The protocol's settings.
    """

    median_ms: float
    times_ms: List[float] = field(default_factory=list)
    seq_length: int = 128
    batch_size: int = 1
    threads: int = DEFAULT_THREADS
    runtime: str = DEFAULT_RUNTIME

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def _max_positions(model: torch.nn.Module) -> Optional[int]:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _vocab_size(model: torch.nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ConfigError("measure_latency: the model has no config.vocab_size; pass vocab_size=")
    return int(vocab)


def _default_forward(model: torch.nn.Module) -> Callable[..., object]:
    # Late import: keep this module free of nni (the student class lives in search_spaces).

    if isinstance(model, EfficientBertModel):
        return lambda ids, mask, types: model(ids, mask, types, return_kd=False)
    return lambda ids, mask, types: model(
        input_ids=ids, attention_mask=mask, token_type_ids=types,
        output_hidden_states=False, output_attentions=False,
    )


def measure_latency(
    model: torch.nn.Module,
    *,
    seq_length: int = 128,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = DEFAULT_THREADS,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    forward: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]] = None,
    runtime: str = DEFAULT_RUNTIME,
) -> LatencyResult:
    """Median CPU latency of ``model`` on random token ids.

    Parameters
    ----------
    model : torch.nn.Module
        An :class:`~nni_effbert.search_spaces.EfficientBertModel` or a Hugging Face
        sequence-classification model, on CPU. It is put in ``eval()`` mode for the
        measurement; its previous training mode is restored.
    seq_length, batch_size : int
        Input shape (default batch 1, 128 tokens).
    repeats : int
        Timed forwards (at least 1).
    warmup : int
        Untimed forwards before timing.
    threads : int
        ``torch.set_num_threads`` while timing (restored afterwards).
    vocab_size : int, optional
        Range of the random token ids; default ``model.config.vocab_size``.
    seed : int
        Seed of the token ids.
    forward : callable, optional
        ``forward(input_ids, attention_mask, token_type_ids)``; default: students with
        ``return_kd=False``, HF models without hidden states and attentions. Only for the
        ``torch`` runtime.
    runtime : str
        ``torch`` (eager), ``onnxruntime`` or ``onnxruntime-int8`` (the model is exported to ONNX
        at this input shape, quantized for int8, and ``InferenceSession.run`` is timed).

    Returns
    -------
    LatencyResult

    Raises
    ------
    ConfigError
        If the sequence is longer than the model's position table, a setting is not positive,
        or the runtime is unknown (or an ONNX runtime is asked for a model on a GPU).
    DeployMissingError
        For an ONNX runtime without the ``[deploy]`` extra.
    """
    check_runtime(runtime)
    if forward is not None and runtime != "torch":
        raise ConfigError(f"measure_latency: forward= is for the torch runtime, not {runtime}")
    for name, value in (("seq_length", seq_length), ("batch_size", batch_size), ("repeats", repeats),
                        ("threads", threads)):
        if int(value) < 1:
            raise ConfigError(f"measure_latency: {name} must be >= 1, got {value}")
    if warmup < 0:
        raise ConfigError(f"measure_latency: warmup must be >= 0, got {warmup}")
    max_pos = _max_positions(model)
    if max_pos is not None and seq_length > int(max_pos):
        raise ConfigError(
            f"latency sequence length {seq_length} exceeds the model's max_position_embeddings "
            f"({max_pos}); lower evaluator.latency_seq_length"
        )
    vocab = int(vocab_size) if vocab_size else _vocab_size(model)
    gen = torch.Generator().manual_seed(int(seed))
    ids = torch.randint(0, vocab, (batch_size, seq_length), generator=gen)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ids = ids.to(device)  # the model's device (evaluator.latency_device); CUDA timings synchronise
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    run = forward or _default_forward(model)
    if runtime != "torch":
        runner = model_runner(LogitsModule(model), (ids, mask, types), runtime, threads=int(threads),
                              input_names=INPUT_NAMES)
        bound = runner.bind(ids, mask, types)
        run = lambda *_: bound()  # noqa: E731 - the feeds are converted once, outside the timing

    was_training = model.training
    previous_threads = torch.get_num_threads()
    model.eval()
    times: List[float] = []
    try:
        torch.set_num_threads(int(threads))
        with torch.no_grad():
            for _ in range(warmup):
                run(ids, mask, types)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                run(ids, mask, types)
                sync()
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    result = LatencyResult(
        median_ms=float(statistics.median(times)), times_ms=times,
        seq_length=seq_length, batch_size=batch_size, threads=threads, runtime=runtime,
    )
    logger.debug("latency: median %.3f ms over %d runs (%s, batch %d, seq %d, %d thread(s))",
                 result.median_ms, repeats, runtime, batch_size, seq_length, threads)
    return result


_Key = TypeVar("_Key", bound=Hashable)


def measure_interleaved(models: Mapping[_Key, torch.nn.Module], *, rounds: int = 5, **kwargs) -> Dict[_Key, List[LatencyResult]]:
    """Time several models round-robin: in each of ``rounds`` rounds every model gets one
    :func:`measure_latency` call (``kwargs`` are passed on), so that a burst of background load
    hits every model alike instead of the one that happened to be running. Returns each model's
    per-round results, in round order; summarise them with :func:`median_of_rounds` or
    :func:`pooled_median`."""
    if int(rounds) < 1:
        raise ConfigError(f"measure_interleaved: rounds must be >= 1, got {rounds}")
    results: Dict[_Key, List[LatencyResult]] = {key: [] for key in models}
    for _ in range(int(rounds)):
        for key, model in models.items():
            results[key].append(measure_latency(model, **kwargs))
    return results


def median_of_rounds(results: List[LatencyResult]) -> float:
    """The median over rounds of each round's median (ms)."""
    return float(statistics.median(r.median_ms for r in results))


def pooled_median(results: List[LatencyResult]) -> float:
    """The median of every timed forward of every round (ms)."""
    return float(statistics.median(t for r in results for t in r.times_ms))
