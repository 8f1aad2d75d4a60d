"""ONNX Runtime as a latency runtime: export a torch module to ONNX, quantize it to int8, run it.

The latency of a model depends on the runtime that serves it. Three are supported
(``evaluator.latency_runtime``):

``torch``
    PyTorch eager, fp32 (the default; what every figure meant before the option existed).
``onnxruntime``
    The model exported with ``torch.onnx.export`` and run by ONNX Runtime's CPU execution
    provider, all graph optimisations on, ``intra_op_num_threads`` = the latency threads.
``onnxruntime-int8``
    The same ONNX graph after onnxruntime's dynamic int8 quantization
    (``onnxruntime.quantization.quantize_dynamic``, int8 weights, activations quantized at run
    time): Hugging Face Optimum's CPU path for BERT-style models.

This module is the low level shared by the latency measurement, the latency table
(``latency.table``) and the deploy export (``product.onnx``): it turns a module and example
inputs into an ONNX file (optionally int8) and an ``InferenceSession`` with a fixed thread count.
``onnx`` and ``onnxruntime`` come with the ``[deploy]`` extra; without them every entry point
raises :class:`DeployMissingError` (one line naming the extra). They are imported inside the
functions (``# local:``) so that ``torch``-runtime users never pay for, nor need, them.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from nni_effbert.search_spaces.modeling import EfficientBertModel

from ..errors import ConfigError, EffBertError

__all__ = [
    "RUNTIMES",
    "DEFAULT_RUNTIME",
    "OPSET",
    "DeployMissingError",
    "check_runtime",
    "require_deploy",
    "runtime_version",
    "LogitsModule",
    "export_module",
    "quantize_int8",
    "session",
    "model_runner",
]

logger = logging.getLogger(__name__)

#: ``evaluator.latency_runtime`` values.
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8")
DEFAULT_RUNTIME = "torch"
#: ONNX opset of every export (17: LayerNormalization is a single op; ONNX Runtime >= 1.14).
OPSET = 17
#: Inputs of a sequence-classification export, in order, and its output.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
_EXTRA = "pip install 'nni-effbert[deploy]' (onnx and onnxruntime)"


class DeployMissingError(EffBertError, ImportError):
    """``onnx`` / ``onnxruntime`` (the ``[deploy]`` extra) is not installed."""


def check_runtime(name: Any, key: str = "evaluator.latency_runtime") -> str:
    """``name`` if it is one of :data:`RUNTIMES`, else a one-line :class:`ConfigError`."""
    if name not in RUNTIMES:
        raise ConfigError(f"{key} must be one of {', '.join(RUNTIMES)}; got {name!r}")
    return str(name)


def require_deploy(what: str = "ONNX export and ONNX Runtime latency"):
    """Import and return ``(onnx, onnxruntime)``, or raise :class:`DeployMissingError`."""
    try:
        import onnx  # local: optional [deploy] extra
        import onnxruntime  # local: optional [deploy] extra
    except ImportError as exc:
        raise DeployMissingError(f"{what} needs the deploy extra ({exc.name or exc} is missing): {_EXTRA}") from None
    return onnx, onnxruntime


def runtime_version(runtime: str) -> Optional[str]:
    """Version of the library that runs ``runtime`` (``onnxruntime`` for both ORT runtimes)."""
    if check_runtime(runtime) == "torch":
        return torch.__version__
    _, ort = require_deploy()
    return str(ort.__version__)


class LogitsModule(torch.nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> logits`` of a student or HF model
    (``[batch, labels]``, or ``[batch, sequence, 2]`` start / end logits for span QA).

    Students run without their distillation outputs, HF models without hidden states and
    attention maps: what a deployed model computes and what the ONNX graph holds.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # DistilBERT / RoBERTa-style models take no segment ids (the graph then has no such input).
        self.segments = isinstance(model, EfficientBertModel) or \
            "token_type_ids" in inspect.signature(model.forward).parameters
        #: Span QA: logits ``[batch, sequence, 2]`` (start, end), a student's span head or an HF
        #: ``*ForQuestionAnswering`` (its start / end logits stacked the same way).
        self.span = (getattr(model.config, "head", None) == "span" if isinstance(model, EfficientBertModel)
                     else type(model).__name__.endswith("ForQuestionAnswering"))

    def forward(self, input_ids, attention_mask, token_type_ids):
        if isinstance(self.model, EfficientBertModel):
            return self.model(input_ids, attention_mask, token_type_ids, return_kd=False).logits
        extra = {"token_type_ids": token_type_ids} if self.segments else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=False,
                         output_attentions=False, **extra)
        if self.span:
            return torch.stack([out.start_logits, out.end_logits], dim=-1)
        return out.logits


@contextlib.contextmanager
def _quiet_export():
    # The TorchScript exporter warns about traced Python values (shapes it folds into the graph
    # are the dynamic axes it tracks anyway) and about its own deprecation; neither is actionable
    # for a user of the export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_module(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path, *,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic_axes: Optional[Mapping[str, Mapping[int, str]]] = None) -> Path:
    """Export ``module(*inputs)`` to ONNX at ``path`` (TorchScript exporter, opset :data:`OPSET`).

    The module is exported in eval mode on the CPU; its training mode is restored afterwards.

    Raises
    ------
    DeployMissingError
        Without ``onnx``.
    EffBertError
        If the exporter fails (the message names the module).
    """
    require_deploy("ONNX export")
    path = Path(path)
    modes = {m: m.training for m in module.modules()}  # restored module by module, not by the root's flag
    module.eval()
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dict(dynamic_axes or {}), do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; the cause is kept
        raise EffBertError(f"torch.onnx.export of {type(module).__name__} failed: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    finally:
        for m, training in modes.items():
            m.training = training
    return path


def quantize_int8(src, dst) -> Path:
    """Dynamic int8 quantization of the ONNX model ``src`` into ``dst`` (onnxruntime's quantizer).

    Weights of MatMul / Gemm (and Attention, when fused) become int8 (``QuantType.QInt8``, per
    tensor); activations are quantized on the fly. Embedding tables and LayerNorm stay fp32.
    """
    require_deploy("int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic  # local: optional [deploy] extra

    root = logging.getLogger()
    level = root.level
    # quantize_dynamic logs a root-logger warning suggesting shape-inference pre-processing,
    # which only matters for static (calibrated) quantization.
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(dst)


def session(path, threads: int = 1):
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU with ``threads`` intra-op threads
    (one inter-op thread, sequential execution, all graph optimisations)."""
    _, ort = require_deploy("ONNX Runtime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _Runner:
    """``runner(*tensors) -> numpy output`` of an ONNX session, with the feeds prepared once per
    set of inputs (``bind``) so timing loops time ``session.run`` only."""

    def __init__(self, sess, input_names: Sequence[str]):
        self.session = sess
        self.input_names = list(input_names)
        # The exporter drops inputs the graph does not read (e.g. the second operand of a slot
        # without a binary op); feeding them is an error in ONNX Runtime.
        self.used = {i.name for i in sess.get_inputs()}

    def feeds(self, *tensors) -> Dict[str, np.ndarray]:
        return {n: _numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t)
                for n, t in zip(self.input_names, tensors) if n in self.used}

    def bind(self, *tensors) -> Callable[[], Any]:
        feeds = self.feeds(*tensors)
        sess = self.session
        return lambda: sess.run(None, feeds)

    def __call__(self, *tensors):
        return self.session.run(None, self.feeds(*tensors))[0]


def model_runner(module: torch.nn.Module, inputs: Sequence[torch.Tensor], runtime: str, *, threads: int = 1,
                 input_names: Optional[Sequence[str]] = None, folder=None) -> _Runner:
    """Export ``module`` for ``runtime`` (``onnxruntime`` or ``onnxruntime-int8``) and open it.

    ``inputs`` fix the shapes (no dynamic axes: what is timed is one shape). The files go to a
    temporary folder removed before returning (the session holds the model in memory) unless
    ``folder`` is given.
    """
    if check_runtime(runtime) == "torch":
        raise ValueError("model_runner is for the ONNX Runtime runtimes")
    names = list(input_names or [f"input{i}" for i in range(len(inputs))])
    cpu_inputs = [t.cpu() for t in inputs]
    param = next(module.parameters(), None)
    if param is not None and param.device.type != "cpu":
        raise ConfigError(f"latency runtime {runtime} runs on the CPU; set evaluator.latency_device: cpu")
    with tempfile.TemporaryDirectory(prefix="effbert-onnx-", dir=folder) as tmp:
        fp32 = export_module(module, cpu_inputs, Path(tmp) / "model.onnx", input_names=names, output_names=["output"])
        path = quantize_int8(fp32, Path(tmp) / "model.int8.onnx") if runtime == "onnxruntime-int8" else fp32
        sess = session(path, threads)
    return _Runner(sess, names)
