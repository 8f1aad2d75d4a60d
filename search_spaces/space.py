"""``EfficientBertSpace``: EfficientBERT's student supernet as an NNI model space.

Every searched decision is an ``nni.choice`` registered on the space, with flat, zero-based
labels (documented in :mod:`.modeling`), so any NNI strategy can sample it: NNI's own
``Random`` / ``RegularizedEvolution`` / TPE through ``space.freeze(sample)`` or
``nni.nas.space.model_context``, and ``nnictl`` tuners through :meth:`nni_search_space`.

The space also *is* the weight-sharing supernet (Dong et al., 2021, Sec. 3.3): it holds
full-size weights, ``space(inputs, arch=...)`` runs any architecture on them, and
:meth:`subnet` hands out a plain ``torch.nn.Module`` whose weights are slices of them.

All of that lives in :class:`~.supernet.EfficientBertSupernet` (pure torch); this class adds the
NNI mutables, so only code that searches with NNI imports ``nni.nas``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import nni
import torch
from nni.nas.nn.pytorch import ModelSpace

from .space_config import EfficientBertConfig
from .modeling import EfficientBertModel
from .supernet import EfficientBertSupernet, _resolve_config, _validate, layer_choices

__all__ = ["EfficientBertSpace", "layer_choices"]


class EfficientBertSpace(EfficientBertSupernet, ModelSpace):
    """EfficientBERT's student supernet: searchable MLP expression, width and stack per layer.

    An :class:`~.supernet.EfficientBertSupernet` (the arch API and the shared weights) that is
    also an NNI model space: every label is an ``nni.choice`` registered on it.

    Parameters
    ----------
    config : EfficientBertConfig, optional
        Sizes and search ranges; defaults to the paper's (``preset('paper')``).
    **overrides
        Field overrides applied to ``config``.

    Examples
    --------
    >>> space = EfficientBertSpace.preset("tiny")
    >>> arch = space.bert_arch()
    >>> student = space.subnet(arch)          # plain nn.Module, weights inherited
    >>> space.count_params(arch) == sum(p.numel() for p in student.parameters())
    True
    """

    def __init__(self, config: Optional[EfficientBertConfig] = None, **overrides):
        super().__init__(config, **overrides)

    def _declare_choice(self, label: str, values: List[Any]) -> None:
        self.add_mutable(nni.choice(label, values))

    @classmethod
    def preset(cls, name: str, **overrides) -> "EfficientBertSpace":
        """A named preset: ``paper`` (hidden 540, 6 layers, fit 768), ``quickstart``
        (hidden 192, 4 layers, fit 384 for all-MiniLM-L6-v2) or ``tiny`` (tests)."""
        return super().preset(name, **overrides)

    @classmethod
    def from_supernet(cls, supernet: EfficientBertSupernet) -> "EfficientBertSpace":
        """The NNI model space of ``supernet``'s config, sharing its weights (no copy).

        What ``NasExperiment`` needs when the experiment's space was built without NNI
        (:func:`nni_effbert.kd.train.build_space`); the global torch RNG is left untouched.
        """
        if isinstance(supernet, cls):
            return supernet
        with torch.random.fork_rng(devices=[]):
            space = cls(supernet.config)
        space.supernet = supernet.supernet
        return space

    @classmethod
    def create_fixed_module(cls, sample: dict, config: Optional[EfficientBertConfig] = None, **overrides):
        # Called by NNI when the space is instantiated inside ``model_context(sample)`` (trial
        # processes of NasExperiment): build the fixed student directly, freshly initialised.
        config = _resolve_config(config, overrides)
        arch = {k: v for k, v in sample.items() if k.startswith("layer")}
        return EfficientBertModel(config, _validate(config, arch))

    def freeze(self, sample: Dict[str, Any]) -> EfficientBertModel:
        """NNI's freeze: the subnet of ``sample`` with weights inherited from the supernet."""
        return self.subnet({k: v for k, v in sample.items() if k in self.choices})

    def nni_search_space(self) -> Dict[str, Dict[str, Any]]:
        """The legacy JSON search space for ``nnictl`` (``{label: {_type: choice, _value: [...]}}``)."""
        return {label: {"_type": "choice", "_value": list(m.values)} for label, m in self.simplify().items()}
