"""LT-SFT: phase 1 fine-tunes the targeted weights in full, the K entries that moved most are kept
(checked against phase 1 run by hand, and shown to differ from a gradient ranking), the weights go
back to W0, and phase 2 trains only those K entries. Two SFTs compose by addition."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.core.targets import resolve_targets
from peftlab.methods.partial.lt_sft import LtSftConfig
from peftlab.methods.partial.sparse_delta import SparseDeltaLayer

from ...conftest import labelled_batches, no_dropout, tiny_bert




def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, SparseDeltaLayer)]


def _flat_mask(pm, name="default"):
    out = []
    for layer in _layers(pm):
        for part in layer.paths:
            mask = torch.zeros(layer.base_tensor(part).numel(), dtype=torch.bool)
            mask[layer.indices(part)[name]] = True
            out.append(mask)
    return torch.cat(out)


def _top(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k).indices] = True
    return keep


@pytest.mark.parametrize("bad", [dict(keep_ratio=0), dict(keep_ratio=2.0), dict(num_entries=0),
                                 dict(dense_steps=0), dict(dense_lr=-1.0), dict(l1_reg=-0.1)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        LtSftConfig(**bad)


def test_phase_one_fine_tunes_in_full_and_keeps_the_k_entries_that_moved_most():
    data, steps, lr, k = labelled_batches(), 3, 1e-2, 200
    config = LtSftConfig(num_entries=k, l1_reg=0.1)
    # Phase 1 by hand: AdamW on the targeted tensors, linear decay, L1 pull towards W0.
    model = tiny_bert()
    no_dropout(model)
    tensors = [t for p in resolve_targets(model, config.targets) for t in model.get_submodule(p).parameters()]
    originals = [t.detach().clone() for t in tensors]
    size = sum(p.numel() for p in model.parameters())
    for t in tensors:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(tensors, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    grads_at_start = None
    for i, batch in enumerate((data * steps)[:steps]):
        l1 = 0.1 * sum((t - o).abs().sum() for t, o in zip(tensors, originals)) / size
        loss = model(**batch).loss + l1
        loss.backward()
        if i == 0:
            grads_at_start = [t.grad.abs().clone() for t in tensors]
        opt.step(), sched.step(), opt.zero_grad()
    moved = [(t.detach() - o).abs() for t, o in zip(tensors, originals)]

    base = tiny_bert()
    pm = get_peft_model(base, config)
    no_dropout(pm)
    pm.begin_training(data, total_steps=steps, learning_rate=lr)
    chosen = _flat_mask(pm)
    assert int(chosen.sum()) == k
    assert torch.equal(chosen, _top(moved, k))
    assert not torch.equal(chosen, _top(grads_at_start, k)), "the test cannot tell LT-SFT from a gradient ranking"
    # Reset: the base weights are W0 again, and nothing of phase 1 is left behind.
    for t, o in zip([layer.base_tensor(p) for layer in _layers(pm) for p in layer.paths], originals):
        assert torch.equal(t, o) and not t.requires_grad and t.grad is None


def test_a_new_head_trains_in_phase_one_and_is_reset_for_phase_two():
    pm = get_peft_model(tiny_bert(), LtSftConfig(num_entries=100, modules_to_save=("classifier",)))
    head = [p for p in pm.adapter_parameters("default") if p.numel() and p.dim() == 2][0]
    start = head.detach().clone()
    seen = []
    pm.base_model.classifier.register_forward_hook(lambda m, a, o: seen.append(head.detach().clone()))
    pm.begin_training(labelled_batches(), total_steps=3, learning_rate=1e-2)
    assert not torch.equal(seen[-1], start), "phase 1 did not train the head"
    assert torch.equal(head, start), "the head was not reset to its initialisation for phase 2"


def test_phase_two_trains_only_the_kept_entries_with_state_for_them_alone():
    model = tiny_bert()
    before = {n: v.clone() for n, v in model.state_dict().items()}
    pm = get_peft_model(model, LtSftConfig(num_entries=300))
    optimizer = torch.optim.AdamW(pm.param_groups(lr=1e-2))  # built before the entries exist
    data = labelled_batches()
    pm.train()
    pm.begin_training(data, total_steps=3, learning_rate=1e-2)
    for batch in data + data[:1]:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == 300
    pm.eval()
    mask, paths = _flat_mask(pm), [n for n, m in pm.base_model.named_modules() if isinstance(m, SparseDeltaLayer)]
    merged = pm.merge_and_unload()
    targeted = [n for n in before if n.rsplit(".", 1)[0] in paths]
    moved = torch.cat([(merged.state_dict()[n] - before[n]).reshape(-1) != 0 for n in targeted])
    assert 0 < int(moved.sum()) <= 300 and not (moved & ~mask).any()
    assert all(torch.equal(merged.state_dict()[n], before[n]) for n in before if n not in targeted)


def _sft(pm, name, seed):
    pm.set_adapter(name)
    optimizer = torch.optim.AdamW(pm.param_groups(lr=1e-2))
    data = labelled_batches(seed=seed)
    pm.train()
    pm.begin_training(data, total_steps=2, learning_rate=1e-2)
    for batch in data:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()


def test_two_sfts_compose_by_addition(tmp_path):
    pm = get_peft_model(tiny_bert(), LtSftConfig(num_entries=300), "lang")
    _sft(pm, "lang", 1)
    pm.add_adapter("task", LtSftConfig(num_entries=500))
    _sft(pm, "task", 2)
    pm.eval()
    batch = labelled_batches(1, seed=9)[0]
    with torch.no_grad():
        pm.set_adapter(["lang", "task"])
        stacked = pm(**batch).logits
        pm.add_weighted_adapter(["lang", "task"], [1.0, 1.0], "both")
        pm.set_adapter("both")
        torch.testing.assert_close(pm(**batch).logits, stacked)
        # Applying one after the other: merge the language SFT, then run the task SFT on top.
        pm.merge_adapter("lang")
        pm.set_adapter("task")
        torch.testing.assert_close(pm(**batch).logits, stacked)
        pm.unmerge_adapter("lang")
    union = (_flat_mask(pm, "lang") | _flat_mask(pm, "task")).sum()
    assert int(_flat_mask(pm, "both").sum()) == int(union)
    pm.save_pretrained(tmp_path, adapter_names=["both"])
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "both")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, stacked)


def test_k_beyond_the_targets_and_a_missing_learning_rate_are_refused_before_phase_one():
    pm = get_peft_model(tiny_bert(), LtSftConfig(num_entries=10 ** 9))
    with pytest.raises(PeftlabError, match=r"num_entries=1000000000 but the targets hold \d+ entries"):
        pm.begin_training(labelled_batches(), total_steps=2, learning_rate=1e-3)
    pm = get_peft_model(tiny_bert(), LtSftConfig())
    with pytest.raises(PeftlabError, match="needs a learning rate"):
        pm.begin_training(labelled_batches(), total_steps=2)
    with pytest.raises(PeftlabError, match="training data is empty"):
        pm.begin_training([], total_steps=2, learning_rate=1e-3)
