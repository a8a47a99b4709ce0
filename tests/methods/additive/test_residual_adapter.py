"""Residual adapter: one bottleneck after the FFN output projection only, the sequential adapter's
layer reused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, ResidualAdapterConfig, SequentialAdapterConfig, get_peft_model
from peftlab.methods.additive import residual_adapter, sequential_adapter
from peftlab.methods.additive.sequential_adapter import Bottleneck, SequentialAdapterLayer

from ...conftest import STORIES, require_shared
from ._adapters import BUILDERS, D, bottleneck_by_hand, perturb, run, site_params, wrapped

EXPECTED_SITES = {
    "bert": [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
    "llama": [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)]
    + [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(2)],
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ffn_only_placement_identity_and_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), ResidualAdapterConfig(bottleneck=8))
    assert wrapped(pm, SequentialAdapterLayer) == EXPECTED_SITES[kind]
    assert torch.equal(run(pm, kind), base)
    assert pm.trainable_parameters_report().trainable == len(EXPECTED_SITES[kind]) * site_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_reuses_the_sequential_layer():
    assert residual_adapter.attach is sequential_adapter.attach
    pm = get_peft_model(BUILDERS["bert"](), ResidualAdapterConfig(bottleneck=8))
    assert isinstance(pm.base_model.bert.encoder.layer[0].output.dense.bottleneck["default"], Bottleneck)
    # Half the sequential adapter's parameters: one site per layer instead of two.
    seq = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(bottleneck=8))
    assert 2 * pm.trainable_parameters_report().trainable == seq.trainable_parameters_report().trainable


def test_llama_mlp_output_by_hand():
    pm = get_peft_model(BUILDERS["llama"](), ResidualAdapterConfig(bottleneck=6, activation="silu"))
    perturb(pm)
    mlp = pm.base_model.model.layers[1].mlp
    x = torch.randn(2, 4, D)
    ffn = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.base_layer.weight.T
    expected = ffn + bottleneck_by_hand(ffn, mlp.down_proj.bottleneck["default"], F.silu)
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_beside_a_sequential_adapter_sharing_wrappers():
    base = run(BUILDERS["bert"](), "bert")
    pm = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(bottleneck=8), "houlsby")
    perturb(pm, "houlsby", seed=0)
    houlsby = run(pm, "bert")
    pm.add_adapter("residual", ResidualAdapterConfig(bottleneck=4))
    perturb(pm, "residual", seed=1)
    dense = pm.base_model.bert.encoder.layer[0].output.dense
    assert isinstance(dense.base_layer, torch.nn.Linear) and sorted(dense.bottleneck) == ["houlsby", "residual"]
    pm.set_adapter("residual")
    residual = run(pm, "bert")
    assert not torch.allclose(residual, houlsby, atol=1e-3) and not torch.allclose(residual, base, atol=1e-3)
    pm.delete_adapter("houlsby")
    assert torch.equal(run(pm, "bert"), residual)
    assert wrapped(pm, SequentialAdapterLayer) == EXPECTED_SITES["bert"]


@pytest.mark.parametrize("kwargs,field", [
    ({"bottleneck": 0}, "bottleneck"), ({"activation": "elu"}, "activation"),
    ({"reduction_factor": 0}, "reduction_factor"), ({"init_scale": -1.0}, "init_scale"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=field):
        ResidualAdapterConfig(**kwargs)


def test_stories260k_greedy_text_unchanged_at_init():
    require_shared(STORIES)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    bos = torch.tensor([[model.config.bos_token_id or 1]])
    expected = model.generate(bos, max_new_tokens=16, do_sample=False)
    pm = get_peft_model(model, ResidualAdapterConfig())
    assert pm.trainable_parameters_report().trainable == 5 * site_params(64, 64 // 16)
    assert torch.equal(pm.generate(bos, max_new_tokens=16, do_sample=False), expected)
