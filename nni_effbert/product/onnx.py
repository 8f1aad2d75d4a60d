"""Deploy runtimes: ONNX and int8 ONNX exports of students and the teacher, checked on task rows.

:func:`export_onnx` adds to a model folder (an ``nni-effbert export`` folder, or a fine-tuned
Hugging Face teacher):

``model.onnx``
    ``torch.onnx.export`` of ``(input_ids, attention_mask, token_type_ids) -> logits``, opset
    17, dynamic axes ``batch`` and ``sequence`` on every input and ``batch`` on the logits (span
    QA: ``[batch, sequence, 2]`` start / end logits, both axes dynamic).
``model.int8.onnx`` (``int8=True``)
    onnxruntime's dynamic int8 quantization of it (``quantize_dynamic``, int8 weights).
``onnx_check.json``
    How the files were checked against the PyTorch model: on real task rows (the first dev rows
    of the task, tokenized with the folder's tokenizer) the largest absolute logit difference of
    the fp32 graph, and for int8 the share of rows whose predicted class agrees with PyTorch's
    (classification; span QA: whose best start and end token do) or the largest / mean absolute
    difference (regression), with the task
    metric of each when labels are given; plus a random-id check at batch 1 and 3 and two
    sequence lengths (the dynamic axes). The versions of torch, onnx and onnxruntime and the
    size and modification time of the weights the files were made from are recorded too.

An fp32 graph whose logits differ from PyTorch's by more than :data:`FP32_ATOL` is an error and
nothing is written. The int8 agreement is reported, not enforced (int8 is an approximation);
below :data:`INT8_WARN_AGREEMENT` a warning is logged.

The folder then runs with ``onnxruntime`` and ``tokenizers`` alone (no torch, transformers or
nni); the model card (``README.md``) of a student export gets an example, and so does
``docs/guides/deploy.md``. :func:`export_teacher_onnx` writes the teacher the same way into
``<workdir>/exports/teacher`` (tokenizer and config beside the ONNX files): its int8 graph is the
quantized-teacher baseline a searched student has to beat.

Files are written under temporary names in the folder and renamed into place; a failed export
leaves the folder as it was.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers import AutoTokenizer

from .. import __version__
from ..config import ExperimentConfig
from ..data.batches import length_sorted_batches
from ..data.metrics import compute_metrics
from ..data.qa_answers import score_span_model
from ..errors import CheckpointError, ConfigError, EffBertError
from ..hf.configuration_effbert import EfficientBertHFConfig
from ..io import atomic_write_json, atomic_write_text, load_json
from ..latency.runtimes import (INPUT_NAMES, OPSET, OUTPUT_NAME, LogitsModule, export_module, quantize_int8,
                               require_deploy, session)
from ..kd.teacher import load_teacher, prepare_teacher
from ..workdir import WorkDir
from .export import record_added_files
from .loader import CONFIG_FILE, README_FILE, WEIGHTS_FILE, load_exported

__all__ = [
    "ONNX_FILE",
    "INT8_FILE",
    "CHECK_FILE",
    "TEACHER_EXPORT",
    "FP32_ATOL",
    "INT8_WARN_AGREEMENT",
    "OnnxExport",
    "export_onnx",
    "export_teacher_onnx",
    "task_rows",
    "teacher_folder",
    "check_model_folder",
    "onnx_files",
    "OnnxModel",
    "evaluate_onnx",
    "evaluate_onnx_span",
    "onnx_latency_ms",
    "runtime_rows",
    "runtime_markdown",
]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CHECK_FILE = "onnx_check.json"
#: Export folder of the teacher's ONNX files (``<workdir>/exports/teacher``).
TEACHER_EXPORT = "teacher"
#: Largest |logit difference| accepted between the fp32 ONNX graph and PyTorch.
FP32_ATOL = 1e-3
#: Below this share of rows predicting PyTorch's class, the int8 export logs a warning.
INT8_WARN_AGREEMENT = 0.9
#: Dev rows the CLI checks an export on.
CHECK_ROWS = 128

_README_MARK = "## ONNX Runtime"
PathLike = Union[str, Path]
Row = Union[str, Tuple[str, str]]


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes
    ----------
    folder : Path
        The folder holding the files.
    onnx_path : Path
        ``model.onnx``.
    int8_path : Path or None
        ``model.int8.onnx`` when asked for.
    check : dict
        The content of ``onnx_check.json``.
    """

    folder: Path
    onnx_path: Path
    int8_path: Optional[Path]
    check: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per file: what the check found."""
        c = self.check
        lines = [f"{self.onnx_path}: max |logit diff| vs PyTorch {c['fp32']['max_abs_diff']:.2e} on "
                 f"{c['rows']} {c['rows_source']}"]
        if self.int8_path is not None:
            q = c["int8"]
            what = (f"max |diff| {q['max_abs_diff']:.3g}, mean {q['mean_abs_diff']:.3g}" if "agreement" not in q
                    else f"predicts PyTorch's answer span (start and end) on {q['agreement']:.1%} of rows"
                    if c.get("output") == "span" else f"predicts PyTorch's class on {q['agreement']:.1%} of rows")
            lines.append(f"{self.int8_path}: {what}")
        for key, name in (("pytorch", "PyTorch"), ("fp32", "ONNX fp32"), ("int8", "ONNX int8")):
            metric = (c.get(key) or {}).get("accuracy")
            if metric is not None:
                lines.append(f"  accuracy on the check rows, {name}: {metric:.4f}")
        return "\n".join(lines)


class OnnxModel:
    """An ONNX file in an ONNX Runtime session: ``model(input_ids, attention_mask, token_type_ids)``
    (numpy or torch) -> numpy logits."""

    def __init__(self, path: PathLike, threads: int = 1):
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.used = {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids, attention_mask, token_type_ids) -> np.ndarray:
        feeds = {}
        for name, value in zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids)):
            if name in self.used:
                arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                feeds[name] = arr.astype(np.int64, copy=False)
        return self.session.run([OUTPUT_NAME], feeds)[0]


# ============================================================================================
# Public API
# ============================================================================================


def export_onnx(folder: PathLike, *, int8: bool = False, rows: Optional[Sequence[Row]] = None,
                labels: Optional[Sequence[Any]] = None, rows_source: str = "given rows", out_dir: Optional[PathLike] = None,
                max_length: int = 128, threads: int = 1) -> OnnxExport:
    """Export the model of ``folder`` to ONNX (and int8) and check it against PyTorch.

    Parameters
    ----------
    folder : str or Path
        An ``nni-effbert export`` folder (student) or a fine-tuned Hugging Face sequence
        classifier (teacher).
    int8 : bool
        Also write ``model.int8.onnx`` (dynamic int8 quantization).
    rows : sequence of str or (str, str), optional
        Task inputs to check on (one text or a text pair each), tokenized with the folder's
        tokenizer. Without rows (or without a tokenizer) the check uses random token ids.
    labels : sequence, optional
        Their labels (class ids): the check then also reports each model's accuracy.
    rows_source : str
        What the rows are, recorded in ``onnx_check.json`` (e.g. ``"sst2 dev rows"``).
    out_dir : str or Path, optional
        Where to write (default ``folder``).
    max_length : int
        Truncation length of the rows (capped at the model's position table).
    threads : int
        Intra-op threads of the checking sessions.

    Returns
    -------
    OnnxExport

    Raises
    ------
    DeployMissingError
        Without ``onnx`` / ``onnxruntime`` (``pip install 'nni-effbert[deploy]'``).
    CheckpointError
        If ``folder`` holds no loadable model.
    EffBertError
        If the fp32 graph's logits differ from PyTorch's by more than :data:`FP32_ATOL` (nothing
        is written).
    """
    onnx, ort = require_deploy("nni-effbert export --onnx")
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder
    if not out.is_dir():
        raise ConfigError(f"ONNX output folder {out} does not exist")
    model, tokenizer, kind = _load_model(folder)
    max_pos = int(getattr(model.model.config, "max_position_embeddings", 512) or 512)
    vocab = int(model.model.config.vocab_size)
    span = bool(model.span)
    if span:
        labels = None  # a span model's check compares answer spans with PyTorch's; there are no classes
    tag = uuid.uuid4().hex[:8]
    tmp_fp32, tmp_int8 = out / f".{ONNX_FILE}.{tag}.tmp", out / f".{INT8_FILE}.{tag}.tmp"
    try:
        example = _random_inputs(vocab, 2, min(16, max_pos), seed=0)
        export_module(model, example, tmp_fp32, input_names=INPUT_NAMES, output_names=[OUTPUT_NAME],
                      dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES},
                                    OUTPUT_NAME: {0: "batch", 1: "sequence"} if span else {0: "batch"}})
        onnx.checker.check_model(str(tmp_fp32))
        fp32 = OnnxModel(tmp_fp32, threads)
        batches, source = _check_inputs(tokenizer, rows, rows_source, vocab, max_pos, max_length, span=span)
        torch_logits = _torch_logits(model, batches)
        fp32_logits = _logits_of(fp32, batches)
        diff = _max_abs_diff(fp32_logits, torch_logits)
        shapes = _shape_check(model, fp32, vocab, max_pos)
        worst = max([diff] + [s["max_abs_diff"] for s in shapes])
        if not np.isfinite(worst) or worst > FP32_ATOL:
            raise EffBertError(f"ONNX export of {folder} disagrees with PyTorch: max |logit difference| {worst:.3g} > "
                               f"{FP32_ATOL}; nothing was written")
        regression = not span and torch_logits[0].shape[1] == 1
        compare = (lambda got: _span_agreement(got, torch_logits, batches)) if span else \
            (lambda got: _agreement(np.concatenate(got), np.concatenate(torch_logits), regression))
        n_rows = int(sum(len(b[0]) for b in batches))
        check: Dict[str, Any] = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "nni_effbert_version": __version__, "kind": kind, "opset": OPSET,
            "torch_version": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "source_weights": _weights_stamp(folder), "rows": n_rows, "rows_source": source,
            "max_length": int(min(max_length, max_pos)), "dynamic_axes": {"batch": True, "sequence": True},
            "output": "span" if span else "classes",
            "pytorch": {"accuracy": _accuracy(np.concatenate(torch_logits), labels)} if labels is not None else {},
            "fp32": {"file": ONNX_FILE, "max_abs_diff": diff, "atol": FP32_ATOL, "shapes": shapes,
                     **compare(fp32_logits),
                     **({"accuracy": _accuracy(np.concatenate(fp32_logits), labels)} if labels is not None else {})},
        }
        if int8:
            quantize_int8(tmp_fp32, tmp_int8)
            q = OnnxModel(tmp_int8, threads)
            int8_logits = _logits_of(q, batches)
            agreement = compare(int8_logits)
            check["int8"] = {"file": INT8_FILE, "quantization": "onnxruntime.quantization.quantize_dynamic, QInt8 weights",
                             **agreement,
                             **({"accuracy": _accuracy(np.concatenate(int8_logits), labels)} if labels is not None else {})}
            if "agreement" in agreement and agreement["agreement"] < INT8_WARN_AGREEMENT:
                logger.warning("int8 model of %s predicts PyTorch's %s on only %.1f%% of %d rows", folder,
                               "answer span" if span else "class", 100 * agreement["agreement"], n_rows)
        os.replace(tmp_fp32, out / ONNX_FILE)
        if int8:
            os.replace(tmp_int8, out / INT8_FILE)
        elif (out / INT8_FILE).exists():
            (out / INT8_FILE).unlink()  # an int8 file of older weights would no longer match
    finally:
        for tmp in (tmp_fp32, tmp_int8):
            if tmp.exists():
                tmp.unlink()
    atomic_write_json(check, out / CHECK_FILE)
    if kind == "student" and (out / README_FILE).is_file():
        _add_readme_section(out / README_FILE, int8, span=span)
    if kind == "student":
        record_added_files(out)  # export_meta.json's sha256 list now covers the ONNX files and the card
    result = OnnxExport(folder=out, onnx_path=out / ONNX_FILE, int8_path=out / INT8_FILE if int8 else None, check=check)
    logger.info("ONNX export of %s:\n%s", folder, result.summary())
    return result


def export_teacher_onnx(cfg: ExperimentConfig, *, int8: bool = True, rows: Optional[Sequence[Row]] = None,
                        labels: Optional[Sequence[Any]] = None, rows_source: str = "given rows",
                        name: str = TEACHER_EXPORT, threads: int = 1) -> OnnxExport:
    """Export the work directory's fine-tuned teacher to ``<workdir>/exports/<name>`` as ONNX.

    The folder gets the teacher's config and tokenizer files (not its PyTorch weights) beside
    ``model.onnx`` / ``model.int8.onnx`` / ``onnx_check.json``, so it deploys on its own. The
    teacher folder itself is not touched (its files key the teacher-output caches).

    Raises
    ------
    CheckpointError
        If the work directory has no fine-tuned teacher (run ``nni-effbert teacher`` first).
    """
    wd = WorkDir.of(cfg)
    teacher = teacher_folder(cfg)
    out = wd.export_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(teacher.iterdir()):
        if src.is_file() and src.suffix in (".json", ".txt", ".model") and not src.name.startswith("."):
            shutil.copyfile(src, out / src.name)
    return export_onnx(teacher, int8=int8, rows=rows, labels=labels, rows_source=rows_source, out_dir=out,
                       threads=threads)


def teacher_folder(cfg: ExperimentConfig) -> Path:
    """The work directory's fine-tuned teacher folder, or a one-line :class:`CheckpointError`."""
    teacher = WorkDir.of(cfg).teacher_dir
    if not (teacher / CONFIG_FILE).is_file():
        raise CheckpointError(f"no fine-tuned teacher in {teacher}; run `nni-effbert teacher -c CONFIG` first")
    return teacher


def check_model_folder(folder: PathLike) -> Path:
    """``folder`` if it holds a model config, else a one-line :class:`CheckpointError`."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} holds no model (no {CONFIG_FILE}); export a student there first "
                              "(`nni-effbert export --arch/--experiment`) or pass a fine-tuned teacher folder")
    return folder


def task_rows(cfg: ExperimentConfig, n: int = CHECK_ROWS) -> Tuple[List[Row], Optional[List[Any]], str]:
    """The first ``n`` dev rows of the config's task: ``(rows, labels, description)``; for span QA the
    first ``n`` dev questions as (question, context) pairs, without labels."""
    # local: datasets builders cost seconds; only the CLI path reads rows
    from ..data.loading import load_raw_task
    from ..data.qa import load_raw_qa
    from ..data.tasks import QA_TASKS, canonical_task_name

    if canonical_task_name(cfg.task.name) in QA_TASKS:
        dd, spec = load_raw_qa(cfg.task)
        dev = dd["dev"].select(range(min(int(n), len(dd["dev"]))))
        return [(r["question"], r["context"]) for r in dev], None, f"{spec.name} dev questions"
    dd, spec = load_raw_task(cfg.task)
    dev = dd["dev"].select(range(min(int(n), len(dd["dev"]))))
    cols = list(spec.text_columns)
    rows: List[Row] = [r[cols[0]] if len(cols) == 1 else (r[cols[0]], r[cols[1]]) for r in dev]
    return rows, list(dev["label"]), f"{spec.name} dev rows"


def onnx_files(folder: PathLike, source: Optional[PathLike] = None) -> Dict[str, Optional[Path]]:
    """``{"onnxruntime": model.onnx, "onnxruntime-int8": model.int8.onnx}`` of ``folder`` (None
    where missing, or where ``onnx_check.json`` says the files were made from other weights than
    ``source`` holds now; ``source`` defaults to ``folder`` when it holds PyTorch weights)."""
    folder = Path(folder)
    out: Dict[str, Optional[Path]] = {"onnxruntime": None, "onnxruntime-int8": None}
    check_path = folder / CHECK_FILE
    if not check_path.is_file():
        return out
    check = load_json(check_path, "ONNX check record")
    if source is None and (folder / WEIGHTS_FILE).is_file():
        source = folder
    if source is not None and isinstance(check, dict) and check.get("source_weights") != _weights_stamp(Path(source)):
        logger.warning("%s: the ONNX files were made from other weights than %s holds now; export them again",
                       folder, source)
        return out
    for key, name in (("onnxruntime", ONNX_FILE), ("onnxruntime-int8", INT8_FILE)):
        if (folder / name).is_file():
            out[key] = folder / name
    return out


# ============================================================================================
# Internals
# ============================================================================================


def _is_student_folder(folder: Path) -> bool:
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "nni_effbert"


def _load_model(folder: Path) -> Tuple[LogitsModule, Any, str]:
    check_model_folder(folder)
    if _is_student_folder(folder):
        exported = load_exported(folder)
        model = exported.model
        # The student's own config object carries the sizes; give it num_labels like an HF config.
        tokenizer = None
        if (folder / "tokenizer_config.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                          config=EfficientBertHFConfig.from_pretrained(str(folder)))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the tokenizer of {folder}: {exc}") from exc
        return LogitsModule(model).eval(), tokenizer, "student"
    model, tokenizer = load_teacher(str(folder))
    return LogitsModule(prepare_teacher(model)).eval(), tokenizer, "teacher"


def _random_inputs(vocab: int, batch: int, seq: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, seq // 2:] = 0  # a padded row: the mask is part of what is compared
    return ids, mask, torch.zeros_like(ids)


def _check_inputs(tokenizer, rows, rows_source: str, vocab: int, max_pos: int, max_length: int, *,
                  span: bool = False):
    """Batches of 16 tokenized rows, or random ids when there are no rows or no tokenizer. Span QA
    rows are (question, context) pairs whose context is cut to fit (``only_second``)."""
    if rows is None or tokenizer is None:
        if rows is not None:
            logger.warning("no tokenizer in the folder: checking the ONNX export on random token ids")
        return [_random_inputs(vocab, 8, min(32, max_pos), seed=s) for s in (1, 2)], "random token ids"
    rows = list(rows)
    if not rows:
        raise ConfigError("no rows to check the ONNX export on")
    length = min(int(max_length), max_pos)
    batches = []
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        first = [r if isinstance(r, str) else r[0] for r in chunk]
        second = None if isinstance(chunk[0], str) else [r[1] for r in chunk]
        truncation = "only_second" if span and second is not None else True
        enc = tokenizer(first, second, padding=True, truncation=truncation, max_length=length, return_tensors="pt")
        types = enc.get("token_type_ids")
        batches.append((enc["input_ids"], enc["attention_mask"],
                        types if types is not None else torch.zeros_like(enc["input_ids"])))
    return batches, rows_source


def _torch_logits(model: torch.nn.Module, batches) -> List[np.ndarray]:
    """PyTorch's logits, one array per batch (span logits of batches differ in length)."""
    with torch.inference_mode():
        return [model(*b).float().cpu().numpy() for b in batches]


def _logits_of(model: "OnnxModel", batches) -> List[np.ndarray]:
    return [model(*b) for b in batches]


def _max_abs_diff(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    return float(max(np.max(np.abs(g - w)) for g, w in zip(got, want)))


def _span_agreement(got: Sequence[np.ndarray], want: Sequence[np.ndarray], batches) -> Dict[str, float]:
    """Share of rows whose best start and best end token (over the row's real tokens) are PyTorch's,
    and the largest logit difference."""
    same = []
    for g, w, b in zip(got, want, batches):
        mask = b[1].numpy().astype(bool)[..., None]  # [B, T, 1]
        g_pos = np.where(mask, g, -np.inf).argmax(axis=1)  # [B, 2]: start, end
        w_pos = np.where(mask, w, -np.inf).argmax(axis=1)
        same.extend((g_pos == w_pos).all(axis=1).tolist())
    return {"agreement": float(np.mean(same)), "max_abs_diff": _max_abs_diff(got, want)}


def _shape_check(model, fp32: OnnxModel, vocab: int, max_pos: int) -> List[Dict[str, Any]]:
    """The dynamic axes: batch 1 and 3 at two sequence lengths, other than the export's."""
    out = []
    for batch in (1, 3):
        for seq in sorted({min(7, max_pos), min(45, max_pos)}):
            inputs = _random_inputs(vocab, batch, seq, seed=batch * 100 + seq)
            want = _torch_logits(model, [inputs])[0]
            got = fp32(*inputs)
            out.append({"batch": batch, "seq": seq, "max_abs_diff": float(np.max(np.abs(got - want)))})
    return out


def _agreement(got: np.ndarray, want: np.ndarray, regression: bool) -> Dict[str, float]:
    if regression:
        d = np.abs(got - want)
        return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
    return {"agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "max_abs_diff": float(np.max(np.abs(got - want)))}


def _accuracy(logits: np.ndarray, labels: Sequence[Any]) -> Optional[float]:
    if logits.shape[1] == 1:
        return None  # regression: the task metric needs the whole dev set, not a check sample
    return float(np.mean(logits.argmax(-1) == np.asarray(labels, dtype=np.int64)))


def _weights_stamp(folder: Path) -> Optional[Dict[str, Any]]:
    """Size and mtime of the folder's weights file: the ONNX files were made from these."""
    for name in (WEIGHTS_FILE, "pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            st = path.stat()
            return {"file": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return None


def _add_readme_section(readme: Path, int8: bool, *, span: bool = False) -> None:
    text = readme.read_text(encoding="utf-8")
    if _README_MARK in text:
        text = text[:text.index(_README_MARK)].rstrip() + "\n\n"
    name = INT8_FILE if int8 else ONNX_FILE
    text += "\n".join([
        _README_MARK,
        "",
        f"`{ONNX_FILE}` (fp32){' and `' + INT8_FILE + '` (dynamic int8)' if int8 else ''} run with "
        "`onnxruntime` and `tokenizers` alone (no torch, transformers or nni); `onnx_check.json` records how "
        "they were checked against the PyTorch model:",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "",
        'tok = Tokenizer.from_file("PATH/tokenizer.json")',
        ('enc = tok.encode("Who wrote it?", "The book was written by Ann Lee in 1990.")' if span
         else 'enc = tok.encode("a gripping, beautifully acted film")'),
        f'sess = ort.InferenceSession("PATH/{name}", providers=["CPUExecutionProvider"])',
        "feeds = {\"input_ids\": np.array([enc.ids]), \"attention_mask\": np.array([enc.attention_mask]),",
        "         \"token_type_ids\": np.array([enc.type_ids])}",
        "used = {i.name for i in sess.get_inputs()}",
        'logits = sess.run(["logits"], {k: v for k, v in feeds.items() if k in used})[0]',
        *(["start, end = logits[0, :, 0].argmax(), logits[0, :, 1].argmax()  # best tokens (a full reader "
           "keeps end >= start inside the context)",
           "lo, hi = enc.offsets[start][0], enc.offsets[end][1]  # character span in the context"] if span else []),
        "```",
        "",
    ])
    atomic_write_text(text, readme)


# ============================================================================================
# Accuracy and latency per runtime (the report's runtime section, bench/deploy.py)
# ============================================================================================

#: The runtimes of the runtime section: (runtime, precision, ONNX file key of :func:`onnx_files`).
SECTION_RUNTIMES = (("torch", "fp32", None), ("onnxruntime", "fp32", "onnxruntime"),
                    ("onnxruntime", "int8", "onnxruntime-int8"))


def evaluate_onnx(model: OnnxModel, batches: Sequence[Mapping[str, torch.Tensor]], spec) -> float:
    """Task metric of an ONNX model on tokenized batches (``length_sorted_batches`` of a split)."""
    logits, labels = [], []
    for b in batches:
        logits.append(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]))
        labels.append(b["labels"].numpy())
    out = np.concatenate(logits)
    if not np.isfinite(out).all():
        raise EffBertError(f"{model.path}: the ONNX model's logits are NaN or infinite")
    preds = out[:, 0] if spec.is_regression else out
    return float(compute_metrics(spec.metric, preds, np.concatenate(labels))["default"])


def evaluate_onnx_span(model: OnnxModel, setup, batch_size: Optional[int] = None) -> float:
    """Dev F1 of an ONNX span-QA model on ``setup``'s task, scored as a PyTorch student's dev F1 is
    (:func:`~nni_effbert.data.qa_answers.score_span_model`: windows, n-best, the v2.0 threshold tuned
    on the search split)."""
    ev = setup.cfg.evaluator

    def forward(batch):
        return torch.from_numpy(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))

    size = int(batch_size or ev.eval_batch_size or ev.batch_size)
    return float(score_span_model(forward, setup.task, setup.cfg.task, size, setup.pad_token_id,
                                  splits=("dev",))["dev"]["default"])


def dev_scorer(setup) -> Callable[["OnnxModel"], float]:
    """``score(onnx_model) -> dev metric`` on ``setup``'s task, as its PyTorch students are scored:
    span QA through :func:`evaluate_onnx_span`, other tasks with :func:`evaluate_onnx` on the dev
    split's length-sorted batches (tokenized once, here)."""
    if setup.task.spec.is_span:
        return lambda model: evaluate_onnx_span(model, setup)
    ev = setup.cfg.evaluator
    batches, _ = length_sorted_batches(setup.task.dev, int(ev.eval_batch_size or ev.batch_size), setup.pad_token_id)
    return lambda model: evaluate_onnx(model, batches, setup.task.spec)


def onnx_latency_ms(models: Sequence[OnnxModel], *, vocab_size: int, seq_length: int = 128, batch_size: int = 1,
                    repeats: int = 20, rounds: int = 3, seed: int = 0) -> List[float]:
    """Median ``session.run`` time (ms) of each model on the same random ids, measured in
    ``rounds`` interleaved rounds (a burst of load hits every model alike)."""
    ids, mask, types = _random_inputs(vocab_size, batch_size, seq_length, seed)
    mask = torch.ones_like(ids)
    runs = []
    for m in models:
        feeds = {n: v.numpy() for n, v in zip(INPUT_NAMES, (ids, mask, types)) if n in m.used}
        runs.append((m.session, feeds))
    for sess, feeds in runs:  # warm-up
        for _ in range(3):
            sess.run(None, feeds)
    times: List[List[float]] = [[] for _ in runs]
    per_round = max(1, int(repeats) // int(rounds))
    for _ in range(int(rounds)):
        for i, (sess, feeds) in enumerate(runs):
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[i].append((time.perf_counter() - start) * 1000.0)
    return [float(statistics.median(t)) for t in times]


def runtime_rows(models: Sequence[Mapping[str, Any]], batches, spec, *, vocab_size: int, seq_length: int = 128,
                 repeats: int = 20, threads: int = 1,
                 evaluate: Optional[Callable[[OnnxModel], float]] = None) -> List[Dict[str, Any]]:
    """Dev metric and latency of each model in each runtime of :data:`SECTION_RUNTIMES`.

    Parameters
    ----------
    models : sequence of dict
        ``{name, role, folder, dev_metric, latency_ms}``: the PyTorch figures (fp32 eager, from
        the report table) and the folder holding the model's ONNX files (:func:`onnx_files`).
    batches : list of dict
        Tokenized dev batches (``length_sorted_batches``).
    spec : TaskSpec
        The task (metric, regression).
    evaluate : callable, optional
        ``evaluate(onnx_model) -> dev metric`` instead of :func:`evaluate_onnx` on ``batches``
        (span QA: :func:`evaluate_onnx_span`).

    Returns
    -------
    list of dict
        One row per model and precision: ``{name, role, precision, dev_metric, torch_ms,
        onnxruntime_ms, torch_speedup, onnxruntime_speedup}``; the speed-ups are against the fp32
        teacher in the same runtime; int8 rows have no ``torch_ms`` (PyTorch int8 is not measured).
    """
    found = []
    for m in models:
        files = onnx_files(m["folder"])
        found.extend((m, key, files[key]) for key in ("onnxruntime", "onnxruntime-int8") if files[key] is not None)
    # Latency with every session loaded (interleaved); the dev metric with one session at a time,
    # released after it: a session's memory arena keeps its largest evaluation batch (GBs for span
    # QA at sequence 384), and nine of them held together exhaust a 24 GiB machine.
    latencies = onnx_latency_ms([OnnxModel(path, threads) for _, _, path in found], vocab_size=vocab_size,
                                seq_length=seq_length, repeats=repeats)
    rows: List[Dict[str, Any]] = []
    for m in models:
        for key, precision in (("onnxruntime", "fp32"), ("onnxruntime-int8", "int8")):
            hit = [(path, ms) for (mm, k, path), ms in zip(found, latencies) if mm is m and k == key]
            if not hit:
                continue
            path, ms = hit[0]
            rows.append({"name": m["name"], "role": m.get("role"), "precision": precision,
                         "dev_metric": score_onnx_file(path, threads, evaluate or (lambda o: evaluate_onnx(o, batches, spec))),
                         "torch_dev_metric": m.get("dev_metric") if precision == "fp32" else None,
                         "torch_ms": m.get("latency_ms") if precision == "fp32" else None,
                         "onnxruntime_ms": ms})
    teacher = next((r for r in rows if r["role"] == "teacher" and r["precision"] == "fp32"), None)
    for r in rows:
        for key in ("torch_ms", "onnxruntime_ms"):
            base = teacher.get(key) if teacher else None
            r[key.replace("_ms", "_speedup")] = base / r[key] if base and r.get(key) else None
    return rows


def score_onnx_file(path: Path, threads: int, score: Callable[["OnnxModel"], float]) -> float:
    """``score`` of the ONNX file at ``path`` in a session of its own, released after."""
    model = OnnxModel(path, threads)
    try:
        return score(model)
    finally:
        del model
        gc.collect()


def runtime_markdown(rows: Sequence[Mapping[str, Any]], *, metric_name: str, seq_length: int) -> str:
    """The report's runtime section (Markdown) of :func:`runtime_rows`."""

    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = ["## Deployment runtimes: PyTorch eager, ONNX Runtime fp32 and int8", "",
             f"| model | precision | {metric_name} (ONNX Runtime) | PyTorch eager (ms) | speed-up | "
             "ONNX Runtime (ms) | speed-up |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['precision']} | {f(r['dev_metric'], '.4f')} | {f(r['torch_ms'], '.2f')} | "
                     f"{f(r['torch_speedup'], '.2f')}x | {f(r['onnxruntime_ms'], '.2f')} | "
                     f"{f(r['onnxruntime_speedup'], '.2f')}x |".replace("n/ax", "n/a"))
    lines += ["", f"Latency: median forward time at batch 1, sequence length {seq_length}, one intra-op thread; "
              "ONNX Runtime times `InferenceSession.run` of `model.onnx` / `model.int8.onnx` (dynamic int8 "
              "quantization), measured interleaved. Speed-up: against the **fp32 teacher in the same runtime**. "
              "The int8 teacher is the cheapest thing to try (no training): a searched student is worth its "
              "search if it beats that row. PyTorch int8 is not measured (n/a).", ""]
    return "\n".join(lines)
