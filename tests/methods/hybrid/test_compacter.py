"""Compacter / Compacter++: PHM bottleneck adapters, W = sum_i A_i (x) s_i t_i^T, one A shared by all layers."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.additive.sequential_adapter import LayerNormDelta, SequentialAdapterConfig, SequentialAdapterLayer
from peftlab.methods.hybrid.compacter import CompacterConfig, CompacterPlusPlusConfig, PHMBottleneck, PHMLinear, attach

from ..additive._adapters import D, check_lifecycle, run, wrapped
from ...conftest import perturb, tiny_bert


def _phm_layers(pm, name="default"):
    return [m for m in pm.modules() if isinstance(m, PHMLinear) and m.adapter == name]


def _rule(pm, name="default"):
    return pm.model_adapters["compacter"].shared_phm_rule[name]


def test_weight_is_a_sum_of_kronecker_products_of_the_shared_rule_and_low_rank_fast_matrices():
    pm = get_peft_model(tiny_bert(), CompacterConfig(phm_rank=2))
    perturb(pm, scale=0.2)
    rule = _rule(pm)
    for layer in _phm_layers(pm):
        n = rule.shape[0]
        expected = sum(torch.kron(rule[i], layer.phm_left[i] @ layer.phm_right[i]) for i in range(n))
        torch.testing.assert_close(layer.kronecker_weight(), expected)
    # The adapter at a site: h + PHM_up(gelu_new(PHM_down h)), each PHM x W + b.
    site = pm.base_model.bert.encoder.layer[1].output.dense
    block = site.bottleneck["default"]
    x = torch.randn(3, 2 * D)  # the FFN's intermediate width
    with torch.no_grad():
        h = site.base_layer(x)
        down = F.gelu(h @ block.down.kronecker_weight() + block.down.bias, approximate="tanh")
        torch.testing.assert_close(site(x), h + down @ block.up.kronecker_weight() + block.up.bias)


def test_the_rule_is_one_tensor_shared_by_every_layer_and_stored_once(tmp_path):
    pm = get_peft_model(tiny_bert(), CompacterConfig())
    pm.add_adapter("other", CompacterConfig())
    rule = _rule(pm)
    layers = _phm_layers(pm)
    assert len(layers) == 2 * 4  # down and up at 2 sites in each of 2 blocks
    assert all(layer.rules[0].shared_phm_rule["default"] is rule for layer in layers)
    assert _rule(pm, "other") is not rule  # one per adapter name
    # Not a child of any layer: one parameter of the model, one checkpoint tensor.
    assert sum(p is rule for p in pm.parameters()) == 1
    assert sum(p is rule for p in pm.adapter_parameters("default")) == 1
    state = pm.adapter_state_dict()
    assert [k for k in state if "phm_rule" in k] == ["shared_phm_rule"] and state["shared_phm_rule"].shape == (4, 4, 4)
    # Changing the one tensor changes every layer's weight; gradients from every layer reach it.
    before = [layer.kronecker_weight().detach().clone() for layer in layers]
    with torch.no_grad():
        rule.add_(0.1)
    assert all(not torch.allclose(b, layer.kronecker_weight()) for b, layer in zip(before, layers))
    pm.train()
    layers[0].kronecker_weight().sum().backward()
    first = rule.grad.clone()
    layers[-1].kronecker_weight().sum().backward()
    assert not torch.equal(rule.grad, first)
    # Saved once, loaded strictly into a fresh model; deleting the adapter removes it.
    pm.save_pretrained(tmp_path, adapter_names=["default"])
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_rule(loaded), rule)
    pm.delete_adapter("other")
    assert "other" not in pm.model_adapters["compacter"].shared_phm_rule.keys()
    pm.delete_adapter("default")
    assert "compacter" not in pm.model_adapters


@pytest.mark.parametrize("config_cls, sites_per_block", [(CompacterConfig, 2), (CompacterPlusPlusConfig, 1)])
def test_parameter_count_matches_the_papers_formula(config_cls, sites_per_block):
    n, r, L, k = 4, 1, 2, D
    pm = get_peft_model(tiny_bert(), config_cls(phm_dim=n, phm_rank=r, train_layernorm=False))
    m = max(n, k // 32 // n * n)  # the bottleneck: k / 32 rounded down to a multiple of n
    assert m == 4
    # Paper: n^3 shared + 4L(k + d) fast weights for Compacter (2L(k + d) for ++), d = m, r = 1;
    # the PHM biases (k + m per site) come on top.
    fast = sites_per_block * 2 * L * r * (k + m)
    biases = sites_per_block * L * (k + m)
    assert pm.trainable_parameters_report().trainable == n ** 3 + fast + biases
    # With the paper's trained layer norms, their weights and biases are added (5 LayerNorms in tiny BERT).
    with_ln = get_peft_model(tiny_bert(), config_cls())
    assert with_ln.trainable_parameters_report().trainable == n ** 3 + fast + biases + 5 * 2 * k


def test_compacter_pp_keeps_only_the_adapter_after_the_ffn():
    full = get_peft_model(tiny_bert(), CompacterConfig())
    plus = get_peft_model(tiny_bert(), CompacterPlusPlusConfig())
    assert [p.split("encoder.")[1] for p in wrapped(full, SequentialAdapterLayer)] == [
        "layer.0.attention.output.dense", "layer.0.output.dense",
        "layer.1.attention.output.dense", "layer.1.output.dense"]
    assert [p.split("encoder.")[1] for p in wrapped(plus, SequentialAdapterLayer)] == ["layer.0.output.dense",
                                                                                     "layer.1.output.dense"]
    assert wrapped(plus, LayerNormDelta) == wrapped(full, LayerNormDelta) != []


def test_defaults_and_init_follow_the_reference():
    config = CompacterConfig()
    assert (config.phm_dim, config.phm_rank, config.activation, config.phm_init_range, config.train_layernorm) == (
        4, 1, "gelu_new", 1e-4, True)
    assert config.width(384) == 12 and config.width(768) == 24  # MiniLM, BERT/T5-base: k / 32
    assert CompacterConfig(reduction_factor=24).width(384) == 16 and CompacterConfig(bottleneck=8).width(384) == 8
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), CompacterConfig())
    assert _rule(pm).abs().max() < 6e-4  # N(0, 1e-4^2)
    for layer in _phm_layers(pm):
        assert torch.all(layer.bias == 0)
        for factor in (layer.phm_left, layer.phm_right):  # Glorot-uniform with gain sqrt(2), per summand
            rows, cols = factor.shape[1:]
            bound = (2 ** 0.5) * (6 / (rows + cols)) ** 0.5
            assert factor.abs().max() <= bound and factor.std() > bound / 4
    # Near (not exactly) the identity at init.
    base = run(tiny_bert(), "bert")
    adapted = run(pm, "bert")
    assert torch.allclose(adapted, base, atol=1e-6) and not torch.equal(adapted, base)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_other_architectures_lifecycle(kind, tmp_path):
    check_lifecycle(kind, CompacterConfig(), tmp_path)


def test_stacks_with_a_sequential_adapter_in_the_same_wrapper():
    pm = get_peft_model(tiny_bert(), CompacterConfig(train_layernorm=False), "compacter")
    pm.add_adapter("houlsby", SequentialAdapterConfig(bottleneck=4))
    site = pm.base_model.bert.encoder.layer[0].output.dense
    assert set(site.bottleneck.keys()) == {"compacter", "houlsby"}
    assert isinstance(site.bottleneck["compacter"], PHMBottleneck)
    pm.set_adapter(["compacter", "houlsby"])
    assert run(pm, "bert").isfinite().all()
    pm.delete_adapter("compacter")
    assert "compacter" not in pm.model_adapters and list(site.bottleneck.keys()) == ["houlsby"]


def test_config_round_trip_keeps_the_variant():
    for config in (CompacterConfig(phm_dim=2, bottleneck=8, reduction_factor=None), CompacterPlusPlusConfig()):
        data = json.loads(json.dumps(config.to_dict()))
        assert config_from_dict(data) == config and type(config_from_dict(data)) is type(config)
    assert CompacterConfig().to_dict()["method"] == "compacter"
    assert CompacterPlusPlusConfig().to_dict()["method"] == "compacter_pp"


def test_bad_input_is_named():
    with pytest.raises(PeftlabError, match="phm_dim"):
        CompacterConfig(phm_dim=0)
    with pytest.raises(PeftlabError, match="phm_rank"):
        CompacterConfig(phm_rank=0)
    with pytest.raises(PeftlabError, match="bottleneck=6.*multiple of phm_dim=4"):
        CompacterConfig(bottleneck=6)
    with pytest.raises(PeftlabError, match="expected one of them"):
        CompacterConfig(bottleneck=8, reduction_factor=16)
    with pytest.raises(PeftlabError, match="phm_init_range"):
        CompacterConfig(phm_init_range=0.0)
    with pytest.raises(PeftlabError, match="activation"):
        CompacterConfig(activation="gelu-ish")
    with pytest.raises(PeftlabError, match=r"phm_dim=5.*32 wide"):  # 32 is not divisible by 5
        get_peft_model(tiny_bert(), CompacterConfig(phm_dim=5))
    with pytest.raises(PeftlabError, match="get_peft_model"):
        attach(tiny_bert(), "default", CompacterConfig())
