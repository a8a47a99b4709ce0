"""BitFit: only bias terms train, held as per-adapter deltas b = b0 + db."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import BitFitConfig, PeftlabError, config_from_dict, get_peft_model
from peftlab.methods.partial.bitfit import BitFitLayer

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

D = 32  # hidden size of every tiny model in conftest


class Toy(nn.Module):
    def __init__(self, linear_cls: type = nn.Linear) -> None:
        super().__init__()
        self.proj = linear_cls(3, 2)
        self.norm = nn.LayerNorm(2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
            self.proj.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SubclassedLinear(nn.Linear):
    """Not exactly nn.Linear, so BitFit takes its generic path (base output + db)."""


def layers(peft_model) -> dict[str, BitFitLayer]:
    return {n.removeprefix("base_model."): m for n, m in peft_model.named_modules() if isinstance(m, BitFitLayer)}


def run(model, kind):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def perturb(peft_model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def bias_modules(model: nn.Module, exclude: tuple[str, ...] = ("classifier", "lm_head")) -> list[str]:
    """Independent reference: every Linear/Conv1D/LayerNorm with a bias, outside the heads."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, nn.LayerNorm)) and isinstance(getattr(m, "bias", None), nn.Parameter)
            and n.split(".")[0] not in exclude]


# -- the mechanism, by hand ------------------------------------------------------------------
@pytest.mark.parametrize("linear_cls", [nn.Linear, SubclassedLinear])
def test_output_is_wx_plus_b0_plus_delta(linear_cls):
    pm = get_peft_model(Toy(linear_cls), BitFitConfig(targets=("proj",)))
    layer = layers(pm)["proj"]
    x = torch.tensor([[1.0, 0.0, -1.0]])
    assert torch.equal(pm(x), torch.tensor([[-1.0, -3.0]]))  # identity at init
    with torch.no_grad():
        layer.bias_delta["default"].copy_(torch.tensor([0.5, -1.0]))
    # W x + b0 + db = [-2, -2] + [1, -1] + [0.5, -1]
    assert torch.equal(pm(x), torch.tensor([[-0.5, -4.0]]))
    assert torch.equal(layer.base_layer.bias, torch.tensor([1.0, -1.0]))  # b0 is never written


def test_conv1d_and_layernorm_paths():
    pm = get_peft_model(tiny_gpt2(), BitFitConfig())
    found = layers(pm)
    x = torch.randn(2, 5, D)
    for path in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.0.ln_1", "transformer.ln_f"):
        layer = found[path]
        delta = torch.randn(layer.bias_delta["default"].shape)
        with torch.no_grad():
            layer.bias_delta["default"].copy_(delta)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, rtol=0, atol=1e-6)


def test_gradient_goes_only_to_delta_and_equals_the_bias_gradient():
    pm = get_peft_model(tiny_bert(), BitFitConfig())
    pm.train()
    inputs = model_inputs("bert")
    main_output(pm(**inputs)).pow(2).sum().backward()
    trained = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert trained and all(".bias_delta." in n for n in trained)

    # Reference: the same model with its biases unfrozen and trained directly.
    ref = tiny_bert().train()
    for name, p in ref.named_parameters():
        p.requires_grad_(name.endswith("bias") and not name.startswith("classifier"))
    main_output(ref(**inputs)).pow(2).sum().backward()
    ref_grads = {n.removesuffix(".bias"): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    found = layers(pm)
    assert sorted(found) == sorted(ref_grads)
    for path, layer in found.items():
        torch.testing.assert_close(layer.bias_delta["default"].grad, ref_grads[path], rtol=1e-5, atol=1e-7)


def test_default_targets_every_bias_outside_the_head():
    model = tiny_bert()
    expected = bias_modules(model)
    pm = get_peft_model(model, BitFitConfig(modules_to_save=("classifier",)))
    found = layers(pm)
    assert list(found) == expected
    assert "bert.pooler.dense" in found and "bert.embeddings.LayerNorm" in found
    assert "bert.encoder.layer.0.attention.output.LayerNorm" in found and "classifier" not in found
    n_bias = sum(layer.base_layer.bias.numel() for layer in found.values())
    assert pm.trainable_parameters_report().trainable == n_bias + 2 * D + 2  # + classifier copy

    gpt2 = get_peft_model(tiny_gpt2(), BitFitConfig())
    assert list(layers(gpt2)) == bias_modules(tiny_gpt2())
    assert {"transformer.h.1.ln_2", "transformer.ln_f", "transformer.h.0.attn.c_attn"} <= set(layers(gpt2))


def test_explicit_targets_and_mixed_all_biases():
    pm = get_peft_model(tiny_bert(), BitFitConfig(targets=("@query", "@layernorm")))
    assert sorted(layers(pm)) == sorted([f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
                                        + [n for n in bias_modules(tiny_bert()) if n.endswith("LayerNorm")])
    pm = get_peft_model(tiny_bert(), BitFitConfig(targets=("all-biases", "classifier")))
    assert list(layers(pm)) == bias_modules(tiny_bert(), exclude=())


# -- merging ---------------------------------------------------------------------------------
def test_merge_is_exact_and_unmerge_restores_b0_bit_for_bit():
    pm = get_peft_model(tiny_bert(), BitFitConfig())
    perturb(pm)
    originals = {p: m.base_layer.bias.clone() for p, m in layers(pm).items()}
    expected = run(pm, "bert")
    pm.merge_adapter()
    for path, layer in layers(pm).items():
        assert torch.equal(layer.base_layer.bias, originals[path] + layer.bias_delta["default"])
    assert torch.equal(run(pm, "bert"), expected)  # the same sum the unmerged forward used
    pm.unmerge_adapter()
    for path, layer in layers(pm).items():
        assert torch.equal(layer.base_layer.bias, originals[path])
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, BitFitLayer) for m in plain.modules())
    assert torch.equal(run(plain, "bert"), expected)


def test_two_adapters_merge_and_unmerge_in_any_order():
    pm = get_peft_model(Toy(), BitFitConfig(targets=("proj",)))
    pm.add_adapter("other", BitFitConfig(targets=("proj",)))
    layer = layers(pm)["proj"]
    with torch.no_grad():
        layer.bias_delta["default"].copy_(torch.tensor([0.1, 0.2]))
        layer.bias_delta["other"].copy_(torch.tensor([1.0, 2.0]))
    b0 = layer.base_layer.bias.clone()
    pm.merge_adapter("default")
    pm.merge_adapter("other")
    assert torch.equal(layer.base_layer.bias, b0 + torch.tensor([0.1, 0.2]) + torch.tensor([1.0, 2.0]))
    pm.unmerge_adapter("default")
    assert torch.equal(layer.base_layer.bias, b0 + torch.tensor([1.0, 2.0]))
    pm.unmerge_adapter("other")
    assert torch.equal(layer.base_layer.bias, b0) and layer.unmerged_bias is None


def test_checkpoint_holds_only_the_deltas():
    pm = get_peft_model(tiny_bert(), BitFitConfig())
    state = pm.adapter_state_dict()
    assert state["base_model.model.bert.encoder.layer.0.attention.self.query.bias_delta"].shape == (D,)
    assert state["base_model.model.bert.embeddings.LayerNorm.bias_delta"].shape == (D,)
    assert len(state) == len(bias_modules(tiny_bert()))
    assert config_from_dict(pm.peft_configs["default"].to_dict()) == BitFitConfig()


# -- errors ----------------------------------------------------------------------------------
def test_model_without_biases_gets_a_clear_error():
    with pytest.raises(PeftlabError, match=r"LlamaForCausalLM has no bias terms.*LoRA.*\(IA\)\^3"):
        get_peft_model(tiny_llama(), BitFitConfig())
    with pytest.raises(PeftlabError, match="no bias terms"):
        get_peft_model(tiny_t5(), BitFitConfig())  # T5: bias-free Linears, RMS-style T5LayerNorm


def test_explicit_target_without_bias_is_refused():
    with pytest.raises(PeftlabError, match="have no bias"):
        get_peft_model(tiny_llama(), BitFitConfig(targets=("q_proj",)))
    with pytest.raises(PeftlabError, match="Embedding"):
        get_peft_model(tiny_bert(), BitFitConfig(targets=("@embeddings",)))


def test_config_validation():
    with pytest.raises(PeftlabError, match="BitFitConfig.targets="):
        BitFitConfig(targets=())
