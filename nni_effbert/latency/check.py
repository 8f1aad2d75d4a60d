"""How well the latency table predicts whole models: ``nni-effbert latency --check N`` measures
``N`` random archs end to end in the table's runtime and compares (:func:`check_table`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from nni_effbert.search_spaces.modeling import EfficientBertModel

from .measure import measure_latency
from .settings import LatencySettings, torch_device
from .table import LatencyTable

__all__ = ["CheckResult", "check_table"]


@dataclass
class CheckResult:
    """Predicted vs measured latency of a set of archs.

    Attributes
    ----------
    pairs : list of dict
        ``{predicted_ms, measured_ms, params}`` per arch (with ``arch`` when kept).
    mape : float
        Mean absolute percentage error of the prediction, in percent.
    kendall_tau : float
        Kendall's tau between predicted and measured (``scipy.stats.kendalltau``), and its
        ``kendall_p``.
    """

    pairs: List[Dict[str, Any]]
    mape: float
    kendall_tau: float
    kendall_p: float
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"mape": self.mape, "kendall_tau": self.kendall_tau, "kendall_p": self.kendall_p,
                "n": len(self.pairs), "settings": self.settings, "pairs": self.pairs}


def check_table(table: LatencyTable, archs: Sequence[Mapping[str, Any]], settings: LatencySettings, *,
                repeats: int = 30, progress: bool = True, keep_archs: bool = True) -> CheckResult:
    """Measure each arch end to end (:func:`~nni_effbert.latency.measure.measure_latency`, random
    weights, the table's settings) and compare with the table's prediction."""
    dev = torch_device(settings.device)
    pairs = []
    for arch in tqdm(list(archs), desc="latency check", unit="arch", disable=not progress):
        model = EfficientBertModel(table.config, arch).to(dev).eval()
        measured = measure_latency(model, seq_length=settings.seq_length, batch_size=settings.batch_size,
                                   repeats=repeats, warmup=5, threads=settings.threads,
                                   runtime=settings.runtime).median_ms
        pair = {"predicted_ms": round(table.predict(arch), 4), "measured_ms": round(measured, 4),
                "params": int(sum(p.numel() for p in model.parameters()))}
        if keep_archs:
            pair["arch"] = dict(arch)
        pairs.append(pair)
    pred = np.array([p["predicted_ms"] for p in pairs])
    meas = np.array([p["measured_ms"] for p in pairs])
    mape = float(np.mean(np.abs(pred - meas) / meas) * 100.0) if len(pairs) else float("nan")
    if len(pairs) >= 2:
        tau, p_value = kendalltau(pred, meas)
    else:
        tau, p_value = float("nan"), float("nan")
    return CheckResult(pairs=pairs, mape=round(mape, 3), kendall_tau=float(tau), kendall_p=float(p_value),
                       settings={"device": table.key["device"], "torch": table.key["torch"],
                                 "runtime": settings.runtime, "threads": settings.threads, "batch_size": settings.batch_size,
                                 "seq_length": settings.seq_length, "repeats": repeats})
