"""The EfficientBERT MLP search space: presets, expressions, fingerprints, slicing, NNI reuse."""
import json

import nni
import numpy as np
import pytest
import torch

from nni_effbert.search_spaces import EfficientBertModel, EfficientBertSpace, UNARY_OPS

PAPER_EXPRESSIONS = [
    "linear2(gelu(linear1(x)))",
    "tanh(linear2(gelu(linear1(x))))",
    "elu(linear2(gelu(linear1(x))))",
    "sigmoid(linear2(relu(linear1(x))))",
    "linear2(gelu(linear1(max(x,tanh(x)))))",
    "linear2(relu(mul(linear1(x),x)))",
    "leaky_relu(linear2(gelu(linear1(x))))",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return EfficientBertSpace.preset("tiny")


def _batch(vocab, t=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("preset,n", [("tiny", 60), ("quickstart", 50), ("paper", 50)])
def test_presets_random_archs_run_and_count(preset, n):
    space = EfficientBertSpace.preset(preset, max_position_embeddings=64) if preset == "paper" \
        else EfficientBertSpace.preset(preset)
    cfg = space.config
    rng = np.random.RandomState(0)
    ids, mask = _batch(cfg.vocab_size, t=6)
    for _ in range(n):
        arch = space.random_arch(rng)
        model = space.subnet(arch)
        assert isinstance(model, EfficientBertModel) and not isinstance(model, EfficientBertSpace)
        assert space.count_params(arch) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            _check_output(model.eval()(ids, mask), cfg, ids)


def _check_output(out, cfg, ids):
    b, t = ids.shape
    assert out.logits.shape == (b, cfg.num_labels)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(h.shape == (b, t, cfg.fit_size) for h in out.hidden_states)
    assert len(out.attentions) == cfg.num_hidden_layers
    assert all(a.shape == (b, cfg.num_attention_heads, t, t) for a in out.attentions)
    for x in (out.logits, *out.hidden_states, *out.attentions):
        assert torch.isfinite(x).all()
    # Attention probabilities put no mass on padded keys.
    assert out.attentions[0][2, :, :, 2:].abs().max() == 0


def test_regression_head():
    space = EfficientBertSpace.preset("tiny", num_labels=1)
    ids, mask = _batch(space.config.vocab_size)
    assert space.subnet(space.bert_arch())(ids, mask).logits.shape == (3, 1)


def test_paper_preset_sizes():
    space = EfficientBertSpace.preset("paper")
    c = space.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.embedding_size, c.fit_size,
            c.intermediate_size, c.max_stack, c.vocab_size) == (540, 6, 12, 128, 768, 540, 4, 30522)
    assert space.choices["layer3_width"] == [540, 270, 180, 135]
    assert space.choices["layer5_stack"] == [1, 2, 3, 4]
    assert len(space.simplify()) == len(space.labels) == 6 * 13


@pytest.mark.parametrize("expression", PAPER_EXPRESSIONS)
def test_paper_expressions_round_trip(tiny, expression):
    layers = [{"expression": expression, "width": 16, "stack": 2}, {"expression": expression, "width": 8, "stack": 1}]
    arch = tiny.arch_from_layers(layers)
    assert tiny.describe(arch) == layers


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_describe_round_trips_and_names_reused_intermediates(preset):
    """Parsing what describe prints gives back an arch with the same fingerprint, and a slot that
    uses its input twice names it instead of printing linear1/linear2 twice."""
    from nni_effbert.search_spaces import EfficientBertSupernet

    space = EfficientBertSupernet.preset(preset, max_position_embeddings=64)
    rng = np.random.RandomState(7)
    named = 0
    for _ in range(200):
        arch = space.random_arch(rng)
        described = space.describe(arch)
        for layer in described:
            e = layer["expression"]
            assert e.count("linear1(") == 1 and e.count("linear2(") == 1, e
            named += "h2 = " in e or "h1 = " in e
        back = space.arch_from_layers(described)
        assert space.fingerprint(back) == space.fingerprint(arch)
        assert space.describe(back) == described
    assert named > 20  # the sample holds many input-operand slots


def test_named_intermediates_print_and_parse(tiny):
    arch = tiny.arch_from_layers([{"expression": "linear2(gelu(linear1(x)))", "width": 16, "stack": 1}] * 2)
    arch.update(layer0_post_act="tanh", layer0_post_binary="mul", layer0_post_operand="input",
                layer0_post_order="act_first", layer1_mid_act="identity", layer1_mid_binary="add",
                layer1_mid_operand="input", layer1_post_act="sigmoid")
    got = [d["expression"] for d in tiny.describe(arch)]
    assert got == ["h2 = linear2(gelu(linear1(x))); mul(h2,tanh(h2))",
                   "h1 = linear1(x); sigmoid(linear2(add(h1,h1)))"]
    # The inline form (as printed before) still parses, to the same arch.
    inline = [{"expression": "mul(linear2(gelu(linear1(x))),tanh(linear2(gelu(linear1(x)))))", "width": 16,
               "stack": 1}, {"expression": "sigmoid(linear2(add(linear1(x),linear1(x))))", "width": 16, "stack": 1}]
    assert tiny.fingerprint(tiny.arch_from_layers(inline)) == tiny.fingerprint(arch)
    # Spaces and any names are fine; bad statements are one-line errors naming the layer.
    spaced = "a = linear2( gelu(linear1(x)) ) ;  mul(a, tanh(a))"
    assert tiny.describe(tiny.arch_from_layers([{"expression": spaced, "width": 16, "stack": 1}] * 2))[0]["expression"] \
        == got[0]
    for bad, why in (("h2 linear2(gelu(linear1(x))); h2", "is not 'name = expression'"),
                     ("x = linear1(x); linear2(x)", "names x or an op"),
                     ("h = linear1(x); h = linear1(x); linear2(h)", "defined twice"),
                     ("linear2(gelu(linear1(h)))", "needs arguments")):
        with pytest.raises(ValueError, match=f"layer 0: .*{why}"):
            tiny.arch_from_layers([{"expression": bad, "width": 16, "stack": 1}] * 2)


def test_expression_semantics_match_torch(tiny):
    """The paper's expression strings compute what they say."""
    arch = tiny.arch_from_layers([{"expression": "linear2(relu(mul(linear1(x),x)))", "width": 32, "stack": 1},
                                  {"expression": "linear2(gelu(linear1(max(x,tanh(x)))))", "width": 16, "stack": 1}])
    model = tiny.subnet(arch).eval()
    x = torch.randn(2, 5, 32)
    for layer, ref in ((0, lambda m, x: m.linear2(torch.relu(m.linear1(x) * x))),
                       (1, lambda m, x: m.linear2(torch.nn.functional.gelu(m.linear1(torch.maximum(x, torch.tanh(x))))))):
        mlp = model.layers[layer].mlps[0]
        got = mlp(x, model.layer_archs[layer])
        assert torch.allclose(got, mlp.LayerNorm(ref(mlp, x) + x), atol=1e-6)


@pytest.mark.parametrize("bad", [
    "relu(gelu(linear1(x)))",                # no linear2
    "linear2(relu(gelu(linear1(x))))",       # activation applied to an activation
    "linear2(linear1(relu(tanh(x))))",       # activation applied to an activation (pre)
    "linear2(gelu(linear1(x))",              # unbalanced
    "linear2(foo(linear1(x)))",              # unknown op
    "linear2(add(linear1(x),linear1(x),x))", # wrong arity
])
def test_unexpressible_expressions_rejected(tiny, bad):
    with pytest.raises(ValueError, match="layer 0"):
        tiny.arch_from_layers([{"expression": bad, "width": 32, "stack": 1}] * 2)


def test_no_activation_on_activation_anywhere(tiny):
    """The template cannot produce an activation applied directly to another activation."""
    acts = [a for a in UNARY_OPS if a != "identity"]
    rng = np.random.RandomState(3)
    for _ in range(300):
        for layer in tiny.describe(tiny.random_arch(rng)):
            e = layer["expression"]
            for a in acts:
                for b in acts:
                    assert f"{a}({b}(" not in e, e


def test_fingerprint_equivalences(tiny):
    base = tiny.bert_arch(width=16)
    fp = tiny.fingerprint
    # Identity slots written differently (order/operand of an absent binary op).
    a = dict(base, layer0_pre_order="binary_first", layer0_mid_operand="input", layer1_post_order="binary_first")
    assert fp(a) == fp(base)
    # Commutativity: max(x,tanh(x)) parses either way round.
    e1 = tiny.arch_from_layers([{"expression": "linear2(gelu(linear1(max(x,tanh(x)))))", "width": 16, "stack": 1}] * 2)
    e2 = tiny.arch_from_layers([{"expression": "linear2(gelu(linear1(max(tanh(x),x))))", "width": 16, "stack": 1}] * 2)
    assert fp(e1) == fp(e2)
    # A non-obvious equality: max(h, relu(h)) == relu(h).
    r1 = tiny.arch_from_layers([{"expression": "linear2(relu(linear1(x)))", "width": 16, "stack": 1}] * 2)
    r2 = tiny.arch_from_layers([{"expression": "linear2(max(linear1(x),relu(linear1(x))))", "width": 16, "stack": 1}] * 2)
    assert r1 != r2 and fp(r1) == fp(r2)
    assert tiny.describe(r2) == tiny.describe(r1)  # printed in the simplest form
    # Identity act with act_first vs binary_first is the same function.
    m1 = dict(base, layer0_mid_binary="add", layer0_mid_order="act_first", layer0_mid_act="identity")
    m2 = dict(m1, layer0_mid_order="binary_first")
    assert fp(m1) == fp(m2)


def test_fingerprint_differences(tiny):
    base = tiny.bert_arch(width=16)
    fp = tiny.fingerprint
    variants = [dict(base, layer0_width=8), dict(base, layer1_stack=2), dict(base, layer0_mid_act="relu"),
                dict(base, layer1_post_act="tanh"), dict(base, layer0_mid_binary="mul"),
                dict(base, layer0_mid_binary="mul", layer0_mid_operand="input"),
                dict(base, layer0_mid_binary="mul", layer0_mid_order="binary_first")]
    prints = {fp(v) for v in variants} | {fp(base)}
    assert len(prints) == len(variants) + 1
    # Over random archs: equal fingerprints only for functionally equal subnets.
    rng = np.random.RandomState(0)
    seen = {}
    ids, mask = _batch(tiny.config.vocab_size)
    for _ in range(40):
        arch = tiny.random_arch(rng)
        seen.setdefault(fp(arch), []).append(arch)
    assert len(seen) == 40  # the space is huge: 40 random draws never coincide
    for group in seen.values():
        outs = [tiny.subnet(a).eval()(ids, mask).logits for a in group]
        assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs)


def test_subnet_weights_are_supernet_slices():
    space = EfficientBertSpace.preset("tiny")
    sd = {k: torch.randn_like(v) for k, v in space.state_dict().items()}
    space.load_state_dict(sd)
    arch = dict(space.bert_arch(width=16, stack=1), layer1_width=8, layer1_stack=2)
    sub = space.subnet(arch).state_dict()
    p = "supernet."
    assert torch.equal(sub["layers.0.mlps.0.linear1.weight"], sd[p + "layers.0.mlps.0.linear1.weight"][:16])
    assert torch.equal(sub["layers.0.mlps.0.linear1.bias"], sd[p + "layers.0.mlps.0.linear1.bias"][:16])
    assert torch.equal(sub["layers.0.mlps.0.linear2.weight"], sd[p + "layers.0.mlps.0.linear2.weight"][:, :16])
    assert torch.equal(sub["layers.1.mlps.1.linear1.weight"], sd[p + "layers.1.mlps.1.linear1.weight"][:8])
    assert torch.equal(sub["layers.1.attention.query.weight"], sd[p + "layers.1.attention.query.weight"])
    assert "layers.0.mlps.1.linear1.weight" not in sub  # stack 1: only the first MLP
    # The subnet computes what the supernet computes for that arch.
    ids, mask = _batch(space.config.vocab_size)
    space.eval()
    assert torch.allclose(space(ids, mask, arch=arch).logits, space.subnet(arch).eval()(ids, mask).logits, atol=1e-6)


def test_nni_search_space_round_trip(tiny):
    js = tiny.nni_search_space()
    assert set(js) == set(tiny.simplify()) == set(tiny.labels)
    js = json.loads(json.dumps(js))
    rng = np.random.RandomState(0)
    for _ in range(20):
        arch = {label: spec["_value"][rng.randint(len(spec["_value"]))] for label, spec in js.items()}
        assert tiny.validate_arch(arch) == arch
        tiny.subnet(arch)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.pop("layer1_width"), "missing label 'layer1_width'"),
    (lambda a: a.update(layer9_width=8), "unknown label"),
    (lambda a: a.update(layer0_width=7), r"'layer0_width' has value 7; allowed values: \[32, 16, 11, 8\]"),
    (lambda a: a.update(layer0_mid_act="softmax"), "allowed values"),
    (lambda a: a.update(layer0_stack="2"), "layer0_stack"),
])
def test_bad_arch_errors(tiny, change, match):
    arch = tiny.bert_arch()
    change(arch)
    with pytest.raises(ValueError, match=match):
        tiny.subnet(arch)


def test_count_params_reports_extremes(tiny):
    lo, hi = tiny.param_range()
    rng = np.random.RandomState(1)
    counts = [tiny.count_params(tiny.random_arch(rng)) for _ in range(200)]
    assert lo <= min(counts) and max(counts) <= hi
    assert tiny.count_params(tiny.bert_arch(width=8)) == lo


def test_nni_freeze_paths(tiny):
    """NNI's two ways to get a model for a sample both give the fixed student."""
    from nni.nas.space import model_context
    arch = tiny.random_arch(np.random.RandomState(5))
    frozen = tiny.freeze(arch)
    assert isinstance(frozen, EfficientBertModel) and frozen.arch == arch
    with model_context(arch):
        fresh = EfficientBertSpace(tiny.config)
    assert isinstance(fresh, EfficientBertModel) and fresh.arch == arch


@pytest.mark.parametrize("strategy_name", ["Random", "RegularizedEvolution"])
def test_space_reused_by_nni_strategies(strategy_name):
    """NNI's own strategies drive the space unchanged, in process, on a toy objective."""
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    import nni.nas.strategy as strategies

    space = EfficientBertSpace.preset("tiny")

    def objective(model):
        nni.report_final_result(-sum(p.numel() for p in model.parameters()) / 1e4)

    kwargs = dict(population_size=4, sample_size=2) if strategy_name == "RegularizedEvolution" else {}
    strategy = getattr(strategies, strategy_name)(**kwargs)
    engine = SequentialExecutionEngine(max_model_count=8)
    strategy(RawFormatModelSpace.from_model(space, FunctionalEvaluator(objective)), engine)
    models = list(engine.list_models())
    assert len(models) == 8
    scores = [m.metric for m in models]
    assert all(s is not None and s < 0 for s in scores)
    best = max(models, key=lambda m: m.metric)
    assert -best.metric * 1e4 == space.count_params(best.sample)
