"""Paired comparison of distilled students that earlier bench runs exported (issue 26 §1).

    python bench/compare_exports.py --config EXP.yml --name A=DIR,DIR,... --name B=DIR,DIR,... \
        [--pair A:B ...] --out bench/results/NAME

Each ``--name`` is a model given as its export folders (or the names of exports under the config's
work directory, as ``bench/deploy_exports.py --model`` takes them), one per distill seed, in the same seed
order for every model (seed k of A is paired with seed k of B). Every model is scored on the
config's dev rows (for a custom task, its held-out ``dev_file``), and each ``--pair`` (default: every
pair, in the order given) is compared paired over the rows x the seeds: 95% bootstrap interval and
two-sided permutation p (:func:`nni_effbert.product.compare.compare_predictions`). ``teacher`` may
be named in a pair without a ``--name``: the work directory's fine-tuned teacher.

Writes ``<out>.json`` (the folders, each model's per-seed dev metric and the comparisons) and
``<out>.md``. Nothing is trained; the folders are only read.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export_folder, load_now, machine_info  # noqa: E402


def parse_named(values, parser):
    models = {}
    for value in values:
        name, sep, folders = value.partition("=")
        dirs = [f for f in folders.split(",") if f]
        if not sep or not name or not dirs:
            parser.error(f"--name wants NAME=DIR[,DIR...] (export folders or export names), got {value!r}")
        models[name] = dirs
    counts = {len(d) for d in models.values()}
    if len(counts) > 1:
        parser.error("every --name needs the same number of folders (one per distill seed, same order)")
    return models


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the experiment config the students were distilled with")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--name", action="append", default=[], metavar="NAME=DIR,DIR,...", required=True)
    p.add_argument("--pair", action="append", default=[], metavar="A:B", help="A - B (default: every pair)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    models = parse_named(args.name, p)
    pairs = [tuple(x.split(":", 1)) for x in args.pair] or list(itertools.combinations(models, 2))
    for pair in pairs:
        if len(pair) != 2 or any(n not in models and n != "teacher" for n in pair):
            p.error(f"--pair wants A:B of the --name models or teacher, got {':'.join(pair)!r}")

    import numpy as np

    from nni_effbert.config import load_config
    from nni_effbert.data.metrics import compute_metrics
    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.product.compare import compare_predictions, dev_predictions
    from nni_effbert.stats import format_paired_table
    from nni_effbert.workdir import WorkDir

    info, started = machine_info(), time.perf_counter()
    cfg = load_config(args.config, args.set)
    wd = WorkDir.of(cfg)
    models = {name: [export_folder(wd, d) for d in dirs] for name, dirs in models.items()}
    setup = KDSetup.from_config(cfg, progress=False)
    labels = np.asarray(setup.task.dev["labels"])
    metric = setup.task.spec.metric
    predictions, per_seed = {}, {}
    for name, dirs in models.items():
        predictions[name] = np.stack([dev_predictions(setup, d) for d in dirs])
        per_seed[name] = [compute_metrics(metric, row, labels)["default"] for row in predictions[name]]
    if any(n == "teacher" for pair in pairs for n in pair):
        predictions["teacher"] = dev_predictions(setup, "teacher")
    comparisons = compare_predictions(predictions, labels, metric, pairs)
    table = format_paired_table(comparisons, metric)
    data = {"machine": info, "load_end": load_now(), "command": "python bench/compare_exports.py " + " ".join(sys.argv[1:]),
            "config": args.config, "dev_rows": int(len(labels)), "metric": metric,
            "models": {n: [str(d) for d in dirs] for n, dirs in models.items()}, "per_seed": per_seed,
            "comparisons": [c.to_dict() for c in comparisons], "total_s": time.perf_counter() - started}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    md = ["# Paired comparison of distilled students", "",
          f"Config `{args.config}`; {len(labels)} dev rows; load average at the end {data['load_end']}.", "",
          "| model | export folders (one per distill seed) | " + metric + " per seed |", "|---|---|---|"]
    for name, dirs in models.items():
        scores = per_seed[name]
        md.append(f"| {name} | {', '.join(f'`{d}`' for d in dirs)} | " + " / ".join(f"{s:.4f}" for s in scores) + " |")
    md += ["", "Paired over the dev rows x the distill seeds (95% bootstrap interval, two-sided permutation p):", "",
           table, ""]
    dest.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
