"""LoRAPrune: what makes it more than LoRA. The channel importance is the paper's LoRA-gradient Taylor
estimate, checked by hand from W, A, B and their gradients; the base weight keeps no gradient; the
pruned share follows the cubic schedule to its target; pruned channels contribute exactly nothing;
the mask is saved and loaded strictly, lives in the adapter (disabled -> unpruned model) and is
merged exactly."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.methods.reparameterized.lora import LoraConfig
from peftlab.methods.reparameterized.loraprune import (LoraPruneConfig, LoraPruneLayer, cubic_ratio, final_step,
                                                      lora_importance, pruned_share)

from ...conftest import labelled_batches, main_output, model_inputs, tiny_bert


def _layers(pm) -> list[LoraPruneLayer]:
    return [m for m in pm.modules() if isinstance(m, LoraPruneLayer)]


def _train(pm, steps: int, lr: float = 1e-2) -> None:
    pm.begin_training(None, total_steps=steps)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    for batch in labelled_batches(steps, seed=3):
        loss = pm(**batch).loss
        loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    pm.eval()


@pytest.mark.parametrize("bad", [dict(prune_ratio=1.0), dict(prune_ratio=-0.1), dict(prune_every=0),
                                 dict(init_ratio=0.6), dict(warmup=1.0), dict(cooldown=0.95),
                                 dict(importance_beta=1.0), dict(dropout=0.1)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        LoraPruneConfig(**bad)


def test_cubic_schedule_is_the_reference_one():
    c = LoraPruneConfig(prune_ratio=0.5, init_ratio=0.1, warmup=0.1, cooldown=0.1)
    assert cubic_ratio(10, 100, c) == 0.1 and cubic_ratio(91, 100, c) == 0.5
    assert cubic_ratio(50, 100, c) == pytest.approx(0.5 + (0.1 - 0.5) * (1 - 40 / 80) ** 3)
    assert final_step(100, c) == 91 and final_step(5, LoraPruneConfig(cooldown=0.0)) == 4


def test_importance_formula_on_a_tiny_layer_every_term_counts():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(4, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    ga, gb = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    got = lora_importance(w, a, b, ga, gb, 2.0)
    rows = [sum(abs((w[i, j] + 2.0 * (b[i] @ a[:, j])) * (gb[i] @ a[:, j] + b[i] @ ga[:, j] - gb[i] @ ga[:, j]))
                for j in range(6)) for i in range(4)]
    want = torch.stack(rows) / torch.stack(rows).norm()
    assert torch.allclose(got, want, rtol=1e-5)
    # Neighbours give other scores: without the second-order term, or the base weight's own |W| alone.
    no_cross = ((w + 2.0 * b @ a) * (gb @ a + b @ ga)).abs().sum(1)
    assert not torch.allclose(got, no_cross / no_cross.norm(), rtol=1e-2)
    assert not torch.allclose(got, w.abs().sum(1) / w.abs().sum(1).norm(), rtol=1e-2)


def test_importance_is_the_lora_gradient_taylor_estimate_by_hand_and_the_base_has_no_grad():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), LoraPruneConfig(prune_every=1000, importance_beta=0.5))
    torch.manual_seed(0)
    layer = _layers(pm)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init would hide the B dL/dA term
    pm.begin_training(None, total_steps=100)
    pm.train()
    grads = []
    for batch in labelled_batches(2, seed=1):
        pm(**batch).loss.backward()
        w = layer.base_layer.weight
        assert w.grad is None and not w.requires_grad  # the estimate needs LoRA's gradients only
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.settings["default"]
        # By hand: |(W + s B A) ⊙ (dL/dB A + B dL/dA - dL/dB dL/dA)| summed over each row, over its norm.
        by_hand = ((w + s * b @ a) * (b.grad @ a + b @ a.grad - b.grad @ a.grad)).abs().sum(1).detach()
        by_hand = by_hand / by_hand.norm()
        grads.append(by_hand)
        assert torch.allclose(lora_importance(w, a, b, a.grad, b.grad, s), by_hand, rtol=1e-3, atol=1e-6)
        pm.optimizer_step(torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.0))
        pm.zero_grad()
    # The moving average starts from zero (as the reference's): 0.5 (0.5 I_1) + 0.5 I_2.
    assert torch.allclose(layer._importance["default"], 0.25 * grads[0] + 0.5 * grads[1], rtol=1e-3, atol=1e-6)


def test_pruned_share_follows_the_schedule_to_the_target_and_lowest_importance_channels_go():
    config = LoraPruneConfig(prune_ratio=0.5, init_ratio=0.1, warmup=0.1, cooldown=0.1, prune_every=2)
    pm = get_peft_model(tiny_bert(), config)
    pm.begin_training(None, total_steps=10)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    shares = []
    for step, batch in enumerate(labelled_batches(10, seed=3)):
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
        if step == 0:  # warmup: nothing pruned yet
            assert pruned_share(pm, "default") == 0.0
        if step == 2:  # the first pruning step: the cubic share, lowest moving averages masked
            for m in _layers(pm):
                keep = m.prune_mask["default"]
                want = int(cubic_ratio(2, 10, config) * m.out_features + 1e-9)
                assert want > 0 and int((~keep).sum()) == want
                score = m._importance["default"]
                assert score[~keep].max() <= score[keep].min()
        shares.append(pruned_share(pm, "default"))
    assert shares == sorted(shares)  # masks only grow
    assert shares[8] < 0.5 and shares[9] == pytest.approx(0.5)  # the target, reached at the final step
    for m in _layers(pm):
        assert int((~m.prune_mask["default"]).sum()) == m.out_features // 2


def test_pruned_channels_contribute_nothing_disable_gives_the_unpruned_model_and_merge_is_exact():
    base_model = tiny_bert()
    x = model_inputs("bert")
    with torch.no_grad():
        reference = main_output(base_model(**x))
    pm = get_peft_model(base_model, LoraPruneConfig(prune_ratio=0.5, prune_every=1, warmup=0.0, cooldown=0.0))
    _train(pm, 3)
    layer = _layers(pm)[0]
    keep = layer.prune_mask["default"]
    assert keep.dtype == torch.bool and keep.shape == (layer.out_features,)
    # A pruned channel outputs exactly zero (weight, bias and LoRA update), whatever the input.
    h = torch.randn(5, layer.in_features)
    with torch.no_grad():
        out = layer(h)
    assert bool((~keep).any()) and torch.equal(out[:, ~keep], torch.zeros(5, int((~keep).sum())))
    assert bool((out[:, keep] != 0).all())
    # The pretrained weight was not touched: disabling the adapter gives the unpruned model.
    with torch.no_grad(), pm.disable_adapter():
        assert torch.allclose(main_output(pm(**x)), reference, atol=1e-6)
        unpruned_layer = layer(h)
    assert not torch.allclose(unpruned_layer, out)
    with torch.no_grad():
        unmerged = main_output(pm(**x))
        w0, b0 = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
        pm.merge_adapter()
        assert torch.equal(layer.base_layer.weight[~keep], torch.zeros_like(w0[~keep]))
        assert torch.equal(layer.base_layer.bias[~keep], torch.zeros_like(b0[~keep]))
        assert torch.allclose(main_output(pm(**x)), unmerged, atol=1e-5)
        pm.unmerge_adapter()
        assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
        assert torch.equal(layer.base_layer.weight[~keep], w0[~keep]) and torch.equal(layer.base_layer.bias, b0)


def test_the_mask_is_saved_and_loaded_strictly(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraPruneConfig(prune_ratio=0.25, prune_every=1, warmup=0.0, cooldown=0.0))
    _train(pm, 2)
    x = model_inputs("bert")
    with torch.no_grad():
        expected = main_output(pm(**x))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    for a, b in zip(_layers(pm), _layers(loaded)):
        assert torch.equal(a.prune_mask["default"], b.prune_mask["default"])
    with torch.no_grad():
        assert torch.allclose(main_output(loaded(**x)), expected, atol=1e-6)


def test_plain_lora_trained_the_same_way_keeps_every_channel():
    """The neighbour: LoRA on the same targets, trained on the same batches, still computes the
    channels LoRAPrune masked (so the exact-zero check above would fail for it)."""
    pruned = get_peft_model(tiny_bert(), LoraPruneConfig(prune_ratio=0.5, prune_every=1, warmup=0.0, cooldown=0.0))
    _train(pruned, 3)
    plain = get_peft_model(tiny_bert(), LoraConfig(targets="all-linear"))
    _train(plain, 3)
    keep = _layers(pruned)[0].prune_mask["default"]
    layer = next(m for m in plain.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert not isinstance(layer, LoraPruneLayer)
    h = torch.randn(5, layer.in_features)
    with torch.no_grad():
        out = layer(h)
    assert bool((out[:, ~keep].abs() > 0).all())


def test_training_without_a_step_count_is_refused():
    pm = get_peft_model(tiny_bert(), LoraPruneConfig())
    pm.begin_training(None, total_steps=None)
    pm.train()
    batch = labelled_batches(1)[0]
    pm(**batch).loss.backward()
    with pytest.raises(PeftlabError, match="total_steps"):
        pm.optimizer_step(torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1))
