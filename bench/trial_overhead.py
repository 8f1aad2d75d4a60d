"""Where an nnictl trial's wall time goes: start-up, work, teardown (stage 1 and stage 3), with
the warm trial worker and without it.

::

    python bench/trial_overhead.py --workdir /tmp/qs --data-dir ../shared/data/glue \
        [--before-src /tmp/before] [--runs 5] [--budget default] [--out bench/results/trial_overhead]

The work directory holds the quickstart config (``--budget default``: quickstart preset,
MiniLM teacher, 2,000 SST-2 train rows, the 872 dev rows); missing parts are made first (the
teacher, the warm-up of stage 0; stage 2 runs without its own warm-up and inherits that
supernet, see ``TRIAL_SETS``). Each run is one trial process started as NNI
starts it: ``python -m nni_effbert.trial -c quickstart.yml`` with a file-backed NNI trial
channel (``NNI_TRIAL_COMMAND_CHANNEL``), so the parameters come from
``nni.get_next_parameter()``, the supervisor runs as under nnictl and the metric goes through
``nni.report_final_result``:

* **stage 1**: a candidate of stage 0 (``coarse``), KD fine-tuned for ``evaluator.train_steps``
  (20) steps, then scored on dev;
* **stage 3**: a candidate of stage 2 (``size``) with ``_train_steps: 0``: scored on the
  inherited weights.

The split, from timestamps the trial process writes (the bench wraps the evaluator's
functions; nothing in the package is changed for it):

* start-up: process start (just before ``Popen``) to the first batch (the first KD step or,
  without training, the first evaluation batch on the search split); imports, config, data, teacher cache,
  supernet checkpoint, subnet;
* work: first batch to the end of ``KDEvaluator.evaluate`` (training, dev, latency, record);
* teardown: from there to the exit of the process NNI started (printing, interpreter exit,
  the supervisor's exit).

Versions, interleaved run by run (the order alternates), so a change of the machine's load
hits all of them:

* ``warm``: the trial process (the supervisor) has its child forked by the warm worker
  (:mod:`nni_effbert.nas.warm_worker`), started once by the bench for the work directory, as
  ``nni-effbert search`` does; the trial's start-up is what is left after the imports;
* ``fresh``: the same with ``NNI_EFFBERT_WARM_WORKER=off`` (``search.warm_worker: false``): the
  child is a fresh interpreter, as before the worker (one line on stderr says so).

The machine's load average is recorded at the start and with every run (``load`` per row).

``--before-src`` also runs the same trials from another source tree (a checkout of an older
commit: ``git worktree add /tmp/before bc3f699``) by mapping the ``nni_effbert`` packages to it
in the trial processes; before and after runs are interleaved, run by run, so a change of the
machine's load hits both. Reported: the median of ``--runs`` runs per (version, stage), wall
seconds and CPU seconds (user + system of all the trial's processes).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARKS_ENV = "EFFBERT_BENCH_MARKS"
SRC_ENV = "EFFBERT_BENCH_SRC"
PARAMS_ENV = "EFFBERT_BENCH_PARAMS"
METRICS_ENV = "EFFBERT_BENCH_METRICS"
CHILD_ENV = "NNI_EFFBERT_TRIAL_SUPERVISOR"  # nni_effbert.nas.trial_runner / .supervisor: set in the supervised child
WARM_ENV = "NNI_EFFBERT_WARM_WORKER"  # nni_effbert.nas.warm_worker.ENV: its directory, or "off"
#: Stage 2 without its own warm-up: its candidates inherit the stage-0 supernet (or
#: ``supernet/stage2.pt`` when it exists). The weights' values do not change what a trial does.
TRIAL_SETS = ["--set", "search.stages.2.warmup=false"]


# ---------------------------------------------------------------------------------------------
# Inside the trial processes
# ---------------------------------------------------------------------------------------------

def _channel_base():
    from nni.runtime.trial_command_channel.base import TrialCommandChannel  # local: only trial processes load nni

    return TrialCommandChannel


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Import ``nni_effbert`` (and its ``search_spaces`` / ``strategies`` packages, which live
    beside it in the source tree) from another checkout."""

    def __init__(self, src: Path):
        self.dirs = {"nni_effbert": src / "nni_effbert", "nni_effbert.search_spaces": src / "search_spaces",
                     "nni_effbert.strategies": src / "strategies"}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _mark(marks: Dict[str, float], name: str) -> None:
    marks.setdefault(name, time.time())
    marks.setdefault(name + "_cpu", time.process_time())


def _instrument(marks: Dict[str, float]) -> None:
    """Wrap the evaluator's functions to time the first batch and the end of the work."""
    from nni_effbert.kd import setup as train  # local: after the source mapping, in the worker process only
    from nni_effbert.nas import kd_evaluator as evaluator

    kd_train, setup_evaluate, evaluate = evaluator.kd_train, train.KDSetup.evaluate, evaluator.KDEvaluator.evaluate
    score_search = getattr(train.KDSetup, "score_search", None)  # candidates are scored on the search split

    def timed_kd_train(*args, **kwargs):
        _mark(marks, "first_batch")
        return kd_train(*args, **kwargs)

    def timed_setup_evaluate(self, *args, **kwargs):
        _mark(marks, "first_batch")
        return setup_evaluate(self, *args, **kwargs)

    def timed_score_search(self, *args, **kwargs):
        _mark(marks, "first_batch")
        return score_search(self, *args, **kwargs)

    def timed_evaluate(self, *args, **kwargs):
        _mark(marks, "work_start")
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            _mark(marks, "work_end")
            Path(os.environ[MARKS_ENV]).write_text(json.dumps(marks))

    evaluator.kd_train = timed_kd_train
    train.KDSetup.evaluate = timed_setup_evaluate
    if score_search is not None:
        train.KDSetup.score_search = timed_score_search
    evaluator.KDEvaluator.evaluate = timed_evaluate


def child_main(argv: List[str]) -> int:
    """A trial process: ``python -m nni_effbert.trial ARGV`` with the bench's timestamps."""
    src = os.environ.get(SRC_ENV)
    if src:
        sys.meta_path.insert(0, _SourceFinder(Path(src)))
    marks: Dict[str, float] = {}
    worker = bool(os.environ.get(CHILD_ENV))  # the supervisor only starts the worker and waits
    if worker:
        import nni_effbert.nas.trial_runner  # noqa: F401  # local: the worker's imports, as the trial's own
        _instrument(marks)
    import nni_effbert.trial as entry  # local: after the source mapping

    return entry.main(argv)


if __name__ != "__main__" and os.environ.get("NNI_TRIAL_COMMAND_CHANNEL", "").endswith("FileTrialChannel"):
    # Imported by NNI's trial API (``import://trial_overhead.FileTrialChannel``) in the worker.
    class FileTrialChannel(_channel_base()):
        """Parameters from ``$EFFBERT_BENCH_PARAMS``; metrics appended to ``$EFFBERT_BENCH_METRICS``."""

        def receive_parameter(self):
            params = json.loads(Path(os.environ[PARAMS_ENV]).read_text())
            return {"parameter_id": 0, "parameter_source": "algorithm", "parameters": params, "parameter_index": 0}

        def send_metric(self, type, parameter_id, trial_job_id, sequence, value):  # noqa: A002 - NNI's name
            with open(os.environ[METRICS_ENV], "a", encoding="utf-8") as f:
                f.write(json.dumps({"type": type, "value": value}) + "\n")


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def _cli(args: List[str]) -> None:
    subprocess.run([sys.executable, "-m", "nni_effbert.cli", *args], check=True, cwd=REPO)


def prepare(workdir: Path, data_dir: Optional[str], budget: str = "default") -> Path:
    """The quickstart config in ``workdir`` with its teacher and the stage-0 / stage-2 supernets."""
    from nni_effbert.product.quickstart import write_config  # local: the driver only

    config = workdir / "quickstart.yml"
    if not config.is_file():
        config = write_config(workdir, budget, data_dir)
    if not (workdir / "teacher").is_dir():
        _cli(["teacher", "-q", "-c", str(config)])
    if not (workdir / "supernet" / "stage0.pt").is_file():
        _cli(["warmup", "-q", "-c", str(config), "--stage", "0"])
    return config


def trial_parameters(config: Path) -> Dict[str, Dict[str, Any]]:
    from nni_effbert.config import load_config  # local: the driver only
    from nni_effbert.search_spaces import preset_config
    from nni_effbert.search_spaces.supernet import EfficientBertSupernet

    cfg = load_config(str(config))
    space = EfficientBertSupernet(preset_config(cfg.student.preset, **dict(cfg.student.overrides)))
    arch = space.bert_arch(width=space.config.widths[1], stack=2)
    return {"stage1": {**arch, "_stage": 0}, "stage3": {**arch, "_stage": 2, "_train_steps": 0}}


def _with_here(pythonpath: str) -> str:
    """``PYTHONPATH`` with this folder first (once: the worker checks that it is the trials')."""
    return pythonpath if pythonpath.split(os.pathsep)[0] == str(HERE) else os.pathsep.join([str(HERE), pythonpath])


def run_trial(config: Path, params: Dict[str, Any], src: Optional[str], scratch: Path, tag: str,
              warm: Optional[Path] = None) -> Dict[str, float]:
    scratch.mkdir(parents=True, exist_ok=True)
    files = {k: scratch / f"{tag}.{k}" for k in ("params.json", "marks.json", "metrics.jsonl")}
    files["params.json"].write_text(json.dumps(params))
    for key in ("marks.json", "metrics.jsonl"):
        files[key].unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update({MARKS_ENV: str(files["marks.json"]), PARAMS_ENV: str(files["params.json"]),
                METRICS_ENV: str(files["metrics.jsonl"]), "NNI_TRIAL_JOB_ID": f"bench-{tag}",
                "NNI_TRIAL_COMMAND_CHANNEL": "import://trial_overhead.FileTrialChannel",
                "PYTHONPATH": _with_here(env.get("PYTHONPATH", ""))})
    env.pop(SRC_ENV, None)
    if src:
        env[SRC_ENV] = src
    env[WARM_ENV] = str(warm) if warm is not None else "off"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "-c", str(config), "-q", *TRIAL_SETS]
    with open(scratch / f"{tag}.out", "w") as out, open(scratch / f"{tag}.err", "w") as err:
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=str(scratch), env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        ended = time.time()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    forked = "forked (parent" in (scratch / f"{tag}.err").read_text()
    if warm is not None and not forked:
        raise SystemExit(f"trial {tag} did not run in the warm worker:\n{(scratch / f'{tag}.err').read_text()[-3000:]}")
    if rc != 0 or not files["marks.json"].is_file():
        raise SystemExit(f"trial {tag} failed (exit {rc}):\n{(scratch / f'{tag}.err').read_text()[-3000:]}")
    marks = json.loads(files["marks.json"].read_text())
    finals = [json.loads(line) for line in files["metrics.jsonl"].read_text().splitlines() if '"FINAL"' in line]
    if len(finals) != 1:
        raise SystemExit(f"trial {tag} reported {len(finals)} final results")
    value = finals[0]["value"]
    value = json.loads(value) if isinstance(value, str) else value
    return {"wall": ended - started, "startup": marks["first_batch"] - started,
            "work": marks["work_end"] - marks["first_batch"], "teardown": ended - marks["work_end"],
            "cpu": usage.ru_utime + usage.ru_stime, "startup_cpu_worker": marks["first_batch_cpu"],
            "work_cpu": marks["work_end_cpu"] - marks["first_batch_cpu"],
            "default": float(value["default"]), "latency_ms": float(value.get("latency_ms", float("nan")))}


def _median(rows: List[Dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def write_results(rows, args, workdir: Path, machine: Dict[str, Any]) -> List[str]:
    """Write the ``.json`` / ``.md`` results of the runs so far; returns the table's lines."""
    summary = {}
    for key, rs in rows.items():
        if not rs:
            continue
        summary[key] = {k: round(_median(rs, k), 3) for k in ("wall", "startup", "work", "teardown", "cpu",
                                                              "startup_cpu_worker", "work_cpu", "default",
                                                              "latency_ms")}
        summary[key]["wall_over_work"] = round(_median([{"x": r["wall"] / r["work"]} for r in rs], "x"), 2)
        summary[key]["runs"] = len(rs)
    result = {"machine": machine, "runs": args.runs, "budget": args.budget, "workdir": str(workdir),
              "before_src": args.before_src,
              "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    loads = [r.get("load") for rs in rows.values() for r in rs if r.get("load") is not None]
    lines = [f"# Trial overhead (medians over the runs of each row; load average at start "
             f"{result['machine']['loadavg']}, during the runs {min(loads, default=0):.2f}-{max(loads, default=0):.2f}; "
             f"budget {args.budget})", "",
             "warm: the trial's child forked by the warm worker; fresh: a fresh interpreter (worker off).", "",
             "Wall seconds, then CPU seconds (user + system): all the trial's processes; the worker's up to its",
             "first batch; the worker's work.", "",
             "| version / stage | runs | wall s | start-up s | work s | teardown s | wall / work | CPU s | CPU start-up s "
             "| CPU work s | default (search split) | latency ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['runs']} | {s['wall']:.2f} | {s['startup']:.2f} | {s['work']:.2f} | {s['teardown']:.2f} | "
                     f"{s['wall_over_work']:.2f} | {s['cpu']:.2f} | {s['startup_cpu_worker']:.2f} | "
                     f"{s['work_cpu']:.2f} | {s['default']:.4f} | {s['latency_ms']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--before-src", help="source tree of the 'before' version (a git worktree)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stages", default="stage1,stage3")
    parser.add_argument("--budget", default="default", help="the quickstart budget of the config (smoke: a quick "
                        "proof that the bench runs; its figures mean nothing)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trial_overhead")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from _common import load_now, machine_info  # local: the driver only (imports nni, torch)
    from nni_effbert.nas import warm_worker  # local: the driver only

    workdir = args.workdir.resolve()
    config = prepare(workdir, args.data_dir, args.budget)
    params = trial_parameters(config)
    # The worker is started with the trials' environment (PYTHONPATH, which it checks), as the
    # search starts it with that of the NNI manager.
    os.environ["PYTHONPATH"] = _with_here(os.environ.get("PYTHONPATH", ""))
    warm_dir = workdir / "bench-warm-worker"
    started = time.time()
    warm_worker.start(warm_dir, "trial", timeout=900)
    print(f"warm worker ready in {time.time() - started:.1f} s (once per search)", flush=True)
    versions = [("warm", None, warm_dir), ("fresh", None, None)]
    if args.before_src:
        versions.append(("before", str(Path(args.before_src).resolve()), None))
    stages = args.stages.split(",")
    rows: Dict[str, List[Dict[str, float]]] = {f"{v}/{s}": [] for v, _, _ in versions for s in stages}
    scratch = workdir / "bench-trial-overhead"
    machine = machine_info()
    try:
        for i in range(args.runs):
            for stage in stages:
                for name, src, warm in (versions if i % 2 == 0 else versions[::-1]):  # alternate who goes first
                    r = run_trial(config, params[stage], src, scratch, f"{name}-{stage}-{i}", warm)
                    r["load"] = load_now()[0]
                    rows[f"{name}/{stage}"].append(r)
                    print(f"run {i} {name:6s} {stage}: wall {r['wall']:.2f} s = start-up {r['startup']:.2f} + work "
                          f"{r['work']:.2f} + teardown {r['teardown']:.2f} (cpu {r['cpu']:.2f} s: start-up "
                          f"{r['startup_cpu_worker']:.2f}, work {r['work_cpu']:.2f}; load {r['load']})", flush=True)
                    write_results(rows, args, workdir, machine)  # after every run: a stopped bench keeps its results
    finally:
        warm_worker.stop(warm_dir, "trial")
    lines = write_results(rows, args, workdir, machine)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
