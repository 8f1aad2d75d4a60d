"""Where does MLP capacity matter? The BERT-MLP family distilled per task (issue 26, part 4).

    python bench/capacity.py --tasks sst2,sst2+transfer,mnli,qnli --seeds 3 --out bench/results/capacity

(``--resume`` after a stop keeps every student already distilled with the same plan.)

For each task: the MiniLM teacher fine-tuned on the task's train rows, one stage-0 warm-up of the
supernet (started from the teacher), then BERT's own MLP (``linear2(gelu(linear1(x)))``) at widths
1/4, 1/2 and 1 of the space's ffn hidden size with stack 1, and width 1/2 with stack 2, each
exported from that supernet and distilled (``distill`` budget of ``bench/configs/capacity.yml``)
once per distill seed. Every student predicts the task's held-out rows (SST-2: the 872-row GLUE dev
set; MNLI-m and QNLI: ``test.tsv`` of ``../shared/data/nli``, read through the custom-task path and
never trained on), and each arch is compared with the full-width one by the paired test of
:mod:`nni_effbert.stats` (rows x distill seeds): does capacity move the score beyond the noise?

Tasks: ``sst2``; ``sst2+transfer`` (SST-2 with ``distill.transfer_file`` = the movie-review corpus,
in-domain text for KD against the teacher's soft labels); ``mnli`` (MNLI-matched, 6,815 train /
3,000 test rows); ``qnli`` (3,463 / 2,000). ``--set`` overrides apply to every task.

Writes ``<out>.json`` (per task: teacher score, per arch the scores of every seed, params, the
paired comparison with the full-width arch and with the teacher; budgets, machine load, timings),
``<out>.md`` and ``<out>.png`` (score against non-embedding params per task, mean and the
seeds' range). Each task also times the teacher and every arch's seed-0 student (PyTorch fp32,
batch 1, ``evaluator.latency_seq_length`` tokens, one thread, median over interleaved rounds) and
states each arch's share of the teacher's score and its speed-up; ``sst2+transfer`` is checked
against issue 26's target (>= 98% of the teacher at >= 5x lower latency).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

from nni_effbert.config import load_config  # noqa: E402
from nni_effbert.io import load_json  # noqa: E402
from nni_effbert.kd.teacher_finetune import finetune_from_config  # noqa: E402
from nni_effbert.kd.setup import KDSetup  # noqa: E402
from nni_effbert.latency.measure import measure_interleaved, median_of_rounds  # noqa: E402
from nni_effbert.nas.kd_evaluator import KDEvaluator  # noqa: E402
from nni_effbert.nas.warmup import run_warmup  # noqa: E402
from nni_effbert.product.compare import compare_predictions, dev_predictions  # noqa: E402
from nni_effbert.product.baselines import reusable_export  # noqa: E402
from nni_effbert.product.distill import distill_record, run_distill  # noqa: E402
from nni_effbert.product.loader import load_exported  # noqa: E402
from nni_effbert.product.students import export_trial_arch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bench" / "configs" / "capacity.yml"
NLI = REPO.parent / "shared" / "data" / "nli"
CORPUS = REPO.parent / "shared" / "data" / "corpus" / "movie_reviews.txt"

#: Task name -> ``--set`` overrides of its ``task`` (and ``distill``) section.
TASKS: Dict[str, List[str]] = {
    "sst2": [],
    "sst2+transfer": [f"distill.transfer_file={CORPUS}"],  # + distill.transfer_steps=--transfer-steps
    "mnli": ["task.name=custom", "task.data_dir=null", f"task.train_file={NLI / 'mnli_m' / 'train.tsv'}",
             f"task.dev_file={NLI / 'mnli_m' / 'test.tsv'}", "task.text_columns=[sentence1, sentence2]",
             "task.label_column=gold_label", "task.max_seq_length=128"],
    "qnli": ["task.name=custom", "task.data_dir=null", f"task.train_file={NLI / 'qnli' / 'train.tsv'}",
             f"task.dev_file={NLI / 'qnli' / 'test.tsv'}", "task.text_columns=[question, sentence]",
             "task.label_column=label", "task.max_seq_length=128"],
}
#: (fraction of the ffn hidden size, stack) of the BERT-MLP family; (1, 1) is the reference.
FAMILY: List[Tuple[float, int]] = [(0.25, 1), (0.5, 1), (1.0, 1), (0.5, 2)]
REFERENCE = (1.0, 1)
#: Issue 26's SST-2 transfer-set target: share of the teacher's score, at this speed-up or more.
TARGET_SHARE, TARGET_SPEEDUP = 0.98, 5.0
DEFAULT_TRANSFER_STEPS = 1600

log = logging.getLogger("capacity")


def _undistilled(folder: Path) -> bool:
    """Whether ``folder`` is an export that was never distilled (no distill record in its metadata)."""
    meta = Path(folder) / "export_meta.json"
    return meta.is_file() and distill_record(load_json(meta, "capacity student metadata")) is None


def _width(space, fraction: float) -> int:
    widths = sorted(space.config.widths)
    return min(widths, key=lambda w: abs(w - fraction * max(widths)))


def interleaved_latency(models: Dict[str, Any], seq_length: int, rounds: int = 5, repeats: int = 6) -> Dict[str, float]:
    """Median ms (batch 1, one thread) of each model, timed round-robin so that a burst of load hits
    every model alike: the median over ``rounds`` of each round's median of ``repeats`` forwards."""
    results = measure_interleaved(models, rounds=rounds, seq_length=seq_length, repeats=repeats, threads=1)
    return {name: median_of_rounds(rs) for name, rs in results.items()}


def run_task(task: str, args) -> Dict[str, Any]:
    # Both SST-2 variants share one work directory: the same teacher, caches and supernet.
    work = Path(args.work) / task.split("+")[0]
    transfer = [f"distill.transfer_steps={args.transfer_steps}"] if task.endswith("+transfer") else []
    cfg = load_config(CONFIG, [f"workdir={work}", *TASKS[task], *transfer, *args.set])
    started = time.perf_counter()
    teacher = finetune_from_config(cfg, progress=not args.quiet)
    timings = {"teacher_s": round(time.perf_counter() - started, 1)}
    setup = KDSetup.from_config(cfg, progress=not args.quiet)
    t0 = time.perf_counter()
    run_warmup(cfg, 0, setup=setup, progress=not args.quiet)
    timings["warmup_s"] = round(time.perf_counter() - t0, 1)
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=not args.quiet, latency=False, setup=setup)
    space = setup.space
    labels = np.asarray(setup.task.dev["labels"])
    metric = setup.task.spec.metric
    predictions: Dict[str, np.ndarray] = {"teacher": dev_predictions(setup, "teacher")}
    archs: Dict[str, Dict[str, Any]] = {}
    first_seed: Dict[str, Path] = {}  # arch -> its seed-0 student, whose latency is measured
    family = {f"w{_width(space, fraction)}-s{stack}": (fraction, stack) for fraction, stack in FAMILY}
    unknown = sorted(set(args.archs or ()) - set(family))
    if unknown:  # before any distillation
        raise SystemExit(f"--archs: {', '.join(unknown)} not in this task's family; choose from {', '.join(family)}")
    # A non-default transfer budget distils into folders of its own, beside the default's students.
    budget = f"-t{args.transfer_steps}" if transfer and args.transfer_steps != DEFAULT_TRANSFER_STEPS else ""
    t0 = time.perf_counter()
    for name, (fraction, stack) in family.items():
        if args.archs and name not in args.archs:
            continue
        width = _width(space, fraction)
        arch = space.bert_arch(width=width, stack=stack)
        per_seed, scores = [], []
        for seed in range(args.seeds):
            seeded = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, seed=seed))
            folder = f"capacity-{task.replace('+', '-')}{budget}-{name}-seed{seed}"
            extra = {"source": "capacity bench", "task": task}
            path = setup.workdir.export_dir(folder)
            if not (args.resume and reusable_export(seeded, evaluator, folder, extra)):
                # A run stopped between export and distillation left an undistilled slice of the
                # supernet: --resume slices it again; a distilled student is never replaced here.
                redo = args.resume and _undistilled(path)
                path = export_trial_arch(seeded, arch, 0, folder, evaluator=evaluator, extra=extra, force=redo).path
            # With --resume, a student already distilled with this plan is read back, not distilled again.
            result = run_distill(seeded, path, force=not args.resume, progress=not args.quiet, setup=setup)
            first_seed.setdefault(name, Path(path))
            per_seed.append(dev_predictions(setup, path))
            scores.append(result.dev_metric)
            log.info("%s %s seed %d: dev %s %.4f", task, name, seed, metric, result.dev_metric)
        predictions[name] = np.stack(per_seed)
        archs[name] = {"fraction": fraction, "width": width, "stack": stack, "scores": scores,
                       "mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                       "non_embedding_params": int(space.count_params(arch, exclude_embeddings=True)),
                       "params": int(space.count_params(arch))}
    timings["distill_s"] = round(time.perf_counter() - t0, 1)
    seq = int(cfg.evaluator.latency_seq_length)
    models = {"teacher": setup.teacher_model().cpu(), **{n: load_exported(p).model.cpu() for n, p in first_seed.items()}}
    latency = interleaved_latency(models, seq)
    teacher_score = float(teacher.dev_metric)
    for name, a in archs.items():
        a["latency_ms"] = latency[name]
        a["speedup"] = latency["teacher"] / latency[name]
        a["share_of_teacher"] = a["mean"] / teacher_score
    ref = f"w{_width(space, REFERENCE[0])}-s{REFERENCE[1]}"
    pairs = [(name, ref) for name in archs if name != ref and ref in archs] + [("teacher", name) for name in archs]
    comparisons = compare_predictions(predictions, labels, metric, pairs, seed=0)
    return {"task": task, "metric": metric, "teacher_dev": float(teacher.dev_metric),
            "train_rows": len(setup.task.train), "search_rows": len(setup.task.search), "dev_rows": len(labels),
            "reference": ref, "archs": archs, "comparisons": [c.to_dict() for c in comparisons],
            "teacher_latency_ms": latency["teacher"], "latency_seq_length": seq,
            "timings": timings, "overrides": TASKS[task] + transfer + list(args.set)}


def target_line(r: Dict[str, Any]) -> str:
    """Issue 26's SST-2 transfer-set target for one task's results: the best arch at >= 5x."""
    fast = {n: a for n, a in r["archs"].items() if a.get("speedup", 0) >= TARGET_SPEEDUP}
    if not fast:
        return f"Target (>= {TARGET_SHARE:.0%} of the teacher at >= {TARGET_SPEEDUP:g}x): **missed**, no arch is {TARGET_SPEEDUP:g}x faster."
    name, a = max(fast.items(), key=lambda kv: kv[1]["mean"])
    met = a["share_of_teacher"] >= TARGET_SHARE
    return (f"Target (>= {TARGET_SHARE:.0%} of the teacher at >= {TARGET_SPEEDUP:g}x, mean over seeds): best such arch "
            f"{name}, {a['share_of_teacher']:.1%} at {a['speedup']:.2f}x: **{'met' if met else 'missed'}**.")


def markdown(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = ["# Capacity bench: does the BERT MLP's size move the final score?", "",
             f"Command: `{meta['command']}`; {meta['seeds']} distill seed(s) per arch; budgets (config "
             f"`bench/configs/capacity.yml`, before each task's overrides below): "
             f"`{json.dumps(meta['budgets'])}`; machine: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores, load before "
             f"{meta['load_before']}, after {meta['load_after']}.", ""]
    for r in results:
        lines += [f"## {r['task']} ({r['metric']}, {r['dev_rows']} held-out rows; {r['train_rows']} train rows)", "",
                  f"Teacher: {r['teacher_dev']:.4f}. This task's overrides of the config: "
                  f"`{' '.join(r['overrides']) or 'none'}`; timings (s): `{json.dumps(r['timings'])}`.", "",
                  "| arch | non-emb. params | scores per seed | mean ± std | of teacher | latency ms | speed-up |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for name, a in r["archs"].items():
            timed = "latency_ms" in a  # runs before the latency columns existed have none
            lines.append(f"| {name} | {a['non_embedding_params']:,} | {', '.join(f'{s:.4f}' for s in a['scores'])} | "
                         f"{a['mean']:.4f} ± {a['std']:.4f} | {a['mean'] / r['teacher_dev']:.1%} | "
                         + (f"{a['latency_ms']:.2f} | {a['speedup']:.2f}x |" if timed else "- | - |"))
        if "teacher_latency_ms" in r:
            lines += ["", f"Latency: PyTorch fp32, batch 1, {r['latency_seq_length']} tokens, one thread, median of 5 "
                          f"interleaved rounds of 6 forwards, each arch's seed-0 student; teacher "
                          f"{r['teacher_latency_ms']:.2f} ms."]
            if r["task"].endswith("+transfer"):
                lines += ["", target_line(r)]
        against = f"{r['reference']} and the teacher" if r["reference"] in r["archs"] else "the teacher"
        lines += ["", f"Paired comparisons (rows x seeds, 95% bootstrap CI, two-sided permutation p) against "
                  f"{against}:", "",
                  "| A vs B | A - B | 95% CI | p |", "|---|---:|---|---:|"]
        for c in r["comparisons"]:
            lines.append(f"| {c['name_a']} vs {c['name_b']} | {c['diff']:+.4f} | [{c['ci_low']:+.4f}, "
                         f"{c['ci_high']:+.4f}] | {c['p_value']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, a in r["archs"].items():
            x = a["non_embedding_params"] / 1e6
            ax.errorbar([x], [a["mean"]], yerr=[[a["mean"] - min(a["scores"])], [max(a["scores"]) - a["mean"]]],
                        fmt="o", capsize=3)
            # stacked archs sit at nearly the params of the widest one: their label goes below it
            ax.annotate(name, (x, a["mean"]), textcoords="offset points", fontsize=7,
                        xytext=(4, -10) if a.get("stack", 1) > 1 else (4, 4))
        ax.axhline(r["teacher_dev"], ls="--", lw=0.8, color="grey", label="teacher")
        ax.set_title(r["task"])
        ax.set_xlabel("non-embedding params (M)")
        ax.set_ylabel(r["metric"])
    # Variants of one task (sst2, sst2+transfer) share a y range, so the gap between them shows.
    groups: Dict[str, List[Any]] = {}
    for ax, r in zip(axes[0], results):
        groups.setdefault(r["task"].split("+")[0], []).append(ax)
    for group in groups.values():
        lo = min(ax.get_ylim()[0] for ax in group)
        hi = max(ax.get_ylim()[1] for ax in group)
        for ax in group:
            ax.set_ylim(lo, hi)
    fig.text(0.01, 0.01, "points: mean over distill seeds; bars: seed min-max; dashed: teacher", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,sst2+transfer,mnli,qnli")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--transfer-steps", type=int, default=DEFAULT_TRANSFER_STEPS,
                   help="distill.transfer_steps of sst2+transfer (another value distils into folders named -t<steps>)")
    p.add_argument("--archs", type=lambda v: [a.strip() for a in v.split(",") if a.strip()], default=None,
                   metavar="NAMES", help="only these members of the family, e.g. w48-s1 (default: all four)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every task")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "capacity"))
    p.add_argument("--work", default=str(REPO / "bench" / "work" / "capacity"),
                   help="work directories (one per task; the SST-2 variants share one)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep students an earlier run of the same work directories already distilled with the same "
                        "distill plan in the same student space (product.baselines.reusable_export; the teacher and "
                        "warm-up are reused whenever their plans match); after changing "
                        "the teacher or warm-up budget, use a fresh --work instead")
    p.add_argument("--render", metavar="JSON", help="write the markdown and plot of a finished run's JSON again, then stop")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        data = json.loads(Path(args.render).read_text())
        out = Path(args.render).with_suffix("")
        out.with_suffix(".md").write_text(markdown(data["tasks"], data["meta"]))
        plot(data["tasks"], out.with_suffix(".png"))
        print(out.with_suffix(".md").read_text())
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.seeds < 1:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}" if unknown else "--seeds must be >= 1")
    load_before = load_now()
    results = [run_task(task, args) for task in tasks]
    base = load_config(CONFIG, [f"workdir={args.work}", *args.set], check_paths=False)
    meta = {"command": "python bench/capacity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": args.seeds, "budgets": {"distill": dataclasses.asdict(base.distill),
                                             "warmup_steps": base.warmup.steps, "task": dataclasses.asdict(base.task)},
            "machine": machine_info(), "load_before": load_before, "load_after": load_now()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(results, meta))
    plot(results, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
