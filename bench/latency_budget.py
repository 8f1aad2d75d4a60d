"""Issue 14 bench: the pipeline searched under a latency budget, against the latency-matched
BERT-MLP baseline.

    python bench/latency_budget.py --out bench/results/latency_budget          # full size (long)
    python bench/latency_budget.py --reduced --out bench/results/latency_budget_reduced

1. Builds the latency table of ``bench/configs/pipeline_sst2.yml`` (quickstart preset, CPU,
   1 thread, batch 1, seq 128) and predicts the latency ``b`` of the hand-designed baseline
   (BERT's MLP, stack 1, at the largest width, the previous bench's baseline).
2. Runs the whole pipeline (:func:`nni_effbert.product.quickstart.run_pipeline`) with
   ``search.latency_budget_ms = [0.95 b, 1.05 b]`` (equal latency, +-5%), or with
   ``--speedup X`` as ``search.speedup`` instead.
3. Distils the searched trial and the latency-matched baseline
   (:func:`nni_effbert.product.baselines.ensure_latency_baseline`) with ``--distill-seeds`` seeds of
   ``distill.seed`` (fresh exports of the same two archs each time) and measures both students'
   latency interleaved, in this process.

The pipeline stops after the search (``run_pipeline(search_only=True)``): its own distillation
and report would only repeat step 3 with one seed.

Writes ``<out>.json`` with ``searched_dev`` and ``baseline_dev`` (lists over the same distill
seeds), ``searched_latency_ms``, ``baseline_latency_ms`` (medians), ``comparisons`` (searched vs
baseline and the teacher vs each: paired over the held-out rows x the distill seeds, 95% bootstrap
interval and two-sided permutation p, :mod:`nni_effbert.product.compare`), ``p_value`` (that of
searched - baseline) and the verdicts, and ``<out>.md``. **Targets:** at equal latency (+-5%) the
searched student is ahead with p < 0.05, or it matches the baseline's accuracy (the interval's
lower end above -0.5 points) at >= 1.25x lower latency.

``--reduced`` shrinks the run to minutes (2,000 train rows, 3 + 2 + 3 trials, short warm-ups and
distillation) and says so in every output: its figures do not measure the target.
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

REDUCED = ["task.max_train_rows=2000", "teacher.finetune.max_steps=60", "warmup.steps=60",
           "evaluator.train_steps=20", "evaluator.eval_interval=20", "distill.general_steps=40",
           "distill.task_steps=60", "distill.eval_interval=0",
           "search.stages=[{name: coarse, kind: joint, trials: 3}, {name: expression, kind: expression, trials: 2},"
           " {name: size, kind: size, trials: 3, general_warmup_steps: 20, train_steps: 0}]"]


def interleaved_latency(folders, settings, rounds=5, repeats=8):
    """Median latency (ms) of each exported student, measured round-robin."""
    from nni_effbert.latency.measure import measure_interleaved, pooled_median
    from nni_effbert.product.loader import load_exported

    models = {i: load_exported(f).model for i, f in enumerate(folders)}
    results = measure_interleaved(models, rounds=rounds, seq_length=settings.seq_length,
                                  batch_size=settings.batch_size, repeats=repeats, threads=settings.threads)
    return [pooled_median(results[i]) for i in range(len(folders))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "pipeline_sst2.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default=str(HERE / "results" / "latency_budget"))
    p.add_argument("--workdir", default=None, help="default: the config's, + '_latency' (+ '_reduced')")
    p.add_argument("--speedup", type=float, default=None, help="use search.speedup=X instead of the baseline's latency")
    p.add_argument("--distill-seeds", type=int, default=3)
    p.add_argument("--baseline", choices=["matched", "reference"], default="matched",
                   help="matched: BERT's MLP at the width of the searched student's latency (default; when that is "
                   "the searched arch itself, the reference is taken instead); reference: the arch whose latency "
                   "set the budget (BERT's MLP, stack 1, full width)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--reduced", action="store_true", help="a short run (labelled REDUCED); not the bench's figures")
    p.add_argument("--experiment", metavar="ID", help="take the search of this finished experiment in the work "
                   "directory (run by an earlier call) instead of running the pipeline again; the pipeline's own "
                   "distillation and report are skipped, the distill seeds below are what is compared")
    args = p.parse_args()
    if args.distill_seeds < 1:
        p.error("--distill-seeds must be >= 1")

    import numpy as np

    from nni_effbert.config import load_config
    from nni_effbert.latency import settings as lts
    from nni_effbert.latency import table as lt
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.product.baselines import LatencyBaselineChoice, choose_latency_baseline, ensure_latency_baseline
    from nni_effbert.product.compare import compare_predictions, dev_predictions
    from nni_effbert.stats import format_paired_table
    from nni_effbert.product.distill import run_distill
    from nni_effbert.product.quickstart import run_pipeline
    from nni_effbert.product.students import export_best
    from nni_effbert.search_spaces import EfficientBertSpace

    overrides = [*(REDUCED if args.reduced else []), *args.set]
    base_cfg = load_config(args.config, overrides)
    workdir = args.workdir or (base_cfg.workdir + "_latency" + ("_reduced" if args.reduced else ""))
    overrides.append(f"workdir={workdir}")
    cfg = load_config(args.config, overrides)
    settings = lts.latency_settings(cfg)
    table = lt.table_for_config(cfg)
    space = EfficientBertSpace.preset(cfg.student.preset, **dict(cfg.student.overrides))
    reference_arch = space.bert_arch(width=max(space.config.widths), stack=1)
    b_ms = table.predict(reference_arch)
    if args.speedup is not None:
        budget = [f"search.speedup={args.speedup}"]
    else:
        budget = [f"search.latency_budget_ms=[{0.95 * b_ms:.4f}, {1.05 * b_ms:.4f}]"]
    overrides += budget
    print(f"baseline (BERT MLP, width {max(space.config.widths)}, stack 1) predicted {b_ms:.3f} ms; {budget[0]}",
          flush=True)

    # Saved with absolute paths: the config's relative ones would resolve against the work directory.
    Path(workdir).mkdir(parents=True, exist_ok=True)
    effective = Path(workdir) / "bench_latency_budget.yml"
    load_config(args.config, overrides).save(effective)
    cfg = load_config(effective)

    info = machine_info()
    started = time.perf_counter()
    if args.experiment:
        experiment = args.experiment
    else:
        experiment = run_pipeline(cfg, effective, port=args.port, search_only=True).experiment_id
    setup = KDSetup.from_config(cfg, progress=False)
    seeds, matched, baseline_note, searched_arch = [], None, None, None
    predictions = {"teacher": dev_predictions(setup, "teacher"), "searched": [], "baseline": []}
    for k in range(args.distill_seeds):
        seed = int(cfg.distill.seed if cfg.distill.seed is not None else cfg.seed) + k
        scfg = load_config(effective, [f"distill.seed={seed}"])
        exp = export_best(scfg, experiment, name=f"searched-lat-seed{seed}",
                          evaluator=KDEvaluator(scfg, setup=setup), force=True)  # afresh on purpose
        searched = run_distill(scfg, exp.path, setup=setup)
        if matched is None:  # one baseline for all seeds (chosen on the first): the seeds pair the same two archs
            searched_arch = dict(exp.arch)
            if args.baseline == "matched":
                matched = choose_latency_baseline(scfg, exp.path, name=f"baseline-lat-seed{seed}", setup=setup)
                if matched.arch == searched_arch:
                    baseline_note = (f"the latency-matched BERT MLP (width {matched.width}, stack 1) is the searched "
                                     "arch itself; compared with the budget's reference instead")
                    print(baseline_note, flush=True)
            if args.baseline == "reference" or baseline_note:
                matched = LatencyBaselineChoice(arch=reference_arch, width=max(space.config.widths),
                                                predicted_ms=float(b_ms),
                                                target_predicted_ms=float(table.predict(searched_arch)))
        base, matched = ensure_latency_baseline(scfg, exp.path, name=f"baseline-lat-seed{seed}", setup=setup,
                                                choice=matched)
        seeds.append({"seed": seed, "searched": searched.dev_metric, "baseline": base.dev_metric,
                      "searched_dir": str(exp.path), "baseline_dir": str(base.path), "baseline_width": matched.width})
        print(f"distill seed {seed}: searched {searched.dev_metric:.4f}, baseline "
              f"(width {matched.width}) {base.dev_metric:.4f}", flush=True)
        predictions["searched"].append(dev_predictions(setup, exp.path))
        predictions["baseline"].append(dev_predictions(setup, base.path))
    searched_layers = space.describe(searched_arch)
    s_ms, b_meas = interleaved_latency([seeds[0]["searched_dir"], seeds[0]["baseline_dir"]], settings)
    s_dev = [r["searched"] for r in seeds]
    b_dev = [r["baseline"] for r in seeds]
    diff = [a - b for a, b in zip(s_dev, b_dev)]
    for name in ("searched", "baseline"):
        predictions[name] = np.stack(predictions[name])
    comparisons = compare_predictions(predictions, np.asarray(setup.task.dev["labels"]), setup.task.spec.metric,
                                      [("searched", "baseline"), ("teacher", "searched"), ("teacher", "baseline")])
    versus = comparisons[0]
    p_value = float(versus.p_value)
    ratio = b_meas / s_ms
    equal = abs(s_ms - b_meas) <= 0.05 * b_meas
    ahead = equal and versus.diff > 0 and p_value < 0.05
    faster = ratio >= 1.25 and versus.ci_low >= -0.005
    data = {"reduced": bool(args.reduced), "machine": info, "load_end": load_now(), "command":
            "python bench/latency_budget.py " + " ".join(sys.argv[1:]), "budget": budget[0],
            "baseline_predicted_ms": b_ms, "experiment": experiment, "seeds": seeds,
            "searched_dev": s_dev, "baseline_dev": b_dev, "searched_latency_ms": s_ms, "baseline_latency_ms": b_meas,
            "baseline": {"kind": "reference" if args.baseline == "reference" or baseline_note else "matched",
                         "width": matched.width,
                         "predicted_ms": matched.predicted_ms, "note": baseline_note},
            "searched_arch": searched_arch, "searched_layers": searched_layers,
            "comparisons": [c.to_dict() for c in comparisons], "p_value": p_value, "total_s": time.perf_counter() - started,
            "targets": {"ahead_at_equal_latency_p<0.05": ahead, "matches_at_1.25x_lower_latency": faster,
                        "met": bool(ahead or faster)}}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    label = "REDUCED RUN (not the bench's figures): " if args.reduced else ""
    md = [f"# {label}Search under a latency budget vs the latency-matched BERT-MLP baseline", "",
          f"- {budget[0]}; the budget's reference (BERT MLP, width {max(space.config.widths)}, stack 1) predicted "
          f"{b_ms:.3f} ms; experiment {experiment}",
          "- searched: " + "; ".join(f"{la['expression']} w{la['width']} s{la['stack']}" for la in searched_layers)
          + f", predicted {table.predict(searched_arch):.3f} ms",
          f"- baseline: BERT MLP, width {matched.width}, stack 1, predicted {matched.predicted_ms:.3f} ms"
          + (f" ({baseline_note})" if baseline_note else ""),
          f"- distillation per student and seed: {cfg.distill.general_steps} general + {cfg.distill.task_steps} task "
          f"KD steps (batch {cfg.distill.batch_size}); the search "
          + (f"ran in an earlier call (`--experiment {experiment}`); this call's wall time covers the distillations"
             if args.experiment else "ran in this call"),
          f"- load average at the end {data['load_end']} (2 shared cores); {data['total_s'] / 60:.1f} min wall", "",
          "| distill seed | baseline | searched | searched - baseline |", "|---:|---:|---:|---:|"]
    md += [f"| {r['seed']} | {r['baseline']:.4f} | {r['searched']:.4f} | {r['searched'] - r['baseline']:+.4f} |"
           for r in seeds]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    md += [f"| mean ± std | {statistics.mean(b_dev):.4f} ± {sd(b_dev):.4f} | {statistics.mean(s_dev):.4f} ± "
           f"{sd(s_dev):.4f} | {statistics.mean(diff):+.4f} |", "",
           f"Latency (median, interleaved): searched {s_ms:.3f} ms, baseline {b_meas:.3f} ms ({ratio:.2f}x); "
           f"target {'met' if data['targets']['met'] else 'missed'}.", "",
           "Paired over the held-out rows x the distill seeds (95% bootstrap interval, two-sided permutation p):", "",
           format_paired_table(comparisons, setup.task.spec.metric)]
    dest.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
