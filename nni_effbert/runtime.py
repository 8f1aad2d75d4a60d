"""Process set-up shared by the command line and the trial entry: logging, CPU threads, and
the device / precision every training and inference path runs with (``runtime`` config section).

Only entry points call :func:`configure_runtime` and :func:`configure_threads`
(``nni-effbert``, ``python -m nni_effbert.trial``); library code never configures logging or
threads of its own. :func:`resolve_runtime` is pure: it turns ``cfg.runtime`` into a
:class:`Runtime` (device, autocast context, gradient scaler, loader settings) that the KD layer
passes around, and raises :class:`RuntimeConfigError` (exit status 2 in the CLI) when the
hardware cannot do what the config asks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .errors import EffBertError
from .typed_yaml import Checked, checked_field, non_negative, one_of, positive

if TYPE_CHECKING:  # annotations only: config is a layer above
    from .config import ExperimentConfig

__all__ = ["RuntimeConfig", "configure_runtime", "silence_import_warnings", "configure_threads", "Runtime", "RuntimeConfigError",
           "resolve_runtime", "apply_gpu_memory_limit", "gpu_oom_reason", "SYNC_INTERVAL"]

logger = logging.getLogger(__name__)

#: Steps between host-device synchronisations of the KD loop on an accelerator (loss / gradient
#: checks and the progress-bar loss). On CPU the loop checks every step (a sync costs nothing).
SYNC_INTERVAL = 25


def configure_runtime(verbose: bool = False, quiet: bool = False) -> None:
    """Logging to stderr and silence for known third-party import noise (entry processes only).

    ``quiet`` also turns off the ``datasets`` progress bars (``Generating train split``,
    ``Map``) and those of ``huggingface_hub`` / ``transformers`` (``Loading weights``,
    ``Writing model shards``), so ``-q`` prints warnings and results only.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    silence_import_warnings()
    for name in ("nni", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if quiet:
        # Read by ``datasets`` when it is imported; importing it here would cost the --help path.
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        # transformers reads huggingface_hub's switch when it is imported.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def silence_import_warnings() -> None:
    """Ignore the warnings nni 3.0 / lightning emit at import on current torch and setuptools:
    harmless, and they would bury our one-line messages. Entry points call this before they
    import the library."""
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module")


def configure_threads(cfg: ExperimentConfig, concurrent: bool = True) -> Optional[int]:
    """Set torch's CPU threads of this process from ``runtime.threads``.

    ``runtime.threads`` set: exactly that many. Unset, a trial (``concurrent=True``) gets its
    share of the cores, ``cpu_count // search.trial_concurrency`` (at least 1): OpenMP threads
    that outnumber the free cores spin against each other and make every forward several times
    slower. An explicit ``OMP_NUM_THREADS`` is respected when ``runtime.threads`` is unset, and a
    command that is not a concurrent trial (``concurrent=False``) keeps torch's default then.
    Returns the thread count set, or None when it was left alone.
    """
    import torch  # local: the CLI's --help path imports this module and must stay fast

    runtime = getattr(cfg, "runtime", None)
    explicit = getattr(runtime, "threads", None)
    if explicit:
        torch.set_num_threads(int(explicit))
        return int(explicit)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if not concurrent:
        return None
    threads = max(1, (os.cpu_count() or 1) // max(1, int(cfg.search.trial_concurrency)))
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------


class RuntimeConfigError(EffBertError, ValueError):
    """``runtime`` asks for hardware or a precision this machine (or torch build) cannot give."""


_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: what :func:`resolve_runtime` makes of ``cfg.runtime``.

    Attributes
    ----------
    device : torch.device
        ``cpu`` or ``cuda:K`` (always with an index, so messages can name it).
    precision : str
        ``fp32``, ``bf16`` or ``fp16`` (``auto`` already resolved).
    dataloader_workers : int
        Worker processes of every batch loader (0: batches are built in this process).
    compile : bool
        ``torch.compile`` fixed students in the KD loop (the supernet stays eager).
    gpu_memory_mb : int or None
        Cap on this process's CUDA memory (``torch.cuda.set_per_process_memory_fraction``).
    """

    device: Any
    precision: str = "fp32"
    dataloader_workers: int = 0
    compile: bool = False
    gpu_memory_mb: Optional[int] = None

    @classmethod
    def cpu(cls) -> "Runtime":
        """Plain CPU, fp32: what code paths given no runtime use."""
        import torch  # local: the CLI's --help path imports this module and must stay fast

        return cls(torch.device("cpu"))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self):
        """The autocast dtype, or None for fp32."""
        import torch  # local: the CLI's --help path imports this module and must stay fast

        return getattr(torch, _DTYPES[self.precision]) if self.precision in _DTYPES else None

    @property
    def pin_memory(self) -> bool:
        """Pin host batches (page-locked memory makes ``non_blocking`` copies asynchronous)."""
        return self.is_cuda

    @property
    def sync_interval(self) -> int:
        """Steps between the KD loop's host-device synchronisations (1 on CPU)."""
        return SYNC_INTERVAL if self.is_cuda else 1

    def autocast(self):
        """``torch.autocast`` for bf16 / fp16; a no-op context for fp32."""
        import torch  # local: the CLI's --help path imports this module and must stay fast

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        """A ``torch.amp.GradScaler``, enabled for fp16 only (bf16 has fp32's range)."""
        import torch  # local: the CLI's --help path imports this module and must stay fast

        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, tensor):
        """``tensor`` on :attr:`device`: pinned and copied without blocking on CUDA."""
        if not self.is_cuda or tensor.device == self.device:
            return tensor.to(self.device)
        if tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def describe(self) -> str:
        """``cuda:0 (NVIDIA H100, bf16)`` / ``cpu (fp32, 4 threads)``: one line for logs."""
        import torch  # local: the CLI's --help path imports this module and must stay fast

        if self.is_cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {self.precision})"
        return f"cpu ({self.precision}, {torch.get_num_threads()} threads)"


def _visible() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "unset" if value is None else repr(value)


def _cpu_autocast_works(dtype) -> bool:
    import torch  # local: the CLI's --help path imports this module and must stay fast

    try:
        if not torch.amp.autocast_mode.is_autocast_available("cpu"):
            return False
        x = torch.ones(2, 2)
        with torch.autocast(device_type="cpu", dtype=dtype):
            y = torch.nn.functional.linear(x, x)
        return y.dtype == dtype
    except (RuntimeError, AttributeError, TypeError):
        return False


def resolve_runtime(cfg: ExperimentConfig) -> Runtime:
    """Turn ``cfg.runtime`` into a :class:`Runtime`, checking the machine can run it.

    ``device: auto`` is CUDA when ``torch.cuda.is_available()`` (inside an NNI trial that means
    a GPU NNI assigned: NNI sets ``CUDA_VISIBLE_DEVICES`` to the trial's GPUs, or to ``-1`` /
    empty when ``search.gpus_per_trial`` is 0, and torch sees only those), else the CPU.
    ``precision: auto`` is bf16 on a CUDA device that supports it, else fp32.

    Parameters
    ----------
    cfg : ExperimentConfig
        A config without a ``runtime`` section means CPU, fp32.

    Returns
    -------
    Runtime

    Raises
    ------
    RuntimeConfigError
        ``cuda`` on a machine without (visible) CUDA, an out-of-range ``cuda:N``, ``fp16`` on
        CPU, ``bf16`` where this torch build or GPU has no bf16 autocast.
    """
    import torch  # local: the CLI's --help path imports this module and must stay fast

    rc = getattr(cfg, "runtime", None)
    if rc is None:
        return Runtime.cpu()
    want = str(rc.device).strip()
    if not _DEVICE_RE.match(want):
        raise RuntimeConfigError(f"runtime.device: {want!r} is not a device; use auto, cpu, cuda or cuda:N")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeConfigError(
                f"runtime.device: {want} requested but torch sees no CUDA device (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES {_visible()}; inside NNI a "
                "trial gets GPUs only with search.gpus_per_trial > 0); use runtime.device: auto or cpu")
        count = torch.cuda.device_count()
        index = int(want.split(":", 1)[1]) if ":" in want else 0
        if index >= count:
            raise RuntimeConfigError(
                f"runtime.device: {want} is out of range: {count} CUDA device(s) visible (cuda:0"
                f"{f'..cuda:{count - 1}' if count > 1 else ''}, CUDA_VISIBLE_DEVICES {_visible()}); pick one of "
                "them or use runtime.device: cuda")
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    precision = str(rc.precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        if precision == "fp16":
            raise RuntimeConfigError("runtime.precision: fp16 needs a CUDA device; on CPU use fp32 or bf16")
        if precision == "bf16" and not _cpu_autocast_works(torch.bfloat16):
            raise RuntimeConfigError(
                f"runtime.precision: bf16 autocast is not available on CPU in torch {torch.__version__}; use fp32")
    elif precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeConfigError(
            f"runtime.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return Runtime(device=device, precision=precision, dataloader_workers=int(rc.dataloader_workers or 0),
                   compile=bool(rc.compile), gpu_memory_mb=rc.gpu_memory_mb)


def apply_gpu_memory_limit(runtime: Runtime) -> Optional[int]:
    """Cap this process's CUDA memory at ``runtime.gpu_memory_mb`` (for trials sharing a GPU);
    returns the cap in MiB, or None when there is none (or the device is the CPU)."""
    import torch  # local: the CLI's --help path imports this module and must stay fast

    if not runtime.is_cuda or not runtime.gpu_memory_mb:
        return None
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    fraction = min(1.0, runtime.gpu_memory_mb * 2 ** 20 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, runtime.device)
    logger.info("GPU memory limit: %d MiB of %d MiB on %s", runtime.gpu_memory_mb, total // 2 ** 20, runtime.device)
    return int(runtime.gpu_memory_mb)


def gpu_oom_reason(exc: BaseException, runtime: Runtime) -> Optional[str]:
    """``out of GPU memory (N MiB on cuda:K): <torch's message>`` when ``exc`` (or an exception it
    was raised from) is a CUDA out-of-memory error, else None. ``N`` is the
    ``runtime.gpu_memory_mb`` cap when set, else the device's total memory."""
    chain = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    # torch's own error first (its message says how much it tried to allocate), else any mention.
    found = next((e for e in chain if type(e).__name__ == "OutOfMemoryError"), None) \
        or next((e for e in chain if "CUDA out of memory" in str(e)), None)
    if found is None:
        return None
    mib = runtime.gpu_memory_mb
    if not mib and runtime.is_cuda:
        import torch  # local: the CLI's --help path imports this module and must stay fast

        try:
            mib = torch.cuda.get_device_properties(runtime.device).total_memory // 2 ** 20
        except (RuntimeError, AssertionError):
            mib = None
    where = str(runtime.device) if runtime.is_cuda else "cuda"
    amount = f"{mib} MiB on {where}" if mib else where
    detail = " ".join(str(found).split())[:300]
    return f"out of GPU memory ({amount}): {detail}" if detail else f"out of GPU memory ({amount})"



def _device_name(value: str) -> str:
    text = str(value).strip()
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", text):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (N = a CUDA device index); got {value!r}")
    return text


@dataclass
class RuntimeConfig(Checked):
    """Where and how every training and inference path runs (``runtime``).

    ``device: auto`` is CUDA when torch sees a GPU (inside an NNI trial: one NNI assigned it,
    see ``search.gpus_per_trial``), else the CPU. ``precision: auto`` is bf16 on a GPU that
    supports it, else fp32; bf16 / fp16 run through ``torch.autocast`` (fp16 with a
    ``GradScaler``; fp16 needs CUDA). Whether the machine can do it is checked when a command
    starts (:func:`nni_effbert.runtime.resolve_runtime`). Latency is measured on the CPU
    whatever the device: it is the deployment latency the search optimises.

    Attributes
    ----------
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where every training and inference path runs (teacher fine-tune, cache building, warm-up, candidate fine-tune, distillation, export check); ``auto`` is CUDA when torch sees a GPU (inside NNI: the one NNI assigned), else the CPU.
    precision
        ``auto``, ``fp32``, ``bf16`` or ``fp16`` through ``torch.autocast`` (fp16 with a ``GradScaler``, CUDA only); ``auto`` is bf16 on a GPU that supports it, else fp32. Weights stay fp32.
    dataloader_workers
        Worker processes building batches (0: in the training process).
    """

    device: str = checked_field(_device_name, "auto")
    precision: str = checked_field(one_of("auto", "fp32", "bf16", "fp16"), "auto")
    threads: Optional[int] = checked_field(positive, None)  # None: cpu_count // search.trial_concurrency in trials
    dataloader_workers: int = checked_field(non_negative, 0)
    compile: bool = False  # torch.compile fixed students (candidate fine-tune, distill)
    gpu_memory_mb: Optional[int] = checked_field(positive, None)  # per-process CUDA memory cap
