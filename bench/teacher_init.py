"""Issue 13 bench: does starting the supernet from the teacher's weights reach the teacher?

    python bench/teacher_init.py --out bench/results/teacher_init

Variants (same teacher, same data, same budgets; only the student preset, ``warmup.init`` and
the latency budget differ):

====  =================================================================================
A     ``warmup.init: teacher_embeddings`` (today's default), ``student.preset: quickstart``
B     ``warmup.init: teacher``, ``student.preset: quickstart``
C     ``warmup.init: teacher``, ``student.preset: teacher`` with ``{num_hidden_layers: 3, max_stack: 2}``
D     as C, but every candidate (and the BERT candidate's width) must be predicted >= 3x faster
      than the teacher: the product's latency table of the space and the teacher's measured
      latency (issue 14's ``search.speedup``); its baseline is BERT's MLP of the nearest latency
      (:func:`nni_effbert.product.baselines.latency_baseline_arch`)
====  =================================================================================

Per variant: warm up stage 0 of the supernet (general KD on the shared real corpus, then task
KD), run a *tiny* search (``--candidates`` random archs of the space scored with inherited
weights on a held-out split of SST-2 train that the training subset does not contain), take
the best as the "searched" student and the BERT-MLP baseline of the nearest parameter count
(:func:`nni_effbert.product.baselines.baseline_arch`; of the nearest latency for D), export both
from the same supernet and distil both with the same ``distill`` budget for each of ``--seeds``
distill seeds. The 872-row GLUE dev set is used only for the final scores. CPU latency (batch 1,
sequence 128) of the teacher and of every variant's seed-0 students is measured at the end,
interleaved round by round in one process; the medians over rounds are reported.

The budgets are those of ``bench/configs/teacher_init.yml`` plus the ``--set`` overrides of the
run, both written into the JSON (``meta.budgets``, ``meta.overrides``) and the markdown; they are
REDUCED to fit a 2-core machine. The teacher, its output caches and the importance scores live in
``bench/work/teacher_init/shared`` and are shared by the variants (symbolic links). ``--reuse``
takes the variants of an earlier results JSON as done (to add a variant to a recorded run: the
latency of all of them is measured again, together).

Writes ``<out>.json`` (one record per variant with ``variant``, ``teacher_dev``,
``searched_dev`` / ``baseline_dev`` over seeds, ``searched_latency_ms``,
``baseline_latency_ms``, ``teacher_latency_ms``, ``searched_non_embedding_params``, plus the
archs, candidate scores and timings) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import link_shared, load_now, machine_info  # noqa: E402

from nni_effbert.config import TaskConfig, load_config  # noqa: E402
from nni_effbert.data.loading import load_raw_task, load_task  # noqa: E402
from nni_effbert.latency.measure import measure_interleaved, median_of_rounds  # noqa: E402
from nni_effbert.latency.settings import latency_settings  # noqa: E402
from nni_effbert.latency.table import table_for_config  # noqa: E402
from nni_effbert.latency.targets import teacher_latency_ms  # noqa: E402
from nni_effbert.kd.teacher_finetune import finetune_from_config  # noqa: E402
from nni_effbert.kd.teacher import load_teacher, prepare_teacher  # noqa: E402
from nni_effbert.kd.student_start import student_origin  # noqa: E402
from nni_effbert.kd.scoring import evaluate  # noqa: E402
from nni_effbert.kd.setup import KDSetup  # noqa: E402
from nni_effbert.nas.warmup import run_warmup  # noqa: E402
from nni_effbert.product.baselines import baseline_arch, latency_baseline_arch  # noqa: E402
from nni_effbert.product.distill import run_distill  # noqa: E402
from nni_effbert.strategies.sampler import latency_in_budget  # noqa: E402
from nni_effbert.product.export import export_student  # noqa: E402
from nni_effbert.product.loader import load_exported  # noqa: E402
from nni_effbert.workdir import WorkDir  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "teacher_init.yml"
logger = logging.getLogger("bench.teacher_init")

VARIANTS = {
    "A": {"what": "today's init (random, teacher embeddings), quickstart preset",
          "set": ["warmup.init=teacher_embeddings", "student.preset=quickstart"]},
    "B": {"what": "init: teacher, quickstart preset",
          "set": ["warmup.init=teacher", "student.preset=quickstart"]},
    "C": {"what": "init: teacher, preset: teacher with 3 layers (max_stack 2)",
          "set": ["warmup.init=teacher", "student.preset=teacher",
                  "student.overrides={num_hidden_layers: 3, max_stack: 2}"]},
    "D": {"what": "as C, searched under a 3x speed-up budget over the teacher (search.speedup, issue 14)",
          "set": ["warmup.init=teacher", "student.preset=teacher",
                  "student.overrides={num_hidden_layers: 3, max_stack: 2}"],
          "speedup": 3.0},
}


def heldout_task(cfg, folder: Path, rows: int, seed: int = 1):
    """A GLUE-layout SST-2 folder of ``rows`` train sentences that the training subset does not contain."""
    train_subset = set(load_raw_task(cfg.task)[0]["train"]["sentence"])
    with open(Path(cfg.task.data_dir) / "SST-2" / "train.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        pool = [r for r in reader if len(r) == 2 and r[0] not in train_subset]
    rng = np.random.default_rng(seed)
    pick = [pool[i] for i in sorted(rng.choice(len(pool), size=rows, replace=False))]
    (folder / "SST-2").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        if (folder / "SST-2" / f"{split}.tsv").is_file():  # written by a parallel variant (same rows)
            continue
        with open(folder / "SST-2" / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
            w.writerow(header)
            w.writerows(pick)
    return TaskConfig(name="sst2", data_dir=str(folder), max_seq_length=cfg.task.max_seq_length)


def run_variant(name: str, args, work: Path, shared: Path, heldout_cfg) -> dict:
    started = time.perf_counter()
    root = work / name
    link_shared(root, shared)
    cfg = load_config(CONFIG, [f"workdir={root}", *VARIANTS[name]["set"], *args.set])
    setup = KDSetup.from_config(cfg, progress=not args.quiet)
    space, spec = setup.space, setup.task.spec
    warm = run_warmup(cfg, 0, setup=setup, progress=not args.quiet)
    heldout = load_task(heldout_cfg, setup.tokenizer, cache_dir=str(WorkDir.of(cfg).datasets_cache)).dev
    rng = np.random.default_rng(args.search_seed)
    fits, budget, table = (lambda arch: True), None, None
    speedup = VARIANTS[name].get("speedup")
    if speedup:
        # The product's latency predictor (issue 14): the table of this space and the teacher's
        # measured latency, both at the config's latency settings (CPU, 1 thread, b1/s128).
        table = table_for_config(cfg, space_config=space.config, progress=not args.quiet)
        budget = (0.0, teacher_latency_ms(cfg) / speedup)
        fits = (lambda arch: latency_in_budget(table.predict, arch, budget))  # noqa: E731
        logger.info("variant %s: predicted latency budget <= %.3f ms (teacher / %.1f)", name, budget[1], speedup)
    candidates, seen, tries = [], set(), 0
    while len(candidates) < args.candidates:
        tries += 1
        if tries > 20000:
            raise SystemExit(f"variant {name}: found only {len(candidates)} archs within the latency budget {budget}")
        arch = space.random_arch(rng)
        if space.fingerprint(arch) not in seen and fits(arch):
            seen.add(space.fingerprint(arch))
            candidates.append(arch)
    # The widest BERT MLP (stack 1) that fits is a candidate too (the full width without a budget).
    bert = next((a for a in (space.bert_arch(width=w) for w in sorted(space.config.widths, reverse=True)) if fits(a)),
                None)
    if bert is not None:
        candidates.append(bert)
    scored = []
    for arch in candidates:
        m = evaluate(space, heldout, spec, batch_size=64, pad_token_id=setup.pad_token_id, arch=arch)["default"]
        scored.append({"arch": arch, "heldout": float(m), "params": int(space.count_params(arch)),
                       "expressions": [d["expression"] for d in space.describe(arch)],
                       "predicted_latency_ms": None if table is None else round(table.predict(arch), 3)})
    best = max(scored, key=lambda s: (s["heldout"], -s["params"]))
    if table is None:  # BERT MLP of the nearest parameter count
        base = baseline_arch(space, best["params"])
        base_arch, base_width, base_diff, matched_by = base.arch, base.width, base.difference, "params"
    else:  # under a latency budget: BERT MLP of the nearest latency (predicted, then measured)
        choice = latency_baseline_arch(space, table, best["arch"], settings=latency_settings(cfg))
        base_arch, base_width, matched_by = choice.arch, choice.width, "latency"
        base_diff = int(space.count_params(base_arch)) - best["params"]
    origin = student_origin(cfg)
    per_seed = {"searched": [], "baseline": []}
    folders = {}
    for seed in range(args.seeds):
        seeded = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, seed=seed))
        for role, arch in (("searched", best["arch"]), ("baseline", base_arch)):
            out = root / "exports" / f"{role}_s{seed}"
            export_student(space, arch, space, out, tokenizer=setup.tokenizer, task=spec,
                           extra_meta={"origin": origin, "variant": name})
            res = run_distill(seeded, out, force=True, progress=not args.quiet, setup=setup)
            per_seed[role].append({"seed": seed, "dev": res.dev_metric, "before": res.before,
                                   "non_embedding_params": res.non_embedding_params, "params": res.params})
            folders.setdefault(role, out)
            logger.info("variant %s %s seed %d: dev %.4f (before distill %.4f)", name, role, seed, res.dev_metric,
                        res.before)
    return {
        "variant": name, "what": VARIANTS[name]["what"], "origin": origin,
        "space": {k: v for k, v in space.config.to_dict().items() if k not in ("unary_ops", "binary_ops")},
        "warmup": {"init": warm.init, "loss": warm.loss, "reference_dev": warm.metrics.get("default"),
                   "seconds": round(warm.seconds, 1), "plan": warm.plan.to_dict()},
        "candidates": [{k: v for k, v in s.items() if k != "arch"} for s in scored],
        "searched_arch": best["arch"], "searched_expressions": best["expressions"], "searched_heldout": best["heldout"],
        "baseline_width": base_width, "baseline_param_difference": base_diff, "baseline_matched_by": matched_by,
        "latency_budget_ms": None if budget is None else list(budget), "speedup_target": speedup,
        "searched_dev": [r["dev"] for r in per_seed["searched"]],
        "baseline_dev": [r["dev"] for r in per_seed["baseline"]],
        "searched_before_distill": [r["before"] for r in per_seed["searched"]],
        "baseline_before_distill": [r["before"] for r in per_seed["baseline"]],
        "searched_params": per_seed["searched"][0]["params"],
        "searched_non_embedding_params": per_seed["searched"][0]["non_embedding_params"],
        "baseline_non_embedding_params": per_seed["baseline"][0]["non_embedding_params"],
        "teacher_dev": float(setup.teacher_marker["dev_metric"]),
        "folders": {k: str(v) for k, v in folders.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def interleaved_latency(records, teacher_dir: Path, rounds: int, repeats: int, seq: int) -> None:
    """Median over ``rounds`` of per-round medians, every model measured once per round."""
    teacher, _ = load_teacher(str(teacher_dir))
    teacher = prepare_teacher(teacher)
    vocab = int(teacher.config.vocab_size)
    models = {"teacher": teacher}
    for r in records:
        for role in ("searched", "baseline"):
            models[f"{r['variant']}/{role}"] = load_exported(r["folders"][role]).model.eval()
    results = measure_interleaved(models, rounds=rounds, seq_length=seq, repeats=repeats, vocab_size=vocab)
    times = {k: [r.median_ms for r in rs] for k, rs in results.items()}
    med = {k: median_of_rounds(rs) for k, rs in results.items()}
    for r in records:
        r["teacher_latency_ms"] = med["teacher"]
        r["searched_latency_ms"] = med[f"{r['variant']}/searched"]
        r["baseline_latency_ms"] = med[f"{r['variant']}/baseline"]
        r["latency_rounds"] = {k: times[k] for k in ("teacher", f"{r['variant']}/searched", f"{r['variant']}/baseline")}


def _ms(xs):
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def markdown(records, meta) -> str:
    t_dev = records[0]["teacher_dev"]
    took = ", ".join(f"{r['variant']} {r['seconds'] / 60:.0f} min" for r in records)
    lines = [
        "# Teacher init bench (issue 13) -- REDUCED budgets", "",
        f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores (load average of the run "
        f"that measured latency and wrote this: {meta['load_before']} before, {meta['load_after']} after). "
        f"Wall time of that run {meta['seconds'] / 60:.1f} min; variants saved by earlier `--no-latency` runs "
        f"took {took}.", "",
        f"Budgets (`bench/configs/teacher_init.yml`): SST-2 {meta['budgets']['train_rows']:,}-row train subset, "
        f"MiniLM teacher fine-tuned 1 epoch on it; Taylor importance on {meta['budgets']['importance_batches']} "
        f"task batches; stage-0 warm-up {meta['budgets']['warmup']}; tiny search: {meta['budgets']['candidates']} "
        f"random archs + BERT's, scored with inherited weights on {meta['budgets']['heldout']} held-out SST-2 "
        f"train rows (disjoint from the training subset); final distillation {meta['budgets']['distill']} "
        f"per student and seed, {meta['budgets']['seeds']} distill seeds. Dev = the 872-row GLUE SST-2 dev set. "
        "Latency: batch 1, sequence 128, median of per-round medians, all models interleaved in one process.", "",
        f"Teacher (all-MiniLM-L6-v2 fine-tuned): dev accuracy **{t_dev:.4f}**, latency "
        f"{records[0]['teacher_latency_ms']:.2f} ms.", "",
        "| variant | what | searched dev (mean ± std) | % of teacher | baseline dev (mean ± std) | % of teacher | "
        "searched non-emb. params | searched latency (ms) | baseline latency (ms) | teacher / searched latency |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        s_m, s_s = _ms(r["searched_dev"])
        b_m, b_s = _ms(r["baseline_dev"])
        lines.append(
            f"| {r['variant']} | {r['what']} | {s_m:.4f} ± {s_s:.4f} | {100 * s_m / t_dev:.1f}% | "
            f"{b_m:.4f} ± {b_s:.4f} | {100 * b_m / t_dev:.1f}% | {r['searched_non_embedding_params']:,} | "
            f"{r['searched_latency_ms']:.2f} | {r['baseline_latency_ms']:.2f} | "
            f"{r['teacher_latency_ms'] / r['searched_latency_ms']:.2f}x |")
    lines += ["", "Per seed (searched / baseline dev), before distillation (the supernet slice), and the arch:", ""]
    for r in records:
        lines.append(f"- **{r['variant']}**: searched {', '.join(f'{x:.4f}' for x in r['searched_dev'])} "
                     f"(before distill {r['searched_before_distill'][0]:.4f}); baseline "
                     f"{', '.join(f'{x:.4f}' for x in r['baseline_dev'])} (width {r['baseline_width']}, "
                     f"matched by {r.get('baseline_matched_by', 'params')}, {r['baseline_param_difference']:+,d} params vs "
                     f"searched; before distill "
                     f"{r['baseline_before_distill'][0]:.4f}); warm-up init `{r['warmup']['init']}`, reference "
                     f"arch dev after warm-up {r['warmup']['reference_dev']:.4f}; searched expressions "
                     f"{', '.join('`' + e + '`' for e in r['searched_expressions'])}")
    lines += ["", "## Targets (>= 97% of the teacher's dev accuracy at >= 3x lower CPU latency)", "",
              "| variant | searched keeps | teacher / searched latency | both met |", "|---|---:|---:|:---:|"]
    met = []
    for r in records:
        keep = np.mean(r["searched_dev"]) / t_dev
        speed = r["teacher_latency_ms"] / r["searched_latency_ms"]
        ok = keep >= 0.97 and speed >= 3
        met += [r["variant"]] if ok else []
        lines.append(f"| {r['variant']} | {100 * keep:.1f}% | {speed:.2f}x | {'yes' if ok else 'no'} |")
    lines += ["", f"Target **{'met by ' + ', '.join(met) if met else 'not met by any variant'}**.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "teacher_init"))
    p.add_argument("--work", default=str(HERE / "work" / "teacher_init"))
    p.add_argument("--variants", default="A,B,C")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="extra dotted.key=value overrides for every variant")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-latency", action="store_true", help="run the variants, save them, skip latency and results")
    p.add_argument("--reuse", metavar="JSON", help="take the variants recorded in an earlier results JSON as done "
                   "(their exported students must still exist); latency is measured again for all")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    load_before = load_now()
    work = Path(args.work).absolute()
    shared = work / "shared"
    base = load_config(CONFIG, [f"workdir={shared}", *args.set])
    teacher = finetune_from_config(base, progress=not args.quiet)
    logger.info("teacher dev %.4f (%s)", teacher.dev_metric, "reused" if teacher.reused else "fine-tuned")
    heldout_cfg = heldout_task(base, work / "heldout", args.heldout)
    # Each finished variant is saved at once, and a rerun skips it: a crash or a kill loses one
    # variant at most on this slow shared machine.
    # (`--no-latency` runs one variant per process, e.g. the three in parallel; a last run
    # without it finds them all done and only measures latency and writes the results.)
    out = Path(args.out)
    records = []
    earlier = {}
    if args.reuse:
        earlier = {r["variant"]: r for r in json.loads(Path(args.reuse).read_text())["records"]}
    for v in args.variants.split(","):
        partial = out.parent / f"{out.name}.partial.{v}.json"
        if v in earlier and all(Path(f).is_dir() for f in earlier[v]["folders"].values()):
            records.append(earlier[v])
            logger.info("variant %s: reused from %s", v, args.reuse)
            continue
        if partial.is_file():
            records.append(json.loads(partial.read_text()))
            continue
        records.append(run_variant(v, args, work, shared, heldout_cfg))
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(records[-1], indent=1, default=str))
    if args.no_latency:
        return 0
    interleaved_latency(records, WorkDir.of(base).teacher_dir, args.latency_rounds, args.latency_repeats,
                        int(base.evaluator.latency_seq_length))
    stage = base.search.stages[0]
    meta = {
        "reduced": True, "machine": machine_info(), "reused": sorted(earlier), "load_before": load_before, "load_after": load_now(),
        "seconds": time.perf_counter() - started, "config": str(CONFIG.relative_to(HERE.parent)), "overrides": args.set,
        "budgets": {"train_rows": base.task.max_train_rows, "importance_batches": base.warmup.importance_batches,
                    "warmup": f"{stage.general_warmup_steps} general-KD steps on the shared corpus + "
                              f"{stage.warmup_steps} task-KD steps (batch {base.warmup.batch_size})",
                    "candidates": args.candidates, "heldout": args.heldout, "seeds": args.seeds,
                    "distill": f"{base.distill.general_steps} general-KD steps (corpus) + {base.distill.task_steps} "
                               f"task-KD steps (batch {base.distill.batch_size})"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(records, meta))
    for v in args.variants.split(","):
        (out.parent / f"{out.name}.partial.{v}.json").unlink(missing_ok=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
