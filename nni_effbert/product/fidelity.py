"""How well the search's score predicts the final result: ``nni-effbert fidelity``.

::

    nni-effbert fidelity -c exp.yml --experiment ID [--sample K] [--steps N] [--repeat R] [--stage S]
                         [--distill-seeds D]

1. **Sample.** From the scored candidates of one stage (default: the stage with the most scored
   candidates; scores of different stages come from different supernets and budgets and are
   not comparable), K candidates spanning the score range: the best ``ceil(K/4)``, the worst
   ``ceil(K/4)`` and seeded random ones in between (:func:`select_candidates`).
2. **Distil.** Each is exported with its stage's supernet weights and distilled as
   ``nni-effbert distill`` would (the config's ``distill`` budget; ``--steps N`` gives a shorter
   total budget split between general and task KD in the config's proportion), then scored on
   **dev**. The search never read dev; this is its only use here. With ``--distill-seeds D``
   each arch is distilled D times (``distill.seed`` = base + 0..D-1) and its final score is the
   mean over those seeds; the final's own seed-to-seed Kendall tau (every pair of seeds, over
   the K archs) is reported beside the search score's: no search score can rank the archs
   better than the final agrees with itself.
3. **Compare.** Kendall's tau-b and Spearman's rho (with ``scipy.stats`` p-values) between the
   search score and the final dev score, and the top-1 / top-3 hit rates, for the search's own
   ``default`` and for every other objective in the candidates' metric dicts
   (:mod:`nni_effbert.nas.objectives`): one set of distilled archs answers for every objective.
4. **Repeat** (``--repeat R``). The same K archs are scored again by the evaluator with R
   other evaluator seeds (``evaluator.seed`` = base + 1..R: batch order and dropout of the
   candidate fine-tune); the rank correlation between those re-scores and the original scores
   is the proxy's test-retest reliability, the ceiling any strategy using it can reach. A stage
   scored with inherited weights (``train_steps: 0``) is deterministic: its ceiling is 1.

Outputs: ``<workdir>/reports/fidelity.{json,md,png}``. Every distilled arch and every re-score
is recorded atomically under ``<workdir>/fidelity/`` as soon as it is done, keyed by the plan;
a rerun (after an interruption, or with a larger ``--repeat``) reuses them and does not redo them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..errors import ConfigError, EffBertError
from ..io import atomic_write_json, atomic_write_text, load_json
from ..kd.setup import KDSetup
from ..nas.kd_evaluator import KDEvaluator
from ..nas.objectives import OBJECTIVES, objective_scores
from ..nas.records import is_scored, normalize_trial, read_nni_trials
from ..strategies.ties import NOISE_FACTOR, noise_sd
from ..workdir import WorkDir
from .distill import plan_distill, run_distill
from .plots import plot_scatter
from .students import experiments_dir_of, export_trial_arch

__all__ = ["FIDELITY_FORMAT", "FidelityResult", "select_candidates", "rank_agreement", "seed_agreement",
           "run_fidelity", "fidelity_markdown", "score_noise"]

logger = logging.getLogger(__name__)

#: Version of the records under ``<workdir>/fidelity`` and of ``fidelity.json``.
FIDELITY_FORMAT = 1


class FidelityError(EffBertError):
    """The experiment cannot be measured (too few scored candidates in the stage)."""


@dataclass
class FidelityResult:
    """What :func:`run_fidelity` measured and wrote.

    Attributes
    ----------
    data : dict
        The contents of ``fidelity.json``.
    json_path, md_path, png_path : Path
    distilled, reused : int
        Archs distilled by this call, and archs whose record was reused.
    """

    data: Dict[str, Any]
    json_path: Path
    md_path: Path
    png_path: Path
    distilled: int = 0
    reused: int = 0
    rescored: int = 0
    summary: str = field(default="", repr=False)


# ============================================================================================
# Sampling and statistics
# ============================================================================================

def select_candidates(trials: Sequence[Mapping[str, Any]], k: int, seed: int) -> List[Dict[str, Any]]:
    """K scored trials spanning the score range: the best and worst ``ceil(k/4)``, seeded random between.

    Parameters
    ----------
    trials : sequence of dict
        Scored trial dicts (one stage).
    k : int
        How many (all of them when there are at most ``k``).
    seed : int

    Returns
    -------
    list of dict
        By decreasing search score.
    """
    if k < 2:
        raise ConfigError(f"--sample must be at least 2 (a rank correlation needs pairs), got {k}")
    pool = sorted(trials, key=lambda t: (-t["metric"], str(t["trial_id"])))
    if len(pool) <= k:
        return pool
    edge = max(1, math.ceil(k / 4))
    top, bottom, middle = pool[:edge], pool[len(pool) - edge:], pool[edge:len(pool) - edge]
    rng = np.random.default_rng([int(seed), 0xF1DE])
    picked = rng.choice(len(middle), size=k - 2 * edge, replace=False) if k > 2 * edge else []
    chosen = top + [middle[i] for i in sorted(picked)] + bottom
    return sorted(chosen, key=lambda t: (-t["metric"], str(t["trial_id"])))


def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def rank_agreement(search: Sequence[float], final: Sequence[float]) -> Dict[str, Any]:
    """Kendall's tau-b, Spearman's rho (``scipy.stats``, two-sided p-values) and top-k hits.

    ``top1_hit`` is 1 when the arch with the best search score is (one of) the best by final
    score; ``top3_hit_rate`` is the share of the 3 best by search score whose final score is at
    least the third-best final score (ties count as hits). Constant inputs give ``None``
    correlations (undefined), and constant final scores ``None`` hit rates (every arch would
    "hit").
    """
    x, y = np.asarray(search, dtype=float), np.asarray(final, dtype=float)
    out: Dict[str, Any] = {"n": int(len(x))}
    if len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        kt = stats.kendalltau(x, y)
        sr = stats.spearmanr(x, y)
        out.update(kendall_tau=_finite(kt.statistic), kendall_tau_pvalue=_finite(kt.pvalue),
                   spearman_rho=_finite(sr.statistic), spearman_rho_pvalue=_finite(sr.pvalue))
    else:
        out.update(kendall_tau=None, kendall_tau_pvalue=None, spearman_rho=None, spearman_rho_pvalue=None)
    out["top1_hit"] = out["top3_hit_rate"] = None
    if len(x) and np.ptp(y) > 0:
        out["top1_hit"] = float(y[int(np.argmax(x))] == y.max())
        k = min(3, len(x))
        top_s = np.argsort(-x, kind="stable")[:k]
        third = np.sort(y)[::-1][k - 1]
        out["top3_hit_rate"] = float(np.mean(y[top_s] >= third))
    return out


# ============================================================================================
# The measurement
# ============================================================================================

def _scaled_cfg(cfg: ExperimentConfig, steps: Optional[int]):
    """The config with a total distill budget of ``steps`` (same general:task proportion)."""
    if steps is None:
        return cfg
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {steps!r}")
    d = cfg.distill
    total = d.general_steps + d.task_steps
    general = int(round(steps * d.general_steps / total)) if total else 0
    task = steps - general
    if task < 1:
        general, task = steps - 1, 1
    return dataclasses.replace(cfg, distill=dataclasses.replace(d, general_steps=general, task_steps=task))


def _pick_stage(scored: List[Dict[str, Any]], stage: Optional[int]) -> int:
    stages = sorted({t["stage"] for t in scored if t["stage"] is not None})
    if stage is not None:
        if stage not in stages:
            raise FidelityError(f"stage {stage} has no scored candidate (stages with scored candidates: {stages})")
        return stage
    if not stages:
        raise FidelityError("the experiment has no scored candidate with a stage; nothing to measure")
    counts = {s: sum(t["stage"] == s for t in scored) for s in stages}
    return max(stages, key=lambda s: (counts[s], s))


def _record_ok(path: Path, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = load_json(path, "fidelity record")
    except EffBertError as exc:
        logger.warning("ignoring unreadable fidelity record %s (%s); redoing it", path, exc)
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key):
        logger.info("fidelity record %s was made with other settings; redoing it", path)
        return None
    return data


def run_fidelity(cfg: ExperimentConfig, experiment: Optional[str] = None, *, trials: Optional[Sequence[Mapping[str,
                 Any]]] = None,
                 sample: int = 12, steps: Optional[int] = None, repeat: int = 0, stage: Optional[int] = None,
                 seed: Optional[int] = None, experiments_dir: Optional[str] = None, progress: bool = True,
                 setup: Optional[KDSetup] = None, distill_seeds: int = 1) -> FidelityResult:
    """Measure how well the experiment's search scores predict the final distilled dev scores.

    Parameters
    ----------
    cfg : ExperimentConfig
    experiment : str, optional
        NNI experiment id (its trials are read with :func:`~nni_effbert.nas.records.read_nni_trials`).
    trials : sequence of dict, optional
        Trial dicts instead of an experiment (each needs ``final``, the candidate's metric dict).
    sample : int
        K, candidates to distil (default 12).
    steps : int, optional
        Total distill steps per candidate (default: ``distill.general_steps + task_steps``).
    repeat : int
        R, evaluator seeds to re-score the K archs with (0: no test-retest).
    stage : int, optional
        Stage to sample from (default: the one with the most scored candidates).
    seed : int, optional
        Seeds the sample (default: the config's ``seed``).
    experiments_dir : str, optional
        NNI's experiments folder, when the manifest does not know the experiment.
    progress : bool
    setup : KDSetup, optional
        A loaded experiment to share.
    distill_seeds : int
        D, distill seeds per arch (default 1); the final score is their mean.

    Returns
    -------
    FidelityResult

    Raises
    ------
    FidelityError
        Fewer than 2 scored candidates in the stage.
    ConfigError
        Bad ``sample`` / ``steps`` / ``repeat`` / ``distill_seeds``.
    """
    if isinstance(distill_seeds, bool) or not isinstance(distill_seeds, int) or distill_seeds < 1:
        raise ConfigError(f"--distill-seeds must be an integer >= 1, got {distill_seeds!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 0:
        raise ConfigError(f"--repeat must be an integer >= 0, got {repeat!r}")
    if trials is None:
        if not experiment:
            raise ConfigError("fidelity needs --experiment ID (or trial dicts)")
        trials = read_nni_trials(experiment, experiments_dir=experiments_dir_of(cfg, experiments_dir))
    trials = [normalize_trial(t) for t in trials]
    scored = [t for t in trials if is_scored(t) and isinstance(t.get("final"), Mapping)]
    stage = _pick_stage(scored, stage)
    pool = [t for t in scored if t["stage"] == stage]
    if len(pool) < 2:
        raise FidelityError(f"stage {stage} has {len(pool)} scored candidate(s); a rank correlation needs at least 2")
    seed = int(cfg.seed if seed is None else seed)
    chosen = select_candidates(pool, int(sample), seed)
    dcfg = _scaled_cfg(cfg, steps)
    plan = plan_distill(dcfg).to_dict()
    seeds = [int(plan["seed"]) + i for i in range(distill_seeds)]
    seed_cfgs = {s: dataclasses.replace(dcfg, distill=dataclasses.replace(dcfg.distill, seed=s)) for s in seeds}
    seed_plans = {s: plan_distill(c).to_dict() for s, c in seed_cfgs.items()}
    wd = WorkDir.of(cfg).ensure()
    root = wd.root / "fidelity"
    setup = setup or KDSetup.from_config(cfg, progress=progress)
    # The candidates inherit their own experiment's supernets (supernet/<id>/stage{N}.pt).
    evaluator = KDEvaluator(cfg, report=False, progress=progress, latency=False, setup=setup, experiment=experiment)
    logger.info("fidelity: %d of %d scored candidates of stage %d; distill plan %s", len(chosen), len(pool),
                stage, plan)

    pairs: List[Dict[str, Any]] = []
    distilled = reused = 0
    for t in tqdm(chosen, desc="fidelity: distil", disable=not progress):
        tid = str(t["trial_id"])
        per_seed: Dict[int, Dict[str, Any]] = {}
        for dseed in seeds:
            key = {"format": FIDELITY_FORMAT, "experiment": experiment, "trial": tid, "arch": t["arch"], "stage": stage,
                   "plan": seed_plans[dseed], "task_fingerprint": setup.task.fingerprint}
            # the base seed's record keeps its name (records of runs before --distill-seeds stay valid)
            suffix = "" if dseed == seeds[0] else f"-dseed{dseed}"
            path = root / "distilled" / f"{_safe(tid)}{suffix}.json"
            record = _record_ok(path, key)
            if record is None:
                name = f"fidelity-{_safe(tid)}"
                # force: fidelity-<trial> folders are this command's scratch copies, exported again
                # from the supernet for every seed (a distilled folder is not a start)
                export_trial_arch(cfg, t["arch"], stage, name, evaluator=evaluator, force=True,
                                  extra={"source": "fidelity", "experiment": experiment, "trial_id": tid,
                                         "trial_metric": t["metric"], "stage": stage})
                result = run_distill(seed_cfgs[dseed], wd.export_dir(name), force=True, progress=progress, setup=setup)
                record = {"key": key, "final_score": result.dev_metric, "before": result.before,
                          "seconds": round(result.seconds, 1)}
                atomic_write_json(record, path)
                distilled += 1
            else:
                reused += 1
            per_seed[dseed] = record
        final = dict(t["final"])
        first = per_seed[seeds[0]]
        pairs.append({"trial": tid, "search_score": float(t["metric"]),
                      "final_score": float(np.mean([float(r["final_score"]) for r in per_seed.values()])),
                      "final_by_seed": {str(k): float(r["final_score"]) for k, r in per_seed.items()},
                      "dev_before_distill": first.get("before"), "params": t["params"],
                      "objectives": objective_scores(final)})

    # -- test-retest: the same archs re-scored with other evaluator seeds ------------------------
    base_seed = int(cfg.seed if cfg.evaluator.seed is None else cfg.evaluator.seed)
    rescores: List[Dict[str, Any]] = []
    rescored = 0
    for r in range(1, repeat + 1):
        eseed = base_seed + r
        rcfg = dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, seed=eseed))
        rev = KDEvaluator(rcfg, stage=stage, report=False, progress=progress, latency=False, setup=setup,
                          experiment=experiment)
        for t in tqdm(chosen, desc=f"fidelity: re-score (evaluator seed {eseed})", disable=not progress):
            tid = str(t["trial_id"])
            steps_used = t["final"].get("train_steps")
            key = {"format": FIDELITY_FORMAT, "experiment": experiment, "trial": tid, "arch": t["arch"],
                   "stage": stage, "evaluator_seed": eseed, "train_steps": steps_used,
                   "task_fingerprint": setup.task.fingerprint}
            path = root / "rescored" / f"{_safe(tid)}-seed{eseed}.json"
            record = _record_ok(path, key)
            if record is None:
                final = rev.evaluate(t["arch"], train_steps=steps_used if isinstance(steps_used, int) else None,
                                     trial_id=f"fidelity-{_safe(tid)}-seed{eseed}")
                record = {"key": key, "default": final["default"], "objectives": objective_scores(final)}
                atomic_write_json(record, path)
                rescored += 1
            rescores.append({"trial": tid, "evaluator_seed": eseed, "search_score": float(record["default"]),
                             "objectives": record["objectives"]})

    data = _summarise(cfg, setup, experiment, stage, len(pool), plan, steps, sample, seed, pairs, rescores, repeat,
                      seeds)
    out = wd.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / "fidelity.json", out / "fidelity.md", out / "fidelity.png"
    atomic_write_json(data, json_path)
    _plot(data, png_path)
    text = fidelity_markdown(data, png_path.name, heading="#")
    atomic_write_text(text, md_path)
    logger.info("fidelity written to %s (tau %s)", json_path, data["kendall_tau"])
    return FidelityResult(data=data, json_path=json_path, md_path=md_path, png_path=png_path, distilled=distilled,
                          reused=reused, rescored=rescored, summary=_summary_lines(data))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "trial"


def seed_agreement(pairs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
    """The final score's agreement with itself: Kendall tau between the K archs' finals of every
    pair of distill seeds, and their mean (None with fewer than 2 seeds)."""
    per_pair = []
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            agree = rank_agreement([p["final_by_seed"][str(a)] for p in pairs], [p["final_by_seed"][str(b)] for p in pairs])
            per_pair.append({"seeds": [int(a), int(b)], "kendall_tau": agree["kendall_tau"]})
    taus = [x["kendall_tau"] for x in per_pair if x["kendall_tau"] is not None]
    return {"distill_seeds": [int(s) for s in seeds], "pairs": per_pair,
            "kendall_tau_mean": float(np.mean(taus)) if taus else None,
            "kendall_tau_std": float(np.std(taus)) if taus else None}


def score_noise(pairs: Sequence[Mapping[str, Any]], rescores: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """How much the search score moves with the evaluator seed, in score units.

    For each re-score seed, the standard deviation over the archs of (re-score - original score):
    a shift every arch shares (which cannot change a ranking) is removed, what is left is the noise
    in one arch's score relative to another's. ``score_noise_sd`` is its mean over the seeds and
    ``tie_margin_suggested`` twice that, the definition of ``search.tie_margin``'s defaults
    (:mod:`nni_effbert.strategies.ties`). None with fewer than 2 archs re-scored.
    """
    original = {p["trial"]: float(p["search_score"]) for p in pairs}
    sds = []
    for eseed in sorted({r["evaluator_seed"] for r in rescores}):
        diffs = [float(r["search_score"]) - original[r["trial"]] for r in rescores
                 if r["evaluator_seed"] == eseed and r["trial"] in original]
        if len(diffs) >= 2:
            sds.append(noise_sd(diffs))
    sd = float(np.mean(sds)) if sds else None
    return {"score_noise_sd_by_seed": sds, "score_noise_sd": sd,
            "tie_margin_suggested": None if sd is None else NOISE_FACTOR * sd}


def _summarise(cfg: ExperimentConfig, setup, experiment, stage, pool_size, plan, steps, sample, seed, pairs, rescores,
               repeat, seeds: Sequence[int]) -> Dict[str, Any]:
    finals = [p["final_score"] for p in pairs]
    default = rank_agreement([p["search_score"] for p in pairs], finals)
    objectives = sorted({name for p in pairs for name in p["objectives"]}, key=lambda n: OBJECTIVES.index(n)
                        if n in OBJECTIVES else 99)
    by_objective = {}
    for name in objectives:
        have = [p for p in pairs if name in p["objectives"]]
        if len(have) == len(pairs):
            by_objective[name] = rank_agreement([p["objectives"][name] for p in have], finals)
    repeat_block: Dict[str, Any] = {"repeats": int(repeat), "rescores": rescores}
    if rescores:
        original = {p["trial"]: p for p in pairs}
        per_seed = []
        for eseed in sorted({r["evaluator_seed"] for r in rescores}):
            rows = [r for r in rescores if r["evaluator_seed"] == eseed]
            agree = rank_agreement([original[r["trial"]]["search_score"] for r in rows],
                                   [r["search_score"] for r in rows])
            vs_final = rank_agreement([r["search_score"] for r in rows],
                                      [original[r["trial"]]["final_score"] for r in rows])
            per_obj = {}
            for name in by_objective:
                if all(name in r["objectives"] for r in rows):
                    per_obj[name] = rank_agreement([original[r["trial"]]["objectives"][name] for r in rows],
                                                   [r["objectives"][name] for r in rows])["kendall_tau"]
            per_seed.append({"evaluator_seed": eseed, "test_retest": agree,
                             "kendall_tau_vs_final": vs_final["kendall_tau"], "test_retest_by_objective": per_obj})
        taus = [s["test_retest"]["kendall_tau"] for s in per_seed if s["test_retest"]["kendall_tau"] is not None]
        repeat_block.update(per_seed=per_seed, test_retest_kendall_tau_mean=float(np.mean(taus)) if taus else None,
                            test_retest_kendall_tau_std=float(np.std(taus)) if taus else None,
                            **score_noise(pairs, rescores), tie_margin_in_use=cfg.search.tie_margin)
    return {
        "format": FIDELITY_FORMAT,
        "experiment": experiment,
        "stage": stage,
        "objective": cfg.evaluator.objective,
        "candidates_in_stage": pool_size,
        "sample": int(sample),
        "sample_seed": seed,
        "distill_plan": plan,
        "distill_steps_option": steps,
        "search_split_rows": len(setup.task.search) if getattr(setup.task, "search", None) is not None else 0,
        "dev_rows": len(setup.task.dev),
        "splits": {"search_score": "the candidate's final `default` in the search (its evaluator.objective on the "
                                   "held-out search split, carved from train)",
                   "final_score": f"dev {setup.task.spec.metric} after distillation (dev is read only here)"},
        "metric": setup.task.spec.metric,
        "pairs": pairs,
        **{k: default.get(k) for k in ("kendall_tau", "kendall_tau_pvalue", "spearman_rho", "spearman_rho_pvalue",
                                       "top1_hit", "top3_hit_rate", "n")},
        "by_objective": by_objective,
        "repeat": repeat_block,
        "final_seed_to_seed": seed_agreement(pairs, seeds),
    }


def _plot(data: Mapping[str, Any], path: Path) -> None:
    pairs = data["pairs"]
    tau, rho = data.get("kendall_tau"), data.get("spearman_rho")
    title = f"Search score vs final dev score, stage {data['stage']}, {len(pairs)} archs"
    if tau is not None:
        title += f": Kendall tau {tau:.3f}, Spearman rho {rho:.3f}"
    plot_scatter([p["search_score"] for p in pairs], [p["final_score"] for p in pairs],
                 [str(p["trial"]) for p in pairs],
                 xlabel=f"search score (default = {data['objective']} on the {data['search_split_rows']}-row search split)",
                 ylabel=f"final dev {data['metric']} after distillation", title=title, path=path)


def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _seeds_text(data: Mapping[str, Any], plan: Mapping[str, Any]) -> str:
    seeds = (data.get("final_seed_to_seed") or {}).get("distill_seeds") or [plan["seed"]]
    if len(seeds) == 1:
        return f"distill seed {seeds[0]}"
    return f"distill seeds {', '.join(map(str, seeds))}; final score = their mean"


def _summary_lines(data: Mapping[str, Any]) -> str:
    lines = [f"fidelity of stage {data['stage']} ({len(data['pairs'])} archs, distilled "
             f"{data['distill_plan']['general_steps']}+{data['distill_plan']['task_steps']} steps, dev {data['metric']}):",
             f"  default ({data['objective']}): Kendall tau {_f(data['kendall_tau'])} (p {_f(data['kendall_tau_pvalue'], '.3g')}), "
             f"Spearman rho {_f(data['spearman_rho'])} (p {_f(data['spearman_rho_pvalue'], '.3g')}), "
             f"top-1 hit {_f(data.get('top1_hit'), '.0f')}, top-3 hit rate {_f(data.get('top3_hit_rate'), '.2f')}"]
    for name, agree in data["by_objective"].items():
        lines.append(f"  objective {name}: Kendall tau {_f(agree['kendall_tau'])}, Spearman rho "
                     f"{_f(agree['spearman_rho'])}")
    sts = data.get("final_seed_to_seed") or {}
    if len(sts.get("distill_seeds") or []) > 1:
        lines.append(f"  final score: mean over distill seeds {sts['distill_seeds']}; its own seed-to-seed Kendall "
                     f"tau {_f(sts['kendall_tau_mean'])} +- {_f(sts['kendall_tau_std'])}")
    rep = data["repeat"]
    if rep.get("per_seed"):
        lines.append(f"  test-retest over {rep['repeats']} evaluator seed(s): Kendall tau "
                     f"{_f(rep['test_retest_kendall_tau_mean'])} +- {_f(rep['test_retest_kendall_tau_std'])}")
        if rep.get("tie_margin_suggested") is not None:
            lines.append(f"  score noise: {_f(rep['score_noise_sd'], '.4f')} (sd of re-score - score over the archs); "
                         f"search.tie_margin of about {_f(rep['tie_margin_suggested'], '.4f')} fits this task "
                         f"(in use: {_f(rep.get('tie_margin_in_use'), '.4f')})")
    return "\n".join(lines)


def fidelity_markdown(data: Mapping[str, Any], png_name: Optional[str] = "fidelity.png", heading: str = "##") -> str:
    """The fidelity section (also ``fidelity.md``) from ``fidelity.json``'s contents."""
    plan = data["distill_plan"]
    lines = [f"{heading} Search fidelity: does the search score predict the final result?", "",
             f"- Stage {data['stage']}: {len(data['pairs'])} of its {data['candidates_in_stage']} scored candidates "
             f"(best, worst and seeded random between), each distilled with {plan['general_steps']} general + "
             f"{plan['task_steps']} task KD steps ({_seeds_text(data, plan)}).",
             f"- **Search score**: {data['splits']['search_score']}; {data['search_split_rows']} rows.",
             f"- **Final score**: {data['splits']['final_score']}; {data['dev_rows']} rows.",
             "",
             "| search score | Kendall tau (p) | Spearman rho (p) | top-1 hit | top-3 hit rate |",
             "|---|---:|---:|---:|---:|",
             f"| default ({data['objective']}) | {_f(data['kendall_tau'])} ({_f(data['kendall_tau_pvalue'], '.3g')}) | "
             f"{_f(data['spearman_rho'])} ({_f(data['spearman_rho_pvalue'], '.3g')}) | {_f(data.get('top1_hit'), '.0f')} | "
             f"{_f(data.get('top3_hit_rate'), '.2f')} |"]
    for name, a in data["by_objective"].items():
        lines.append(f"| objective `{name}` | {_f(a['kendall_tau'])} ({_f(a['kendall_tau_pvalue'], '.3g')}) | "
                     f"{_f(a['spearman_rho'])} ({_f(a['spearman_rho_pvalue'], '.3g')}) | {_f(a.get('top1_hit'), '.0f')} | "
                     f"{_f(a.get('top3_hit_rate'), '.2f')} |")
    lines.append("")
    sts = data.get("final_seed_to_seed") or {}
    if len(sts.get("distill_seeds") or []) > 1:
        lines += [f"The final score's own agreement across distill seeds (the ceiling of any search score): "
                  f"Kendall tau {_f(sts['kendall_tau_mean'])} ± {_f(sts['kendall_tau_std'])} over "
                  f"{len(sts['pairs'])} seed pair(s).", "",
                  "| distill seeds | Kendall tau of their finals |", "|---|---:|"]
        lines += [f"| {a}, {b} | {_f(x['kendall_tau'])} |" for x in sts["pairs"] for a, b in [x["seeds"]]]
        lines.append("")
    rep = data["repeat"]
    if rep.get("per_seed"):
        lines += [f"Test-retest (the same archs scored again with other evaluator seeds; the ceiling of any "
                  f"strategy on this proxy): Kendall tau {_f(rep['test_retest_kendall_tau_mean'])} ± "
                  f"{_f(rep['test_retest_kendall_tau_std'])} over {rep['repeats']} seed(s).", ""]
        if rep.get("tie_margin_suggested") is not None:
            lines += [f"Score noise: the re-score minus the original score varies over the archs with standard "
                      f"deviation {_f(rep['score_noise_sd'], '.4f')} (a shift shared by every arch removed). Twice "
                      f"that, {_f(rep['tie_margin_suggested'], '.4f')}, is the `search.tie_margin` that fits this task "
                      f"and proxy (in use: {_f(rep.get('tie_margin_in_use'), '.4f')}).", ""]
        lines += ["| evaluator seed | tau vs original score | tau of the re-score vs final | per objective |",
                  "|---:|---:|---:|---|"]
        for s in rep["per_seed"]:
            per = ", ".join(f"{k} {_f(v)}" for k, v in s["test_retest_by_objective"].items())
            lines.append(f"| {s['evaluator_seed']} | {_f(s['test_retest']['kendall_tau'])} | "
                         f"{_f(s['kendall_tau_vs_final'])} | {per} |")
        lines.append("")
    lines += ["| trial | search score | final dev score |", "|---|---:|---:|"]
    lines += [f"| {p['trial']} | {p['search_score']:.4f} | {p['final_score']:.4f} |" for p in data["pairs"]]
    lines.append("")
    if png_name:
        lines += [f"![search score vs final dev score]({png_name})", ""]
    return "\n".join(lines)
