import math

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer

from ...conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)
        self.emb = nn.Embedding(10, 6)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_update_rule_by_hand():
    model = Tiny()
    x_ids = torch.tensor([[1, 2, 3]])
    pm = get_peft_model(model, LoraConfig(r=2, alpha=6, targets=("proj",)))
    layer = pm.base_model.proj
    assert isinstance(layer, LoraLayer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (2, 6) and B.shape == (5, 2) and torch.all(B == 0)
    with torch.no_grad():
        B.normal_()
    x = model.emb(x_ids)
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W0.T + b0 + (6 / 2) * (x @ A.T @ B.T)
    assert torch.allclose(pm(x_ids), expected, atol=1e-6)


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=8).scaling == 0.5
    assert math.isclose(LoraConfig(r=16, alpha=8, rslora=True).scaling, 2.0)


def test_embedding_lora_looks_up_rows_of_A():
    model = Tiny()
    pm = get_peft_model(model, LoraConfig(r=3, alpha=3, targets=("emb",)))
    layer = pm.base_model.emb
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    ids = torch.tensor([[4, 7]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = layer.base_layer.weight[ids] + (A.T[ids] @ B.T)
    assert torch.allclose(layer(ids), expected, atol=1e-6)
    merged = pm.merge_and_unload()
    assert torch.allclose(merged.emb(ids), expected, atol=1e-5)


def test_gpt2_conv1d_merge_is_transposed_correctly():
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, targets=("c_attn", "c_proj")))
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.normal_(std=0.05)
    inputs = model_inputs("gpt2")
    expected = pm(**inputs).logits
    merged = pm.merge_and_unload()
    assert torch.allclose(merged(**inputs).logits, expected, atol=1e-4)


def test_dropout_applies_only_to_the_low_rank_path():
    model = Tiny()
    pm = get_peft_model(model, LoraConfig(r=2, dropout=0.5, targets=("proj",)))
    pm.train()
    ids = torch.tensor([[1, 2, 3]])
    # With B = 0 the low-rank path contributes nothing, so dropout must not change the output.
    with torch.no_grad():
        base = model.proj.base_layer(model.emb(ids))
    assert torch.allclose(pm(ids), base)


def test_training_reduces_loss_on_llama():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, targets=("@query", "@value")))
    inputs = model_inputs("llama")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(15):
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_default_placement_is_query_and_value_with_b_zero_and_kaiming_uniform_a():
    from peftlab.methods.reparameterized.lora import LoraLayer

    pm = get_peft_model(tiny_bert(), LoraConfig())
    wrapped = sorted(n.rsplit(".", 1)[-1] for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == ["query", "query", "value", "value"]
    layer = next(m for m in pm.base_model.modules() if isinstance(m, LoraLayer))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert not b.any() and a.shape == (8, 32)
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32, loralib's init
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert pm.peft_configs["default"].scaling == 2.0
