"""LST (Ladder Side-Tuning): the backbone builds no graph, the gated ladders, the pruning init, the counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.methods.additive import lst

from ...conftest import (MINILM, main_output, model_inputs, perturb, require_shared, tiny_bert, tiny_gpt2, tiny_llama,
                         tiny_t5)

D, INNER, LAYERS = 32, 64, 2  # tiny BERT


def inputs(padded: bool = True) -> dict[str, torch.Tensor]:
    batch = model_inputs("bert")
    if not padded:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    return batch


def side(pm, name: str = "default") -> lst.SideNetwork:
    return pm.base_model.bert.encoder.lst_side[name]


def saved_tensors(step) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward pass of ``step()`` (a forward returning a loss)."""
    kept: list[torch.Tensor] = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return kept


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# -- the mechanism: no graph through the backbone ----------------------------------------------------
def test_no_gradient_reaches_the_backbone_and_no_backbone_activation_is_kept():
    model = tiny_bert()
    backbone = [model.bert.embeddings, *model.bert.encoder.layer]
    ladder_inputs, inner_outputs = [], []  # the embedding and layer outputs; every other backbone module's
    for block in backbone:
        block.register_forward_hook(lambda m, a, out: ladder_inputs.append(out[0] if isinstance(out, tuple) else out))
        for module in list(block.modules())[1:]:
            module.register_forward_hook(lambda m, a, out: inner_outputs.extend(
                t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)))
    # As HF's enable_input_require_grads does for gradient checkpointing: the embeddings' output needs a
    # gradient, so a backbone run with grad enabled would record its whole graph.
    model.bert.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    pm = get_peft_model(model, lst.LstConfig(modules_to_save=("classifier",))).train()
    batch = {**inputs(), "labels": torch.tensor([0, 1])}
    kept = saved_tensors(lambda: pm(**batch).loss)

    assert len(ladder_inputs) == 1 + LAYERS and inner_outputs
    assert all(h.grad_fn is None for h in ladder_inputs[1:])  # computed without a graph
    frozen = [p for n, p in model.named_parameters() if "lst_side" not in n and "classifier" not in n]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in pm.adapter_parameters("default"))
    # What autograd keeps of the backbone is the L + 1 ladder inputs (which D_i's weight gradient needs),
    # nothing from inside the layers: no q/k/v, attention probabilities or FFN activations (width I).
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    ladders = {storage(h) for h in ladder_inputs}
    inner = {storage(t) for t in inner_outputs} - ladders
    assert {storage(t) for t in kept} & ladders == ladders
    assert not {storage(t) for t in kept} & inner
    assert not [t.shape for t in kept if t.dim() and t.shape[-1] == INNER]


def test_saved_activations_are_far_below_full_fine_tuning_of_the_same_model():
    batch = {**inputs(), "labels": torch.tensor([0, 1])}
    full = tiny_bert().train()
    full_bytes = unique_bytes(saved_tensors(lambda: full(**batch).loss))
    pm = get_peft_model(tiny_bert(), lst.LstConfig(modules_to_save=("classifier",))).train()
    lst_bytes = unique_bytes(saved_tensors(lambda: pm(**batch).loss))
    assert lst_bytes < 0.5 * full_bytes, (lst_bytes, full_bytes)


# -- the gated ladders, by hand -----------------------------------------------------------------------
@pytest.mark.parametrize("side_layers", [None, (1,)])
def test_forward_is_the_gated_ladder_computed_by_hand(side_layers):
    pm = get_peft_model(tiny_bert(), lst.LstConfig(side_layers=side_layers, gate_temperature=0.5)).eval()
    net = side(pm)
    kept = list(range(LAYERS)) if side_layers is None else list(side_layers)
    with torch.no_grad():
        net.gates.copy_(torch.tensor([0.7, -1.3][: len(kept)]))
    batch = inputs(padded=False)
    with torch.no_grad():
        got = pm(**batch).logits
        states = tiny_bert()(**batch, output_hidden_states=True).hidden_states  # h_0 (embeddings) .. h_L
        s = states[0] @ net.first_down.weight.T + net.first_down.bias
        for j, i in enumerate(kept):
            mu = 1 / (1 + torch.exp(-net.gates[j] / 0.5))
            ladder = states[i + 1] @ net.downs[j].weight.T + net.downs[j].bias
            s = net.layers[j](mu * ladder + (1 - mu) * s, None)
        top = s @ net.up.weight.T + net.up.bias
        head = pm.base_model
        pooled = torch.tanh(head.bert.pooler.dense(top[:, 0]))
        expected = head.classifier(pooled)
    torch.testing.assert_close(got, expected)


def test_gate_moves_the_mix_between_backbone_ladder_and_side_state():
    """mu -> 1 reads only the ladder of the last layer's backbone state; the side state before it drops out."""
    pm = get_peft_model(tiny_bert(), lst.LstConfig()).eval()
    net = side(pm)
    captured = []
    net.layers[-1].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        net.gates.fill_(50.0)  # sigmoid(500) == 1 in float32
        pm(**inputs(padded=False))
        h_last = tiny_bert()(**inputs(padded=False), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(captured[0], F.linear(h_last, net.downs[-1].weight, net.downs[-1].bias))


# -- initialisation -------------------------------------------------------------------------------------
def l1_order(matrix: torch.Tensor) -> list[int]:
    """Row indices sorted by decreasing L1 norm, with plain Python (the by-hand ranking)."""
    norms = [sum(abs(float(x)) for x in row) for row in matrix]
    return sorted(range(len(norms)), key=lambda i: -norms[i])


def test_pruned_init_keeps_the_top_l1_rows_along_the_chain():
    model = tiny_bert()
    pm = get_peft_model(tiny_bert(), lst.LstConfig(reduction_factor=4))  # side width 8, FFN 16
    net = side(pm)
    keep = D // 4
    embeddings = model.bert.embeddings.word_embeddings.weight.detach()
    columns = sorted(l1_order(embeddings.T)[:keep])
    block = model.bert.encoder.layer[0]
    q, k, v = (getattr(block.attention.self, n).weight.detach()[:, columns] for n in ("query", "key", "value"))
    rows = sorted(l1_order(q * k * v)[:keep])
    torch.testing.assert_close(net.layers[0].attention.self.query.weight, q[rows], rtol=0, atol=0)
    torch.testing.assert_close(net.layers[0].attention.self.value.bias, block.attention.self.value.bias[rows],
                               rtol=0, atol=0)
    # the kept rows are the largest: every kept L1 norm >= every dropped one
    norms = (q * k * v).abs().sum(1)
    dropped = [i for i in range(D) if i not in rows]
    assert norms[rows].min() >= norms[dropped].max()
    # the next matrix reads the kept rows as its columns and keeps its own top rows, LayerNorm with them
    out = block.attention.output.dense.weight.detach()[:, rows]
    out_rows = sorted(l1_order(out)[:keep])
    torch.testing.assert_close(net.layers[0].attention.output.dense.weight, out[out_rows], rtol=0, atol=0)
    torch.testing.assert_close(net.layers[0].attention.output.LayerNorm.weight,
                               block.attention.output.LayerNorm.weight[out_rows], rtol=0, atol=0)
    assert net.layers[0].intermediate.dense.weight.shape == (INNER // 4, keep)
    torch.testing.assert_close(net.gates, torch.zeros(LAYERS), rtol=0, atol=0)  # alpha = 0: mu = 0.5


def test_random_init_differs_from_the_pruned_backbone():
    pruned = side(get_peft_model(tiny_bert(), lst.LstConfig()))
    torch.manual_seed(3)
    fresh = side(get_peft_model(tiny_bert(), lst.LstConfig(init="random")))
    assert not torch.equal(fresh.layers[0].attention.self.query.weight, pruned.layers[0].attention.self.query.weight)
    assert fresh.layers[0].attention.self.query.bias.abs().sum() == 0
    assert 0.005 < fresh.layers[0].intermediate.dense.weight.std() < 0.05  # N(0, 0.02)


# -- counts -----------------------------------------------------------------------------------------
def side_count(d: int, inner: int, layers: int, r: int, kept: int | None = None) -> int:
    s, i = d // r, inner // r
    kept = layers if kept is None else kept
    per_layer = 4 * (s * s + s) + 2 * 2 * s + (s * i + i) + (i * s + s)
    return (d * s + s) * (1 + kept) + kept + kept * per_layer + (s * d + d)


def test_trainable_parameter_count_on_tiny_bert_and_a_minilm_sized_bert():
    from transformers import BertConfig, BertForSequenceClassification

    pm = get_peft_model(tiny_bert(), lst.LstConfig(side_layers=(1,)))
    assert pm.trainable_parameters_report().trainable == side_count(D, INNER, LAYERS, 8, kept=1)
    torch.manual_seed(0)
    minilm = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                      intermediate_size=1536, num_labels=2))
    report = get_peft_model(minilm, lst.LstConfig(modules_to_save=("classifier",))).trainable_parameters_report()
    assert report.trainable == side_count(384, 1536, 6, 8) + 770 == 317_814 + 770


def test_real_minilm_trains_only_the_side_network_and_the_head():
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(require_shared(MINILM)), num_labels=2)
    pm = get_peft_model(model, lst.LstConfig(modules_to_save=("classifier",))).train()
    assert pm.trainable_parameters_report().trainable == 317_814 + 770
    assert side(pm).layers[0].attention.self.query.weight.shape == (48, 48)  # 384 / 8, 12 heads of 4
    ids = torch.randint(1000, 2000, (2, 12))
    pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lst_side" not in n and "classifier" not in n)


def test_a_few_steps_at_the_default_rate_fit_a_learnable_rule():
    from ...conftest import labelled_batches

    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), lst.LstConfig(modules_to_save=("classifier",))).train()
    optimizer = torch.optim.AdamW(pm.param_groups(lst.SPEC.default_lr))
    batches = labelled_batches(n=4, size=8)
    losses = []
    for _ in range(25):
        for batch in batches:
            loss = pm(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-4:]) < 0.75 * sum(losses[:4]), losses[-4:]


# -- lifecycle --------------------------------------------------------------------------------------
def test_save_load_disable_delete_with_dropped_layers(tmp_path):
    base = main_output(tiny_bert()(**inputs()))
    config = lst.LstConfig(side_layers=(1,), reduction_factor=4, init="random", modules_to_save=("classifier",))
    model = tiny_bert()
    pm = get_peft_model(model, config).eval()
    perturb(pm)
    with torch.no_grad():
        expected = main_output(pm(**inputs()))
        with pm.disable_adapter():
            torch.testing.assert_close(main_output(pm(**inputs())), base, rtol=0, atol=0)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs())), expected, rtol=0, atol=0)
    saved = loaded.peft_configs["default"]
    assert config_from_dict(saved.to_dict()) == saved
    assert saved.replace(task_type=None, base_model_name_or_path=None) == config
    pm.delete_adapter("default")
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(main_output(pm(**inputs())), base, rtol=0, atol=0)


def test_backbone_layers_after_the_last_side_layer_are_not_run():
    model = tiny_bert()
    calls = []
    model.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.append(1))
    pm = get_peft_model(model, lst.LstConfig(side_layers=(0,))).eval()
    with torch.no_grad():
        pm(**inputs())
    assert calls == []


def test_two_live_lst_adapters_are_refused():
    pm = get_peft_model(tiny_bert(), lst.LstConfig())
    pm.add_adapter("other", lst.LstConfig())
    pm.set_adapter(["default", "other"])
    with pytest.raises(PeftlabError, match=r"LST adapters \['default', 'other'\] are live at once"):
        pm(**inputs())


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,what", [(tiny_gpt2, "model_type 'gpt2'"), (tiny_llama, "model_type 'llama'"),
                                       (tiny_t5, "encoder-decoder")])
def test_other_architectures_are_refused_naming_what_is_supported(make, what):
    with pytest.raises(PeftlabError, match=rf"BERT-family encoders \(bert, .*{what}"):
        get_peft_model(make(), lst.LstConfig())


def test_bert_as_decoder_is_refused():
    model = tiny_bert()
    model.config.is_decoder = True
    with pytest.raises(PeftlabError, match="is_decoder=True"):
        get_peft_model(model, lst.LstConfig())


def test_a_reduction_factor_the_heads_do_not_divide_is_refused():
    with pytest.raises(PeftlabError, match=r"reduction_factor=3 gives side width 32 // 3 = 10.*4 attention heads"):
        get_peft_model(tiny_bert(), lst.LstConfig(reduction_factor=3))


def test_side_layers_beyond_the_model_are_refused():
    model = tiny_bert()
    with pytest.raises(PeftlabError, match=r"side_layers=\[0, 2\] names layer 2.*has 2 layers"):
        get_peft_model(model, lst.LstConfig(side_layers=(0, 2)))
    assert not any(isinstance(m, DeltaModule) for m in model.modules())


@pytest.mark.parametrize("field,value,expected", [
    ("reduction_factor", 0, "positive integer"),
    ("side_layers", (), "increasing, distinct"),
    ("side_layers", (2, 1), "increasing, distinct"),
    ("side_layers", (1, 1), "increasing, distinct"),
    ("side_layers", (-1,), "increasing, distinct"),
    ("gate_temperature", 0.0, "positive"),
    ("init", "fisher", "one of"),
    ("targets", ("query",), "side_layers"),
])
def test_bad_config_fields_are_refused_naming_them(field, value, expected):
    with pytest.raises(PeftlabError, match=rf"LstConfig\.{field}=.*{expected}"):
        lst.LstConfig(**{field: value})
