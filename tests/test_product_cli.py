"""The product commands through the CLI on the tiny preset: export -> distill -> report, and bad input.

A tiny BERT teacher is built and fine-tuned in-test (as in ``test_trial_e2e.py``); a fake stopped
NNI experiment (its sqlite database, the layout ``tests/test_report.py`` uses) gives the report
trials to plot and the export a best trial to take.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")

SCHEMA = """
create table TrialJobEvent (timestamp integer, trialJobId text, event text, data text, logPath text,
                            sequenceId integer, message text, environment text);
create table MetricData (timestamp integer, trialJobId text, parameterId text, type text, sequence integer,
                         data text);
"""


def _make_experiment(db: Path, jobs):
    """A stopped NNI experiment's database: ``jobs`` = [(id, params, final status, final metric or None)]."""
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    for i, (tid, params, status, final) in enumerate(jobs):
        hp = json.dumps({"parameter_id": i, "parameter_source": "algorithm", "parameters": params})
        for j, event in enumerate(["WAITING", "RUNNING", status]):
            conn.execute("insert into TrialJobEvent values (?,?,?,?,?,?,?,?)",
                         (1000 * i + j, tid, event, hp if event == "WAITING" else None, "file://x", i, None, None))
        if final is not None:
            conn.execute("insert into MetricData values (?,?,?,?,?,?)",
                         (1000 * i + 9, tid, str(i), "FINAL", 0, json.dumps(json.dumps(final))))
    conn.commit()
    conn.close()


def test_distill_config_section(tmp_path):
    from nni_effbert.config import ConfigError, DistillConfig, load_config

    cfg = load_config(TINY, ["distill.task_steps=7", "distill.eval_interval=0"], check_paths=False)
    assert isinstance(cfg.distill, DistillConfig)
    assert (cfg.distill.task_steps, cfg.distill.eval_interval, cfg.distill.general_steps) == (7, 0, 200)
    with pytest.raises(ConfigError, match="distill.batch_size: must be > 0"):
        load_config(TINY, ["distill.batch_size=0"], check_paths=False)
    with pytest.raises(ConfigError, match="distill.steps"):
        load_config(TINY, ["distill.steps=3"], check_paths=False)
    cfg.save(tmp_path / "c.yml")  # round trip through the saved form
    assert load_config(tmp_path / "c.yml", check_paths=False).distill == cfg.distill


def test_distill_seed_is_its_own():
    from nni_effbert.config import ConfigError, load_config
    from nni_effbert.product.distill import plan_distill

    cfg = load_config(TINY, ["seed=4"], check_paths=False)
    assert cfg.distill.seed == 4 and plan_distill(cfg).seed == 4  # empty: the top-level seed
    other = load_config(TINY, ["seed=4", "distill.seed=9"], check_paths=False)
    assert plan_distill(other).seed == 9 and plan_distill(other) != plan_distill(cfg)
    assert (other.seed, other.task.seed) == (4, 4)  # data subset, teacher and search untouched
    with pytest.raises(ConfigError, match="distill.seed"):
        load_config(TINY, ["distill.seed=one"], check_paths=False)


def test_baseline_arch_matches_size():
    from nni_effbert.product.baselines import baseline_arch
    from nni_effbert.search_spaces import EfficientBertSpace

    space = EfficientBertSpace.preset("tiny")
    widths = space.config.widths
    searched = space.bert_arch(width=widths[0], stack=2)  # bigger than any stack-1 BERT MLP
    target = space.count_params(searched)
    choice = baseline_arch(space, target)
    sizes = {w: space.count_params(space.bert_arch(width=w, stack=1)) for w in widths}
    assert choice.params == min(sizes.values(), key=lambda n: abs(n - target))
    assert choice.width == max(widths) and choice.difference == sizes[max(widths)] - target < 0
    assert all(choice.arch[f"layer{i}_stack"] == 1 for i in range(space.config.num_hidden_layers))
    exact = baseline_arch(space, sizes[widths[-1]])
    assert exact.width == widths[-1] and exact.difference == 0


def test_export_distill_report_cli(tmp_path, base_teacher, glue_dir, capsys, monkeypatch):
    from nni_effbert import cli
    from nni_effbert.nas import records as records_mod
    from nni_effbert.product.loader import load_exported
    from nni_effbert.search_spaces import EfficientBertSpace

    monkeypatch.setattr(records_mod, "_MANIFEST", tmp_path / "no-manifest")
    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=96", "--set=task.max_dev_rows=48", "--set=distill.general_steps=3",
            "--set=distill.task_steps=4", "--set=distill.eval_interval=2", "--set=distill.batch_size=16"]
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    assert cli.main(["warmup", "-q", "-c", TINY, *sets, "--stage", "0"]) == 0
    capsys.readouterr()

    space = EfficientBertSpace.preset("tiny")
    arch = space.bert_arch(width=space.config.widths[1], stack=2)
    arch["layer0_post_act"] = "tanh"
    (tmp_path / "arch.json").write_text(json.dumps(arch))

    # export --arch
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--arch", str(tmp_path / "arch.json")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder == work / "exports" / "searched" and (folder / "model.safetensors").is_file()
    exported = load_exported(folder)
    assert exported.meta["extra"]["supernet_stage"] == 0 and exported.meta["extra"]["source"] == "arch file"
    before = {k: v.clone() for k, v in exported.model.state_dict().items()}

    # distill: new weights, the record in the folder's metadata, the dev metric printed
    assert cli.main(["distill", "-q", "-c", TINY, *sets, "--export", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "3 general + 4 task KD steps" in out and "dev accuracy = " in out
    distilled = load_exported(folder)
    rec = distilled.meta["extra"]["distill"]
    assert rec["plan"]["general_steps"] == 3 and rec["plan"]["task_steps"] == 4
    assert [c[0] for c in rec["curve"]] == [2, 4] and 0.0 <= rec["dev_metric"] <= 1.0
    assert rec["dev_metric"] == rec["curve"][-1][1] and rec["latency_ms"] > 0
    assert distilled.meta["extra"]["supernet_stage"] == 0  # earlier metadata kept
    changed = [k for k, v in distilled.model.state_dict().items() if not (v == before[k]).all()]
    assert changed, "distillation did not change any weight"
    # The same budget again: nothing is trained, the record stays.
    assert cli.main(["distill", "-q", "-c", TINY, *sets, "--export", str(folder)]) == 0
    assert "already distilled" in capsys.readouterr().out
    assert load_exported(folder).meta["extra"]["distill"]["created"] == rec["created"]
    # Another distill.seed on a fresh export of the same arch: same budget, other weights.
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--arch", str(tmp_path / "arch.json"), "--name", "s1"]) == 0
    assert cli.main(["distill", "-q", "-c", TINY, *sets, "--set=distill.seed=1",
                     "--export", str(work / "exports" / "s1")]) == 0
    capsys.readouterr()
    seed1 = load_exported(work / "exports" / "s1")
    assert seed1.meta["extra"]["distill"]["plan"] == {**rec["plan"], "seed": 1} and rec["plan"]["seed"] == 0
    assert any(not (v == distilled.model.state_dict()[k]).all() for k, v in seed1.model.state_dict().items())

    # report, with trials of a fake stopped experiment for the plots
    exps = tmp_path / "exps"
    trial_arch = {**arch, "_stage": 0, "_stage_name": "coarse"}
    _make_experiment(exps / "exp42" / "db" / "nni.sqlite", [
        ("W0", {"_warmup_stage": 0}, "SUCCEEDED", {"default": 0.5}),
        ("T1", trial_arch, "SUCCEEDED", {"default": 0.61, "params": 30000, "non_embedding_params": 9000,
                                         "latency_ms": 1.0}),
        ("T2", {**trial_arch, "layer0_width": space.config.widths[0]}, "SUCCEEDED",
         {"default": 0.58, "params": 32000, "non_embedding_params": 11000, "latency_ms": 1.3}),
        ("T3", trial_arch, "FAILED", None),
    ])
    assert cli.main(["report", "-q", "-c", TINY, *sets, "--experiment", "exp42",
                     "--experiments-dir", str(exps)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    # teacher, the params-matched baseline, the latency-matched one unless it has the same width, searched
    assert len(rows) in (3, 4), out
    assert len(rows) == 3 or rows[2].startswith("| baseline (BERT MLP), matched by latency"), out
    assert rows[0].startswith("| teacher") and rows[1].startswith("| baseline") and rows[-1].startswith("| searched")
    assert "1.00x" in rows[0] and "100.0%" in rows[0]
    assert "searched - baseline (dev, paired, 95% CI): " in out and "teacher - searched (dev, paired" in out
    reports = work / "reports"
    assert (reports / "report.md").is_file() and "exp42" in (reports / "report.md").read_text()
    md = (reports / "report.md").read_text()
    assert "### Paired comparisons on the dev rows" in md and "| searched vs baseline |" in md
    assert {p.name for p in reports.glob("*.png")} >= {"best_so_far.png", "metric_vs_params.png",
                                                       "metric_vs_latency.png"}
    # The runtime section (ONNX files exported for every model; the int8 teacher is a row of its own)
    text = (reports / "report.md").read_text()
    assert "## Deployment runtimes" in text and text.index("## Deployment runtimes") < text.index("## Search")
    runtimes = json.loads((reports / "runtimes.json").read_text())["rows"]
    assert {(r["role"], r["precision"]) for r in runtimes} >= {("teacher", "fp32"), ("teacher", "int8"),
                                                                ("searched", "fp32"), ("searched", "int8")}
    t32 = next(r for r in runtimes if r["role"] == "teacher" and r["precision"] == "fp32")
    assert t32["onnxruntime_speedup"] == 1.0 and abs(t32["dev_metric"] - t32["torch_dev_metric"]) < 1e-6
    assert (work / "exports" / "teacher" / "model.int8.onnx").is_file() and (folder / "model.onnx").is_file()
    # export --int8 (implies --onnx) on the existing distilled folder, and export-teacher
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--int8"]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff| vs PyTorch" in out and "predicts PyTorch's class on" in out and "sst2 dev rows" in out
    assert cli.main(["export-teacher", "-q", "-c", TINY, *sets]) == 0
    assert "max |logit diff| vs PyTorch" in capsys.readouterr().out
    assert not (work / "exports" / "teacher" / "model.int8.onnx").exists()  # no stale int8 beside a new fp32

    base = load_exported(work / "exports" / "baseline")
    assert base.meta["extra"]["baseline_for"] == distilled.meta["fingerprint"]
    assert base.meta["extra"]["distill"]["plan"] == rec["plan"]  # the same final distill budget
    assert all(base.arch[f"layer{i}_stack"] == 1 and base.arch[f"layer{i}_mid_act"] == "gelu"
               for i in range(space.config.num_hidden_layers))
    assert f"{base.meta['extra']['param_difference']:+d} params vs searched" in rows[1]

    # export --experiment: the best succeeded trial (T1), weights from that experiment's supernet of
    # its stage (its warm-up trial wrote supernet/exp42/stage0.pt), never the work directory's own.
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--experiment", "exp42", "--experiments-dir", str(exps),
                     "--name", "best"]) == 2
    assert "experiment exp42 has no supernet of stage 0" in capsys.readouterr().err
    assert cli.main(["warmup", "-q", "-c", TINY, *sets, "--stage", "0", "--experiment", "exp42"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--experiment", "exp42", "--experiments-dir", str(exps),
                     "--name", "best"]) == 0
    out = capsys.readouterr().out
    assert "best trial T1" in out and out.strip().endswith(str(work / "exports" / "best"))
    best = load_exported(work / "exports" / "best")
    assert best.arch == space.validate_arch(arch) and best.meta["extra"]["trial_id"] == "T1"
    assert best.meta["extra"]["supernet_experiment"] == "exp42"
    assert best.meta["extra"]["supernet_checkpoint"]["path"] == str(work / "supernet" / "exp42" / "stage0.pt")

    # bad input: one line on stderr, exit status 2
    _make_experiment(exps / "dead" / "db" / "nni.sqlite", [("F1", trial_arch, "FAILED", None),
                                                           ("F2", trial_arch, "SUCCEEDED", None)])
    cases = [
        (["export", "-c", str(tmp_path / "missing.yml"), "--arch", "a.json"], "config file not found"),
        (["export", "-c", TINY, *sets, "--experiment", "nope", "--experiments-dir", str(exps)],
         "unknown NNI experiment 'nope'"),
        (["export", "-c", TINY, *sets, "--experiment", "dead", "--experiments-dir", str(exps)],
         "no succeeded trial"),
        (["report", "-c", TINY, *sets, "--experiment", "nope", "--experiments-dir", str(exps)],
         "unknown NNI experiment 'nope'"),
        (["distill", "-c", TINY, *sets, "--export", str(tmp_path / "nothing")], "does not exist"),
        (["distill", "-c", TINY, *sets, "--export", str(folder), "--set=distill.general_steps=0",
          "--set=distill.task_steps=0"], "nothing to distil"),
        (["export", "-c", TINY, *sets, "--arch", str(tmp_path / "arch.json"), "--set=workdir=" + str(tmp_path / "w2")],
         "no fine-tuned teacher"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


def test_both_baselines_are_distilled_once_and_reused_for_the_same_budget(tmp_path, base_teacher, glue_dir, capsys,
                                                                          monkeypatch):
    """``ensure_baseline`` (params) and ``ensure_latency_baseline`` export and distil their BERT-MLP
    baseline, record what it was matched to, reuse it for the same searched student and budget,
    and export it again for another distill budget."""
    from nni_effbert import cli
    from nni_effbert.config import load_config
    from nni_effbert.product import baselines
    from nni_effbert.product.distill import plan_distill
    from nni_effbert.product.loader import load_exported
    from nni_effbert.product.baselines import BASELINE, LATENCY_BASELINE, ensure_baseline, ensure_latency_baseline
    from nni_effbert.search_spaces import EfficientBertSpace

    work = tmp_path / "work"
    sets = [f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}", "task.max_train_rows=96",
            "task.max_dev_rows=48", "distill.general_steps=0", "distill.task_steps=2", "distill.eval_interval=0",
            "distill.batch_size=16", "evaluator.latency_repeats=3"]
    argv = [f"--set={s}" for s in sets]
    assert cli.main(["teacher", "-q", "-c", TINY, *argv]) == 0
    assert cli.main(["warmup", "-q", "-c", TINY, *argv, "--stage", "0"]) == 0
    space = EfficientBertSpace.preset("tiny")
    arch = space.bert_arch(width=space.config.widths[1], stack=2)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert cli.main(["export", "-q", "-c", TINY, *argv, "--arch", str(tmp_path / "arch.json")]) == 0
    capsys.readouterr()
    searched = work / "exports" / "searched"
    cfg = load_config(TINY, sets)

    exports = []
    real_export = baselines.export_from_supernet
    monkeypatch.setattr(baselines, "export_from_supernet", lambda ev, a, stage, name, extra, **kw: exports.append(name) or
                        real_export(ev, a, stage, name, extra, **kw))
    base, choice = ensure_baseline(cfg, searched, progress=False)
    lat, lat_choice = ensure_latency_baseline(cfg, searched, progress=False)
    assert exports == [BASELINE, LATENCY_BASELINE]
    assert base.path == work / "exports" / BASELINE and lat.path == work / "exports" / LATENCY_BASELINE
    fingerprint = load_exported(searched).meta["fingerprint"]
    for folder, matched in ((base.path, {"target_params": choice.target, "param_difference": choice.difference}),
                            (lat.path, {"matched_by": "latency", "predicted_ms": lat_choice.predicted_ms})):
        meta = load_exported(folder).meta
        extra = meta["extra"]
        assert {k: extra[k] for k in matched} == matched
        assert extra["baseline_for"] == fingerprint and extra["searched_export"] == str(searched)
        assert extra["distill"]["plan"] == plan_distill(cfg).to_dict() and extra["supernet_stage"] == 0
    assert load_exported(lat.path).arch == space.validate_arch(lat_choice.arch)
    assert load_exported(base.path).arch == space.validate_arch(choice.arch)

    # The same searched student and budget: both reused, nothing exported or trained again.
    again, _ = ensure_baseline(cfg, searched, progress=False)
    lat_again, _ = ensure_latency_baseline(cfg, searched, progress=False)
    assert exports == [BASELINE, LATENCY_BASELINE]
    assert (again.dev_metric, lat_again.dev_metric) == (base.dev_metric, lat.dev_metric)
    # Another distill budget: exported again from the supernet, then distilled with it.
    longer = load_config(TINY, [*sets, "distill.task_steps=3"])
    ensure_latency_baseline(longer, searched, progress=False)
    assert exports == [BASELINE, LATENCY_BASELINE, LATENCY_BASELINE]
    assert load_exported(lat.path).meta["extra"]["distill"]["plan"]["task_steps"] == 3


@pytest.mark.integration
def test_whole_cli_chain_with_nnictl(tmp_path, base_teacher, glue_dir, capsys):
    """teacher -> warmup -> search (nnictl, 4 candidates + 2 warm-up trials) -> export -> distill -> report."""
    import re
    import time

    from nni_effbert import cli
    from nni_effbert.product.loader import load_exported

    work = tmp_path / "work"
    stages = ("[{name: coarse, kind: joint, trials: 2, warmup_steps: 4}, "
              "{name: size, kind: size, trials: 2, warmup_steps: 2, train_steps: 0}]")
    sets = [f"--set=workdir={work}", f"--set=teacher.model={base_teacher}", f"--set=task.data_dir={glue_dir}",
            "--set=task.max_train_rows=96", "--set=task.max_dev_rows=48", "--set=evaluator.train_steps=2",
            "--set=search.trial_concurrency=2", f"--set=search.stages={stages}",
            "--set=distill.general_steps=2", "--set=distill.task_steps=4", "--set=distill.batch_size=16"]
    started = time.perf_counter()
    assert cli.main(["teacher", "-q", "-c", TINY, *sets]) == 0
    assert cli.main(["warmup", "-q", "-c", TINY, *sets, "--stage", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["search", "-q", "-c", TINY, *sets, "--wait", "--timeout", "600"]) == 0
    out = capsys.readouterr().out
    exp_id = re.search(r"^experiment (\S+): (\S+)$", out, re.M).group(1)

    assert cli.main(["export", "-q", "-c", TINY, *sets, "--experiment", exp_id]) == 0
    out = capsys.readouterr().out
    folder = Path(out.strip().splitlines()[-1])
    assert "best trial" in out and "(stage 1," in out  # the last stage's best
    assert cli.main(["distill", "-q", "-c", TINY, *sets, "--export", str(folder)]) == 0
    assert cli.main(["report", "-q", "-c", TINY, *sets]) == 0  # experiment id from the export
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    names = [r.split("|")[1].strip().split(" (")[0] for r in rows]
    # The latency-matched baseline has its own row unless it picks the params-matched width
    # (latency is measured, so which one it picks varies between runs).
    assert names in (["teacher", "baseline", "searched student"],
                     ["teacher", "baseline", "baseline", "searched student"]), names
    report = (work / "reports" / "report.md").read_text()
    assert exp_id in report and (work / "reports" / "best_so_far.png").is_file()
    meta = load_exported(folder).meta["extra"]
    assert meta["experiment"] == exp_id and meta["stage"] == 1 and "distill" in meta
    with capsys.disabled():
        print(f"\nwhole CLI chain (teacher -> report, nnictl): {time.perf_counter() - started:.0f} s")


def test_quickstart_without_hub_says_pass_data_dir(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EFFBERT_DATA_DIR"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "nni_effbert.cli", "quickstart", "-q", "--budget", "smoke",
                        "--workdir", str(tmp_path / "qs")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("nni-effbert quickstart: error:")]
    assert len(err) == 1 and "--data-dir" in err[0] and "hub" in err[0], p.stderr[-2000:]
    assert (tmp_path / "qs" / "quickstart.yml").is_file()


def test_quickstart_bad_input(tmp_path, capsys):
    from nni_effbert import cli

    assert cli.main(["quickstart", "--data-dir", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir: folder not found" in err


def test_pipeline_search_only_stops_after_the_search(tmp_path, monkeypatch):
    """``run_pipeline(search_only=True)`` (the latency-budget bench's path) fine-tunes the teacher and
    searches, then returns: no export, distillation or report runs."""
    from types import SimpleNamespace

    from nni_effbert.config import load_config
    from nni_effbert.product import quickstart

    ran = []
    monkeypatch.setattr(quickstart, "finetune_from_config",
                        lambda cfg, progress: ran.append("teacher") or SimpleNamespace(metric="accuracy", dev_metric=0.5,
                                                                                      path="t"))
    monkeypatch.setattr(quickstart, "_search", lambda *a: ran.append("search") or SimpleNamespace(
        ok=True, experiment_id="abc123", status="DONE", error=None, workdir=str(tmp_path)))

    def later(*a, **k):
        raise AssertionError("a step after the search ran")

    for name in ("export_best", "run_distill", "build_report", "keep_previous_export"):
        monkeypatch.setattr(quickstart, name, later)
    monkeypatch.setattr(quickstart.KDSetup, "from_config", later)
    cfg = load_config(TINY, [f"workdir={tmp_path / 'w'}"], check_paths=False)
    out = quickstart.run_pipeline(cfg, Path(TINY), progress=False, search_only=True)
    assert ran == ["teacher", "search"]
    assert out.experiment_id == "abc123" and out.export is None and out.distilled is None and out.report is None
    assert set(out.timings) == {"teacher", "search"}
    with pytest.raises(AssertionError, match="after the search"):
        quickstart.run_pipeline(cfg, Path(TINY), progress=False)
