"""SAM: the mask is the top share, per tensor (or across the model), of the squared gradient summed
over the first batches — checked against a ranking computed by hand and shown to differ from the
neighbours' statistics (Child-Tuning_D's summed squared batch gradients, FISH's per-example Fisher);
the data pass leaves the base model as it was; only the chosen entries move and hold optimizer state;
the checkpoint round-trips; bad configs and missing data are refused."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.core.targets import resolve_targets
from peftlab.methods.partial.sam import SAMConfig
from peftlab.methods.partial.sparse_delta import SparseDeltaLayer

from ...conftest import labelled_batches, no_dropout, tiny_bert



def _masks(pm, name="default"):
    out = []
    for m in pm.base_model.modules():
        if isinstance(m, SparseDeltaLayer):
            for part in m.paths:
                mask = torch.zeros(m.base_tensor(part).numel(), dtype=torch.bool)
                mask[m.indices(part)[name]] = True
                out.append(mask)
    return out


def _top(scores, share, per_tensor=True):
    def top(flat):
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(int(torch.tensor(share * flat.numel()).ceil())).indices] = True
        return keep
    if per_tensor:
        return [top(s.reshape(-1)) for s in scores]
    return list(top(torch.cat([s.reshape(-1) for s in scores])).split([s.numel() for s in scores]))



@pytest.mark.parametrize("bad", [dict(keep_ratio=0), dict(keep_ratio=1.5), dict(num_batches=0),
                                 dict(num_batches=2.5), dict(per_tensor="yes")])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=f"SAMConfig.{next(iter(bad))}="):
        SAMConfig(**bad)


@pytest.mark.parametrize("per_tensor", [True, False])
def test_mask_is_the_top_squared_accumulated_gradient_computed_by_hand(per_tensor):
    config = SAMConfig(keep_ratio=0.05, num_batches=2, per_tensor=per_tensor)
    data = labelled_batches(3)  # only the first two enter the sum
    base = tiny_bert().eval()
    tensors = [t for p in resolve_targets(base, config.targets) for t in base.get_submodule(p).parameters()]
    grads = [torch.autograd.grad(base(**b).loss, tensors) for b in data[:2]]
    summed = [sum(gs) for gs in zip(*grads)]
    sam = [g * g for g in summed]
    child_d = [sum(g * g for g in gs) for gs in zip(*grads)]  # Child-Tuning_D's statistic, for contrast
    fisher = [torch.zeros_like(t) for t in tensors]  # FISH's per-example Fisher, for contrast
    for b in data[:2]:
        for i in range(4):
            ex = {k: v[i:i + 1] for k, v in b.items()}
            fisher = [f + g * g for f, g in zip(fisher, torch.autograd.grad(base(**ex).loss, tensors))]
    three = [sum(gs) ** 2 for gs in zip(*grads, torch.autograd.grad(base(**data[2]).loss, tensors))]

    pm = no_dropout(get_peft_model(tiny_bert().eval(), config))
    pm.begin_training(data, total_steps=1)
    chosen = torch.cat(_masks(pm))
    assert torch.equal(chosen, torch.cat(_top(sam, 0.05, per_tensor)))
    for other, what in [(child_d, "Child-Tuning_D"), (fisher, "FISH"), (three, "a sum over all three batches")]:
        assert not torch.equal(chosen, torch.cat(_top(other, 0.05, per_tensor))), f"cannot tell SAM from {what}"
    if per_tensor:
        assert not torch.equal(chosen, torch.cat(_top(sam, 0.05, per_tensor=False)))
    assert pm.trainable_parameters_report().trainable_entries == int(chosen.sum())


def test_data_pass_leaves_the_base_model_unchanged():
    model = tiny_bert()
    before = [(p, p.detach().clone()) for p in model.parameters()]  # the same objects once wrapped
    pm = get_peft_model(model, SAMConfig(keep_ratio=0.01))
    pm.begin_training(labelled_batches(3), total_steps=1)
    assert all(torch.equal(p, copy) for p, copy in before)
    assert all(p.grad is None for p in pm.parameters())
    assert not any(m.base_tensor(part).requires_grad for m in pm.modules() if isinstance(m, SparseDeltaLayer)
                   for part in m.paths)


def _train(pm, data, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(pm.param_groups(lr=lr))  # built before the mask exists, as the Trainer does
    pm.train()
    pm.begin_training(data, total_steps=steps)
    for batch in (data * steps)[:steps]:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_only_chosen_entries_move_and_only_they_hold_optimizer_state():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, SAMConfig(keep_ratio=0.01))
    optimizer = _train(pm, labelled_batches(3))
    mask = torch.cat(_masks(pm))
    k = int(mask.sum())
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == k
    paths = [p for p, m in pm.base_model.named_modules() if isinstance(m, SparseDeltaLayer)]
    pm.eval()
    merged = pm.merge_and_unload().state_dict()
    targeted = [n for n in before if n.rsplit(".", 1)[0] in paths]
    moved = torch.cat([(merged[n] - before[n]).reshape(-1) != 0 for n in targeted])
    assert 0 < int(moved.sum()) <= k and not (moved & ~mask).any(), "an entry outside the mask changed"
    assert all(torch.equal(merged[n], before[n]) for n in before if n not in targeted)


def test_save_load_round_trip_keeps_the_mask(tmp_path):
    pm = get_peft_model(tiny_bert(), SAMConfig(keep_ratio=0.01))
    _train(pm, labelled_batches(3))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    batch = labelled_batches(1, seed=5)[0]
    pm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
    loaded.begin_training(labelled_batches(3, seed=9), total_steps=1)  # a loaded mask is kept, not chosen again
    assert all(torch.equal(a, b) for a, b in zip(_masks(loaded), _masks(pm)))


def test_data_pass_without_data_or_with_an_empty_loader_is_refused():
    pm = get_peft_model(tiny_bert(), SAMConfig())
    with pytest.raises(PeftlabError, match="SAM makes a pass over the training data"):
        pm.begin_training(None, total_steps=1)
    with pytest.raises(PeftlabError, match="SAM's data pass got no batches"):
        pm.begin_training([], total_steps=1)
