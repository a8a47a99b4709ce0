"""(IA)^3: learned vectors rescale keys, values (outputs) and FFN inner activations (inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import IA3Config, PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.additive.ia3 import IA3Layer

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

D = 32  # hidden size of every tiny model in conftest


class Toy(nn.Module):
    """One Linear with weights small enough to check by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
            self.proj.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layers(peft_model) -> dict[str, IA3Layer]:
    return {n.removeprefix("base_model."): m for n, m in peft_model.named_modules() if isinstance(m, IA3Layer)}


def set_vector(layer: IA3Layer, values, name: str = "default") -> None:
    with torch.no_grad():
        layer.ia3_l[name].copy_(torch.as_tensor(values, dtype=torch.float32).view_as(layer.ia3_l[name]))


def run(model, kind):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


# -- the mechanism, by hand ------------------------------------------------------------------
def test_output_scaling_is_l_times_wx_plus_b():
    pm = get_peft_model(Toy(), IA3Config(targets=("proj",), feedforward=()))
    layer = layers(pm)["proj"]
    assert layer.ia3_l["default"].shape == (2, 1)
    x = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.equal(pm(x), torch.tensor([[-1.0, -3.0]]))  # identity at init: Wx + b
    set_vector(layer, [2.0, 0.5])
    # l * (Wx + b) = [2, 0.5] * [-1, -3]; the bias is scaled too
    assert torch.equal(pm(x), torch.tensor([[-2.0, -1.5]]))


def test_feedforward_scaling_is_w_times_l_x_plus_b():
    pm = get_peft_model(Toy(), IA3Config(targets=("proj",), feedforward=("proj",)))
    layer = layers(pm)["proj"]
    assert layer.ia3_l["default"].shape == (1, 3)
    set_vector(layer, [1.0, 2.0, 3.0])
    # W (l * x) + b with x = 1: W [1, 2, 3] + b = [14, 32] + [1, -1]; the bias is not scaled
    assert torch.equal(pm(torch.ones(1, 3)), torch.tensor([[15.0, 31.0]]))


def test_bert_default_scales_keys_values_and_ffn_inner_activation():
    pm = get_peft_model(tiny_bert(), IA3Config())
    found = layers(pm)
    assert sorted(found) == sorted(f"bert.encoder.layer.{i}.{s}" for i in range(2)
                                   for s in ("attention.self.key", "attention.self.value", "output.dense"))
    ffn_out = found["bert.encoder.layer.0.output.dense"]
    assert ffn_out.ia3_l["default"].shape == (1, 64)  # intermediate size: input side
    assert found["bert.encoder.layer.0.attention.self.key"].ia3_l["default"].shape == (D, 1)

    # The FFN output projection now sees l_ff * act(W_in x): capture its input and the FFN activation.
    scale = torch.linspace(0.5, 1.5, 64)
    set_vector(ffn_out, scale)
    seen = {}
    inter = pm.base_model.bert.encoder.layer[0].intermediate
    h1 = inter.register_forward_hook(lambda m, i, o: seen.__setitem__("act", o))
    h2 = ffn_out.base_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    run(pm, "bert")
    h1.remove(), h2.remove()
    torch.testing.assert_close(seen["in"], seen["act"] * scale, rtol=0, atol=0)


def test_keys_are_scaled_at_the_projection_output():
    pm = get_peft_model(tiny_bert(), IA3Config())
    key = layers(pm)["bert.encoder.layer.1.attention.self.key"]
    scale = torch.arange(1.0, D + 1)
    set_vector(key, scale)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(key(x), key.base_layer(x) * scale, rtol=0, atol=0)
    with pm.disable_adapter():
        torch.testing.assert_close(key(x), key.base_layer(x), rtol=0, atol=0)


# -- GPT-2: fused c_attn and Conv1D ---------------------------------------------------------------
def test_gpt2_scales_only_the_key_and_value_blocks_of_c_attn():
    pm = get_peft_model(tiny_gpt2(), IA3Config())
    found = layers(pm)
    assert sorted(found) == sorted(f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "mlp.c_proj"))
    c_attn = found["transformer.h.0.attn.c_attn"]
    assert c_attn.ia3_l["default"].shape == (2 * D, 1)  # d_k + d_v, not the queries
    assert found["transformer.h.0.mlp.c_proj"].ia3_l["default"].shape == (1, 4 * D)
    scale = torch.linspace(0.1, 2.0, 2 * D)
    set_vector(c_attn, scale)
    x = torch.randn(2, 5, D)
    base = c_attn.base_layer(x)
    out = c_attn(x)
    torch.testing.assert_close(out[..., :D], base[..., :D], rtol=0, atol=0)  # queries untouched
    torch.testing.assert_close(out[..., D:], base[..., D:] * scale, rtol=0, atol=0)


@pytest.mark.parametrize("targets,split,rows,scaled", [
    (("@query",), True, D, [(0, D)]),
    (("@query", "@value"), True, 2 * D, [(0, D), (2 * D, 3 * D)]),
    (("@query", "@key", "@value"), True, 3 * D, [(0, 3 * D)]),
    (("@key",), False, 3 * D, [(0, 3 * D)]),  # peft's behaviour: the whole fused output
    (("c_attn", "@key"), True, 3 * D, [(0, 3 * D)]),  # a plain name takes the whole module
])
def test_gpt2_fused_roles(targets, split, rows, scaled):
    pm = get_peft_model(tiny_gpt2(), IA3Config(targets=targets, feedforward=(), split_fused_qkv=split))
    c_attn = layers(pm)["transformer.h.1.attn.c_attn"]
    assert c_attn.ia3_l["default"].shape == (rows, 1)
    set_vector(c_attn, torch.full((rows,), 3.0))
    expected = torch.ones(3 * D)
    for start, stop in scaled:
        expected[start:stop] = 3.0
    assert torch.equal(c_attn.scale_vector("default"), expected)


def test_gpt2_merge_folds_into_conv1d_columns_and_rows():
    pm = get_peft_model(tiny_gpt2(), IA3Config())
    found = layers(pm)
    c_attn, c_proj = found["transformer.h.0.attn.c_attn"], found["transformer.h.0.mlp.c_proj"]
    set_vector(c_attn, torch.linspace(0.5, 1.5, 2 * D))
    set_vector(c_proj, torch.linspace(0.5, 1.5, 4 * D))
    w_attn, b_attn = c_attn.base_layer.weight.clone(), c_attn.base_layer.bias.clone()
    w_proj, b_proj = c_proj.base_layer.weight.clone(), c_proj.base_layer.bias.clone()
    expected = run(pm, "gpt2")
    pm.merge_adapter()
    full = c_attn.scale_vector("default")
    # Conv1D stores W as in x out: output scaling multiplies columns (and the bias), input scaling rows.
    assert torch.equal(c_attn.base_layer.weight, w_attn * full[None, :])
    assert torch.equal(c_attn.base_layer.bias, b_attn * full)
    assert torch.equal(c_proj.base_layer.weight, w_proj * torch.linspace(0.5, 1.5, 4 * D)[:, None])
    assert torch.equal(c_proj.base_layer.bias, b_proj)
    torch.testing.assert_close(run(pm, "gpt2"), expected, rtol=0, atol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(c_attn.base_layer.weight, w_attn, rtol=1e-6, atol=1e-7)


# -- merging ---------------------------------------------------------------------------------
def test_merge_scales_rows_and_bias_for_outputs_columns_for_inputs():
    out_pm = get_peft_model(Toy(), IA3Config(targets=("proj",), feedforward=()))
    set_vector(layers(out_pm)["proj"], [2.0, 0.5])
    out_pm.merge_adapter()
    proj = out_pm.base_model.proj.base_layer
    assert torch.equal(proj.weight, torch.tensor([[2.0, 4.0, 6.0], [2.0, 2.5, 3.0]]))
    assert torch.equal(proj.bias, torch.tensor([2.0, -0.5]))

    in_pm = get_peft_model(Toy(), IA3Config(targets=("proj",), feedforward=("proj",)))
    set_vector(layers(in_pm)["proj"], [1.0, 2.0, 3.0])
    x = torch.randn(4, 3)
    expected = in_pm(x)
    plain = in_pm.merge_and_unload()
    assert isinstance(plain.proj, nn.Linear)
    assert torch.equal(plain.proj.weight, torch.tensor([[1.0, 4.0, 9.0], [4.0, 10.0, 18.0]]))
    assert torch.equal(plain.proj.bias, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-6)


def test_merge_unmerge_on_bert_and_zero_scale_refuses_unmerge():
    pm = get_peft_model(tiny_bert(), IA3Config())
    g = torch.Generator().manual_seed(0)
    for layer in layers(pm).values():
        set_vector(layer, 1 + 0.3 * torch.randn(layer.ia3_l["default"].numel(), generator=g))
    expected = run(pm, "bert")
    pm.merge_adapter()
    torch.testing.assert_close(run(pm, "bert"), expected, rtol=0, atol=1e-6)
    pm.unmerge_adapter()
    torch.testing.assert_close(run(pm, "bert"), expected, rtol=0, atol=1e-6)

    key = layers(pm)["bert.encoder.layer.0.attention.self.key"]
    set_vector(key, torch.zeros(D))
    pm.merge_adapter()
    with pytest.raises(PeftlabError, match="zero scales"):
        pm.unmerge_adapter()


# -- other architectures, configs and errors --------------------------------------------------
def test_llama_default_targets():
    pm = get_peft_model(tiny_llama(), IA3Config())
    found = layers(pm)
    assert sorted(found) == sorted(f"model.layers.{i}.{s}" for i in range(2)
                                   for s in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert found["model.layers.0.self_attn.k_proj"].ia3_l["default"].shape == (16, 1)  # 2 kv heads x 8
    assert found["model.layers.0.mlp.down_proj"].ia3_l["default"].shape == (1, 64)
    assert pm.trainable_parameters_report().trainable == 2 * (16 + 16 + 64)


def test_t5_encoder_decoder_targets_and_effect():
    model = tiny_t5()
    inputs = dict(model_inputs("t5"), decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]))
    with torch.no_grad():
        base = model(**inputs).logits
    pm = get_peft_model(model, IA3Config())
    found = layers(pm)
    # 2 encoder blocks (self-attn k, v; wo) + 2 decoder blocks (self- and cross-attn k, v; wo)
    assert len(found) == 2 * 3 + 2 * 5
    assert all(m.settings["default"].feedforward == n.endswith("DenseReluDense.wo") for n, m in found.items())
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, base, rtol=0, atol=1e-6)
        for layer in found.values():
            set_vector(layer, torch.full((layer.ia3_l["default"].numel(),), 1.5))
        assert not torch.allclose(pm(**inputs).logits, base, atol=1e-3)


def test_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(PeftlabError, match="subset"):
        get_peft_model(tiny_bert(), IA3Config(targets=("@key", "@value")))
    pm = get_peft_model(tiny_bert(), IA3Config(targets=("@key", "@value"), feedforward=()))
    assert all(not m.settings["default"].feedforward for m in layers(pm).values())


def test_feedforward_on_a_fused_role_is_refused():
    with pytest.raises(PeftlabError, match="fused q/k/v"):
        get_peft_model(tiny_gpt2(), IA3Config(targets=("@key",), feedforward=("@key",)))


def test_unknown_architecture_with_default_feedforward_says_what_to_do():
    with pytest.raises(PeftlabError, match=r"feedforward=\(\)"):
        get_peft_model(Toy(), IA3Config(targets=("proj",)))


@pytest.mark.parametrize("kwargs,field", [
    ({"targets": ()}, "targets"), ({"feedforward": 3}, "feedforward"), ({"split_fused_qkv": "yes"}, "split_fused_qkv"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(PeftlabError, match=f"IA3Config.{field}="):
        IA3Config(**kwargs)


def test_non_linear_targets_are_refused():
    with pytest.raises(PeftlabError, match="LayerNorm"):
        get_peft_model(tiny_bert(), IA3Config(targets=("@layernorm",), feedforward=()))


def test_checkpoint_layout_and_peft_config_fields(tmp_path):
    import json

    pm = get_peft_model(tiny_bert(), IA3Config(modules_to_save=("classifier",)))
    state = pm.adapter_state_dict()
    assert state["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"].shape == (D, 1)
    assert state["base_model.model.bert.encoder.layer.1.output.dense.ia3_l"].shape == (1, 64)
    assert "base_model.model.classifier.weight" in state
    assert len(state) == 2 * 3 + 2
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert saved["feedforward_modules"] == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert set(saved["feedforward_modules"]) <= set(saved["target_modules"])
    assert "method" not in saved and "targets" not in saved  # peft's own form: peft reads it without warnings
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)  # read back through from_peft
    assert {n: m.settings["default"] for n, m in layers(loaded).items()} == \
        {n: m.settings["default"] for n, m in layers(pm).items()}


def test_gpt2_split_vectors_save_and_load_with_their_blocks(tmp_path):
    import json

    pm = get_peft_model(tiny_gpt2(), IA3Config(targets=("@query", "@value"), feedforward=()))
    set_vector(layers(pm)["transformer.h.0.attn.c_attn"], torch.linspace(0.5, 1.5, 2 * D))
    expected = run(pm, "gpt2")
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # peft cannot express part of c_attn, so the file keeps peftlab's fields and reads back exactly.
    assert saved["method"] == "ia3" and saved["targets"] == ["@query", "@value"]
    assert config_from_dict(saved) == pm.peft_configs["default"]
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert layers(loaded)["transformer.h.0.attn.c_attn"].settings["default"].segments == ((0, D), (2 * D, 3 * D))
    torch.testing.assert_close(run(loaded, "gpt2"), expected, rtol=0, atol=0)


def test_from_peft_reads_peft_fields_and_refuses_exclude_modules():
    config = config_from_dict({"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
                               "feedforward_modules": ["output.dense"], "modules_to_save": ["classifier", "score"],
                               "fan_in_fan_out": False, "init_ia3_weights": True})
    assert config == IA3Config(targets=("key", "value", "output.dense"), feedforward=("output.dense",),
                               split_fused_qkv=False, modules_to_save=("classifier", "score"))
    regex = config_from_dict({"peft_type": "IA3", "target_modules": ".*\\.(k|v)$", "feedforward_modules": None})
    assert regex.targets == ".*\\.(k|v)$" and regex.feedforward == ()
    with pytest.raises(PeftlabError, match="exclude_modules"):
        config_from_dict({"peft_type": "IA3", "target_modules": ["key"], "exclude_modules": ["x"]})


def test_only_vectors_train_and_receive_gradients():
    pm = get_peft_model(tiny_bert(), IA3Config())
    pm.train()
    main_output(pm(**model_inputs("bert"))).pow(2).sum().backward()
    trained = [n for n, p in pm.named_parameters() if p.grad is not None]
    assert trained and all(".ia3_l." in n for n in trained)
    assert pm.trainable_parameters_report().trainable == 2 * (D + D + 64)
