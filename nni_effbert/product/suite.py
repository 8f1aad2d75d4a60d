"""One searched student for every task of a ``tasks:`` config (issue 27): export and distillation.

:func:`export_multitask` takes an arch of a multi-task search (by default its best candidate:
combined ``default``, the stage's tie margin, as :func:`~nni_effbert.product.students.export_best`)
and slices it from the shared multi-task supernet once per task, into each task's own work
directory, ``<workdir>/tasks/<task>/exports/<name>``: the same encoder with that task's head, an
export like any single-task one (it loads with ``transformers``, ``distill --task`` and ``report
--task`` read it).

:func:`distill_multitask` is the paper's protocol for one general student: general KD on the
corpus **once** (``distill.general_steps``, the first task's teacher, into ``<workdir>/exports/<name>``:
the task-agnostic general student), then every task's export starts from that general encoder (its
own head kept) and is distilled on its task alone (``distill.task_steps``). Each export's record says
where its encoder came from (``multitask_general``).

:func:`ensure_multitask_baseline` takes the latency-matched BERT-MLP baseline through the same steps
(sliced from the same multi-task supernet stage, general KD once, task KD per task), and
:func:`suite_report` writes the GLUE-style table (``<workdir>/reports/suite.{md,json}``): every task's
teacher, baseline and searched dev metric, the weighted average, paired intervals per task and of
the average (:func:`~nni_effbert.stats.paired_suite`), params and latency once per model.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import Any, Dict, Mapping, Optional


from ..config import ExperimentConfig, each_task
from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_text
from ..latency.settings import latency_settings
from ..latency.table import table_for_config
from ..kd.multitask import ENCODER_MODULES
from ..kd.setup import KDSetup
from ..nas.multitask_evaluator import MultiTaskEvaluator
from nni_effbert.search_spaces.supernet import EfficientBertSupernet
from ..stats import paired_scores, paired_suite
from ..workdir import WorkDir
from .baselines import LATENCY_BASELINE, latency_baseline_arch
from .compare import dev_row_scores
from .distill import DISTILL_KEY, DistillResult, distill_record, plan_distill, run_distill
from .export import check_replaceable, export_student
from .loader import load_exported
from .students import SEARCHED, ExportInfo, best_of_experiment, export_loaded

__all__ = ["MULTITASK_GENERAL_KEY", "export_multitask", "distill_multitask", "ensure_multitask_baseline",
           "suite_report"]

logger = logging.getLogger(__name__)

#: Export-record key of a task student whose encoder came from the shared general distillation.
MULTITASK_GENERAL_KEY = "multitask_general"


def _multi(cfg: ExperimentConfig, what: str) -> None:
    if not cfg.tasks:
        raise ConfigError(f"{what} needs a config with tasks:; for one task use the single-task command")


def export_multitask(cfg: ExperimentConfig, experiment: str, *, name: str = SEARCHED,
                     arch: Optional[Mapping[str, Any]] = None, stage: Optional[int] = None,
                     experiments_dir: Optional[str] = None, force: bool = False,
                     progress: bool = True) -> Dict[str, ExportInfo]:
    """Export an arch of multi-task search ``experiment`` for every task; ``{task: ExportInfo}``.

    ``arch`` (with ``stage``) exports that arch; without it, the search's best candidate (NNI's
    records of the experiment). Existing exports are replaced only with ``force``; every task's
    folder is checked before any is written.
    """
    _multi(cfg, "export_multitask")
    extra: Dict[str, Any] = {"experiment": experiment, "tasks": list(cfg.task_keys)}
    if arch is None:
        best, picked = best_of_experiment(cfg, experiment, experiments_dir)
        arch, stage = dict(best["arch"] or {}), best["stage"]
        extra.update(picked)
    else:
        extra.update(source="arch", stage=stage)
    for _, one in each_task(cfg):
        check_replaceable(WorkDir.of(one).export_dir(name), force=force)
    evaluator = MultiTaskEvaluator(cfg, int(stage or 0), progress=progress, experiment=experiment)
    source = evaluator.load_stage()  # every task's supernet: the shared encoder, its own head
    first = next(iter(evaluator.evaluators.values()))
    arch = first.validate_arch(dict(arch))
    meta = {**extra, "supernet": source, "supernet_stage": evaluator.stage, "supernet_experiment": experiment}
    out = {}
    for task in evaluator.multi.tasks:
        out[task.name] = export_loaded(task.setup, arch, name, {**meta, "task": task.name}, source)
        logger.info("task %s: %s", task.name, out[task.name].path)
    return out


def _encoder_state(model) -> Dict[str, Any]:
    return {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in ENCODER_MODULES}


def distill_multitask(cfg: ExperimentConfig, *, name: str = SEARCHED, force: bool = False,
                      progress: bool = True) -> Dict[str, DistillResult]:
    """General KD once, then task KD per task from that general student; ``{task: DistillResult}``.

    Every task's ``exports/<name>`` must exist (:func:`export_multitask`). The general student is
    the first task's export, copied to the multi-task work directory's ``exports/<name>`` and
    distilled there on the corpus (``distill.general_steps``; done once, kept for later runs and
    new tasks). With ``distill.general_steps`` 0 each task is distilled from its export as it is.
    """
    _multi(cfg, "distill_multitask")
    tasks = each_task(cfg)
    folders = {key: WorkDir.of(one).export_dir(name) for key, one in tasks}
    exported = {key: load_exported(folder) for key, folder in folders.items()}  # all present, before any work
    first_key, first_cfg = tasks[0]
    setups: Dict[str, KDSetup] = {}
    general: Optional[Dict[str, Any]] = None
    if int(cfg.distill.general_steps):
        general_cfg = dataclasses.replace(first_cfg, distill=dataclasses.replace(first_cfg.distill, task_steps=0))
        general_dir = WorkDir.of(cfg).export_dir(name)
        plan = plan_distill(general_cfg).to_dict()
        current = load_exported(general_dir) if (general_dir / "export_meta.json").is_file() else None
        if force or current is None or current.arch != exported[first_key].arch \
                or (distill_record(current.meta) or {}).get("plan") != plan:
            _copy_export(folders[first_key], general_dir)
            setups[first_key] = KDSetup.from_config(first_cfg, progress=progress)
            logger.info("general KD once: %d steps through task %s's teacher into %s", plan["general_steps"],
                        first_key, general_dir)
            run_distill(general_cfg, general_dir, force=True, progress=progress, setup=setups[first_key])
        general = {"plan": plan, "student": str(general_dir)}
        encoder = _encoder_state(load_exported(general_dir).model)
    results = {}
    for key, one in tasks:
        task_cfg = dataclasses.replace(one, distill=dataclasses.replace(one.distill, general_steps=0))
        setup = setups.get(key) or KDSetup.from_config(one, progress=progress)
        if general is not None:
            record = dict(exported[key].meta.get("extra") or {})
            if force or record.get(MULTITASK_GENERAL_KEY) != general:
                _start_from(exported[key], encoder, setup, {**record, MULTITASK_GENERAL_KEY: general})
        results[key] = run_distill(task_cfg, folders[key], force=force, progress=progress, setup=setup)
        logger.info("task %s: dev %s %.4f", key, results[key].metric, results[key].dev_metric)
    return results


def _copy_export(source, dest) -> None:
    """``dest`` becomes a copy of export ``source`` (written beside it, then swapped in)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(dest.name + ".copying")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)


def _start_from(exported, encoder: Mapping[str, Any], setup: KDSetup, extra: Dict[str, Any]) -> None:
    """Re-export a loaded export into its folder with the general student's encoder and its own head."""
    folder, model = exported.path, exported.model
    missing, unexpected = model.load_state_dict(dict(encoder), strict=False)
    if unexpected or any(k.split(".", 1)[0] in ENCODER_MODULES for k in missing):
        raise ConfigError(f"{folder}: the general student's encoder does not fit this export ({len(unexpected)} "
                          f"unexpected, {len(missing)} missing tensors); export every task from one search")
    extra = {k: v for k, v in extra.items() if k != DISTILL_KEY}  # its task distillation starts anew
    export_student(exported.config, exported.arch, model, folder, tokenizer=setup.tokenizer,
                   label_names=exported.label_names, task=setup.task.spec, extra_meta=extra)


# ---------------------------------------------------------------------------------------------
# The latency-matched baseline and the suite report
# ---------------------------------------------------------------------------------------------


def ensure_multitask_baseline(cfg: ExperimentConfig, *, name: str = LATENCY_BASELINE, searched: str = SEARCHED,
                              force: bool = False, progress: bool = True) -> Dict[str, DistillResult]:
    """The latency-matched BERT-MLP baseline through the searched student's steps: BERT's MLP, stack
    1, at the width nearest the searched arch's latency (:func:`~.baselines.latency_baseline_arch`,
    the multi-task work directory's table), sliced from the same multi-task supernet stage for every
    task, general KD once, task KD per task. ``{task: DistillResult}``."""
    _multi(cfg, "ensure_multitask_baseline")
    first = load_exported(WorkDir.of(each_task(cfg)[0][1]).export_dir(searched))
    extra = first.meta.get("extra") or {}
    experiment, stage = extra.get("supernet_experiment") or extra.get("experiment"), extra.get("supernet_stage")
    if not experiment:
        raise ConfigError(f"{first.path} does not say which multi-task search it came from; export it with "
                          "nni-effbert export -c CONFIG --experiment ID")
    space = EfficientBertSupernet(first.config)
    table = table_for_config(cfg, space_config=first.config, progress=progress)
    choice = latency_baseline_arch(space, table, dict(first.arch), settings=latency_settings(cfg))
    logger.info("latency-matched baseline: BERT MLP, stack 1, width %d (predicted %.3f ms vs %.3f searched)",
                choice.width, choice.predicted_ms, choice.target_predicted_ms)
    current = [load_exported(WorkDir.of(one).export_dir(name)) if (WorkDir.of(one).export_dir(name) /
                                                                    "export_meta.json").is_file() else None
               for _, one in each_task(cfg)]
    if force or any(c is None or c.arch != choice.arch for c in current):
        export_multitask(cfg, experiment, name=name, arch=choice.arch, stage=stage, force=True, progress=progress)
    return distill_multitask(cfg, name=name, force=force, progress=progress)


def suite_report(cfg: ExperimentConfig, *, searched: str = SEARCHED, baseline: str = LATENCY_BASELINE,
                 progress: bool = True) -> Dict[str, Any]:
    """The GLUE-style suite table of a multi-task config: every task's teacher, baseline and searched
    dev metric, their weighted average, the paired comparisons (per task and of the average), and
    latency / params once per model. Writes ``<workdir>/reports/suite.{md,json}``; returns the data."""
    _multi(cfg, "suite_report")
    weights = {t.key: float(t.weight) for t in cfg.tasks}
    rows, scores = {}, {"searched": {}, "baseline": {}}
    models: Dict[str, Dict[str, Any]] = {}
    for key, one in each_task(cfg):
        setup = KDSetup.from_config(one, progress=progress)
        row = {"metric": setup.task.spec.metric, "teacher": float(setup.teacher_marker.get("dev_metric"))}
        for label, name in (("searched", searched), ("baseline", baseline)):
            folder = WorkDir.of(one).export_dir(name)
            exported = load_exported(folder)
            record = distill_record(exported.meta)
            if record is None:
                raise ConfigError(f"{folder} is not distilled; run nni-effbert distill -c CONFIG (and the baseline: "
                                  "nni-effbert report -c CONFIG distils it)")
            row[label] = float(record["dev_metric"])
            models.setdefault(label, {"arch": exported.arch, "params": int(exported.meta["params"]),
                                      "latency_ms": float(record["latency_ms"])})
            per_row = dev_row_scores(setup, folder)
            if per_row is not None:
                scores[label][key] = per_row
        if key in scores["searched"] and key in scores["baseline"]:
            row["paired"] = paired_scores(scores["searched"][key], scores["baseline"][key], name_a="searched",
                                          name_b="baseline").to_dict()
        rows[key] = row
    total = sum(weights.values())
    average = {label: sum(weights[k] * rows[k][label] for k in rows) / total
               for label in ("teacher", "baseline", "searched")}
    suite = None
    if len(scores["searched"]) == len(rows) and len(scores["baseline"]) == len(rows):
        suite = paired_suite(scores["searched"], scores["baseline"], weights, name_a="searched",
                             name_b="baseline").to_dict()
    data = {"tasks": rows, "weights": weights, "average": average, "paired_average": suite, "models": models}
    out = WorkDir.of(cfg).root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(data, out / "suite.json")
    lines = ["# Suite report", "", "| task (weight) | metric | teacher | baseline (latency-matched) | searched | "
             "searched - baseline (95% CI, p) |", "|---|---|---:|---:|---:|---|"]
    for key, row in rows.items():
        p = row.get("paired")
        cell = (f"{p['diff']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], p {p['p_value']:.3g}" if p
                else "(not a per-row metric)")
        lines.append(f"| {key} ({weights[key]:g}) | {row['metric']} | {row['teacher']:.4f} | {row['baseline']:.4f} | "
                     f"{row['searched']:.4f} | {cell} |")
    cell = (f"{suite['diff']:+.4f} [{suite['ci_low']:+.4f}, {suite['ci_high']:+.4f}], p {suite['p_value']:.3g}"
            if suite else "(needs per-row metrics on every task)")
    lines.append(f"| **weighted average** | | {average['teacher']:.4f} | {average['baseline']:.4f} | "
                 f"{average['searched']:.4f} | {cell} |")
    lines += ["", "| model | params | latency (ms, batch 1) |", "|---|---:|---:|"]
    lines += [f"| {label} | {m['params']:,} | {m['latency_ms']:.2f} |" for label, m in models.items()]
    lines += ["", "Paired over each task's dev rows (bootstrap within tasks; permutation swapping the two models "
              "row by row), two-sided; one distill seed per student."]
    atomic_write_text("\n".join(lines) + "\n", out / "suite.md")
    data["markdown"] = "\n".join(lines)
    return data
