"""Issue 3 bench: one trial's wall time WITH the teacher-output cache vs WITHOUT it (live
teacher forward every step), same arch, same budget, same run, interleaved; plus the trial
loop's achieved FLOP/s as a fraction of a plain fp32 ``torch.matmul`` peak measured in the
same run.

    python bench/cache_speedup.py --out bench/results/cache_speedup --train-steps 30 --repeats 3

The teacher (MiniLM, fine-tuned on the config's SST-2 subset) and the train-split cache live in
the config's work dir (``bench/work/sst2``); both are built once, before any timing, and reused
across runs. A trial is ``KDEvaluator.evaluate(arch, train_steps=N)`` (subnet, KD loop, final
dev evaluation on the 872-row dev set; latency measurement off). "Without cache" swaps the
evaluator's teacher source for ``KDSetup.live_teacher()`` (the teacher model already loaded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402


def matmul_peak(n: int, reps: int):
    """GFLOP/s of fp32 ``a @ b`` (n x n), best and median of ``reps`` timed calls."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    torch.matmul(a, b)  # warm
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "reps": reps, "best_gflops": max(rates), "median_gflops": statistics.median(rates),
            "all_gflops": rates, "load": load_now(), "threads": torch.get_num_threads()}


def student_train_flops(setup, arch, steps, seed):
    """FLOPs of the student's forward + KD loss + backward on each of the ``steps`` batches the
    trial's loop sees (same seed -> same batches), counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    from nni_effbert.kd.train import iterate_batches

    student = setup.space.subnet(arch)
    student.train()
    teacher = setup.cached_teacher()
    batches = iterate_batches(setup.task.train, int(setup.cfg.evaluator.batch_size), seed, setup.pad_token_id)
    per_step = []
    for _ in range(steps):
        batch = next(batches)
        t_out = teacher(batch)
        counter = FlopCounterMode(display=False)
        with counter:
            s_out = student(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), return_kd=True)
            out = setup.loss_fn(s_out, t_out, batch["attention_mask"])
            out.total.backward()
        student.zero_grad(set_to_none=True)
        per_step.append(int(counter.get_total_flops()))
    return per_step


@contextlib.contextmanager
def live_teacher(setup):
    """Make the evaluator's KD loop run the teacher model on every batch instead of the cache."""
    setup.cached_teacher = setup.live_teacher  # instance attribute shadows the method
    try:
        yield
    finally:
        del setup.cached_teacher


@contextlib.contextmanager
def timed_loop(record):
    """Time ``kd_train`` (the loop alone) inside ``KDEvaluator.evaluate``."""
    import nni_effbert.nas.kd_evaluator as ev

    real = ev.kd_train

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        record["loop_s"] = time.perf_counter() - t0
        return out

    ev.kd_train = wrapper
    try:
        yield
    finally:
        ev.kd_train = real


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path without suffix (.json/.md written)")
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "sst2_bench.yml"))
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the shared 2-core machine 2 threads oversubscribe the "
                        "cores and a step runs several times slower)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("nni", "nni_effbert"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from tqdm import tqdm

    from nni_effbert.config import load_config
    from nni_effbert.nas.kd_evaluator import KDEvaluator

    info = machine_info()
    cfg = load_config(args.config, [f"evaluator.train_steps={args.train_steps}"])
    ev = KDEvaluator(cfg, stage=0, report=False, progress=False, latency=False)
    setup = ev.setup
    t0 = time.perf_counter()
    cache = setup.train_cache()  # built once per work dir (reused across runs), not timed below
    cache_open_s = time.perf_counter() - t0
    setup.teacher_model()  # loaded before timing: the live variant does not pay for loading
    arch = setup.space.bert_arch()
    print(f"teacher dev {setup.task.spec.metric} (marker) = {setup.teacher_marker.get('dev_metric')}; "
          f"cache {cache!r} opened/built in {cache_open_s:.1f}s")

    peak_before = matmul_peak(args.matmul_n, args.matmul_reps)
    print(f"matmul peak before: best {peak_before['best_gflops']:.1f} GFLOP/s")
    runs = []
    order = ["cached", "live"] * args.repeats
    print(f"{len(order)} trials of {args.train_steps} KD steps + dev eval, interleaved cached/live "
          "(live ones take several times longer: the teacher forward runs every step)")
    for i, mode in enumerate(tqdm(order, desc="trials")):
        rec = {"mode": mode, "repeat": i // 2, "load_before": load_now(), "threads": torch.get_num_threads()}
        with contextlib.ExitStack() as stack:
            stack.enter_context(timed_loop(rec))
            if mode == "live":
                stack.enter_context(live_teacher(setup))
            t0 = time.perf_counter()
            res = ev.evaluate(arch, train_steps=args.train_steps, trial_id=f"bench-cache-{mode}-{i}")
            rec["trial_s"] = time.perf_counter() - t0
        rec.update(dev=res["default"], kd_loss=res.get("kd_loss"), load_after=load_now())
        runs.append(rec)
        tqdm.write(f"{mode}: trial {rec['trial_s']:.1f}s, loop {rec['loop_s']:.1f}s, dev {rec['dev']:.4f}, "
                   f"load {rec['load_after'][0]}")
    peak_after = matmul_peak(args.matmul_n, args.matmul_reps)
    flops = student_train_flops(setup, arch, args.train_steps, int(cfg.seed))

    def med(mode, key):
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    cached_trial, live_trial = med("cached", "trial_s"), med("live", "trial_s")
    cached_loop, live_loop = med("cached", "loop_s"), med("live", "loop_s")
    speedup = live_trial / cached_trial
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])
    total_flops = sum(flops)
    achieved_cached = total_flops / cached_loop / 1e9
    achieved_live = total_flops / live_loop / 1e9
    data = {
        "machine": info, "load_end": load_now(), "config": args.config, "train_steps": args.train_steps,
        "repeats": args.repeats, "cache_open_or_build_s": cache_open_s, "arch": "space.bert_arch() (quickstart)", "params": setup.space.count_params(arch),
        "train_rows": len(setup.task.train), "dev_rows": len(setup.task.dev),
        "teacher": {"dir": str(setup.teacher_dir), "dev_metric": setup.teacher_marker.get("dev_metric"),
                    "metric": setup.task.spec.metric, "train_steps": setup.teacher_marker.get("train_steps"),
                    "train_rows": setup.teacher_marker.get("train_rows")},
        "runs": runs, "median_trial_s": {"cached": cached_trial, "live": live_trial},
        "median_loop_s": {"cached": cached_loop, "live": live_loop}, "speedup_trial": speedup,
        "speedup_loop": live_loop / cached_loop, "target_met": speedup >= 2.0,
        "matmul_peak": {"before": peak_before, "after": peak_after, "used_best_gflops": peak},
        "student_flops_per_step": flops, "student_flops_total": total_flops,
        "achieved_gflops_cached_loop": achieved_cached, "fraction_of_peak_cached": achieved_cached / peak,
        "achieved_gflops_live_loop_student_only": achieved_live,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    devs = {m: [round(r["dev"], 4) for r in runs if r["mode"] == m] for m in ("cached", "live")}
    md = f"""# Teacher-output cache speed-up (issue 3)

Machine: {info['cpu_model']}, {info['cores']} cores (shared with other engineers' jobs), torch threads
{info['torch_threads']}, load avg at start {info['loadavg']}, at end {data['load_end']}, {info['date']}.

Setup: `{args.config}`: quickstart preset, arch `space.bert_arch()` ({data['params']} params), SST-2
{data['train_rows']} train rows / {data['dev_rows']} dev rows, max_seq_length {cfg.task.max_seq_length},
batch {cfg.evaluator.batch_size}, {args.train_steps} KD steps per trial from the supernet's seeded random
initialisation (no warm-up), then one dev evaluation. Teacher: MiniLM (all-MiniLM-L6-v2) fine-tuned
{data['teacher']['train_steps']} steps on {data['teacher']['train_rows']} rows: dev {data['teacher']['metric']}
**{data['teacher']['dev_metric']:.4f}**. Cache opened/built before the timed trials ({cache_open_s:.1f} s); teacher model loaded before the live runs.
{args.repeats} repeats of each, interleaved cached/live.

| | median trial (s) | median KD loop (s) | per-run trial s | dev accuracy per run |
|---|---|---|---|---|
| with cache | {cached_trial:.2f} | {cached_loop:.2f} | {', '.join(f"{r['trial_s']:.1f}" for r in runs if r['mode']=='cached')} | {devs['cached']} |
| live teacher | {live_trial:.2f} | {live_loop:.2f} | {', '.join(f"{r['trial_s']:.1f}" for r in runs if r['mode']=='live')} | {devs['live']} |

Speed-up of one trial: **{speedup:.2f}x** (KD loop alone {live_loop / cached_loop:.2f}x). Target >= 2x:
**{'MET' if speedup >= 2 else 'MISSED'}**.

Achieved FLOP/s of the cached trial loop: student forward + KD loss + backward, counted with
`FlopCounterMode` on the same {args.train_steps} batches ({total_flops / 1e9:.1f} GFLOP in all,
{total_flops / args.train_steps / 1e9:.2f} GFLOP/step mean; optimizer, clipping and data loading not counted)
/ median loop time = **{achieved_cached:.2f} GFLOP/s**. fp32 `torch.matmul` {args.matmul_n}x{args.matmul_n}
peak in the same run: best {peak_before['best_gflops']:.1f} GFLOP/s before the trials, {peak_after['best_gflops']:.1f}
after (median {peak_before['median_gflops']:.1f} / {peak_after['median_gflops']:.1f}); fraction of the best:
**{achieved_cached / peak:.1%}**. (Live loop, student FLOPs only: {achieved_live:.2f} GFLOP/s.)
"""
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
