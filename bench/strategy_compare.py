"""Issue 4 bench: ProgressiveStrategy vs NNI's Random, RegularizedEvolution and TPE, best score
vs trials, on the same space and the same number of trials.

Part ``proxy``: a deterministic score of the arch (see :func:`proxy_score`), >= 5 seeds,
in-process (``FunctionalEvaluator`` + ``SequentialExecutionEngine``) on the quickstart labels.
Part ``real``: ``KDEvaluator`` in-process (SST-2 bench config by default, any config with
``--config`` / ``--set``), the search score a search ranks by (the ``kd`` objective on the search
split), short KD budget per trial, ``--seeds`` seeds per strategy, resumable.

    python bench/strategy_compare.py proxy --out bench/results/strategy_proxy
    python bench/strategy_compare.py real  --out bench/results/strategy_real --trials 20 --seeds 5 \
        --warm-checkpoint WARM.pt

Target (issue 26): progressive reaches the best final search score of each other strategy within
50% of the trials, on every seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (LightNasSpace, best_so_far, load_now, machine_info, metrics_of,  # noqa: E402
                     run_in_process, trials_to)

# "progressive_nobert": the same search without the sampler's BERT-arch seeds (bert_seeds=0), to show
# how much of progressive's head start on the proxy is the BERT arch (which the proxy rates well).
STRATEGIES = ["progressive", "random", "evolution", "tpe"]
PROXY_STRATEGIES = ["progressive", "progressive_nobert", "random", "evolution", "tpe"]

# ------------------------------------------------------------------------------------------
# Proxy objective
# ------------------------------------------------------------------------------------------
# Per-op preferences distilled from EfficientBERT's findings (Dong et al. 2021, Table/Fig. of the
# searched expressions): a non-linearity between linear1 and linear2 is essential (gelu/relu were
# found there), the searched models put tanh / elu / sigmoid / leaky_relu *outside* linear2,
# max(x, tanh(x)) before linear1 and mul(linear1(x), x) appear once each; wider and deeper MLPs
# help until the parameter budget binds.
MID = {"gelu": 1.0, "relu": 0.9, "swish": 0.85, "leaky_relu": 0.8, "elu": 0.75, "tanh": 0.55,
       "sigmoid": 0.45, "identity": 0.0}
POST = {"tanh": 1.0, "elu": 0.95, "leaky_relu": 0.9, "sigmoid": 0.85, "identity": 0.7, "gelu": 0.6,
        "swish": 0.6, "relu": 0.4}


def layer_score(arch, i, widths, stacks):
    g = lambda s: arch[f"layer{i}_{s}"]  # noqa: E731
    s = MID[g("mid_act")] + 0.5 * POST[g("post_act")]
    # pre slot: max(x, tanh(x)) is the paper's pre-linear1 finding; plain x is fine; others hurt.
    if g("pre_binary") == "max" and g("pre_act") == "tanh":
        s += 0.3
    elif g("pre_binary") == "none":
        s += 0.2 if g("pre_act") == "identity" else 0.05
    else:
        s -= 0.1
    # mid binary: mul(linear1(x), x) applied before the activation is the paper's finding.
    if g("mid_binary") == "mul" and g("mid_operand") == "x" and g("mid_order") == "binary_first":
        s += 0.2
    elif g("mid_binary") != "none":
        s -= 0.15
    if g("post_binary") != "none":
        s -= 0.15
    # size: log-width and stack, diminishing
    w, k = g("width"), g("stack")
    s += 0.3 * math.log2(w / min(widths)) / math.log2(max(widths) / min(widths))
    s += 0.3 * math.sqrt((k - 1) / (max(stacks) - 1))
    return s


def proxy_score(space, arch, budget):
    """Mean layer score normalised by its maximum (1.0 = every layer at its best choice with
    the largest width and stack), halved when ``count_params(arch)`` is outside ``budget``."""
    n = space.config.num_hidden_layers
    widths, stacks = space.choices["layer0_width"], space.choices["layer0_stack"]
    best_layer = 1.0 + 0.5 * 1.0 + 0.3 + 0.2 + 0.3 + 0.3
    raw = sum(layer_score(arch, i, widths, stacks) for i in range(n)) / (n * best_layer)
    p = space.count_params(arch)
    return raw if budget[0] <= p <= budget[1] else 0.5 * raw


def make_strategy(name, seed, total, args, warmup_fn=None, stages=None, search=None):
    """``search``: the progressive strategy's settings (the real part passes its config's, with
    ``stages`` and ``seed`` replaced); default the proxy's (``--budget``, default sampler)."""
    import dataclasses

    from nni.nas.strategy import TPE, Random, RegularizedEvolution

    from nni_effbert.strategies import ProgressiveStrategy, SearchConfig

    if name in ("progressive", "progressive_nobert"):
        from nni_effbert.strategies.stages import SamplerConfig

        sampler = SamplerConfig(bert_seeds=0) if name == "progressive_nobert" else SamplerConfig()
        if search is None:
            search = SearchConfig(param_budget=args.budget, stages=stages, seed=seed, sampler=sampler)
        else:
            search = dataclasses.replace(search, stages=stages, seed=seed)
        return ProgressiveStrategy(search=search, warmup_fn=warmup_fn)
    if name == "random":
        return Random(seed=seed, dedup=True)
    if name == "evolution":
        # NNI's default population (100) exceeds the trial budget, which would make it Random.
        return RegularizedEvolution(population_size=args.population, sample_size=args.sample_size, seed=seed)
    if name == "tpe":
        return TPE(seed=seed)
    raise ValueError(name)


def proxy_stages(total):
    from nni_effbert.strategies import Stage

    a = round(total * 0.45)
    b = round(total * 0.3)
    return [Stage("coarse", "joint", trials=a, warmup=False),
            Stage("expression", "expression", trials=b, warmup=False),
            Stage("size", "size", trials=total - a - b, warmup=False, train_steps=0)]


def summarise(curves, total):
    """curves: name -> list over seeds of best-so-far arrays (length total). One row per
    (progressive variant, other strategy): trials progressive needs to reach the other's final best."""
    rows = []
    finals = {k: float(np.mean([c[-1] for c in v])) for k, v in curves.items()}
    for prog in [k for k in curves if k.startswith("progressive")]:
        for other in [k for k in curves if not k.startswith("progressive")]:
            per_seed = []
            for cp, co in zip(curves[prog], curves[other]):
                per_seed.append((trials_to(cp, co[-1]), trials_to(co, co[-1])))
            fewer = [tp is not None and tp < to for tp, to in per_seed]
            half = [tp is not None and tp <= total / 2 for tp, _ in per_seed]  # issue 26: <= 50% of the trials
            rows.append({"progressive": prog, "other": other, "per_seed": per_seed, "prog_fewer_in": sum(fewer),
                         "within_half_in": sum(half), "seeds": len(per_seed), "met": all(half)})
    return finals, rows


def write_outputs(out, data, curves, total, title, xlabel="trial"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(1, total + 1)
    for name, cs in curves.items():
        arr = np.array([np.where(np.isfinite(c), c, np.nan) for c in cs])
        mean = np.nanmean(arr, axis=0)
        line, = ax.plot(x, mean, label=f"{name} (mean of {len(cs)})")
        if len(cs) > 1:
            ax.fill_between(x, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), alpha=0.15, color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best score so far")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def markdown(data, finals, rows, what):
    m = data["machine"]
    lines = [f"# {what}", "", f"Machine: {m['cpu_model']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
             + (f"load avg at the start {data['started']['loadavg']} ({data['started']['date']}), at the end "
                f"{data.get('load_end')} ({m['date']})" if data.get("started") else
                f"load avg {m['loadavg']} at the end ({m['date']}; the start's was not recorded)")
             + (f"; 1-min load at the trials, min-max {data['trial_load'][0]}-{data['trial_load'][1]}"
                if data.get("trial_load") else ""), "",
             f"Trials per strategy: {data['trials']}; seeds: {data['seeds']}. {data['notes']}", "",
             "| strategy | mean final best | per-seed final best |", "|---|---|---|"]
    for k, v in finals.items():
        per = ", ".join(f"{c[-1]:.4f}" for c in data["curves"][k])
        lines.append(f"| {k} | {v:.4f} | {per} |")
    lines += ["", "Trials progressive needs to reach the other's final best (per seed: progressive / other's own "
              "trial of its best; '-' = never within the budget):", "",
              f"| progressive | vs | per seed (prog / other) | progressive fewer trials in | within {data['trials'] // 2} "
              "trials (50%) in | target (every seed within 50%) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{'-' if a is None else a}/{b}" for a, b in r["per_seed"])
        half = r.get("within_half_in", "-")
        lines.append(f"| {r['progressive']} | {r['other']} | {per} | {r['prog_fewer_in']}/{r['seeds']} seeds | "
                     f"{half}/{r['seeds']} seeds | {'MET' if r['met'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------


def run_proxy(args):
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.space import RawFormatModelSpace
    from tqdm import tqdm

    import nni
    from nni_effbert.search_spaces import EfficientBertSpace
    from nni_effbert.strategies.core import split_parameters

    space = EfficientBertSpace.preset("quickstart")
    budget = tuple(args.budget)
    total = args.trials
    rng = np.random.RandomState(123)
    randoms = [proxy_score(space, space.random_arch(rng), budget) for _ in range(2000)]
    in_budget = np.mean([budget[0] <= space.count_params(space.random_arch(rng)) <= budget[1] for _ in range(500)])
    print(f"proxy: {len(PROXY_STRATEGIES)} strategies x {args.seeds} seeds x {total} trials (seconds each)")

    def evaluate(model):
        arch, _ = split_parameters(model.sample)
        nni.report_final_result(proxy_score(space, arch, budget))

    curves = {k: [] for k in PROXY_STRATEGIES}
    counts = {k: [] for k in PROXY_STRATEGIES}
    secs = {k: [] for k in PROXY_STRATEGIES}
    for seed in tqdm(range(args.seeds), desc="seeds"):
        for name in PROXY_STRATEGIES:
            ms = RawFormatModelSpace.from_model(LightNasSpace(space), FunctionalEvaluator(evaluate))
            strat = make_strategy(name, seed, total, args, stages=proxy_stages(total))
            t0 = time.perf_counter()
            engine = run_in_process(strat, ms, max_models=total)
            secs[name].append(time.perf_counter() - t0)
            vals = metrics_of(engine)[:total]
            counts[name].append(len(vals))
            vals = vals + [float("-inf")] * (total - len(vals))
            curves[name].append(best_so_far(vals))
    finals, rows = summarise(curves, total)
    notes = (f"Proxy = normalised per-layer score from the paper's findings (bench/strategy_compare.py:proxy_score), "
             f"x0.5 outside the parameter budget {list(budget)} ({in_budget:.0%} of random archs inside). "
             f"Random archs: mean {np.mean(randoms):.4f}, max of 2000 {np.max(randoms):.4f}. "
             f"Progressive stages {[(s.name, s.trials) for s in proxy_stages(total)]}, warm-ups disabled "
             f"(warmup=False; none run, none counted). RegularizedEvolution population {args.population}, "
             f"sample {args.sample_size}. Trials run per strategy: {counts}.")
    data = {"machine": machine_info(), "trials": total, "seeds": args.seeds, "budget": list(budget),
            "curves": {k: [c.tolist() for c in v] for k, v in curves.items()}, "trials_run": counts,
            "strategy_seconds": secs, "summary": rows, "finals": finals, "notes": notes, "load_end": load_now()}
    out = Path(args.out)
    write_outputs(out, data, curves, total, f"Proxy objective, quickstart space ({args.seeds} seeds, band = min..max)")
    md = markdown(data, finals, rows, "Strategy comparison on the proxy objective (issue 4)")
    md += f"\n![best so far]({out.with_suffix('.png').name})\n"
    out.with_suffix(".md").write_text(md)
    print(md)


def run_real(args):
    """Every strategy x ``--seeds`` seeds on the real evaluator, ``--trials`` trials each.

    The score is what a search ranks by: the config's ``evaluator.objective`` (default ``kd``) on the
    task's search split, after ``--train-steps`` KD steps from one shared warmed supernet (no per-stage
    warm-ups, so every trial of every strategy costs the same). The evaluator is deterministic for an
    arch (same supernet, same fine-tune seed), so an arch scored once is not trained again: every
    strategy sees the same score for the same arch. A rerun with the same ``--out`` resumes from
    ``<out>.partial.json`` (the strategy x seed runs already finished)."""
    from tqdm import tqdm

    from nni.nas.space import RawFormatModelSpace
    from nni_effbert.config import load_config
    from nni_effbert.kd.teacher_finetune import finetune_from_config
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.strategies import Stage

    overrides = [f"evaluator.train_steps={args.train_steps}", *args.set]
    if args.warm_checkpoint:
        # Candidates of every strategy inherit this warmed supernet (the stages below have no
        # warm-up of their own, so KDEvaluator.load_stage falls back to warmup.checkpoint).
        overrides.append(f"warmup.checkpoint={Path(args.warm_checkpoint).resolve()}")
    cfg = load_config(args.config, overrides)
    total = args.trials
    finetune_from_config(cfg, progress=True)  # the task's teacher (reused when already fine-tuned)
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, latency=False)
    setup = evaluator.setup
    setup.train_cache()  # build/open once, outside the timed trials
    space = setup.space
    a = max(1, round(total * 0.45))
    b = max(1, round(total * 0.3))
    stages = [Stage("coarse", "joint", trials=a, warmup=False, train_steps=args.train_steps),
              Stage("expression", "expression", trials=b, warmup=False, train_steps=args.train_steps),
              Stage("size", "size", trials=total - a - b, warmup=False, train_steps=args.train_steps)]
    import nni
    from nni.nas.evaluator import FunctionalEvaluator

    from nni_effbert.strategies.core import split_parameters

    out = Path(args.out)
    partial = out.with_suffix(".partial.json")
    done = json.loads(partial.read_text()) if partial.is_file() else {}
    runs, secs = done.get("runs", {}), done.get("strategy_seconds", {})
    # A resumed run keeps its first start; one resumed from an older partial file has none.
    started = done.get("started") if done else {"loadavg": load_now(), "date": machine_info()["date"]}
    scored = {json.dumps(e["arch"], sort_keys=True): e for run in runs.values() for e in run if not e.get("cached")}
    seeds = list(range(args.seed, args.seed + args.seeds))
    log = []

    def evaluate(model):
        arch, meta = split_parameters(model.sample)
        key = json.dumps(arch, sort_keys=True)
        if key in scored:
            entry = {**scored[key], "meta": meta, "cached": True}
        else:
            t0 = time.perf_counter()
            res = evaluator.evaluate(arch, stage=int(meta.get("_stage", 0)), train_steps=args.train_steps)
            entry = {"arch": arch, "meta": meta, "score": res["default"], "search_metric": res.get("search_metric"),
                     "search_kd_loss": res.get("search_kd_loss"), "params": res["params"],
                     "seconds": time.perf_counter() - t0, "load": load_now()}
            scored[key] = entry
        log.append(entry)
        nni.report_final_result(entry["score"])
        bar.update(1)

    todo = [(name, seed) for seed in seeds for name in STRATEGIES if f"{name}/{seed}" not in runs]
    print(f"real: {len(STRATEGIES)} strategies x {len(seeds)} seeds x {total} trials x {args.train_steps} KD steps "
          f"({len(todo)} runs to go); about {args.est_trial_s:.0f} s per new arch -> at most "
          f"~{len(todo) * total * args.est_trial_s / 60:.0f} min", flush=True)
    bar = tqdm(total=len(todo) * total, desc="trials")
    for name, seed in todo:
        log.clear()
        ms = RawFormatModelSpace.from_model(LightNasSpace(space), FunctionalEvaluator(evaluate))
        strat = make_strategy(name, seed, total, args, stages=stages, search=cfg.search)
        t0 = time.perf_counter()
        run_in_process(strat, ms, max_models=total)
        runs[f"{name}/{seed}"], secs[f"{name}/{seed}"] = list(log[:total]), time.perf_counter() - t0
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"machine": machine_info(), "started": started, "runs": runs,
                                       "strategy_seconds": secs}, indent=1,
                                      default=str))
    bar.close()
    curves = {}
    for name in STRATEGIES:
        for seed in seeds:
            vals = [e["score"] for e in runs[f"{name}/{seed}"]]
            curves.setdefault(name, []).append(best_so_far(vals + [float("-inf")] * (total - len(vals))))
    finals, rows = summarise(curves, total)
    new = [e for run in runs.values() for e in run if not e.get("cached")]
    objective = cfg.evaluator.objective
    spread = np.percentile([e["score"] for e in new], [0, 50, 100])
    loads = [e["load"][0] for e in new if e.get("load")]
    notes = (f"KDEvaluator in-process on {args.config} (overrides {args.set or 'none'}): task {cfg.task.name}, "
             f"{len(setup.task.train)} student-train rows, score = the `{objective}` objective on the "
             f"{len(setup.task.search) if setup.task.search is not None else 0}-row search split (what the search ranks "
             f"by; dev is not read), {args.train_steps} KD steps per trial from "
             f"{'the shared warmed supernet ' + str(args.warm_checkpoint) if args.warm_checkpoint else 'the supernet seeded random initialisation'}"
             f" (no per-stage warm-ups, for every strategy, so each trial costs the same), seeds {seeds}, the config's "
             f"search settings for progressive (parameter budget {cfg.search.param_budget}, tie margin "
             f"{cfg.search.tie_margin}). An arch is trained and scored once and its score reused wherever it recurs "
             f"({len(new)} distinct archs scored, median {np.median([e['seconds'] for e in new]):.1f} s each; "
             f"their scores span {spread[0]:.4f} to {spread[2]:.4f}, median {spread[1]:.4f}, against the "
             f"tie margin {cfg.search.tie_margin}). "
             f"Progressive stages {[(s.name, s.trials) for s in stages]}. RegularizedEvolution population "
             f"{args.population}, sample {args.sample_size}. Wall seconds per strategy (median over seeds): "
             f"{ {k: round(float(np.median([v for r, v in secs.items() if r.startswith(k + '/')])), 1) for k in STRATEGIES} }.")
    data = {"machine": machine_info(), "trials": total, "seeds": len(seeds), "train_steps": args.train_steps,
            "curves": {k: [c.tolist() for c in v] for k, v in curves.items()}, "runs": runs, "summary": rows,
            "finals": finals, "strategy_seconds": secs, "notes": notes, "load_end": load_now(), "started": started,
            "trial_load": [min(loads), max(loads)] if loads else None, "command": "python bench/strategy_compare.py " + " ".join(sys.argv[1:])}
    write_outputs(out, data, curves, total, f"{cfg.task.name}: search score ({objective} on the search split), "
                                            f"{args.train_steps} KD steps/trial")
    md = markdown(data, finals, rows, f"Strategy comparison on the real search score, {cfg.task.name} (issues 4, 26)")
    md += f"\n![best so far]({out.with_suffix('.png').name})\n"
    out.with_suffix(".md").write_text(md)
    print(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["proxy", "real"])
    p.add_argument("--out", required=True, help="output path without suffix (.json/.md/.png written)")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, nargs=2, default=[4.95e6, 5.15e6])
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--sample-size", type=int, default=4)
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "sst2_bench.yml"))
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (real)")
    p.add_argument("--warm-checkpoint", default=None,
                   help="supernet checkpoint every candidate inherits (e.g. from `nni-effbert warmup`)")
    p.add_argument("--est-trial-s", type=float, default=20.0, help="only for the printed estimate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the shared 2-core machine 2 threads oversubscribe the "
                        "cores and a step runs several times slower)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import nni  # noqa: F401  (configures its loggers; quiet them: one line per trial otherwise)
    for name in ("nni", "nni_effbert"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.part == "proxy":
        run_proxy(args)
    else:
        if args.trials < 3:
            p.error("--trials must be >= 3 (three progressive stages)")
        run_real(args)


if __name__ == "__main__":
    main()
