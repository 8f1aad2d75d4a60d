"""Issue 29 bench: accuracy and latency where users deploy (PyTorch eager, ONNX Runtime fp32 and int8).

    python bench/deploy.py                                  # pipeline_sst2 config (long; an idle machine)
    python bench/deploy.py --smoke --out bench/results/deploy_smoke   # tiny preset, minutes; proves it runs

1. Runs the pipeline (:func:`nni_effbert.product.quickstart.run_pipeline`: teacher, search, export,
   distill, report) with the MnasNet objective (``search.objective: {kind: mnas, target_speedup:
   --speedup}``) under ``evaluator.latency_runtime: torch``
   (or takes a finished one: ``--experiment ID``), and distils the latency-matched BERT-MLP
   baseline (:func:`nni_effbert.product.baselines.ensure_latency_baseline`).
2. Exports the teacher, the baseline and the searched student to ONNX and int8 ONNX
   (:mod:`nni_effbert.product.onnx`), each checked against PyTorch on dev rows.
3. For each: dev metric in PyTorch eager (fp32), ONNX Runtime fp32 and ONNX Runtime int8; latency
   at batch 1, sequence 128, one thread, as medians of interleaved rounds over all nine
   (model, runtime) pairs; the students (and the teacher, for the speed-ups) also at batch 8.
4. Runs the search again with ``evaluator.latency_runtime: onnxruntime-int8`` (same work
   directory, teacher and budget; ``--experiment-int8 ID`` takes a finished one) and says whether
   it picks another student, with both picks' latency predicted by both runtimes' tables and
   measured in both runtimes (random weights: latency does not depend on them).

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (dev metric vs latency per runtime). **Targets**
(issue 29): the best student in ONNX Runtime int8 keeps >= 97% of the fp32 teacher's dev metric at
>= 10x lower latency than the fp32 teacher in ONNX Runtime; and it is >= 4x faster than the int8
teacher at <= 2 points lower dev metric. ``--smoke`` (the tests' tiny experiment, ``examples/tiny``, with
a random tiny BERT teacher) proves the bench runs; its figures measure nothing and every output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNTIMES = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))


def interleaved(callables, rounds=5, per_round=6, warmup=3):
    """Median ms of each zero-argument callable, measured round-robin (load hits all alike)."""
    for fn in callables:
        for _ in range(warmup):
            fn()
    times = [[] for _ in callables]
    for _ in range(rounds):
        for i, fn in enumerate(callables):
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in times]


def _inputs(vocab, batch, seq, seed=0):
    import torch

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


def _callables(entry, vocab, batch, seq):
    """(runtime, precision) -> zero-argument forward of one model at one input shape."""
    import torch

    from nni_effbert.latency.runtimes import INPUT_NAMES

    ids, mask, types = _inputs(vocab, batch, seq)
    torch_model = entry["torch"]

    def eager():
        with torch.inference_mode():
            torch_model(ids, mask, types)

    out = {("torch", "fp32"): eager}
    for precision, key in (("fp32", "onnxruntime"), ("int8", "onnxruntime-int8")):
        m = entry["onnx"][key]
        feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, (ids, mask, types)) if n in m.used}
        out[("onnxruntime", precision)] = (lambda s=m.session, f=feeds: s.run(None, f))
    return out


def _tiny_teacher(folder):
    """A random 2-layer BERT (hidden 32) on MiniLM's tokenizer, saved once into ``folder``."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from nni_effbert.kd.teacher import resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=37, vocab_size=len(tok),
                                                     max_position_embeddings=64, num_labels=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _eager(model, ids, mask, types):
    import torch

    with torch.inference_mode():
        return model(ids, mask, types)


def _measure_arch_in_runtimes(config, archs, settings, runtimes, rounds=3):
    """Measured latency of random-weight students of ``archs`` in each runtime (interleaved)."""
    from nni_effbert.latency.runtimes import INPUT_NAMES, LogitsModule, model_runner
    from nni_effbert.search_spaces import EfficientBertModel

    ids, mask, types = _inputs(config.vocab_size, settings.batch_size, settings.seq_length)
    fns, keys = [], []
    for name, arch in archs.items():
        model = LogitsModule(EfficientBertModel(config, arch).eval())
        for rt in runtimes:
            if rt == "torch":
                fns.append(lambda m=model: _eager(m, ids, mask, types))
            else:
                fns.append(model_runner(model, (ids, mask, types), rt, threads=settings.threads,
                                        input_names=INPUT_NAMES).bind(ids, mask, types))
            keys.append((name, rt))
    ms = interleaved(fns, rounds=rounds, per_round=5)
    return {f"{name}@{rt}": v for (name, rt), v in zip(keys, ms)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "pipeline_sst2.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default=str(HERE / "results" / "deploy"))
    p.add_argument("--workdir", default=None,
                   help="default: the config's + '_deploy'; with --smoke ./effbert-deploy-smoke")
    p.add_argument("--speedup", type=float, default=2.0,
                   help="target speed-up of both searches' MnasNet objective (search.objective kind mnas, "
                        "against the teacher in each search's runtime; a soft constraint, never infeasible)")
    p.add_argument("--experiment", metavar="ID", help="a finished torch-runtime pipeline run in the work directory")
    p.add_argument("--experiment-int8", metavar="ID", help="a finished onnxruntime-int8 search in the work directory")
    p.add_argument("--repeats", type=int, default=30, help="timed forwards per (model, runtime) (default 30)")
    p.add_argument("--check", type=int, default=12,
                   help="random archs measured end to end against each runtime's latency table (default 12)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="the tiny test experiment with a random tiny teacher (labelled SMOKE): proves it runs")
    args = p.parse_args()
    if args.smoke and args.check == p.get_default("check"):
        args.check = 4

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import yaml

    from nni_effbert.config import apply_overrides, load_config
    from nni_effbert.latency import check as ltk
    from nni_effbert.latency import components as ltc
    from nni_effbert.latency import settings as lts
    from nni_effbert.latency import table as lt
    from nni_effbert.latency.runtimes import LogitsModule
    from nni_effbert.kd.teacher import load_teacher, prepare_teacher
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.product import onnx as deploy
    from nni_effbert.product.baselines import ensure_latency_baseline
    from nni_effbert.product.latency_exports import export_best_objective
    from nni_effbert.product.distill import distill_record
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.quickstart import _search, run_pipeline
    from nni_effbert.workdir import WorkDir

    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.smoke:
        # The tests' tiny experiment (examples/tiny) with a random 2-layer BERT teacher on MiniLM's
        # tokenizer: every step of the bench runs, in minutes, and nothing is learnt.
        raw = yaml.safe_load((HERE.parent / "examples" / "tiny" / "effbert.yml").read_text())
        raw["task"]["data_dir"] = os.environ.get("EFFBERT_DATA_DIR") or str(HERE.parent.parent / "shared" / "data" / "glue")
        default_workdir = "effbert-deploy-smoke"
        raw["teacher"]["model"] = str(_tiny_teacher(Path(args.workdir or default_workdir).absolute() / "base-teacher"))
    else:
        raw = yaml.safe_load(Path(args.config).read_text())
        default_workdir = str(load_config(args.config).workdir) + "_deploy"
    workdir = Path(args.workdir or default_workdir).absolute()
    apply_overrides(raw, [*args.set, f"workdir={workdir}",
                          f"search.objective={{kind: mnas, target_speedup: {args.speedup}}}"])
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for runtime in ("torch", "onnxruntime-int8"):
        data = json.loads(json.dumps(raw))
        apply_overrides(data, [f"evaluator.latency_runtime={runtime}"])
        paths[runtime] = workdir / f"bench_deploy_{runtime}.yml"
        paths[runtime].write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(paths["torch"])
    cfg8 = load_config(paths["onnxruntime-int8"])
    info = machine_info()

    # 1. the pipeline under torch, and the latency-matched baseline
    experiment = args.experiment or run_pipeline(cfg, paths["torch"], port=args.port).experiment_id
    setup = KDSetup.from_config(cfg, progress=False)
    wd = WorkDir.of(cfg)
    searched_dir = wd.export_dir("searched")
    searched = load_exported(searched_dir)
    if distill_record(searched.meta) is None or (searched.meta.get("extra") or {}).get("experiment") != experiment:
        raise SystemExit(f"{searched_dir} is not the distilled searched student of experiment {experiment}; "
                         "run the pipeline (without --experiment) or `nni-effbert export` + `distill` first")
    base, choice = ensure_latency_baseline(cfg, searched_dir, setup=setup, progress=False)

    # 2. ONNX exports, checked on dev rows
    rows, labels, source = deploy.task_rows(cfg)
    t_export = deploy.export_teacher_onnx(cfg, int8=True, rows=rows, labels=labels, rows_source=source)
    checks = {"teacher": t_export.check}
    folders = {"teacher": t_export.folder, "baseline": Path(base.path), "searched": searched_dir}
    for name in ("baseline", "searched"):
        checks[name] = deploy.export_onnx(folders[name], int8=True, rows=rows, labels=labels, rows_source=source).check

    # 3. dev metric and latency per runtime
    teacher_model, _ = load_teacher(str(wd.teacher_dir))
    torch_models = {"teacher": LogitsModule(prepare_teacher(teacher_model).cpu()).eval(),
                    "baseline": LogitsModule(load_exported(folders["baseline"]).model).eval(),
                    "searched": LogitsModule(searched.model).eval()}
    torch_dev = {"teacher": float(setup.teacher_marker["dev_metric"]), "baseline": float(base.dev_metric),
                 "searched": float(distill_record(searched.meta)["dev_metric"])}
    ev = cfg.evaluator
    from nni_effbert.data.batches import length_sorted_batches

    batches, _ = length_sorted_batches(setup.task.dev, int(ev.eval_batch_size or ev.batch_size), setup.pad_token_id)
    entries = {}
    for name in ("teacher", "baseline", "searched"):
        files = deploy.onnx_files(folders[name], source=wd.teacher_dir if name == "teacher" else None)
        entries[name] = {"torch": torch_models[name],
                         "onnx": {k: deploy.OnnxModel(v, threads=1) for k, v in files.items()}}
    results = {name: {"dev": {"torch/fp32": torch_dev[name]}, "latency_ms": {}} for name in entries}
    for name, e in entries.items():
        for key, precision in (("onnxruntime", "fp32"), ("onnxruntime-int8", "int8")):
            results[name]["dev"][f"onnxruntime/{precision}"] = deploy.evaluate_onnx(e["onnx"][key], batches,
                                                                                   setup.task.spec)
    vocab = int(setup.space.config.vocab_size)
    seq = int(ev.latency_seq_length)
    for batch in (1, 8):
        names = list(entries)
        fns, keys = [], []
        for name in names:
            for rt, fn in _callables(entries[name], vocab, batch, seq).items():
                fns.append(fn)
                keys.append((name, rt))
        per_round = max(1, args.repeats // 5) if batch == 1 else max(1, args.repeats // 10)
        for (name, (rt, precision)), ms in zip(keys, interleaved(fns, rounds=5, per_round=per_round)):
            results[name]["latency_ms"][f"{rt}/{precision}/b{batch}"] = ms

    # 4. the search under onnxruntime-int8
    experiment8 = args.experiment_int8 or _search(cfg8, paths["onnxruntime-int8"], args.port, True).experiment_id
    # Each search's best trial by its own objective (score traded against its runtime's latency).
    pick = export_best_objective(cfg, experiment, name="pick-torch", progress=False)
    pick8 = export_best_objective(cfg8, experiment8, name="pick-onnxruntime-int8", progress=False)
    archs = {"torch pick": dict(load_exported(pick.path).arch),
             "onnxruntime-int8 pick": dict(load_exported(pick8.path).arch)}
    space_config = setup.space.config
    predicted = {}
    for runtime, c in (("torch", cfg), ("onnxruntime-int8", cfg8)):
        table = lt.table_for_config(c, space_config=space_config, progress=False)
        for name, arch in archs.items():
            predicted[f"{name}@{runtime}"] = table.predict(arch)
    measured = _measure_arch_in_runtimes(space_config, archs, lts.latency_settings(cfg),
                                         ("torch", "onnxruntime-int8"))
    # How well each runtime's per-component table predicts whole models (same random archs).
    table_checks = {}
    for runtime, c in (("torch", cfg), ("onnxruntime-int8", cfg8)):
        table = lt.table_for_config(c, space_config=space_config, progress=False)
        res = ltk.check_table(table, ltc.random_archs(space_config, args.check, seed=0), lts.latency_settings(c),
                             repeats=10, progress=False, keep_archs=False)
        table_checks[runtime] = {"mape": res.mape, "kendall_tau": res.kendall_tau, "kendall_p": res.kendall_p,
                                 "n": len(res.pairs), "pairs": res.pairs}
    same_pick = setup.space.fingerprint(archs["torch pick"]) == setup.space.fingerprint(archs["onnxruntime-int8 pick"])

    # targets
    t = results["teacher"]
    best = results["searched"]
    t_acc = t["dev"]["torch/fp32"]
    s8_acc = best["dev"]["onnxruntime/int8"]
    s8_ms = best["latency_ms"]["onnxruntime/int8/b1"]
    keep = s8_acc / t_acc if t_acc else float("nan")
    vs_fp32 = t["latency_ms"]["onnxruntime/fp32/b1"] / s8_ms
    vs_int8 = t["latency_ms"]["onnxruntime/int8/b1"] / s8_ms
    drop = t["dev"]["onnxruntime/int8"] - s8_acc
    targets = {"keeps_97pct_of_fp32_teacher": keep >= 0.97, "10x_faster_than_fp32_teacher_in_ort": vs_fp32 >= 10,
               "4x_faster_than_int8_teacher": vs_int8 >= 4, "at_most_2_points_below_int8_teacher": drop <= 0.02}
    data = {"smoke": bool(args.smoke), "machine": info, "load_end": load_now(),
            "command": "python bench/deploy.py " + " ".join(sys.argv[1:]), "workdir": str(workdir),
            "experiment_torch": experiment, "experiment_onnxruntime_int8": experiment8, "speedup": args.speedup,
            "baseline_width": choice.width, "metric": setup.task.spec.metric, "dev_rows": len(setup.task.dev),
            "results": results, "onnx_checks": checks,
            "search_runtime": {"same_pick": same_pick, "archs": archs, "predicted_ms": predicted, "measured_ms": measured},
            "table_checks": table_checks,
            "targets": {**targets, "keep": keep, "speedup_vs_fp32_teacher_ort": vs_fp32,
                        "speedup_vs_int8_teacher": vs_int8, "points_below_int8_teacher": drop,
                        "met": all(targets.values())},
            "total_s": time.perf_counter() - started}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))

    label = "SMOKE RUN (proves the bench runs; the figures measure nothing): " if args.smoke else ""
    metric = f"dev {setup.task.spec.metric}"
    md = [f"# {label}Accuracy and latency per deployment runtime", "",
          f"- torch-runtime experiment {experiment}, onnxruntime-int8 experiment {experiment8}, "
          f"MnasNet objective, target speed-up {args.speedup}; latency-matched baseline: BERT MLP, stack 1, width {choice.width}",
          f"- latency: median of 5 interleaved rounds, sequence {seq}, one thread; load average at the end "
          f"{data['load_end']}; {data['total_s'] / 60:.1f} min wall", "",
          f"| model | runtime | precision | {metric} | ms, batch 1 | speed-up | ms, batch 8 | speed-up |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for rt, precision in RUNTIMES:
            k = f"{rt}/{precision}"
            b1, b8 = r["latency_ms"][f"{k}/b1"], r["latency_ms"][f"{k}/b8"]
            t1, t8 = t["latency_ms"][f"{rt}/fp32/b1"], t["latency_ms"][f"{rt}/fp32/b8"]
            md.append(f"| {name} | {rt} | {precision} | {r['dev'][k]:.4f} | {b1:.2f} | {t1 / b1:.2f}x | {b8:.2f} | "
                      f"{t8 / b8:.2f}x |")
    md += ["", "Speed-up: against the fp32 teacher in the same runtime (batch 1 and 8 each).", "",
           "## Does the runtime change the search's pick?", "",
           f"Same student picked under torch and onnxruntime-int8: **{'yes' if same_pick else 'no'}**.", "",
           "| pick | predicted torch (ms) | predicted ORT int8 (ms) | measured torch (ms) | measured ORT int8 (ms) |",
           "|---|---:|---:|---:|---:|"]
    for name in archs:
        md.append(f"| {name} | {predicted[f'{name}@torch']:.3f} | {predicted[f'{name}@onnxruntime-int8']:.3f} | "
                  f"{measured[f'{name}@torch']:.3f} | {measured[f'{name}@onnxruntime-int8']:.3f} |")
    md += ["", "## The latency table per runtime", "",
           f"Predicted vs measured on {args.check} random archs (whole models, same runtime):", "",
           "| runtime | MAPE | Kendall tau (p) |", "|---|---:|---:|"]
    md += [f"| {rt} | {c['mape']:.1f}% | {c['kendall_tau']:.3f} ({c['kendall_p']:.2g}) |" for rt, c in table_checks.items()]
    md += ["", "## Targets", "",
           f"- searched student, ORT int8: {keep:.1%} of the fp32 teacher's {metric} (target >= 97%), "
           f"{vs_fp32:.2f}x faster than the fp32 teacher in ORT (target >= 10x): "
           f"{'met' if targets['keeps_97pct_of_fp32_teacher'] and targets['10x_faster_than_fp32_teacher_in_ort'] else 'missed'}",
           f"- against the int8 teacher: {vs_int8:.2f}x faster (target >= 4x), {100 * drop:+.2f} points below "
           f"(target <= 2): {'met' if targets['4x_faster_than_int8_teacher'] and targets['at_most_2_points_below_int8_teacher'] else 'missed'}",
           ""]
    dest.with_suffix(".md").write_text("\n".join(md) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"torch/fp32": "o", "onnxruntime/fp32": "s", "onnxruntime/int8": "^"}
    for name, r in results.items():
        for k, marker in markers.items():
            ax.scatter(r["latency_ms"][f"{k}/b1"], r["dev"][k], marker=marker, s=60,
                       label=f"{name}, {k}")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency (ms, batch 1, seq {seq}, 1 thread)")
    ax.set_ylabel(metric)
    ax.set_title(("SMOKE: " if args.smoke else "") + "dev metric vs latency per runtime")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(dest.with_suffix(".png"), dpi=120)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
