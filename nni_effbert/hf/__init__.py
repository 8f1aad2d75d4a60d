"""Templates of the Hugging Face remote code that :mod:`nni_effbert.product.export` writes.

An export folder holds these files next to verbatim copies of
``nni_effbert/search_spaces/modeling.py`` and ``ops.py``:

``configuration_effbert.py``
    :class:`EfficientBertHFConfig`, a ``PretrainedConfig`` with the student's sizes and its
    ``arch`` (label -> value dict). Imports only ``transformers``, so it is importable here too.
``modeling_effbert_hf.py``
    ``EfficientBertForSequenceClassification`` and ``EfficientBertForQuestionAnswering``
    (``head: span``), ``PreTrainedModel`` s wrapping the pure-torch
    ``EfficientBertModel``. It imports ``.modeling`` relatively, which resolves only inside an
    export folder (or Hugging Face's copy of it in ``HF_MODULES_CACHE``): do not import it from
    this package.

Nothing here depends on nni or on the rest of nni-effbert, so an exported model loads on a
machine that has only ``torch`` and ``transformers``.
"""
from pathlib import Path

#: Folder holding the template files.
TEMPLATE_DIR = Path(__file__).resolve().parent

#: Template file names, as written into export folders.
CONFIG_FILE = "configuration_effbert.py"
MODELING_FILE = "modeling_effbert_hf.py"

#: ``auto_map`` entries of an exported ``config.json`` (a student with the ``sequence`` head).
AUTO_MAP = {
    "AutoConfig": "configuration_effbert.EfficientBertHFConfig",
    "AutoModelForSequenceClassification": "modeling_effbert_hf.EfficientBertForSequenceClassification",
}

#: ``auto_map`` of a student with the ``span`` head (extractive question answering).
QA_AUTO_MAP = {
    "AutoConfig": "configuration_effbert.EfficientBertHFConfig",
    "AutoModelForQuestionAnswering": "modeling_effbert_hf.EfficientBertForQuestionAnswering",
}

#: HF model class written into ``architectures`` for each head.
MODEL_CLASSES = {"sequence": "EfficientBertForSequenceClassification", "span": "EfficientBertForQuestionAnswering"}

#: ``model_type`` of exported configs; prefixed so it never collides with a built-in model type.
MODEL_TYPE = "nni_effbert"

#: Attribute of the HF model holding the pure-torch student; prefix of every weight name.
STUDENT_PREFIX = "student"

__all__ = ["TEMPLATE_DIR", "CONFIG_FILE", "MODELING_FILE", "AUTO_MAP", "QA_AUTO_MAP", "MODEL_CLASSES", "MODEL_TYPE",
           "STUDENT_PREFIX"]
