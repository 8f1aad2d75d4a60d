"""Driver of ``run.sh``: a tiny nni-effbert search whose trials run through NNI's ``remote``
training service on ``127.0.0.1:<port>`` (the sshd that ``run.sh`` started).

Builds a tiny teacher (the tests' tiny tokenizer and BERT), fine-tunes it and its output cache
with ``nni-effbert teacher`` into ``ROOT/work``, then runs ``nnictl create`` with the
registered ``EfficientBertProgressive`` advisor and::

    trainingService: {platform: remote, machineList: [{host: 127.0.0.1, port: PORT, user: root,
                      sshKeyFile: KEY, pythonPath: <dir of sys.executable>}]}

Trials run in NNI's remote working folder on the "remote" machine and find the work directory
through the absolute path the experiment config names (here the same file system; on a real
cluster, shared storage -- see README.md). Prints and writes ``ROOT/evidence.json``; exits 1
unless every trial SUCCEEDED and the advisor received every candidate's metric.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SPECIAL_TOKENS, N_WORDS, _frequent_words  # noqa: E402
from support.reliability import NniExperiment, make_teacher, params_of, write_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--glue", default=str(REPO.parent / "shared" / "data" / "glue"))
    args = ap.parse_args()
    root, glue = Path(args.root), Path(args.glue)

    vocab = root / "vocab" / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&$%/")
    words = [w for w in _frequent_words(glue, N_WORDS) if w not in chars]
    vocab.write_text("\n".join(SPECIAL_TOKENS + chars + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
                               + words) + "\n")
    teacher = make_teacher(root / "base_teacher", vocab)
    search = {"trial_concurrency": 1, "seed": 0,
              "stages": [{"name": "coarse", "kind": "joint", "trials": 2, "warmup_steps": 2}]}
    exp_yml = write_config(root / "exp.yml", root / "work", teacher, glue, search=search)

    from nni_effbert import cli

    assert cli.main(["teacher", "-q", "-c", str(exp_yml)]) == 0
    machine = {"host": "127.0.0.1", "port": args.port, "user": "root", "sshKeyFile": str(Path(args.key).resolve()),
               "pythonPath": str(Path(sys.executable).parent)}
    code = root / "nni" / "code"  # what NNI uploads to each worker: trials need nothing from it,
    code.mkdir(parents=True, exist_ok=True)  # but NNI 3.0's remote service refuses an empty folder
    (code / "README.txt").write_text("trialCodeDirectory of the nni-effbert remote bench; trials read "
                                     f"{exp_yml} and the folders it names.\n")
    exp = NniExperiment(root / "nni", exp_yml, concurrency=1, max_trials=3, code_dir=root / "nni" / "code",
                        training_service={"platform": "remote", "machineList": [machine]})
    started = time.monotonic()
    try:
        exp.create()
        status, jobs = exp.wait_finished(timeout=900)
        state = exp.settled_state()
        metrics = exp.get("/metric-data")
    finally:
        if exp.id:
            exp.nnictl("stop", exp.id)  # kept (not deleted): its logs are evidence
    evidence = {
        "experiment": exp.id, "status": status, "seconds": round(time.monotonic() - started, 1),
        "machine": {k: v for k, v in machine.items()},
        "trials": [{"id": j["trialJobId"], "seq": j["sequenceId"], "status": j["status"],
                    "kind": "warm-up" if "_warmup_stage" in params_of(j) else "candidate",
                    "final": j.get("finalMetricData", [{}])[0].get("data") if j.get("finalMetricData") else None}
                   for j in jobs],
        "final_metrics_in_rest": sum(m["type"] == "FINAL" for m in metrics),
        "advisor_records": [{"trial_id": r["trial_id"], "status": r["status"], "score": r["score"]}
                            for r in state["records"]],
        "search_done": state["done"],
    }
    (root / "evidence.json").write_text(json.dumps(evidence, indent=2))
    print(json.dumps(evidence, indent=2))
    ok = (status["status"] == "DONE" and len(jobs) == 3 and all(j["status"] == "SUCCEEDED" for j in jobs)
          and all(r["status"] == "succeeded" and (r["warmup"] or r["score"] is not None) for r in state["records"]))
    print("REMOTE RUN OK" if ok else "REMOTE RUN FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
