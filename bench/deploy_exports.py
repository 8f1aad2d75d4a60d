"""Issue 29 bench, for students already distilled: accuracy and latency of the teacher and of named
exports in PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8, any task kind (span QA included).

    python bench/deploy_exports.py --config bench/work/pipeline_squad_medium/bench_squad.yml \\
        --model searched=searched-seed0,searched-seed1,searched-seed2 \\
        --model baseline=baseline-lat-seed0,baseline-lat-seed1,baseline-lat-seed2 --out bench/results/deploy_squad

``bench/deploy.py`` runs a search (and a second one under the int8 runtime) first; this one takes a
finished run's work directory (e.g. ``bench/squad.py``'s, whose distillations took an hour) and
measures only where its models deploy:

1. The teacher and every named export (one folder per distill seed) to ONNX and int8 ONNX
   (:mod:`nni_effbert.product.onnx`), each checked against PyTorch on dev rows.
2. Dev metric in each runtime, per distill seed (mean ± std over seeds): PyTorch fp32 from the
   distill record (the teacher's from its fine-tune), ONNX Runtime fp32 and int8 scored as the
   PyTorch students were (span QA: windows, n-best and official F1,
   :func:`~nni_effbert.product.onnx.evaluate_onnx_span`).
3. Latency of each model (its first seed's folder: the seeds share the arch) in each runtime,
   one thread, at the config's ``evaluator.latency_seq_length``, batch 1 and 8, medians of
   interleaved rounds over every (model, runtime) pair.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``. Targets (issue 29): the best student in ONNX
Runtime int8 keeps >= 97% of the fp32 teacher's dev metric at >= 10x lower latency than the fp32
teacher in ONNX Runtime, and is >= 4x faster than the int8 teacher at <= 2 points lower metric.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export_folder, load_now, machine_info  # noqa: E402
from deploy import RUNTIMES, _callables, interleaved  # noqa: E402


def _models(p, specs):
    out = {}
    for spec in specs:
        name, sep, folders = spec.partition("=")
        if not sep or not name or not folders:
            p.error(f"--model {spec!r}: expected NAME=EXPORT[,EXPORT...] (export names or folders, one per distill seed)")
        out[name] = [f for f in folders.split(",") if f]
    if "teacher" in out:
        p.error("--model: 'teacher' is measured anyway; name the students otherwise")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the finished run's config (its workdir holds teacher and exports)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--model", action="append", required=True, metavar="NAME=EXPORT[,EXPORT...]",
                   help="a student: its export folder under <workdir>/exports, one per distill seed")
    p.add_argument("--out", required=True, help="output path without suffix (.json/.md/.png written)")
    p.add_argument("--repeats", type=int, default=30, help="timed forwards per (model, runtime) at batch 1")
    args = p.parse_args()
    specs = _models(p, args.model)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from nni_effbert.config import load_config
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.kd.teacher import load_teacher, prepare_teacher
    from nni_effbert.latency.runtimes import LogitsModule
    from nni_effbert.product import onnx as deploy
    from nni_effbert.product.distill import distill_record
    from nni_effbert.product.loader import load_exported
    from nni_effbert.workdir import WorkDir

    torch.set_num_threads(1)
    started, info = time.perf_counter(), machine_info()
    cfg = load_config(args.config, args.set)
    wd = WorkDir.of(cfg)
    folders = {name: [export_folder(wd, f) for f in fs] for name, fs in specs.items()}
    loaded = {}
    for name, fs in folders.items():
        for f in fs:
            exp = load_exported(f)
            if distill_record(exp.meta) is None:
                raise SystemExit(f"{f} is not distilled; run `nni-effbert distill --export {f}` first")
            loaded[f] = exp
    setup = KDSetup.from_config(cfg, progress=False)
    spec = setup.task.spec

    # 1. ONNX exports, checked on dev rows
    rows, labels, source = deploy.task_rows(cfg)
    checks = {"teacher": deploy.export_teacher_onnx(cfg, int8=True, rows=rows, labels=labels,
                                                    rows_source=source).check}
    for name, fs in folders.items():
        checks[name] = [deploy.export_onnx(f, int8=True, rows=rows, labels=labels, rows_source=source).check
                        for f in fs]

    # 2. dev metric per runtime and seed
    ev = cfg.evaluator
    score = deploy.dev_scorer(setup)
    teacher_files = deploy.onnx_files(wd.export_dir(deploy.TEACHER_EXPORT), source=wd.teacher_dir)
    dev = {"teacher": {"torch/fp32": [float(setup.teacher_marker["dev_metric"])]}}
    files = {"teacher": [teacher_files]}
    for name, fs in folders.items():
        dev[name] = {"torch/fp32": [float(distill_record(loaded[f].meta)["dev_metric"]) for f in fs]}
        files[name] = [deploy.onnx_files(f) for f in fs]
    for name, per_seed in files.items():
        for key, precision in (("onnxruntime", "fp32"), ("onnxruntime-int8", "int8")):
            # One session at a time, released after: each keeps its largest evaluation batch in its
            # memory arena (about 3 GB for the teacher on span QA at sequence 384).
            dev[name][f"onnxruntime/{precision}"] = [deploy.score_onnx_file(f[key], 1, score) for f in per_seed]
            print(f"{name} onnxruntime/{precision}: {dev[name][f'onnxruntime/{precision}']}", flush=True)
    onnx_models = {name: {k: deploy.OnnxModel(v, threads=1) for k, v in per_seed[0].items()}
                   for name, per_seed in files.items()}  # the first seed's, for latency

    # 3. latency, interleaved over every (model, runtime)
    teacher_model, _ = load_teacher(str(wd.teacher_dir))
    entries = {"teacher": {"torch": LogitsModule(prepare_teacher(teacher_model).cpu()).eval(),
                           "onnx": onnx_models["teacher"]}}
    for name, fs in folders.items():
        entries[name] = {"torch": LogitsModule(loaded[fs[0]].model).eval(), "onnx": onnx_models[name]}
    vocab, seq = int(setup.space.config.vocab_size), int(ev.latency_seq_length)
    latency = {name: {} for name in entries}
    for batch in (1, 8):
        fns, keys = [], []
        for name, entry in entries.items():
            for rt, fn in _callables(entry, vocab, batch, seq).items():
                fns.append(fn)
                keys.append((name, rt))
        per_round = max(1, args.repeats // 5) if batch == 1 else max(1, args.repeats // 10)
        for (name, (rt, precision)), ms in zip(keys, interleaved(fns, rounds=5, per_round=per_round)):
            latency[name][f"{rt}/{precision}/b{batch}"] = ms
        print(f"latency batch {batch} done", flush=True)

    def mean(v):
        return float(np.mean(v))

    def std(v):
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    t_dev, t_ms = dev["teacher"], latency["teacher"]
    students = list(folders)
    best = max(students, key=lambda n: mean(dev[n]["onnxruntime/int8"]))
    s8, s8_ms = mean(dev[best]["onnxruntime/int8"]), latency[best]["onnxruntime/int8/b1"]
    keep = s8 / t_dev["torch/fp32"][0] if t_dev["torch/fp32"][0] else float("nan")
    vs_fp32, vs_int8 = t_ms["onnxruntime/fp32/b1"] / s8_ms, t_ms["onnxruntime/int8/b1"] / s8_ms
    drop = t_dev["onnxruntime/int8"][0] - s8
    targets = {"keeps_97pct_of_fp32_teacher": keep >= 0.97, "10x_faster_than_fp32_teacher_in_ort": vs_fp32 >= 10,
               "4x_faster_than_int8_teacher": vs_int8 >= 4, "at_most_2_points_below_int8_teacher": drop <= 0.02}
    data = {"machine": info, "load_end": load_now(), "command": "python bench/deploy_exports.py " + " ".join(sys.argv[1:]),
            "config": str(Path(args.config).resolve()), "workdir": str(wd.root), "task": cfg.task.name,
            "metric": spec.metric, "dev_rows": len(setup.task.dev), "seq_length": seq, "models": specs,
            "dev": dev, "latency_ms": latency, "onnx_checks": checks, "best_int8_student": best,
            "targets": {**targets, "keep": keep, "speedup_vs_fp32_teacher_ort": vs_fp32,
                        "speedup_vs_int8_teacher": vs_int8, "points_below_int8_teacher": drop,
                        "met": all(targets.values())},
            "total_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))

    n_seeds = {name: len(fs) for name, fs in folders.items()}
    md = [f"# Accuracy and latency per deployment runtime: {cfg.task.name} ({spec.metric})", "",
          f"- work directory `{wd.root}`; students: " + "; ".join(f"{n} = {', '.join(fs)}" for n, fs in specs.items()),
          f"- dev {spec.metric} on {len(setup.task.dev)} dev rows, mean ± std over distill seeds "
          f"({', '.join(f'{n}: {k}' for n, k in n_seeds.items())}); the teacher is one model",
          f"- latency: the first seed's folder, median of 5 interleaved rounds, sequence {seq}, one thread; machine "
          f"{info['cpu_model']}, load average at the start {info['loadavg']}, at the end {data['load_end']}; "
          f"{data['total_s'] / 60:.1f} min wall", "",
          f"| model | runtime | precision | dev {spec.metric} | ms, batch 1 | speed-up | ms, batch 8 | speed-up |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in entries:
        for rt, precision in RUNTIMES:
            k = f"{rt}/{precision}"
            v = dev[name][k]
            shown = f"{mean(v):.4f}" + (f" ± {std(v):.4f}" if len(v) > 1 else "")
            b1, b8 = latency[name][f"{k}/b1"], latency[name][f"{k}/b8"]
            t1, t8 = t_ms[f"{rt}/fp32/b1"], t_ms[f"{rt}/fp32/b8"]
            md.append(f"| {name} | {rt} | {precision} | {shown} | {b1:.2f} | {t1 / b1:.2f}x | {b8:.2f} | {t8 / b8:.2f}x |")
    md += ["", "Speed-up: against the fp32 teacher in the same runtime (batch 1 and 8 each).", "",
           "## Targets", "",
           f"- best student in ONNX Runtime int8: **{best}**, dev {s8:.4f} = {keep:.1%} of the fp32 teacher "
           f"(>= 97%: **{'met' if targets['keeps_97pct_of_fp32_teacher'] else 'not met'}**), {vs_fp32:.2f}x faster than "
           f"the fp32 teacher in ONNX Runtime (>= 10x: **{'met' if targets['10x_faster_than_fp32_teacher_in_ort'] else 'not met'}**)",
           f"- against the int8 teacher: {vs_int8:.2f}x faster (>= 4x: "
           f"**{'met' if targets['4x_faster_than_int8_teacher'] else 'not met'}**), {drop * 100:+.2f} points below it "
           f"(<= 2: **{'met' if targets['at_most_2_points_below_int8_teacher'] else 'not met'}**)", "",
           "## ONNX checks against PyTorch", ""]
    md += ["| model | rows | fp32 max abs diff | int8 agreement with PyTorch | int8 max abs diff |", "|---|---:|---:|---:|---:|"]
    for name, c in checks.items():
        for one in (c if isinstance(c, list) else [c]):
            fp32, int8 = one.get("fp32") or {}, one.get("int8") or {}
            md.append(f"| {name} | {one.get('rows')} ({one.get('rows_source')}) | {fp32.get('max_abs_diff', float('nan')):.2e} "
                      f"| {int8.get('agreement', float('nan')):.3f} | {int8.get('max_abs_diff', float('nan')):.3g} |")
    md += ["", f"![dev metric vs latency]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(md))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"torch/fp32": "o", "onnxruntime/fp32": "s", "onnxruntime/int8": "^"}
    for name in entries:
        for (rt, precision) in RUNTIMES:
            k = f"{rt}/{precision}"
            v = dev[name][k]
            ax.errorbar(latency[name][f"{k}/b1"], mean(v), yerr=std(v) if len(v) > 1 else None, marker=markers[k],
                        linestyle="none", capsize=3, label=f"{name} {k}")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms, batch 1, sequence {seq}, one thread (log)")
    ax.set_ylabel(f"dev {spec.metric} (mean ± std over distill seeds)")
    ax.set_title(f"{cfg.task.name}: accuracy vs latency per deployment runtime", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
