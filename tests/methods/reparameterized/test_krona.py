"""KronA: the update is s (A ⊗ B) x, computed by the Kronecker-vector identity without forming
A ⊗ B; A (a1 x a2) zero, B ((out/a1) x (in/a2)) random; merged exactly by torch.kron; peftlab's own form."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab import PeftModel, get_peft_model
from peftlab.core.errors import PeftlabError
from peftlab.methods.reparameterized.krona import (KronAConfig, KronALayer, factor_shapes, kron_matmul,
                                                   nearest_sqrt_divisor)
from peftlab.methods.reparameterized.lora import LoraConfig

from ...conftest import OpShapes, model_inputs, perturb, tiny_bert, tiny_gpt2


def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, KronALayer)]


def _layer(out_features=12, in_features=20, **config):
    torch.manual_seed(0)
    layer = KronALayer(nn.Linear(in_features, out_features).requires_grad_(False))  # frozen, as in a model
    layer.add("default", KronAConfig(**config))
    layer.set_active(["default"])
    return layer


# (a1, a2, b1, b2): the first two take the "A first" order, the last two the "B first" order.
@pytest.mark.parametrize("shape", [(3, 4, 4, 5), (2, 7, 5, 3), (6, 1, 1, 6), (4, 2, 3, 8)])
def test_kronecker_vector_identity_matches_torch_kron(shape):
    a1, a2, b1, b2 = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(a1, a2, generator=g, dtype=torch.float64)
    b = torch.randn(b1, b2, generator=g, dtype=torch.float64)
    x = torch.randn(7, a2 * b2, generator=g, dtype=torch.float64)
    # row-major: (A ⊗ B) x = (A X B^T).reshape(-1) with X = x.reshape(a2, b2)
    torch.testing.assert_close(kron_matmul(a, b, x), x @ torch.kron(a, b).T)
    torch.testing.assert_close((a @ x[0].reshape(a2, b2) @ b.T).reshape(-1), torch.kron(a, b) @ x[0])


def test_factor_shapes_parameter_count_and_init():
    layer = _layer(a1=3, a2=4)
    a, b = layer.krona_A["default"], layer.krona_B["default"]
    assert a.shape == (3, 4) and b.shape == (12 // 3, 20 // 4)
    assert layer.trainable_entries("default") == 3 * 4 + (12 // 3) * (20 // 4) == 32
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == b.numel()  # A zero, B random
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # identity at init
    # The automatic sizes: the divisor nearest the square root, per dimension.
    assert [nearest_sqrt_divisor(n) for n in (32, 96, 384, 768, 3072, 127)] == [4, 8, 16, 24, 48, 1]
    assert factor_shapes(KronAConfig(), 768, 768, "x") == ((24, 24), (32, 32))


def test_update_is_scaled_kronecker_product_times_x():
    layer = _layer(a1=3, a2=4, scale=0.7)
    perturb(layer.adapter_parameters("default"))
    a, b = layer.krona_A["default"], layer.krona_B["default"]
    x = torch.randn(2, 3, 20)
    expected = layer.base_layer(x) + 0.7 * x @ torch.kron(a, b).T  # dense, tiny sizes
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight("default"), 0.7 * torch.kron(a, b))
    # The update has rank(A) rank(B) = 3 * 4 = 12 (full, out = 12) from 32 numbers; LoRA needs
    # r (out + in) = 12 * 32 numbers for a rank-12 update of this layer, and r=1 (32 numbers) gives rank 1.
    assert torch.linalg.matrix_rank(layer.delta_weight("default").detach().double()) == 12


@pytest.mark.parametrize("a1, a2", [(3, 4), (2, 2)])  # A first, B first
def test_forward_and_backward_never_form_the_out_x_in_update(monkeypatch, a1, a2):
    layer = _layer(a1=a1, a2=a2)
    perturb(layer.adapter_parameters("default"))
    x = torch.randn(2, 3, 20)  # 6 tokens: x has 120 entries, the output 72, the weight 240

    def refuse(*args, **kwargs):
        raise AssertionError("torch.kron called in forward")

    monkeypatch.setattr(torch, "kron", refuse)
    with OpShapes(layer.base_layer.weight) as probe:
        layer(x).square().sum().backward()
    assert probe.shapes, "the probe saw no ops"
    biggest = max(probe.shapes, key=lambda s: torch.Size(s[1]).numel())
    assert torch.Size(biggest[1]).numel() < 12 * 20, f"a tensor as large as the weight: {biggest}"
    assert all(not {12, 20} <= set(shape) for _, shape in probe.shapes), probe.shapes
    assert layer.krona_A["default"].grad is not None and layer.krona_B["default"].grad is not None


def test_plain_lora_does_not_have_this_structure():
    # Same model, same targets: LoRA r=8 trains a different number of numbers and a low-rank update.
    krona = get_peft_model(tiny_bert(), KronAConfig(targets=("query", "value")))
    lora = get_peft_model(tiny_bert(), LoraConfig(targets=("query", "value")))
    layers = _layers(krona)
    assert len(layers) == 4
    per_layer = 4 * 4 + 8 * 8  # 32 x 32: A 4 x 4, B 8 x 8
    assert krona.get_nb_trainable_parameters()[0] == 4 * per_layer
    assert lora.get_nb_trainable_parameters()[0] == 4 * 8 * (32 + 32)
    perturb(krona.adapter_parameters("default"))
    for layer in layers:  # the update is a Kronecker product of full rank, beyond r = 8
        a, b = layer.krona_A["default"], layer.krona_B["default"]
        torch.testing.assert_close(layer.delta_weight("default"), torch.kron(a, b))
        assert torch.linalg.matrix_rank(layer.delta_weight("default").detach().double()) == 32


def test_gpt2_conv1d_update_and_exact_merge():
    base = tiny_gpt2()
    pm = get_peft_model(tiny_gpt2(), KronAConfig(scale=2.0))
    layers = _layers(pm)
    assert layers and all(l.transposed for l in layers)
    c_attn = layers[0]  # 32 -> 96 (fused q, k, v)
    assert c_attn.krona_A["default"].shape == (8, 4) and c_attn.krona_B["default"].shape == (12, 8)
    perturb(pm.adapter_parameters("default"))
    x = torch.randn(2, 5, 32)
    a, b = c_attn.krona_A["default"], c_attn.krona_B["default"]
    torch.testing.assert_close(c_attn(x), c_attn.base_layer(x) + 2.0 * x @ torch.kron(a, b).T)
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        before = pm(**inputs).logits
        merged = pm.merge_and_unload()
        after = merged(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    weight = dict(merged.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    original = dict(base.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(weight - original, 2.0 * torch.kron(a, b).T.detach())


def test_merge_unmerge_restores_weights():
    pm = get_peft_model(tiny_bert(), KronAConfig(a1=8, a2=2))
    perturb(pm.adapter_parameters("default"))
    inputs = model_inputs("bert")
    layer = _layers(pm)[0]
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        live = pm(**inputs).logits
        pm.merge_adapter()
        torch.testing.assert_close(pm(**inputs).logits, live, atol=1e-4, rtol=1e-4)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(**inputs).logits, live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0)


def test_factor_size_that_does_not_divide_is_refused_before_anything_changes():
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError, match=r"query.*32 x 32.*a1=5 does not divide its out dimension 32"):
        get_peft_model(model, KronAConfig(a1=5))
    # The first targeted layer (intermediate.dense, out 64) accepts a1=64; the next (output.dense,
    # out 32) does not: no layer of the model may be wrapped when the call fails.
    with pytest.raises(PeftlabError, match=r"layer\.0\.output\.dense \(weight out x in = 32 x 64\): a1=64"):
        get_peft_model(model, KronAConfig(a1=64, targets=r"re:.*layer\.\d+\.(intermediate|output)\.dense"))
    assert not any(isinstance(m, KronALayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    pm = get_peft_model(tiny_bert(), KronAConfig(a1=64, a2=32, targets=r"re:.*layer\.\d+\.intermediate\.dense"))
    assert _layers(pm)[0].krona_A["default"].shape == (64, 32)
    for bad in ({"a1": 0}, {"a2": -2}, {"scale": 0.0}, {"dropout": 1.0}, {"a1": 2.5}, {"a1": True}):
        with pytest.raises(PeftlabError):
            KronAConfig(**bad)


def test_save_load_peftlab_form_strict_and_equal(tmp_path):
    pm = get_peft_model(tiny_bert(), KronAConfig(a1=2, scale=1.5))
    perturb(pm.adapter_parameters("default"))
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["method"] == "krona" and "peft_type" not in data and data["a1"] == 2
    keys = sorted(pm.adapter_state_dict("default"))
    assert keys and all(k.endswith(("krona_A", "krona_B")) for k in keys)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, pm(**inputs).logits)
    # Strict: a checkpoint of other factor sizes does not load into this config's shapes.
    other = get_peft_model(tiny_bert(), KronAConfig(a1=4, scale=1.5))
    with pytest.raises(Exception):
        other.load_adapter_state_dict("default", pm.adapter_state_dict("default"))


def test_two_adapters_with_different_factor_sizes():
    pm = get_peft_model(tiny_bert(), KronAConfig(a1=2, a2=16))
    pm.add_adapter("other", KronAConfig(a1=16, a2=2))
    layer = _layers(pm)[0]
    assert layer.krona_A["default"].shape == (2, 16) and layer.krona_A["other"].shape == (16, 2)
    assert layer.krona_B["default"].shape == (16, 2) and layer.krona_B["other"].shape == (2, 16)
    perturb(pm.adapter_parameters("default"), seed=1)
    perturb(pm.adapter_parameters("other"), seed=2)
    x = torch.randn(3, 32)
    pm.set_adapter("other")
    a, b = layer.krona_A["other"], layer.krona_B["other"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ torch.kron(a, b).T)
    pm.delete_adapter("default")
    assert "default" not in layer.krona_A


def test_dropout_applies_to_the_adapter_input_only():
    layer = _layer(a1=3, a2=4, dropout=0.5)
    perturb(layer.adapter_parameters("default"))
    x = torch.randn(4, 20)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    kept = layer.krona_dropout["default"](x)
    a, b = layer.krona_A["default"], layer.krona_B["default"]
    torch.testing.assert_close(out, layer.base_layer(x) + kept @ torch.kron(a, b).T)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ torch.kron(a, b).T)
