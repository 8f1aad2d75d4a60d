"""``nnictl stop`` mid-stage, then ``nnictl resume`` on a new port: the search continues in the
same stage with its history, no finished trial is re-run, and the warm-up is not redone.

Real trials (tiny preset, tiny teacher) under the registered advisor, concurrency 1, one stage
of 3 candidates. The experiment is stopped once the warm-up and the first candidate have
succeeded; evidence is taken from the REST API (trial ids, statuses, parameters), the
advisor's persisted state and the supernet checkpoint's mtime.
"""
from __future__ import annotations

import shutil

import pytest

from support.reliability import NniExperiment, arch_key, params_of, prepare_work, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_file, glue_dir):
    return prepare_work(tmp_path_factory.mktemp("resume"), tiny_vocab_file, glue_dir)


def test_nnictl_stop_and_resume_continues_the_stage(tmp_path, prepared, glue_dir):
    shutil.copytree(prepared["work"], tmp_path / "work")
    (tmp_path / "work" / "supernet" / "stage0.pt").unlink()  # the experiment's warm-up trial makes it
    search = {"trial_concurrency": 1, "seed": 0,
              "stages": [{"name": "coarse", "kind": "joint", "trials": 3, "warmup_steps": 2}]}
    exp_yml = write_config(tmp_path / "exp.yml", tmp_path / "work", prepared["teacher"], glue_dir, search=search)
    exp = NniExperiment(tmp_path, exp_yml, concurrency=1, max_trials=4)
    try:
        exp.create()
        ckpt = tmp_path / "work" / "supernet" / exp.id / "stage0.pt"  # the experiment's own supernet

        def first_candidate_done(status, jobs):
            return sum(j["status"] == "SUCCEEDED" and "_warmup_stage" not in params_of(j) for j in jobs) >= 1

        _, _ = exp.wait(first_candidate_done, timeout=240, what="the first candidate")
        exp.stop()
        before = exp.state()["search"]
        mtime = ckpt.stat().st_mtime_ns
        old_port = exp.port
        exp.resume()  # a new free port
        assert exp.port != old_port
        status, jobs = exp.wait_finished(timeout=300)
        after = exp.settled_state()
    finally:
        exp.close()

    report = "\n".join(f"{j['trialJobId']} seq {j['sequenceId']} {j['status']} "
                       f"{'warm-up' if '_warmup_stage' in params_of(j) else 'candidate'}" for j in jobs)
    print(f"\nbefore stop: {[(r['trial_id'], r['status']) for r in before['records']]}\nafter resume "
          f"({status['status']}):\n{report}")
    assert status["status"] == "DONE", (status, report, exp.logs())
    finished_before = [r for r in before["records"] if r["status"] == "succeeded"]
    assert any(r["warmup"] for r in finished_before) and any(not r["warmup"] for r in finished_before)
    assert before["stage"] == 0 and before["done"] is None  # stopped mid-stage

    # The warm-up ran once, as one trial; its checkpoint was not rewritten.
    warmups = [j for j in jobs if "_warmup_stage" in params_of(j)]
    assert len(warmups) == 1 and warmups[0]["status"] == "SUCCEEDED", report
    assert ckpt.stat().st_mtime_ns == mtime

    # No finished trial re-run: every parameter set that had succeeded appears in one trial only.
    keys = [arch_key(params_of(j)) for j in jobs]
    for r in finished_before:
        assert keys.count(arch_key(r["parameters"])) == 1, (r["trial_id"], report)

    # The same stage went on with its history: 3 distinct candidates, all scored, stage 0.
    cands = [r for r in after["records"] if not r["warmup"]]
    assert [r["status"] for r in cands] == ["succeeded"] * 3, after["records"]
    assert len({r["fingerprint"] for r in cands}) == 3 and all(r["stage"] == 0 for r in cands)
    for r in finished_before:
        assert any(a["trial_id"] == r["trial_id"] and a["parameters"] == r["parameters"] for a in after["records"])
    assert after["done"]["cause"] == "finished"
    assert sum(j["status"] == "SUCCEEDED" for j in jobs) == 4, report
