"""AdaMix: M bottleneck experts per site, one drawn at random per training pass, their mean at inference
(one adapter's cost), and a symmetric-KL consistency term between two routed passes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, PeftModel, SequentialAdapterConfig, config_from_dict, get_peft_model
from peftlab.methods.unified import adamix  # noqa: F401  (registers the method)
from peftlab.methods.unified.adamix import AdaMixConfig, AdaMixLayer, to_sequential_adapter

from ...conftest import model_inputs, perturb, tiny_bert, tiny_gpt2, tiny_llama, training_batch

D, M = 32, 4  # the tiny models' width; the default number of experts
SITES = {"bert": ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"],
         "gpt2": ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
         "llama": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]}
BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def _logits(model, kind="bert"):
    with torch.no_grad():
        return model(**model_inputs(kind)).logits


def _adamix(**fields):
    pm = get_peft_model(tiny_bert(), AdaMixConfig(bottleneck=4, **fields))
    perturb(pm, scale=0.3)  # experts differ from each other and from zero
    return pm


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placement_and_parameter_count(kind):
    pm = get_peft_model(BUILDERS[kind](), AdaMixConfig(bottleneck=4))
    assert [n.removeprefix("base_model.") for n, m in pm.named_modules() if isinstance(m, AdaMixLayer)] == SITES[kind]
    # share_up (the reference's default): M down-projections, one up-projection per site.
    per_site = M * (D * 4 + 4) + (4 * D + D)
    assert pm.trainable_parameters_report().trainable == len(SITES[kind]) * per_site
    unshared = get_peft_model(BUILDERS[kind](), AdaMixConfig(bottleneck=4, share_up=False))
    assert unshared.trainable_parameters_report().trainable == len(SITES[kind]) * M * (D * 4 + 4 + 4 * D + D)


def test_averaged_module_is_the_mean_of_the_experts():
    pm = _adamix()
    layer = pm.base_model.bert.encoder.layer[1].output.dense
    bank = layer.adamix_down["default"]
    weight, bias = bank.averaged()
    assert torch.allclose(weight, sum(e.weight for e in bank.experts) / M, atol=1e-7)
    assert torch.allclose(bias, sum(e.bias for e in bank.experts) / M, atol=1e-7)
    # The layer in eval mode: h + W_up gelu(W_down^avg h + b_down^avg) + b_up, by hand.
    pm.eval()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    h = x @ layer.base_layer.weight.T + layer.base_layer.bias
    up = layer.adamix_up["default"].experts[0]
    expected = h + F.gelu(h @ weight.T + bias) @ up.weight.T + up.bias
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_eval_equals_one_sequential_adapter_with_the_experts_means():
    pm = _adamix()
    # By hand: a sequential adapter at the same sites whose projections are the experts' means.
    plain = get_peft_model(tiny_bert(), SequentialAdapterConfig(targets=("@ffn_out",), bottleneck=4, activation="gelu"))
    for mixture, path in ((m, n) for n, m in pm.base_model.named_modules() if isinstance(m, AdaMixLayer)):
        block = plain.base_model.get_submodule(path).bottleneck["default"]
        with torch.no_grad():
            pairs = ((block.down, mixture.adamix_down["default"]), (block.up, mixture.adamix_up["default"]))
            for linear, bank in pairs:
                linear.weight.copy_(torch.stack([e.weight for e in bank.experts]).mean(0))
                linear.bias.copy_(torch.stack([e.bias for e in bank.experts]).mean(0))
    pm.eval()
    mixed = _logits(pm)
    assert torch.allclose(mixed, _logits(plain), atol=1e-6)
    assert torch.equal(mixed, _logits(pm))  # deterministic at inference
    # The same adapter written out by to_sequential_adapter, and a pass under no_grad in train mode.
    to_sequential_adapter(pm, "default", "merged")
    pm.set_adapter("merged")
    assert torch.allclose(_logits(pm), mixed, atol=1e-6)
    pm.set_adapter("default")
    pm.train()
    for module in pm.modules():  # train mode without dropout: only routing could change the output
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert torch.allclose(_logits(pm), mixed, atol=1e-6)


def test_training_routes_one_random_expert_per_pass():
    pm = _adamix(consistency_weight=0.0)
    pm.begin_training()
    layer = pm.base_model.bert.encoder.layer[0].output.dense
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    h = x @ layer.base_layer.weight.T + layer.base_layer.bias
    up = layer.adamix_up["default"].experts[0]
    # The output of each expert alone (what a pass routed to it computes).
    single = [h + F.gelu(h @ e.weight.T + e.bias) @ up.weight.T + up.bias for e in layer.adamix_down["default"].experts]
    torch.manual_seed(0)
    chosen = set()
    layer.train()
    for _ in range(12):
        out = layer(x)
        matches = [i for i, y in enumerate(single) if torch.allclose(out, y, atol=1e-6)]
        assert len(matches) == 1, "a training pass must use exactly one down-projection expert"
        chosen.add(matches[0])
    assert len(chosen) > 1, "the route never changed in 12 training passes"
    assert layer.adamix_down["default"].routed.sum() == len(chosen)


def test_consistency_term_is_the_symmetric_kl_of_two_routed_passes():
    pm = _adamix(consistency_weight=0.7)
    pm.train()
    pm.begin_training()
    seen = []  # the classifier's output in each pass
    handle = pm.base_model.classifier.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    batch = training_batch("bert")
    torch.manual_seed(3)
    out = pm(**batch)
    handle.remove()
    assert len(seen) == 2, "training runs the model twice"
    p, q = seen
    assert not torch.allclose(p, q), "the two passes should take different routes"
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    kl_qp = (lq.exp() * (lq - lp)).sum(-1).mean()  # KL(q || p), averaged over the examples
    kl_pq = (lp.exp() * (lp - lq)).sum(-1).mean()
    expected = F.cross_entropy(p, batch["labels"]) + 0.7 * 0.5 * (kl_qp + kl_pq)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.equal(out.logits.detach(), p)  # the output is the first pass
    # Without labels the term waits for the loop's own loss: model.extra_loss().
    torch.manual_seed(3)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.warns(UserWarning, match="extra_loss"):
        pm(**unlabelled)
    assert torch.allclose(pm.extra_loss(), 0.7 * 0.5 * (kl_qp + kl_pq), atol=1e-6)
    assert pm.extra_loss() is None  # read once
    # Off: one pass, no term.
    off = _adamix(consistency_weight=0.0)
    off.train()
    off.begin_training()
    calls = []
    off.base_model.classifier.register_forward_hook(lambda *a: calls.append(1))
    out = off(**batch)
    assert len(calls) == 1 and torch.allclose(out.loss, F.cross_entropy(out.logits, batch["labels"]))


def test_only_routed_experts_step():
    pm = _adamix()
    pm.train()
    pm.begin_training(total_steps=1)
    optimizer = torch.optim.AdamW(pm.param_groups(1e-2, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    pm(**training_batch("bert")).loss.backward()
    bank = pm.base_model.bert.encoder.layer[0].output.dense.adamix_down["default"]
    routed = bank.routed.clone()
    assert 1 <= int(routed.sum()) <= 2  # two passes, one expert each
    pm.optimizer_step(optimizer)
    assert not bank.routed.any(), "the marks are reset after the step"
    for i, expert in enumerate(bank.experts):
        moved = not torch.equal(expert.weight, before[next(n for n, p in pm.named_parameters() if p is expert.weight)])
        assert moved == bool(routed[i]), f"expert {i}: routed={bool(routed[i])} but moved={moved}"


def test_plain_loop_trains(tmp_path):
    pm = _adamix()
    pm.train()
    batch = training_batch("bert")
    with pytest.raises(PeftlabError, match="begin_training"):
        pm(**batch)
    pm.begin_training(total_steps=3)
    optimizer = torch.optim.AdamW(pm.param_groups(1e-2))
    for _ in range(3):
        loss = pm(**batch).loss
        loss.backward()
        pm.optimizer_step(optimizer)
        optimizer.zero_grad()
    pm.eval()
    expected = _logits(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)


def test_config_round_trip_and_errors():
    config = AdaMixConfig(num_experts=3, reduction_factor=8, share_up=False, share_down=True, consistency_weight=0.5)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftlabError, match="share_up=True and share_down=True"):
        AdaMixConfig(share_down=True)
    with pytest.raises(PeftlabError, match="num_experts"):
        AdaMixConfig(num_experts=0)
    with pytest.raises(PeftlabError, match="consistency_weight"):
        AdaMixConfig(consistency_weight=-1.0)
    with pytest.raises(PeftlabError, match="activation"):
        AdaMixConfig(activation="nope")
    pm = _adamix()
    with pytest.raises(PeftlabError, match="expected an AdaMix adapter"):
        to_sequential_adapter(pm, "missing", "x")


def test_minilm_size_parameter_count():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536)
    pm = get_peft_model(BertForSequenceClassification(cfg), AdaMixConfig())
    m = 384 // 16  # 24
    assert pm.trainable_parameters_report().trainable == 6 * (M * (384 * m + m) + (m * 384 + 384)) == 279_360


def test_consistency_on_per_token_logits_of_a_language_model():
    pm = get_peft_model(tiny_gpt2(), AdaMixConfig(bottleneck=4))
    perturb(pm, scale=0.3)
    pm.train()
    pm.begin_training()
    seen = []
    pm.base_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    batch = training_batch("gpt2")
    out = pm(**batch)
    p, q = seen
    # Averaged over every position: the classification formula on (batch * length, vocab) rows.
    lp, lq = p.flatten(0, 1).log_softmax(-1), q.flatten(0, 1).log_softmax(-1)
    term = 0.5 * ((lq.exp() * (lq - lp)).sum(-1).mean() + (lp.exp() * (lp - lq)).sum(-1).mean())
    task = F.cross_entropy(p[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert torch.allclose(out.loss, task + term, atol=1e-5)
