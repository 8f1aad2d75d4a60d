"""Issue 27 bench: one searched student for SST-2 + MNLI-m + QNLI against the latency-matched
BERT-MLP baseline on the suite average, per task and paired, and what the multi-task search costs.

    python bench/multitask.py --out bench/results/multitask                     # full size (hours)
    python bench/multitask.py --medium --out bench/results/multitask_medium     # one sitting, labelled MEDIUM
    python bench/multitask.py --reduced --out bench/results/multitask_reduced   # minutes, labelled REDUCED

1. Every task's teacher (MiniLM fine-tuned per task, ``bench/configs/multitask.yml``).
2. The multi-task search through nnictl (``nni-effbert search``: 10 + 6 + 8 candidates, each
   scored on every task against BERT's MLP on the same supernet).
3. For each distill seed: the best candidate exported for every task, general KD once, task KD per
   task (:func:`nni_effbert.product.suite.distill_multitask`); the latency-matched baseline through
   the same steps (:func:`~nni_effbert.product.suite.ensure_multitask_baseline`).
4. Per task and for the (weighted) suite average: searched minus baseline, paired over dev rows with
   the seeds paired (:func:`nni_effbert.stats.paired_scores` / :func:`~nni_effbert.stats.paired_suite`:
   95% bootstrap within tasks, two-sided permutation p).
5. Cost: the search's wall time, candidates and warm-ups, against the single-task searches it
   replaces (the same stages once per task: as many task scorings, ``n_tasks`` x the warm-ups; not run).

Writes ``<out>.json`` (machine and load, budgets, every score), ``<out>.md`` and ``<out>.png``.
**Targets:** on the suite average the searched student beats the latency-matched baseline with
p < 0.05, and keeps >= 95% of the teachers' average at >= 4x lower latency than the teacher.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent

REDUCED = ["student.preset=tiny", "warmup.steps=4", "warmup.batch_size=8", "evaluator.train_steps=2",
           "evaluator.eval_interval=2", "evaluator.batch_size=8", "evaluator.latency_repeats=2",
           "distill.general_steps=2", "distill.task_steps=4", "distill.batch_size=8",
           "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 4}, {name: size, kind: size, "
           "trials: 2, warmup_steps: 4, general_warmup_steps: 2, train_steps: 0}]"]
#: Per task in a reduced run: few rows, short windows, a few teacher steps.
REDUCED_TASK = {"max_train_rows": 96, "max_dev_rows": 64, "search_rows": 32, "max_seq_length": 32}
REDUCED_TEACHER = {"max_steps": 4, "batch_size": 8}
#: A run sized for one sitting on the 2-core machine (about 1.5 h, from the MNLI-m capacity bench's step
#: times: teacher ~0.06 s per row and epoch, student KD ~0.5 s per step of 32 at seq 128): 2,000 train
#: rows per task (300 of them held out for the search), up to 1,000 dev rows, 6 + 4 + 6 candidates with
#: 30-step KD fine-tunes, 100 general + 300 task-KD steps per task and seed. Labelled MEDIUM.
MEDIUM = ["evaluator.train_steps=30", "evaluator.eval_interval=30", "distill.general_steps=100",
          "distill.task_steps=300",
          "search.stages=[{name: coarse, kind: joint, trials: 6, warmup_steps: 200}, {name: expression, kind: "
          "expression, trials: 4, warmup_steps: 100}, {name: size, kind: size, trials: 6, warmup_steps: 100, "
          "general_warmup_steps: 50, train_steps: 0}]"]
MEDIUM_TASK = {"max_train_rows": 2000, "search_rows": 300, "max_dev_rows": 1000}


def _config(args):
    import yaml

    from nni_effbert.config import apply_overrides, load_config

    raw = yaml.safe_load(Path(args.config).read_text())
    base = Path(args.config).resolve().parent
    for entry in raw["tasks"]:  # paths relative to the config's folder, as load_config resolves them
        for key in ("data_dir", "train_file", "dev_file"):
            if entry["task"].get(key):
                entry["task"][key] = str((base / entry["task"][key]).resolve())
        if args.reduced:
            entry["task"].update(REDUCED_TASK)
        elif args.medium:
            entry["task"].update(MEDIUM_TASK)
    if args.reduced:
        raw["teacher"]["finetune"].update(REDUCED_TEACHER)
    raw["workdir"] = str(Path(args.workdir).resolve()) if args.workdir else \
        str((base / raw["workdir"]).resolve()) + ("_reduced" if args.reduced else "_medium" if args.medium else "")
    apply_overrides(raw, [*(REDUCED if args.reduced else MEDIUM if args.medium else []), *args.set])
    Path(raw["workdir"]).mkdir(parents=True, exist_ok=True)
    effective = Path(raw["workdir"]) / "bench_multitask.yml"
    effective.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(effective), effective


def _exported(cfg, name, experiment) -> bool:
    """Whether every task already holds export ``name`` of ``experiment`` (a rerun with --experiment);
    an export of another experiment stops the bench rather than being replaced."""
    from nni_effbert.config import each_task
    from nni_effbert.workdir import WorkDir

    metas = [WorkDir.of(one).export_dir(name) / "export_meta.json" for _, one in each_task(cfg)]
    if not any(m.is_file() for m in metas):
        return False
    for meta in metas:
        extra = (json.loads(meta.read_text()).get("extra") or {}) if meta.is_file() else {}
        if extra.get("supernet_experiment") != experiment:
            raise SystemExit(f"{meta.parent} is not an export of experiment {experiment}; pass another --workdir "
                             "or remove it")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "multitask.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default=str(HERE / "results" / "multitask"))
    p.add_argument("--workdir", default=None, help="default: the config's (+ '_reduced' / '_medium')")
    p.add_argument("--distill-seeds", type=int, default=3)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="a short run (labelled REDUCED); not the bench's figures")
    size.add_argument("--medium", action="store_true", help="a run that fits one sitting on 2 cores (labelled MEDIUM)")
    p.add_argument("--experiment", metavar="ID", help="reuse this finished multi-task search")
    args = p.parse_args()
    if args.distill_seeds < 1:
        p.error("--distill-seeds must be >= 1")

    import numpy as np

    from nni_effbert.config import each_task, load_config
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.kd.teacher_finetune import finetune_from_config
    from nni_effbert.latency.targets import teacher_latency_ms
    from nni_effbert.nas.launcher import run_search
    from nni_effbert.nas.records import is_scored
    from nni_effbert.product.compare import dev_row_scores
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.suite import distill_multitask, ensure_multitask_baseline, export_multitask
    from nni_effbert.search_spaces import EfficientBertSupernet
    from nni_effbert.stats import paired_scores, paired_suite
    from nni_effbert.workdir import WorkDir

    cfg, effective = _config(args)
    info, started = machine_info(), time.perf_counter()
    teachers = {key: finetune_from_config(one, progress=True) for key, one in each_task(cfg)}
    search_s, trials = None, None
    experiment = args.experiment
    if experiment is None:
        t0 = time.perf_counter()
        result = run_search(cfg, config_path=str(effective), wait=True, progress=True)
        search_s, experiment, trials = time.perf_counter() - t0, result.experiment_id, result.trials
        if not result.ok:
            raise SystemExit(f"the multi-task search {experiment} ended {result.status}: {result.error}")
    cands = [t for t in (trials or []) if not t.get("warmup") and not t.get("teacher") and is_scored(t)]

    weights = {t.key: float(t.weight) for t in cfg.tasks}
    rows = {"searched": {k: [] for k in weights}, "baseline": {k: [] for k in weights}}
    seeds, space = [], None
    setups = {key: KDSetup.from_config(one, progress=False) for key, one in each_task(cfg)}
    for k in range(args.distill_seeds):
        seed = int(cfg.distill.seed if cfg.distill.seed is not None else cfg.seed) + k
        scfg = load_config(effective, [f"distill.seed={seed}"])
        names = {"searched": f"searched-seed{seed}", "baseline": f"baseline-seed{seed}"}
        if not _exported(scfg, names["searched"], experiment):  # a rerun keeps its exports and distillations
            export_multitask(scfg, experiment, name=names["searched"])
        searched = distill_multitask(scfg, name=names["searched"])
        baseline = ensure_multitask_baseline(scfg, name=names["baseline"], searched=names["searched"])
        entry = {"seed": seed, "searched": {t: r.dev_metric for t, r in searched.items()},
                 "baseline": {t: r.dev_metric for t, r in baseline.items()}}
        for label in ("searched", "baseline"):
            for key, one in each_task(scfg):
                per_row = dev_row_scores(setups[key], WorkDir.of(one).export_dir(names[label]))
                if per_row is None:
                    raise SystemExit(f"task {key}: its metric is not a mean over dev rows; the paired suite needs "
                                     "accuracy or span F1 on every task")
                rows[label][key].append(per_row)
        first = next(iter(searched.values()))
        student = load_exported(first.path)
        if space is None:  # one build: every seed's student comes from the same space
            space = EfficientBertSupernet(student.config)
        entry.update(searched_latency_ms=first.latency_ms, baseline_latency_ms=next(iter(baseline.values())).latency_ms,
                     searched_arch=student.arch, searched_params=first.params, searched_layers=space.describe(student.arch),
                     baseline_layers=space.describe(load_exported(next(iter(baseline.values())).path).arch))
        seeds.append(entry)
        print(f"distill seed {seed}: searched {entry['searched']}, baseline {entry['baseline']}", flush=True)

    per_task = {key: paired_scores(np.stack(rows["searched"][key]), np.stack(rows["baseline"][key]),
                                   name_a="searched", name_b="baseline").to_dict() for key in weights}
    suite = paired_suite({k: np.stack(v) for k, v in rows["searched"].items()},
                         {k: np.stack(v) for k, v in rows["baseline"].items()}, weights,
                         name_a="searched", name_b="baseline").to_dict()
    total = sum(weights.values())
    teacher_avg = sum(weights[k] * teachers[k].dev_metric for k in weights) / total
    teacher_ms = teacher_latency_ms(each_task(cfg)[0][1])  # every task's teacher is the same model
    s_ms = statistics.median(s["searched_latency_ms"] for s in seeds)
    keeps = suite["score_a"] / teacher_avg if teacher_avg else None
    speedup = teacher_ms / s_ms if teacher_ms and s_ms else None
    targets = {"beats_baseline_on_average_p<0.05": bool(suite["diff"] > 0 and suite["p_value"] < 0.05),
               "keeps_95pct_teacher_average": bool(keeps is not None and keeps >= 0.95),
               "speedup_4x": bool(speedup is not None and speedup >= 4)}
    n_trials = len(cands)
    warmups = sum(1 for s in cfg.search.stages if s.warmup)
    data = {"reduced": bool(args.reduced), "medium": bool(args.medium), "machine": info, "load_end": load_now(),
            "command": "python bench/multitask.py " + " ".join(sys.argv[1:]), "experiment": experiment,
            "weights": weights, "teachers": {k: t.dev_metric for k, t in teachers.items()}, "teacher_average": teacher_avg,
            "teacher_latency_ms": teacher_ms, "searched_latency_ms": s_ms, "seeds": seeds, "paired_per_task": per_task,
            "paired_average": suite, "keeps_teacher_average": keeps, "speedup_vs_teacher": speedup,
            "cost": {"search_s": search_s, "candidates": n_trials, "task_scorings": n_trials * len(weights),
                     "warmups": warmups, "single_task_searches": {"searches": len(weights), "candidates":
                                                                  n_trials * len(weights), "warmups": warmups * len(weights)}},
            "budgets": {"stages": [dataclasses.asdict(s) for s in cfg.search.stages],
                        "distill": dataclasses.asdict(cfg.distill)},
            "targets": {**targets, "met": all(targets.values())}, "total_s": time.perf_counter() - started}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    label = ("REDUCED RUN (not the bench's figures): " if args.reduced
             else "MEDIUM RUN (budgets cut to fit one sitting on 2 cores): " if args.medium else "")
    md = [f"# {label}One searched student for {', '.join(weights)}: suite average vs the latency-matched baseline",
          "", f"- experiment {experiment}; {len(seeds)} distill seed(s); load at the start {info['loadavg']}, at the "
          f"end {data['load_end']}; total {data['total_s'] / 60:.0f} min",
          (f"- search: {n_trials} candidates in {search_s / 60:.0f} min, each scored on {len(weights)} tasks, {warmups} "
           f"warm-ups of the shared supernet (the {len(weights)} single-task searches it replaces: "
           f"{n_trials * len(weights)} candidates scored on one task each, {warmups * len(weights)} warm-ups)"
           if search_s is not None else f"- search: experiment {experiment} reused (--experiment); its cost is in the "
           "run that searched"),
          "- searched arch (first seed): " + _arch_text(seeds[0]["searched_layers"]) + "; baseline (first seed): " + _arch_text(seeds[0]["baseline_layers"]) + " "
          f"(latency, seeds' median: searched {s_ms:.2f} ms, baseline "
          f"{statistics.median(s['baseline_latency_ms'] for s in seeds):.2f} ms, as distill measured them)", "",
          "| task (weight) | teacher | baseline (mean over seeds) | searched | searched - baseline (95% CI, p) |",
          "|---|---:|---:|---:|---|"]
    for key in weights:
        r = per_task[key]
        md.append(f"| {key} ({weights[key]:g}) | {teachers[key].dev_metric:.4f} | {r['score_b']:.4f} | "
                  f"{r['score_a']:.4f} | {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], p {r['p_value']:.3g} |")
    md.append(f"| **average** | {teacher_avg:.4f} | {suite['score_b']:.4f} | {suite['score_a']:.4f} | "
              f"{suite['diff']:+.4f} [{suite['ci_low']:+.4f}, {suite['ci_high']:+.4f}], p {suite['p_value']:.3g} |")
    md += ["", f"Searched keeps {'n/a' if keeps is None else f'{100 * keeps:.1f}%'} of the teachers' average at "
           f"{'n/a' if speedup is None else f'{speedup:.2f}x'} lower latency ({s_ms:.2f} ms vs the teacher's "
           f"{teacher_ms if teacher_ms is None else f'{teacher_ms:.2f}'} ms, batch 1).",
           "", f"Targets: {', '.join(f'{k}: {v}' for k, v in targets.items())}."]
    dest.with_suffix(".md").write_text("\n".join(md) + "\n")
    _plot(data, dest.with_suffix(".png"))
    print("\n".join(md))
    return 0


def _arch_text(layers) -> str:
    """One line of a student's per-layer ``{expression, width, stack}`` (``describe`` of its space)."""
    from nni_effbert.search_spaces.supernet import REFERENCE_EXPRESSION

    exprs = {layer["expression"] for layer in layers}
    return (f"widths {'/'.join(str(layer['width']) for layer in layers)}, stacks "
            f"{'/'.join(str(layer['stack']) for layer in layers)}, "
            + (f"BERT's {REFERENCE_EXPRESSION} in every layer" if exprs == {REFERENCE_EXPRESSION}
               else "expressions " + "; ".join(layer["expression"] for layer in layers)))


def _plot(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(data["weights"]) + ["average"]
    rows = [data["paired_per_task"][t] for t in data["weights"]] + [data["paired_average"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, r in enumerate(rows):
        ax.errorbar([i], [r["diff"]], yerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]], fmt="o", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("searched - baseline (95% CI)")
    ax.set_title(("REDUCED: " if data["reduced"] else "MEDIUM: " if data.get("medium") else "") + "multi-task student vs latency-matched baseline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
