"""Shared helpers of the ``test_reliability_*`` modules.

* :func:`prepared_work`: a tiny experiment ready for trials -- a random tiny BERT teacher
  fine-tuned a few steps by ``nni-effbert teacher``, its output cache, and stage 0's
  supernet from ``nni-effbert warmup`` -- written once per test session.
* :class:`NniExperiment`: ``nnictl create`` / ``stop`` / ``resume`` of an experiment whose
  tuner is the registered ``EfficientBertProgressive`` advisor, polled over the REST API with
  a deadline, stopped and deleted on exit.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .teacher import save_tiny_bert

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "effbert.yml"
TERMINAL = ("DONE", "ERROR", "STOPPED", "TUNER_NO_MORE_TRIAL", "NO_MORE_TRIAL")


def make_teacher(folder: Path, vocab_file: Path) -> Path:
    """A random tiny BERT (2 layers, hidden 32) with the tests' tiny tokenizer."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(vocab_file.parent), do_lower_case=True)
    return save_tiny_bert(folder, tok)


def write_config(path: Path, work: Path, teacher: Path, glue_dir: Path, *, search: Optional[dict] = None,
                 **sections: Dict[str, Any]) -> Path:
    """The tiny example config with absolute paths (and ``search`` / section overrides)."""
    data = yaml.safe_load(TINY.read_text())
    data["workdir"] = str(work)
    data["teacher"]["model"] = str(teacher)
    data["task"]["data_dir"] = str(glue_dir)
    data["evaluator"].update(train_steps=2, latency_repeats=1)
    for name, values in sections.items():
        data[name].update(values)
    if search is not None:
        data["search"] = search
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prepare_work(root: Path, vocab_file: Path, glue_dir: Path) -> Dict[str, Path]:
    """Teacher + cache + stage 0 supernet under ``root/work`` (in-process CLI calls)."""
    from nni_effbert import cli

    teacher = make_teacher(root / "base_teacher", vocab_file)
    work = root / "work"
    exp = write_config(root / "exp.yml", work, teacher, glue_dir)
    assert cli.main(["teacher", "-q", "-c", str(exp)]) == 0
    assert cli.main(["warmup", "-q", "-c", str(exp), "--stage", "0"]) == 0
    assert (work / "supernet" / "stage0.pt").is_file()
    return {"root": root, "work": work, "exp": exp, "teacher": teacher}


def tree_digest(folder: Path) -> Dict[str, str]:
    """sha1 of every file under ``folder`` (lock files, whose content is empty, included)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def params_of(job: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(job["hyperParameters"][0])["parameters"]


def parameters_ran(jobs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Job id -> the parameters the job ran. NNI 3.0 hands queued parameters to whichever trial
    asks first, so a job may have run those NNI lists under a sibling; its final metric's
    ``parameterId`` (the id the trial echoes) says which. A job without a final metric keeps its
    listed parameters."""
    by_pid = {json.loads(j["hyperParameters"][0])["parameter_id"]: params_of(j) for j in jobs}
    return {j["trialJobId"]: by_pid[int(j["finalMetricData"][0]["parameterId"])] if j.get("finalMetricData")
            else params_of(j) for j in jobs}


def arch_key(params: Dict[str, Any]) -> str:
    """Fingerprint of a trial's parameters (meta keys included: a warm-up is its own kind; the
    parameter id the search adds is not part of what the trial runs)."""
    return json.dumps({k: v for k, v in params.items() if k != "_parameter_id"}, sort_keys=True)


class NniExperiment:
    """One nnictl experiment in ``root`` (own NNI config dir, experiments dir and port)."""

    def __init__(self, root: Path, exp_yml: Path, *, concurrency: int, max_trials: int,
                 trial_command: Optional[str] = None, training_service: Optional[dict] = None,
                 code_dir: Optional[Path] = None):
        self.root = root
        self.env = dict(os.environ, NNI_CONFIG_DIR=str(root / "nni-config"))
        self.experiments = root / "experiments"
        self.port = free_port()
        self.id: Optional[str] = None
        reg = subprocess.run([sys.executable, "-c", "from nni_effbert.strategies.nni.registration import register_tuner; "
                              "register_tuner()"], env=self.env, capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0, reg.stderr
        from nni_effbert.search_spaces import EfficientBertSpace

        space_file = root / "search_space.json"
        space_file.write_text(json.dumps(EfficientBertSpace.preset("tiny").nni_search_space()))
        self.config = {
            "experimentName": "effbert-reliability",
            "searchSpaceFile": str(space_file),
            "trialCommand": trial_command or shlex.join([sys.executable, "-m", "nni_effbert.trial", "--config",
                                                         str(exp_yml)]),
            "trialCodeDirectory": str(code_dir or root),  # copied to each remote worker
            "trialConcurrency": concurrency,
            "maxTrialNumber": max_trials,
            "maxExperimentDuration": "10m",
            "tuner": {"name": "EfficientBertProgressive", "classArgs": {"config": str(exp_yml)}},
            "trainingService": training_service or {"platform": "local"},
            "experimentWorkingDirectory": str(self.experiments),
        }
        self.config_file = root / "nnictl.yml"
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def nnictl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nni.tools.nnictl.nnictl", *args], env=self.env,
                              capture_output=True, text=True, timeout=180, **kw)

    def create(self) -> str:
        out = self.nnictl("create", "--config", str(self.config_file), "--port", str(self.port))
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
        assert out.returncode == 0, plain
        found = re.search(r'nnictl stop (\w+)"', plain)
        assert found, plain
        self.id = found.group(1)
        return self.id

    def stop(self) -> None:
        out = self.nnictl("stop", self.id)
        assert out.returncode == 0, out.stdout + out.stderr

    def resume(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        out = self.nnictl("resume", self.id, "--port", str(self.port))
        assert out.returncode == 0, out.stdout + out.stderr

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/nni{path}", timeout=10) as r:
            return json.loads(r.read().decode())

    def jobs(self) -> List[Dict[str, Any]]:
        return self.get("/trial-jobs")

    def wait(self, until, timeout: float = 240.0, what: str = "condition"):
        """Poll the REST API (1 s period) until ``until(status, jobs)`` is true; returns both."""
        deadline = time.monotonic() + timeout
        status, jobs = None, []
        while time.monotonic() < deadline:
            status = self.get("/check-status")
            jobs = self.jobs()
            if until(status, jobs):
                return status, jobs
            if status["status"] == "ERROR":  # never going to get there: say why at once
                raise AssertionError(f"experiment ERROR while waiting for {what}: {status.get('errors')}\n"
                                     f"{self.logs()}")
            time.sleep(1)  # poll period, not synchronisation: the condition is checked each time
        raise AssertionError(f"timed out waiting for {what}: status {status}; jobs "
                             f"{[(j['trialJobId'], j['status']) for j in jobs]}\n{self.logs()}")

    def wait_finished(self, timeout: float = 240.0):
        def done(status, jobs):
            return status["status"] in TERMINAL and all(j["status"] not in ("WAITING", "RUNNING") for j in jobs)
        return self.wait(done, timeout, "the experiment to end")

    def trial_log(self, job_id: str) -> str:
        """The trial's log and stderr as the web UI shows them ("View trial log" / "View trial
        error": REST ``/trial-file/<id>/trial.log`` and ``/trial-file/<id>/stderr``)."""
        text = []
        for name in ("trial.log", "stderr"):
            url = f"http://127.0.0.1:{self.port}/api/v1/nni/trial-file/{job_id}/{name}"
            with urllib.request.urlopen(url, timeout=10) as r:
                text.append(r.read().decode(errors="replace"))
        return "\n".join(text)

    def state(self) -> Dict[str, Any]:
        return json.loads((self.experiments / self.id / "checkpoint" / "progressive_search.json").read_text())

    def settled_state(self, timeout: float = 60.0) -> Dict[str, Any]:
        """The advisor's search state once it has handled every trial end (the manager may show
        DONE a moment before the dispatcher processed the last TrialEnd)."""
        deadline = time.monotonic() + timeout
        while True:
            search = self.state()["search"]
            if all(r["status"] != "running" for r in search["records"]) or time.monotonic() > deadline:
                return search
            time.sleep(0.5)  # poll period of a file the advisor rewrites atomically

    def logs(self) -> str:
        log = self.experiments / (self.id or "-") / "log" / "dispatcher.log"
        return f"dispatcher.log:\n{log.read_text()[-3000:]}" if log.exists() else "(no dispatcher.log)"

    def close(self) -> None:
        if self.id is None:
            return
        self.nnictl("stop", self.id)
        # Kept on disk (pytest's tmp folder): the logs explain a failure.
