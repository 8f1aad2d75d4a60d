"""A per-device latency lookup table of the student's components, and the predictor built on it.

FBNet (Wu et al., CVPR 2019) and HAT (Wang et al., ACL 2020) predict an architecture's latency
without running it: every block of the space is timed once on the target device, and an
architecture's latency is the sum of its blocks' entries. This module does the same for
:class:`~nni_effbert.search_spaces.EfficientBertModel`:

``embeddings``
    the factorised embeddings (lookup, up-projection, position / type tables, LayerNorm) and
    the attention-mask bias;
``attention``
    one self-attention block (q / k / v / output dense, softmax, residual + LayerNorm); every
    layer has the same shape, so one entry serves all layers;
``mlp/w{W}``
    one MLP block of width ``W`` with an empty expression (``linear2(linear1(x))``, residual,
    LayerNorm);
``slot/{act}/{none|binary}/h{H}/x{X}``
    the extra cost of one expression slot over an empty one, on a slot input of width ``H``
    and an MLP input of width ``X``;
``head``
    pooler, tanh and classifier;
``overhead``, ``overhead_per_mlp``
    what end-to-end forwards of two reference archs (BERT's MLP at the largest width, stack 1
    and the largest stack at every layer) take beyond the sum of their entries, split into a
    fixed part (the model's own ``forward``: mask, Python loop) and a part per MLP block (a block
    inside the model runs with colder caches and dispatch than in a timed loop of itself).
``calibration``
    a scale on the whole sum, fitted last: the median ratio of measured to summed latency over
    :data:`CALIBRATION_ARCHS` random archs of the space (seeded with :data:`CALIBRATION_SEED`,
    so they are not the archs ``nni-effbert latency --check`` draws). The overheads are fitted
    on the largest archs only; on smaller ones the isolated entries add up to more than a
    forward takes (measured in the docs' results page, "Latency table"), the same gap HAT
    closes by fitting its predictor to measured samples.

What changes an MLP's cost, and what does not (so that the table stays small):

* per slot, its activation (``identity`` costs nothing) and whether it has a binary op (one
  more element-wise kernel);
* **not** which binary op, nor its operand: ``add`` / ``mul`` / ``max`` and an ``x`` or ``input``
  operand measured within each other's noise, so one entry stands for all binary ops (the
  measurements behind these choices are on the docs' results page, "Latency table");
* the width of ``linear1`` (both linears and the mid slot's tensors scale with it);
* **not** the slot's order: ``binary(o, act(h))`` and ``act(binary(h, o))`` run the same two
  element-wise kernels on tensors of the same shape;
* **not** the position in the stack nor the layer index: every MLP of a stack, and every layer,
  runs the same kernels on tensors of the same shape; a stack of ``s`` MLPs costs ``s`` entries.

Slots are additive (each is one or two element-wise kernels between the linears), so instead of
one entry per whole expression (``64 x 128 x 128`` label combinations of the three slots per
width: activation x binary op x operand x order) the table
holds one entry per slot cost class and tensor width: 15 per tensor width (8 activations, with
and without a binary op, less the empty slot), one MLP base per width, and five fixed entries
(70 entries for the quickstart preset, with the calibration). Each entry is timed with
warm-up and the median over rounds of a timed loop; a slot is timed interleaved with the empty
slot, round by round, and the median difference is kept, so slow drift of a shared machine
cancels.

A table is stored in the work directory (``<workdir>/latency/table-<digest>.json``), keyed by the
device (name and model), torch version, intra-op threads, batch size, sequence length, the
student space's sizes and the runtime (``evaluator.latency_runtime``: for ``onnxruntime`` and
``onnxruntime-int8`` the key also holds the onnxruntime version; a ``torch`` table's key has no
runtime field, so tables built before the option stay valid); a table with another key is a
different file, so changing the thread count builds a new table and keeps the old one.

Runtimes. Under an ONNX Runtime runtime every component above is exported on its own to ONNX
(and quantized for ``onnxruntime-int8``) and its ``InferenceSession.run`` is timed; the overheads
and the calibration time whole models in the same runtime. Whether that sum models a runtime
well is what ``nni-effbert latency --check N`` measures: ONNX Runtime fuses kernels across
component boundaries (e.g. a linear's bias with its activation), which isolated components
cannot see; the calibration absorbs the average of it, not its variation between archs. Building is resumable: the file is rewritten after
every few entries and a rebuild measures only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from nni_effbert.search_spaces.space_config import EfficientBertConfig, preset_config
from nni_effbert.search_spaces.modeling import (SLOTS, EfficientBertModel, EfficientMLPBlock, Embeddings,
                                                LayerArch, SelfAttention, SlotSpec)
from nni_effbert.search_spaces.ops import NO_BINARY
from nni_effbert.search_spaces.supernet import layer_choices  # not .space: that imports nni.nas

from ..errors import ConfigError, EffBertError
from ..io import atomic_write_json, load_json
from ..workdir import WorkDir
from .measure import measure_latency
from .runtimes import DEFAULT_RUNTIME, LogitsModule, check_runtime, model_runner, runtime_version
from ..kd.teacher import load_teacher, prepare_teacher, teacher_fingerprint

__all__ = [
    "LatencyTableError",
    "LatencySettings",
    "LatencyTable",
    "CheckResult",
    "latency_settings",
    "table_path",
    "build_table",
    "load_table",
    "table_for_config",
    "predicted_latency_ms",
    "random_archs",
    "check_table",
    "teacher_latency_ms",
    "search_latency",
]

logger = logging.getLogger(__name__)

#: Bumped when what an entry means changes (old tables are then rebuilt, not misread).
PROTOCOL = 3
#: Random archs timed end to end to fit the ``calibration`` entry, and their seed (unlike the
#: check's default seed 0).
CALIBRATION_ARCHS = 8
CALIBRATION_SEED = 7919
#: Folder of the tables inside the work directory.
LATENCY_DIR = "latency"
#: Timed rounds per entry (the median is kept) and the wall time one round aims at. A round about
#: as long as a whole forward sees the same share of a time-shared CPU as an end-to-end forward
#: does: with 2 ms rounds, on the busy 2-core project machine (load 12-16), the entries escaped
#: most preemption while forwards did not, and the check's MAPE was 52-79%; with 20 ms rounds,
#: 21% at the same load (bench/results/latency_check.md).
ROUNDS = 7
ROUND_MS = 20.0
_SAVE_EVERY = 8


class LatencyTableError(EffBertError):
    """A latency table is missing, incomplete, corrupt or was built for other settings."""


# ---------------------------------------------------------------------------------------------
# Settings and keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySettings:
    """Where and how latency is measured (``evaluator.latency_*``).

    Attributes
    ----------
    device : str
        ``cpu`` or a CUDA device (``cuda``, ``cuda:1``).
    threads : int
        Intra-op threads (``torch.set_num_threads``) while timing.
    batch_size, seq_length : int
        Input shape.
    runtime : str
        ``torch``, ``onnxruntime`` or ``onnxruntime-int8`` (``evaluator.latency_runtime``).
    """

    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    seq_length: int = 128
    runtime: str = DEFAULT_RUNTIME

    def __post_init__(self) -> None:
        for name in ("threads", "batch_size", "seq_length"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"latency {name} must be >= 1, got {getattr(self, name)!r}")
        dev = torch_device(self.device)  # validates
        if check_runtime(self.runtime) != "torch":
            if dev.type != "cpu":
                raise ConfigError(f"evaluator.latency_runtime {self.runtime} runs on the CPU, but "
                                  f"evaluator.latency_device is {self.device!r}; set latency_device: cpu")
            runtime_version(self.runtime)  # DeployMissingError (one line naming the extra) up front


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here, or a one-line :class:`ConfigError`."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"evaluator.latency_device {name!r} is not a torch device ({exc}); use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"evaluator.latency_device is {name!r} but CUDA is not available on this machine; "
                              "set evaluator.latency_device: cpu or measure on a machine with that GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"evaluator.latency_device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"evaluator.latency_device {name!r}: only cpu and cuda devices are supported")
    return dev


def device_description(name: str) -> str:
    """Human-readable model of the device (CPU model name, GPU name): part of a table's key."""
    dev = torch_device(name)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{model or platform.processor() or platform.machine()}"


def latency_settings(cfg) -> LatencySettings:
    """The :class:`LatencySettings` of an experiment config (``evaluator.latency_*``)."""
    ev = cfg.evaluator
    return LatencySettings(device=str(getattr(ev, "latency_device", "cpu") or "cpu"),
                           threads=int(getattr(ev, "latency_threads", 1) or 1),
                           batch_size=int(getattr(ev, "latency_batch_size", 1) or 1),
                           seq_length=int(ev.latency_seq_length),
                           runtime=str(getattr(ev, "latency_runtime", DEFAULT_RUNTIME) or DEFAULT_RUNTIME))


def _space_key(config: EfficientBertConfig) -> Dict[str, Any]:
    d = config.to_dict()
    # Dropout and init do not change inference cost; the fields an experiment derives from its
    # teacher and task (vocabulary, fit_size, labels) change it by a table lookup or a head of a
    # few units at most, and leaving them out lets processes that never load the teacher (the
    # nnictl tuner) find the table the trials use. ``head`` (span QA's start / end layer instead of
    # pooler + classifier) is derived from the task the same way; the table times the classifier.
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
              "vocab_size", "fit_size", "num_labels", "pad_token_id", "type_vocab_size", "head"):
        d.pop(k, None)
    return d


def table_key(config: EfficientBertConfig, settings: LatencySettings) -> Dict[str, Any]:
    """What a table is valid for: device, torch version, threads, input shape, space sizes, runtime."""
    key = {"protocol": PROTOCOL, "device": device_description(settings.device), "torch": torch.__version__,
           "threads": int(settings.threads), "batch_size": int(settings.batch_size),
           "seq_length": int(settings.seq_length), "space": _space_key(config)}
    return {**key, **_runtime_key(settings)}


def _runtime_key(settings: LatencySettings) -> Dict[str, Any]:
    """``{runtime, onnxruntime}`` for the ONNX runtimes; nothing for ``torch`` (so torch tables and
    teacher latencies keep the keys they had before runtimes existed)."""
    if settings.runtime == DEFAULT_RUNTIME:
        return {}
    return {"runtime": settings.runtime, "onnxruntime": runtime_version(settings.runtime)}


def _digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def table_path(workdir, config: EfficientBertConfig, settings: LatencySettings) -> Path:
    """``<workdir>/latency/table-<digest of the key>.json``."""
    root = WorkDir.of(workdir).root if not isinstance(workdir, WorkDir) else workdir.root
    return Path(root) / LATENCY_DIR / f"table-{_digest(table_key(config, settings))}.json"


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------


def slot_entry(slot: SlotSpec, h_width: int, x_width: int) -> Optional[str]:
    """Entry name of a slot's extra cost, or None for an empty slot (no activation, no binary op).

    The order is left out on purpose (see the module docstring); without a binary op the operand
    is irrelevant too.
    """
    if slot.act == "identity" and slot.binary == NO_BINARY:
        return None
    binary = "binary" if slot.binary != NO_BINARY else NO_BINARY
    return f"slot/{slot.act}/{binary}/h{int(h_width)}/x{int(x_width)}"


def _slot_specs(config: EfficientBertConfig, pre: bool) -> List[SlotSpec]:
    """One representative slot per cost class: every activation, without and with a binary op.

    The binary op with an ``x`` operand stands for all of them (``add`` / ``mul`` / ``max`` are one
    element-wise kernel each, and slicing ``x`` to the slot's width is a strided view).
    """
    out = []
    binaries = (NO_BINARY, config.binary_ops[0]) if config.binary_ops else (NO_BINARY,)
    for binary in binaries:
        for act in config.unary_ops:
            out.append(SlotSpec(act=act, binary=binary, operand="x", order="act_first"))
    return out


def required_entries(config: EfficientBertConfig) -> Dict[str, Tuple[str, Any]]:
    """Every entry a table of ``config`` needs: ``name -> (kind, spec)``, in build order."""
    h = config.hidden_size
    entries: Dict[str, Tuple[str, Any]] = {"embeddings": ("embeddings", None), "attention": ("attention", None),
                                           "head": ("head", None)}
    for w in config.widths:
        entries[f"mlp/w{w}"] = ("mlp", w)
    for pre, hw in ((True, h), (False, h)):  # pre and post slots: input of width hidden, x of width hidden
        for s in _slot_specs(config, pre):
            name = slot_entry(s, hw, h)
            if name:
                entries.setdefault(name, ("slot", (s, hw, h)))
    for w in config.widths:  # mid slot: input of width `w` (linear1's output), x of width hidden
        for s in _slot_specs(config, False):
            name = slot_entry(s, w, h)
            if name:
                entries.setdefault(name, ("slot", (s, w, h)))
    entries["overhead"] = ("overhead", None)
    entries["overhead_per_mlp"] = ("overhead_per_mlp", None)
    entries["calibration"] = ("calibration", None)
    return entries


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


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


class _Bench:
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


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    """Measured component latencies (ms) of one space on one device; see the module docstring.

    Attributes
    ----------
    config : EfficientBertConfig
        The student space's sizes.
    key : dict
        What the table is valid for (:func:`table_key`).
    entries : dict
        Entry name -> milliseconds.
    path : Path or None
        Where it is stored.
    """

    config: EfficientBertConfig
    key: Dict[str, Any]
    entries: Dict[str, float] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def missing(self) -> List[str]:
        """Entries still to measure."""
        return [n for n in required_entries(self.config) if n not in self.entries]

    @property
    def complete(self) -> bool:
        return not self.missing

    def save(self) -> None:
        if self.path is None:
            return
        atomic_write_json({"key": self.key, "entries": self.entries, "complete": self.complete}, self.path)

    def _entry(self, name: str) -> float:
        try:
            return float(self.entries[name])
        except KeyError:
            raise LatencyTableError(f"latency table {self.path or ''} has no entry {name!r}; run "
                                    "`nni-effbert latency -c CONFIG` to build (or finish) it") from None

    def slot_ms(self, slot: SlotSpec, h_width: int, x_width: int) -> float:
        name = slot_entry(slot, h_width, x_width)
        return 0.0 if name is None else self._entry(name)

    def mlp_ms(self, la: LayerArch) -> float:
        """One MLP of a layer's stack (base block of its width plus its three slots)."""
        h = self.config.hidden_size
        return (self._entry(f"mlp/w{la.width}") + self.slot_ms(la.pre, h, h) + self.slot_ms(la.mid, la.width, h)
                + self.slot_ms(la.post, h, h))

    def breakdown(self, arch: Mapping[str, Any], *, calibrated: bool = True) -> Dict[str, float]:
        """Milliseconds per component of ``arch``: embeddings, ``layer{i}_attention``,
        ``layer{i}_mlp`` (all of its stack), head, overhead; each times the ``calibration``
        scale unless ``calibrated`` is false, so the parts add up to :meth:`predict`."""
        cfg = self.config
        out = {"embeddings": self._entry("embeddings")}
        per_mlp = float(self.entries.get("overhead_per_mlp", 0.0))
        for i in range(cfg.num_hidden_layers):
            try:
                la = LayerArch.from_arch(arch, i)
            except KeyError as exc:
                raise ConfigError(f"architecture lacks label {exc.args[0]!r} of layer {i}") from None
            out[f"layer{i}_attention"] = self._entry("attention")
            out[f"layer{i}_mlp"] = la.stack * self.mlp_ms(la)
            out[f"layer{i}_overhead"] = la.stack * per_mlp
        out["head"] = self._entry("head")
        out["overhead"] = float(self.entries.get("overhead", 0.0))
        if calibrated and self.scale != 1.0:
            out = {k: v * self.scale for k, v in out.items()}
        return out

    @property
    def scale(self) -> float:
        """The ``calibration`` entry (1 while the table is being built)."""
        return float(self.entries.get("calibration", 1.0))

    def predict(self, arch: Mapping[str, Any], *, with_overhead: bool = True, calibrated: bool = True) -> float:
        """Predicted end-to-end latency of ``arch`` in ms: the sum of its entries, times the
        ``calibration`` scale. No model is built."""
        parts = self.breakdown(arch, calibrated=False)
        if not with_overhead:
            parts = {k: v for k, v in parts.items() if "overhead" not in k}
        return float(sum(parts.values())) * (self.scale if calibrated else 1.0)

    __call__ = predict

    def latency_range(self) -> Tuple[float, float]:
        """``(fastest, slowest)`` predicted latency over the whole space (exact: every label of
        every layer is chosen independently and the sum is additive)."""
        cfg = self.config
        h = cfg.hidden_size
        outer = [self.slot_ms(s, h, h) for s in _slot_specs(cfg, False)]
        pre = [self.slot_ms(s, h, h) for s in _slot_specs(cfg, True)]
        lo_layer, hi_layer = math.inf, -math.inf
        for w in cfg.widths:
            mid = [self.slot_ms(s, w, h) for s in _slot_specs(cfg, False)]
            base = self._entry(f"mlp/w{w}")
            per_mlp = float(self.entries.get("overhead_per_mlp", 0.0))
            lo_layer = min(lo_layer, base + per_mlp + min(pre) + min(mid) + min(outer))
            hi_layer = max(hi_layer, cfg.max_stack * (base + per_mlp + max(pre) + max(mid) + max(outer)))
        fixed = self._entry("embeddings") + self._entry("head") + float(self.entries.get("overhead", 0.0))
        n = cfg.num_hidden_layers
        att = self._entry("attention")
        return self.scale * (fixed + n * (att + lo_layer)), self.scale * (fixed + n * (att + hi_layer))


def predicted_latency_ms(arch: Mapping[str, Any], table: LatencyTable) -> float:
    """Predicted latency of ``arch`` (ms) from ``table``, without building the model."""
    return table.predict(arch)


def load_table(path, config: EfficientBertConfig, settings: LatencySettings) -> Optional[LatencyTable]:
    """The table at ``path`` if it exists and was built for the same key; else None.

    Raises
    ------
    LatencyTableError
        If the file is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = load_json(path, "latency table")
    key = table_key(config, settings)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise LatencyTableError(f"latency table {path} is malformed; delete it and run `nni-effbert latency -c CONFIG`")
    if data.get("key") != key:
        return None
    return LatencyTable(config=config, key=key, entries={k: float(v) for k, v in data["entries"].items()}, path=path)


def build_table(config: EfficientBertConfig, settings: LatencySettings, path=None, *, progress: bool = True,
                seed: int = 0) -> LatencyTable:
    """Build (or finish) the table of ``config`` for ``settings``; resumable.

    Entries already in the file at ``path`` (same key) are kept; missing ones are measured and the
    file is rewritten every few entries and at the end.
    """
    key = table_key(config, settings)
    table = (load_table(path, config, settings) if path is not None else None) or \
        LatencyTable(config=config, key=key, path=Path(path) if path is not None else None)
    todo = table.missing
    if not todo:
        return table
    specs = required_entries(config)
    previous = torch.get_num_threads()
    bench = _Bench(config, settings, seed=seed)
    started = time.perf_counter()
    try:
        torch.set_num_threads(int(settings.threads))
        with torch.no_grad():
            bar = tqdm(todo, desc="latency table", unit="entry", disable=not progress)
            for i, name in enumerate(bar):
                if name in table.entries:  # measured together with an earlier entry
                    continue
                kind, spec = specs[name]
                table.entries[name] = round(bench.measure(kind, spec, table), 6)
                if (i + 1) % _SAVE_EVERY == 0:
                    table.save()
    finally:
        torch.set_num_threads(previous)
        table.save()
    logger.info("latency table: %d entries measured in %.1f s (%s, %d thread(s), batch %d, seq %d) -> %s",
                len(todo), time.perf_counter() - started, key["device"], settings.threads, settings.batch_size,
                settings.seq_length, table.path)
    return table


def _student_config(cfg) -> EfficientBertConfig:
    """The student space of an experiment config, without loading the teacher or data (the
    fields derived from the teacher are not part of a table's key)."""
    try:
        return preset_config(cfg.student.preset, **dict(cfg.student.overrides))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"student: {exc}") from None


def table_for_config(cfg, *, space_config: Optional[EfficientBertConfig] = None, build: bool = True,
                     progress: bool = True) -> LatencyTable:
    """The work directory's table for an experiment config: loaded, or built when ``build``.

    Raises
    ------
    LatencyTableError
        ``build=False`` and no complete table with this key exists.
    """
    config = space_config or _student_config(cfg)
    settings = latency_settings(cfg)
    path = table_path(cfg.workdir, config, settings)
    table = load_table(path, config, settings)
    if table is not None and table.complete:
        return table
    if not build:
        raise LatencyTableError(f"no complete latency table for this config in {path.parent} ({settings.device}, "
                                f"{settings.threads} thread(s)); run `nni-effbert latency -c CONFIG` first")
    return build_table(config, settings, path, progress=progress)


# ---------------------------------------------------------------------------------------------
# Checking the predictor against end-to-end measurement
# ---------------------------------------------------------------------------------------------


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


@dataclass
class CheckResult:
    """Predicted vs measured latency of a set of archs.

    Attributes
    ----------
    pairs : list of dict
        ``{predicted_ms, measured_ms, params}`` per arch (with ``arch`` when kept).
    mape : float
        Mean absolute percentage error of the prediction, in percent.
    kendall_tau : float
        Kendall's tau between predicted and measured (``scipy.stats.kendalltau``), and its
        ``kendall_p``.
    """

    pairs: List[Dict[str, Any]]
    mape: float
    kendall_tau: float
    kendall_p: float
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"mape": self.mape, "kendall_tau": self.kendall_tau, "kendall_p": self.kendall_p,
                "n": len(self.pairs), "settings": self.settings, "pairs": self.pairs}


def check_table(table: LatencyTable, archs: Sequence[Mapping[str, Any]], settings: LatencySettings, *,
                repeats: int = 30, progress: bool = True, keep_archs: bool = True) -> CheckResult:
    """Measure each arch end to end (:func:`~nni_effbert.latency.measure.measure_latency`, random
    weights, the table's settings) and compare with the table's prediction."""
    dev = torch_device(settings.device)
    pairs = []
    for arch in tqdm(list(archs), desc="latency check", unit="arch", disable=not progress):
        model = EfficientBertModel(table.config, arch).to(dev).eval()
        measured = measure_latency(model, seq_length=settings.seq_length, batch_size=settings.batch_size,
                                   repeats=repeats, warmup=5, threads=settings.threads,
                                   runtime=settings.runtime).median_ms
        pair = {"predicted_ms": round(table.predict(arch), 4), "measured_ms": round(measured, 4),
                "params": int(sum(p.numel() for p in model.parameters()))}
        if keep_archs:
            pair["arch"] = dict(arch)
        pairs.append(pair)
    pred = np.array([p["predicted_ms"] for p in pairs])
    meas = np.array([p["measured_ms"] for p in pairs])
    mape = float(np.mean(np.abs(pred - meas) / meas) * 100.0) if len(pairs) else float("nan")
    if len(pairs) >= 2:
        tau, p_value = kendalltau(pred, meas)
    else:
        tau, p_value = float("nan"), float("nan")
    return CheckResult(pairs=pairs, mape=round(mape, 3), kendall_tau=float(tau), kendall_p=float(p_value),
                       settings={"device": table.key["device"], "torch": table.key["torch"],
                                 "runtime": settings.runtime, "threads": settings.threads, "batch_size": settings.batch_size,
                                 "seq_length": settings.seq_length, "repeats": repeats})


# ---------------------------------------------------------------------------------------------
# The teacher's latency (for speed-up targets)
# ---------------------------------------------------------------------------------------------


def teacher_latency_path(cfg, settings: LatencySettings) -> Path:
    key = {"device": device_description(settings.device), "torch": torch.__version__, "threads": settings.threads,
           "batch_size": settings.batch_size, "seq_length": settings.seq_length, **_runtime_key(settings)}
    return WorkDir.of(cfg).root / LATENCY_DIR / f"teacher-{_digest(key)}.json"


def teacher_latency_ms(cfg, *, measure: bool = True, repeats: int = 30) -> Optional[float]:
    """The fine-tuned teacher's end-to-end latency (ms) at the config's latency settings.

    Stored beside the tables (``<workdir>/latency/teacher-<digest>.json``, with the teacher's
    fingerprint); measured when missing or stale and ``measure`` is true. None when there is no
    fine-tuned teacher in the work directory yet (or ``measure`` is false and nothing is stored).
    """
    settings = latency_settings(cfg)
    wd = WorkDir.of(cfg)
    folder = wd.teacher_dir
    if not (folder / "config.json").is_file():
        return None
    fingerprint = teacher_fingerprint(folder)
    path = teacher_latency_path(cfg, settings)
    if path.is_file():
        data = load_json(path, "teacher latency")
        if isinstance(data, dict) and data.get("fingerprint") == fingerprint:
            return float(data["median_ms"])
    if not measure:
        return None
    model, _ = load_teacher(str(folder))
    model = prepare_teacher(model).to(torch_device(settings.device))
    ms = measure_latency(model, seq_length=settings.seq_length, batch_size=settings.batch_size, repeats=repeats,
                         threads=settings.threads, runtime=settings.runtime).median_ms
    atomic_write_json({"fingerprint": fingerprint, "median_ms": ms, "device": device_description(settings.device),
                       "runtime": settings.runtime,
                       "threads": settings.threads, "batch_size": settings.batch_size,
                       "seq_length": settings.seq_length}, path)
    return float(ms)


def search_latency(cfg, *, build: bool = True, progress: bool = True) -> Tuple[Optional[LatencyTable], Optional[float]]:
    """The latency predictor and teacher latency a search of ``cfg`` needs, or ``(None, None)``.

    The table is built when missing and ``build`` is true; the teacher's latency is measured
    only for speed-up targets (``search.speedup``, ``search.objective.target_speedup``).
    """
    search = cfg.search
    if not search.needs_latency:
        return None, None
    table = table_for_config(cfg, build=build, progress=progress)
    teacher = None
    if search.speedup is not None or search.objective.target_speedup is not None:
        teacher = teacher_latency_ms(cfg, measure=build)
    return table, teacher
