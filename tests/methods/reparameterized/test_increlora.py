"""IncreLoRA: what makes it more than LoRA / AdaLoRA. Ranks GROW: after the warm-up, every deltaT steps
the top_h modules by importance (mean AdaLoRA triplet score over the module's active components, the
scores recomputed here by hand) gain components, until the budget target_r * n is reached, never
exceeded; unused preallocated components are exactly zero, contribute nothing and get no update;
reserved components (advance learning) train P and Q but not Λ; the final ranks survive save/load."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.methods.reparameterized.increlora import (ACTIVE, RESERVED, UNUSED, IncreLoraConfig, IncreLoraLayer,
                                                       growth_due)

from ...conftest import labelled_batches, tiny_bert, tiny_gpt2


def _layers(pm: torch.nn.Module) -> list[IncreLoraLayer]:
    return [m for m in pm.modules() if isinstance(m, IncreLoraLayer)]


def _ranks(pm: torch.nn.Module) -> list[tuple[int, int]]:
    return [layer.ranks("default") for layer in _layers(pm)]


@pytest.mark.parametrize("bad", [dict(init_r=0), dict(incre_rank_num=0), dict(max_r=1), dict(target_r=9),
                                 dict(target_r=3, max_r=2, init_r=1, advance_learn=False), dict(top_h=0),
                                 dict(tinit=-1), dict(deltaT=0), dict(beta1=1.0), dict(beta2=0.0),
                                 dict(orth_reg_weight=-1.0), dict(alpha=0), dict(dropout=1.0)])
def test_bad_config_is_refused_with_the_field_named(bad):
    field = "target_r" if "target_r" in bad else next(iter(bad))
    with pytest.raises(PeftlabError, match=f"{field}={bad[field]!r}"):
        IncreLoraConfig(**bad)


def test_a_budget_above_the_preallocated_total_is_refused_naming_the_value():
    with pytest.raises(PeftlabError, match=r"target_r=9 is invalid.*max_r=8"):
        IncreLoraConfig(target_r=9, max_r=8)


def test_start_state_preallocation_and_scale():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), IncreLoraConfig(init_r=2, incre_rank_num=2, max_r=6, target_r=4, alpha=6))
    for layer in _layers(pm):
        state = layer.increlora_state["default"].tolist()
        assert state == [ACTIVE, ACTIVE, RESERVED, RESERVED, UNUSED, UNUSED]
        assert layer.lora_A["default"].shape[0] == 6
        assert torch.all(layer.lora_E["default"] == 0)
        assert torch.all(layer.lora_A["default"][4:] == 0) and torch.all(layer.lora_B["default"][:, 4:] == 0)
        assert float(layer.lora_A["default"][:4].detach().std()) == pytest.approx(0.02, rel=0.2)
        # update = alpha / active rank * P diag(Λ_eff) Q, Λ_eff: active Λ, reserved 1e-5, unused 0
        with torch.no_grad():
            layer.lora_E["default"].copy_(torch.arange(1.0, 7.0).view(6, 1))
        e = torch.tensor([1.0, 2.0, 1e-5, 1e-5, 0.0, 0.0]).view(6, 1)
        expected = layer.lora_B["default"] @ (layer.lora_A["default"] * e) * (6 / 2)
        torch.testing.assert_close(layer.delta_weight("default"), expected)
        # trainable count reports active components (P, Q, Λ) and the reserved P, Q only
        n_in, n_out = layer.in_features, layer.out_features
        assert layer.trainable_entries("default") == 2 * (n_in + n_out + 1) + 2 * (n_in + n_out)


CFG = dict(init_r=1, target_r=3, max_r=5, incre_rank_num=2, top_h=2, tinit=1, deltaT=2, beta1=0.85, beta2=0.85)


def _train(pm: PeftModel, steps: int, check: bool = True, weight_decay: float = 0.1, lm: bool = False) -> list[list[tuple[int, int]]]:
    """Train ``steps`` steps with AdamW; mirror the importance scores by hand and check every growth:
    when it happens, which modules gain, by how much, and that the budget is never exceeded."""
    c = pm.peft_configs["default"]
    layers = _layers(pm)
    budget = c.target_r * len(layers)
    params = [[layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]] for layer in layers]
    ema = [[torch.zeros_like(p) for p in group] for group in params]
    unc = [[torch.zeros_like(p) for p in group] for group in params]
    opt = torch.optim.AdamW(pm.adapter_parameters("default"), lr=1e-2, weight_decay=weight_decay)
    history = []
    pm.train()
    pm.begin_training(None, total_steps=steps)
    for step, batch in enumerate(labelled_batches(steps)):
        if lm:  # a causal LM learns its own tokens
            batch = dict(batch, labels=batch["input_ids"])
        before = _ranks(pm)
        states = [layer.increlora_state["default"].clone() for layer in layers]
        pm(**batch).loss.backward()
        growing = sum(a for a, _ in before) < budget
        if growing:
            for g, group in enumerate(params):
                for j, p in enumerate(group):
                    s = (p * p.grad).abs().detach()
                    ema[g][j] = c.beta1 * ema[g][j] + (1 - c.beta1) * s
                    unc[g][j] = c.beta2 * unc[g][j] + (1 - c.beta2) * (s - ema[g][j]).abs()
        scores = []
        for g, state in enumerate(states):
            sc = [(ema[g][j] * unc[g][j]) for j in range(3)]
            triplet = sc[1].view(-1) + sc[0].mean(1) + sc[2].mean(0)
            scores.append(float(triplet[state == ACTIVE].mean()))
        old = [[p.detach().clone() for p in group] for group in params]
        pm.optimizer_step(opt)
        opt.zero_grad()
        after = _ranks(pm)
        history.append(after)
        total = sum(a for a, _ in after)
        assert total <= budget, f"step {step}: budget {budget} exceeded ({after})"
        if check:
            for g, state in enumerate(states):  # rows unused before and after the step stayed exactly zero
                unused = (state == UNUSED) & (layers[g].increlora_state["default"] == UNUSED)
                for p in params[g]:
                    rows = p[:, unused] if p is params[g][2] else p[unused]
                    assert torch.all(rows == 0)
                reserved = state == RESERVED
                grew = after[g][0] > before[g][0]
                if reserved.any() and not grew:  # reserved Λ never trains, reserved P and Q do
                    assert torch.equal(old[g][1][reserved], params[g][1].detach()[reserved])
                    assert not torch.equal(old[g][0][reserved], params[g][0].detach()[reserved])
            if not growing or not growth_due(step, c):
                assert after == before, f"step {step}: ranks changed off the schedule"
            else:
                remaining = budget - sum(a for a, _ in before)
                order = sorted(range(len(layers)), key=lambda g: -scores[g])
                expected = [a for a, _ in before]
                for g in order[:c.top_h]:
                    add = min(c.incre_rank_num, remaining, c.max_r - expected[g])
                    expected[g] += add
                    remaining -= add
                assert [a for a, _ in after] == expected, f"step {step}: grew {after} from {before}, scores {scores}"
    return history


def test_ranks_grow_on_schedule_for_the_top_scoring_modules_up_to_the_budget():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), IncreLoraConfig(**CFG))
    history = _train(pm, 12)
    totals = [sum(a for a, _ in ranks) for ranks in history]
    # growth only after steps 2, 4, 6, ... (step > tinit=1, step % 2 == 0); 4 modules, budget 12
    assert totals[:2] == [4, 4] and totals[2] == 8 and totals[3] == 8
    # 4 + 2*2 = 8, then 8 + 2*2 = 12 = budget: reached, never passed
    assert totals[4:] == [12] * 8
    # once the budget is reached the reserved components are dropped (zeroed, state unused)
    assert all(r == 0 for _, r in history[-1])
    assert max(a for a, _ in history[-1]) <= CFG["max_r"]


def test_the_last_growth_is_cut_to_the_budget():
    torch.manual_seed(1)
    cfg = dict(CFG, target_r=2, incre_rank_num=3, top_h=3, max_r=6)  # budget 8 from 4: +3, +1
    pm = get_peft_model(tiny_bert(), IncreLoraConfig(**cfg))
    history = _train(pm, 4)
    assert sum(a for a, _ in history[-1]) == 8
    assert sorted(a for a, _ in history[-1]) == [1, 1, 2, 4]


def test_without_advance_learning_new_components_start_at_zero():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), IncreLoraConfig(**dict(CFG, advance_learn=False)))
    assert all(r == 0 for _, r in _ranks(pm))
    _train(pm, 3, check=True)
    grown = [layer for layer in _layers(pm) if layer.ranks("default")[0] > 1]
    assert len(grown) == 2
    for layer in grown:  # the new rows: Gaussian P and Q, Λ = 0 (trained once it is active: not yet)
        rows = layer.increlora_state["default"] == ACTIVE
        assert torch.all(layer.lora_E["default"][rows][1:] == 0)
        assert torch.all(layer.lora_A["default"][rows][1:] != 0)


def test_unused_components_contribute_nothing():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), IncreLoraConfig(**CFG)).eval()
    batch = labelled_batches(1)[0]
    for layer in _layers(pm):
        with torch.no_grad():
            layer.lora_E["default"].normal_()
    out = pm(**batch).logits
    for layer in _layers(pm):
        unused = layer.increlora_state["default"] == UNUSED
        with torch.no_grad():
            layer.lora_A["default"][unused] = 1.0
            layer.lora_B["default"][:, unused] = 1.0
            layer.lora_E["default"][unused] = 5.0
    torch.testing.assert_close(pm(**batch).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("model_fn,steps", [(tiny_bert, 12), (tiny_bert, 3), (tiny_gpt2, 5)])
def test_save_load_keeps_ranks_and_outputs(tmp_path, model_fn, steps):
    torch.manual_seed(0)
    targets = ("c_attn",) if model_fn is tiny_gpt2 else ("@query", "@value")
    pm = get_peft_model(model_fn(), IncreLoraConfig(targets=targets, **CFG))
    _train(pm, steps, check=False, lm=model_fn is tiny_gpt2)
    pm.eval()
    pm.save_pretrained(tmp_path)
    torch.manual_seed(5)
    loaded = PeftModel.from_pretrained(model_fn(), tmp_path).eval()
    assert _ranks(loaded) == _ranks(pm)
    batch = {k: v for k, v in labelled_batches(1)[0].items() if k != "labels"}
    if model_fn is tiny_gpt2:
        batch.pop("token_type_ids", None)
    torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
