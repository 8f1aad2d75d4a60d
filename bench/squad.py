"""Issue 25 bench: span question answering (SQuAD v1.1) end to end, searched student vs the
latency-matched BERT-MLP baseline, plus an MLP capacity check.

    python bench/squad.py --out bench/results/squad                       # full size (long: hours)
    python bench/squad.py --reduced --out bench/results/squad_reduced     # minutes, labelled REDUCED

1. The MiniLM teacher fine-tuned for QA on part b of the official dev set (its search split held
   out by article); EM / F1 on part a (``bench/configs/pipeline_squad.yml``).
2. The whole pipeline (:func:`nni_effbert.product.quickstart.run_pipeline`: nnictl search of
   10 + 6 + 8 candidates in 3 stages) under ``search.latency_budget_ms`` = the BERT-MLP
   baseline's predicted latency +-5% (seq 384), or ``--speedup X``.
3. The searched student and the latency-matched baseline, each distilled with ``--distill-seeds``
   seeds and scored on part a; per-question F1 of every student and seed.
4. A paired test over questions, seeds paired: per question, the mean over seeds of searched F1
   minus baseline F1; ``scipy.stats.permutation_test`` (sign flips, two-sided) and a 95% bootstrap
   interval of the mean difference (``scipy.stats.bootstrap``).
5. Capacity check: BERT's MLP at widths 1/4, 1/2 and 1 of the ffn hidden size (stack 1) and at
   width 1/2 with stack 2, exported from the same supernet stage and distilled the same way.

Writes ``<out>.json`` (machine info and load, budgets, every score), ``<out>.md`` and ``<out>.png``.
**Targets:** the searched student keeps >= 90% of the teacher's F1 at >= 3x lower CPU latency
(seq 384), and beats the latency-matched baseline with p < 0.05; if not, the capacity check's
effect sizes and intervals say why.

``--reduced`` shrinks everything to minutes (few questions, windows of 128, 2 + 2 + 2 trials, short
warm-ups and distillation, a tiny student); its figures do not measure the targets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent

REDUCED = ["task.max_train_rows=240", "task.max_dev_rows=120", "task.search_rows=60", "task.max_seq_length=128",
           "task.doc_stride=48", "teacher.finetune.max_steps=30", "teacher.finetune.batch_size=8",
           "student.preset=tiny", "warmup.steps=10", "warmup.batch_size=8", "evaluator.train_steps=4",
           "evaluator.eval_interval=4", "evaluator.batch_size=8", "evaluator.latency_repeats=2",
           "evaluator.latency_seq_length=128", "distill.general_steps=4", "distill.task_steps=8",
           "distill.batch_size=8", "distill.eval_interval=0",
           "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 10}, {name: expression, kind: "
           "expression, trials: 2, warmup_steps: 10}, {name: size, kind: size, trials: 2, warmup_steps: 10, "
           "general_warmup_steps: 4, train_steps: 0}]"]

#: A run sized for one sitting on the 2-core machine (about 1 h 45 min): 2,800 questions of part b
#: (about 300 of them, whole articles, held out for the search), 1,500 questions of part a for EM / F1,
#: 24 candidates with 20-step KD fine-tunes and short warm-ups, 150 task-KD steps per distillation.
#: Windows, stride and latency stay at 384 / 128 as run_qa. Labelled MEDIUM in the results.
MEDIUM = ["task.max_train_rows=2800", "task.max_dev_rows=1500", "task.search_rows=300", "warmup.steps=100",
          "evaluator.train_steps=20", "evaluator.eval_interval=20", "distill.general_steps=0",
          "distill.task_steps=150", "distill.eval_interval=0",
          "search.stages=[{name: coarse, kind: joint, trials: 10, warmup_steps: 100}, {name: expression, kind: "
          "expression, trials: 6, warmup_steps: 50}, {name: size, kind: size, trials: 8, warmup_steps: 50, "
          "general_warmup_steps: 25, train_steps: 0}]"]


def per_question_f1(folder, setup):
    """``{question id: F1}`` of an exported (distilled) student on the dev questions (the v2.0 null
    threshold tuned on the search split, never dev), as its dev F1 scores them."""
    from nni_effbert.product.compare import dev_row_scores

    qids = [ex["id"] for ex in setup.task.examples["dev"]]
    return dict(zip(qids, dev_row_scores(setup, folder).tolist()))


def paired_test(searched, baseline):
    """Searched minus baseline over questions (each a mean over the paired seeds): mean, 95% CI, p."""
    import numpy as np
    from scipy import stats

    qids = sorted(searched[0])
    s = np.array([[run[q] for q in qids] for run in searched]).mean(0)
    b = np.array([[run[q] for q in qids] for run in baseline]).mean(0)
    d = s - b
    if not np.any(d):
        return {"mean_diff": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "questions": len(qids)}
    perm = stats.permutation_test((s, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                  alternative="two-sided", n_resamples=9999, random_state=0)
    boot = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9999, random_state=0)
    return {"mean_diff": float(d.mean()), "ci95": [float(boot.confidence_interval.low),
                                                  float(boot.confidence_interval.high)],
            "p_value": float(perm.pvalue), "questions": len(qids)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "pipeline_squad.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default=str(HERE / "results" / "squad"))
    p.add_argument("--workdir", default=None, help="default: the config's (+ '_reduced')")
    p.add_argument("--speedup", type=float, default=None, help="search.speedup=X instead of the baseline's latency")
    p.add_argument("--distill-seeds", type=int, default=3)
    p.add_argument("--port", type=int, default=None)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="a short run (labelled REDUCED); not the bench's figures")
    size.add_argument("--medium", action="store_true", help="a run that fits one sitting on 2 cores (labelled MEDIUM)")
    p.add_argument("--experiment", metavar="ID", help="reuse this finished search in the work directory")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity check")
    args = p.parse_args()
    if args.distill_seeds < 1:
        p.error("--distill-seeds must be >= 1")

    import yaml

    from nni_effbert.config import apply_overrides, load_config
    from nni_effbert.latency.settings import latency_settings
    from nni_effbert.latency.table import table_for_config
    from nni_effbert.latency.measure import measure_latency
    from nni_effbert.kd.teacher import load_teacher, prepare_teacher
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.product.baselines import ensure_latency_baseline
    from nni_effbert.product.distill import run_distill
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.quickstart import run_pipeline
    from nni_effbert.product.students import export_best, export_trial_arch
    from nni_effbert.search_spaces.supernet import EfficientBertSupernet

    overrides = [*(REDUCED if args.reduced else MEDIUM if args.medium else []), *args.set]
    base_cfg = load_config(args.config, overrides)
    workdir = args.workdir or (base_cfg.workdir + ("_reduced" if args.reduced else "_medium" if args.medium else ""))
    overrides.append(f"workdir={workdir}")
    cfg = load_config(args.config, overrides)
    settings = latency_settings(cfg)
    table = table_for_config(cfg)
    space = EfficientBertSupernet.preset(cfg.student.preset, **dict(cfg.student.overrides))
    full = max(space.config.widths)
    b_ms = table.predict(space.bert_arch(width=full, stack=1))
    budget = ([f"search.speedup={args.speedup}"] if args.speedup is not None
              else [f"search.latency_budget_ms=[{0.95 * b_ms:.4f}, {1.05 * b_ms:.4f}]"])
    overrides += budget
    print(f"baseline (BERT MLP, width {full}, stack 1) predicted {b_ms:.3f} ms at seq {settings.seq_length}; "
          f"{budget[0]}", flush=True)

    raw = yaml.safe_load(Path(args.config).read_text())
    apply_overrides(raw, overrides)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    effective = Path(workdir) / "bench_squad.yml"
    effective.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(effective)

    info = machine_info()
    started = time.perf_counter()
    pipeline_timings = {}
    if args.experiment:
        experiment = args.experiment
    else:  # the bench distils per seed itself: the pipeline stops after the search
        result = run_pipeline(cfg, effective, port=args.port, search_only=True)
        experiment, pipeline_timings = result.experiment_id, dict(result.timings)
    setup = KDSetup.from_config(cfg, progress=False)
    teacher_scores = setup.teacher_marker.get("dev_scores", {}).get("dev", {})
    teacher_model = prepare_teacher(load_teacher(str(setup.teacher_dir))[0]).cpu()
    teacher_ms = measure_latency(teacher_model, seq_length=settings.seq_length, repeats=int(cfg.evaluator.latency_repeats),
                                 threads=settings.threads).median_ms
    del teacher_model

    seeds, matched, stage = [], None, None
    per_q = {"searched": [], "baseline": []}
    for k in range(args.distill_seeds):
        seed = int(cfg.distill.seed if cfg.distill.seed is not None else cfg.seed) + k
        scfg = load_config(effective, [f"distill.seed={seed}"])
        folder, stage = _searched_export(experiment, f"searched-seed{seed}", setup,
                                         lambda: export_best(scfg, experiment, name=f"searched-seed{seed}",
                                                             evaluator=KDEvaluator(scfg, setup=setup)))
        searched = run_distill(scfg, folder, setup=setup)
        base, matched = ensure_latency_baseline(scfg, folder, name=f"baseline-lat-seed{seed}", setup=setup,
                                                choice=matched)
        per_q["searched"].append(per_question_f1(folder, setup))
        per_q["baseline"].append(per_question_f1(base.path, setup))
        seeds.append({"seed": seed, "searched_f1": searched.dev_metric, "baseline_f1": base.dev_metric,
                      "searched_em": _em(folder), "baseline_em": _em(base.path),
                      "searched_before_f1": searched.before, "baseline_before_f1": base.before,
                      "searched_dir": str(folder),
                      "baseline_dir": str(base.path), "baseline_width": matched.width})
        print(f"distill seed {seed}: searched F1 {searched.dev_metric:.4f}, latency-matched baseline (width "
              f"{matched.width}) {base.dev_metric:.4f}", flush=True)
    s_ms = measure_latency(load_exported(seeds[0]["searched_dir"]).model, seq_length=settings.seq_length,
                           repeats=int(cfg.evaluator.latency_repeats), threads=settings.threads).median_ms
    test = paired_test(per_q["searched"], per_q["baseline"])

    capacity = []
    if not args.no_capacity:
        variants = [("width 1/4", 0.25, 1), ("width 1/2", 0.5, 1), ("width 1", 1.0, 1), ("width 1/2, stack 2", 0.5, 2)]
        for label, ratio, stack in variants:
            width = min(space.config.widths, key=lambda w: abs(w - ratio * space.config.intermediate_size))
            arch = space.bert_arch(width=width, stack=stack)
            if stack == 1 and width == matched.width:
                # The latency-matched baseline is this very student (same arch, supernet stage,
                # distill seeds and budget): its runs are reused, not distilled a second time.
                capacity.append({"variant": label, "width": width, "stack": stack, "same_as": "latency-matched baseline",
                                 "f1": [r["baseline_f1"] for r in seeds], "before_f1": seeds[0]["baseline_before_f1"],
                                 "params": int(space.count_params(arch)), "vs_latency_baseline": None})
                continue
            scores, runs, before = [], [], None
            for k in range(args.distill_seeds):
                seed = int(cfg.distill.seed if cfg.distill.seed is not None else cfg.seed) + k
                scfg = load_config(effective, [f"distill.seed={seed}"])
                name = f"capacity-w{width}-s{stack}-seed{seed}"
                # The same supernet stage of the same experiment the searched student came from.
                out = export_trial_arch(scfg, arch, stage, name, extra={"capacity_check": label},
                                        evaluator=KDEvaluator(scfg, setup=setup, experiment=experiment))
                result = run_distill(scfg, out.path, setup=setup)
                scores.append(result.dev_metric)
                before = result.before if before is None else before  # the same export for every seed
                runs.append(per_question_f1(out.path, setup))
            vs_full = paired_test(runs, per_q["baseline"]) if runs else None
            capacity.append({"variant": label, "width": width, "stack": stack, "f1": scores, "before_f1": before,
                             "params": int(space.count_params(arch)), "vs_latency_baseline": vs_full})
            print(f"capacity {label} (width {width}): F1 {scores}", flush=True)

    s_f1 = [r["searched_f1"] for r in seeds]
    t_f1 = teacher_scores.get("f1", setup.teacher_marker.get("dev_metric"))
    keeps = statistics.mean(s_f1) / t_f1 if t_f1 else None
    speedup = teacher_ms / s_ms if s_ms else None
    targets = {"keeps_90pct_teacher_f1": bool(keeps is not None and keeps >= 0.9),
               "speedup_3x_seq384": bool(speedup is not None and speedup >= 3 and settings.seq_length == 384),
               "beats_latency_baseline_p<0.05": bool(test["p_value"] < 0.05)}
    data = {"reduced": bool(args.reduced), "medium": bool(args.medium), "timings_s": pipeline_timings, "machine": info, "load_end": load_now(),
            "command": "python bench/squad.py " + " ".join(sys.argv[1:]), "budget": budget[0],
            "baseline_predicted_ms": b_ms, "experiment": experiment, "teacher": {"dev": teacher_scores,
            "latency_ms": teacher_ms}, "seeds": seeds, "searched_latency_ms": s_ms, "paired_test": test,
            "capacity": capacity, "keeps_teacher_f1": keeps, "speedup_vs_teacher": speedup,
            "budgets": {"distill": {"general_steps": cfg.distill.general_steps, "task_steps": cfg.distill.task_steps,
                                    "batch_size": cfg.distill.batch_size},
                        "search_stages": [s.name for s in cfg.search.stages], "train_questions": len(setup.task.examples["train"]),
                        "search_questions": len(setup.task.examples["search"]), "dev_questions": len(setup.task.examples["dev"])},
            "targets": {**targets, "met": all(targets.values())}, "total_s": time.perf_counter() - started}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    label = ("REDUCED RUN (not the bench's figures): " if args.reduced
             else "MEDIUM RUN (budgets cut to fit one sitting on 2 cores): " if args.medium else "")
    md = [f"# {label}SQuAD v1.1: searched student vs the latency-matched BERT-MLP baseline", "",
          f"- train on part b ({data['budgets']['train_questions']} questions; {data['budgets']['search_questions']} "
          f"held out by article for the search), EM / F1 on part a ({data['budgets']['dev_questions']} questions)",
          f"- {budget[0]}; experiment {experiment}; load average at the start {info.get('loadavg')}, at the end "
          f"{data['load_end']}",
          f"- budgets: teacher {cfg.teacher.finetune.epochs} epochs; search {len(cfg.search.stages)} stages, "
          f"{sum(s.trials for s in cfg.search.stages)} candidates, {cfg.evaluator.train_steps}-step KD fine-tunes; distillation "
          f"{cfg.distill.general_steps} general + {cfg.distill.task_steps} task KD steps of {cfg.distill.batch_size} "
          f"windows per student and seed; total {data['total_s'] / 60:.0f} min",
          f"- teacher: EM {teacher_scores.get('exact', float('nan')):.4f} / F1 {t_f1:.4f}, {teacher_ms:.1f} ms "
          f"at seq {settings.seq_length}", "",
          "| distill seed | baseline EM / F1 | searched EM / F1 |", "|---:|---:|---:|"]
    md += [f"| {r['seed']} | {r['baseline_em']:.4f} / {r['baseline_f1']:.4f} | {r['searched_em']:.4f} / "
           f"{r['searched_f1']:.4f} |" for r in seeds]
    md += ["", f"F1 before task KD (the students as sliced from the supernet): searched "
           f"{_fmt(seeds[0]['searched_before_f1'])}, baseline {_fmt(seeds[0]['baseline_before_f1'])}."]
    md += ["", f"Searched keeps {keeps if keeps is None else f'{100 * keeps:.1f}%'} of the teacher's F1 at "
           f"{speedup if speedup is None else f'{speedup:.2f}x'} lower latency ({s_ms:.1f} ms). Paired over "
           f"{test['questions']} questions (seeds averaged): searched - baseline F1 {test['mean_diff']:+.4f}, 95% CI "
           f"[{test['ci95'][0]:+.4f}, {test['ci95'][1]:+.4f}], permutation p = {test['p_value']:.3g}.", ""]
    if capacity:
        md += ["| capacity check (BERT MLP) | params | F1 before task KD | F1 per seed | mean ± std | vs latency-matched "
               "baseline (mean, 95% CI, p) |", "|---|---:|---:|---|---:|---|"]
        for c in capacity:
            v = c["vs_latency_baseline"]
            versus = ("is that baseline" if v is None else
                      f"{v['mean_diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], p {v['p_value']:.3g}")
            spread = f"{statistics.mean(c['f1']):.4f} ± {statistics.stdev(c['f1']) if len(c['f1']) > 1 else 0:.4f}"
            md.append(f"| {c['variant']} (width {c['width']}) | {c['params']:,} | {_fmt(c.get('before_f1'))} | "
                      f"{', '.join(f'{x:.4f}' for x in c['f1'])} | {spread} | {versus} |")
    md += ["", f"Targets: {', '.join(f'{k}: {v}' for k, v in targets.items())}."]
    dest.with_suffix(".md").write_text("\n".join(md) + "\n")
    _plot(data, dest.with_suffix(".png"))
    print("\n".join(md))
    return 0


def _searched_export(experiment, name, setup, export):
    """The folder and supernet stage of ``exports/<name>``: a rerun on the same search (``--experiment``)
    reads back the export (and distillation) an earlier run of it left; otherwise ``export()``."""
    from nni_effbert.product.loader import load_exported

    folder = setup.workdir.export_dir(name)
    if folder.is_dir():
        extra = load_exported(folder).meta.get("extra") or {}
        if extra.get("experiment") == experiment and extra.get("source") == "experiment":
            print(f"reusing {folder} (exported from experiment {experiment}, stage {extra.get('supernet_stage')})",
                  flush=True)
            return folder, extra.get("supernet_stage")
    exp = export()  # an export of another search is refused by export_best (ExportExistsError)
    return exp.path, exp.trial.get("stage")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _em(folder) -> float:
    from nni_effbert.product.distill import distill_record
    from nni_effbert.product.loader import load_exported

    record = distill_record(load_exported(folder).meta) or {}
    return float((record.get("dev_scores") or {}).get("exact", float("nan")))


def _plot(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["baseline (lat.)", "searched"] + [c["variant"] for c in data["capacity"]]
    values = [[r["baseline_f1"] for r in data["seeds"]], [r["searched_f1"] for r in data["seeds"]]]
    values += [c["f1"] for c in data["capacity"]]
    for i, vals in enumerate(values):
        ax.scatter([i] * len(vals), vals, s=18)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("dev F1 (part a)")
    ax.set_title(("REDUCED: " if data["reduced"] else "MEDIUM: " if data.get("medium") else "") + "SQuAD v1.1 students, one dot per distill seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
