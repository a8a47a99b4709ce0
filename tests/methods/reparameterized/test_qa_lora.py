"""QA-LoRA: LoRA on group-pooled inputs over a group-wise INT4 base really stored in 4 bits; the
merged model stays INT4 (only the per-group offsets move) and computes what the unmerged one did."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.registry import get_method
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.qa_lora import (GroupIntLinear, QALoraConfig, pack_codes, quantize_base,
                                                      unpack_codes)

from ...conftest import labelled_batches, main_output, model_inputs, perturb, tiny_bert, tiny_gpt2

TOLERANCE = get_method("qa_lora").merge_tolerance


def _quantized(model):
    return {n.replace(".base_layer", ""): m for n, m in model.named_modules() if isinstance(m, GroupIntLinear)}


def _run(model, kind="bert"):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def _layer(pm, suffix="layer.0.attention.self.query"):
    return next(m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer) and n.endswith(suffix))


# -- 1. the base is really stored in 4 bits ------------------------------------------------------------

def test_every_linear_layer_but_the_head_is_stored_as_packed_int4():
    pm = get_peft_model(tiny_bert(), QALoraConfig())
    layers = _quantized(pm.base_model)
    # 2 blocks x (query, key, value, attention output, intermediate, output) + the pooler; not the head
    assert len(layers) == 13 and not any(n.endswith("classifier") for n in layers)
    for name, layer in layers.items():
        numel = layer.in_features * layer.out_features
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == numel // 2, name
        assert layer.scales.shape == layer.offsets.shape == (layer.out_features, layer.in_features // 32)
        state = layer.state_dict()
        assert set(state) == {"qweight", "scales", "offsets", "bias"}
        assert not any(t.is_floating_point() and t.numel() >= numel for t in state.values()), "a full float weight"
        assert "weight" not in dict(layer.named_parameters())


def test_dequantization_follows_the_min_max_rule_on_a_hand_made_tensor():
    weight = torch.tensor([[0.0, 0.1, 0.74, 1.5, 2.0, 2.0, 2.0, 2.0],
                           [-3.0, -1.0, 0.1, 3.0, 0.5, -0.5, 0.25, 0.02]])
    linear = torch.nn.Linear(8, 2)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = GroupIntLinear.from_module(linear, group_size=4, bits=4)
    # per (row, group): alpha = (max - min) / 15, beta = min, q = round((w - min) / alpha)
    alpha = torch.tensor([[0.1, 1.0], [0.4, 1 / 15]])  # a constant group keeps alpha 1 and codes 0
    beta = torch.tensor([[0.0, 2.0], [-3.0, -0.5]])
    codes = torch.tensor([[0, 1, 7, 15, 0, 0, 0, 0],
                          [0, 5, 8, 15, 15, 0, 11, 8]], dtype=torch.uint8)
    assert torch.equal(layer.codes(), codes)
    torch.testing.assert_close(layer.scales, alpha)
    torch.testing.assert_close(layer.offsets, beta)
    expected = alpha.repeat_interleave(4, dim=1) * codes.float() + beta.repeat_interleave(4, dim=1)
    torch.testing.assert_close(layer.dequantized_weight(), expected)
    # two codes per byte, the first in the low nibble: (0, 1) -> 0x10, (7, 15) -> 0xF7
    assert layer.qweight[:2].tolist() == [0x10, 0xF7]
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ expected.T + linear.bias)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_pack_into_bits_per_weight(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 24), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(5, 24), codes)
    linear = torch.nn.Linear(64, 6)
    layer = GroupIntLinear.from_module(linear, group_size=16, bits=bits)
    assert layer.qweight.numel() == 64 * 6 * bits // 8
    assert int(layer.codes().max()) <= (1 << bits) - 1
    # the rounding error is at most half a step of each group
    err = (layer.dequantized_weight() - linear.weight).abs().view(6, 4, 16).amax(-1)
    assert bool((err <= layer.scales / 2 + 1e-6).all())


def test_gpt2_conv1d_layers_are_quantized_transposed():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn  # weight stored in x out
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        full = conv(x)
    quantize_base(model, QALoraConfig())
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, GroupIntLinear) and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T + conv.bias)
        assert (layer(x) - full).abs().max() < 0.1 * full.abs().max()  # a 4-bit rounding, not another layer


def test_the_weight_attribute_is_a_read_only_dequantized_copy():
    layer = GroupIntLinear.from_module(torch.nn.Linear(32, 4), group_size=32, bits=4)
    torch.testing.assert_close(layer.weight, layer.dequantized_weight())
    with pytest.raises(RuntimeError, match="[Ii]nplace update to inference tensor"):
        layer.weight.mul_(2.0)  # code merging into a float weight must not be silently lost


# -- 2. the mechanism: the LoRA input is pooled per group ----------------------------------------------

def test_the_update_is_b_a_times_the_group_means_of_the_input():
    pm = get_peft_model(tiny_bert(), QALoraConfig(r=4, alpha=8, group_size=8))
    perturb(pm)
    layer = _layer(pm)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 32 // 8) and b.shape == (32, 4)
    x = torch.randn(3, 5, 32)
    pooled = torch.stack([x[..., g * 8:(g + 1) * 8].sum(-1) / 8 for g in range(4)], dim=-1)
    with torch.no_grad():
        base = layer.base_layer(x)
        torch.testing.assert_close(layer(x), base + 2.0 * pooled @ a.T @ b.T)  # scale alpha / r = 2
        # as a weight: dW[o, j] = s (B A)[o, j // L] / L, constant within each group
        torch.testing.assert_close(layer.delta_weight("default"), (2.0 * b @ a / 8).repeat_interleave(8, dim=1))


def test_only_group_means_matter_which_plain_lora_on_the_same_int4_base_fails():
    pm = get_peft_model(tiny_bert(), QALoraConfig(r=4, group_size=8))
    pm.add_adapter("plain", LoraConfig(r=4, targets=("@query",)))  # the neighbour, on the same INT4 layer
    perturb(pm, "default", 0)
    perturb(pm, "plain", 1)
    layer = _layer(pm)
    assert isinstance(layer.base_layer, GroupIntLinear)
    x = torch.randn(2, 6, 32)
    # the same group means, other values within each group
    noise = torch.randn(2, 6, 4, 8)
    shuffled = x + (noise - noise.mean(-1, keepdim=True)).reshape(2, 6, 32)

    def update(name, inputs):
        pm.set_adapter(name)
        with torch.no_grad():
            return layer(inputs) - layer.base_layer(inputs)

    torch.testing.assert_close(update("default", shuffled), update("default", x), atol=1e-6, rtol=0)
    assert (update("plain", shuffled) - update("plain", x)).abs().max() > 1e-2, "plain LoRA sees within-group values"


# -- 3. the merged model stays INT4 and equals the unmerged one ----------------------------------------

def _trained(steps=4):
    pm = get_peft_model(tiny_bert(), QALoraConfig(r=4))
    pm.train()
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    for batch in labelled_batches(steps):
        pm(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return pm.eval()


def test_after_training_the_merged_int4_model_equals_the_unmerged_one():
    pm = _trained()
    assert all(bool(layer.lora_B["default"].weight.abs().sum() > 0) for layer in
               (m for m in pm.base_model.modules() if isinstance(m, LoraLayer))), "training left B at zero"
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in _quantized(pm.base_model).items()}
    expected, hidden = _run(pm), _hidden(pm)
    with pm.disable_adapter():
        change = (hidden - _hidden(pm)).abs().max()
    assert change > 100 * TOLERANCE, f"the trained adapter changes the hidden states by {change:.3g} only"
    pm.merge_adapter()
    merged = _run(pm)
    torch.testing.assert_close(merged, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(_hidden(pm), hidden, atol=TOLERANCE, rtol=0)
    for name, layer in _quantized(pm.base_model).items():
        assert isinstance(layer, GroupIntLinear), name
        assert torch.equal(layer.qweight, before[name]["qweight"]), f"{name}: the codes changed"
        assert torch.equal(layer.scales, before[name]["scales"]), f"{name}: the scales changed"
        assert not torch.equal(layer.offsets, before[name]["offsets"]), f"{name}: the update did not reach the offsets"
    pm.unmerge_adapter()
    for name, layer in _quantized(pm.base_model).items():
        assert all(torch.equal(t, before[name][k]) for k, t in layer.state_dict().items()), f"{name}: not restored"
    assert torch.equal(_run(pm), expected)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, DeltaModule) for m in plain.modules())
    assert len(_quantized(plain)) == 13
    torch.testing.assert_close(_run(plain), merged, atol=0, rtol=0)


def _hidden(model):
    with torch.no_grad():
        return model(**model_inputs("bert"), output_hidden_states=True).hidden_states[-1]


def test_an_update_that_is_not_group_constant_is_refused_and_changes_nothing():
    pm = get_peft_model(tiny_bert(), QALoraConfig(r=4))
    pm.add_adapter("plain", LoraConfig(r=4, targets=("@query",)))
    perturb(pm, "plain")
    layer = _layer(pm).base_layer
    offsets = layer.offsets.clone()
    with pytest.raises(PeftlabError, match="only merges group-constant updates"):
        pm.merge_adapter("plain")
    assert torch.equal(layer.offsets, offsets) and not _layer(pm).merged_adapters
    varying = torch.zeros(layer.out_features, layer.in_features)
    varying[0, 1] = 1e-3
    with pytest.raises(PeftlabError, match="varies by up to 0.001 within a group of 32"):
        layer.merge_delta_(varying)
    assert torch.equal(layer.offsets, offsets)


# -- 4. bad input ---------------------------------------------------------------------------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_a_group_size_that_does_not_divide_a_width_is_refused_before_anything_changes():
    model = tiny_bert()
    state = _state(model)
    with pytest.raises(PeftlabError, match=r"group_size=24 does not divide the input width of .*"
                                           r"'bert\.encoder\.layer\.0\.attention\.self\.query' \(in_features=32\)"):
        get_peft_model(model, QALoraConfig(group_size=24))
    assert _unchanged(model, state) and not _quantized(model)
    with pytest.raises(PeftlabError, match="in_features=32"):  # the FFN output (64 wide) alone would pass
        get_peft_model(model, QALoraConfig(group_size=64))
    assert _unchanged(model, state) and not _quantized(model)


def test_a_base_quantized_otherwise_is_refused():
    model = tiny_bert()
    quantize_base(model, QALoraConfig(group_size=16))
    layers, state = _quantized(model), _state(model)
    with pytest.raises(PeftlabError, match="already quantized as int4, groups of 16 .* group_size=16, bits=4"):
        get_peft_model(model, QALoraConfig(group_size=32))
    assert _unchanged(model, state)
    with pytest.raises(PeftlabError, match="already quantized as int4.*bits=4"):
        get_peft_model(model, QALoraConfig(group_size=16, bits=3))
    assert _unchanged(model, state)
    pm = get_peft_model(model, QALoraConfig(group_size=16))  # the same quantization: reused as it is
    reused = _quantized(pm.base_model)
    assert reused.keys() == layers.keys() and all(reused[n] is layers[n] for n in layers)


def test_a_bitsandbytes_4bit_base_is_refused():
    pytest.importorskip("bitsandbytes")
    from peftlab.core import quant

    model = tiny_bert()
    quant.quantize_model(model)
    with pytest.raises(PeftlabError, match=r"already quantized \(nf4"):
        get_peft_model(model, QALoraConfig())


def test_a_layer_carrying_full_precision_adapters_is_not_quantized_under_them():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4))
    state = _state(pm.base_model)
    with pytest.raises(PeftlabError, match="carries adapters \\['default'\\] of its full-precision weight"):
        pm.add_adapter("qa", QALoraConfig())
    assert _unchanged(pm.base_model, state) and not _quantized(pm.base_model)


def test_config_refuses_dora_and_unsupported_widths():
    with pytest.raises(PeftlabError, match="use_dora=True is not supported"):
        QALoraConfig(use_dora=True)
    with pytest.raises(PeftlabError, match="bits=8"):
        QALoraConfig(bits=8)
    with pytest.raises(PeftlabError, match="group_size=1"):
        QALoraConfig(group_size=1)
    assert QALoraConfig(qalora_group_size=16, lora_alpha=4).group_size == 16  # peft's names too


# -- 5. save and load ----------------------------------------------------------------------------------

def test_save_and_load_on_a_fresh_full_precision_model_gives_the_same_outputs(tmp_path):
    pm = _trained(steps=2)
    expected = _run(pm)
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "qa_lora" and config["group_size"] == 32 and "peft_type" not in config
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), "only A and B are saved"
    assert tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 1)
    fresh = tiny_bert()
    assert not _quantized(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert len(_quantized(loaded.base_model)) == 13  # re-quantized on load, deterministically
    torch.testing.assert_close(_run(loaded), expected, atol=1e-6, rtol=0)
    # the base model's quantized state is plain tensors, safetensors-able
    save_file({k: v.contiguous() for k, v in loaded.merge_and_unload().state_dict().items()},
              str(tmp_path / "int4.safetensors"))
    assert load_file(str(tmp_path / "int4.safetensors"))["bert.pooler.dense.qweight"].dtype == torch.uint8


def test_a_checkpoint_made_for_another_group_size_is_refused_and_the_model_left_full_precision(tmp_path):
    get_peft_model(tiny_bert(), QALoraConfig(group_size=32)).save_pretrained(tmp_path / "g32")
    get_peft_model(tiny_bert(), QALoraConfig(group_size=16)).save_pretrained(tmp_path / "g16")
    weights = tmp_path / "g32" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    # group_size 16's A (r x in/16) under group_size 32's config and file metadata
    save_file(load_file(str(tmp_path / "g16" / "adapter_model.safetensors")), str(weights), metadata=metadata)
    model = tiny_bert()
    state = _state(model)
    with pytest.raises(PeftlabError, match="lora_A"):
        PeftModel.from_pretrained(model, tmp_path / "g32")
    assert _unchanged(model, state) and not _quantized(model)
