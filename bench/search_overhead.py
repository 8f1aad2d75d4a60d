"""The quickstart's search phase end to end, with the warm trial worker and without it (issue 28).

::

    python bench/search_overhead.py --workdir /tmp/qs [--runs 1] [--out bench/results/search_overhead]

``--workdir`` holds the quickstart config and its fine-tuned teacher (``bench/trial_overhead.py``
makes both). Each run copies the teacher into a new work directory beside it and runs
``nni-effbert search -c <config> --wait`` there (nnictl, every stage: warm-ups and candidates),
``warm`` (the default: the search starts a warm worker) and ``fresh`` (``--no-warm-worker``)
interleaved, the order alternating run by run. Reported per run: the search's wall time (the
command's, from start to its return), the number of trials and, per trial, its parameters and
final metric, so that the two versions' trials and scores can be compared: same seeds, the same
trials should get the same scores. The machine's load average is recorded with every run.

Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def trial_spans(experiment_dir: Path) -> List[Dict[str, float]]:
    """Each trial's time from RUNNING (else WAITING) to its end, from the NNI manager's own
    event log (``db/nni.sqlite``), in seconds from the first event."""
    import sqlite3  # local: stdlib, the driver only

    dbs = list(experiment_dir.glob("*/db/nni.sqlite"))
    if not dbs:
        return []
    with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT timestamp, trialJobId, event FROM TrialJobEvent ORDER BY timestamp").fetchall()
    if not rows:
        return []
    t0 = rows[0][0]
    events: Dict[str, Dict[str, int]] = {}
    for ts, trial, event in rows:
        events.setdefault(trial, {})[event] = ts
    spans = []
    for trial, ev in events.items():
        start = ev.get("RUNNING", ev.get("WAITING"))
        end = next((ev[k] for k in ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED") if k in ev), None)
        if start is not None and end is not None:
            spans.append({"trial": trial, "start": (start - t0) / 1000.0, "end": (end - t0) / 1000.0})
    return sorted(spans, key=lambda x: x["start"])


def run_search(config: Path, teacher: Path, scratch: Path, tag: str, warm: bool, timeout: float) -> Dict[str, Any]:
    """One search in a new work directory ``scratch/tag`` (the teacher copied in)."""
    from _common import load_now  # local: the driver only
    from nni_effbert.nas.records import read_nni_trials  # local: the driver only

    work = scratch / tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(teacher, work / "teacher")
    cmd = [sys.executable, "-m", "nni_effbert.cli", "search", "-q", "-c", str(config), f"--set=workdir={work}",
           "--wait", f"--timeout={timeout:.0f}"]
    if not warm:
        cmd.append("--no-warm-worker")
    load = load_now()[0]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=str(scratch), capture_output=True, text=True)
    wall = time.monotonic() - started
    (scratch / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"search {tag} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    found = re.search(r"experiment (\w+) started", proc.stdout + proc.stderr)
    if not found:
        raise SystemExit(f"search {tag}: no experiment id in its output:\n{proc.stdout[-2000:]}")
    trials = read_nni_trials(found.group(1), experiments_dir=work / "nni-experiments")
    forked = sum("forked (parent" in p.read_text(errors="replace")
                 for p in (work / "nni-experiments").rglob("trial.stderr"))
    scored = sorted(({"stage": t.get("stage"), "arch": t.get("arch"), "metric": t.get("metric")}
                     for t in trials if t.get("metric") is not None),
                    key=lambda t: (str(t["stage"]), json.dumps(t["arch"], sort_keys=True)))
    spans = trial_spans(work / "nni-experiments")
    return {"tag": tag, "warm": warm, "wall": wall, "spans": spans,
            "in_trials": sum(x["end"] - x["start"] for x in spans), "load_before": load, "load_after": load_now()[0],
            "trials": len(trials), "forked_trials": forked, "scored": scored, "experiment": found.group(1)}


def write(rows: List[Dict[str, Any]], args, machine) -> List[str]:
    warm = [r for r in rows if r["warm"]]
    fresh = [r for r in rows if not r["warm"]]
    med = {name: statistics.median(r["wall"] for r in rs) if rs else float("nan")
           for name, rs in (("warm", warm), ("fresh", fresh))}
    pairs = list(zip(warm, fresh))
    same = [json.dumps(w["scored"], sort_keys=True) == json.dumps(f["scored"], sort_keys=True) for w, f in pairs]
    result = {"machine": machine, "config": str(args.config), "rows": rows, "median_wall": med,
              "speedup": med["fresh"] / med["warm"] if warm and fresh else None, "same_trials_and_scores": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# The quickstart's search phase, warm worker vs fresh trial processes (issue 28)", "",
             f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores')} cores, load average at start {machine['loadavg']}. Command: "
             f"`python bench/search_overhead.py --workdir {args.workdir} --runs {args.runs}`; config "
             f"`{args.config.name}` (every stage: warm-up trials and candidates, trial concurrency as configured).", "",
             "In trials: the sum of the trials' run times (RUNNING to their end, from the NNI manager's event "
             "log); the rest of the wall time is nnictl, the manager and the search's own start and end.", "",
             "| run | version | wall s | in trials s | trials | forked by the worker | scored | load before / after |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['tag'].split('-')[-1]} | {'warm' if r['warm'] else 'fresh'} | {r['wall']:.1f} | "
                     f"{r.get('in_trials', float('nan')):.1f} | "
                     f"{r['trials']} | {r['forked_trials']} | {len(r['scored'])} | "
                     f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    if warm and fresh:
        lines += ["", f"Median wall: warm {med['warm']:.1f} s, fresh {med['fresh']:.1f} s: the warm worker's search "
                      f"is **{med['fresh'] / med['warm']:.2f}x** as fast (target: at least 1.5x).",
                  f"Same trials with the same scores in each (warm, fresh) pair: {same}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path, help="holds quickstart.yml and teacher/")
    parser.add_argument("--runs", type=int, default=1, help="(warm, fresh) pairs")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per search")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "search_overhead")
    parser.add_argument("--rewrite", action="store_true",
                        help="only rewrite <out>.md / .json from the runs recorded in <out>.json (and their work dirs)")
    args = parser.parse_args(argv)
    from _common import machine_info  # local: the driver only

    if args.rewrite:
        recorded = json.loads(args.out.with_suffix(".json").read_text())
        args.workdir, args.config = Path(recorded["config"]).parent, Path(recorded["config"])
        args.runs = max(int(r["tag"].split("-")[-1]) for r in recorded["rows"]) + 1
        for r in recorded["rows"]:
            if "spans" not in r:
                r["spans"] = trial_spans(args.workdir / "bench-search-overhead" / r["tag"] / "nni-experiments")
                r["in_trials"] = sum(x["end"] - x["start"] for x in r["spans"])
        print("\n".join(write(recorded["rows"], args, recorded["machine"])))
        return 0

    args.workdir = args.workdir.resolve()
    args.config = args.workdir / "quickstart.yml"
    teacher = args.workdir / "teacher"
    if not args.config.is_file() or not (teacher / "effbert_teacher.json").is_file():
        raise SystemExit(f"{args.workdir} has no quickstart.yml and fine-tuned teacher/: run "
                         f"`python bench/trial_overhead.py --workdir {args.workdir}` first")
    scratch = args.workdir / "bench-search-overhead"
    scratch.mkdir(exist_ok=True)
    machine = machine_info()
    rows: List[Dict[str, Any]] = []
    for i in range(args.runs):
        for warm in ((True, False) if i % 2 == 0 else (False, True)):
            tag = f"{'warm' if warm else 'fresh'}-{i}"
            r = run_search(args.config, teacher, scratch, tag, warm, args.timeout)
            rows.append(r)
            print(f"run {i} {tag}: {r['wall']:.1f} s, {r['trials']} trials ({r['forked_trials']} forked), "
                  f"load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
            write(rows, args, machine)
    print("\n".join(write(rows, args, machine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
