"""Cost-aware search: the latency table, the latency budget and objective, Pareto selection.

Timings are asserted loosely (the machine is shared): exact figures belong in bench/.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nni_effbert import cli
from nni_effbert.config import load_config
from nni_effbert.latency import check as ltk
from nni_effbert.latency import components as ltc
from nni_effbert.latency import settings as lts
from nni_effbert.latency import table as lt
from nni_effbert.nas.latency_ranking import best_within_latency, latency_front, trial_latency
from nni_effbert.search_spaces import EfficientBertSpace
from nni_effbert.search_spaces.space_config import preset_config
from nni_effbert.strategies.core import Done, ProgressiveSearch, Proposal
from nni_effbert.strategies.search_errors import BudgetError, SearchConfigError
from nni_effbert.strategies.stages import ObjectiveConfig, SearchConfig, Stage

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny" / "effbert.yml")
#: A small space where sizes differ clearly in cost (a stack of 4 MLPs of width 128 vs one of 32).
SMALL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_stack=4,
             vocab_size=512, embedding_size=32, fit_size=128, max_position_embeddings=64, width_ratios=(1.0, 0.25))
SETTINGS = lts.LatencySettings(threads=1, seq_length=32)


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(ltc, "ROUNDS", 5)
    monkeypatch.setattr(ltc, "ROUND_MS", 1.0)


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    # Rounds long enough to see the machine's load as a forward does (see ltc.ROUND_MS).
    mp = pytest.MonkeyPatch()
    mp.setattr(ltc, "ROUNDS", 5)
    mp.setattr(ltc, "ROUND_MS", 10.0)
    try:
        config = preset_config("tiny", **SMALL)
        path = tmp_path_factory.mktemp("latency") / "table.json"
        yield lt.build_table(config, SETTINGS, path, progress=False)
    finally:
        mp.undo()


def _bert(config, width, stack, act="gelu"):
    space_arch = ltc.reference_arch(config, stack=stack)
    for i in range(config.num_hidden_layers):
        space_arch[f"layer{i}_width"] = width
        space_arch[f"layer{i}_mid_act"] = act
    return space_arch


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_check_compares_the_table_with_end_to_end_measurements(small_table, monkeypatch):
    # How well the table predicts real timings is a benchmark (bench/latency_check.py, target MAPE
    # <= 10%), not a unit test: on a shared machine any timing bound here either flakes or cannot
    # fail. This pins what the check computes from the measurements it is given.
    config = small_table.config
    w = config.widths
    archs = [_bert(config, w[-1], 1, "relu"), _bert(config, w[-1], 2), _bert(config, w[0], 3),
             _bert(config, w[0], 4, "tanh")]
    seen = []

    def fake_measure(model, **kwargs):
        seen.append(kwargs)
        return SimpleNamespace(median_ms=1.25 * small_table.predict(model.arch))

    monkeypatch.setattr(ltk, "measure_latency", fake_measure)
    result = ltk.check_table(small_table, archs, SETTINGS, repeats=7, progress=False)
    assert [p["arch"] for p in result.pairs] == archs
    for pair, arch in zip(result.pairs, archs):
        assert pair["measured_ms"] == pytest.approx(1.25 * pair["predicted_ms"], rel=1e-3)
        assert pair["predicted_ms"] == pytest.approx(small_table.predict(arch), abs=1e-4)
    assert result.mape == pytest.approx(20.0, abs=0.01)  # |p - 1.25 p| / 1.25 p
    assert result.kendall_tau == pytest.approx(1.0)
    assert [p["params"] for p in result.pairs][1] > [p["params"] for p in result.pairs][0]  # a stack of 2 vs 1
    assert all(k["repeats"] == 7 and k["threads"] == SETTINGS.threads and k["seq_length"] == SETTINGS.seq_length
               for k in seen)
    assert result.settings["runtime"] == SETTINGS.runtime


def test_prediction_is_a_sum_without_building_a_model(small_table, monkeypatch):
    config = small_table.config
    arch = ltc.random_archs(config, 1, seed=3)[0]

    def no_model(*a, **k):
        raise AssertionError("predicted_latency_ms must not build a model")

    monkeypatch.setattr(ltc, "EfficientBertModel", no_model)
    parts = small_table.breakdown(arch)
    assert lt.predicted_latency_ms(arch, small_table) == pytest.approx(sum(parts.values()))
    assert set(parts) >= {"embeddings", "head", "overhead", "layer0_attention", "layer0_mlp", "layer1_mlp"}
    # Stacking adds the same MLP again; an empty expression costs no slot entry.
    one, two = _bert(config, config.widths[0], 1), _bert(config, config.widths[0], 2)
    assert small_table.breakdown(two)["layer0_mlp"] == pytest.approx(2 * small_table.breakdown(one)["layer0_mlp"])
    lo, hi = small_table.latency_range()
    assert all(lo - 1e-9 <= small_table.predict(a) <= hi + 1e-9 for a in ltc.random_archs(config, 20, seed=1))


def test_entries_ignore_order_and_binary_kind():
    config = preset_config("tiny")
    names = lt.required_entries(config)
    h = config.hidden_size
    from nni_effbert.search_spaces.modeling import SlotSpec

    a = lt.slot_entry(SlotSpec("gelu", "add", "x", "act_first"), h, h)
    b = lt.slot_entry(SlotSpec("gelu", "max", "input", "binary_first"), h, h)
    assert a == b and a in names
    assert lt.slot_entry(SlotSpec(), h, h) is None
    # 8 activations x {no binary, binary} - the empty slot, per tensor width, + bases + fixed parts
    # (embeddings, attention, head, two overheads) + the calibration scale
    assert len(names) == 15 * len(config.widths) + len(config.widths) + 5 + 1
    assert list(names)[-1] == "calibration"  # fitted last, on the complete sum


def test_calibration_scales_the_sum_to_end_to_end_measurements(tmp_path, monkeypatch):
    """The last entry is the median measured / summed ratio over seeded random archs (not the
    check's seed-0 archs), and every prediction and breakdown carries it."""
    import statistics
    import types

    config = preset_config("tiny")
    real = ltc.ComponentTimer.measure

    def measure(self, kind, spec, table):
        if kind == "calibration":
            return real(self, kind, spec, table)
        return {"embeddings": 1.0, "attention": 2.0, "head": 0.5, "mlp": 1.5}.get(kind, 0.25)

    monkeypatch.setattr(ltc.ComponentTimer, "measure", measure)
    monkeypatch.setattr(ltc, "measure_latency", lambda model, **kw: types.SimpleNamespace(times_ms=[5.0, 5.0]))
    table = lt.build_table(config, lts.LatencySettings(threads=1, seq_length=16), tmp_path / "t.json", progress=False)
    archs = ltc.random_archs(config, ltc.CALIBRATION_ARCHS, seed=ltc.CALIBRATION_SEED)
    assert archs != ltc.random_archs(config, ltc.CALIBRATION_ARCHS, seed=0)
    raw = [table.predict(a, calibrated=False) for a in archs]
    assert len(set(raw)) > 1 and table.scale == pytest.approx(statistics.median(5.0 / r for r in raw), abs=1e-6)
    for arch in ltc.random_archs(config, 5, seed=3):
        expected = table.predict(arch, calibrated=False) * table.scale
        assert table.predict(arch) == pytest.approx(expected)
        assert sum(table.breakdown(arch).values()) == pytest.approx(expected)
    lo, hi = table.latency_range()
    assert all(lo - 1e-9 <= table.predict(a) <= hi + 1e-9 for a in ltc.random_archs(config, 20, seed=1))


def test_table_reused_when_keyed_the_same_and_rebuilt_for_other_threads(tmp_path, monkeypatch):
    config = preset_config("tiny")
    calls = []

    def counting(self, kind, spec, table):  # what is measured, not how long it takes
        calls.append(kind)
        return 0.01

    monkeypatch.setattr(ltc.ComponentTimer, "measure", counting)
    one = lts.LatencySettings(threads=1, seq_length=16)
    path1 = lts.table_path(tmp_path, config, one)
    t1 = lt.build_table(config, one, path1, progress=False)
    assert t1.complete and path1.is_file() and calls
    n_first = len(calls)

    calls.clear()
    again = lt.build_table(config, one, path1, progress=False)
    assert calls == [] and again.entries == t1.entries  # same key: reused, nothing measured

    # Resumable: a partly built file is finished, only the missing entries are measured.
    data = json.loads(path1.read_text())
    for name in list(data["entries"])[:5]:
        del data["entries"][name]
    path1.write_text(json.dumps(data))
    lt.build_table(config, one, path1, progress=False)
    assert len(calls) == 5

    calls.clear()
    two = lts.LatencySettings(threads=2, seq_length=16)
    path2 = lts.table_path(tmp_path, config, two)
    assert path2 != path1 and lt.load_table(path1, config, two) is None  # other key: not reused
    lt.build_table(config, two, path2, progress=False)
    assert len(calls) == n_first and path1.is_file()  # rebuilt in full; the 1-thread table is kept


def test_bad_latency_device_is_one_line_config_error():
    from nni_effbert.errors import ConfigError

    with pytest.raises(ConfigError, match="latency_device"):
        lts.LatencySettings(device="tpu")
    with pytest.raises(ConfigError, match="threads"):
        lts.LatencySettings(threads=0)


def test_cli_latency_check_writes_pairs_mape_and_tau(tmp_path, capsys):
    work = tmp_path / "work"
    sets = [f"--set=workdir={work}", "--set=evaluator.latency_threads=1", "--set=teacher.model=bert-base-uncased"]
    assert cli.main(["latency", "-q", "-c", TINY, *sets, "--check", "3", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "MAPE" in out and "Kendall tau" in out
    check = json.loads((work / "latency" / "check.json").read_text())
    assert len(check["pairs"]) == 3 and {"predicted_ms", "measured_ms"} <= set(check["pairs"][0])
    assert math.isfinite(check["mape"]) and "kendall_tau" in check
    assert len(list((work / "latency").glob("table-*.json"))) == 1
    assert cli.main(["latency", "-q", "-c", TINY, *sets, "--set=evaluator.latency_device=tpu"]) == 2
    assert "latency_device" in capsys.readouterr().err


def test_config_keys():
    cfg = load_config(TINY, ["teacher.model=bert-base-uncased", "evaluator.latency_threads=3", "evaluator.latency_device=cpu",
                             "search.latency_budget_ms=[1.0, 2.5]", "search.speedup=4",
                             "search.objective.kind=mnas", "search.objective.target_ms=2.0"])
    assert cfg.evaluator.latency_threads == 3 and cfg.search.latency_budget_ms == [1.0, 2.5]
    assert cfg.search.objective.kind == "mnas" and cfg.search.objective.weight == -0.07
    assert lts.latency_settings(cfg).threads == 3
    assert cfg.search.latency_budget(teacher_latency_ms=8.0) == (1.0, 2.0)
    with pytest.raises(SearchConfigError, match="teacher"):
        cfg.search.latency_budget(None)
    from nni_effbert.errors import ConfigError

    with pytest.raises(ConfigError, match="objective"):
        load_config(TINY, ["teacher.model=bert-base-uncased", "search.objective.kind=linear"])  # linear needs a weight


# ---------------------------------------------------------------------------------------------
# Budget and objective in the search
# ---------------------------------------------------------------------------------------------


class FakeLatency:
    """A deterministic latency model: ms grow with width x stack and with activations."""

    def __init__(self, space):
        self.space = space

    def __call__(self, arch):
        n = self.space.config.num_hidden_layers
        ms = 1.0
        for i in range(n):
            acts = sum(arch[f"layer{i}_{s}_act"] != "identity" for s in ("pre", "mid", "post"))
            ms += arch[f"layer{i}_stack"] * (arch[f"layer{i}_width"] / 32 + 0.05 * acts)
        return ms


def _run(search, score_fn):
    proposals = []
    for _ in range(500):
        action = search.ask()
        if isinstance(action, Done):
            return proposals
        assert isinstance(action, Proposal), action
        if not action.warmup:
            proposals.append(action)
        search.tell(action.trial_id, None if action.warmup else score_fn(action.arch))
    raise AssertionError("search did not finish")


STAGES = [Stage("coarse", "joint", trials=8), Stage("expr", "expression", trials=4), Stage("size", "size", trials=6)]


def test_every_proposal_respects_the_latency_budget():
    space = EfficientBertSpace.preset("tiny")
    fake = FakeLatency(space)
    budget = [2.0, 2.6]
    search = ProgressiveSearch(space, SearchConfig(stages=STAGES, latency_budget_ms=budget, seed=1), latency_fn=fake)
    proposals = _run(search, lambda arch: float(np.random.RandomState(len(str(arch))).rand()))
    assert len(proposals) >= 10
    for p in proposals:
        assert budget[0] <= fake(p.arch) <= budget[1], fake(p.arch)
    assert all(budget[0] <= r.latency_ms <= budget[1] for r in search.records if not r.warmup)


def test_speedup_budget_and_impossible_budget_refused_before_any_trial():
    space = EfficientBertSpace.preset("tiny")
    fake = FakeLatency(space)
    search = ProgressiveSearch(space, SearchConfig(stages=STAGES, speedup=2.0, seed=0), latency_fn=fake,
                               teacher_latency_ms=5.0)
    assert search.latency_budget == (0.0, 2.5)
    with pytest.raises(BudgetError, match="cannot be met"):
        ProgressiveSearch(space, SearchConfig(stages=STAGES, latency_budget_ms=[0.01, 0.5]), latency_fn=fake)
    with pytest.raises(BudgetError, match="cannot be met"):
        ProgressiveSearch(space, SearchConfig(stages=STAGES, speedup=100.0), latency_fn=fake, teacher_latency_ms=5.0)
    with pytest.raises(SearchConfigError, match="latency predictor"):
        ProgressiveSearch(space, SearchConfig(stages=STAGES, latency_budget_ms=[1, 2]))
    with pytest.raises(SearchConfigError, match="teacher"):
        ProgressiveSearch(space, SearchConfig(stages=STAGES, speedup=2.0), latency_fn=fake)


def test_impossible_budget_with_the_real_table(small_table):
    space = EfficientBertSpace(small_table.config)
    lo, hi = small_table.latency_range()
    with pytest.raises(BudgetError, match=r"lie in \["):
        ProgressiveSearch(space, SearchConfig(stages=STAGES, latency_budget_ms=[0.0, lo * 0.9]),
                          latency_fn=small_table)
    ok = ProgressiveSearch(space, SearchConfig(stages=STAGES, latency_budget_ms=[lo, (lo + hi) / 2]),
                           latency_fn=small_table)
    assert ok.latency_range == pytest.approx((lo, hi))


@pytest.mark.parametrize("objective", [ObjectiveConfig("linear", weight=0.2),
                                       ObjectiveConfig("mnas", target_ms=2.0)])
def test_objective_ranks_by_score_and_latency(objective):
    space = EfficientBertSpace.preset("tiny")
    fake = FakeLatency(space)
    search = ProgressiveSearch(space, SearchConfig(stages=STAGES[:1], objective=objective, seed=2), latency_fn=fake)
    _run(search, lambda arch: 0.5 + 0.01 * arch["layer0_stack"])
    ranked = search.ranking(0)
    assert ranked
    for r in ranked:
        assert r.score == pytest.approx(objective.value(r.metric, fake(r.arch), objective.target(None)))
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


def test_mnas_objective_formula():
    o = ObjectiveConfig("mnas", target_speedup=4.0)
    target = o.target(teacher_latency_ms=20.0)
    assert target == 5.0
    assert o.value(0.8, 10.0, target) == pytest.approx(0.8 * 2 ** -0.07)
    assert o.value(0.8, 5.0, target) == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------
# Pareto selection
# ---------------------------------------------------------------------------------------------


def _trials(n=40, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        final = {"default": float(rng.choice([0.5, 0.6, 0.7, 0.8])), "latency_ms": float(rng.uniform(1, 5))}
        if i % 3:
            final["predicted_latency_ms"] = float(rng.choice([1.0, 2.0, 3.0, 4.0]))
        out.append({"trial_id": f"t{i}", "status": "SUCCEEDED", "stage": int(i % 2), "metric": final["default"],
                    "latency_ms": final["latency_ms"], "final": final})
    out.append({"trial_id": "failed", "status": "FAILED", "stage": 1})
    return out


def test_pareto_front_matches_brute_force():
    trials = _trials()
    front = latency_front(trials, stage=1)
    pool = [t for t in trials if t["status"] == "SUCCEEDED" and t["stage"] == 1]

    def dominated(a):
        la = trial_latency(a)
        return any(trial_latency(b) <= la and b["metric"] >= a["metric"]
                   and (trial_latency(b) < la or b["metric"] > a["metric"]) for b in pool)

    expected = {t["trial_id"] for t in pool if not dominated(t)}
    assert {t["trial_id"] for t in front} == expected
    assert [t["latency_ms"] for t in front] == sorted(t["latency_ms"] for t in front)
    assert all(t["latency_source"] == ("predicted" if "predicted_latency_ms" in t["final"] else "measured")
               for t in front)


def test_best_within_latency_matches_brute_force():
    from nni_effbert.nas.ranking import NoSucceededTrialError

    trials = _trials(seed=4)
    pool = [t for t in trials if t["status"] == "SUCCEEDED" and t["stage"] == 1]
    for limit in (1.5, 2.0, 3.0, 10.0):
        ok = [t for t in pool if trial_latency(t) <= limit]
        if not ok:
            continue
        best = best_within_latency(trials, limit)
        assert best["metric"] == max(t["metric"] for t in ok)
        assert best["latency_ms"] <= limit
    with pytest.raises(NoSucceededTrialError, match="fastest"):
        best_within_latency(trials, 0.1)


def test_cli_export_pareto_lists_the_front_and_refuses_an_unmeetable_limit(tmp_path, capsys):
    from test_product_cli import _make_experiment

    exps = tmp_path / "exps"
    arch = ltc.reference_arch(preset_config("tiny"))
    p = {**arch, "_stage": 0}
    _make_experiment(exps / "expL" / "db" / "nni.sqlite", [
        ("A", p, "SUCCEEDED", {"default": 0.70, "latency_ms": 3.0, "predicted_latency_ms": 2.0}),
        ("B", p, "SUCCEEDED", {"default": 0.60, "latency_ms": 1.0, "predicted_latency_ms": 1.5}),
        ("C", p, "SUCCEEDED", {"default": 0.55, "latency_ms": 1.2, "predicted_latency_ms": 2.5}),  # dominated
        ("D", p, "FAILED", None),
    ])
    sets = [f"--set=workdir={tmp_path / 'work'}", "--set=teacher.model=bert-base-uncased"]
    base = ["export", "-q", "-c", TINY, *sets, "--experiment", "expL", "--experiments-dir", str(exps)]
    assert cli.main([*base, "--pareto"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert [r.split("|")[1].strip() for r in rows] == ["B", "A"], out
    assert "predicted" in rows[0]
    assert cli.main([*base, "--max-latency", "1.0"]) == 2  # fastest is B at 1.5 ms predicted
    err = capsys.readouterr().err
    assert "fastest" in err and "B" in err
    assert cli.main(["export", "-q", "-c", TINY, *sets, "--arch", "x.json", "--pareto"]) == 2


def test_evaluator_finds_the_table_of_its_settings(tmp_path, monkeypatch):
    """Trials add ``predicted_latency_ms`` from the work directory's table with their settings
    (the teacher-derived fields of the space are not part of the key)."""
    from types import SimpleNamespace

    from nni_effbert.nas.kd_evaluator import KDEvaluator

    monkeypatch.setattr(ltc.ComponentTimer, "measure", lambda self, kind, spec, table: 0.01)
    cfg = load_config(TINY, [f"workdir={tmp_path}", "teacher.model=bert-base-uncased"])
    teacher_sized = preset_config("tiny", vocab_size=777, fit_size=48, num_labels=3)
    setup = SimpleNamespace(space=SimpleNamespace(config=teacher_sized))
    assert KDEvaluator(cfg, setup=setup).latency_table() is None  # no table yet: nothing predicted
    built = lt.table_for_config(cfg, progress=False)  # what `nni-effbert latency` builds (preset sizes)
    found = KDEvaluator(cfg, setup=setup).latency_table()
    assert found is not None and found.path == built.path
    other = load_config(TINY, [f"workdir={tmp_path}", "teacher.model=bert-base-uncased", "evaluator.latency_threads=2"])
    assert KDEvaluator(other, setup=setup).latency_table() is None


def test_nnictl_factory_and_search_command_use_the_table(tmp_path, monkeypatch):
    """The tuner built from classArgs gets the work directory's table; `nni-effbert search` refuses
    an impossible latency budget before starting NNI."""
    from nni_effbert.nas.launcher import check_latency_search
    from nni_effbert.strategies.nni.factory import build_broker

    monkeypatch.setattr(ltc.ComponentTimer, "measure", lambda self, kind, spec, table: 0.5 if kind == "attention" else 0.05)
    base = [f"workdir={tmp_path / 'work'}", "teacher.model=bert-base-uncased"]
    cfg = load_config(TINY, [*base, "search.latency_budget_ms=[0.0, 100.0]"])
    path = tmp_path / "effbert.yml"
    cfg.save(path)
    broker = build_broker(config=str(path), state_path=str(tmp_path / "state.json"))
    table = lt.table_for_config(cfg, build=False)
    assert broker.search.latency_budget == (0.0, 100.0) and broker.search.latency_fn.path == table.path
    lo, _ = table.latency_range()
    impossible = load_config(TINY, [*base, f"search.latency_budget_ms=[0.0, {lo / 2}]"])
    with pytest.raises(BudgetError, match="cannot be met"):
        check_latency_search(impossible, progress=False)
    check_latency_search(cfg, progress=False)  # a feasible budget passes
