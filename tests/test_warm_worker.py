"""The warm trial worker (``nas/warm_worker.py``) and the supervisor's use of it, without NNI's
manager: one real worker (kind ``trial``: torch, nni and the trial's modules imported) serves
every test of this module; trials are small probe modules run through
:func:`~nni_effbert.nas.supervisor.supervise_trial` in subprocesses, as NNI starts them.

The nnictl checks (a whole search forked from the worker, a cancel through NNI, the worker
killed mid-search) are in ``test_warm_worker_nnictl.py`` (``integration``).
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nni_effbert.nas import warm_worker
from nni_effbert.nas.supervisor import EXIT_FAILED, NOOP_KEY, PARAMETER_ENV

PROBE = '''
import json, os, sys, time
mode = os.environ.get("PROBE_MODE", "exit")
if mode == "nni":
    import nni
    params = nni.get_next_parameter()
    time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))  # both trials hold their channel at once
    nni.report_final_result({"default": 1.0, "echo": params["_parameter_id"], "trial": nni.get_trial_id()})
elif mode == "cuda":
    import torch
    x = torch.ones(4, device="cuda") * 2
    print("CUDA " + json.dumps({"sum": float(x.sum()), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                "count": torch.cuda.device_count()}), file=sys.__stdout__, flush=True)
elif mode == "prefetched":
    import nni
    from nni_effbert.nas.trial_runner import _next_parameters
    params = _next_parameters()
    nni.report_final_result({"default": 0.5, "echo": params["_parameter_id"]})
print("PROBE " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                             "x": os.environ.get("PROBE_X"), "torch": "torch" in sys.modules}), flush=True,
      file=sys.__stdout__)
print("probe stderr", file=sys.stderr, flush=True)
if mode == "sleep":
    open(os.environ["PROBE_PIDFILE"], "w").write(str(os.getpid()))
    time.sleep(120)
sys.exit(int(os.environ.get("PROBE_RC", "0")))
'''

#: A wrapper script that supervises itself (as ``python -m nni_effbert.trial`` does): its
#: supervised child runs the same command line, the wrapper included.
WRAPPER = '''
import json, os, sys
if os.environ.get("NNI_EFFBERT_TRIAL_SUPERVISOR"):
    print("PROBE " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "main": __name__,
                                 "path0": sys.path[0]}), file=sys.__stdout__, flush=True)
    sys.exit(4)
from nni_effbert.nas.supervisor import supervise_trial
sys.exit(supervise_trial())
'''

CHANNEL = '''
import json, os
from nni.runtime.trial_command_channel.base import TrialCommandChannel

class Channel(TrialCommandChannel):
    """Parameters from $PROBE_PARAMS, metrics appended to $PROBE_METRICS (one file per trial)."""
    def receive_parameter(self):
        params = json.loads(open(os.environ["PROBE_PARAMS"]).read())
        return {"parameter_id": params["_parameter_id"], "parameter_source": "algorithm", "parameters": params,
                "parameter_index": 0}

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value):
        with open(os.environ["PROBE_METRICS"], "a") as f:
            f.write(json.dumps({"parameter_id": parameter_id, "trial": trial_job_id, "value": value}) + "\\n")
'''

#: A trial's supervisor, as ``python -m nni_effbert.trial`` runs it inside NNI.
DRIVER = ("import sys; from nni_effbert.nas.supervisor import supervise_trial; "
          "rc = supervise_trial(['-m', *sys.argv[1:]]); "
          "print('SUPERVISOR ' + str(sorted(m for m in ('torch', 'nni', 'transformers') if m in sys.modules)), "
          "file=sys.stderr); sys.exit(rc)")


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / "warm_probe.py").write_text(PROBE)
    (folder / "probe_channel.py").write_text(CHANNEL)
    (folder / "warm_wrapper.py").write_text(WRAPPER)
    return folder


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A running worker of kind ``trial``: ``(directory, pid)``; stopped at the end."""
    directory = tmp_path_factory.mktemp("warm") / "warm-worker"
    info = warm_worker.start(directory, "trial", timeout=600)
    yield directory, info["pid"]
    warm_worker.stop(directory, "trial")


def _env(directory, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env.update({warm_worker.ENV: str(directory), **extra})
    return env


def _run(args, env, cwd, **kw):
    return subprocess.run([sys.executable, "-c", DRIVER, "warm_probe", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kw)


def _probe(stdout):
    return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("PROBE ")]


def _gone(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # polling /proc for a process's end, with a deadline
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True  # a zombie: dead, its parent has not reaped it yet
        except (ProcessLookupError, FileNotFoundError):  # gone between the two checks: reaped
            return True
        time.sleep(0.1)
    return False


def _wait_file(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:  # polling for the probe's pid file
        if path.is_file() and path.read_text():
            return int(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"no {path}; supervisor: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


# -- pure functions --------------------------------------------------------------------------


def test_noop_key_is_the_parameter_modules():
    from nni_effbert.params import NOOP_KEY as key

    assert NOOP_KEY == key


def test_long_work_directory_gets_a_short_socket_path(tmp_path):
    short = warm_worker.socket_path(tmp_path / "w", "trial")
    assert short == tmp_path / "w" / "trial.sock"
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = warm_worker.socket_path(deep, "trial")
    assert len(os.fsencode(str(path))) <= 100 and path.parent != deep
    assert path == warm_worker.socket_path(deep, "trial") != warm_worker.socket_path(deep / "x", "trial")
    assert path != warm_worker.socket_path(deep, "nas")


def test_worker_directory_from_the_environment(tmp_path):
    with pytest.raises(warm_worker.WorkerUnavailable, match="turned off"):
        warm_worker.worker_dir({warm_worker.ENV: "off"})
    assert warm_worker.worker_dir({warm_worker.ENV: str(tmp_path)}) == tmp_path
    with pytest.raises(warm_worker.WorkerUnavailable, match="not started for this experiment"):
        warm_worker.worker_dir({})


def test_fingerprint_ignores_per_trial_variables_only():
    base = {"PATH": "/bin", "HOME": "/h", "OTHER": "1"}
    same = warm_worker.fingerprint(base)
    assert warm_worker.fingerprint({**base, "NNI_TRIAL_JOB_ID": "x", "CUDA_VISIBLE_DEVICES": "1", "OTHER": "2"}) == same
    assert warm_worker.fingerprint({**base, "PYTHONHASHSEED": "3"})["environment"] != same["environment"]
    assert warm_worker.fingerprint({**base, "HF_HOME": "/elsewhere"})["environment"] != same["environment"]


# -- through a worker ------------------------------------------------------------------------


def test_trial_runs_forked_with_its_argv_cwd_env_stdio_and_exit_status(worker, probe_dir, tmp_path):
    directory, pid = worker
    p = _run(["a", "--b"], _env(directory, PROBE_X="hello", PROBE_RC="3"), probe_dir)
    assert p.returncode == 3, p.stderr
    (probe,) = _probe(p.stdout)  # the child's stdout is the supervisor's
    assert probe == {"pid": probe["pid"], "ppid": pid, "argv": ["a", "--b"], "cwd": str(probe_dir), "x": "hello",
                     "torch": True}  # forked from the worker, whose imports it has
    assert "probe stderr" in p.stderr and f"forked (parent {pid})" in p.stderr
    assert "warm worker:" not in p.stderr  # no fallback line
    assert "SUPERVISOR []" in p.stderr  # the supervisor imported none of the heavy modules
    assert _run([], _env(directory), probe_dir).returncode == 0


def test_a_wrapper_script_runs_again_in_the_forked_child(worker, probe_dir):
    directory, pid = worker
    p = subprocess.run([sys.executable, "warm_wrapper.py", "x"], env=_env(directory), cwd=probe_dir,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 4, p.stderr
    (probe,) = _probe(p.stdout)
    assert probe == {"pid": probe["pid"], "ppid": pid, "argv": ["warm_wrapper.py", "x"], "main": "__main__",
                     "path0": str(probe_dir)}


def test_other_environment_falls_back_to_a_fresh_process_with_one_line(worker, probe_dir):
    directory, pid = worker
    p = _run([], _env(directory, PYTHONHASHSEED="7"), probe_dir)
    assert p.returncode == 0, p.stderr
    (probe,) = _probe(p.stdout)
    assert probe["ppid"] != pid and not probe["torch"]  # a fresh interpreter
    lines = [line for line in p.stderr.splitlines() if line.startswith("warm worker:")]
    assert len(lines) == 1 and "built for another environment (PYTHONHASHSEED)" in lines[0], p.stderr
    off = _run([], _env(directory, **{warm_worker.ENV: "off"}), probe_dir)
    assert off.returncode == 0 and _probe(off.stdout)[0]["ppid"] != pid
    assert "turned off" in off.stderr


def test_sigterm_to_the_supervisor_reaches_the_child_and_the_supervisor_dies_of_it(worker, probe_dir, tmp_path):
    directory, pid = worker
    for sig in (signal.SIGTERM, signal.SIGINT):
        pidfile = tmp_path / f"child-{sig.name}"
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, "warm_probe"], cwd=probe_dir, text=True,
                                env=_env(directory, PROBE_MODE="sleep", PROBE_PIDFILE=str(pidfile)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child = _wait_file(pidfile, proc)
        assert int(Path(f"/proc/{child}/stat").read_text().split()[3]) == pid  # forked by the worker
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -sig, err  # NNI records a trial killed by its signal as USER_CANCELED
        assert _gone(child), f"trial process {child} outlived a {sig.name} to its supervisor"


def test_sigkill_of_the_supervisor_leaves_no_orphan(worker, probe_dir, tmp_path):
    directory, _ = worker
    pidfile = tmp_path / "child"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "warm_probe"], cwd=probe_dir, text=True,
                            env=_env(directory, PROBE_MODE="sleep", PROBE_PIDFILE=str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = _wait_file(pidfile, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert _gone(child, timeout=30), f"trial process {child} outlived its SIGKILLed supervisor"


def test_a_child_killed_by_a_signal_fails_the_trial_with_the_reason(worker, probe_dir, tmp_path):
    directory, _ = worker
    pidfile = tmp_path / "child"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "warm_probe"], cwd=probe_dir, text=True,
                            env=_env(directory, PROBE_MODE="sleep", PROBE_PIDFILE=str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.kill(_wait_file(pidfile, proc), signal.SIGKILL)  # as the kernel's OOM killer does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_FAILED
    assert "trial failed: trial process killed by SIGKILL (the kernel's out-of-memory killer sends SIGKILL)" in err


def test_two_concurrent_forked_trials_keep_their_own_nni_channel(worker, probe_dir, tmp_path):
    directory, pid = worker
    procs = []
    for job, param_id in (("JOB_A", 11), ("JOB_B", 22)):
        (tmp_path / f"{job}.json").write_text(json.dumps({"_parameter_id": param_id, "x": job}))
        env = _env(directory, PROBE_MODE="nni", PROBE_SLEEP="1.5", NNI_TRIAL_JOB_ID=job,
                   NNI_TRIAL_COMMAND_CHANNEL="import://probe_channel.Channel",
                   PROBE_PARAMS=str(tmp_path / f"{job}.json"), PROBE_METRICS=str(tmp_path / f"{job}.jsonl"))
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, "warm_probe"], cwd=probe_dir, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert _probe(out)[0]["ppid"] == pid, err
    for job, param_id in (("JOB_A", 11), ("JOB_B", 22)):
        (metric,) = [json.loads(line) for line in (tmp_path / f"{job}.jsonl").read_text().splitlines()]
        value = metric["value"]
        assert metric["trial"] == value["trial"] == job
        assert metric["parameter_id"] == value["echo"] == param_id


class _FakeChannel(http.server.BaseHTTPRequestHandler):
    """NNI 3.0's HTTP trial channel (``ts/nni_manager/common/command_channel/http.ts``): PUT
    sends a command, GET receives the next one."""
    parameters: dict = {}
    received: list = []

    def do_PUT(self):  # noqa: N802 - http.server's name
        command = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(command)
        self.send_response(200)
        self.end_headers()

    def do_GET(self):  # noqa: N802 - http.server's name
        record = {"parameter_id": 5, "parameter_source": "algorithm", "parameters": type(self).parameters,
                  "parameter_index": 0}
        body = json.dumps({"type": "parameter", "parameter": json.dumps(record)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_channel():
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeChannel)
    _FakeChannel.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", _FakeChannel
    server.shutdown()


def test_placeholder_ends_in_the_supervisor_without_worker_or_heavy_imports(fake_channel, probe_dir, tmp_path):
    url, channel = fake_channel
    channel.parameters = {NOOP_KEY: "broker", "_parameter_id": 5}
    nowhere = tmp_path / "no-worker-here"
    p = _run([], _env(nowhere, NNI_TRIAL_COMMAND_CHANNEL=url), probe_dir)
    assert p.returncode == 0, p.stderr
    assert "placeholder trial (broker): nothing to run" in p.stderr
    assert not _probe(p.stdout) and "warm worker" not in p.stderr and not nowhere.exists()
    assert "SUPERVISOR []" in p.stderr
    assert channel.received == [{"type": "request_parameter"}]


def test_parameters_received_by_the_supervisor_reach_the_forked_child(worker, fake_channel, probe_dir):
    directory, pid = worker
    url, channel = fake_channel
    channel.parameters = {"_parameter_id": 5, "layer0_width": 8}
    p = _run([], _env(directory, PROBE_MODE="prefetched", NNI_TRIAL_COMMAND_CHANNEL=url,
                      NNI_TRIAL_JOB_ID="JOB_H"), probe_dir)
    assert p.returncode == 0, p.stderr
    assert _probe(p.stdout)[0]["ppid"] == pid
    assert channel.received[0] == {"type": "request_parameter"}  # asked once, by the supervisor
    metrics = [c for c in channel.received[1:] if c["type"] == "metric"]
    assert len(channel.received) == 2 and len(metrics) == 1, channel.received
    metric = json.loads(metrics[0]["metric"])
    assert metric["parameter_id"] == 5 and metric["trial_job_id"] == "JOB_H" and metric["type"] == "FINAL"
    assert json.loads(metric["value"])["echo"] == 5
    assert PARAMETER_ENV not in os.environ


def test_nas_trials_fork_from_a_nas_worker_or_run_as_before(probe_dir, tmp_path):
    """The --python search's trial command (``python -m nni_effbert.nas.supervisor -m MODULE
    ...``): forked by a worker of kind ``nas`` (nni.nas imported); without one, the command
    itself replaces the supervisor (``exec``: same pid, unsupervised, as before)."""
    directory = tmp_path / "warm-worker"
    info = warm_worker.start(directory, "nas", timeout=600)
    try:
        cmd = [sys.executable, "-m", "nni_effbert.nas.supervisor", "-m", "warm_probe", "a"]
        p = subprocess.run(cmd, env=_env(directory, PROBE_RC="5"), cwd=probe_dir, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 5, p.stderr
        (probe,) = _probe(p.stdout)
        assert probe["ppid"] == info["pid"] and probe["argv"] == ["a"], p.stderr
        off = subprocess.Popen(cmd, env=_env(directory, **{warm_worker.ENV: "off"}), cwd=probe_dir, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = off.communicate(timeout=300)
        assert off.returncode == 0 and _probe(out)[0]["pid"] == off.pid, err
        assert "turned off" in err
    finally:
        warm_worker.stop(directory, "nas")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_forked_child_initialises_cuda_on_its_assigned_device(worker, probe_dir):
    """CUDA starts in each forked child (on the GPU of its CUDA_VISIBLE_DEVICES), never in the
    worker: a worker that had initialised it would refuse to fork the second child."""
    directory, pid = worker
    for _ in range(2):
        p = _run([], _env(directory, PROBE_MODE="cuda", CUDA_VISIBLE_DEVICES="0"), probe_dir)
        assert p.returncode == 0, p.stderr
        assert _probe(p.stdout)[0]["ppid"] == pid, p.stderr
        (line,) = [json.loads(l.split(" ", 1)[1]) for l in p.stdout.splitlines() if l.startswith("CUDA ")]
        assert line == {"sum": 8.0, "visible": "0", "count": 1}


def test_killed_worker_fails_its_running_trial_and_later_trials_fall_back(worker, probe_dir, tmp_path):
    """Last in this module: it kills the module's worker."""
    directory, pid = worker
    pidfile = tmp_path / "child"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "warm_probe"], cwd=probe_dir, text=True,
                            env=_env(directory, PROBE_MODE="sleep", PROBE_PIDFILE=str(pidfile)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = _wait_file(pidfile, proc)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_FAILED and f"trial failed: warm worker {pid} ended during the trial" in err, err
    assert _gone(child)
    # The next trial finds no worker: it runs fresh, and starts a new worker for the next ones.
    p = _run([], _env(directory), probe_dir)
    assert p.returncode == 0, p.stderr
    assert _probe(p.stdout)[0]["ppid"] != pid and "one is starting for the next trials" in p.stderr
    info = warm_worker.start(directory, "trial", timeout=600)  # waits for the one that trial started
    assert info["pid"] != pid
    again = _run([], _env(directory), probe_dir)
    assert again.returncode == 0 and _probe(again.stdout)[0]["ppid"] == info["pid"], again.stderr


# -- the search starts it ----------------------------------------------------------------------


def test_search_points_trials_at_its_worker_unless_turned_off(tmp_path, monkeypatch, base_teacher, glue_dir):
    """What ``nni-effbert search`` hands the NNI manager (whose environment every trial inherits):
    the worker it started, or ``off`` with ``--no-warm-worker`` / ``search.warm_worker: false``.
    (nnictl itself is replaced here: it is the integration test's part.)"""
    import subprocess as sp

    from nni_effbert import cli
    from nni_effbert.nas import nnictl_search

    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "tiny" / "effbert.yml")
    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}"]
    (work / "teacher").mkdir(parents=True)
    (work / "teacher" / "effbert_teacher.json").write_text("{}")  # the search checks for it; nothing runs
    handed, started, stopped = [], [], []
    monkeypatch.setattr(nnictl_search, "_nnictl", lambda args, timeout=180, **kw: (
        handed.append(kw.get("env")), sp.CompletedProcess(args, 1, "", "nnictl replaced by the test"))[1])
    monkeypatch.setattr(nnictl_search, "register_tuner", lambda: {})
    monkeypatch.setattr(warm_worker, "start", lambda d, k, timeout, env=None: started.append((d, k, env)) or {"pid": 1})
    monkeypatch.setattr(warm_worker, "stop", lambda d, k: stopped.append((d, k)) or True)

    for extra, expected in (([], str(work / "warm-worker")), (["--no-warm-worker"], "off"),
                            (["--set=search.warm_worker=false"], "off")):
        started.clear()
        stopped.clear()
        assert cli.main(["search", "-q", "-c", tiny, *sets, *extra]) == 2  # nnictl "failed": SearchError
        assert handed[-1][warm_worker.ENV] == expected
        if expected == "off":
            assert not started and not stopped
        else:
            # started with the trials' environment (python -P's PYTHONSAFEPATH): else it refuses them
            assert [(d, k) for d, k, _ in started] == [(work / "warm-worker", "trial")]
            assert started[0][2]["PYTHONSAFEPATH"] == "1"
            assert stopped == [(work / "warm-worker", "trial")]  # nnictl failed: the worker goes too


def test_only_a_search_s_worker_is_used(tmp_path):
    """Trials of a plain nnictl config (no ``$NNI_EFFBERT_WARM_WORKER``) run fresh: no worker is
    started lazily from NNI's trial folder."""
    local = {"NNI_OUTPUT_DIR": str(tmp_path / "exp" / "environments" / "local-env" / "trials" / "T1")}
    with pytest.raises(warm_worker.WorkerUnavailable, match="not started for this experiment"):
        warm_worker.worker_dir(local)
    assert warm_worker.worker_dir({warm_worker.ENV: str(tmp_path / "w")}) == tmp_path / "w"
