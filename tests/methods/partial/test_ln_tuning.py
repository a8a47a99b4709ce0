"""LN tuning: the norms' gain and bias train as per-adapter deltas; checkpoints in HF peft's layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.partial.bitfit import BitFitConfig
from peftlab.methods.partial.ln_tuning import LNTuningConfig, LNTuningLayer

from ...conftest import main_output, model_inputs, perturb, tiny_bert, tiny_gpt2, tiny_llama

NORM = "bert.encoder.layer.0.output.LayerNorm"


def run(model, kind="bert"):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def test_the_norm_runs_with_gain_and_bias_plus_their_deltas():
    pm = get_peft_model(tiny_bert(), LNTuningConfig(targets=(NORM,)))
    layer = pm.base_model.get_submodule(NORM)
    assert isinstance(layer, LNTuningLayer)
    perturb(pm, "default", 0, scale=0.5)
    x = torch.randn(2, 3, 32)
    norm = layer.base_layer
    expected = F.layer_norm(x, (32,), norm.weight + layer.ln_tuning_weight["default"],
                            norm.bias + layer.ln_tuning_bias["default"], norm.eps)
    torch.testing.assert_close(layer(x), expected)
    # Only the deltas train; the base norm is untouched.
    assert {id(p) for p in pm.parameters() if p.requires_grad} == {
        id(layer.ln_tuning_weight["default"]), id(layer.ln_tuning_bias["default"])}
    assert not norm.weight.requires_grad


def test_rms_norms_train_their_gain_only():
    pm = get_peft_model(tiny_llama(), LNTuningConfig())
    layers = [m for m in pm.modules() if isinstance(m, LNTuningLayer)]
    assert len(layers) == 5 and all("default" not in m.ln_tuning_bias for m in layers)  # 2 per layer + final


def test_stacked_adapters_add_their_deltas_and_merge_exactly():
    pm = get_peft_model(tiny_gpt2(), LNTuningConfig())
    perturb(pm, "default", 0, scale=0.2)
    pm.add_adapter("other", LNTuningConfig())
    perturb(pm, "other", 1, scale=0.2)
    pm.set_adapter(["default", "other"])
    layer = pm.base_model.get_submodule("transformer.h.0.ln_1")
    x = torch.randn(2, 32)
    w = layer.base_layer.weight + layer.ln_tuning_weight["default"] + layer.ln_tuning_weight["other"]
    b = layer.base_layer.bias + layer.ln_tuning_bias["default"] + layer.ln_tuning_bias["other"]
    torch.testing.assert_close(layer(x), F.layer_norm(x, (32,), w, b, layer.base_layer.eps))
    original = layer.base_layer.weight.detach().clone()
    expected = run(pm, "gpt2")
    pm.merge_adapter()
    torch.testing.assert_close(run(pm, "gpt2"), expected, atol=1e-6, rtol=0)
    pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, original)


def test_stacks_with_bitfit_on_the_same_norm():
    pm = get_peft_model(tiny_bert(), BitFitConfig(targets=(NORM,)))
    perturb(pm, "default", 0, scale=0.3)
    pm.add_adapter("ln", LNTuningConfig(targets=(NORM,)))
    perturb(pm, "ln", 1, scale=0.3)
    pm.set_adapter(["default", "ln"])
    outer = pm.base_model.get_submodule(NORM)
    bitfit_layer = outer.base_layer
    norm = bitfit_layer.base_layer
    x = torch.randn(2, 32)
    expected = F.layer_norm(x, (32,), norm.weight + outer.ln_tuning_weight["ln"],
                            norm.bias + outer.ln_tuning_bias["ln"] + bitfit_layer.bias_delta["default"], norm.eps)
    torch.testing.assert_close(outer(x), expected)


def test_checkpoint_is_peft_layout_and_loads_both_ways(tmp_path):
    peft = pytest.importorskip("peft", reason="HF peft is the test-only reference for parity")
    pm = get_peft_model(tiny_bert(), LNTuningConfig(modules_to_save=("classifier",)))
    perturb(pm, "default", 0, scale=0.3)
    pm.save_pretrained(tmp_path / "ours")
    state = pm.adapter_state_dict()
    key = f"base_model.model.{NORM}.ln_tuning_layers.weight"
    layer = pm.base_model.get_submodule(NORM)
    torch.testing.assert_close(state[key], layer.base_layer.weight + layer.ln_tuning_weight["default"])
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(theirs(**model_inputs("bert")).logits.detach(), run(pm), atol=1e-6, rtol=0)

    made = peft.get_peft_model(tiny_bert(), peft.LNTuningConfig(target_modules=["LayerNorm"],
                                                                modules_to_save=["classifier"]))
    perturb([p for p in made.parameters() if p.requires_grad], seed=2, scale=0.3)
    made.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    assert isinstance(loaded.peft_configs["default"], LNTuningConfig)
    torch.testing.assert_close(run(loaded), made(**model_inputs("bert")).logits.detach(), atol=1e-6, rtol=0)


def test_config_round_trip_and_bad_targets_leave_the_model_unchanged():
    config = LNTuningConfig(targets=("@layernorm[1]",))
    assert config_from_dict(config.to_dict()) == config
    model = tiny_bert()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(PeftlabError, match="normalisation layers.*Linear"):
        get_peft_model(model, LNTuningConfig(targets=(NORM, "bert.encoder.layer.0.output.dense")))
    assert [n for n, _ in model.named_modules()] == before
