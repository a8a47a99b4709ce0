"""Kernel-mix: head h's rows of a q/k/v projection get s (B_s^h A_s + B^h A^h) x — a part shared by
all heads plus the head's own — computed without forming dW, merged exactly, saved strictly."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftlab import CheckpointError, PeftModel, get_peft_model
from peftlab.core.errors import PeftlabError
from peftlab.methods.reparameterized.kernel_mix import KernelMixConfig, KernelMixLayer, Part, parameter_count
from peftlab.methods.reparameterized.lora import LoraConfig, LoraLayer

from ...conftest import MINILM, OpShapes, model_inputs, require_shared, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5


def _layers(pm):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, KernelMixLayer)}


def _perturb(params, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _layer(heads=3, head_dim=4, in_features=20, **config):
    torch.manual_seed(0)
    base = nn.Linear(in_features, heads * head_dim).requires_grad_(False)  # frozen, as in a model
    layer = KernelMixLayer(base)
    layer.add("default", KernelMixConfig(**config), (Part("key", 0, heads, head_dim),))
    layer.set_active(["default"])
    return layer


def _run(model, kind="bert"):
    with torch.no_grad():
        out = model(**model_inputs(kind))
    return out.logits


def _block_ranks(delta: torch.Tensor, heads: int) -> list[int]:
    """Rank of each head's row block of an out x in update (float32 factors: relative tolerance 1e-5)."""
    return [_rank(block) for block in delta.chunk(heads, dim=0)]


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix.detach().double(), rtol=1e-5))


# -- 1. the formula, head by head -------------------------------------------------------------------

def test_update_is_shared_plus_own_part_head_by_head():
    layer = _layer(shared_rank=2, head_rank=1, scale=0.7)
    _perturb(layer.adapter_parameters("default"))
    a_s, b_s = layer.kernel_mix_shared_A["default"][0], layer.kernel_mix_shared_B["default"][0]  # 2 x 20, 12 x 2
    a_h, b_h = layer.kernel_mix_head_A["default"][0], layer.kernel_mix_head_B["default"][0]  # 3 x 1 x 20, 3 x 4 x 1
    x = torch.randn(2, 5, 20)
    out, base = layer(x), layer.base_layer(x)
    for h in range(3):
        rows = slice(4 * h, 4 * h + 4)
        by_hand = 0.7 * (x @ a_s.T @ b_s[rows].T + x @ a_h[h].T @ b_h[h].T)
        torch.testing.assert_close(out[..., rows], base[..., rows] + by_hand)
    # dW, built densely by hand: shared LoRA plus a block diagonal of per-head LoRAs.
    own = torch.block_diag(*[b_h[h] for h in range(3)]) @ a_h.reshape(3, 20)
    torch.testing.assert_close(layer.delta_weight("default"), 0.7 * (b_s @ a_s + own))
    torch.testing.assert_close(out, base + x @ layer.delta_weight("default").T)


def test_identity_at_init_a_random_b_zero():
    layer = _layer(shared_rank=2, head_rank=2)
    assert torch.count_nonzero(layer.kernel_mix_shared_B["default"]) == 0
    assert torch.count_nonzero(layer.kernel_mix_head_B["default"]) == 0
    for a in (layer.kernel_mix_shared_A["default"], layer.kernel_mix_head_A["default"]):
        assert torch.count_nonzero(a) == a.numel() and a.abs().max() <= 1 / 20 ** 0.5  # LoRA's A bound
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


# -- 2. the mechanism: per-head blocks, which plain LoRA does not have -------------------------------

def test_each_head_is_moved_by_its_own_factors_only_unlike_plain_lora():
    layer = _layer(heads=4, head_dim=8, in_features=32, shared_rank=0, head_rank=1)
    _perturb(layer.adapter_parameters("default"))
    delta = layer.delta_weight("default")
    # Without the shared part: each head's rows have rank r_h = 1, the whole update rank H r_h = 4.
    assert _block_ranks(delta, 4) == [1, 1, 1, 1]
    assert _rank(delta) == 4
    # Head 2's own factors move head 2's output rows and no others.
    x = torch.randn(6, 32)
    before = layer(x).detach()
    with torch.no_grad():
        layer.kernel_mix_head_A["default"][0, 2].add_(1.0)
    moved = (layer(x).detach() - before).abs().amax(0).reshape(4, 8).amax(1)
    assert moved[2] > 1e-3 and torch.all(moved[[0, 1, 3]] == 0)
    # The gradient of head 0's output reaches head 0's factors only.
    layer(x)[:, :8].sum().backward()
    grads = layer.kernel_mix_head_B["default"].grad[0].abs().flatten(1).amax(1)
    assert grads[0] > 0 and torch.all(grads[1:] == 0)

    # Plain LoRA of the same total rank on the same projection: one A for all heads, so every head's
    # block has the full rank 4 and moving A moves every head: the checks above fail for it.
    lora = LoraLayer(nn.Linear(32, 32).requires_grad_(False))
    lora.add("default", LoraConfig(r=4, alpha=4))
    lora.set_active(["default"])
    _perturb(lora.adapter_parameters("default"))
    assert _block_ranks(lora.delta_weight("default"), 4) == [4, 4, 4, 4]
    before = lora(x).detach()
    with torch.no_grad():
        lora.lora_A["default"].weight[0].add_(1.0)
    moved = (lora(x).detach() - before).abs().amax(0).reshape(4, 8).amax(1)
    assert torch.all(moved > 1e-3)


def test_the_shared_part_moves_every_head_and_adds_rank():
    layer = _layer(heads=4, head_dim=8, in_features=32, shared_rank=2, head_rank=1)
    _perturb(layer.adapter_parameters("default"))
    delta = layer.delta_weight("default")
    assert _block_ranks(delta, 4) == [3, 3, 3, 3]  # r_s + r_h per head
    assert _rank(delta) == 6  # r_s + H r_h
    # Same trained numbers as LoRA r=4.5 on this 32 x 32 layer: LoRA's r=4 reaches rank 4 only.
    assert layer.trainable_entries("default") == parameter_count(32, 4, 8, 2, 1) == 2 * 64 + 4 * 40 == 288
    x = torch.randn(6, 32)
    before = layer(x).detach()
    with torch.no_grad():
        layer.kernel_mix_shared_A["default"][0, 0].add_(1.0)
    moved = (layer(x).detach() - before).abs().amax(0).reshape(4, 8).amax(1)
    assert torch.all(moved > 1e-3)


def test_shared_rank_zero_keeps_per_head_parts_only():
    pm = get_peft_model(tiny_bert(), KernelMixConfig(shared_rank=0, head_rank=2))
    keys = sorted(pm.adapter_state_dict("default"))
    assert keys and all(k.endswith(("kernel_mix_head_A", "kernel_mix_head_B")) for k in keys)
    assert pm.get_nb_trainable_parameters()[0] == 4 * parameter_count(32, 4, 8, 0, 2)


def test_forward_and_backward_never_form_the_dense_update(monkeypatch):
    layer = _layer(heads=3, head_dim=4, in_features=20, shared_rank=2, head_rank=1)
    _perturb(layer.adapter_parameters("default"))
    monkeypatch.setattr(KernelMixLayer, "delta_weight", lambda *a: pytest.fail("delta_weight called in forward"))
    x = torch.randn(2, 3, 20)
    with OpShapes(layer.base_layer.weight) as probe:
        layer(x).square().sum().backward()
    assert probe.shapes, "the probe saw no ops"
    # Nothing out x in (12 x 20) but the base weight itself; the largest adapter-side tensor is
    # B (12 x R, R = 2 + 3) or the tokens' own activations.
    assert not [s for s in probe.shapes if set(s[1]) >= {12, 20}], probe.shapes
    assert max(torch.Size(s[1]).numel() for s in probe.shapes) <= max(6 * 20, 12 * 5), probe.shapes
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))


# -- 3. placement on each family, parameter count ------------------------------------------------------

@pytest.mark.parametrize("kind, build, sites", [
    ("bert", tiny_bert, {"key": (4, 8), "value": (4, 8)}),
    ("gpt2", tiny_gpt2, {"key": (4, 8), "value": (4, 8)}),
    ("llama", tiny_llama, {"key": (2, 8), "value": (2, 8)}),  # grouped-query k/v: 2 heads of 8
    ("t5", tiny_t5, {"key": (4, 8), "value": (4, 8)}),
])
def test_default_placement_heads_and_parameter_count(kind, build, sites):
    pm = get_peft_model(build(), KernelMixConfig())
    layers = _layers(pm)
    assert layers
    expected = 0
    for path, layer in layers.items():
        parts = layer.settings["default"].parts
        for part in parts:
            assert (part.heads, part.head_dim) == sites[part.role]
            expected += parameter_count(layer.in_features, part.heads, part.head_dim, 2, 1)
        assert {p.role for p in parts} <= {"key", "value"}
    assert pm.get_nb_trainable_parameters()[0] == expected
    if kind == "gpt2":  # fused c_attn: one module per block, both roles in it
        assert all(sorted(p.role for p in l.settings["default"].parts) == ["key", "value"] for l in layers.values())


def test_llama_query_has_all_heads_key_value_the_grouped_ones():
    pm = get_peft_model(tiny_llama(), KernelMixConfig(targets=("@query", "@key")))
    for path, layer in _layers(pm).items():
        (part,) = layer.settings["default"].parts
        assert (part.heads, part.head_dim) == ((4, 8) if path.endswith("q_proj") else (2, 8))


def test_gpt2_fused_projection_moves_only_the_chosen_thirds_and_merges_exactly():
    base = tiny_gpt2()
    pm = get_peft_model(tiny_gpt2(), KernelMixConfig(targets=("@value",)))
    layer = next(iter(_layers(pm).values()))
    assert layer.transposed and [p.offset for p in layer.settings["default"].parts] == [64]
    _perturb(pm.adapter_parameters("default"))
    x = torch.randn(2, 5, 32)
    moved = (layer(x) - layer.base_layer(x)).detach().abs().amax((0, 1))
    assert torch.all(moved[:64] == 0) and torch.all(moved[64:] > 0)  # query and key thirds untouched
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        before = pm(**inputs).logits
        delta = layer.delta_weight("default").detach().clone()
        merged = pm.merge_and_unload()
        after = merged(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    weight = dict(merged.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    original = dict(base.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(weight - original, delta)  # Conv1D: in x out, value columns only
    assert torch.all(delta[:, :64] == 0)


def test_naming_the_fused_module_adapts_its_three_blocks():
    pm = get_peft_model(tiny_gpt2(), KernelMixConfig(targets=("c_attn",)))
    for layer in _layers(pm).values():
        assert [p.role for p in layer.settings["default"].parts] == ["query", "key", "value"]
        assert layer.kernel_mix_head_A["default"].shape == (3, 4, 1, 32)


def test_minilm_parameter_count_against_lora_r8_query_value():
    from transformers import AutoConfig, BertModel

    cfg = AutoConfig.from_pretrained(str(require_shared(MINILM)))
    torch.manual_seed(0)
    km = get_peft_model(BertModel(cfg), KernelMixConfig())
    lora = get_peft_model(BertModel(cfg), LoraConfig(r=8, targets=("@query", "@value")))
    # 6 layers x 2 projections x [r_s (384 + 384) + 12 r_h (384 + 32)], r_s = 2, r_h = 1
    assert km.get_nb_trainable_parameters()[0] == 6 * 2 * (2 * 768 + 12 * 416) == 78_336
    assert lora.get_nb_trainable_parameters()[0] == 6 * 2 * 8 * 768 == 73_728


# -- 4. merge -------------------------------------------------------------------------------------------

def test_merge_unmerge_restores_weights_and_outputs():
    pm = get_peft_model(tiny_bert(), KernelMixConfig(shared_rank=3, head_rank=2, targets=("@query", "@key", "@value")))
    _perturb(pm.adapter_parameters("default"))
    layer = next(iter(_layers(pm).values()))
    w0 = layer.base_layer.weight.detach().clone()
    live = _run(pm)
    pm.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight - w0, layer.delta_weight("default").detach())
    torch.testing.assert_close(_run(pm), live, atol=1e-5, rtol=1e-4)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0)
    torch.testing.assert_close(_run(pm), live, atol=1e-6, rtol=1e-5)


def test_two_adapters_with_different_ranks():
    pm = get_peft_model(tiny_bert(), KernelMixConfig(shared_rank=1, head_rank=1))
    pm.add_adapter("other", KernelMixConfig(shared_rank=0, head_rank=3, targets=("@query",)))
    _perturb(pm.adapter_parameters("default"), 1)
    _perturb(pm.adapter_parameters("other"), 2)
    first = _run(pm)
    pm.set_adapter("other")
    assert not torch.allclose(_run(pm), first)
    for path, layer in _layers(pm).items():
        assert ("other" in layer.kernel_mix_head_A) == path.endswith("query")
    pm.delete_adapter("other")
    pm.set_adapter("default")
    torch.testing.assert_close(_run(pm), first)


# -- 5. save / load, strictly ---------------------------------------------------------------------------

def test_save_load_keys_shapes_and_outputs(tmp_path):
    pm = get_peft_model(tiny_bert(), KernelMixConfig(shared_rank=2, head_rank=2, scale=1.5))
    _perturb(pm.adapter_parameters("default"))
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["method"] == "kernel_mix" and "peft_type" not in data and data["head_rank"] == 2
    state = pm.adapter_state_dict("default")
    shapes = {k.rsplit(".", 1)[-1]: tuple(v.shape) for k, v in state.items()}
    assert shapes == {"kernel_mix_shared_A": (1, 2, 32), "kernel_mix_shared_B": (1, 32, 2),
                      "kernel_mix_head_A": (1, 4, 2, 32), "kernel_mix_head_B": (1, 4, 8, 2)}
    assert len(state) == 4 * 4  # 2 layers x (key, value) x 4 tensors
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_run(loaded), _run(pm))
    # A checkpoint of other ranks does not load into this config's shapes.
    other = get_peft_model(tiny_bert(), KernelMixConfig(shared_rank=2, head_rank=1))
    with pytest.raises(CheckpointError, match="kernel_mix_head_A"):
        other.load_adapter_state_dict("default", state)


@pytest.mark.parametrize("damage", ["missing", "misshapen", "extra"])
def test_a_damaged_checkpoint_is_refused_by_key_and_the_model_is_left_unchanged(damage, tmp_path):
    from safetensors.torch import load_file, save_file

    pm = get_peft_model(tiny_bert(), KernelMixConfig())
    _perturb(pm.adapter_parameters("default"))
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = sorted(k for k in tensors if k.endswith("kernel_mix_head_B"))[0]
    if damage == "missing":
        del tensors[key]
    elif damage == "misshapen":
        tensors[key] = tensors[key][:, :2].contiguous()
    else:
        tensors[key.replace("head_B", "head_C")] = tensors[key].clone()
    save_file(tensors, str(file))

    fresh = tiny_bert()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="kernel_mix_head_[BC]"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, KernelMixLayer) for m in fresh.modules())
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())

    # Loading it beside a working adapter leaves that one as it was.
    host = get_peft_model(tiny_bert(), KernelMixConfig(head_rank=2))
    _perturb(host.adapter_parameters("default"), 5)
    before = _run(host)
    with pytest.raises(CheckpointError, match="kernel_mix_head_[BC]"):
        host.load_adapter(tmp_path, "second")
    assert list(host.peft_configs) == ["default"]
    assert all("second" not in l.kernel_mix_head_A for l in _layers(host).values())
    torch.testing.assert_close(_run(host), before)


# -- 6. bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [({"shared_rank": -1}, "shared_rank"), ({"head_rank": 0}, "head_rank"),
                                        ({"head_rank": 1.5}, "head_rank"), ({"shared_rank": True}, "shared_rank"),
                                        ({"scale": 0.0}, "scale"), ({"scale": float("nan")}, "scale")])
def test_bad_config_values_are_refused_naming_the_field(bad, field):
    with pytest.raises(PeftlabError, match=rf"KernelMixConfig\.{field}="):
        KernelMixConfig(**bad)


def _refused(model, config, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError, match=match):
        get_peft_model(model, config)
    assert not any(isinstance(m, KernelMixLayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("targets", [("@ffn_in",), ("@attn_out",), ("intermediate.dense",), ("@key", "@attn_out"),
                                     r"re:.*layer\.\d+\.output\.dense"])
def test_a_target_that_is_not_a_query_key_value_projection_is_refused(targets):
    _refused(tiny_bert(), KernelMixConfig(targets=targets), r"attention query/key/value projections per head.*"
             r"selects '.*(dense|output)'")


def test_a_head_count_that_does_not_divide_the_projection_is_refused():
    model = tiny_bert()
    model.config.num_attention_heads = 5  # 32 outputs cannot split into 5 heads
    _refused(model, KernelMixConfig(), r"key, 32 outputs\) into 5 heads: 5 does not divide 32")


def test_a_head_rank_beyond_the_head_dimension_is_refused():
    _refused(tiny_bert(), KernelMixConfig(head_rank=9), r"head_rank=9 exceeds the head dimension 8")


def test_a_model_without_attach_point_map_or_head_count_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(PeftlabError, match="model_type None has none"):
        get_peft_model(model, KernelMixConfig(targets=("0",)))
    headless = tiny_bert()
    headless.config = SimpleNamespace(model_type="bert")  # a config that does not say how many heads
    _refused(headless, KernelMixConfig(), r"gives no head count \(num_attention_heads=None\)")


def test_mixed_batches_are_refused_with_a_clear_message():
    pm = get_peft_model(tiny_bert(), KernelMixConfig())
    with pytest.raises(PeftlabError, match="kernel_mix, which does not support mixed batches"):
        pm(**model_inputs("bert"), adapter_names=["default", "default"])
