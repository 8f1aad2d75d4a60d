"""PNG plots of a search: best score so far per stage, and metric vs params / latency with the
Pareto front. The object-oriented matplotlib API on an Agg canvas (no pyplot global state).
"""
from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from ..io import atomic_write
from ..nas.ranking import pareto_front
from ..nas.records import is_failed, is_scored

__all__ = ["stage_label", "stage_colors", "plot_best_so_far", "plot_front", "params_axis", "plot_scatter"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

def stage_label(stage: Optional[int], names: Mapping[Optional[int], Optional[str]]) -> str:
    if stage is None:
        return "trials"
    name = names.get(stage)
    return f"stage {stage}" + (f" ({name})" if name else "")


def stage_colors(stages: Sequence[Optional[int]]) -> Dict[Optional[int], Any]:

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(stages)}


def _new_figure():
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no GUI
    # backend, whatever backend the user's matplotlib is configured with.

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def plot_best_so_far(trials: List[Dict[str, Any]], names, colors, metric_name: str, path: Path) -> None:
    fig, ax = _new_figure()
    stages = list(colors)
    for stage in stages:
        of_stage = [t for t in trials if t["stage"] == stage and not t["warmup"]]
        scored = [t for t in of_stage if is_scored(t)]
        failed = sum(is_failed(t) for t in of_stage)
        label = f"{stage_label(stage, names)}: {len(scored)} scored" + (f", {failed} failed" if failed else "")
        if not scored:
            ax.plot([], [], color=colors[stage], label=label + " (nothing to plot)")
            continue
        xs = [t["sequence"] if t["sequence"] is not None else i for i, t in enumerate(scored)]
        ys = [t["metric"] for t in scored]
        best, running = -math.inf, []
        for y in ys:
            best = max(best, y)
            running.append(best)
        ax.scatter(xs, ys, s=14, color=colors[stage], alpha=0.35, linewidths=0)
        ax.step(xs, running, where="post", color=colors[stage], linewidth=2, label=label)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"best {metric_name} so far")
    ax.set_title("Best-so-far per stage (dots: each scored trial)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_front(trials: List[Dict[str, Any]], cost: str, names, colors, metric_name: str, best: Optional[Dict],
                path: Path) -> List[str]:

    pts = [t for t in trials if is_scored(t) and t[cost] is not None]
    front = pareto_front(pts, cost=cost)
    fig, ax = _new_figure()
    for stage in colors:
        of_stage = [t for t in pts if t["stage"] == stage]
        if of_stage:
            ax.scatter([t[cost] for t in of_stage], [t["metric"] for t in of_stage], s=22, alpha=0.7,
                       color=colors[stage], label=stage_label(stage, names), linewidths=0)
    ax.step([t[cost] for t in front], [t["metric"] for t in front], where="post", color="black",
            linewidth=1.2, alpha=0.8)
    ax.scatter([t[cost] for t in front], [t["metric"] for t in front], s=60, facecolors="none",
               edgecolors="black", linewidths=1.3, label=f"Pareto front ({len(front)})")
    if best is not None and best[cost] is not None:
        ax.scatter([best[cost]], [best["metric"]], marker="*", s=220, color="gold", edgecolors="black",
                   linewidths=0.8, zorder=5, label=f"selected (trial {best['trial_id']})")
    failed = sum(is_failed(t) for t in trials)
    xlabel = {"params": "parameters", "non_embedding_params": "non-embedding parameters",
              "latency_ms": "CPU latency, batch 1 / seq 128 (ms, median)"}[cost]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_name)
    if cost != "latency_ms":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title(f"{metric_name} vs {xlabel.split(',')[0]}: {len(pts)} scored trials"
                 + (f" ({failed} failed, not shown)" if failed else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return [t["trial_id"] for t in front]


def params_axis(scored: Sequence[Mapping[str, Any]]) -> Optional[str]:
    # The embedding tables are the same for every candidate, so non-embedding parameters show
    # the differences better; fall back to totals when some trial did not report them.
    if scored and all(t["non_embedding_params"] is not None for t in scored):
        return "non_embedding_params"
    if any(t["params"] is not None for t in scored):
        return "params"
    return None




def plot_scatter(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], *, xlabel: str, ylabel: str,
                 title: str, path: Path) -> None:
    """A labelled scatter plot (``nni-effbert fidelity``: search score vs final dev score)."""
    fig, ax = _new_figure()
    ax.scatter(list(xs), list(ys), s=30, color="tab:blue", alpha=0.8, label=f"{len(xs)} distilled candidates")
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(str(label)[-6:], (x, y), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
