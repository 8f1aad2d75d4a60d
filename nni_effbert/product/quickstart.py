"""``nni-effbert quickstart``: the whole product on the embedded SST-2 default, on a CPU.

::

    nni-effbert quickstart [--data-dir DIR] [--workdir DIR] [--budget smoke|default]

Steps (one progress bar over them, each step with its own bars):

1. fine-tune the MiniLM teacher (``teacher.model: minilm``, the ``[quickstart]`` extra) on a few
   thousand SST-2 rows;
2. the progressive search through ``nnictl`` (:func:`nni_effbert.nas.launcher.run_search`, waiting
   for the end), with the quickstart preset and shortened stages;
3. export the best trial; 4. distil it; 5. export and distil the baseline with the same budget
   and write the report;
6. print the comparison table and the paths of the report and the exported model.

The config is :data:`QUICKSTART_YAML` with the overrides of :data:`BUDGETS` on top; it is
written to ``<workdir>/quickstart.yml`` so every step (and every nnictl trial) reads the same
file. Data: ``--data-dir``, else ``$EFFBERT_DATA_DIR``, else the ``datasets`` hub (offline, the
error says to pass ``--data-dir``). Running it again reuses the fine-tuned teacher, caches and
distilled students of the same settings; the search runs again.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from tqdm.auto import tqdm

from ..config import ExperimentConfig, apply_overrides
from ..errors import ConfigError, EffBertError
from ..io import atomic_write_text
from ..kd.teacher_finetune import finetune_from_config
from ..kd.setup import KDSetup
from ..nas.kd_evaluator import KDEvaluator
from ..nas.launcher import run_search
from .distill import run_distill
from .report import build_report
from .students import SEARCHED, export_best, keep_previous_export

__all__ = ["QUICKSTART_YAML", "BUDGETS", "SMOKE_NOTE", "PipelineResult", "write_config", "run_pipeline"]

logger = logging.getLogger(__name__)

#: The embedded default (``examples/sst2/effbert.yml`` with the quickstart's budgets).
QUICKSTART_YAML = """\
workdir: effbert-quickstart
seed: 0
task:
  name: sst2
  data_dir:
  max_seq_length: 64
  max_train_rows: 3000
  search_rows: 500
  dev_fraction: 1.0
teacher:
  model: minilm
  finetune: {epochs: 1, learning_rate: 1.0e-4, batch_size: 32, warmup_ratio: 0.1, weight_decay: 0.01}
student:
  preset: quickstart
  overrides: {}
# init: teacher (issue 13, bench/results/teacher_init.md): the supernet starts from the teacher's
# weights; the earlier start is still runnable with --set warmup.init=teacher_embeddings.
warmup: {steps: 150, learning_rate: 5.0e-4, batch_size: 32, init: teacher, importance: taylor, importance_batches: 50}
kd: {temperature: 1.0, attention_weight: 1.0, hidden_weight: 1.0, prediction_weight: 1.0, hidden_loss: mse}
evaluator:
  train_steps: 40
  eval_interval: 40
  batch_size: 32
  learning_rate: 1.0e-4
  latency_repeats: 10
  latency_seq_length: 128
search:
  trial_concurrency: 1
  seed: 0
  stages:
    - {name: coarse, kind: joint, trials: 4, warmup_steps: 150}
    - {name: expression, kind: expression, trials: 3, warmup_steps: 60}
    - {name: size, kind: size, trials: 3, warmup_steps: 60, general_warmup_steps: 20, train_steps: 0}
distill: {general_steps: 60, task_steps: 180, learning_rate: 2.0e-4, batch_size: 32, eval_interval: 90}
"""

#: ``--budget`` name -> ``--set`` style overrides of :data:`QUICKSTART_YAML`.
BUDGETS: Dict[str, List[str]] = {
    "default": [],
    # The same pipeline with every budget at its smallest useful size.
    "smoke": [
        "task.max_train_rows=600", "task.search_rows=100", "task.max_dev_rows=200",
        "teacher.finetune.max_steps=15",
        "evaluator.train_steps=4", "evaluator.eval_interval=4", "evaluator.latency_repeats=5",
        "search.stages.0.trials=2", "search.stages.0.warmup_steps=10",
        "search.stages.1.trials=1", "search.stages.1.warmup_steps=5",
        "search.stages.2.trials=2", "search.stages.2.warmup_steps=5", "search.stages.2.general_warmup_steps=2",
        "distill.general_steps=10", "distill.task_steps=20", "distill.eval_interval=0",
        "warmup.importance_batches=5",
    ],
}


#: Printed after a ``--budget smoke`` run: its scores carry no information.
SMOKE_NOTE = ("--budget smoke proves that the pipeline runs end to end, nothing more: at these budgets nothing "
              "has time to learn, so scores near the majority-class rate and ties between candidates are expected; "
              "run --budget default to compare students")


def write_config(workdir: Path, budget: str, data_dir: str = None) -> Path:
    """Write the quickstart config of ``budget`` into ``workdir/quickstart.yml``; returns the path."""

    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    data = yaml.safe_load(QUICKSTART_YAML)
    apply_overrides(data, BUDGETS[budget])
    data["workdir"] = str(workdir)
    if data_dir:
        folder = os.path.abspath(os.path.expanduser(data_dir))
        if not os.path.isdir(folder):
            raise ConfigError(f"--data-dir: folder not found: {folder} (give a GLUE folder holding SST-2/train.tsv)")
        data["task"]["data_dir"] = folder
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "quickstart.yml"

    atomic_write_text(f"# nni-effbert quickstart config (--budget {budget})\n"
                      + yaml.safe_dump(data, sort_keys=False), path)
    return path


def _search(cfg: ExperimentConfig, config_path: Path, port, progress: bool):
    kwargs: Dict[str, Any] = {"config_path": str(config_path), "wait": True, "progress": progress}
    if port is not None:
        kwargs["port"] = port
    return run_search(cfg, **kwargs)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced.

    Attributes
    ----------
    teacher : TeacherResult
        The fine-tuned teacher (its dev metric and folder).
    experiment_id : str
        The search's NNI experiment.
    export : ExportInfo
        The exported best trial (its folder is the distilled student).
    distilled : DistillResult
        The searched student's final distillation.
    report : ReportOutcome
        Table rows, the formatted table and the report's paths.
    timings : dict
        Step name -> wall seconds.
    """

    teacher: Any
    experiment_id: str
    export: Any
    distilled: Any
    report: Any
    timings: Dict[str, float] = field(default_factory=dict)


def run_pipeline(cfg: ExperimentConfig, config_path: Path, *, port: Optional[int] = None,
                 progress: bool = True, search_only: bool = False) -> PipelineResult:
    """teacher -> search (nnictl, waited for) -> export -> distill -> baseline + report, for ``cfg``.

    ``config_path`` is the file ``cfg`` was loaded from (every nnictl trial reads it). The
    quickstart runs this on its embedded config; ``bench/pipeline.py`` on a larger one.
    ``search_only`` stops after the search (``export``, ``distilled`` and ``report`` are then
    ``None``): for a caller that distils the searched arch its own way, as the latency-budget bench.
    """

    steps = ["teacher", "search"] + ([] if search_only else ["export", "distill", "baseline + report"])
    bar = tqdm(total=len(steps), desc="pipeline", disable=not progress, position=0, dynamic_ncols=True)
    timings: Dict[str, float] = {}

    def step(name: str) -> None:
        timings[name] = time.perf_counter()
        bar.set_postfix_str(name)
        tqdm.write(f"== {name}")

    def done(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]
        bar.update(1)

    try:
        step("teacher")
        teacher = finetune_from_config(cfg, progress)
        tqdm.write(f"teacher: dev {teacher.metric} = {teacher.dev_metric:.4f} ({teacher.path})")
        done("teacher")

        step("search")
        result = _search(cfg, config_path, port, progress)
        tqdm.write(f"search: experiment {result.experiment_id} {result.status}")
        if not result.ok:
            why = f": {result.error}" if result.error else ""
            raise EffBertError(f"the search (experiment {result.experiment_id}) ended {result.status} without a "
                               f"scored trial{why}; see its logs under {result.workdir}")
        done("search")
        if search_only:
            return PipelineResult(teacher=teacher, experiment_id=result.experiment_id, export=None, distilled=None,
                                  report=None, timings=timings)

        step("export")
        setup = KDSetup.from_config(cfg, progress=progress)
        keep_previous_export(cfg, SEARCHED)  # a rerun never destroys the previous (distilled) student
        info = export_best(cfg, result.experiment_id, evaluator=KDEvaluator(cfg, progress=progress, setup=setup),
                           force=False)
        tqdm.write(f"export: trial {info.trial['trial_id']} -> {info.path}")
        done("export")

        step("distill")
        distilled = run_distill(cfg, info.path, progress=progress, setup=setup)
        tqdm.write(f"distill: dev {distilled.metric} {distilled.before:.4f} -> {distilled.dev_metric:.4f}")
        done("distill")

        step("baseline + report")
        outcome = build_report(cfg, experiment=result.experiment_id, searched_dir=info.path, progress=progress,
                               setup=setup)
        done("baseline + report")
    finally:
        bar.close()
    return PipelineResult(teacher=teacher, experiment_id=result.experiment_id, export=info, distilled=distilled,
                          report=outcome, timings=timings)
