"""What a latency table is keyed by: the device, threads, batch, sequence length, the student
space's sizes and the runtime (:class:`LatencySettings`, :func:`table_key`), and where the table of
a key lives in the work directory (:func:`table_path`).

A table with another key is another file: changing the thread count builds a new table and keeps
the old one. A ``torch`` table's key has no runtime field, so tables built before
``evaluator.latency_runtime`` existed stay valid.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

from nni_effbert.search_spaces.space_config import EfficientBertConfig

from ..config import ExperimentConfig
from ..errors import ConfigError, EffBertError
from ..workdir import WorkDir
from .runtimes import DEFAULT_RUNTIME, check_runtime, runtime_version

__all__ = ["PROTOCOL", "LATENCY_DIR", "LatencyTableError", "LatencySettings", "torch_device", "device_description",
           "cpu_model", "latency_settings", "space_key", "table_key", "runtime_key", "key_digest", "table_path"]


#: Bumped when what an entry means changes (old tables are then rebuilt, not misread).
PROTOCOL = 3


#: Folder of the tables inside the work directory.
LATENCY_DIR = "latency"


class LatencyTableError(EffBertError):
    """A latency table is missing, incomplete, corrupt or was built for other settings."""


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
    return f"cpu:{cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor or machine elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_settings(cfg: ExperimentConfig) -> LatencySettings:
    """The :class:`LatencySettings` of an experiment config (``evaluator.latency_*``)."""
    ev = cfg.evaluator
    return LatencySettings(device=str(getattr(ev, "latency_device", "cpu") or "cpu"),
                           threads=int(getattr(ev, "latency_threads", 1) or 1),
                           batch_size=int(getattr(ev, "latency_batch_size", 1) or 1),
                           seq_length=int(ev.latency_seq_length),
                           runtime=str(getattr(ev, "latency_runtime", DEFAULT_RUNTIME) or DEFAULT_RUNTIME))


def space_key(config: EfficientBertConfig) -> Dict[str, Any]:
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
           "seq_length": int(settings.seq_length), "space": space_key(config)}
    return {**key, **runtime_key(settings)}


def runtime_key(settings: LatencySettings) -> Dict[str, Any]:
    """``{runtime, onnxruntime}`` for the ONNX runtimes; nothing for ``torch`` (so torch tables and
    teacher latencies keep the keys they had before runtimes existed)."""
    if settings.runtime == DEFAULT_RUNTIME:
        return {}
    return {"runtime": settings.runtime, "onnxruntime": runtime_version(settings.runtime)}


def key_digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def table_path(workdir, config: EfficientBertConfig, settings: LatencySettings) -> Path:
    """``<workdir>/latency/table-<digest of the key>.json``."""
    root = WorkDir.of(workdir).root if not isinstance(workdir, WorkDir) else workdir.root
    return Path(root) / LATENCY_DIR / f"table-{key_digest(table_key(config, settings))}.json"
