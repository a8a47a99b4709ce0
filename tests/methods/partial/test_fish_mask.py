"""FISH Mask: the mask is the top share of the per-example empirical Fisher (checked against a ranking
computed by hand, and shown to differ from the batch-gradient ranking Child-Tuning uses); only those
entries move, only they hold optimizer state, and the checkpoint keeps only them. Also the sparse
difference machinery FISH is built on: strict loading, another base model refused, adding two
differences, tied embeddings refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import PeftlabError, PeftModel, get_peft_model
from peftlab.core.errors import CheckpointError
from peftlab.core.targets import resolve_targets
from peftlab.methods.partial.fish_mask import FishMaskConfig
from peftlab.methods.partial.sparse_delta import SparseDeltaLayer

from ...conftest import labelled_batches, tiny_bert, tiny_gpt2



def _layers(pm):
    return {path: m for path, m in pm.base_model.named_modules() if isinstance(m, SparseDeltaLayer)}


def _flat_mask(pm, name="default"):
    out = []
    for layer in _layers(pm).values():
        for part in layer.paths:
            mask = torch.zeros(layer.base_tensor(part).numel(), dtype=torch.bool)
            mask[layer.indices(part)[name]] = True
            out.append(mask)
    return torch.cat(out)


def _top(scores, share):
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(int(torch.tensor(share * flat.numel()).ceil())).indices] = True
    return keep


@pytest.mark.parametrize("bad", [dict(keep_ratio=0), dict(keep_ratio=1.5), dict(num_samples=0)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        FishMaskConfig(**bad)


def test_mask_is_the_per_example_fisher_top_share_computed_by_hand():
    config = FishMaskConfig(keep_ratio=0.02, num_samples=6)
    data = labelled_batches()
    base = tiny_bert().eval()  # dropout off, so both passes see the same function
    tensors = [t for p in resolve_targets(base, config.targets) for t in base.get_submodule(p).parameters()]
    examples = [{k: v[i:i + 1] for k, v in b.items()} for b in data for i in range(4)][:6]
    per_example = [torch.zeros_like(t) for t in tensors]
    for ex in examples:
        per_example = [f + g * g / 6 for f, g in zip(per_example, torch.autograd.grad(base(**ex).loss, tensors))]
    batch_squares = [torch.zeros_like(t) for t in tensors]  # Child-Tuning_D's statistic, for contrast
    for b in data:
        batch_squares = [f + g * g for f, g in zip(batch_squares, torch.autograd.grad(base(**b).loss, tensors))]

    pm = get_peft_model(tiny_bert().eval(), config)
    def no_dropout(module, args):  # the data pass switches to train mode; keep dropout off to compare
        module.training = False

    for m in pm.modules():
        m.register_forward_pre_hook(no_dropout)
    pm.begin_training(data, total_steps=1)
    chosen = _flat_mask(pm)
    assert torch.equal(chosen, _top(per_example, 0.02))
    assert not torch.equal(chosen, _top(batch_squares, 0.02)), "the test cannot tell FISH from Child-Tuning_D"
    assert pm.trainable_parameters_report().trainable_entries == int(chosen.sum())


def _train(pm, data, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(pm.param_groups(lr=lr))  # built before the mask exists, as the Trainer does
    pm.train()
    pm.begin_training(data, total_steps=steps)
    for batch in (data * steps)[:steps]:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_only_chosen_entries_move_and_only_they_hold_optimizer_state(tmp_path):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, FishMaskConfig(keep_ratio=0.01, num_samples=8))
    optimizer = _train(pm, labelled_batches())
    k = int(_flat_mask(pm).sum())
    state_entries = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_entries == k  # Adam moments for the chosen entries only
    pm.eval()
    mask, paths = _flat_mask(pm), list(_layers(pm))
    merged = pm.merge_and_unload()
    targeted = [n for n in before if n.rsplit(".", 1)[0] in paths]
    moved = torch.cat([(merged.state_dict()[n] - before[n]).reshape(-1) != 0 for n in targeted])
    assert 0 < int(moved.sum()) <= k
    assert not (moved & ~mask).any(), "an entry outside the mask changed"
    untouched = [n for n in before if n not in targeted]
    assert all(torch.equal(merged.state_dict()[n], before[n]) for n in untouched)


def test_checkpoint_keeps_only_chosen_entries_and_loads_strictly(tmp_path):
    pm = get_peft_model(tiny_bert(), FishMaskConfig(keep_ratio=0.01, num_samples=8))
    _train(pm, labelled_batches())
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    k = pm.trainable_parameters_report().trainable_entries
    assert sum(t.numel() for key, t in tensors.items() if key.endswith(".values")) == k
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    batch = labelled_batches(1, seed=5)[0]
    pm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pm(**batch).logits)
    assert loaded.trainable_parameters_report().trainable_entries == k
    loaded.begin_training(labelled_batches(), total_steps=1)  # a loaded mask is kept, not chosen again
    assert torch.equal(_flat_mask(loaded), _flat_mask(pm))

    key = next(k for k, t in tensors.items() if k.endswith("delta_weight.indices") and t.numel())
    damaged = dict(tensors)
    damaged[key] = tensors[key].clone()
    damaged[key][0] = 10 ** 9
    save_file(damaged, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"indices must be integers in \[0, "):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_a_difference_for_another_base_model_is_refused(tmp_path):
    pm = get_peft_model(tiny_bert(), FishMaskConfig(keep_ratio=0.01, num_samples=8))
    _train(pm, labelled_batches())
    pm.save_pretrained(tmp_path)
    other = tiny_bert()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)  # same architecture and shapes, other weights
    with pytest.raises(CheckpointError, match="made for another base model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_adding_two_differences_equals_applying_them_one_after_the_other():
    pm = get_peft_model(tiny_bert(), FishMaskConfig(keep_ratio=0.01, num_samples=8), "a")
    _train(pm, labelled_batches(seed=1))
    pm.add_adapter("b", FishMaskConfig(keep_ratio=0.02, num_samples=8))
    pm.set_adapter("b")
    _train(pm, labelled_batches(seed=2))
    pm.eval()
    batch = labelled_batches(1, seed=7)[0]
    with torch.no_grad():
        pm.set_adapter(["a", "b"])
        stacked = pm(**batch).logits
        pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "sum")
        pm.set_adapter("sum")
        torch.testing.assert_close(pm(**batch).logits, stacked)
        pm.merge_adapter("a")
        pm.merge_adapter("b")
        pm.set_adapter("a")  # both folded in: the base model now is W0 + d_a + d_b
        torch.testing.assert_close(pm(**batch).logits, stacked)


def test_data_pass_without_data_or_with_an_empty_loader_is_refused():
    pm = get_peft_model(tiny_bert(), FishMaskConfig())
    with pytest.raises(PeftlabError, match="makes a pass over the training data"):
        pm.begin_training(None, total_steps=1)
    with pytest.raises(PeftlabError, match="training data is empty"):
        pm.begin_training([], total_steps=1)


def test_tied_embeddings_are_refused_with_the_sharing_module_named():
    with pytest.raises(PeftlabError, match="lm_head.*tied embeddings"):
        get_peft_model(tiny_gpt2(), FishMaskConfig(targets=("transformer.wte",)))


def test_parameter_report_gives_the_chosen_entries_beside_the_dense_size():
    config = FishMaskConfig(keep_ratio=0.01, num_samples=4)
    pm = get_peft_model(tiny_bert(), config)
    pm.begin_training(labelled_batches(1), total_steps=1)
    report = pm.trainable_parameters_report()
    base = tiny_bert()
    dense = sum(p.numel() for path in resolve_targets(base, config.targets) for p in base.get_submodule(path).parameters())
    assert report.dense_entries == dense
    assert report.trainable == report.trainable_entries == int(torch.tensor(0.01 * dense).ceil())
    assert f"chosen from {dense:,} dense entries" in str(report)


def test_checkpoint_costs_eight_bytes_per_changed_entry(tmp_path):
    pm = get_peft_model(tiny_bert(), FishMaskConfig(keep_ratio=0.05, num_samples=4))
    pm.begin_training(labelled_batches(1), total_steps=1)
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.fill_(0.5)
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    k = pm.trainable_parameters_report().trainable_entries
    payload = sum(t.numel() * t.element_size() for key, t in tensors.items() if not key.endswith("base_norm"))
    assert payload == 8 * k  # int32 position + fp32 value
