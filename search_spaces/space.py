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

NNI's one-shot strategies (``RandomOneShot`` / SPOS, ``nni.nas.strategy``) mutate a space by
replacing its NNI layers (``LayerChoice``, ``MutableLinear``, ...) with sampling super-modules.
This space has none: every decision is a free ``nni.choice`` read by ``forward(..., arch=)``,
so without help a one-shot strategy trains only the largest arch and exports nothing. The
space therefore offers NNI a mutation hook (``extra_oneshot_hooks``): it swaps the weightless
``arch_sampler`` slot for :class:`OneShotArchSampler`, a ``BaseSuperNetModule`` that samples one
value per label at every ``resample()`` (a uniform random path per step, SPOS); ``forward``
without an ``arch`` runs that path on the shared weights.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import nni
import torch
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from torch import nn

from .space_config import EfficientBertConfig
from .modeling import EfficientBertModel
from .supernet import EfficientBertSupernet, _resolve_config, _validate, layer_choices

__all__ = ["EfficientBertSpace", "OneShotArchSampler", "layer_choices"]


class _ArchSamplerSlot(nn.Module):
    """Weightless placeholder a one-shot strategy replaces by :class:`OneShotArchSampler`."""

    sampled_arch: Optional[Dict[str, Any]] = None


class OneShotArchSampler(BaseSuperNetModule):
    """The space's decisions as one one-shot super-module: one value per label per ``resample``.

    Parameters
    ----------
    choices : dict
        ``label -> nni.choice`` of the space.
    """

    def __init__(self, choices: Mapping[str, Any]):
        super().__init__()
        self._choices = dict(choices)
        #: The path ``EfficientBertSpace.forward`` runs when it is given no ``arch``.
        self.sampled_arch: Optional[Dict[str, Any]] = None

    def resample(self, memo: Dict[str, Any]) -> Dict[str, Any]:
        self.sampled_arch = {label: memo[label] if label in memo else choice.random()
                             for label, choice in self._choices.items()}
        return {label: v for label, v in self.sampled_arch.items() if label not in memo}

    def export(self, memo: Dict[str, Any]) -> Dict[str, Any]:
        # RandomOneShot exports a random path (SPOS leaves the choice to a later search).
        return {label: choice.random() for label, choice in self._choices.items() if label not in memo}

    def forward(self, *args, **kwargs):  # never called: the space reads sampled_arch
        raise RuntimeError("OneShotArchSampler holds no weights; call the space")


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
        self._nni_choices: Dict[str, Any] = {}
        super().__init__(config, **overrides)
        self.arch_sampler = _ArchSamplerSlot()  # no weights: state dicts and checkpoints stay the same

    def _declare_choice(self, label: str, values: List[Any]) -> None:
        choice = nni.choice(label, values)
        self._nni_choices[label] = choice
        self.add_mutable(choice)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, arch: Optional[Mapping[str, Any]] = None,
                return_kd: bool = True):
        """``EfficientBertSupernet.forward``; without ``arch``, the path a one-shot strategy
        sampled last (``arch_sampler``), else the largest arch."""
        if arch is None:
            arch = self.arch_sampler.sampled_arch
        return super().forward(input_ids, attention_mask, token_type_ids, arch=arch, return_kd=return_kd)

    def extra_oneshot_hooks(self, strategy) -> List[Any]:
        """NNI's hook for one-shot strategies (``OneShotStrategy.mutate_model``): sample the
        whole arch with :class:`OneShotArchSampler` (see the module docstring)."""
        choices = self._nni_choices

        def hook(module, name, memo, mutate_kwargs):
            if isinstance(module, _ArchSamplerSlot):
                return OneShotArchSampler(choices), True
            return None

        return [hook]

    @classmethod
    def preset(cls, name: str, **overrides) -> "EfficientBertSpace":
        """A named preset: ``paper`` (hidden 540, 6 layers, fit 768), ``quickstart``
        (hidden 192, 4 layers, fit 384 for all-MiniLM-L6-v2) or ``tiny`` (tests)."""
        return super().preset(name, **overrides)

    @classmethod
    def from_supernet(cls, supernet: EfficientBertSupernet) -> "EfficientBertSpace":
        """The NNI model space of ``supernet``'s config, sharing its weights (no copy).

        What ``NasExperiment`` needs when the experiment's space was built without NNI
        (:func:`nni_effbert.kd.setup.build_space`); the global torch RNG is left untouched.
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
