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

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from nni_effbert.search_spaces.space_config import EfficientBertConfig, preset_config
from nni_effbert.search_spaces.modeling import LayerArch, SlotSpec
from nni_effbert.search_spaces.ops import NO_BINARY

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..io import atomic_write_json, load_json
from .components import ComponentTimer
from .settings import LatencySettings, LatencyTableError, latency_settings, table_key, table_path

__all__ = [
    "LatencyTable",
    "slot_entry",
    "required_entries",
    "build_table",
    "load_table",
    "table_for_config",
    "predicted_latency_ms",
]

logger = logging.getLogger(__name__)

_SAVE_EVERY = 8


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
    bench = ComponentTimer(config, settings, seed=seed)
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


def _student_config(cfg: ExperimentConfig) -> EfficientBertConfig:
    """The student space of an experiment config, without loading the teacher or data (the
    fields derived from the teacher are not part of a table's key)."""
    try:
        return preset_config(cfg.student.preset, **dict(cfg.student.overrides))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"student: {exc}") from None


def table_for_config(cfg: ExperimentConfig, *, space_config: Optional[EfficientBertConfig] = None, build: bool = True,
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


