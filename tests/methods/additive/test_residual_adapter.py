"""Residual adapter: Lin et al.'s LayerNorm + bottleneck on each transformer block's output (after the
block's residual add), or Pfeiffer et al.'s bottleneck after the FFN output projection (placement="ffn_out",
the sequential adapter's layer reused)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, ResidualAdapterConfig, SequentialAdapterConfig, get_peft_model
from peftlab.methods.additive.residual_adapter import BlockAdapterLayer
from peftlab.methods.additive.sequential_adapter import Bottleneck, SequentialAdapterLayer

from ...conftest import STORIES, require_shared
from ._adapters import BUILDERS, D, check_lifecycle, bottleneck_by_hand, perturb, run, site_params, wrapped

EXPECTED_BLOCKS = {
    "bert": [f"bert.encoder.layer.{i}" for i in range(2)],
    "gpt2": [f"transformer.h.{i}" for i in range(2)],
    "llama": [f"model.layers.{i}" for i in range(2)],
    "t5": [f"{side}.block.{i}" for side in ("encoder", "decoder") for i in range(2)],
}
EXPECTED_SITES = {
    "bert": [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
    "llama": [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)]
    + [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(2)],
}


def block_params(d: int, m: int) -> int:
    return site_params(d, m) + 2 * d  # the bottleneck and the adapter's own LayerNorm


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_block_placement_identity_and_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), ResidualAdapterConfig(bottleneck=8))
    assert wrapped(pm, BlockAdapterLayer) == EXPECTED_BLOCKS[kind]
    assert not wrapped(pm, SequentialAdapterLayer)
    assert torch.equal(run(pm, kind), base)  # W_up = 0: identity at init
    assert pm.trainable_parameters_report().trainable == len(EXPECTED_BLOCKS[kind]) * block_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_gpt2_block_output_by_hand():
    """Lin et al.'s placement: H = block(x) (after both residual adds), then H + W_up relu(W_down LN(H))."""
    pm = get_peft_model(BUILDERS["gpt2"](), ResidualAdapterConfig(bottleneck=6))
    perturb(pm)
    wrapper = pm.base_model.transformer.h[1]
    block, adapter = wrapper.base_layer, wrapper.adapter["default"]
    assert wrapper.attn is block.attn  # model code may read a block's attributes through the wrapper
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = x + block.attn(block.ln_1(x))[0]          # attention sublayer and its residual
        mlp = block.mlp(block.ln_2(h))
        h = h + mlp                                    # FFN sublayer and its residual: the block output
        normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        normed = normed * adapter.norm.weight + adapter.norm.bias
        expected = h + bottleneck_by_hand(normed, adapter.bottleneck)
        assert torch.allclose(wrapper(x), expected, atol=1e-5)
        # Not the FFN-output placement (adapter on the MLP output, before the residual add).
        ffn_out = h + bottleneck_by_hand(mlp, adapter.bottleneck)
        assert not torch.allclose(wrapper(x), ffn_out, atol=1e-3)


def test_t5_block_tuple_output_keeps_its_other_elements():
    pm = get_peft_model(BUILDERS["t5"](), ResidualAdapterConfig(bottleneck=4))
    perturb(pm)
    wrapper = pm.base_model.encoder.block[0]
    x = torch.randn(1, 3, D)
    with torch.no_grad():
        out, plain = wrapper(x), wrapper.base_layer(x)
        adapter = wrapper.adapter["default"]
    assert isinstance(out, tuple) and len(out) == len(plain)
    torch.testing.assert_close(out[0], plain[0] + adapter(plain[0]))
    assert all(a is b or torch.equal(a, b) for a, b in zip(out[1:], plain[1:]))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ffn_out_placement_identity_and_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), ResidualAdapterConfig(bottleneck=8, placement="ffn_out"))
    assert wrapped(pm, SequentialAdapterLayer) == EXPECTED_SITES[kind]
    assert torch.equal(run(pm, kind), base)
    assert pm.trainable_parameters_report().trainable == len(EXPECTED_SITES[kind]) * site_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_ffn_out_placement_is_half_of_houlsby():
    pm = get_peft_model(BUILDERS["bert"](), ResidualAdapterConfig(bottleneck=8, placement="ffn_out"))
    assert isinstance(pm.base_model.bert.encoder.layer[0].output.dense.bottleneck["default"], Bottleneck)
    # Half the sequential adapter's parameters: one site per layer instead of two.
    seq = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(bottleneck=8))
    assert 2 * pm.trainable_parameters_report().trainable == seq.trainable_parameters_report().trainable


def test_llama_mlp_output_by_hand():
    config = ResidualAdapterConfig(bottleneck=6, activation="silu", placement="ffn_out")
    pm = get_peft_model(BUILDERS["llama"](), config)
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
    pm.add_adapter("residual", ResidualAdapterConfig(bottleneck=4, placement="ffn_out"))
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
    ({"placement": "ffn"}, "placement"),
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
    assert pm.trainable_parameters_report().trainable == 5 * block_params(64, 64 // 16)
    assert torch.equal(pm.generate(bos, max_new_tokens=16, do_sample=False), expected)
    perturb(pm, std=0.5)  # the wrapped blocks still decode with the KV cache, now changed
    assert not torch.equal(pm.generate(bos, max_new_tokens=16, do_sample=False), expected)


def test_named_targets_and_a_module_without_linear_layers():
    pm = get_peft_model(BUILDERS["bert"](), ResidualAdapterConfig(bottleneck=4, targets=("re:.*layer\\.1",)))
    assert wrapped(pm, BlockAdapterLayer) == ["bert.encoder.layer.1"]
    model = BUILDERS["bert"]()
    with pytest.raises(PeftlabError, match="no linear layer"):
        get_peft_model(model, ResidualAdapterConfig(targets=("@layernorm",)))
    assert not any(isinstance(m, BlockAdapterLayer) for m in model.modules())


@pytest.mark.parametrize("placement", ["block", "ffn_out"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placements_save_load_disable_and_delete(kind, placement, tmp_path):
    check_lifecycle(kind, ResidualAdapterConfig(bottleneck=4, placement=placement), tmp_path)
