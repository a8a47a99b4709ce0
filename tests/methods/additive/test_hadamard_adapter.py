"""Hadamard adapter: an element-wise weight and bias on each self-attention output (w * A + b)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import CheckpointError, IA3Config, PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.additive.hadamard_adapter import HadamardAdapterConfig, HadamardLayer

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

D = 32  # hidden size of every tiny model in conftest


class Toy(nn.Module):
    """One Linear with weights small enough to check by hand."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=bias)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
            if bias:
                self.proj.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layers(peft_model) -> dict[str, HadamardLayer]:
    return {n.removeprefix("base_model."): m for n, m in peft_model.named_modules() if isinstance(m, HadamardLayer)}


def set_adapter_values(layer: HadamardLayer, weight, bias, name: str = "default") -> None:
    with torch.no_grad():
        layer.hadamard_weight[name].copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.hadamard_bias[name].copy_(torch.as_tensor(bias, dtype=torch.float32))


def run(model, kind):
    inputs = model_inputs(kind)
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        return main_output(model(**inputs))


def perturb_all(pm, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


# -- the update rule, by hand ------------------------------------------------------------------
def test_input_position_is_W_of_w_times_x_plus_b():
    pm = get_peft_model(Toy(), HadamardAdapterConfig(targets=("proj",)))
    layer = layers(pm)["proj"]
    assert layer.hadamard_weight["default"].shape == (3,) and layer.hadamard_bias["default"].shape == (3,)
    x = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.equal(pm(x), torch.tensor([[-1.0, -3.0]]))  # identity at init
    set_adapter_values(layer, [2.0, 1.0, 1.0], [0.0, 1.0, 0.0])
    # w * x + b = [2, 1, -1]; W [2, 1, -1] + b_O = [1, 7] + [1, -1]
    assert torch.equal(pm(x), torch.tensor([[2.0, 6.0]]))


def test_output_position_is_w_times_Wx_plus_b0_plus_b():
    pm = get_peft_model(Toy(), HadamardAdapterConfig(targets=("proj",), position="output"))
    layer = layers(pm)["proj"]
    assert layer.hadamard_weight["default"].shape == (2,)
    set_adapter_values(layer, [2.0, 0.5], [1.0, 1.0])
    # Wx + b_O = [-1, -3]; [2, 0.5] * [-1, -3] + [1, 1]
    assert torch.equal(pm(torch.tensor([[1.0, 0.0, -1.0]])), torch.tensor([[-1.0, -0.5]]))


@pytest.mark.parametrize("position", ["input", "output"])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_folds_exactly_and_unmerge_restores(position, bias):
    model = Toy(bias=bias)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, HadamardAdapterConfig(targets=("proj",), position=position))
    width = 3 if position == "input" else 2
    set_adapter_values(layers(pm)["proj"], torch.linspace(0.5, 2.0, width), torch.linspace(-1.0, 1.0, width))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected = pm(x)
    pm.merge_adapter()
    torch.testing.assert_close(pm(x), expected, rtol=1e-6, atol=1e-5)  # float rounding only
    base = pm.base_model.proj.base_layer
    assert base.bias is not None  # a bias-less projection gets one holding W b (or b)
    pm.unmerge_adapter()
    assert (base.bias is None) == (not bias)  # ...and loses it again
    for key, value in original.items():
        torch.testing.assert_close(base.state_dict()[key.removeprefix("proj.")], value, rtol=1e-6, atol=1e-5)
    plain = get_peft_model(Toy(bias=bias), HadamardAdapterConfig(targets=("proj",), position=position))
    set_adapter_values(layers(plain)["proj"], torch.linspace(0.5, 2.0, width), torch.linspace(-1.0, 1.0, width))
    unloaded = plain.merge_and_unload()
    assert isinstance(unloaded.proj, nn.Linear)
    torch.testing.assert_close(unloaded(x), expected, rtol=1e-6, atol=1e-5)


def test_unmerge_with_a_zero_weight_is_refused():
    pm = get_peft_model(Toy(), HadamardAdapterConfig(targets=("proj",)))
    set_adapter_values(layers(pm)["proj"], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0])
    pm.merge_adapter()
    with pytest.raises(PeftlabError, match="zero weights"):
        pm.unmerge_adapter()


# -- placement on real architectures -------------------------------------------------------------
def test_bert_projection_receives_w_times_self_attention_output_plus_b():
    """The attention output projection sees w * A + b, A the self-attention module's output.
    (IA)^3's placement fails this: it scales V (A becomes l_v * A already) and adds no bias, so the
    projection's input would equal the captured A."""
    pm = get_peft_model(tiny_bert(), HadamardAdapterConfig())
    found = layers(pm)
    assert sorted(found) == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    w, b = torch.linspace(0.5, 1.5, D), torch.linspace(-0.2, 0.3, D)
    set_adapter_values(found["bert.encoder.layer.0.attention.output.dense"], w, b)
    seen = {}
    bert = pm.base_model.bert.encoder.layer[0].attention
    h1 = bert.self.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o[0] if isinstance(o, tuple) else o))
    h2 = bert.output.dense.base_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    run(pm, "bert")
    h1.remove(), h2.remove()
    torch.testing.assert_close(seen["in"], seen["A"] * w + b)
    assert not torch.allclose(seen["in"], seen["A"])


def test_ia3_placement_does_not_reach_the_same_projection_input():
    """The same check with (IA)^3 in the Hadamard adapter's place: what reaches the projection is the
    (rescaled) self-attention output itself, never shifted by a bias."""
    pm = get_peft_model(tiny_bert(), IA3Config(targets=("@value",), feedforward=()))
    seen = {}
    attention = pm.base_model.bert.encoder.layer[0].attention
    h1 = attention.self.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o[0] if isinstance(o, tuple) else o))
    h2 = attention.output.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    run(pm, "bert")
    h1.remove(), h2.remove()
    b = torch.linspace(-0.2, 0.3, D)
    assert torch.equal(seen["in"], seen["A"])  # nothing between the two: no room for w * A + b
    assert not torch.allclose(seen["in"], seen["A"] + b)


def test_gpt2_conv1d_and_llama_merge_exactly():
    for make, kind, leaf in ((tiny_gpt2, "gpt2", "attn.c_proj"), (tiny_llama, "llama", "self_attn.o_proj")):
        pm = get_peft_model(make(), HadamardAdapterConfig())
        assert all(n.endswith(leaf) for n in layers(pm)) and len(layers(pm)) == 2
        perturb_all(pm)
        expected = run(pm, kind)
        pm.merge_adapter()
        torch.testing.assert_close(run(pm, kind), expected, rtol=0, atol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(run(pm, kind), expected, rtol=0, atol=1e-5)


def test_t5_self_attention_only_unless_cross_attention_asked():
    pm = get_peft_model(tiny_t5(), HadamardAdapterConfig())
    names = sorted(layers(pm))
    assert names and all(n.endswith("SelfAttention.o") for n in names)
    assert len(names) == 4  # 2 encoder + 2 decoder blocks
    both = get_peft_model(tiny_t5(), HadamardAdapterConfig(cross_attention=True))
    assert sum(n.endswith("EncDecAttention.o") for n in layers(both)) == 2


def test_gradients_reach_only_w_and_b():
    pm = get_peft_model(tiny_bert(), HadamardAdapterConfig())
    pm.train()
    perturb_all(pm)
    main_output(pm(**model_inputs("bert"))).pow(2).mean().backward()
    trained = {id(p) for p in pm.adapter_parameters("default")}
    assert len(trained) == 2 * 2  # two layers, weight and bias each
    for name, p in pm.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert pm.trainable_parameters_report().trainable == 2 * 2 * D


def test_paper_setup_trains_layernorm_and_head_through_modules_to_save():
    pm = get_peft_model(tiny_bert(), HadamardAdapterConfig(modules_to_save=("attention.output.LayerNorm", "classifier")))
    report = pm.trainable_parameters_report()
    # w, b per layer + a LayerNorm copy (2d) per layer + the classifier (2 x 32 + 2)
    assert report.trainable == 2 * 2 * D + 2 * 2 * D + (2 * D + 2)


# -- save / load -------------------------------------------------------------------------------
def test_save_load_strict_keys_shapes_and_outputs(tmp_path):
    pm = get_peft_model(tiny_bert(), HadamardAdapterConfig())
    perturb_all(pm)
    expected = run(pm, "bert")
    state = pm.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"base_model.model.bert.encoder.layer.{i}.attention.output.dense.hadamard_{part}": (D,)
        for i in range(2) for part in ("weight", "bias")}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(run(loaded, "bert"), expected, rtol=0, atol=0)
    config = loaded.peft_configs["default"]
    assert config_from_dict(config.to_dict()) == config
    assert config.replace(task_type=None, base_model_name_or_path=None) == pm.peft_configs["default"]


@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_damaged_checkpoint_is_refused_and_leaves_the_model_unchanged(tmp_path, damage):
    pm = get_peft_model(tiny_bert(), HadamardAdapterConfig())
    perturb_all(pm)
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.bert.encoder.layer.1.attention.output.dense.hadamard_bias"
    if damage == "missing":
        del tensors[key]
    elif damage == "shape":
        tensors[key] = torch.zeros(D + 1)
    else:
        tensors[key.replace("hadamard_bias", "hadamard_shift")] = torch.zeros(D)
    save_file(tensors, str(weights))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(CheckpointError, match="hadamard_"):
        PeftModel.from_pretrained(model, tmp_path)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- bad input -------------------------------------------------------------------------------------
def test_bad_position_is_refused_naming_the_field():
    with pytest.raises(PeftlabError, match=r"HadamardAdapterConfig\.position='middle'.*'input'"):
        HadamardAdapterConfig(position="middle")


def test_non_linear_targets_are_refused():
    with pytest.raises(PeftlabError, match="LayerNorm.*supports"):
        get_peft_model(tiny_bert(), HadamardAdapterConfig(targets=("attention.output.LayerNorm",)))


def test_only_cross_attention_targets_are_refused():
    with pytest.raises(PeftlabError, match="cross_attention=True"):
        get_peft_model(tiny_t5(), HadamardAdapterConfig(targets=("EncDecAttention.o",)))
