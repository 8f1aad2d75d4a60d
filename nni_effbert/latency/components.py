"""Timing the components of the latency table: each block of the student on its own (embeddings,
attention, an MLP of a width, an expression slot, the head), whole reference models for the
overheads, and random archs for the calibration (:class:`ComponentTimer`).

Each entry is timed with warm-up and the median over :data:`ROUNDS` rounds of a timed loop of
about :data:`ROUND_MS` ms; a slot is timed interleaved with the empty slot, round by round, and
the median difference is kept, so slow drift of a shared machine cancels. Under an ONNX Runtime
runtime each component is exported on its own (and quantized for ``onnxruntime-int8``) and its
session's ``run`` is timed.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import numpy as np
import torch

from nni_effbert.search_spaces.space_config import EfficientBertConfig
from nni_effbert.search_spaces.modeling import (SLOTS, EfficientBertModel, EfficientMLPBlock, Embeddings,
                                                LayerArch, SelfAttention, SlotSpec)
from nni_effbert.search_spaces.ops import NO_BINARY
from nni_effbert.search_spaces.supernet import layer_choices  # not .space: that imports nni.nas

from ..errors import ConfigError
from .measure import measure_latency
from .runtimes import DEFAULT_RUNTIME, LogitsModule, model_runner
from .settings import LatencySettings, torch_device

if TYPE_CHECKING:  # annotations only: the table imports this module to time its entries
    from .table import LatencyTable

__all__ = ["ROUNDS", "ROUND_MS", "CALIBRATION_ARCHS", "CALIBRATION_SEED", "time_ms", "time_difference_ms",
           "ComponentTimer", "reference_arch", "random_archs"]


#: Random archs timed end to end to fit the ``calibration`` entry, and their seed (unlike the
#: check's default seed 0).
CALIBRATION_ARCHS = 8
CALIBRATION_SEED = 7919


#: Timed rounds per entry (the median is kept) and the wall time one round aims at. A round about
#: as long as a whole forward sees the same share of a time-shared CPU as an end-to-end forward
#: does: with 2 ms rounds, on the busy 2-core project machine (load 12-16), the entries escaped
#: most preemption while forwards did not, and the check's MAPE was 52-79%; with 20 ms rounds,
#: 21% at the same load (bench/results/latency_check.md).
ROUNDS = 7
ROUND_MS = 20.0


def _sync_fn(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def _loop_count(fn: Callable[[], Any], sync, warmup: int = 3) -> int:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(10):
        fn()
    sync()
    single = max((time.perf_counter() - start) / 10, 1e-7)
    return max(1, min(1000, int(math.ceil(ROUND_MS / 1000.0 / single))))


def _time_round(fn, k: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(k):
        fn()
    sync()
    return (time.perf_counter() - start) * 1000.0 / k


def time_ms(fn: Callable[[], Any], sync=lambda: None, rounds: int = ROUNDS) -> float:
    """Median milliseconds of one call of ``fn`` (warm-up, then ``rounds`` timed loops)."""
    k = _loop_count(fn, sync)
    return float(statistics.median(_time_round(fn, k, sync) for _ in range(rounds)))


def time_difference_ms(fn: Callable[[], Any], base: Callable[[], Any], sync=lambda: None,
                       rounds: int = ROUNDS) -> float:
    """Median over interleaved rounds of ``time(fn) - time(base)`` (clipped at 0)."""
    k = max(_loop_count(fn, sync), _loop_count(base, sync))
    diffs = []
    for r in range(rounds):
        pair = (fn, base) if r % 2 == 0 else (base, fn)
        times = {id(f): _time_round(f, k, sync) for f in pair}
        diffs.append(times[id(fn)] - times[id(base)])
    return max(0.0, float(statistics.median(diffs)))


class ComponentTimer:
    """Modules and inputs of one space at one device and input shape (random weights)."""

    def __init__(self, config: EfficientBertConfig, settings: LatencySettings, seed: int = 0):
        self.config = config
        self.dev = torch_device(settings.device)
        self.sync = _sync_fn(self.dev)
        b, t, h = settings.batch_size, settings.seq_length, config.hidden_size
        if t > config.max_position_embeddings:
            raise ConfigError(f"latency sequence length {t} exceeds the student's max_position_embeddings "
                              f"({config.max_position_embeddings}); lower evaluator.latency_seq_length")
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, config.vocab_size, (b, t), generator=g).to(self.dev)
        self.types = torch.zeros_like(self.ids)
        self.mask = torch.ones_like(self.ids)
        self.hidden = torch.randn(b, t, h, generator=g).to(self.dev)
        self.embeddings = Embeddings(config).to(self.dev).eval()
        self.attention = SelfAttention(config).to(self.dev).eval()
        self.pooler = torch.nn.Linear(h, h).to(self.dev).eval()
        self.classifier = torch.nn.Linear(h, config.num_labels).to(self.dev).eval()
        self.settings = settings
        self._runners: Dict[int, Callable[[], Any]] = {}

    def _callable(self, module: torch.nn.Module, *inputs: torch.Tensor) -> Callable[[], Any]:
        """``module(*inputs)`` in the table's runtime: eager, or its own ONNX export in ONNX Runtime."""
        if self.settings.runtime == DEFAULT_RUNTIME:
            return lambda: module.forward(*inputs)  # no hooks to run: time the component alone
        return model_runner(module, inputs, self.settings.runtime, threads=self.settings.threads).bind(*inputs)

    def _latency(self, model: torch.nn.Module, repeats: int, warmup: int) -> List[float]:
        if self.settings.runtime == DEFAULT_RUNTIME:
            return measure_latency(model, seq_length=self.settings.seq_length, batch_size=self.settings.batch_size,
                                   repeats=repeats, warmup=warmup, threads=self.settings.threads).times_ms
        # ONNX runtimes: export each reference model once (rounds re-time it, not re-export it).
        fn = self._runners.get(id(model))
        if fn is None:
            fn = self._runners[id(model)] = self._callable(LogitsModule(model), self.ids, self.mask, self.types)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
        return times

    def measure(self, kind: str, spec: Any, table: "LatencyTable") -> float:
        sync = self.sync
        if kind == "embeddings":
            return time_ms(self._callable(_EmbeddingsPart(self.embeddings), self.ids, self.types, self.mask), sync)
        if kind == "attention":
            bias = torch.zeros(self.ids.shape[0], 1, 1, self.ids.shape[1], device=self.dev)
            return time_ms(self._callable(_AttentionPart(self.attention), self.hidden, bias), sync)
        if kind == "head":
            return time_ms(self._callable(_HeadPart(self.pooler, self.classifier), self.hidden), sync)
        if kind == "mlp":
            block = EfficientMLPBlock(self.config, int(spec)).to(self.dev).eval()
            return time_ms(self._callable(_MLPPart(block, _plain_layer(int(spec))), self.hidden), sync)
        if kind == "slot":
            slot, hw, xw = spec
            g = torch.Generator().manual_seed(1)
            b, t = self.ids.shape
            h = torch.randn(b, t, hw, generator=g).to(self.dev)
            x = self.hidden if xw == self.config.hidden_size else torch.randn(b, t, xw, generator=g).to(self.dev)
            onnx = self.settings.runtime != DEFAULT_RUNTIME
            return time_difference_ms(self._callable(_SlotPart(slot, onnx), h, x),
                                      self._callable(_SlotPart(SlotSpec(), onnx), h, x), sync)
        if kind in ("overhead", "overhead_per_mlp"):
            # Two end-to-end references: every layer at stack 1 and at the largest stack. What
            # they take beyond their entries is a fixed part (the model's own forward) plus a
            # part per MLP block (a block inside the model runs colder than in a timed loop).
            stacks = sorted({1, self.config.max_stack})
            archs = {k: reference_arch(self.config, stack=k) for k in stacks}
            models = {k: EfficientBertModel(self.config, a).to(self.dev).eval() for k, a in archs.items()}
            times: Dict[int, List[float]] = {k: [] for k in stacks}
            for _ in range(6):  # interleaved rounds: a burst of load hits both references alike
                for k in stacks:
                    times[k] += self._latency(models[k], repeats=8, warmup=2)
            residual = {k: statistics.median(times[k]) - table.predict(archs[k], with_overhead=False, calibrated=False)
                        for k in stacks}
            n = self.config.num_hidden_layers
            extra_blocks = n * (self.config.max_stack - 1)
            per_mlp = (residual[self.config.max_stack] - residual[1]) / extra_blocks if extra_blocks else 0.0
            table.entries["overhead_per_mlp"] = round(per_mlp, 6)
            return residual[1] - n * per_mlp if kind == "overhead" else per_mlp
        if kind == "calibration":
            archs = random_archs(self.config, CALIBRATION_ARCHS, seed=CALIBRATION_SEED)
            models = [EfficientBertModel(self.config, a).to(self.dev).eval() for a in archs]
            times: List[List[float]] = [[] for _ in archs]
            for _ in range(3):  # interleaved rounds, as for the overheads
                for i, model in enumerate(models):
                    times[i] += self._latency(model, repeats=8, warmup=2)
            ratios = [statistics.median(t) / table.predict(a, calibrated=False) for t, a in zip(times, archs)]
            return statistics.median(ratios)
        raise ValueError(f"unknown latency entry kind {kind!r}")


class _EmbeddingsPart(torch.nn.Module):
    """The embeddings and the attention-mask bias (the ``embeddings`` entry)."""

    def __init__(self, embeddings: Embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids, types, mask):
        h = self.embeddings(ids, types)
        return h, (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min


class _AttentionPart(torch.nn.Module):
    def __init__(self, attention: SelfAttention):
        super().__init__()
        self.attention = attention

    def forward(self, hidden, bias):
        return self.attention(hidden, bias)[0]


class _HeadPart(torch.nn.Module):
    def __init__(self, pooler: torch.nn.Linear, classifier: torch.nn.Linear):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier

    def forward(self, hidden):
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


class _MLPPart(torch.nn.Module):
    def __init__(self, block: EfficientMLPBlock, la: LayerArch):
        super().__init__()
        self.block, self.la = block, la

    def forward(self, hidden):
        return self.block(hidden, self.la)


class _SlotPart(torch.nn.Module):
    def __init__(self, slot: SlotSpec, onnx: bool = False):
        super().__init__()
        self.slot, self.onnx = slot, onnx

    def forward(self, h, x):
        # In ONNX, ``+ 0`` keeps the empty slot a graph with a kernel (an output that is its own
        # input has nothing to run); both sides of the difference pay the same add.
        return self.slot(h, x) + 0.0 if self.onnx else self.slot(h, x)


def _plain_layer(width: int, stack: int = 1) -> LayerArch:
    return LayerArch(pre=SlotSpec(), mid=SlotSpec(), post=SlotSpec(), width=width, stack=stack)


def reference_arch(config: EfficientBertConfig, stack: int = 1) -> Dict[str, Any]:
    """BERT's MLP at the largest width and ``stack`` at every layer: what the overheads are measured on."""
    arch: Dict[str, Any] = {}
    for i in range(config.num_hidden_layers):
        for slot in SLOTS:
            arch[f"layer{i}_{slot}_act"] = "gelu" if slot == "mid" else "identity"
            arch[f"layer{i}_{slot}_binary"] = NO_BINARY
            if slot != "pre":
                arch[f"layer{i}_{slot}_operand"] = "x"
            arch[f"layer{i}_{slot}_order"] = "act_first"
        arch[f"layer{i}_width"] = max(config.widths)
        arch[f"layer{i}_stack"] = int(stack)
    return arch


def random_archs(config: EfficientBertConfig, n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` uniform random archs of the space (seeded)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(int(n)):
        arch: Dict[str, Any] = {}
        for i in range(config.num_hidden_layers):
            for label, values in layer_choices(config, i).items():
                arch[label] = values[rng.randint(len(values))]
        out.append(arch)
    return out
