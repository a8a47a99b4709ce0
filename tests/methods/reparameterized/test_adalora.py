"""AdaLoRA: what makes it more than LoRA. The orthogonality regulariser is in the training loss (checked
against the formula by hand); the number of non-zero singular values follows the cubic budget
schedule and the kept triplets are the best by importance scores computed by hand; the final ranks
survive save/load; checkpoints move between peftlab and HF peft with equal outputs, both ways."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.reparameterized.adalora import AdaLoraConfig, AdaLoraLayer

from ...conftest import labelled_batches, perturb, tiny_bert, tiny_gpt2

N_MATRICES = 4  # tiny BERT: query and value of 2 layers


def _layers(model: torch.nn.Module) -> dict[str, AdaLoraLayer]:
    return {path.replace("base_model.", "", 1): m for path, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def _nonzero_singular_values(pm: PeftModel) -> int:
    return sum(int((layer.lora_E["default"] != 0).sum()) for layer in _layers(pm).values())


@pytest.mark.parametrize("bad", [dict(init_r=0), dict(target_r=13), dict(target_r=0), dict(tinit=-1), dict(deltaT=0),
                                 dict(beta1=1.0), dict(beta2=0.0), dict(orth_reg_weight=-0.1), dict(alpha=0),
                                 dict(dropout=1.0), dict(total_step=0), dict(rank_pattern={"x.lora_E": [True]})])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        AdaLoraConfig(**bad)


def test_a_schedule_without_a_budget_phase_is_refused():
    with pytest.raises(PeftlabError, match="tinit < total_step - tfinal"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(tinit=5))
    with pytest.raises(PeftlabError, match="tinit < total_step - tfinal"):
        pm.begin_training(None, total_steps=5)


def test_the_total_step_count_is_required_and_taken_from_begin_training():
    pm = get_peft_model(tiny_bert(), AdaLoraConfig())
    with pytest.raises(PeftlabError, match="total_step"):
        pm.begin_training(None, total_steps=None)
    pm.begin_training(None, total_steps=7)
    assert pm.peft_configs["default"].total_step == 7  # written into the config that is saved


def test_config_round_trips_and_takes_peft_names():
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=16, lora_dropout=0.1, target_modules=["query"],
                           total_step=20, rank_pattern={"a.lora_E": [True, False] * 3})
    assert config.alpha == 16 and config.dropout == 0.1 and config.targets == ("query",)
    assert config_from_dict(config.to_dict()) == config
    peft_form = config.peft_fields()
    assert peft_form["peft_type"] == "ADALORA" and peft_form["lora_alpha"] == 16
    assert config_from_dict(json.loads(json.dumps(peft_form))) == config


def test_identity_at_init_with_the_svd_shapes():
    base = tiny_bert()
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=5, target_r=2))
    batch = labelled_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, base(**batch).logits)
    layers = _layers(pm)
    assert len(layers) == N_MATRICES
    for layer in layers.values():
        assert layer.lora_A["default"].shape == (5, 32)  # Q: r x in
        assert layer.lora_E["default"].shape == (5, 1)  # Λ: the diagonal
        assert layer.lora_B["default"].shape == (32, 5)  # P: out x r
        assert not layer.lora_E["default"].any()


def _orthogonality_by_hand(pm: PeftModel) -> torch.Tensor:
    norms = []
    for layer in _layers(pm).values():
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        for gram in (q @ q.T, p.T @ p):
            norms.append(((gram - torch.eye(gram.shape[0])) ** 2).sum().sqrt())
    return sum(norms) / len(norms)


def test_the_orthogonality_regulariser_is_in_the_training_loss():
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=4, target_r=2, orth_reg_weight=0.3))
    pm.train()
    pm.begin_training(None, total_steps=10)
    batch = labelled_batches(1)[0]
    torch.manual_seed(0)
    loss = pm(**batch).loss
    torch.manual_seed(0)  # the same dropout draws
    task = pm.base_model(**batch).loss  # the wrapped model alone: the task loss without the term
    expected = 0.3 * _orthogonality_by_hand(pm)
    torch.testing.assert_close(loss - task, expected)
    # At init Λ = 0, so the task loss gives P and Q no gradient: all of theirs is the regulariser's.
    loss.backward()
    q = next(iter(_layers(pm).values())).lora_A["default"]
    (by_hand,) = torch.autograd.grad(0.3 * _orthogonality_by_hand(pm), [q])
    assert q.grad.abs().max() > 0
    torch.testing.assert_close(q.grad, by_hand)


def test_no_regulariser_when_its_weight_is_zero():
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(orth_reg_weight=0.0))
    pm.train()
    pm.begin_training(None, total_steps=10)
    batch = labelled_batches(1)[0]
    torch.manual_seed(0)
    loss = pm(**batch).loss
    torch.manual_seed(0)
    torch.testing.assert_close(loss, pm.base_model(**batch).loss)


def _budget_by_hand(step: int, init: int, target: int, tinit: int, tfinal: int, total: int) -> int:
    if step <= tinit:
        return init
    if step >= total - tfinal:
        return target
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12, beta1=0.85, beta2=0.85)


def _train_with_schedule(pm: PeftModel, check_scores: bool = True) -> list[int]:
    """Train SCHEDULE's steps; return the count of non-zero Λ entries after each step, and check at
    every allocation that the kept triplets are the best by importance scores computed by hand."""
    c = SCHEDULE
    layers = list(_layers(pm).values())
    params = [[layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]] for layer in layers]
    ema = [[torch.zeros_like(p) for p in group] for group in params]
    unc = [[torch.zeros_like(p) for p in group] for group in params]
    optimizer = torch.optim.AdamW(pm.param_groups(lr=2e-2))
    pm.train()
    pm.begin_training(None, total_steps=c["total_step"])
    counts = []
    for step, batch in enumerate(labelled_batches(c["total_step"])):
        pm(**batch).loss.backward()
        if step < c["total_step"] - c["tfinal"]:  # by hand: sensitivity |w * grad|, smoothed, with uncertainty
            for i, group in enumerate(params):
                for j, p in enumerate(group):
                    s = (p * p.grad).abs().detach()
                    ema[i][j] = c["beta1"] * ema[i][j] + (1 - c["beta1"]) * s
                    unc[i][j] = c["beta2"] * unc[i][j] + (1 - c["beta2"]) * (s - ema[i][j]).abs()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
        counts.append(_nonzero_singular_values(pm))
        budget = _budget_by_hand(step, c["init_r"] * N_MATRICES, c["target_r"] * N_MATRICES, c["tinit"], c["tfinal"],
                                 c["total_step"])
        if check_scores and c["tinit"] < step <= c["total_step"] - c["tfinal"]:  # an allocation step
            scores = torch.cat([(ema[i][1] * unc[i][1]).view(-1) + (ema[i][0] * unc[i][0]).mean(1)
                                + (ema[i][2] * unc[i][2]).mean(0) for i in range(len(params))])
            chosen = scores > scores.kthvalue(scores.numel() - budget).values
            nonzero = torch.cat([(group[1] != 0).view(-1) for group in params])
            assert torch.equal(nonzero, chosen), f"step {step}: kept triplets are not the best-scoring ones"
    return counts


def test_ranks_follow_the_cubic_budget_schedule_to_the_target():
    c = SCHEDULE
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=c["init_r"], target_r=c["target_r"], tinit=c["tinit"],
                                                   tfinal=c["tfinal"], total_step=c["total_step"]))
    counts = _train_with_schedule(pm)
    expected = [_budget_by_hand(step, c["init_r"] * N_MATRICES, c["target_r"] * N_MATRICES, c["tinit"], c["tfinal"],
                                c["total_step"]) for step in range(c["total_step"])]
    assert expected[:4] == [16, 16, 16, 13] and expected[-4:] == [8, 8, 8, 8]  # warm-up, cubic descent, final
    assert counts == expected
    assert counts[-1] == c["target_r"] * N_MATRICES
    pattern = pm.peft_configs["default"].rank_pattern
    assert pattern is not None and sorted(pattern) == sorted(f"{path}.lora_E" for path in _layers(pm))
    assert all(len(kept) == c["init_r"] for kept in pattern.values())
    assert sum(sum(kept) for kept in pattern.values()) == c["target_r"] * N_MATRICES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT trained through the whole schedule, saved; (model, folder)."""
    c = SCHEDULE
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=c["init_r"], target_r=c["target_r"], tinit=c["tinit"],
                                                   tfinal=c["tfinal"], total_step=c["total_step"]))
    _train_with_schedule(pm, check_scores=False)
    pm.eval()
    folder = tmp_path_factory.mktemp("adalora")
    pm.save_pretrained(folder)
    return pm, folder


def test_save_load_keeps_the_allocated_ranks(trained):
    pm, folder = trained
    pattern = pm.peft_configs["default"].rank_pattern
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == SCHEDULE["total_step"]
    assert {k: tuple(v) for k, v in saved["rank_pattern"].items()} == pattern
    state = pm.adapter_state_dict()
    for path in _layers(pm):  # peft's layout: only the kept triplets
        rank = sum(pattern[f"{path}.lora_E"])
        assert state[f"base_model.model.{path}.lora_A"].shape == (rank, 32)
        assert state[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
        assert state[f"base_model.model.{path}.lora_B"].shape == (32, rank)
    loaded = PeftModel.from_pretrained(tiny_bert(), folder)
    assert {p: layer.rank("default") for p, layer in _layers(loaded).items()} == \
        {p: sum(pattern[f"{p}.lora_E"]) for p in _layers(pm)}
    assert _nonzero_singular_values(loaded) == SCHEDULE["target_r"] * N_MATRICES
    batch = labelled_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
    # The in-memory model loads its own checkpoint back (into its full-size, pruned tensors).
    pm.load_adapter_state_dict("default", loaded.adapter_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
    # Training a loaded allocation goes on at its ranks.
    again = PeftModel.from_pretrained(tiny_bert(), folder, is_trainable=True)
    again.train()
    again.begin_training(None, total_steps=2)
    optimizer = torch.optim.AdamW(again.param_groups(lr=1e-2))
    for batch in labelled_batches(2):
        again(**batch).loss.backward()
        again.optimizer_step(optimizer)
        optimizer.zero_grad()
    assert {p: layer.rank("default") for p, layer in _layers(again).items()} == \
        {p: layer.rank("default") for p, layer in _layers(loaded).items()}


def test_merge_equals_the_unmerged_update(trained):
    pm, folder = trained
    loaded = PeftModel.from_pretrained(tiny_bert(), folder)
    batch = labelled_batches(1, seed=3)[0]
    with torch.no_grad():
        expected = loaded(**batch).logits
        plain = loaded.merge_and_unload()
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)


# -- HF peft parity --------------------------------------------------------------------------------
def _peft():
    return pytest.importorskip("peft", reason="HF peft is a test extra: pip install -e .[test]")


# peft's generic injection warns about every AdaLoRA rank_pattern key (they name '<module>.lora_E', not a
# module), its own checkpoints' too; peft's AdaLoRA loader then applies the pattern all the same.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_a_trained_allocation_loads_in_peft_with_equal_outputs(trained):
    peft = _peft()
    pm, folder = trained
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), folder).eval()
    batch = labelled_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, pm(**batch).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn", "c_proj"])],
                         ids=["bert", "gpt2"])
def test_peftlab_adapter_loads_in_peft_and_back(tmp_path, make, targets):
    peft = _peft()
    ours = get_peft_model(make(), AdaLoraConfig(init_r=6, target_r=3, alpha=16, targets=targets, total_step=10))
    perturb(ours.adapter_parameters("default"), scale=0.2)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(make(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        # peft merges a Conv1D update transposed only with fan_in_fan_out, which peftlab writes.
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_peft_trained_allocation_loads_in_peftlab_with_equal_outputs(tmp_path):
    peft = _peft()
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, lora_alpha=8,
                                target_modules=["query", "value"])
    theirs = peft.get_peft_model(tiny_bert(), config)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    theirs.train()
    for step, batch in enumerate(labelled_batches(6)):  # peft's documented loop
        theirs(**batch).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and sum(sum(v) for v in saved["rank_pattern"].values()) == 2 * N_MATRICES
    ours = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert sum(layer.rank("default") for layer in _layers(ours).values()) == 2 * N_MATRICES
    batch = labelled_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-4)


def test_a_peft_checkpoint_with_a_feature_peftlab_lacks_is_refused(tmp_path):
    ours = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=2, target_r=1, total_step=5))
    ours.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_to_transform": [0]}))
    with pytest.raises(PeftlabError, match="layers_to_transform"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
