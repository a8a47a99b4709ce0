"""AdapterFusion: an attention over frozen task adapters' outputs, the only thing that trains."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, SequentialAdapterConfig, get_peft_model
from peftlab.methods.additive.adapter_fusion import AdapterFusionConfig, FusionLayer

from ...conftest import tiny_bert

AFTER_FFN = SequentialAdapterConfig(bottleneck=4, targets=("@ffn_out",))


def _fused(seed=0):
    pm = get_peft_model(tiny_bert(), AFTER_FFN, "a")
    pm.add_adapter("b", AFTER_FFN)
    pm.add_adapter("c", AFTER_FFN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in "abc":
            for p in pm.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.add_adapter("fusion", AdapterFusionConfig(adapters=("a", "b", "c"), modules_to_save=("classifier",)))
    pm.set_adapter("fusion")
    return pm


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}


def test_a_site_computes_the_attention_over_adapter_outputs_by_hand():
    pm = _fused()
    sites = [m for _, m in pm.base_model.named_modules() if isinstance(m, FusionLayer)]
    assert len(sites) == 2  # the FFN output of each of the two layers
    site = sites[0]
    with torch.no_grad():
        fusion = site.fusion["fusion"]
        fusion.query.weight.normal_(std=0.3)  # sharpen the attention so a wrong formula shows
        fusion.key.weight.normal_(std=0.3)
        fusion.value.weight.add_(torch.randn_like(fusion.value.weight) * 0.1)
        x = torch.randn(2, 5, 64)
        h = site.base_layer.base_layer(x)  # the FFN output projection, before any adapter
        z = torch.stack([h + site.base_layer.bottleneck[n](h) for n in "abc"], dim=-2)  # (2, 5, 3, 32)
        q = h @ fusion.query.weight.T + fusion.query.bias
        k = z @ fusion.key.weight.T + fusion.key.bias
        weights = torch.softmax((q.unsqueeze(-2) * k).sum(-1), dim=-1)  # (2, 5, 3)
        v = z @ fusion.value.weight.T + fusion.value.bias
        expected = (weights.unsqueeze(-1) * v).sum(-2)
        torch.testing.assert_close(site(x), expected)


def test_the_fusion_sees_every_adapter_and_only_the_fusion_trains():
    pm = _fused()
    batch = _batch()
    pm.eval()
    with torch.no_grad():
        before = pm(**batch).logits
    for name in "abc":  # each fused adapter's output reaches the result
        params = pm.adapter_parameters(name)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(0.5)
            assert not torch.allclose(pm(**batch).logits, before), f"adapter {name} does not reach the output"
            for p, s in zip(params, saved):
                p.copy_(s)
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in pm.adapter_parameters("fusion")}
    pm.train()
    pm(**batch).loss.backward()
    assert all(p.grad is None for name in "abc" for p in pm.adapter_parameters(name))
    assert all(p.grad is not None for p in pm.adapter_parameters("fusion"))


def test_the_value_regulariser_is_in_the_training_loss():
    pm = _fused()
    with torch.no_grad():
        for site in (m for _, m in pm.base_model.named_modules() if isinstance(m, FusionLayer)):
            site.fusion["fusion"].value.weight.add_(0.01)
    pm.train()
    pm.begin_training(None, total_steps=1)
    torch.manual_seed(0)
    with_term = pm(**_batch()).loss
    torch.manual_seed(0)
    with torch.no_grad():
        task = pm(**_batch()).loss
    expected = 0.01 * sum((torch.eye(32) - m.fusion["fusion"].value.weight).pow(2).sum()
                          for _, m in pm.base_model.named_modules() if isinstance(m, FusionLayer))
    torch.testing.assert_close(with_term - task, expected)


def test_fused_adapters_cannot_go_missing(tmp_path):
    pm = _fused()
    with pytest.raises(PeftlabError, match=r"'a' is used by \['fusion'\]"):
        pm.delete_adapter("a")
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftlabError, match=r"builds on adapters \['a', 'b', 'c'\]"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "fusion", adapter_name="fusion")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path / "c", "c")
    loaded.load_adapter(tmp_path / "fusion", "fusion")
    loaded.set_adapter("fusion")
    pm.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch()).logits, pm(**_batch()).logits)
    with pytest.raises(PeftlabError, match="adapters is empty"):
        pm.add_adapter("empty", AdapterFusionConfig())
    with pytest.raises(PeftlabError, match="adapters"):
        AdapterFusionConfig(adapters=("a",))
