"""Diff pruning: stage 1 learns a gated dense difference under the L0 penalty (the penalty is in the
loss and closes gates), pruning keeps exactly K entries ranked by gate times difference, and stage 3
trains those entries only, starting from stage 1's difference."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, get_peft_model
from peftlab.methods.partial import diff_pruning
from peftlab.methods.partial.diff_pruning import DiffPruningConfig, expected_gate, expected_nonzeros, sample_gate
from peftlab.methods.partial.sparse_delta import SparseDeltaLayer, count_of

from ...conftest import labelled_batches, no_dropout, tiny_bert




def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, SparseDeltaLayer)]


def _flat(pm, what, name="default"):
    out = []
    for layer in _layers(pm):
        for part in layer.paths:
            if what == "mask":
                mask = torch.zeros(layer.base_tensor(part).numel(), dtype=torch.bool)
                mask[layer.indices(part)[name]] = True
                out.append(mask)
            else:
                dense = torch.zeros(layer.base_tensor(part).numel())
                dense[layer.indices(part)[name]] = layer.values(part)[name].detach()
                out.append(dense)
    return torch.cat(out)


def _stage_one(monkeypatch, pm, steps, total_steps=None):
    """Run the data pass and return what stage 1 left (w, gates) as pruning saw it."""
    seen = []

    def recording(*args, **kwargs):
        seen.append(run(*args, **kwargs))
        return seen[-1]

    run = diff_pruning.l0_stage
    monkeypatch.setattr(diff_pruning, "l0_stage", recording)
    torch.manual_seed(0)
    pm.begin_training(labelled_batches(), total_steps=total_steps or steps)
    assert len(seen) == 1
    return seen[0]


def _top(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k).indices] = True
    return keep


@pytest.mark.parametrize("bad", [dict(keep_ratio=0), dict(keep_ratio=1.5), dict(num_entries=0),
                                 dict(sparsity_penalty=-1.0), dict(alpha_init=float("nan")), dict(l0_steps=0),
                                 dict(l0_lr=0.0), dict(alpha_lr=-0.1)])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        DiffPruningConfig(**bad)


def test_hard_concrete_gates_are_exact_zeros_and_ones_with_the_stretch():
    torch.manual_seed(0)
    z = sample_gate(torch.zeros(10_000))
    assert z.min() == 0 and z.max() == 1 and ((z > 0) & (z < 1)).any()
    # At alpha = 0, s is uniform in log-odds: P(z = 0) = P(s < 1/2) = 1/2, P(z = 1) = P(s > 5/6) = 1/6
    # for the stretch (-1.5, 1.5); the penalty's sigmoid(alpha - log(-l/r)) is P(z != 0).
    assert abs(float((z == 0).float().mean()) - 1 / 2) < 0.02
    assert abs(float((z == 1).float().mean()) - 1 / 6) < 0.02
    assert float(expected_nonzeros(torch.zeros(4))) == 2.0
    assert torch.equal(expected_gate(torch.tensor([5.0, 0.0, -5.0])), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_the_l0_term_is_in_the_loss_and_closes_gates(penalty, monkeypatch):
    config = DiffPruningConfig(num_entries=100, sparsity_penalty=penalty)
    stage = _stage_one(monkeypatch, get_peft_model(tiny_bert(), config), steps=1)
    # At the first step w = 0, so the data loss gives the gates no gradient: only the penalty moves
    # them, and AdamW's first step moves each by alpha_lr (up to its eps, negligible at this penalty).
    for alpha in stage.alphas + [stage.group_alphas]:
        expected = config.alpha_init - (config.alpha_lr if penalty else 0.0)
        torch.testing.assert_close(alpha, torch.full_like(alpha, expected))
    assert any(bool(w.abs().sum()) for w in stage.diffs), "the difference did not train"


def test_the_penalty_lowers_the_expected_number_of_nonzeros(monkeypatch):
    counts = []
    for penalty in (0.0, 1e-3):
        config = DiffPruningConfig(num_entries=100, sparsity_penalty=penalty, alpha_init=0.0, l0_lr=1e-2)
        pm = get_peft_model(tiny_bert(), config)
        stage = _stage_one(monkeypatch, pm, steps=4)
        counts.append(float(sum(expected_nonzeros(a) for a in stage.alphas)))
    assert counts[1] < 0.9 * counts[0], counts


def test_pruning_keeps_k_entries_by_gate_times_difference_and_starts_from_the_difference(monkeypatch):
    config = DiffPruningConfig(keep_ratio=0.01, alpha_init=1.0, sparsity_penalty=1e-3, l0_lr=1e-2, l0_steps=4)
    pm = get_peft_model(tiny_bert(), config)
    stage = _stage_one(monkeypatch, pm, steps=4, total_steps=10)
    total = sum(w.numel() for w in stage.diffs)
    k = count_of(0.01, total)
    mask = _flat(pm, "mask")
    assert int(mask.sum()) == k  # the final sparsity is the target
    assert torch.equal(mask, _top(stage.scores(), k))
    assert not torch.equal(mask, _top([w.abs() for w in stage.diffs], k)), "the gates did not enter the ranking"
    start = torch.cat([w.reshape(-1) for w in stage.diffs])
    torch.testing.assert_close(_flat(pm, "values")[mask], start[mask])


def test_stage_three_trains_only_the_kept_entries_and_the_base_never_moves():
    model = tiny_bert()
    before = [(p, p.detach().clone()) for p in model.parameters()]
    pm = get_peft_model(model, DiffPruningConfig(num_entries=300, l0_steps=2))
    optimizer = torch.optim.AdamW(pm.param_groups(lr=1e-2))  # built before the entries exist
    data = labelled_batches()
    pm.train()
    pm.begin_training(data, total_steps=3)
    assert all(torch.equal(p, v) for p, v in before), "stage 1 changed the base"
    start = _flat(pm, "values")
    for batch in data:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == 300
    mask = _flat(pm, "mask")
    moved = _flat(pm, "values") != start
    assert moved.any() and not (moved & ~mask).any()
    assert all(torch.equal(p, v) for p, v in before)


def test_k_beyond_the_targets_an_unknown_length_and_an_empty_loader_are_refused():
    pm = get_peft_model(tiny_bert(), DiffPruningConfig(num_entries=10 ** 9))
    with pytest.raises(PeftlabError, match=r"num_entries=1000000000 but the targets hold \d+ entries"):
        pm.begin_training(labelled_batches(), total_steps=2)
    pm = get_peft_model(tiny_bert(), DiffPruningConfig())
    with pytest.raises(PeftlabError, match="run's length is unknown"):
        pm.begin_training(labelled_batches())
    with pytest.raises(PeftlabError, match="training data is empty"):
        pm.begin_training([], total_steps=2)
