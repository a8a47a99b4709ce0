"""Child-Tuning: the mask is the mechanism. D: a fixed child network, the top share of weights by
Fisher information (checked against a ranking computed by hand); F: a fresh Bernoulli mask per
step with a 1/p rescale. Only masked entries move, and the checkpoint keeps only changed entries."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.core.targets import resolve_targets
from peftlab.methods.partial.child_tuning import ChildTuningConfig, ChildTuningLayer

from ...conftest import labelled_batches, tiny_bert



def _layers(pm):
    return {path: m for path, m in pm.base_model.named_modules() if isinstance(m, ChildTuningLayer)}


@pytest.mark.parametrize("bad", [dict(mode="X"), dict(reserve_p=0), dict(reserve_p=1.5), dict(fisher_batches=0)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        ChildTuningConfig(**bad)


def test_d_mask_is_the_global_fisher_top_share_computed_by_hand():
    config = ChildTuningConfig(reserve_p=0.1)
    data = labelled_batches(3)
    # By hand, on the plain model (d = 0, so the same function): mean squared batch gradient of each
    # targeted weight and bias, ranked across all of them together.
    base = tiny_bert().train()
    paths = resolve_targets(base, config.targets)
    tensors = [t for p in paths for t in (base.get_submodule(p).weight, base.get_submodule(p).bias)]
    fisher = [torch.zeros_like(t) for t in tensors]
    for batch in data:
        torch.manual_seed(1)  # the same dropout draws as the pass below
        grads = torch.autograd.grad(base(**batch).loss, tensors)
        fisher = [f + g * g / len(data) for f, g in zip(fisher, grads)]
    flat = torch.cat([f.reshape(-1) for f in fisher])
    k = int(torch.tensor(0.1 * flat.numel()).ceil())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.topk(k).indices] = True

    pm = get_peft_model(tiny_bert(), config)
    pm.train()

    class Seeded:  # re-seed before each batch, as above
        def __iter__(self):
            for batch in data:
                torch.manual_seed(1)
                yield batch

    pm.begin_training(Seeded(), total_steps=1)
    layers = _layers(pm)
    assert list(layers) == paths
    masks = torch.cat([mask.reshape(-1) for layer in layers.values() for _, mask in layer.deltas("default")])
    assert torch.equal(masks, expected)
    assert pm.trainable_parameters_report().trainable_entries == k


def _train(pm, data, optimizer):
    pm.train()
    pm.begin_training(data, total_steps=len(data))
    for batch in data:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()


def test_d_only_the_child_network_changes_and_the_checkpoint_keeps_only_changes(tmp_path):
    pm = get_peft_model(tiny_bert(), ChildTuningConfig(reserve_p=0.05))
    _train(pm, labelled_batches(3), torch.optim.AdamW(pm.param_groups(lr=1e-2)))
    changed = total = 0
    for layer in _layers(pm).values():
        for delta, mask in layer.deltas("default"):
            assert not delta[~mask].any(), "an entry outside the child network moved"
            changed += int((delta != 0).sum())
            total += delta.numel()
    assert 0.9 * 0.05 * total < changed <= 0.05 * total + 1
    state = pm.adapter_state_dict()
    assert sum(t.numel() for k, t in state.items() if k.endswith("delta_weight.values")) <= changed
    pm.save_pretrained(tmp_path)
    pm.eval()
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    batch = labelled_batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
    assert loaded.trainable_parameters_report().trainable_entries == 0  # loaded for inference
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert reloaded.trainable_parameters_report().trainable_entries == pm.trainable_parameters_report().trainable_entries


def test_f_masks_each_step_afresh_and_rescales_by_one_over_p():
    p, lr = 0.3, 0.1
    pm = get_peft_model(tiny_bert(), ChildTuningConfig(mode="F", reserve_p=p))
    pm.train()
    pm.begin_training(None, total_steps=2)  # task-free: no data pass
    optimizer = torch.optim.SGD(pm.param_groups(lr=lr))
    batch = labelled_batches(1)[0]
    kept = []
    for _ in range(2):
        torch.manual_seed(3)  # same dropout, so the same full gradient both steps
        pm(**batch).loss.backward()
        full = [d.grad.clone() for layer in _layers(pm).values() for d, _ in layer.deltas("default")]
        before = [d.detach().clone() for layer in _layers(pm).values() for d, _ in layer.deltas("default")]
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
        after = [d.detach() for layer in _layers(pm).values() for d, _ in layer.deltas("default")]
        step = torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)])
        grad = torch.cat([g.reshape(-1) for g in full])
        moved = step != 0
        # SGD: a kept entry moves by -lr * g / p, a dropped one not at all.
        torch.testing.assert_close(step[moved], -lr * grad[moved] / p)
        share = moved[grad != 0].float().mean().item()
        assert abs(share - p) < 0.02
        kept.append(moved)
    assert not torch.equal(kept[0], kept[1]), "mode F must draw a new mask each step"


def test_d_needs_data_and_forgetting_to_begin_is_refused():
    pm = get_peft_model(tiny_bert(), ChildTuningConfig())
    pm.base_model.train()
    with pytest.raises(PeftlabError, match="training has not begun"):
        pm(**labelled_batches(1)[0])
    with pytest.raises(PeftlabError, match="Child-Tuning_D chooses its child network"):
        pm.begin_training(None, total_steps=3)
    with pytest.raises(PeftlabError, match="labels"):
        pm.begin_training([{k: v for k, v in labelled_batches(1)[0].items() if k != "labels"}], total_steps=3)


def test_merge_writes_the_delta_into_the_weights():
    pm = get_peft_model(tiny_bert(), ChildTuningConfig(reserve_p=0.2))
    _train(pm, labelled_batches(2), torch.optim.AdamW(pm.param_groups(lr=1e-2)))
    pm.eval()
    batch = labelled_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = pm(**batch).logits
        plain = pm.merge_and_unload()
        torch.testing.assert_close(plain(**batch).logits, expected)


def test_optimizer_groups_spare_biases_and_norms_from_weight_decay():
    pm = get_peft_model(tiny_bert(), ChildTuningConfig(modules_to_save=("classifier",)))
    groups = pm.param_groups(lr=1e-3, weight_decay=0.01)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for p in pm.parameters() if p.requires_grad)  # every trainable tensor, once
    for layer in _layers(pm).values():
        norm = type(layer.inner[0]).__name__ == "LayerNorm"
        for part, (delta, _) in zip(layer.paths, layer.deltas("default")):
            assert by_id[id(delta)] == (0.0 if norm or part == "bias" else 0.01), part
