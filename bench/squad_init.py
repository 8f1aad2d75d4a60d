"""Issue 25 probe: does starting a span-QA student from the teacher's weights change what a short
task-KD distillation reaches?

    python bench/squad_init.py --from bench/work/pipeline_squad_medium --out bench/results/squad_init

The SQuAD MEDIUM run (``bench/squad.py --medium``) started its supernet from the teacher's
embeddings only (``warmup.init_embeddings: teacher``); its students stayed near F1 0.10 after 150
task-KD steps. This probe reuses that run's fine-tuned teacher, caches and tokenized data (linked,
nothing retrained) in its own work directory, slices the supernet from the teacher instead
(``warmup.init: teacher``, Taylor importance on ``--importance-batches`` batches, no warm-up step),
exports BERT's MLP at ``--width`` (stack 1) and distils it with the MEDIUM budget (0 general + 150
task-KD steps, batch 16) for each ``--seeds`` seed. Each seed is paired, question by question, with
the same arch distilled the same way from the MEDIUM run's searched supernet
(``exports/capacity-w<W>-s1-seed<S>``, or the latency-matched baseline's folder where the capacity
check reused it): a two-sided paired permutation test and a 95% bootstrap interval
(:func:`nni_effbert.stats.paired_scores`, rows = dev questions, seeds paired).

Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import link_shared, load_now, machine_info  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="work directory of a finished bench/squad.py run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "squad_init"))
    p.add_argument("--workdir", default=None, help="default: <--from>_init_teacher")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--importance-batches", type=int, default=20)
    args = p.parse_args()

    from nni_effbert.config import load_config
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.nas.warmup import run_warmup
    from nni_effbert.product.compare import dev_row_scores
    from nni_effbert.product.distill import distill_record, run_distill
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.students import export_trial_arch
    from nni_effbert.stats import paired_scores

    source = Path(args.source).resolve()
    effective = source / "bench_squad.yml"
    if not effective.is_file():
        p.error(f"{effective} is missing: --from must be the work directory of a bench/squad.py run")
    workdir = Path(args.workdir or f"{source}_init_teacher").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    link_shared(workdir, source)  # the fine-tuned teacher, its output caches and the tokenized data
    info, started = machine_info(), time.perf_counter()
    base = [f"workdir={workdir}", "warmup.init=teacher", f"warmup.importance_batches={args.importance_batches}"]
    cfg = load_config(effective, base)
    setup = KDSetup.from_config(cfg, progress=False)
    warm = run_warmup(cfg, 0, steps=0, general_steps=0, setup=setup)  # the teacher's slice, no KD step
    arch = setup.space.bert_arch(width=args.width, stack=1)
    runs = []
    for seed in args.seeds:
        scfg = load_config(effective, [*base, f"distill.seed={seed}"])
        name = f"bert-w{args.width}-s1-init-teacher-seed{seed}"
        folder = setup.workdir.export_dir(name)
        if not folder.is_dir():
            export_trial_arch(scfg, arch, 0, name, extra={"probe": "warmup.init: teacher"},
                              evaluator=KDEvaluator(scfg, setup=setup))
        result = run_distill(scfg, folder, setup=setup)
        record = distill_record(load_exported(folder).meta) or {}
        reference = source / "exports" / f"capacity-w{args.width}-s1-seed{seed}"
        if not reference.is_dir():  # the capacity check reuses the latency-matched baseline at its width
            reference = source / "exports" / f"baseline-lat-seed{seed}"
        ref = load_exported(reference) if reference.is_dir() else None
        if ref is None or ref.arch != arch:
            p.error(f"no export of BERT's MLP at width {args.width} (stack 1, seed {seed}) in {source}/exports")
        ref_record = distill_record(ref.meta) or {}
        runs.append({"seed": seed, "folder": str(folder), "reference": str(reference),
                     "reference_stage": (ref.meta.get("extra") or {}).get("supernet_stage"),
                     "before_f1": result.before, "f1": result.dev_metric,
                     "exact": (record.get("dev_scores") or {}).get("exact"),
                     "reference_before_f1": ref_record.get("before"), "reference_f1": ref_record.get("dev_metric"),
                     "reference_exact": (ref_record.get("dev_scores") or {}).get("exact"),
                     "rows": dev_row_scores(setup, folder), "reference_rows": dev_row_scores(setup, reference)})
        print(f"seed {seed}: init teacher F1 {result.before:.4f} -> {result.dev_metric:.4f}; MEDIUM supernet "
              f"F1 {ref_record.get('before'):.4f} -> {ref_record.get('dev_metric'):.4f}", flush=True)
    test = paired_scores([r["rows"] for r in runs], [r["reference_rows"] for r in runs],
                         name_a="init teacher", name_b="MEDIUM supernet").to_dict()
    teacher = setup.teacher_marker.get("dev_scores", {}).get("dev", {})
    data = {"command": "python bench/squad_init.py " + " ".join(sys.argv[1:]), "machine": info, "load_end": load_now(),
            "workdir": str(workdir), "source": str(source), "width": args.width,
            "importance_batches": args.importance_batches, "warmup_init": warm.init,
            "budget": {"general_steps": cfg.distill.general_steps, "task_steps": cfg.distill.task_steps,
                       "batch_size": cfg.distill.batch_size},
            "teacher": teacher, "runs": [{k: v for k, v in r.items() if not k.endswith("rows")} for r in runs],
            "paired": test, "total_s": time.perf_counter() - started}
    stage = runs[0]["reference_stage"]
    src_cfg = load_config(effective)
    warm_steps = [(st.warmup_steps or 0, st.general_warmup_steps or 0) for st in src_cfg.search.stages[:int(stage or 0) + 1]]
    reference_start = (f"the searched run's stage-{stage} supernet (teacher embeddings; warm-ups of "
                       f"{' + '.join(str(a) for a, _ in warm_steps)} task-KD and {sum(b for _, b in warm_steps)} "
                       "general-KD steps over the stages)")
    data["reference_start"] = reference_start
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    md = ["# SQuAD v1.1 students: supernet from the teacher's weights vs the MEDIUM search's supernet", "",
          f"Command: `{data['command']}`; BERT's MLP at width {args.width}, stack 1; each distilled with "
          f"{cfg.distill.general_steps} general + {cfg.distill.task_steps} task-KD steps of {cfg.distill.batch_size} "
          f"windows; dev EM / F1 on {len(setup.task.examples['dev'])} questions of part a. Teacher: EM "
          f"{teacher.get('exact', float('nan')):.4f} / F1 {teacher.get('f1', float('nan')):.4f}. Load average at the "
          f"start {info['loadavg']}, at the end {data['load_end']}; {data['total_s'] / 60:.0f} min.", "",
          "| distill seed | start | F1 before task KD | EM / F1 after |", "|---:|---|---:|---:|"]
    for r in runs:
        md.append(f"| {r['seed']} | teacher's weights (`warmup.init: teacher`, {args.importance_batches} importance "
                  f"batches, no warm-up) | {r['before_f1']:.4f} | {r['exact']:.4f} / {r['f1']:.4f} |")
        md.append(f"| {r['seed']} | {reference_start} | "
                  f"{r['reference_before_f1']:.4f} | {r['reference_exact']:.4f} / {r['reference_f1']:.4f} |")
    md += ["", f"Paired over {test['n_rows']} questions x {len(runs)} seed(s): init teacher - MEDIUM supernet F1 "
           f"{test['diff']:+.4f}, 95% CI [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}], two-sided permutation "
           f"p = {test['p_value']:.3g}."]
    dest.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
