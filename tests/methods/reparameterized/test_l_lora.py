"""L-LoRA: each LoRA module linearised around its initial (A0, B0) — the jvp, exactly linear in
phi - phi0 — so task arithmetic adds the tasks' weight changes exactly; shared phi0 from init_seed;
phi0 in the checkpoint; exact merge."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.methods.reparameterized.l_lora import LLoraConfig, LLoraLayer

from ...conftest import labelled_batches, main_output, model_inputs, perturb, tiny_bert, tiny_gpt2


def _run(pm, kind="bert"):
    with torch.no_grad():
        return main_output(pm(**model_inputs(kind)))


def _layers(pm, name="default"):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, LLoraLayer) and name in m.lora_A0}


def _set_b0(pm, seed=5, name="default"):
    """A non-zero expansion point B0 (as a loaded checkpoint may hold), with B = B0 so that the adapter
    is still at phi0: exercises the general expansion's B0 (A - A0) term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(pm, name).values():
            b0 = torch.randn(layer.lora_B0[name].shape, generator=g) * 0.5
            layer.lora_B0[name].copy_(b0)
            layer.lora_B[name].weight.copy_(b0)


def _lora_function(layer, x, a, b, scale):
    """What a LoRA layer computes with factors (a, b): ``W0 x + bias + s b a x``, as a function of the
    factors alone (its base layer's own forward, then the low-rank product), for torch.func.jvp."""
    return layer.base_layer(x) + scale * F.linear(F.linear(x, a), b)


# -- 1. the mechanism: the jvp of LoRA around phi0, exactly linear in phi - phi0 -------------------

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("nonzero_b0", [False, True])
def test_each_layer_computes_the_first_order_taylor_expansion_of_lora_by_torch_func_jvp(kind, nonzero_b0):
    pm = get_peft_model(tiny_bert() if kind == "bert" else tiny_gpt2(), LLoraConfig(r=4))
    if nonzero_b0:
        _set_b0(pm)
    perturb(pm, seed=1)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    for layer in _layers(pm).values():
        a, b, scale = layer._factors("default")
        a0, b0 = layer.lora_A0["default"], layer.lora_B0["default"]
        with torch.no_grad():
            got = layer(x)
            # The reference's LinearizedModelWraper: out, dp = jvp(f, params0, params - params0); out + dp.
            out, dp = torch.func.jvp(lambda a_, b_: _lora_function(layer, x, a_, b_, scale), (a0, b0), (a - a0, b - b0))
        torch.testing.assert_close(got, out + dp, rtol=1e-5, atol=1e-6)
        # ... which is not LoRA at phi itself (the second-order term s (B - B0)(A - A0) x is dropped).
        with torch.no_grad():
            plain = _lora_function(layer, x, a, b, scale)
        assert (plain - got).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("nonzero_b0", [False, True])
def test_layer_output_is_exactly_linear_in_phi_minus_phi0_where_plain_lora_is_not(nonzero_b0):
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4))
    if nonzero_b0:
        _set_b0(pm)
    layer = next(iter(_layers(pm).values()))
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    a0, b0 = layer.lora_A0["default"].clone(), layer.lora_B0["default"].clone()
    g = torch.Generator().manual_seed(4)
    da, db = torch.randn(a0.shape, generator=g), torch.randn(b0.shape, generator=g)
    a, b, scale = layer._factors("default")

    def at(t):
        with torch.no_grad():
            a.copy_(a0 + t * da)
            b.copy_(b0 + t * db)
            return layer(x).double(), _lora_function(layer, x, a, b, scale).double()

    (lin0, plain0), (lin1, plain1) = at(0.0), at(1.0)
    for t in (0.5, 2.0, -1.5):
        lin_t, plain_t = at(t)
        torch.testing.assert_close(lin_t - lin0, t * (lin1 - lin0), rtol=1e-4, atol=1e-5)
        # Plain LoRA: f(phi0 + t d) - f(phi0) = t s (db A0 + B0 da) x + t^2 s db da x: not linear in t.
        assert ((plain_t - plain0) - t * (plain1 - plain0)).abs().max() > 1e-2 * (plain1 - plain0).abs().max()


def test_with_b0_zero_a_gets_exactly_zero_gradient_and_b_trains_in_the_row_space_of_a0():
    # The reference's (and peft's) init: B0 = 0, so the first-order term in A vanishes.
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4))
    pm.train()
    pm.begin_training()
    out = pm(**labelled_batches(1)[0])
    out.loss.backward()
    for layer in _layers(pm).values():
        assert layer.lora_A["default"].weight.grad is not None
        assert not layer.lora_A["default"].weight.grad.any()
        assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    perturb(pm, seed=1)
    for layer in _layers(pm).values():
        a, b, scale = layer._factors("default")
        torch.testing.assert_close(layer.delta_weight("default"), scale * b @ layer.lora_A0["default"])


def test_task_arithmetic_adds_the_tasks_weight_changes_exactly_where_lora_has_cross_terms():
    weights = [0.7, 0.4]

    def merged_changes(config):
        pm = get_peft_model(tiny_bert(), config, "t1")
        pm.add_adapter("t2", config)
        if isinstance(config, LoraConfig) and not isinstance(config, LLoraConfig):
            # plain LoRA from the same init too (the paper's code seeds before each task's adapter)
            for layer in [m for m in pm.base_model.modules() if hasattr(m, "lora_A") and "t1" in m.lora_A]:
                with torch.no_grad():
                    layer.lora_A["t2"].weight.copy_(layer.lora_A["t1"].weight)
        else:
            _set_b0(pm, name="t1")
            _set_b0(pm, name="t2")  # the same seed: the same phi0
        phi0 = {id(p): p.detach().clone() for n in ("t1", "t2") for p in pm.adapter_parameters(n)}
        perturb(pm, "t1", seed=1)
        perturb(pm, "t2", seed=2)
        layers = [m for m in pm.base_model.modules() if hasattr(m, "delta_weight") and "t1" in m.settings]
        # task arithmetic in parameter space, by hand, for both methods alike
        pm.add_adapter("merged", config)
        if isinstance(config, LLoraConfig):
            _set_b0(pm, name="merged")  # the tasks' phi0 (the same seed), then overwritten below
        with torch.no_grad():
            for layer in layers:
                for factor in (layer.lora_A, layer.lora_B):
                    p1, p2 = factor["t1"].weight, factor["t2"].weight
                    factor["merged"].weight.copy_(phi0[id(p1)] + weights[0] * (p1 - phi0[id(p1)])
                                                  + weights[1] * (p2 - phi0[id(p2)]))
        # weight changes counted from the one at phi0 (s B0 A0; zero with the default B0 = 0)
        at_phi0 = {}
        for layer in layers:
            a0, b0 = phi0[id(layer.lora_A["t1"].weight)], phi0[id(layer.lora_B["t1"].weight)]
            product = layer.settings["t1"] * b0 @ a0
            at_phi0[id(layer)] = product.T if layer.transposed else product
        return [(layer.delta_weight("merged") - at_phi0[id(layer)],
                 weights[0] * (layer.delta_weight("t1") - at_phi0[id(layer)])
                 + weights[1] * (layer.delta_weight("t2") - at_phi0[id(layer)])) for layer in layers]

    for got, wanted in merged_changes(LLoraConfig(r=4)):
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6)
    gaps = [(got - wanted).abs().max() / wanted.abs().max() for got, wanted in merged_changes(LoraConfig(r=4))]
    assert max(gaps) > 0.05  # plain LoRA: cross terms w_i w_j s dB_i dA_j and (w^2 - w) s dB dA


# -- 2. phi0: shared by init_seed, stored in the checkpoint ----------------------------------------

def test_adapters_with_one_init_seed_share_phi0_and_a_starts_at_a0_with_b_zero():
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4), "t1")
    torch.manual_seed(123)  # the global RNG does not matter with a seed
    pm.add_adapter("t2", LLoraConfig(r=4))
    other = get_peft_model(tiny_bert(), LLoraConfig(r=4))
    pm.add_adapter("t3", LLoraConfig(r=4, init_seed=7))
    for (path, layer), other_layer in zip(_layers(pm, "t1").items(), _layers(other).values()):
        a0 = layer.lora_A0["t1"]
        assert torch.equal(layer.lora_A["t1"].weight, a0) and not layer.lora_B["t1"].weight.any()
        assert not layer.lora_B0["t1"].any()
        assert torch.equal(layer.lora_A0["t2"], a0) and torch.equal(other_layer.lora_A0["default"], a0)
        assert not torch.equal(layer.lora_A0["t3"], a0)
        bound = 1 / a0.shape[1] ** 0.5  # Kaiming-uniform with a = sqrt(5), LoRA's draw
        assert a0.abs().max() <= bound and a0.abs().max() > bound / 2
    a0s = [layer.lora_A0["t1"] for layer in _layers(pm, "t1").values()]
    assert not torch.equal(a0s[0], a0s[1])  # each layer its own draw


def test_init_seed_none_draws_from_the_global_rng_as_lora():
    torch.manual_seed(0)
    first = get_peft_model(tiny_bert(), LLoraConfig(r=4, init_seed=None))
    torch.manual_seed(0)
    plain = get_peft_model(tiny_bert(), LoraConfig(r=4))
    for layer, ref in zip(_layers(first).values(),
                          [m for m in plain.base_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]):
        assert torch.equal(layer.lora_A0["default"], ref.lora_A["default"].weight)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_and_load_keeps_phi0_and_reproduces_outputs_exactly(kind, tmp_path):
    make = tiny_bert if kind == "bert" else tiny_gpt2
    pm = get_peft_model(make(), LLoraConfig(r=4, init_seed=None))  # phi0 not reproducible from a seed
    _set_b0(pm)
    perturb(pm, seed=1)
    expected = _run(pm, kind)
    state = pm.adapter_state_dict()
    layers = _layers(pm)
    assert len(state) == 4 * len(layers)
    for path, layer in layers.items():
        for local, shape in (("lora_A.weight", (4, 32)), ("lora_B.weight", (layer.out_features, 4)),
                             ("lora_A0", (4, 32)), ("lora_B0", (layer.out_features, 4))):
            keys = [k for k in state if k.endswith(f"{path.split('base_model.', 1)[-1]}.{local}")]
            assert len(keys) == 1 and tuple(state[keys[0]].shape) == shape
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(_run(loaded, kind), expected)
    for layer, ref in zip(_layers(loaded).values(), layers.values()):
        assert torch.equal(layer.lora_A0["default"], ref.lora_A0["default"])
        assert torch.equal(layer.lora_B0["default"], ref.lora_B0["default"])


@pytest.mark.parametrize("damage", ["missing_a0", "wrong_shape"])
def test_a_damaged_checkpoint_is_refused_and_leaves_the_model_unchanged(damage, tmp_path):
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4))
    perturb(pm, seed=1)
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("lora_A0"))
    if damage == "missing_a0":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(3, 32)
    save_file(tensors, str(file))
    model = tiny_bert()
    base = _run(model)
    with pytest.raises(CheckpointError, match="lora_A0"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert torch.equal(_run(model), base)
    # into a model that has an adapter already: that adapter is untouched, the new one not added
    host = get_peft_model(tiny_bert(), LLoraConfig(r=4), "kept")
    perturb(host, "kept", seed=3)
    before = _run(host)
    with pytest.raises(CheckpointError, match="lora_A0"):
        host.load_adapter(tmp_path, "broken")
    assert list(host.peft_configs) == ["kept"] and torch.equal(_run(host), before)


# -- 3. merge, disable, training -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_writes_the_linearised_weight_exactly(kind):
    pm = get_peft_model(tiny_bert() if kind == "bert" else tiny_gpt2(), LLoraConfig(r=4))
    _set_b0(pm)
    perturb(pm, seed=1)
    expected = _run(pm, kind)
    wanted = {}
    for path, layer in _layers(pm).items():
        a, b, scale = layer._factors("default")
        a0, b0 = layer.lora_A0["default"], layer.lora_B0["default"]
        w0 = layer.base_weight_out_in().detach().clone()
        wanted[path] = w0 + scale * (b @ a0 + b0 @ (a - a0))
    pm.merge_adapter()
    for path, layer in _layers(pm).items():
        torch.testing.assert_close(layer.base_weight_out_in(), wanted[path], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_run(pm, kind), expected, rtol=1e-4, atol=1e-5)


def test_training_moves_b_only_and_disable_and_delete_give_the_base_back():
    base = _run(tiny_bert())
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4, modules_to_save=("classifier",)))
    a_before = {p: l.lora_A["default"].weight.detach().clone() for p, l in _layers(pm).items()}
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batches = labelled_batches(4, size=8)

    def loss():
        with torch.no_grad():
            return sum(pm(**batch).loss.item() for batch in batches)

    start = loss()
    pm.train()
    pm.begin_training()
    for batch in batches * 5:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    pm.eval()
    assert loss() < start
    for path, layer in _layers(pm).items():
        assert torch.equal(layer.lora_A["default"].weight, a_before[path])  # zero gradient, no decay
        assert layer.lora_B["default"].weight.any()
    with pm.disable_adapter():
        assert torch.equal(_run(pm), base)
    pm.delete_adapter("default")
    assert not any(isinstance(m, DeltaModule) for m in pm.base_model.modules())
    assert torch.equal(_run(pm), base)


# -- 4. task arithmetic through add_weighted_adapter ---------------------------------------------

def _two_tasks(config=None):
    config = config or LLoraConfig(r=4)
    pm = get_peft_model(tiny_bert(), config, "t1")
    pm.add_adapter("t2", config)
    perturb(pm, "t1", seed=1)
    perturb(pm, "t2", seed=2)
    return pm


def test_add_weighted_adapter_writes_phi0_plus_the_weighted_task_vectors():
    pm = _two_tasks()
    pm.add_weighted_adapter(["t1", "t2"], [0.6, 0.3], "merged", combination_type="task_arithmetic")
    assert isinstance(pm.peft_configs["merged"], LLoraConfig)
    for layer in _layers(pm, "merged").values():
        a0, b0 = layer.lora_A0["t1"], layer.lora_B0["t1"]
        assert torch.equal(layer.lora_A0["merged"], a0) and torch.equal(layer.lora_B0["merged"], b0)
        for factor, origin in ((layer.lora_A, a0), (layer.lora_B, b0)):
            wanted = origin + 0.6 * (factor["t1"].weight - origin) + 0.3 * (factor["t2"].weight - origin)
            torch.testing.assert_close(factor["merged"].weight, wanted)
        torch.testing.assert_close(layer.delta_weight("merged"),
                                   0.6 * layer.delta_weight("t1") + 0.3 * layer.delta_weight("t2"))
    # the default (only) combination type is task arithmetic; one lambda for both tasks
    pm.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "avg")
    pm.set_adapter("avg")
    assert _run(pm).shape == (2, 2)


def test_task_arithmetic_refuses_adapters_with_different_phi0_and_leaves_the_model_unchanged():
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4), "t1")
    pm.add_adapter("t2", LLoraConfig(r=4, init_seed=1))
    with pytest.raises(PeftlabError, match="different initial"):
        pm.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "merged")
    assert sorted(pm.peft_configs) == ["t1", "t2"]
    assert not any("merged" in m.adapter_names() for _, m in pm._delta_modules())


@pytest.mark.parametrize("second,kwargs,words", [
    (LLoraConfig(r=2), {}, "one rank"),
    (LLoraConfig(r=4, alpha=4), {}, "one scale"),
    (LLoraConfig(r=4, targets=("@query",)), {}, "different layers"),
    (LLoraConfig(r=4, modules_to_save=("classifier",)), {}, "modules_to_save"),
    (LLoraConfig(r=4), {"density": 0.5}, "reads none"),
])
def test_task_arithmetic_refuses_what_does_not_fit(second, kwargs, words):
    pm = get_peft_model(tiny_bert(), LLoraConfig(r=4), "t1")
    pm.add_adapter("t2", second)
    with pytest.raises(PeftlabError, match=words):
        pm.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "merged", **kwargs)
    assert sorted(pm.peft_configs) == ["t1", "t2"]


def test_other_combination_types_and_mixed_methods_are_refused():
    pm = _two_tasks()
    with pytest.raises(PeftlabError, match="task_arithmetic"):
        pm.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "merged", combination_type="linear")
    pm.add_adapter("plain", LoraConfig(r=4))
    with pytest.raises(PeftlabError, match="one method"):
        pm.add_weighted_adapter(["t1", "plain"], [0.5, 0.5], "merged")


# -- 5. config and placement -----------------------------------------------------------------------

def test_defaults_are_loras_with_init_seed_42():
    config = LLoraConfig()
    assert (config.r, config.alpha, config.dropout, config.init_seed) == (8, 16, 0.0, 42)
    assert config.targets == ("@query", "@value")
    pm = get_peft_model(tiny_bert(), config)
    assert sorted(n.rsplit(".", 1)[-1] for n in _layers(pm)) == ["query"] * 2 + ["value"] * 2
    assert "peft_type" not in config.to_dict()


@pytest.mark.parametrize("field,value,words", [
    ("use_dora", True, "plain LoRA"), ("init_seed", -1, "non-negative"), ("init_seed", 1.5, "int"),
    ("init_seed", True, "int"), ("r", 0, "positive integer"), ("dropout", 1.0, "probability"),
])
def test_bad_config_values_are_refused_by_name(field, value, words):
    with pytest.raises(PeftlabError, match=field) as err:
        LLoraConfig(**{field: value})
    assert words in str(err.value)


def test_peft_forms_are_refused():
    with pytest.raises(PeftlabError, match="no L-LoRA"):
        LLoraConfig.from_peft({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query"]})


def test_embeddings_are_refused_and_the_model_is_left_unchanged():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError):
        get_peft_model(model, LLoraConfig(targets=["query", "word_embeddings"]))
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_mixed_batches_are_refused():
    pm = _two_tasks()
    with pytest.raises(PeftlabError, match="mixed batches"):
        pm(**model_inputs("bert"), adapter_names=["t1", "t2"])
