"""SparseAdapter: a Houlsby bottleneck whose weight matrices are pruned once at initialisation (SNIP by
default: |w * dL/dw| on training batches, one global ranking) to sparsity s, the mask then fixed; only
the kept entries exist, train and are saved."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftlab import CheckpointError, PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.unified.sparse_adapter import (PARTS, SparseAdapterConfig, SparseAdapterLayer, layers_of,
                                                    snip_scores)

from ...conftest import MINILM, labelled_batches, model_inputs, require_shared, tiny_bert, tiny_gpt2

D = 32  # hidden size of the tiny models
SITES = 4  # two layers x (attention output, FFN output)


def run(model, kind="bert"):
    with torch.no_grad():
        out = model(**model_inputs(kind))
    return out.logits


def dense_weights(pm, name="default"):
    return [layer.weight_of(name, part).detach().clone() for layer in layers_of(pm, name) for part in PARTS]


def weight_total(width):
    return SITES * 2 * D * width


@pytest.mark.parametrize("field,value", [("sparsity", 0.0), ("sparsity", 1.0), ("sparsity", -0.2), ("sparsity", 1.5),
                                         ("criterion", "grasp"), ("width_scale", 0.5), ("score_batches", 0)])
def test_bad_config_is_refused_by_field(field, value):
    with pytest.raises(PeftlabError, match=field):
        SparseAdapterConfig(**{field: value})


def test_large_sparse_preset_keeps_the_dense_budget():
    with pytest.raises(PeftlabError, match="scale"):
        SparseAdapterConfig.large_sparse(1)
    config = SparseAdapterConfig.large_sparse(2, bottleneck=4, criterion="random")
    assert (config.width_scale, config.sparsity, config.width(D)) == (2, 0.5, 8)
    assert config_from_dict(config.to_dict()) == config
    pm = get_peft_model(tiny_bert(), config)
    # Twice as wide at 50%: as many kept weights as a dense adapter of width 4.
    assert sum(layer.kept_entries("default") for layer in layers_of(pm, "default")) == weight_total(4)
    assert all(layer.settings["default"]["width"] == 8 for layer in layers_of(pm, "default"))


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_data_free_criteria_prune_when_added_to_the_kept_share(criterion):
    config = SparseAdapterConfig(bottleneck=4, sparsity=0.7, criterion=criterion)
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), config)
    total = weight_total(4)
    kept = sum(layer.kept_entries("default") for layer in layers_of(pm, "default"))
    assert kept == round(0.3 * total)
    biases = SITES * (4 + D)
    assert pm.trainable_parameters_report().trainable == kept + biases  # pruned entries are not parameters
    weights = torch.cat([w.reshape(-1) for w in dense_weights(pm)])
    assert int((weights != 0).sum()) == kept
    pm.begin_training()  # no data needed: nothing left to choose
    assert sum(layer.kept_entries("default") for layer in layers_of(pm, "default")) == kept


def test_magnitude_keeps_the_largest_initial_weights():
    torch.manual_seed(0)
    dense = get_peft_model(tiny_bert(), SparseAdapterConfig(bottleneck=4, criterion="snip"))  # unpruned until data
    before = torch.cat([w.reshape(-1) for w in dense_weights(dense)])
    torch.manual_seed(0)
    pruned = get_peft_model(tiny_bert(), SparseAdapterConfig(bottleneck=4, criterion="magnitude", sparsity=0.4))
    after = torch.cat([w.reshape(-1) for w in dense_weights(pruned)])
    kept = after != 0
    assert torch.equal(after[kept], before[kept])  # same init, values kept as they were
    assert before[kept].abs().min() >= before[~kept].abs().max()


def test_snip_scores_by_hand():
    """|w * sum_b dL_b/dw| for out = h + U relu(D h + b_d) + b_u and L_b = sum(c * out_b)."""
    torch.manual_seed(0)
    layer = SparseAdapterLayer(nn.Linear(4, 4))
    layer.add("a", SparseAdapterConfig(bottleneck=3, init_scale=0.5))
    layer.set_active(["a"])
    with torch.no_grad():
        layer.down_bias["a"].uniform_(-0.5, 0.5)
    xs = [torch.randn(5, 4), torch.randn(5, 4)]
    c = torch.randn(4)
    scores = snip_scores([layer], "a", ((layer(x) * c).sum() for x in xs))

    Dw, U = layer.weight_of("a", "down").detach(), layer.weight_of("a", "up").detach()
    grad_d, grad_u = torch.zeros_like(Dw), torch.zeros_like(U)
    for x in xs:
        h = layer.base_layer(x).detach()
        z = h @ Dw.T + layer.down_bias["a"].detach()
        grad_u += torch.outer(c, torch.ones(5)) @ z.clamp(min=0)          # dL/dU = c^T relu(z), summed over rows
        grad_d += ((c @ U).expand(5, 3) * (z > 0)).T @ h                   # dL/dD = ((U^T c) * f'(z))^T h
    assert torch.allclose(scores[0], (Dw * grad_d).abs().reshape(-1), atol=1e-5)
    assert torch.allclose(scores[1], (U * grad_u).abs().reshape(-1), atol=1e-5)


def test_snip_prunes_in_the_data_pass_to_the_top_scores():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), SparseAdapterConfig(bottleneck=4, sparsity=0.6))
    total = weight_total(4)
    assert pm.trainable_parameters_report().trainable == total + SITES * (4 + D)  # dense until the data pass
    data = labelled_batches(3)
    layers = layers_of(pm, "default")
    magnitude = torch.cat([w.reshape(-1) for w in dense_weights(pm)]).abs()
    pm.eval()  # SNIP scores in eval mode, as the data pass does
    expected = torch.cat(snip_scores(layers, "default", (pm(**b).loss for b in data)))
    pm.train()
    with pytest.raises(PeftlabError, match="begin_training"):
        pm.begin_training()  # SNIP needs the training batches
    pm.begin_training(data, total_steps=3)
    masks = []
    for layer in layers:
        for p in PARTS:
            mask = torch.zeros(layer.dense_entries("default") // 2, dtype=torch.bool)
            mask[layer.indices(p)["default"]] = True
            masks.append(mask)
    chosen = torch.cat(masks)
    assert int(chosen.sum()) == round(0.4 * total)
    assert expected[chosen].min() >= expected[~chosen].max()  # the top (1 - s) of one global ranking
    # Magnitude on the same init chooses differently: the gradient matters.
    assert not torch.equal(chosen, magnitude >= magnitude.topk(int(chosen.sum())).values.min())


def test_masked_entries_stay_zero_through_training():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), SparseAdapterConfig(bottleneck=4, sparsity=0.5))
    data = labelled_batches(4)
    pm.begin_training(data, total_steps=len(data))
    before = dense_weights(pm)
    indices = [layer.indices(p)["default"].clone() for layer in layers_of(pm, "default") for p in PARTS]
    # Weight decay would pull any stored pruned entry; none exists to pull.
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    pm.train()
    for batch in data:
        pm(**batch).loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    after = dense_weights(pm)
    for w0, w1, idx, (layer, part) in zip(before, after, indices,
                                          [(l, p) for l in layers_of(pm, "default") for p in PARTS]):
        assert torch.equal(layer.indices(part)["default"], idx)  # the mask is fixed
        pruned = torch.ones(w0.numel(), dtype=torch.bool)
        pruned[idx] = False
        assert torch.equal(w1.reshape(-1)[pruned], torch.zeros(int(pruned.sum())))
        assert not torch.equal(w1.reshape(-1)[~pruned], w0.reshape(-1)[~pruned])  # the kept entries trained


def test_forward_is_the_masked_bottleneck():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), SparseAdapterConfig(bottleneck=4, criterion="random",
                                                         targets=("@ffn_out",)))
    layer = layers_of(pm, "default")[0]
    x = torch.randn(2, 3, layer.base_layer.in_features)
    h = layer.base_layer(x)
    Dw, U = layer.weight_of("default", "down"), layer.weight_of("default", "up")
    assert (Dw == 0).any() and (U == 0).any()
    expected = h + F.relu(h @ Dw.T + layer.down_bias["default"]) @ U.T + layer.up_bias["default"]
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_checkpoint_holds_only_kept_entries_and_loads_strictly(kind, tmp_path):
    build = {"bert": tiny_bert, "gpt2": tiny_gpt2}[kind]
    torch.manual_seed(0)
    pm = get_peft_model(build(), SparseAdapterConfig(bottleneck=4, sparsity=0.75))
    batch = model_inputs(kind)
    batch["labels"] = torch.tensor([0, 1]) if kind == "bert" else batch["input_ids"].clone()
    pm.begin_training([batch], total_steps=1)
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.add_(torch.randn_like(p) * 0.2)
    expected = run(pm, kind)
    kept = sum(layer.kept_entries("default") for layer in layers_of(pm, "default"))
    assert kept == round(0.25 * weight_total(4))
    pm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(t.numel() for k, t in tensors.items() if k.endswith(".values")) == kept
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k.endswith(".indices"))
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in tensors} == {
        f"{p}.{k}" for p in PARTS for k in ("indices", "values", "bias")}
    loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    assert torch.allclose(run(loaded, kind), expected, atol=1e-6)
    for a, b in zip(layers_of(pm, "default"), layers_of(loaded, "default")):
        for p in PARTS:
            assert torch.equal(a.indices(p)["default"], b.indices(p)["default"])
    # A loaded (pruned) adapter is not pruned again by a later data pass.
    loaded.begin_training([batch], total_steps=1)
    assert sum(layer.kept_entries("default") for layer in layers_of(loaded, "default")) == kept
    # Strict: an index outside the matrix is refused by name.
    key = next(k for k in tensors if k.endswith("down.indices"))
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key][0] = 10 ** 6
    fresh = get_peft_model(build(), SparseAdapterConfig(bottleneck=4, sparsity=0.75))
    with pytest.raises(CheckpointError, match="down.indices"):
        fresh.load_adapter_state_dict("default", bad)


def test_minilm_kept_parameter_count():
    require_shared(MINILM)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    pm = get_peft_model(model, SparseAdapterConfig(criterion="magnitude"))  # the count SNIP keeps too
    m, sites = 384 // 12, 12
    weights = sites * 2 * 384 * m
    assert pm.trainable_parameters_report().trainable == round(0.6 * weights) + sites * (m + 384)
    assert math.isclose(sum(layer.kept_entries("default") for layer in layers_of(pm, "default")) / weights, 0.6,
                        abs_tol=1e-5)
