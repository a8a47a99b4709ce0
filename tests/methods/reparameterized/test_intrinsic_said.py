"""Intrinsic SAID: d trained numbers projected onto every targeted weight by per-tensor Fastfood
blocks (H G Pi H B), one trained scale per tensor; regenerated from the seed on load."""
from __future__ import annotations

import math

import pytest
import torch

from peftlab import PeftModel, get_peft_model
from peftlab.core.errors import PeftlabError
from peftlab.methods.reparameterized.intrinsic_said import IntrinsicSaidConfig, IntrinsicSaidLayer, fwht

from ...conftest import model_inputs, perturb, tiny_bert


def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, IntrinsicSaidLayer)]


def _space(pm):
    return _layers(pm)[0].shared[0]


def _hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def test_fwht_is_the_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ _hadamard(16).T)


def test_only_the_d_numbers_train_and_the_model_starts_as_the_base():
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=200))
    layers = _layers(pm)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 200  # d - m subspace coordinates + m scales
    space = _space(pm)
    assert space.said_lambda["default"].shape == (len(layers),)
    assert space.said_theta["default"].shape == (200 - len(layers),)
    assert torch.equal(space.said_lambda["default"], torch.ones(len(layers)))
    assert not space.said_theta["default"].any()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**model_inputs("bert")).logits, tiny_bert().eval()(**model_inputs("bert")).logits)


@pytest.mark.parametrize("said,d", [(True, 64), (False, 64), (True, 1500)])  # 1500: above some tensors' size
def test_every_weight_moves_by_the_dense_fastfood_matrix(said, d):
    # Build H G Pi H B for each tensor explicitly and compare with what the layer adds to its weight.
    # LoRA (independent low-rank factors per layer) would not give these deltas.
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=d, said=said, seed=3))
    perturb(pm, scale=1.0)
    space = _space(pm)
    theta = space.said_theta["default"].detach().double()
    for index, layer in enumerate(_layers(pm)):
        block = layer.said_fastfood["default"]
        size, length = block.size, block.length
        h = _hadamard(length)
        perm = torch.eye(length, dtype=torch.float64)[block.perm]  # (Pi v)_j = v[perm[j]]
        scale = math.sqrt(length * float(block.gauss.double().pow(2).sum())) * math.sqrt(size / length)
        x = torch.cat((theta, theta.new_zeros(length - theta.numel())))
        # M x = H (G (Pi (H (B x)))), each factor an explicit dense matrix (applied right to left)
        for factor in (torch.diag(block.signs.double()), h, perm, torch.diag(block.gauss.double()), h):
            x = factor @ x
        expected = x[:size] / scale
        if said:
            expected = expected * space.said_lambda["default"][index].double()
        weight = layer.base_layer.weight
        torch.testing.assert_close(layer.delta_weight("default").double(), expected.reshape(weight.shape).to(torch.float64),
                                   rtol=1e-4, atol=1e-6)
        inputs = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(inputs), torch.nn.functional.linear(
                inputs, weight + expected.reshape(weight.shape).float(), layer.base_layer.bias), rtol=1e-4, atol=1e-5)


def test_the_scales_and_the_shared_vector_act_on_every_tensor():
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=100, seed=1))
    perturb(pm, scale=1.0)
    layers = _layers(pm)
    before = [l.delta_weight("default").detach().clone() for l in layers]
    with torch.no_grad():
        _space(pm).said_lambda["default"][2] *= 3.0
    after = [l.delta_weight("default").detach() for l in layers]
    for i, (b, a) in enumerate(zip(before, after)):
        torch.testing.assert_close(a, b * (3.0 if i == 2 else 1.0))
    with torch.no_grad():
        _space(pm).said_theta["default"][0] += 1.0
    assert all(not torch.equal(a, l.delta_weight("default")) for a, l in zip(after, layers))  # one coordinate moves all


def test_gradients_reach_only_theta_and_the_scales():
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=100))
    perturb(pm, scale=1.0)
    pm(**model_inputs("bert")).logits.sum().backward()
    space = _space(pm)
    assert space.said_theta["default"].grad.abs().sum() > 0 and space.said_lambda["default"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)


def test_a_fresh_load_regenerates_the_projection_exactly(tmp_path):
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=150, seed=11))
    perturb(pm, scale=1.0)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {"said_theta", "said_lambda"}  # the Fastfood blocks are not stored
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    pm.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**model_inputs("bert")).logits, pm(**model_inputs("bert")).logits)
    other = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=150, seed=12))
    assert not torch.equal(_layers(other)[0].said_fastfood["default"].perm, _layers(pm)[0].said_fastfood["default"].perm)


def test_merge_adds_the_dense_delta():
    pm = get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=100))
    perturb(pm, scale=1.0)
    pm.eval()
    inputs = model_inputs("bert")
    layer = _layers(pm)[0]
    expected_weight = layer.base_layer.weight.detach() + layer.delta_weight("default").detach()
    with torch.no_grad():
        live = pm(**inputs).logits
        pm.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, expected_weight)
        torch.testing.assert_close(pm(**inputs).logits, live, atol=1e-5, rtol=0)


def test_d_above_the_projected_parameters_is_refused_naming_both():
    model = tiny_bert()
    total = sum(m.weight.numel() for m in [model.bert.encoder.layer[0].attention.self.query])
    with pytest.raises(PeftlabError, match=rf"d=5000.*{total} parameters"):
        get_peft_model(model, IntrinsicSaidConfig(d=5000, targets=("layer.0.attention.self.query",)))
    assert not any(isinstance(m, IntrinsicSaidLayer) for m in model.modules())  # nothing half-changed
    with pytest.raises(PeftlabError, match=r"d=3.*choose d > "):
        get_peft_model(tiny_bert(), IntrinsicSaidConfig(d=3))
    with pytest.raises(PeftlabError, match="d=0"):
        IntrinsicSaidConfig(d=0)
