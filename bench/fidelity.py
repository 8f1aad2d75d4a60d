"""Issue 12 bench: does the search score rank architectures as the final distillation does?

    python bench/fidelity.py                                   # the full bench (hours on 2 cores)
    python bench/fidelity.py --reduced --out bench/results/fidelity_reduced   # minutes (see REDUCED)

Full bench: the pipeline bench's search (``bench/configs/pipeline_sst2.yml``: SST-2, 20,000-row
train subset of which ``task.search_rows`` are held out as the search split, the 872-row dev
set kept for the final scores only) through ``nnictl``, then
``nni-effbert fidelity --sample 12 --repeat 2`` on its stage with the most candidates: every
sampled candidate distilled with the config's ``distill`` budget (or ``--steps``) and scored
on dev. Every candidate's metric dict carries every objective (``kd``, ``kd_pred``,
``metric``), so one set of distilled archs gives a tau for each.

``--reduced`` (what a 2-core machine shared with other jobs can run in well under an hour; the
numbers are labelled reduced; exact budgets in :data:`REDUCED`): 1,500 train rows (300 of them
the search split), sequences cut at 48 tokens, the teacher fine-tuned 40 steps, one ``joint``
stage with a 60-step warm-up (batch 32) and 10-step candidate fine-tunes (batch 16), the candidates scored **in this process** by the same
:class:`~nni_effbert.nas.kd_evaluator.KDEvaluator` the trials run (uniform random archs, as the
progressive search's first stage proposes before its sampler has learnt anything) instead of
through ``nnictl`` (whose ~10 s per trial process is pure overhead here), and a short final
distillation (0 general + 40 task KD steps at batch 16). The budgets are written into the JSON.

Writes ``<out>.json`` (machine, config, budgets, ``fidelity`` = the command's fidelity.json with
``pairs``), ``<out>.md`` and ``<out>.png`` (the scatter).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent

#: ``--reduced`` overrides of ``bench/configs/pipeline_sst2.yml``.
REDUCED = [
    "workdir=" + str(HERE / "work" / "fidelity_reduced"),
    "task.max_train_rows=1500", "task.search_rows=300", "task.max_seq_length=48",
    "teacher.finetune.max_steps=40",
    "warmup.steps=60",
    "evaluator.train_steps=10", "evaluator.eval_interval=10", "evaluator.latency_repeats=1",
    "evaluator.batch_size=16",
    "search.stages=[{name: coarse, kind: joint, trials: 12, warmup_steps: 60}]",
    "distill.general_steps=0", "distill.task_steps=40", "distill.batch_size=16", "distill.eval_interval=0",
]


def in_process_search(cfg, n, seed, setup, experiment):
    """Warm up stage 0 into ``supernet/<experiment>/`` and score ``n`` uniform random archs of it
    (inside the param budget) with the trials' own evaluator; returns trial dicts as
    :func:`read_nni_trials` would (``run_fidelity(cfg, experiment, ...)`` reads that supernet)."""
    import numpy as np

    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.nas.warmup import run_warmup
    from nni_effbert.strategies.sampler import in_budget, random_arch_in_budget

    run_warmup(cfg, 0, setup=setup, experiment=experiment)
    evaluator = KDEvaluator(cfg, stage=0, report=False, latency=True, setup=setup, experiment=experiment)
    space = setup.space
    budget = tuple(cfg.search.param_budget) if cfg.search.param_budget else None
    rng = np.random.default_rng([seed, 12])
    seen, trials = set(), []
    while len(trials) < n:
        arch = random_arch_in_budget(space, rng, {}, lambda a: in_budget(space, a, budget), 1000)
        fp = space.fingerprint(arch)
        if fp in seen:
            continue
        seen.add(fp)
        tid = f"bench-{len(trials):02d}"
        final = evaluator.evaluate(arch, trial_id=tid)
        trials.append({"trial_id": tid, "sequence": len(trials) + 1, "stage": 0, "stage_name": "coarse",
                       "status": "SUCCEEDED", "metric": final["default"], "params": final["params"],
                       "non_embedding_params": final["non_embedding_params"], "latency_ms": final.get("latency_ms"),
                       "expressions": final["expressions"], "arch": arch, "final": final})
        print(f"{tid}: default {final['default']:.4f}, search {final['search_metric']:.4f}, "
              f"KD {final['search_kd_loss']:.4f}", flush=True)
    return trials


def markdown(data) -> str:
    fid, info = data["fidelity"], data["machine"]
    label = "REDUCED budget (not the full bench)" if data["reduced"] else "full bench"
    lines = [f"# Search fidelity, SST-2 (issue 12): {label}", "",
             f"Machine: {info['cpu_model']}, {info['cores']} cores, torch threads {info['torch_threads']}, load avg "
             f"at start {info['loadavg']}, at end {data['load_end']} (shared with other jobs), {info['date']}.", "",
             f"Command: `{data['command']}`. Search: {data['search_mode']}; {data['train_rows']} student-train rows, "
             f"{data['search_rows']} search rows (held out of train), {data['dev_rows']} dev rows (final scores only).",
             f"Budgets: {json.dumps(data['budgets'])}.", "",
             "| objective | Kendall tau (p) | Spearman rho (p) | top-1 hit | top-3 hit rate |",
             "|---|---:|---:|---:|---:|"]

    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    for name, a in fid["by_objective"].items():
        lines.append(f"| `{name}`{' (default)' if name == fid['objective'] else ''} | {f(a['kendall_tau'])} "
                     f"({f(a['kendall_tau_pvalue'], '.3g')}) | {f(a['spearman_rho'])} ({f(a['spearman_rho_pvalue'], '.3g')}) "
                     f"| {f(a.get('top1_hit'), '.0f')} | {f(a.get('top3_hit_rate'), '.2f')} |")
    rep = fid["repeat"]
    if rep.get("per_seed"):
        lines += ["", f"Test-retest ceiling (same archs, {rep['repeats']} other evaluator seeds): Kendall tau "
                      f"{f(rep['test_retest_kendall_tau_mean'])} ± {f(rep['test_retest_kendall_tau_std'])} (default "
                      "objective); per objective and seed:", "",
                  "| evaluator seed | " + " | ".join(fid["by_objective"]) + " |",
                  "|---:|" + "---:|" * len(fid["by_objective"])]
        for s in rep["per_seed"]:
            lines.append(f"| {s['evaluator_seed']} | " + " | ".join(
                f(s["test_retest_by_objective"].get(k)) for k in fid["by_objective"]) + " |")
    spread = data["spread"]
    lines += ["", f"Spread of the {len(fid['pairs'])} candidates' search scores: search-split accuracy "
                  f"{spread['metric_min']:.4f}..{spread['metric_max']:.4f} ({spread['at_majority']} at the "
                  f"majority-class rate {spread['majority_rate']:.4f}, {spread['at_a_class_rate']} at the share of "
                  f"one class, i.e. predicting that class for every row); KD loss {spread['kd_min']:.4f}..{spread['kd_max']:.4f}; "
                  f"final dev accuracy {spread['final_min']:.4f}..{spread['final_max']:.4f}.", "",
              f"Target Kendall tau >= 0.6 for the default objective: measured {f(fid['kendall_tau'])} "
              f"({'met' if fid['kendall_tau'] is not None and fid['kendall_tau'] >= 0.6 else 'NOT met'}).", "",
              f"![search score vs final dev score]({Path(data['png']).name})", "",
              "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in data["timings"].items()), ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "pipeline_sst2.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--reduced", action="store_true", help="the ~10-15 min budget (see the module docstring)")
    p.add_argument("--sample", type=int, default=12)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="total distill steps per candidate (default: config)")
    p.add_argument("--out", default=str(HERE / "results" / "fidelity"))
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--trials-from", metavar="JSON", help="reuse the trials recorded in an earlier result JSON "
                   "instead of searching again (the fidelity records of the work dir are reused too)")
    args = p.parse_args()

    import numpy as np
    import yaml

    from nni_effbert.config import apply_overrides, load_config
    from nni_effbert.kd.teacher_finetune import finetune_from_config
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.product.fidelity import run_fidelity

    info = machine_info()
    sets = (REDUCED if args.reduced else []) + args.set
    raw = yaml.safe_load(Path(args.config).read_text())
    apply_overrides(raw, sets)
    cfg0 = load_config(args.config, sets)
    raw["workdir"] = cfg0.workdir
    workdir = Path(cfg0.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    effective = workdir / "bench_fidelity.yml"
    effective.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(effective)

    timings = {}
    t0 = time.perf_counter()
    teacher = finetune_from_config(cfg, True)
    timings["teacher"] = time.perf_counter() - t0
    print(f"teacher dev {teacher.metric} = {teacher.dev_metric:.4f}", flush=True)
    setup = KDSetup.from_config(cfg)

    t0 = time.perf_counter()
    if args.trials_from:
        earlier = json.loads(Path(args.trials_from).read_text())
        trials, experiment, mode = earlier["trials"], earlier["fidelity"]["experiment"], earlier["search_mode"]
        timings.update({f"{k} (run of {earlier['machine']['date'][:16]})": v for k, v in earlier["timings"].items()})
    elif args.reduced:
        n = sum(s.trials for s in cfg.search.stages)
        experiment, mode = "bench-reduced", f"in-process, stage 0 only, {n} uniform random candidates"
        trials = in_process_search(cfg, n, cfg.seed, setup, experiment)
    else:
        from nni_effbert.nas.records import read_nni_trials
        from nni_effbert.nas.launcher import run_search

        kwargs = {"config_path": str(effective), "wait": True}
        if args.port:
            kwargs["port"] = args.port
        result = run_search(cfg, **kwargs)
        if not result.ok:
            raise SystemExit(f"search {result.experiment_id} ended {result.status}: {result.error}")
        experiment, mode = result.experiment_id, f"nnictl experiment {result.experiment_id}"
        trials = read_nni_trials(experiment, experiments_dir=str(workdir / "nni-experiments"))
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = run_fidelity(cfg, experiment, trials=trials, sample=args.sample, steps=args.steps, repeat=args.repeat,
                       setup=setup)
    timings["fidelity"] = time.perf_counter() - t0
    print(out.summary, flush=True)

    fid = out.data
    finals = [pp["final_score"] for pp in fid["pairs"]]
    metric_scores = [pp["objectives"]["metric"] for pp in fid["pairs"]]
    kd = [-pp["objectives"]["kd"] for pp in fid["pairs"]]
    labels = np.asarray(setup.task.search["labels"])
    majority = float(max(np.mean(labels == c) for c in np.unique(labels)))
    # A candidate predicting one class for every row scores that class's share exactly.
    class_rates = [float(np.mean(labels == c)) for c in np.unique(labels)]
    data = {
        "machine": info, "load_end": load_now(), "reduced": bool(args.reduced),
        "command": "python bench/fidelity.py " + " ".join(sys.argv[1:]), "config": args.config, "overrides": sets,
        "search_mode": mode, "train_rows": len(setup.task.train), "search_rows": len(setup.task.search),
        "dev_rows": len(setup.task.dev), "teacher_dev": teacher.dev_metric,
        "budgets": {"warmup_steps": [s.warmup_steps for s in cfg.search.stages], "candidate_train_steps":
                    cfg.evaluator.train_steps, "distill": fid["distill_plan"], "sample": args.sample,
                    "repeat": args.repeat},
        "spread": {"metric_min": min(metric_scores), "metric_max": max(metric_scores),
                   "majority_rate": majority, "at_majority": int(sum(abs(m - majority) < 1e-9 for m in metric_scores)),
                   "at_a_class_rate": int(sum(any(abs(m - r) < 1e-9 for r in class_rates) for m in metric_scores)),
                   "kd_min": min(kd), "kd_max": max(kd), "final_min": min(finals), "final_max": max(finals)},
        "timings": timings, "fidelity": fid, "trials": trials,
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    png = dest.parent / f"{dest.name}.png"
    shutil.copyfile(out.png_path, png)
    data["png"] = str(png)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    dest.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
