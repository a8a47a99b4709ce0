"""Threshold-Mask: the model runs with W0 * 1[s > tau]; the scores learn through the straight-through
gradient dL/dW * W0 (checked against a gradient taken by hand on the plain model); training only ever
zeroes pretrained entries (never moves them), the checkpoint is the mask as packed bits, and merging
is exact both ways."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import CheckpointError, PeftlabError, PeftModel, get_peft_model
from peftlab.core.targets import resolve_targets
from peftlab.methods.partial.threshold_mask import (ThresholdMaskConfig, ThresholdMaskLayer, pack_bits,
                                                    unpack_bits)

from ...conftest import tiny_bert


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (4, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 50).long()}


def _layers(pm):
    return {path: m for path, m in pm.base_model.named_modules() if isinstance(m, ThresholdMaskLayer)}


def _drop_some(pm, name="default", share=0.3, seed=0):
    """Push a random share of each layer's scores below the threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(pm).values():
            scores = layer.scores[name]
            scores[torch.rand(scores.shape, generator=g) < share] = -1.0


def _masked_copy(base, pm, names=("default",)):
    """The plain model with each targeted weight replaced by W0 * M1 * M2 ..., built by hand."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in _layers(pm).items():
            for name in names:
                model.get_submodule(path).weight.mul_((layer.scores[name] > 1e-2).to(torch.float32))
    return model


@pytest.mark.parametrize("bad", [dict(init_score=0.0), dict(threshold=0.5), dict(threshold="x"),
                                 dict(init_score=True)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        ThresholdMaskConfig(**bad)


def test_identity_at_init_and_default_targets():
    base, batch = tiny_bert(), _batch()
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    assert list(_layers(pm)) == resolve_targets(base, ThresholdMaskConfig().targets)
    assert all(bool((layer.scores["default"] == 0.3).all()) for layer in _layers(pm).values())
    with torch.no_grad():
        assert torch.equal(pm(**batch).logits, base(**batch).logits)


def test_straight_through_gradient_is_dl_dw_times_w0():
    batch = _batch()
    base = tiny_bert()
    paths = resolve_targets(base, ThresholdMaskConfig().targets)
    weights = [base.get_submodule(p).weight for p in paths]
    grads = torch.autograd.grad(base(**batch).loss, weights)  # at W0 = the adapter's start (M = 1)

    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    pm(**batch).loss.backward()
    layers = _layers(pm)
    for path, w0, g in zip(paths, weights, grads):
        torch.testing.assert_close(layers[path].scores["default"].grad, g * w0, rtol=1e-5, atol=1e-9)
        assert base_weight_grad_is_none(layers[path])


def base_weight_grad_is_none(layer):
    return layer.inner[0].weight.grad is None


def test_two_live_adapters_multiply_their_masks():
    base, batch = tiny_bert(), _batch()
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    pm.add_adapter("other", ThresholdMaskConfig())
    _drop_some(pm, "default", seed=0)
    _drop_some(pm, "other", seed=1)
    pm.set_adapter(["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, _masked_copy(base, pm, ("default", "other"))(**batch).logits,
                                   rtol=0, atol=1e-6)
        with pm.disable_adapter():
            assert torch.equal(pm(**batch).logits, base(**batch).logits)


def test_training_only_drops_pretrained_weights_and_moves_none():
    base = tiny_bert()
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig(init_score=2e-2))  # near tau: a few steps flip bits
    optimizer = torch.optim.Adam(pm.param_groups(lr=5e-3))
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    pm.train()
    for step in range(6):
        pm(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    layers = _layers(pm)
    dropped = sum(int((layer.scores["default"] <= 1e-2).sum()) for layer in layers.values())
    total = sum(layer.scores["default"].numel() for layer in layers.values())
    assert 0 < dropped < total, "the mask did not change (or dropped everything)"
    # Every base tensor is untouched ...
    originals = dict(base.named_parameters())
    for name, tensor in pm.base_model.named_parameters():
        if "scores" not in name:
            assert torch.equal(tensor, originals[name.replace("base_layer.", "")]), name
    # ... and the model computes exactly with W0 * M: each effective entry is W0's or 0, nothing else
    # (an additive or rescaling update would fail here).
    batch = _batch(9)
    with torch.no_grad():
        assert torch.equal(pm(**batch).logits, _masked_copy(base, pm)(**batch).logits)


def test_bits_round_trip_with_padding():
    for numel in (1, 8, 13, 64):
        mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(numel / 8)
        assert torch.equal(unpack_bits(bits, numel), mask)
    assert pack_bits(torch.tensor([True, False, True] + [False] * 5)).tolist() == [0b101]


def test_save_load_keeps_the_mask_as_bits(tmp_path):
    base, batch = tiny_bert(), _batch()
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    _drop_some(pm)
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = _layers(pm)
    assert sorted(tensors) == sorted(f"base_model.model.{p}.mask.bits" for p in layers)
    for path, layer in layers.items():
        bits = tensors[f"base_model.model.{path}.mask.bits"]
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(layer.scores["default"].numel() / 8)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        assert not torch.equal(loaded(**batch).logits, base(**batch).logits)
    for path, layer in _layers(loaded).items():
        kept = layers[path].scores["default"] > 1e-2
        assert torch.equal(layer.scores["default"], torch.where(kept, 0.3, 2e-2 - 0.3))  # +-(init - tau) around tau


def test_wrong_size_bits_are_refused_naming_the_key(tmp_path):
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(tensors))
    damaged = dict(tensors, **{key: tensors[key][:-1].clone()})
    save_file(damaged, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}.*expected \({tensors[key].numel()},\)"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_layer_refuses_wrong_dtype_and_set_padding_bits():
    layer = ThresholdMaskLayer(nn.Linear(3, 5))  # 15 entries: 2 bytes, 1 padding bit
    layer.add("default", ThresholdMaskConfig())
    with pytest.raises(CheckpointError, match="mask.bits.*2 packed bytes"):
        layer.load_adapter_state("default", {"mask.bits": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="padding"):
        layer.load_adapter_state("default", {"mask.bits": torch.tensor([255, 255], dtype=torch.uint8)})
    layer.load_adapter_state("default", {"mask.bits": torch.tensor([255, 127], dtype=torch.uint8)})
    assert bool((layer.scores["default"] > 1e-2).all())


def test_merge_is_exact_and_unmerge_restores_w0():
    base, batch = tiny_bert(), _batch()
    pm = get_peft_model(tiny_bert(), ThresholdMaskConfig())
    pm.add_adapter("other", ThresholdMaskConfig())
    _drop_some(pm, "default", seed=0)
    _drop_some(pm, "other", seed=1)
    pm.set_adapter(["default", "other"])
    with torch.no_grad():
        both = pm(**batch).logits
        pm.merge_adapter()
        assert torch.equal(pm(**batch).logits, both)
        # Out of order: "default" leaves while "other" stays merged; entries both drop stay zero.
        pm.unmerge_adapter("default")
        pm.set_adapter("other")
        assert torch.equal(pm(**batch).logits, _masked_copy(base, pm, ("other",))(**batch).logits)
        pm.unmerge_adapter()
        for path, layer in _layers(pm).items():
            assert torch.equal(layer.inner[0].weight, base.get_submodule(path).weight), "unmerge lost W0"
        pm.set_adapter("default")
        expected, hand = pm(**batch).logits, _masked_copy(base, pm)
        plain = pm.merge_and_unload()
        assert torch.equal(plain(**batch).logits, expected)
        for name, tensor in hand.named_parameters():
            assert torch.equal(dict(plain.named_parameters())[name], tensor), name
