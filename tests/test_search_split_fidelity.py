"""Issue 12: the held-out search split, the search objectives and ``nni-effbert fidelity``.

Tiny preset, SST-2 rows from the shared data, a tiny teacher fine-tuned in-test.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

import nni_effbert.kd.train as kd_train_mod
from nni_effbert.cli import COMMANDS, build_parser
from nni_effbert.config import load_config
from nni_effbert.data.loading import search_split_rows
from nni_effbert.errors import ConfigError
from nni_effbert.kd.teacher import teacher_outputs
from nni_effbert.kd.setup import KDSetup
from nni_effbert.nas.kd_evaluator import KDEvaluator
from nni_effbert.nas.objectives import objective_value
from nni_effbert.nas.warmup import run_warmup
from nni_effbert.product import fidelity as fidelity_mod
from nni_effbert.product.distill import run_distill
from nni_effbert.product.report_page import write_report
from nni_effbert.product.students import export_trial_arch
from nni_effbert.workdir import WorkDir
from conftest import finetune_teacher_into

REPO = Path(__file__).resolve().parents[1]
SEARCH_ROWS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, base_teacher, glue_dir):
    work = tmp_path_factory.mktemp("work")
    cfg = load_config(REPO / "examples" / "tiny" / "effbert.yml", [
        f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
        "task.max_train_rows=64", "task.max_dev_rows=16", f"task.search_rows={SEARCH_ROWS}",
        "warmup.batch_size=8", "evaluator.batch_size=8", "evaluator.latency_repeats=1",
        "distill.general_steps=2", "distill.task_steps=2", "distill.batch_size=8", "distill.eval_interval=0"])
    finetune_teacher_into(cfg)
    return cfg


@pytest.fixture(scope="module")
def setup(cfg):
    return KDSetup.from_config(cfg, progress=False)


class _Tripwire:
    """Stands in for the dev split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the search opened the dev split ({name})")

    def __len__(self):
        raise AssertionError("the search opened the dev split (len)")

    def __getitem__(self, item):
        raise AssertionError("the search opened the dev split (rows)")

    def __iter__(self):
        raise AssertionError("the search opened the dev split (iteration)")


def test_search_split_is_seeded_disjoint_and_configurable():
    cfg = SimpleNamespace(search_rows=30, search_fraction=None, seed=3)
    train, search = search_split_rows(100, cfg)
    assert len(search) == 30 and len(train) == 70 and not set(train) & set(search)
    assert sorted(np.concatenate([train, search]).tolist()) == list(range(100))
    again = search_split_rows(100, cfg)
    assert again[1].tolist() == search.tolist()
    assert search_split_rows(100, SimpleNamespace(search_rows=30, search_fraction=None, seed=4))[1].tolist() != \
        search.tolist()
    assert len(search_split_rows(100, SimpleNamespace(search_rows=None, search_fraction=0.25, seed=0))[1]) == 25
    assert len(search_split_rows(10, cfg)[1]) == 5  # capped at half of the train rows
    with pytest.raises(ConfigError, match="search_rows or search_fraction"):
        load_config(REPO / "examples" / "tiny" / "effbert.yml", ["task.search_rows=5", "task.search_fraction=0.1",
                                                                  "workdir=/tmp/x"], check_paths=False)
    only_fraction = load_config(REPO / "examples" / "tiny" / "effbert.yml",
                                ["task.search_fraction=0.1", "workdir=/tmp/x"], check_paths=False)
    assert only_fraction.task.search_rows is None and only_fraction.task.search_fraction == 0.1


def test_task_data_has_disjoint_search_split(setup):
    task = setup.task
    train_ids, search_ids = set(task.train["idx"]), set(task.search["idx"])
    assert len(search_ids) == SEARCH_ROWS and not train_ids & search_ids
    assert sorted(train_ids | search_ids) == list(range(64))  # both carved from the 64 subset train rows
    assert setup.search_cache().ids.tolist() == sorted(search_ids)  # the teacher cache covers the search split


def test_no_student_trains_on_the_search_split_and_the_search_never_opens_dev(cfg, setup, monkeypatch):
    drawn = []
    real = kd_train_mod.iterate_batches

    def recording(dataset, *args, **kwargs):
        for batch in real(dataset, *args, **kwargs):
            drawn.append(set(batch["idx"].tolist()))
            yield batch

    monkeypatch.setattr(kd_train_mod, "iterate_batches", recording)
    search_ids = set(setup.task.search["idx"])
    dev = setup.task.dev
    monkeypatch.setattr(setup.task, "dev", _Tripwire())
    # Warm-up with a general phase on the task sentences at another length (unlabeled_texts path).
    longer = dataclasses.replace(cfg, warmup=dataclasses.replace(cfg.warmup, max_seq_length=24))
    warm = run_warmup(longer, 0, steps=3, general_steps=2, progress=False, setup=setup)
    assert warm.search["search_rows"] == SEARCH_ROWS
    n_warm = len(drawn)
    assert n_warm == 5
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, latency=False, setup=setup)
    arch = setup.space.random_arch(np.random.default_rng(1))
    result = evaluator.evaluate(arch, trial_id="split-check")  # train_steps 4, eval every 2
    assert len(drawn) == n_warm + 4 and result["search_rows"] == SEARCH_ROWS
    monkeypatch.setattr(setup.task, "dev", dev)  # the final distillation reports on dev
    info = export_trial_arch(cfg, arch, 0, "split-check", evaluator=evaluator)
    run_distill(cfg, info.path, force=True, progress=False, setup=setup)
    assert len(drawn) == n_warm + 4 + 4  # distill: 2 general + 2 task steps
    every = set().union(*drawn)
    assert every and not every & search_ids, sorted(every & search_ids)
    assert every <= set(setup.task.train["idx"])


def test_objectives_are_finite_and_kd_prefers_the_teacher(setup):
    loss_fn = setup.loss_fn
    teacher = setup.teacher_model()

    class TeacherAsStudent(torch.nn.Module):
        """A 'student' whose outputs are the teacher's own (live, float32)."""

        def forward(self, input_ids, attention_mask, token_type_ids=None, return_kd=True):
            t = teacher_outputs(teacher, input_ids, attention_mask, token_type_ids, loss_fn.teacher_hidden_layers,
                                loss_fn.teacher_attention_layers)
            return SimpleNamespace(logits=t.logits, hidden_states=tuple(t.hidden_states), attentions=tuple(t.attentions))

    torch.manual_seed(0)
    random_student = setup.space.subnet(setup.space.random_arch(np.random.default_rng(0)))
    random_student.apply(random_student._init_weights)
    from nni_effbert.nas.objectives import search_metric_dict

    good = search_metric_dict(setup.score_search(TeacherAsStudent()), setup.task.spec.metric)
    bad = search_metric_dict(setup.score_search(random_student), setup.task.spec.metric)
    for scored in (good, bad):
        for name in ("kd", "kd_pred", "metric"):
            assert math.isfinite(objective_value(scored, name)), (name, scored)
    assert good["search_kd_loss"] < bad["search_kd_loss"]
    assert good["search_kd_pred_loss"] < bad["search_kd_pred_loss"]
    assert objective_value(good, "kd") > objective_value(bad, "kd")
    assert good["search_kd_hidden_loss"] < 1e-3 and good["search_kd_attention_loss"] < 1e-3  # fp16 cache vs fp32


def _same(ours, scipy_value):
    """Ours equals scipy's; scipy's NaN (a constant input: undefined) is None in fidelity.json."""
    if scipy_value is None or not math.isfinite(scipy_value):
        assert ours is None
    else:
        assert ours == pytest.approx(scipy_value)


def _tiny_experiment(cfg, setup, n=4, experiment="tinyexp"):
    """Trial dicts of a tiny experiment whose warm-up wrote ``supernet/<experiment>/stage0.pt``,
    the layout of an NNI experiment (what ``nni-effbert fidelity --experiment ID`` reads)."""
    run_warmup(cfg, 0, progress=False, setup=setup, experiment=experiment)
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, latency=False, setup=setup,
                            experiment=experiment)
    rng = np.random.default_rng(7)
    trials = []
    for i in range(n):
        arch = setup.space.random_arch(rng)
        final = evaluator.evaluate(arch, trial_id=f"tiny-{i}")
        trials.append({"trial_id": f"tiny-{i}", "sequence": i + 1, "stage": 0, "status": "SUCCEEDED",
                       "metric": final["default"], "params": final["params"], "arch": arch, "final": final})
    trials.append({"trial_id": "warm-0", "sequence": 0, "stage": 0, "warmup": True, "status": "SUCCEEDED",
                   "arch": {}, "final": {"warmup": True}})
    return trials


def test_fidelity_matches_scipy_writes_files_and_resumes(cfg, setup, monkeypatch):
    trials = _tiny_experiment(cfg, setup)
    out = fidelity_mod.run_fidelity(cfg, "tinyexp", trials=trials, sample=3, steps=3, repeat=1, progress=False,
                                    setup=setup)
    data = json.loads(out.json_path.read_text())
    assert out.md_path.is_file() and out.png_path.read_bytes()[:4] == b"\x89PNG"
    assert out.distilled == 3 and out.reused == 0 and out.rescored == 3
    pairs = data["pairs"]
    assert len(pairs) == 3 and {"trial", "search_score", "final_score"} <= set(pairs[0])
    x, y = [p["search_score"] for p in pairs], [p["final_score"] for p in pairs]
    assert data["distill_plan"]["general_steps"] + data["distill_plan"]["task_steps"] == 3
    kt, sr = stats.kendalltau(x, y), stats.spearmanr(x, y)
    _same(data["kendall_tau"], kt.statistic)
    _same(data["kendall_tau_pvalue"], kt.pvalue)
    _same(data["spearman_rho"], sr.statistic)
    _same(data["spearman_rho_pvalue"], sr.pvalue)
    assert set(data["by_objective"]) == {"kd", "kd_pred", "metric"}
    assert data["by_objective"]["kd"]["kendall_tau"] == data["kendall_tau"]  # default is the kd objective
    metric_x = [p["objectives"]["metric"] for p in pairs]
    _same(data["by_objective"]["metric"]["kendall_tau"], stats.kendalltau(metric_x, y).statistic)
    # The best search score and the worst are always in the sample.
    ranked = sorted((t for t in trials if not t.get("warmup")), key=lambda t: -t["metric"])
    assert pairs[0]["trial"] == ranked[0]["trial_id"] and pairs[-1]["trial"] == ranked[-1]["trial_id"]
    rep = data["repeat"]
    assert rep["repeats"] == 1 and len(rep["rescores"]) == 3 and rep["per_seed"][0]["evaluator_seed"] == cfg.seed + 1
    assert rep["tie_margin_suggested"] == pytest.approx(2 * rep["score_noise_sd"])
    assert rep["tie_margin_in_use"] == cfg.search.tie_margin and "search.tie_margin of about" in out.summary

    # Resume: nothing is distilled or re-scored again.
    real_distill, real_evaluate = fidelity_mod.run_distill, fidelity_mod.KDEvaluator.evaluate

    def boom(*a, **k):
        raise AssertionError("redone")

    monkeypatch.setattr(fidelity_mod, "run_distill", boom)
    monkeypatch.setattr(fidelity_mod.KDEvaluator, "evaluate", boom)
    again = fidelity_mod.run_fidelity(cfg, "tinyexp", trials=trials, sample=3, steps=3, repeat=1, progress=False,
                                      setup=setup)
    assert again.distilled == 0 and again.reused == 3 and again.rescored == 0
    assert again.data["pairs"] == data["pairs"] and again.data["kendall_tau"] == data["kendall_tau"]

    # --distill-seeds 2: the base seed's records are reused, one more distillation per arch; the
    # final score is the mean of the two seeds' and the final's own seed-to-seed tau is scipy's.
    monkeypatch.setattr(fidelity_mod, "run_distill", real_distill)
    monkeypatch.setattr(fidelity_mod.KDEvaluator, "evaluate", real_evaluate)
    two = fidelity_mod.run_fidelity(cfg, "tinyexp", trials=trials, sample=3, steps=3, progress=False, setup=setup,
                                    distill_seeds=2)
    assert two.distilled == 3 and two.reused == 3
    base = data["distill_plan"]["seed"]
    for p in two.data["pairs"]:
        by_seed = p["final_by_seed"]
        assert set(by_seed) == {str(base), str(base + 1)}
        assert by_seed[str(base)] == {q["trial"]: q for q in pairs}[p["trial"]]["final_score"]
        assert p["final_score"] == pytest.approx((by_seed[str(base)] + by_seed[str(base + 1)]) / 2)
    sts = two.data["final_seed_to_seed"]
    assert sts["distill_seeds"] == [base, base + 1] and len(sts["pairs"]) == 1
    _same(sts["kendall_tau_mean"], stats.kendalltau([p["final_by_seed"][str(base)] for p in two.data["pairs"]],
                                                    [p["final_by_seed"][str(base + 1)] for p in two.data["pairs"]]).statistic)
    assert "seed-to-seed" in two.summary and "distill seeds" in two.md_path.read_text()
    with pytest.raises(ConfigError, match="--distill-seeds"):
        fidelity_mod.run_fidelity(cfg, "tinyexp", trials=trials, sample=3, steps=3, progress=False, setup=setup,
                                  distill_seeds=0)

    # The report includes the fidelity section when fidelity.json exists.
    res = write_report(WorkDir.of(cfg).root, trials, [], search_metric_name="search score (kd)")
    text = res.report.read_text()
    assert "Search fidelity" in text and "fidelity.png" in text


def test_select_candidates_spans_the_range():
    trials = [{"trial_id": f"t{i}", "metric": float(i)} for i in range(20)]
    chosen = fidelity_mod.select_candidates(trials, 8, seed=0)
    scores = [t["metric"] for t in chosen]
    assert len(chosen) == 8 and scores[:2] == [19.0, 18.0] and scores[-2:] == [1.0, 0.0]
    assert fidelity_mod.select_candidates(trials, 8, seed=0) == chosen
    assert fidelity_mod.select_candidates(trials, 8, seed=1) != chosen
    with pytest.raises(ConfigError):
        fidelity_mod.select_candidates(trials, 1, seed=0)
    agree = fidelity_mod.rank_agreement([1, 2, 3, 4], [1, 3, 2, 4])
    assert agree["top1_hit"] == 1.0 and agree["top3_hit_rate"] == pytest.approx(1.0)
    assert agree["kendall_tau"] == pytest.approx(stats.kendalltau([1, 2, 3, 4], [1, 3, 2, 4]).statistic)
    assert fidelity_mod.rank_agreement([1, 1, 1], [1, 2, 3])["kendall_tau"] is None
    tied = fidelity_mod.rank_agreement([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5])  # every final score ties
    assert tied["kendall_tau"] is None and tied["top1_hit"] is None and tied["top3_hit_rate"] is None
    assert fidelity_mod.rank_agreement([4, 3, 2, 1], [1, 2, 3, 4])["top3_hit_rate"] == pytest.approx(2 / 3)


def test_score_noise_removes_the_shift_every_arch_shares():
    pairs = [{"trial": t, "search_score": v} for t, v in zip("abcd", [-1.60, -1.62, -1.65, -1.70])]
    # Seed 1 moves every arch by +0.01 (no noise between archs); seed 2 adds +-0.003 around a -0.02 shift.
    rescores = ([{"trial": p["trial"], "evaluator_seed": 1, "search_score": p["search_score"] + 0.01} for p in pairs]
                + [{"trial": p["trial"], "evaluator_seed": 2, "search_score": p["search_score"] - 0.02 + e}
                   for p, e in zip(pairs, [0.003, -0.003, 0.003, -0.003])])
    noise = fidelity_mod.score_noise(pairs, rescores)
    expected = float(np.std([0.003, -0.003, 0.003, -0.003], ddof=1))
    assert noise["score_noise_sd_by_seed"] == pytest.approx([0.0, expected], abs=1e-12)
    assert noise["score_noise_sd"] == pytest.approx(expected / 2)
    assert noise["tie_margin_suggested"] == pytest.approx(expected)
    assert fidelity_mod.score_noise(pairs[:1], rescores[:1])["tie_margin_suggested"] is None


def test_fidelity_is_the_last_command():
    assert COMMANDS[-1].name == "fidelity"
    args = build_parser().parse_args(["fidelity", "-c", "x.yml", "--experiment", "abc", "--sample", "5",
                                      "--steps", "9", "--repeat", "2", "--distill-seeds", "3"])
    assert (args.experiment, args.sample, args.steps, args.repeat, args.distill_seeds) == ("abc", 5, 9, 2, 3)
