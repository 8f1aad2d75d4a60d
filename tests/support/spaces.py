"""An arch space as a light NNI model space: ``freeze`` builds no model (objectives that only
read the arch). Used by ``tests/test_strategy_nas.py`` and ``bench/strategy_compare.py``."""
from __future__ import annotations

import nni
import torch
from nni.nas.nn.pytorch import ModelSpace

__all__ = ["FrozenArch", "LightNasSpace"]


class FrozenArch(torch.nn.Module):
    """What the light space freezes to: only the sample (no weights are built)."""

    def __init__(self, sample):
        super().__init__()
        self.sample = dict(sample)


class LightNasSpace(ModelSpace):
    """The labels of an ``EfficientBertSpace`` as an NNI model space (one ``nni.choice`` per
    label) whose ``freeze`` builds no model: for objectives that only read the arch. The arch
    API the progressive strategy needs is delegated to the real space."""

    _API = ("expression_labels", "size_labels", "random_arch", "bert_arch", "count_params",
            "fingerprint", "validate_arch")

    def __init__(self, arch_space):
        super().__init__()
        self.arch_space = arch_space
        for label, values in arch_space.choices.items():
            self.add_mutable(nni.choice(label, list(values)))

    def freeze(self, sample):
        return FrozenArch(sample)

    labels = property(lambda self: self.arch_space.labels)
    choices = property(lambda self: self.arch_space.choices)
    config = property(lambda self: self.arch_space.config)

    def __getattr__(self, name):
        if name in LightNasSpace._API:
            return getattr(self.arch_space, name)
        return super().__getattr__(name)
