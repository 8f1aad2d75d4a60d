"""Issue 15 smoke timing: the trial loop's steps/s on CPU vs GPU, fp32 vs bf16, in one process.

    python bench/gpu_smoke.py --out bench/results/gpu_smoke --steps 20 --repeats 3

The trial loop is what a candidate trial runs: :func:`nni_effbert.kd.train.kd_train` of a
quickstart-preset student (BERT's MLP at full width) against the teacher-output cache of the
all-MiniLM-L6-v2 teacher, SST-2 rows at ``max_seq_length`` 64, batch 32. The teacher is
fine-tuned for a few steps and the cache built once, before any timing. Every (device,
precision) runs a short untimed warm-up first (CUDA start, kernel selection), then the rounds
interleave the settings, and the table gives the median steps/s of the rounds.

Without a GPU (``torch.cuda.is_available()`` False) only the CPU settings run, and the script
says so plainly in its output and in the result files.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine_info  # noqa: E402

from nni_effbert.config import load_config  # noqa: E402
from nni_effbert.errors import EffBertError  # noqa: E402
from nni_effbert.kd.teacher_finetune import finetune_from_config  # noqa: E402
from nni_effbert.kd.setup import KDSetup  # noqa: E402
from nni_effbert.kd.sources import CachedTeacher  # noqa: E402
from nni_effbert.kd.train import TrainSettings, kd_train  # noqa: E402
from nni_effbert.runtime import resolve_runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "sst2" / "effbert.yml"
NO_GPU = "no GPU found (torch.cuda.is_available() is False): only the CPU settings were timed"


def _settings(has_cuda: bool):
    runs = [("cpu", "fp32"), ("cpu", "bf16")]
    return runs + ([("cuda", "fp32"), ("cuda", "bf16")] if has_cuda else [])


def _time_loop(setup: KDSetup, teacher: CachedTeacher, steps: int, batch_size: int, seed: int) -> float:
    """Steps/s of ``steps`` KD steps of a fresh BERT-arch student (device work included)."""
    student = setup.space.subnet(setup.space.bert_arch())
    settings = TrainSettings(steps=steps, learning_rate=1e-4, batch_size=batch_size, seed=seed, progress=False)
    if setup.runtime.is_cuda:
        torch.cuda.synchronize(setup.device)
    start = time.perf_counter()
    kd_train(student, teacher, setup.task.train, setup.loss_fn, settings, pad_token_id=setup.pad_token_id,
             runtime=setup.runtime)
    if setup.runtime.is_cuda:
        torch.cuda.synchronize(setup.device)
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_smoke"))
    parser.add_argument("--work", default=str(REPO / "bench" / "work" / "gpu_smoke"))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per setting first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        print(f"gpu_smoke: {NO_GPU}", flush=True)
    base = [f"workdir={args.work}", f"task.data_dir={args.data_dir}", "task.max_train_rows=512",
            "task.max_dev_rows=64", "teacher.finetune.max_steps=4", f"evaluator.batch_size={args.batch_size}"]
    try:
        cpu_cfg = load_config(CONFIG, base + ["runtime.device=cpu", "runtime.precision=fp32"])
        finetune_from_config(cpu_cfg, progress=False)  # reused when already there
        setups, teachers, skipped = {}, {}, {}
        for device, precision in _settings(has_cuda):
            cfg = load_config(CONFIG, base + [f"runtime.device={device}", f"runtime.precision={precision}"])
            try:
                resolve_runtime(cfg)
            except EffBertError as exc:  # e.g. bf16 not supported by this GPU or torch build
                skipped[f"{device}/{precision}"] = str(exc)
                continue
            setup = KDSetup.from_config(cfg, progress=False)
            setups[(device, precision)] = setup
            teachers[(device, precision)] = setup.cached_teacher()  # builds the cache once (first setting)
    except EffBertError as exc:
        print(f"gpu_smoke: error: {exc}", file=sys.stderr)
        return 2

    for key, setup in setups.items():  # untimed warm-up of every setting
        if args.warmup_steps:
            _time_loop(setup, teachers[key], args.warmup_steps, args.batch_size, seed=99)
    rates = {key: [] for key in setups}
    for r in range(args.repeats):  # interleaved rounds; the files are rewritten after every round
        for key, setup in setups.items():
            rates[key].append(_time_loop(setup, teachers[key], args.steps, args.batch_size, seed=r))
            print(f"round {r}: {key[0]}/{key[1]}: {rates[key][-1]:.3f} steps/s (load {load_now()})", flush=True)
        _write(args, setups, rates, skipped, has_cuda, cpu_cfg.task.max_seq_length, r + 1, final=r + 1 == args.repeats)
    return 0


def _write(args, setups, rates, skipped, has_cuda: bool, seq: int, rounds: int, final: bool) -> None:
    ref = statistics.median(rates[("cpu", "fp32")])
    rows = []
    for (device, precision), values in rates.items():
        med = statistics.median(values)
        name = setups[(device, precision)].runtime.describe()
        rows.append({"device": device, "precision": precision, "runtime": name, "median_steps_per_s": round(med, 3),
                     "steps_per_s": [round(v, 3) for v in values], "speedup_vs_cpu_fp32": round(med / ref, 2)})
    result = {"config": str(CONFIG), "steps": args.steps, "repeats": args.repeats, "rounds_done": rounds,
              "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
              "max_seq_length": seq, "gpu_found": has_cuda, "skipped": skipped,
              "note": None if has_cuda else NO_GPU, "machine": machine_info(), "rows": rows}
    if has_cuda:
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = ["# Trial-loop throughput: CPU vs GPU, fp32 vs bf16 (`bench/gpu_smoke.py`)", "",
             f"quickstart student, MiniLM teacher cache, SST-2, batch {args.batch_size}, max_seq_length "
             f"{seq}; {args.warmup_steps} untimed steps per setting, then {args.steps} steps per round, "
             f"{rounds} of {args.repeats} interleaved rounds done, median; torch threads {torch.get_num_threads()}.", ""]
    if not has_cuda:
        lines += [f"**{NO_GPU}.**", ""]
    lines += ["| device | precision | runtime | median steps/s | rounds | vs cpu fp32 |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['device']} | {row['precision']} | {row['runtime']} | {row['median_steps_per_s']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in row['steps_per_s'])} | {row['speedup_vs_cpu_fp32']:.2f}x |")
    for name, why in skipped.items():
        lines.append(f"\nskipped {name}: {why}")
    lines += ["", f"machine: {result['machine']['cpu_model']}, {result['machine']['cores']} cores, "
              f"load {result['machine']['loadavg']} when written" + (f", GPU {result['machine'].get('gpu')}" if has_cuda else "")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if final:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
