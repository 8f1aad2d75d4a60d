"""Register the progressive search with NNI under the builtin name ``EfficientBertProgressive``.

Equivalent to ``nnictl algo register --meta <package>/resources/tuner_meta.yml`` (and going
through the same NNI functions), but idempotent and callable from Python or the CLI. NNI keeps
registrations in ``registered_algorithms.yml`` of its config folder (``$NNI_CONFIG_DIR``, else
``<venv>/nni`` or ``~/.config/nni``), so it is done once per environment.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

__all__ = ["BUILTIN_NAME", "REGISTER_COMMAND", "meta_file", "register_tuner", "unregister_tuner", "is_registered",
           "not_registered_hint"]

logger = logging.getLogger(__name__)

BUILTIN_NAME = "EfficientBertProgressive"
#: The command that registers it (once per environment, i.e. per NNI config folder).
REGISTER_COMMAND = "nni-effbert register-tuner"


def not_registered_hint(text: str) -> Optional[str]:
    """The fix for NNI's error on an unregistered ``name: EfficientBertProgressive``, or None.

    NNI 3.0's dispatcher raises ``RuntimeError: Builtin name is not found:
    efficientbertprogressive`` before any nni-effbert code runs; callers that read NNI's logs or
    errors (``nni-effbert search``) turn it into a message naming the command.
    """
    if f"builtin name is not found: {BUILTIN_NAME.lower()}" not in (text or "").lower():
        return None
    return (f"the tuner {BUILTIN_NAME} is not registered with NNI in this environment: run `{REGISTER_COMMAND}` "
            f"(or `nnictl algo register --meta {meta_file()}`), or name the advisor by class: "
            "tuner: {className: nni_effbert.strategies.nni.advisor.ProgressiveAdvisor, codeDirectory: .}")


def meta_file() -> Path:
    """The registration meta file shipped in the package (``nni_effbert/resources/tuner_meta.yml``)."""
    import nni_effbert  # local: nni only when registering

    return Path(nni_effbert.__file__).resolve().parent / "resources" / "tuner_meta.yml"


def _load_meta(meta_path: Optional[Union[str, Path]]) -> Dict[str, Any]:
    path = Path(meta_path) if meta_path is not None else meta_file()
    if not path.is_file():
        raise FileNotFoundError(f"registration meta file not found: {path}; reinstall nni-effbert "
                                f"(pip install -e .) so that nni_effbert/resources/ is present")
    with open(path, encoding="utf-8") as f:
        meta = yaml.safe_load(f)
    for key in ("algoType", "builtinName", "className"):
        if not isinstance(meta, dict) or key not in meta:
            raise ValueError(f"{path}: registration meta needs {key!r} (see `nnictl algo register --help`)")
    return meta


def register_tuner(meta_path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Register (or refresh) ``EfficientBertProgressive`` in NNI's algorithm registry.

    Parameters
    ----------
    meta_path : path, optional
        A registration meta file (default: the one shipped in the package).

    Returns
    -------
    dict
        The registered meta, as ``nnictl algo show EfficientBertProgressive`` prints it.

    Raises
    ------
    ValueError
        If the name belongs to an algorithm built into NNI, or the meta file is malformed.
    ImportError
        If the class or validator named in the meta cannot be imported.
    """
    import nni  # local: nni only when registering
    from nni.tools import package_utils  # local: nni only when registering

    meta = dict(_load_meta(meta_path))
    meta["nniVersion"] = nni.__version__
    algo = package_utils.AlgoMeta.load(meta)
    old = package_utils.get_algo_meta(algo.name)
    if old is not None and old.is_builtin:
        raise ValueError(f"{algo.name} is an algorithm built into NNI and cannot be overwritten")
    for full_name in filter(None, (algo.class_name, algo.validator_class_name)):
        module, _, cls = full_name.rpartition(".")
        getattr(importlib.import_module(module), cls)  # fail here, not in the dispatcher later
    if old is not None and old.dump() == algo.dump():
        logger.info("%s is already registered", algo.name)
    else:
        package_utils.register_algo_meta(algo)
        logger.info("%s registered with NNI (%s)", algo.name, algo.class_name)
    return algo.dump()


def unregister_tuner(name: str = BUILTIN_NAME) -> bool:
    """Remove the registration; returns whether there was one."""
    from nni.tools import package_utils  # local: nni only when registering

    old = package_utils.get_algo_meta(name)
    if old is None or old.is_builtin:
        return False
    package_utils.unregister_algo_meta(old.name)
    return True


def is_registered(name: str = BUILTIN_NAME) -> bool:
    """Whether NNI knows ``name`` as a tuner."""
    from nni.tools import package_utils  # local: nni only when registering

    return package_utils.get_algo_meta(name) is not None
