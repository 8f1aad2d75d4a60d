"""Reports: Pareto fronts, best trial, table, plots, and reading trials back from NNI."""
from __future__ import annotations

import http.server
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from nni_effbert.nas import records as records_mod
from nni_effbert.errors import ConfigError
from nni_effbert.nas.ranking import NoSucceededTrialError, best_trial, pareto_front
from nni_effbert.nas.records import ExperimentNotFoundError, read_nni_trials
from nni_effbert.product.report_page import format_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _trial(tid, metric, params, *, stage=0, status="SUCCEEDED", latency=None, seq=None, warmup=False, **kw):
    return dict(trial_id=tid, metric=metric, params=params, non_embedding_params=params - 1000 if params else None,
                latency_ms=latency, stage=stage, status=status, sequence=seq, warmup=warmup, **kw)


@pytest.fixture
def trials():
    """Two stages with warm-ups, failures and a NaN; trial ids say what each is."""
    t = [
        _trial("w0", None, None, warmup=True, seq=0, stage_name="coarse"),
        _trial("a", 0.70, 5000, latency=2.0, seq=1),
        _trial("b", 0.80, 9000, latency=3.0, seq=2),   # front
        _trial("c", 0.75, 9500, latency=3.5, seq=3),   # dominated by b
        _trial("d", 0.60, 4000, latency=1.0, seq=4),   # front (cheapest)
        _trial("fail_high", 0.99, 3000, status="FAILED", latency=0.5, seq=5),  # must never count
        _trial("nan", float("nan"), 3000, latency=0.5, seq=6),                 # no finite score
        _trial("w1", None, None, warmup=True, seq=7, stage=1, stage_name="fine"),
        _trial("e", 0.78, 8000, stage=1, latency=2.5, seq=8),
        _trial("f", 0.78, 7000, stage=1, latency=2.6, seq=9),
        _trial("run", None, None, stage=1, status="RUNNING", seq=10),
    ]
    return t


# --------------------------------------------------------------------------------------------
# Pareto, best, table
# --------------------------------------------------------------------------------------------

def test_pareto_front_params_and_latency(trials):
    front = [t["trial_id"] for t in pareto_front(trials, cost="params")]
    # d (4000, .60) < a (5000, .70) < f (7000, .78) < b (9000, .80); c and e are dominated.
    assert front == ["d", "a", "f", "b"]
    front = [t["trial_id"] for t in pareto_front(trials, cost="latency_ms")]
    assert front == ["d", "a", "e", "b"]  # e is faster than f at the same metric


def test_pareto_front_brute_force_agrees():
    import random

    rng = random.Random(0)
    pts = [_trial(str(i), round(rng.random(), 2), rng.randrange(1000, 1100)) for i in range(60)]
    front = {t["trial_id"] for t in pareto_front(pts)}

    def dominated(p):
        return any(q["metric"] >= p["metric"] and q["params"] <= p["params"]
                   and (q["metric"] > p["metric"] or q["params"] < p["params"]) for q in pts)

    assert front == {p["trial_id"] for p in pts if not dominated(p)}


def test_best_trial(trials):
    assert best_trial(trials)["trial_id"] == "f"  # last stage; tie with e broken by fewer params
    assert best_trial(trials, stage=0)["trial_id"] == "b"
    assert best_trial(trials, stage=None)["trial_id"] == "b"
    failed_only = [t for t in trials if t["trial_id"] in ("fail_high", "nan", "w0", "run")]
    with pytest.raises(NoSucceededTrialError, match="experiment abc123.*4 trial"):
        best_trial(failed_only, experiment="abc123")
    with pytest.raises(NoSucceededTrialError, match="stage 1"):
        best_trial([t for t in trials if t["stage"] == 0] + [trials[-1]], stage=1)


def test_format_table():
    rows = [
        dict(name="teacher", role="teacher", dev_metric=0.90, params=22_700_000, non_embedding_params=10_600_000,
             latency_ms=12.0),
        dict(name="baseline student", role="baseline", dev_metric=0.81, params=6_100_000,
             non_embedding_params=2_100_000, latency_ms=4.0),
        dict(name="searched student", role="searched", dev_metric=0.882, params=6_050_000,
             non_embedding_params=2_050_000, latency_ms=3.0, note="trial Xy"),
        dict(name="not distilled yet", dev_metric=None, params=None, non_embedding_params=None, latency_ms=None),
    ]
    text = format_table(rows, metric_name="dev accuracy")
    lines = text.splitlines()
    assert lines[0].startswith("| model | dev accuracy | vs teacher |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0] == ["teacher", "0.9000", "100.0%", "22.70M", "10.60M", "12.00", "1.00x"]
    assert cells[1] == ["baseline student", "0.8100", "90.0%", "6.10M", "2.10M", "4.00", "3.00x"]
    assert cells[2] == ["searched student (trial Xy)", "0.8820", "98.0%", "6.05M", "2.05M", "3.00", "4.00x"]
    assert cells[3] == ["not distilled yet", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]
    with pytest.raises(ConfigError, match=r"^table row 0 \('x'\): unknown key\(s\) \['accuracy'\]; allowed: \['name'"):
        format_table([dict(name="x", accuracy=0.5)])
    with pytest.raises(ConfigError, match="2 teacher rows"):
        format_table([dict(name="a", role="teacher"), dict(name="b", role="teacher")])
    with pytest.raises(ConfigError, match="latency_ms must be a number"):
        format_table([dict(name="a", latency_ms="fast")])


# --------------------------------------------------------------------------------------------
# write_report
# --------------------------------------------------------------------------------------------

def test_write_report(tmp_path, trials):
    rows = [dict(name="teacher", role="teacher", dev_metric=0.9, params=2e7, non_embedding_params=1e7, latency_ms=9.0),
            dict(name="searched student", dev_metric=0.85, params=5e6, non_embedding_params=2e6, latency_ms=2.0)]
    res = write_report(tmp_path, trials, rows, experiment="abc123", metric_name="dev accuracy")
    assert res.report == tmp_path / "reports" / "report.md"
    assert set(res.plots) == {"best_so_far", "metric_vs_params", "metric_vs_latency"}
    for path in res.plots.values():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert res.counts == {"total": 11, "scored": 6, "failed": 2, "warmup": 2, "rescored": 0, "other": 1}
    # A re-score (search.noise_rescores) with the best metric of all is counted apart, never selected.
    top = max((t for t in trials if t.get("metric") is not None and t.get("status") == "SUCCEEDED"),
              key=lambda t: t["metric"])
    again = dict(top, trial_id="again", metric=top["metric"] + 1.0, rescore_of=0)
    res2 = write_report(tmp_path / "with_rescore", [*trials, again], rows, experiment="abc123",
                        metric_name="dev accuracy")
    assert res2.counts == {**res.counts, "total": 12, "rescored": 1} and res2.best["trial_id"] == res.best["trial_id"]
    assert "1 re-scored to measure the tie margin" in res2.report.read_text()
    # Failed trials never enter a front nor the selection, even with the best "metric".
    assert "fail_high" not in res.pareto_params + res.pareto_latency and "nan" not in res.pareto_params
    assert res.pareto_params == ["d", "a", "f", "b"]  # non-embedding params: same order as params
    assert res.best["trial_id"] == "f"
    text = res.report.read_text()
    assert "abc123" in text and res.table in text
    assert "6 scored, 2 failed, 2 warm-up, 1 running or canceled" in text
    assert "stage 0 (coarse)" in text and "stage 1 (fine)" in text
    assert "## Failed trials" in text and "| fail_high |" in text and "| nan |" in text
    for path in res.plots.values():
        assert f"]({path.name})" in text
    assert sorted(p.name for p in res.report.parent.iterdir()) == sorted(
        ["report.md", "best_so_far.png", "metric_vs_params.png", "metric_vs_latency.png"])


def test_write_report_without_successes(tmp_path):
    trials = [_trial("x", None, 1000, status="FAILED", message="loss is NaN at step 3"),
              _trial("y", 0.5, 1000, status="USER_CANCELED")]
    res = write_report(tmp_path, trials, [], out_dir=tmp_path / "out")
    assert res.plots == {} and res.best is None
    text = res.report.read_text()
    assert "No plots" in text and "loss is NaN at step 3" in text and "No comparison table" in text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.md"]


def test_write_report_rejects_bad_trials(tmp_path):
    with pytest.raises(ConfigError, match=r"^trial 'a': unknown key\(s\) \['acc'\]; allowed: \["):
        write_report(tmp_path, [dict(trial_id="a", acc=0.5)], [])
    with pytest.raises(ConfigError, match="metric must be a number"):
        write_report(tmp_path, [dict(trial_id="a", metric="high")], [])


# --------------------------------------------------------------------------------------------
# Reading NNI's records
# --------------------------------------------------------------------------------------------

# NNI 3.0's schema (nni_node/core/sqlDatabase.js).
SCHEMA = """
create table TrialJobEvent (timestamp integer, trialJobId text, event text, data text, logPath text,
                            sequenceId integer, message text, environmentId text);
create table MetricData (timestamp integer, trialJobId text, parameterId text, type text, sequence integer,
                         data text);
create table ExperimentProfile (params text, id text, execDuration integer, startTime integer, endTime integer,
                                logDir text, nextSequenceId integer, revision integer);
"""

ARCH = {"layer0_width": 16, "layer0_stack": 1}


def _hp(pid, params):
    return json.dumps({"parameter_id": pid, "parameter_source": "algorithm", "parameters": params,
                       "parameter_index": 0})


def _metric(value):
    # The trial sends the metric as a JSON string; the manager stores JSON.stringify of it.
    return json.dumps(json.dumps(value))


JOBS = [
    # (id, seq, params, events, final metric or None)
    ("WARM0", 0, {"_warmup_stage": 0, "_stage_name": "coarse", "_warmup_steps": 10},
     ["WAITING", "RUNNING", "SUCCEEDED"], {"default": None, "steps": 10}),
    ("GOODa", 1, {**ARCH, "_stage": 0}, ["WAITING", "RUNNING", "SUCCEEDED"],
     {"default": 0.81, "params": 37000, "non_embedding_params": 16000, "latency_ms": 1.5,
      "expressions": ["linear2(gelu(linear1(x)))"], "stage": 0}),
    ("GOODb", 2, {**ARCH, "layer0_width": 8, "_stage": 0}, ["WAITING", "RUNNING", "SUCCEEDED"],
     {"default": 0.79, "params": 30000, "non_embedding_params": 9000, "latency_ms": 1.2,
      "expressions": ["tanh(linear2(gelu(linear1(x))))"], "stage": 0}),
    ("CRASH", 3, {**ARCH, "_stage": 0}, ["WAITING", "RUNNING", "FAILED"], None),
    ("NOMET", 4, {**ARCH, "_stage": 0}, ["WAITING", "RUNNING", "SUCCEEDED"], None),
    ("KILLD", 5, {**ARCH, "_stage": 0}, ["WAITING", "RUNNING", "USER_TO_CANCEL"], None),
]


def _make_db(path: Path):
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    for i, (tid, seq, params, events, final) in enumerate(JOBS):
        for j, event in enumerate(events):
            data = _hp(i, params) if event == "WAITING" else None
            msg = "Trial exited with code 1" if event == "FAILED" else None
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (1000 * i + j, tid, event, data, f"file://log/{tid}", seq, msg, None))
        if final is not None:
            conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                         (1000 * i + 9, tid, str(i), "FINAL", 0, _metric(final)))
        conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                     (1000 * i + 5, tid, str(i), "PERIODICAL", 0, _metric(0.5)))
    conn.commit()
    conn.close()


def _check_trials(trials):
    by_id = {t["trial_id"]: t for t in trials}
    assert [t["trial_id"] for t in trials] == [j[0] for j in JOBS]  # trial-number order
    w = by_id["WARM0"]
    assert w["warmup"] and w["stage"] == 0 and w["status"] == "SUCCEEDED" and w["metric"] is None
    a = by_id["GOODa"]
    assert (a["status"], a["metric"], a["params"], a["non_embedding_params"], a["latency_ms"], a["stage"]) == \
        ("SUCCEEDED", 0.81, 37000, 16000, 1.5, 0)
    assert a["arch"] == ARCH and a["expressions"] == ["linear2(gelu(linear1(x)))"]
    assert a["stage_name"] == "coarse" and a["sequence"] == 1
    assert by_id["CRASH"]["status"] == "FAILED" and by_id["CRASH"]["metric"] is None
    assert by_id["NOMET"]["status"] == "FAILED" and "without a final metric" in by_id["NOMET"]["message"]
    assert by_id["KILLD"]["status"] == "USER_CANCELED"
    assert best_trial(trials)["trial_id"] == "GOODa"


def test_read_stopped_experiment_from_sqlite(tmp_path, monkeypatch):
    exp_dir = tmp_path / "exps"
    _make_db(exp_dir / "abc123" / "db" / "nni.sqlite")
    manifest = tmp_path / ".experiment"
    manifest.write_text(json.dumps({"abc123": {"id": "abc123", "port": 1, "status": "STOPPED",
                                               "logDir": str(exp_dir)}}))
    monkeypatch.setattr(records_mod, "_MANIFEST", manifest)
    monkeypatch.setattr(records_mod, "_DEFAULT_EXPERIMENTS_DIR", tmp_path / "nowhere")
    _check_trials(read_nni_trials("abc123"))  # found through the manifest's logDir
    monkeypatch.setattr(records_mod, "_MANIFEST", tmp_path / "missing")
    _check_trials(read_nni_trials("abc123", experiments_dir=exp_dir))
    with pytest.raises(ExperimentNotFoundError, match="unknown NNI experiment 'zzz'"):
        read_nni_trials("zzz", experiments_dir=exp_dir)
    with pytest.raises(NoSucceededTrialError, match="experiment abc123"):
        best_trial([t for t in read_nni_trials("abc123", experiments_dir=exp_dir)
                    if t["trial_id"] in ("CRASH", "NOMET", "KILLD")], experiment="abc123")


def test_records_follow_the_parameters_a_trial_reported_with(tmp_path):
    """NNI 3.0 may list a job with parameters queued for another (it hands queued parameters to
    whichever trial asks first): a trial's arch is the one its final metric was reported with;
    placeholder jobs are left out."""
    narrow = {**ARCH, "layer0_width": 8}
    jobs = [  # (id, parameter id NNI lists, listed params, parameter id of its final metric, metric)
        ("SWAPa", 0, {**ARCH, "_stage": 0}, 1, {"default": 0.79}),
        ("SWAPb", 1, {**narrow, "_stage": 0}, 0, {"default": 0.81}),
        ("NOOP1", 2, {"_noop": "drains", "_parameter_id": 2}, None, None),
        ("ECHOc", 3, {**ARCH, "_stage": 0}, 3, {"default": 0.5, "parameter_id": 1}),
    ]
    db = tmp_path / "exps" / "swap1" / "db" / "nni.sqlite"
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    for i, (tid, pid, params, ran, final) in enumerate(jobs):
        for j, event in enumerate(["WAITING", "RUNNING", "SUCCEEDED"]):
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (100 * i + j, tid, event, _hp(pid, params) if event == "WAITING" else None, None, i, None,
                          None))
        if final is not None:
            conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                         (100 * i + 9, tid, str(ran), "FINAL", 0, _metric(final)))
    conn.commit()
    conn.close()
    trials = {t["trial_id"]: t for t in read_nni_trials("swap1", experiments_dir=tmp_path / "exps")}
    assert sorted(trials) == ["ECHOc", "SWAPa", "SWAPb"]
    assert trials["SWAPa"]["arch"] == narrow and trials["SWAPa"]["metric"] == 0.79
    assert trials["SWAPb"]["arch"] == ARCH and trials["SWAPb"]["metric"] == 0.81
    assert trials["ECHOc"]["arch"] == narrow  # the trial's own echo wins over NNI's pairing
    assert best_trial(list(trials.values()))["arch"] == ARCH


def test_read_running_experiment_over_rest(tmp_path):
    """The REST API as nni_manager serves it (trial-jobs with hyperParameters, metric-data)."""
    jobs, metrics = [], []
    for i, (tid, seq, params, events, final) in enumerate(JOBS):
        status = {"USER_TO_CANCEL": "USER_CANCELED"}.get(events[-1], events[-1])
        job = {"trialJobId": tid, "sequenceId": seq, "status": status, "hyperParameters": [_hp(i, params)],
               "logPath": f"file://log/{tid}", "startTime": 1, "endTime": 2}
        if final is not None:
            record = {"timestamp": 3, "trialJobId": tid, "parameterId": str(i), "type": "FINAL", "sequence": 0,
                      "data": _metric(final)}
            job["finalMetricData"] = [record]
            metrics.append(record)
        jobs.append(job)
    routes = {"/api/v1/nni/experiment": {"id": "abc123"}, "/api/v1/nni/trial-jobs": jobs[::-1],
              "/api/v1/nni/metric-data": metrics}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps(routes.get(self.path)).encode()
            self.send_response(200 if self.path in routes else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("localhost", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        _check_trials(read_nni_trials(port=port))
        with pytest.raises(ExperimentNotFoundError, match="serves experiment 'abc123', not 'other'"):
            read_nni_trials("other", port=port)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ExperimentNotFoundError, match="is it running"):
        read_nni_trials(port=port, timeout=2)
