"""Issue 31 bench: does the search score favour BERT's own MLP expression?

    python bench/reference_bias.py --out bench/results/reference_bias
    python bench/reference_bias.py --smoke --out /tmp/reference_bias_smoke      # a minute, no figures

Twelve archs that differ **only** in their MLP expression (the same width and stack 1 at every
layer) are scored two ways:

* **search score**: what a candidate trial reports (``default``: the KD objective on the held-out
  search split after the candidate's short KD fine-tune), from a stage-0 supernet warmed up the way
  the variant says;
* **final score**: the arch exported from the default variant's supernet and distilled
  (``distill.*``) with ``--distill-seeds`` seeds, dev accuracy, mean over seeds.

The search side is repeated with one factor changed at a time (``VARIANTS``): supernet init
(teacher / teacher embeddings / random), warm-up length (default / 4x), candidate fine-tune steps
(0 / default / 4x) and warm-up path sampling (uniform / balanced). For each variant the bench reports
Kendall's tau between search and final scores, the rank of BERT's expression under each, and how far
BERT's search score is above or below the best other expression's.

The final side compares BERT's expression with every other one by paired tests over dev rows x
distill seeds (:func:`nni_effbert.product.compare.compare_predictions`: percentile bootstrap
interval, two-sided permutation p-value), so "BERT's expression is (not) best at this budget" comes
with its interval.

Writes ``<out>.json`` (machine, load, budgets, every score), ``<out>.md`` and ``<out>.png``. Distilled
records are kept in the work directory (``bias/``), so a rerun resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent

#: Expressions in the paper's notation; the first is BERT's (the reference), the second GLU-like.
EXPRESSIONS = [
    "linear2(gelu(linear1(x)))",
    "linear2(mul(linear1(x), x))",
    "linear2(mul(gelu(linear1(x)), linear1(x)))",
    "linear2(relu(linear1(x)))",
    "linear2(swish(linear1(x)))",
    "linear2(tanh(linear1(x)))",
    "linear2(elu(linear1(x)))",
    "linear2(sigmoid(linear1(x)))",
    "linear2(linear1(x))",
    "linear2(add(gelu(linear1(x)), x))",
    "linear2(gelu(linear1(gelu(x))))",
    "gelu(linear2(gelu(linear1(x))))",
]

#: The bench's budget on top of ``bench/configs/pipeline_sst2.yml`` (SST-2, MiniLM teacher).
BUDGET = [
    "workdir=" + str(HERE / "work" / "reference_bias"),
    "task.max_train_rows=3000", "task.search_rows=500", "task.max_seq_length=64",
    "teacher.finetune.max_steps=150",
    "warmup.steps=150", "warmup.importance_batches=50",
    "evaluator.train_steps=20", "evaluator.eval_interval=20", "evaluator.latency_repeats=1",
    "search.stages=[{name: coarse, kind: joint, trials: 12, warmup_steps: 150}]",
    "distill.general_steps=0", "distill.task_steps=100", "distill.eval_interval=0",
]
#: ``--smoke``: the plumbing in about a minute (numbers mean nothing).
SMOKE = [
    "workdir=/tmp/reference_bias_smoke",
    "task.max_train_rows=200", "task.max_dev_rows=64", "task.search_rows=64", "task.max_seq_length=32",
    "teacher.finetune.max_steps=5", "student.preset=tiny",
    "warmup.steps=4", "warmup.importance_batches=2", "warmup.batch_size=8",
    "evaluator.train_steps=2", "evaluator.eval_interval=2", "evaluator.latency_repeats=1", "evaluator.batch_size=8",
    "search.stages=[{name: coarse, kind: joint, trials: 2, warmup_steps: 4}]",
    "distill.general_steps=0", "distill.task_steps=2", "distill.eval_interval=0", "distill.batch_size=8",
]


def variants(cfg) -> Dict[str, Dict[str, Any]]:
    """Variant name -> what it changes (section -> field -> value); ``default`` changes nothing."""
    stage = cfg.search.stages[0]
    steps = int(cfg.evaluator.train_steps)
    return {
        "default": {},
        "init_teacher_embeddings": {"warmup": {"init": "teacher_embeddings"}},
        "init_random": {"warmup": {"init": "random", "init_embeddings": "random"}},
        "warmup_4x": {"stage": {"warmup_steps": 4 * int(stage.warmup_steps)}},
        "finetune_0": {"evaluator": {"train_steps": 0}},
        "finetune_4x": {"evaluator": {"train_steps": 4 * steps, "eval_interval": 4 * steps}},
        "balanced_sampling": {"warmup": {"path_sampling": "balanced"}},
        # A fine-tune long enough, and at the final distillation's learning rate, for an expression
        # the shared weights do not suit to adapt (the final recovers such expressions; 20 steps at
        # the evaluator's rate may not).
        "finetune_4x_final_lr": {"evaluator": {"train_steps": 4 * steps, "eval_interval": 4 * steps,
                                               "learning_rate": float(cfg.distill.learning_rate)}},
    }


def variant_cfg(cfg, change: Dict[str, Dict[str, Any]]):
    """``cfg`` with one factor changed (dataclasses.replace; the config's own checks run again)."""
    out = cfg
    for section, fields in change.items():
        if section == "stage":
            stages = list(out.search.stages)
            stages[0] = dataclasses.replace(stages[0], **fields)
            out = dataclasses.replace(out, search=dataclasses.replace(out.search, stages=stages))
        else:
            out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **fields)})
    return out


def expression_archs(space, width: int) -> List[Dict[str, Any]]:
    """One arch per expression: ``width`` and stack 1 at every layer."""
    n = space.config.num_hidden_layers
    archs, seen = [], set()
    for text in EXPRESSIONS:
        arch = space.arch_from_layers([{"expression": text, "width": width, "stack": 1}] * n)
        fp = space.fingerprint(arch)
        if fp in seen:
            raise SystemExit(f"expression {text!r} computes the same function as an earlier one")
        seen.add(fp)
        archs.append(arch)
    return archs


def search_scores(cfg, name: str, archs, progress: bool) -> Dict[str, Any]:
    """Warm up stage 0 of experiment ``bias-<name>`` and score every arch as a trial would."""
    from tqdm.auto import tqdm

    from nni_effbert.kd.setup import KDSetup
    from nni_effbert.nas.kd_evaluator import KDEvaluator
    from nni_effbert.nas.warmup import run_warmup

    experiment = f"bias-{name}"
    setup = KDSetup.from_config(cfg, progress=progress)
    t0 = time.perf_counter()
    run_warmup(cfg, 0, setup=setup, experiment=experiment)
    warm_s = time.perf_counter() - t0
    ev = KDEvaluator(cfg, stage=0, report=False, latency=False, setup=setup, experiment=experiment,
                     progress=progress)
    rows = []
    t0 = time.perf_counter()
    for i, arch in enumerate(tqdm(archs, desc=f"search scores ({name})", disable=not progress)):
        final = ev.evaluate(arch, trial_id=f"bias-{name}-{i:02d}")
        rows.append({"default": float(final["default"]), "search_metric": float(final["search_metric"]),
                     "search_kd_loss": float(final["search_kd_loss"])})
    return {"experiment": experiment, "scores": rows, "warmup_s": round(warm_s, 1),
            "score_s": round(time.perf_counter() - t0, 1), "setup": setup, "evaluator": ev}


def final_predictions(cfg, archs, seeds: List[int], default_run, progress: bool):
    """Dev predictions ``[seeds, rows]`` of every arch distilled from the default supernet, and the
    mean dev metric per arch; records under ``<workdir>/bias/`` are reused."""
    import numpy as np
    from tqdm.auto import tqdm

    from nni_effbert.io import atomic_write_json, load_json
    from nni_effbert.product.compare import dev_predictions
    from nni_effbert.product.distill import plan_distill, run_distill
    from nni_effbert.product.students import export_trial_arch

    setup, ev = default_run["setup"], default_run["evaluator"]
    root = setup.workdir.root / "bias"
    preds, metrics, seconds = [], [], []
    jobs = [(i, s) for i in range(len(archs)) for s in seeds]
    done: Dict[tuple, Dict[str, Any]] = {}
    for i, s in tqdm(jobs, desc="final: distil", disable=not progress):
        scfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, seed=s))
        key = {"arch": archs[i], "seed": s, "plan": plan_distill(scfg).to_dict(), "task": setup.task.fingerprint,
               "experiment": default_run["experiment"]}
        path = root / f"arch{i:02d}-seed{s}.json"
        if path.is_file():
            record = load_json(path, "bias record")
            if record.get("key") == key:
                done[(i, s)] = record
                continue
        name = f"bias-arch{i:02d}"
        t0 = time.perf_counter()
        export_trial_arch(scfg, archs[i], 0, name, evaluator=ev, force=True, extra={"source": "reference_bias"})
        result = run_distill(scfg, setup.workdir.export_dir(name), force=True, progress=progress, setup=setup)
        pred = dev_predictions(setup, setup.workdir.export_dir(name))
        record = {"key": key, "dev_metric": float(result.dev_metric), "predictions": np.asarray(pred).tolist(),
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(record, path)
        done[(i, s)] = record
    for i in range(len(archs)):
        preds.append(np.asarray([done[(i, s)]["predictions"] for s in seeds]))
        metrics.append([done[(i, s)]["dev_metric"] for s in seeds])
        seconds.append(sum(done[(i, s)]["seconds"] for s in seeds))
    return preds, metrics, seconds


def rank_of(values: List[float], index: int) -> int:
    """1-based rank of ``values[index]`` (1 = highest; ties share the better rank)."""
    return 1 + sum(v > values[index] for v in values)


def rank_interval(correct, index: int = 0, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95):
    """95% percentile-bootstrap interval of arch ``index``'s rank (1 = best) under the final score.

    ``correct`` is ``[archs, seeds, rows]`` (1 where a distilled student got the dev row right); rows
    are resampled (the same rows for every arch, so the archs stay paired), each arch's score is
    its mean over seeds and resampled rows.
    """
    import numpy as np

    per_row = np.asarray(correct, dtype=float).mean(axis=1)  # [archs, rows]
    rng = np.random.default_rng(seed)
    n = per_row.shape[1]
    ranks = []
    for _ in range(n_resamples):
        scores = per_row[:, rng.integers(0, n, n)].mean(axis=1)
        ranks.append(1 + int(np.sum(scores > scores[index])))
    lo, hi = np.percentile(ranks, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return int(np.floor(lo)), int(np.ceil(hi))


def analyse(search: Dict[str, List[float]], final: List[float], final_best: int,
            margin: float = 0.0) -> Dict[str, Dict[str, Any]]:
    """Per variant: Kendall tau against the final, BERT's and the final's best expression's
    (``final_best``) search ranks, and how many expressions tie with the best search score within
    ``margin`` (the search's ``search.tie_margin``: within it the search picks the cheapest, not the
    best-scored)."""
    from nni_effbert.product.fidelity import rank_agreement

    out = {}
    for name, scores in search.items():
        agree = rank_agreement(scores, final)  # None where a side is constant (tau undefined)
        best_other = max(scores[1:])
        out[name] = {"kendall_tau": agree["kendall_tau"], "kendall_p": agree["kendall_tau_pvalue"],
                     "bert_rank_search": rank_of(scores, 0), "bert_rank_final": rank_of(final, 0),
                     "bert_minus_best_other_search": float(scores[0] - best_other),
                     "top_search": int(max(range(len(scores)), key=lambda i: scores[i])),
                     "final_best_rank_search": rank_of(scores, final_best),
                     "tied_with_best": int(sum(v >= max(scores) - margin for v in scores))}
    return out


def final_self_agreement(by_seed: List[List[float]], seeds: List[int]) -> Dict[str, Any]:
    """The final score's agreement with itself (Kendall tau between the archs' finals of every pair
    of distill seeds; :func:`nni_effbert.product.fidelity.seed_agreement`): no search score can rank
    the archs against the final much better than the final ranks them against itself."""
    from nni_effbert.product.fidelity import seed_agreement

    pairs = [{"final_by_seed": {str(s): v for s, v in zip(seeds, vals)}} for vals in by_seed]
    return seed_agreement(pairs, seeds)


def _num(value, spec: str = ".3f") -> str:
    """A figure, or ``undefined`` where it is None (a rank correlation of constant scores)."""
    return "undefined" if value is None else format(value, spec)


def markdown(data: Dict[str, Any]) -> str:
    m = data["machine"]
    n = len(data["expressions"])
    lines = [f"# Reference-expression bias of the search score (issue 31){' — SMOKE (numbers mean nothing)' if data['smoke'] else ''}", "",
             f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, load at start {m.get('loadavg')}, at end "
             f"{data['load_end']}, {m.get('date', '')}. Nothing else heavy ran beside it.", "",
             f"Command: `{data['command']}`. SST-2, MiniLM teacher (dev {data['teacher_dev']:.4f}); "
             f"{data['train_rows']} student-train rows, {data['search_rows']} search rows (held out of train), "
             f"{data['dev_rows']} dev rows (final scores only). {n} archs that differ only in their MLP expression "
             f"(width {data['width']}, stack 1, every layer).", "",
             f"Budgets: warm-up {data['budgets']['warmup_steps']} steps, candidate fine-tune "
             f"{data['budgets']['train_steps']} steps, final distillation {data['budgets']['distill']} "
             f"with distill seeds {data['seeds']}.", "",
             "## Search score against final score, one factor changed at a time", "",
             "Rank 1 = best of the 12. `BERT - best other` is the search-score gap between BERT's expression and "
             "the best other one (positive: the search prefers BERT's).", "",
             f"BERT's final rank, 95% bootstrap interval over dev rows: {data['bert_final_rank_ci'][0]}-{data['bert_final_rank_ci'][1]}.", "",
             _self_agreement_text(data), "",
             "| variant | changes | Kendall tau (p) | BERT rank, search | BERT rank, final | BERT - best other (search) "
             f"| final's best, search rank | tied with the best (margin {data['tie_margin']:g}) | search's top pick |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, a in data["analysis"].items():
        lines.append(f"| {name} | `{json.dumps(data['variants'][name])}` | {_num(a['kendall_tau'])} ({_num(a['kendall_p'])}) | "
                     f"{a['bert_rank_search']} | {a['bert_rank_final']} | {a['bert_minus_best_other_search']:+.4f} | "
                     f"{a['final_best_rank_search']} | {a['tied_with_best']} | "
                     f"`{data['expressions'][a['top_search']]}` |")
    lines += ["", "## Final scores (default supernet, distilled) and BERT's expression against each other one", "",
              "Paired over dev rows x distill seeds: A = BERT's expression, B = the other; 95% percentile bootstrap "
              "interval of A - B and two-sided permutation p-value.", "",
              "| # | expression | final dev accuracy (mean ± std over seeds) | BERT - this [95% CI], p |",
              "|---:|---|---:|---|"]
    for i, expr in enumerate(data["expressions"]):
        vals = data["final_by_seed"][i]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
        cmp = "—" if i == 0 else data["paired"][i - 1]["summary"]
        lines.append(f"| {i} | `{expr}` | {mean:.4f} ± {std:.4f} | {cmp} |")
    lines += ["", "## Verdict", "", data["verdict"], "", f"![search vs final]({Path(data['png']).name})", "",
              f"Wall time (s): {json.dumps(data['timings'])}"]
    return "\n".join(lines) + "\n"


def _self_agreement_text(data: Dict[str, Any]) -> str:
    sa = data.get("final_self_agreement") or {}
    pairs = ", ".join(f"seeds {p['seeds'][0]}-{p['seeds'][1]}: {_num(p['kendall_tau'])}" for p in sa.get("pairs", []))
    best = data["expressions"][data["final_best"]]
    return (f"The final score against itself (Kendall tau between distill seeds over the {len(data['expressions'])} "
            f"archs; {pairs or 'one seed'}): mean {_num(sa.get('kendall_tau_mean'))}. `final's best, search rank` is "
            f"where each search score puts the expression with the best mean final score (`{best}`).")


def plot(data: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["search"])
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    final = data["final"]
    for ax, name in zip(axes.flat, names):
        s = data["search"][name]
        ax.scatter(s[1:], final[1:], c="tab:blue", s=18, label="other expressions")
        ax.scatter([s[0]], [final[0]], c="tab:red", marker="*", s=120, label="BERT's expression")
        ax.set_title(f"{name} (tau {_num(data['analysis'][name]['kendall_tau'], '.2f')})", fontsize=9)
        ax.set_xlabel("search score (default)", fontsize=8)
        ax.set_ylabel("final dev accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(data: Dict[str, Any]) -> str:
    a = data["analysis"]["default"]
    better = [r for r in data["paired"] if r["ci_high"] < 0]  # another expression significantly above BERT's
    worse = [r for r in data["paired"] if r["ci_low"] > 0]
    over = [n for n, x in data["analysis"].items() if x["bert_rank_search"] < x["bert_rank_final"]]
    parts = [f"Under the default search score BERT's expression ranks {a['bert_rank_search']} of "
             f"{len(data['expressions'])}; under the final score it ranks {a['bert_rank_final']}."]
    parts.append(f"Variants whose search score ranks BERT's expression above its final rank: "
                 f"{', '.join(over) if over else 'none'}.")
    if better:
        names = ", ".join(f"`{r['name_b']}` ({r['summary']})" for r in better)
        parts.append(f"Final score: these expressions beat BERT's with a 95% interval excluding 0: {names}.")
    else:
        parts.append("Final score: no expression beats BERT's with a 95% interval excluding 0 at this budget "
                     f"({len(worse)} of {len(data['paired'])} are significantly worse).")
    sa = data.get("final_self_agreement") or {}
    if sa.get("kendall_tau_mean") is not None:
        parts.append(f"The final score ranks the {len(data['expressions'])} expressions against itself across distill "
                     f"seeds at Kendall tau {sa['kendall_tau_mean']:.2f} (mean over seed pairs): a search score "
                     "cannot rank them against the final's mean much better than that, so tau >= 0.5 is out of reach "
                     "on this task at this budget whatever the search does.")
    ranks = [x["final_best_rank_search"] for x in data["analysis"].values()]
    parts.append(f"The final's best expression (`{data['expressions'][data['final_best']]}`) ranks "
                 f"{min(ranks)}-{max(ranks)} of {len(data['expressions'])} under the search scores of the variants.")
    parts.append(f"Under the defaults {a['tied_with_best']} of {len(data['expressions'])} expressions score within "
                 f"the search's tie margin ({data['tie_margin']:g}, twice the score's re-scoring noise) of the best, "
                 f"BERT's {'among them' if a['bert_minus_best_other_search'] >= -data['tie_margin'] else 'not among them'}: "
                 "the search takes the cheapest of a tie, so BERT's first place by score alone does not "
                 "decide what it returns.")
    lo, hi = data["bert_final_rank_ci"]
    met_tau = a["kendall_tau"] is not None and a["kendall_tau"] >= 0.5
    met_rank = lo <= a["bert_rank_search"] <= hi
    parts.append(f"Targets under the defaults: Kendall tau >= 0.5: {_num(a['kendall_tau'])}, "
                 f"{'met' if met_tau else 'NOT met'}; BERT's search rank within its final-rank 95% interval "
                 f"({lo}-{hi}): {a['bert_rank_search']}, {'met' if met_rank else 'NOT met'}.")
    return " ".join(parts)


def finish(data: Dict[str, Any], preds, labels, metric: str, out: str) -> None:
    """Paired tests, rank interval, analysis and verdict of a run; writes ``<out>.{json,md,png}``."""
    import numpy as np

    from nni_effbert.product.compare import compare_predictions

    exprs = data["expressions"]
    named = {exprs[i]: preds[i] for i in range(len(exprs))}
    paired = compare_predictions(named, labels, metric, [(exprs[0], exprs[i]) for i in range(1, len(exprs))])
    data["paired"] = [dict(r.to_dict(), summary=r.summary()) for r in paired]
    data["bert_final_rank_ci"] = list(rank_interval([np.asarray(p) == labels for p in preds]))
    data["final_best"] = int(max(range(len(data["final"])), key=lambda i: data["final"][i]))
    data["analysis"] = analyse(data["search"], data["final"], data["final_best"], data["tie_margin"])
    data["final_self_agreement"] = final_self_agreement(data["final_by_seed"], data["seeds"])
    data["verdict"] = verdict(data)
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    png = dest.parent / f"{dest.name}.png"
    plot(data, png)
    data["png"] = str(png)
    dest.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    dest.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


def reanalyse(path: str, out: str) -> None:
    """Redo the analysis of an earlier result JSON from the distilled records in its work directory."""
    import numpy as np

    from nni_effbert.config import load_config
    from nni_effbert.io import load_json
    from nni_effbert.kd.setup import KDSetup

    data = json.loads(Path(path).read_text())
    cfg = load_config(data.get("config", str(HERE / "configs" / "pipeline_sst2.yml")), data["overrides"])
    setup = KDSetup.from_config(cfg, progress=False)
    root = setup.workdir.root / "bias"
    preds = [np.asarray([load_json(root / f"arch{i:02d}-seed{s}.json", "bias record")["predictions"]
                         for s in data["seeds"]]) for i in range(len(data["expressions"]))]
    data["reanalysed"] = "python bench/reference_bias.py " + " ".join(sys.argv[1:])
    data["tie_margin"] = float(cfg.search.tie_margin)
    finish(data, preds, np.asarray(setup.task.dev["labels"]), setup.task.spec.metric, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "configs" / "pipeline_sst2.yml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--smoke", action="store_true", help="tiny budget: checks the plumbing, numbers mean nothing")
    p.add_argument("--distill-seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=None, help="MLP width of every arch (default: the space's 2nd widest)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    p.add_argument("--out", default=str(HERE / "results" / "reference_bias"))
    p.add_argument("--reanalyse", metavar="JSON", help="redo the analysis of an earlier result JSON from its "
                   "distilled records (no training)")
    args = p.parse_args()
    if args.reanalyse:
        reanalyse(args.reanalyse, args.out)
        return

    import numpy as np

    from nni_effbert.config import load_config
    from nni_effbert.kd.teacher_finetune import finetune_from_config
    info = machine_info()
    sets = (SMOKE if args.smoke else BUDGET) + args.set
    cfg = load_config(args.config, sets)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = finetune_from_config(cfg, True)
    timings["teacher"] = round(time.perf_counter() - t0, 1)

    chosen = variants(cfg)
    if args.variants:
        keep = ["default"] + [v for v in args.variants.split(",") if v != "default"]
        unknown = sorted(set(keep) - set(chosen))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(chosen)}")
        chosen = {k: chosen[k] for k in keep}
    runs = {}
    archs = None
    for name, change in chosen.items():
        vcfg = variant_cfg(cfg, change)
        if archs is None:
            from nni_effbert.kd.setup import KDSetup
            space = KDSetup.from_config(vcfg, progress=False).space
            widths = sorted(space.config.widths, reverse=True)
            width = args.width or widths[min(1, len(widths) - 1)]
            archs = expression_archs(space, width)
        runs[name] = search_scores(vcfg, name, archs, progress=True)
        timings[f"search {name}"] = round(runs[name]["warmup_s"] + runs[name]["score_s"], 1)
        print(f"{name}: " + ", ".join(f"{r['default']:.4f}" for r in runs[name]["scores"]), flush=True)

    seeds = [int(cfg.distill.seed) + i for i in range(args.distill_seeds)]
    t0 = time.perf_counter()
    preds, by_seed, seconds = final_predictions(cfg, archs, seeds, runs["default"], progress=True)
    timings["final"] = round(time.perf_counter() - t0, 1)
    final = [float(np.mean(v)) for v in by_seed]
    setup = runs["default"]["setup"]
    labels = np.asarray(setup.task.dev["labels"])
    search = {name: [r["default"] for r in run["scores"]] for name, run in runs.items()}
    data = {
        "machine": info, "load_end": load_now(), "smoke": bool(args.smoke),
        "command": "python bench/reference_bias.py " + " ".join(sys.argv[1:]), "config": args.config,
        "overrides": sets, "teacher_dev": float(teacher.dev_metric), "train_rows": len(setup.task.train),
        "search_rows": len(setup.task.search), "dev_rows": len(setup.task.dev), "width": width,
        "expressions": EXPRESSIONS, "archs": archs, "seeds": seeds,
        "budgets": {"warmup_steps": cfg.search.stages[0].warmup_steps, "train_steps": cfg.evaluator.train_steps,
                    "distill": {"general_steps": cfg.distill.general_steps, "task_steps": cfg.distill.task_steps,
                                "batch_size": cfg.distill.batch_size, "learning_rate": cfg.distill.learning_rate}},
        "variants": chosen, "search": search, "tie_margin": float(cfg.search.tie_margin),
        "search_detail": {name: run["scores"] for name, run in runs.items()},
        "final": final, "final_by_seed": by_seed, "final_seconds": seconds, "timings": timings,
    }
    finish(data, preds, labels, setup.task.spec.metric, args.out)


if __name__ == "__main__":
    main()
