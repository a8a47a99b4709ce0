"""ProPETL: one prototype shared by all layers, each layer using it under its own learned binary mask."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.core.errors import CheckpointError
from peftlab.methods.unified.propetl import ProPETLConfig, ProPETLLayer, binary_mask, kept_count

from ...conftest import model_inputs, perturb, tiny_bert


def _layers(pm, name="default"):
    return [m for m in pm.modules() if isinstance(m, ProPETLLayer) and name in m.propetl_scores]


def _prototype(pm, name="default", group=0):
    return pm.model_adapters["propetl"].propetl_prototype[name][group]


def _mask_by_hand(scores, density):
    """Top-k of |scores|, k = n - int((1 - density) n), as the reference's GetSubnet."""
    k = scores.numel() - int((1 - density) * scores.numel())
    mask = torch.zeros(scores.numel())
    mask[scores.detach().abs().reshape(-1).argsort(descending=True)[:k]] = 1
    return mask.view_as(scores)


def test_every_adapter_layer_is_the_prototype_under_its_own_mask():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    perturb(pm, scale=0.2)
    proto = _prototype(pm)
    layers = _layers(pm)
    assert len(layers) == 2  # @ffn_out of each of the 2 blocks
    masks = []
    for layer in layers:
        scores = layer.propetl_scores["default"]
        down_mask, up_mask = _mask_by_hand(scores["down_weight"], 0.5), _mask_by_hand(scores["up_weight"], 0.5)
        assert down_mask.sum() == down_mask.numel() // 2 and up_mask.sum() == up_mask.numel() // 2
        x = torch.randn(3, 64)  # the FFN's intermediate width
        with torch.no_grad():
            h = layer.base_layer(x)
            hidden = F.relu(h @ (proto.down_weight * down_mask).T + proto.down_bias)
            expected = h + hidden @ (proto.up_weight * up_mask).T + proto.up_bias
            torch.testing.assert_close(layer(x), expected)
        masks.append(torch.cat([down_mask.reshape(-1), up_mask.reshape(-1)]))
    assert not torch.equal(masks[0], masks[1]), "two layers chose the same sub-network"


def test_every_lora_layer_is_the_prototype_pair_under_its_own_mask():
    config = ProPETLConfig(form="lora", r=4, alpha=6)
    pm = get_peft_model(tiny_bert(), config)
    perturb(pm, scale=0.2)
    queries = [m for m in _layers(pm) if m.settings["default"][1] == 0]
    assert len(queries) == 2 and len(_layers(pm)) == 4  # one query and one value prototype, 2 blocks each
    proto = _prototype(pm, group=0)
    for layer in queries:
        scores = layer.propetl_scores["default"]
        a = proto.lora_A * _mask_by_hand(scores["lora_A"], 0.1)
        b = proto.lora_B * _mask_by_hand(scores["lora_B"], 0.1)
        x = torch.randn(3, 32)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x) + 6 / 4 * x @ a.T @ b.T)


def test_the_prototype_is_one_tensor_for_all_layers_and_changing_it_changes_every_layer():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    proto = _prototype(pm)
    assert sum(p is proto.down_weight for p in pm.parameters()) == 1
    assert sum(p is proto.down_weight for p in pm.adapter_parameters("default")) == 1
    x = torch.randn(3, 64)
    before = [layer(x).detach() for layer in _layers(pm)]
    with torch.no_grad():
        proto.up_bias.add_(1.0)  # a shared, unmasked bias: every layer moves by it
    for layer, old in zip(_layers(pm), before):
        torch.testing.assert_close(layer(x).detach(), old + 1.0)


def test_straight_through_estimator_gives_every_score_the_masked_weight_gradient():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    perturb(pm, scale=0.2)
    layer, proto = _layers(pm)[0], _prototype(pm)
    scores = layer.propetl_scores["default"]
    x = torch.randn(3, 64)
    layer(x).pow(2).sum().backward()
    # By hand: the effective weight as a leaf, its gradient, then dL/dS = dL/dW_eff * P * sign(S).
    down = (proto.down_weight * _mask_by_hand(scores["down_weight"], 0.5)).detach().requires_grad_()
    up = (proto.up_weight * _mask_by_hand(scores["up_weight"], 0.5)).detach().requires_grad_()
    h = layer.base_layer(x).detach()
    (h + F.relu(h @ down.T + proto.down_bias.detach()) @ up.T + proto.up_bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(scores["down_weight"].grad, down.grad * proto.down_weight.detach() * scores["down_weight"].sign())
    torch.testing.assert_close(scores["up_weight"].grad, up.grad * proto.up_weight.detach() * scores["up_weight"].sign())
    # Dropped entries learn too (they can come back): the gradient is not masked.
    dropped = _mask_by_hand(scores["up_weight"], 0.5) == 0
    assert scores["up_weight"].grad[dropped].abs().sum() > 0


def test_binary_mask_keeps_exactly_the_density_fraction():
    scores = torch.randn(7, 9)
    for density in (0.1, 0.5, 1.0):
        mask = binary_mask(scores, density).detach()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == kept_count(63, density) == 63 - int((1 - density) * 63)
        torch.testing.assert_close(mask, _mask_by_hand(scores, density))


def test_checkpoint_is_prototype_floats_plus_mask_bits_and_reloads_the_same_masks(tmp_path):
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    perturb(pm, scale=0.2)
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    proto_numel = sum(p.numel() for p in _prototype(pm).parameters())
    masked = [s.numel() for layer in _layers(pm) for s in layer.propetl_scores["default"].values()]
    floats = {k: t for k, t in stored.items() if t.is_floating_point()}
    bits = {k: t for k, t in stored.items() if not t.is_floating_point()}
    assert all(k.startswith("propetl_prototype.") for k in floats) and sum(t.numel() for t in floats.values()) == proto_numel
    assert all(k.endswith(".bits") and t.dtype == torch.uint8 for k, t in bits.items())
    assert sum(t.numel() for t in bits.values()) == sum(math.ceil(n / 8) for n in masked)
    # The paper's accounting: prototype + one bit per masked entry per layer (no scores stored).
    assert sum(t.numel() * t.element_size() for t in stored.values()) == 4 * proto_numel + sum(math.ceil(n / 8) for n in masked)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
    for old, new in zip(_layers(pm), _layers(loaded)):
        for key, scores in old.propetl_scores["default"].items():
            torch.testing.assert_close(binary_mask(new.propetl_scores["default"][key], 0.5).detach(),
                                       binary_mask(scores, 0.5).detach())


def test_a_mask_that_does_not_match_the_prototype_is_refused():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    state = pm.adapter_state_dict()
    key = next(k for k in state if k.endswith("down_weight.bits"))
    # Through the model: the core names the key and both shapes.
    with pytest.raises(CheckpointError, match="down_weight.bits"):
        pm.load_adapter_state_dict("default", {**state, key: state[key][:-1]})
    # The layer itself says what a mask over this prototype must be.
    layer = _layers(pm)[0]
    local = {k.split("dense.")[-1]: v for k, v in state.items() if "layer.0.output.dense" in k}
    with pytest.raises(CheckpointError, match=r"prototype's down_weight of shape \(2, 32\) is 8 packed bytes.*found torch.uint8 \(3,\)"):
        layer.load_adapter_state("default", {**local, "propetl_mask.down_weight.bits": torch.zeros(3, dtype=torch.uint8)})
    # A mask keeping another number of entries than this density's k (saved with another density).
    with pytest.raises(CheckpointError, match="keeps 64 of 64 entries, but density=0.5 keeps 32"):
        layer.load_adapter_state("default", {**local, "propetl_mask.down_weight.bits": torch.full((8,), 255, dtype=torch.uint8)})
    # A checkpoint of a wider prototype does not load into a narrower one.
    wider = get_peft_model(tiny_bert(), ProPETLConfig(bottleneck=4))
    with pytest.raises(CheckpointError, match=r"propetl_prototype.0.down_weight' has shape \(2, 32\), expected \(4, 32\)"):
        wider.load_adapter_state_dict("default", state)


def test_scores_train_at_the_mask_learning_rate_and_defaults_follow_the_form():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    groups = pm.param_groups(1e-4, 0.1)
    scores = {id(p) for layer in _layers(pm) for p in layer.propetl_scores["default"].values()}
    (mask_group,) = [g for g in groups if {id(p) for p in g["params"]} == scores]
    assert mask_group["lr"] == pytest.approx(3e-3) and mask_group["weight_decay"] == 0.1
    assert ProPETLConfig(form="lora").resolved() == (("@query", "@value"), 0.1, 300.0)
    assert ProPETLConfig().resolved() == (("@ffn_out",), 0.5, 30.0)


def test_config_round_trips_and_bad_input_names_the_field():
    config = ProPETLConfig(form="lora", density=0.25, targets=("@query",))
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftlabError, match="form"):
        ProPETLConfig(form="compacter")
    with pytest.raises(PeftlabError, match="density"):
        ProPETLConfig(density=0.0)
    with pytest.raises(PeftlabError, match="mask_lr_ratio"):
        ProPETLConfig(mask_lr_ratio=-1)
    # One prototype per entry: an entry selecting modules of two shapes cannot share one.
    with pytest.raises(PeftlabError, match="different shapes"):
        get_peft_model(tiny_bert(), ProPETLConfig(targets=("re:.*output\\.dense",)))
    with pytest.raises(PeftlabError, match="both select"):
        get_peft_model(tiny_bert(), ProPETLConfig(form="lora", targets=("@query", "re:.*query")))


def test_two_adapters_keep_their_own_prototypes_and_delete_removes_them():
    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    pm.add_adapter("other", ProPETLConfig(form="lora"))
    assert _prototype(pm) is not _prototype(pm, "other")
    pm.delete_adapter("other")
    assert "other" not in pm.model_adapters["propetl"].propetl_prototype
    pm.delete_adapter("default")
    assert "propetl" not in pm.model_adapters
    assert not any(isinstance(m, ProPETLLayer) for m in pm.modules())


def test_minilm_size_counts_match_the_paper_accounting():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536,
                                                     max_position_embeddings=16))
    pm = get_peft_model(model, ProPETLConfig())
    d, m, layers = 384, 32, 6
    prototype, mask_bits = 2 * d * m + m + d, layers * 2 * d * m
    assert (prototype, mask_bits) == (24_992, 147_456)
    assert pm.trainable_parameters_report().trainable == prototype + mask_bits == 172_448
    state = pm.adapter_state_dict()
    assert sum(t.numel() * t.element_size() for t in state.values()) == 4 * prototype + mask_bits // 8 == 118_400


def test_inference_reuses_the_masked_prototype_and_sees_every_update():
    """At inference the masked weights are built once per change (top-k and product skipped), never stale."""
    from peftlab import get_peft_model
    from peftlab.methods.unified.propetl import ProPETLConfig, ProPETLLayer

    from ...conftest import main_output, model_inputs, tiny_bert

    pm = get_peft_model(tiny_bert(), ProPETLConfig())
    layer = next(m for m in pm.modules() if isinstance(m, ProPETLLayer))
    inputs = model_inputs("bert")
    with torch.no_grad():
        before = main_output(pm(**inputs))
        built = dict(layer._built_without_grad)
        main_output(pm(**inputs))
        assert all(layer._built_without_grad[k][1] is built[k][1] for k in built)  # reused
        for p in pm.adapter_parameters("default"):
            p.add_(0.05 * torch.randn_like(p))
        after = main_output(pm(**inputs))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, main_output(pm(**inputs)))  # with grad: built afresh, same numbers


# -- the prefix form (ProPrefix) --------------------------------------------------------------------
P = 4  # prefix length in these tests: the tiny models have 64 positions


def _prefix_owner(pm):
    from peftlab.methods.unified.propetl import ProPrefixKV

    owner = pm.model_adapters["propetl_prefix"]
    assert isinstance(owner, ProPrefixKV)
    return owner


def _prefix_by_hand(owner, name="default", density=0.1):
    """(prototype (p, W), masks (L, p, W), flat prefix (p, L*W) in prefix tuning's layout) from P', the MLP
    and the scores, computed here."""
    first, last = owner.prefix_mlp[name][0], owner.prefix_mlp[name][2]
    with torch.no_grad():
        proto = torch.tanh(owner.prefix_embedding[name] @ first.weight.T + first.bias) @ last.weight.T + last.bias
        masks = torch.stack([_mask_by_hand(s, density) for s in owner.propetl_scores[name]])
        flat = torch.cat([proto * m for m in masks], dim=1)
    return proto, masks, flat


def _same_prefix_through_prefix_tuning(make_model, flat):
    """The base model with plain prefix tuning holding ``flat`` as its (folded) prefix, run through
    ``base_model``: the real tokens at their own positions (prefix tuning's shift skipped), as ProPrefix."""
    from peftlab.methods.additive.prefix_tuning import PrefixTuningConfig

    pt = get_peft_model(make_model(), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=False))
    pt.load_adapter_state_dict("default", {"prompt_embeddings": flat})
    return pt


def test_every_prefix_layer_is_the_prototype_under_its_own_mask():
    pm = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    owner = _prefix_owner(pm)
    proto, masks, flat = _prefix_by_hand(owner)
    width, heads, head_dim = proto.shape[1], 4, 8  # tiny BERT: 4 heads of 8
    assert proto.shape == (P, 2 * 32) and masks.shape == (2, P, width)
    with torch.no_grad():
        for layer in range(2):
            assert masks[layer].sum() == kept_count(P * width, 0.1) == P * width - int(0.9 * P * width)
            keys, values = owner.layer_prefix(layer)  # what the attention hook prepends, (heads, p, d_h)
            masked = proto * masks[layer]
            torch.testing.assert_close(keys, masked[:, : width // 2].view(P, heads, head_dim).transpose(0, 1))
            torch.testing.assert_close(values, masked[:, width // 2:].view(P, heads, head_dim).transpose(0, 1))
    assert not torch.equal(masks[0], masks[1]), "two layers chose the same sub-network"
    # End to end: the model output is prefix tuning's with this hand-built prefix (one per layer).
    inputs = model_inputs("bert")
    with torch.no_grad():
        pt = _same_prefix_through_prefix_tuning(tiny_bert, flat)
        torch.testing.assert_close(pm(**inputs).logits, pt.base_model(**inputs).logits)
        # The reference keeps the real tokens' positions; prefix tuning's shift by p gives other numbers.
        assert not torch.allclose(pm(**inputs).logits, pt(**inputs).logits)
        shared = torch.cat([proto * masks[0]] * 2, dim=1)  # a neighbour: one mask for every layer
        assert not torch.allclose(pm(**inputs).logits,
                                  _same_prefix_through_prefix_tuning(tiny_bert, shared).base_model(**inputs).logits)


def test_prefix_scores_get_the_straight_through_gradient_and_train_at_the_mask_rate():
    pm = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    owner = _prefix_owner(pm)
    owner.flat_prefix("default").pow(2).sum().backward()
    proto, masks, _ = _prefix_by_hand(owner)
    scores = owner.propetl_scores["default"]
    # dL/dS_l = dL/d(P (.) M_l) (.) P (.) sign(S_l), with dL/d(P (.) M_l) = 2 P (.) M_l; dropped entries too.
    torch.testing.assert_close(scores.grad, 2 * proto * masks * proto * scores.detach().sign())
    assert ProPETLConfig(form="prefix").resolved() == (("@self_attention",), 0.1, 1.0)
    groups = pm.param_groups(1e-4, 0.1)
    (mask_group,) = [g for g in groups if [id(p) for p in g["params"]] == [id(scores)]]
    assert mask_group["lr"] == pytest.approx(1e-4) and mask_group["weight_decay"] == 0.1


def test_prefix_checkpoint_is_prototype_floats_plus_mask_bits_and_reloads_exactly(tmp_path):
    pm = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    width, layers = 64, 2
    assert sorted(stored) == ["propetl_mask.prefix.0.bits", "propetl_mask.prefix.1.bits", "propetl_prototype.0.prefix"]
    assert stored["propetl_prototype.0.prefix"].shape == (P, width)
    assert all(stored[f"propetl_mask.prefix.{i}.bits"].dtype == torch.uint8 for i in range(layers))
    # The paper's accounting: the prototype in floats, one bit per prototype entry per layer; no MLP, no scores.
    assert sum(t.numel() * t.element_size() for t in stored.values()) == 4 * P * width + layers * math.ceil(P * width / 8)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
    old, new = _prefix_owner(pm), _prefix_owner(loaded)
    assert torch.equal(new.masks("default").detach(), old.masks("default").detach())
    assert "default" in new.prompt_embeddings and "default" not in new.prefix_mlp  # the folded prototype
    # Saving the loaded adapter writes the same file.
    again = loaded.adapter_state_dict()
    assert all(torch.equal(again[k], stored[k]) for k in stored)


def test_a_prefix_mask_that_does_not_match_the_prototype_is_refused_and_changes_nothing():
    pm = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    state = pm.adapter_state_dict()
    with pytest.raises(CheckpointError, match="propetl_mask.prefix.1.bits"):
        pm.load_adapter_state_dict("default", {**state, "propetl_mask.prefix.1.bits": state["propetl_mask.prefix.1.bits"][:-1]})
    owner = _prefix_owner(pm)
    before = owner.propetl_scores["default"].detach().clone()
    with pytest.raises(CheckpointError, match=r"layer 1's mask over the prototype prefix of shape \(4, 64\) is 32 packed "
                                              r"bytes.*found torch.uint8 \(3,\)"):
        owner.load_adapter_state("default", {**state, "propetl_mask.prefix.1.bits": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="keeps 256 of 256 entries, but density=0.1 keeps 26"):
        owner.load_adapter_state("default", {**state, "propetl_mask.prefix.1.bits": torch.full((32,), 255, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match=r"prototype prefix has shape \(5, 64\), expected \(4, 64\)"):
        owner.load_adapter_state("default", {**state, "propetl_prototype.0.prefix": torch.zeros(5, 64)})
    assert torch.equal(owner.propetl_scores["default"], before) and "default" in owner.prefix_mlp  # nothing changed
    longer = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P + 1))
    with pytest.raises(CheckpointError, match=r"propetl_prototype.0.prefix' has shape \(4, 64\), expected \(5, 64\)"):
        longer.load_adapter_state_dict("default", state)
    for density in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(PeftlabError, match="density"):
            ProPETLConfig(form="prefix", density=density)
    with pytest.raises(PeftlabError, match="num_virtual_tokens"):
        ProPETLConfig(form="prefix", num_virtual_tokens=0)


def test_prefix_form_on_a_decoder_and_an_encoder_decoder_is_prefix_tuning_with_per_layer_masked_prefixes():
    from ...conftest import tiny_gpt2, tiny_t5

    pm = get_peft_model(tiny_gpt2(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    inputs = model_inputs("gpt2")
    _, _, flat = _prefix_by_hand(_prefix_owner(pm))
    with torch.no_grad():  # the causal mask with the prefix columns, as prefix tuning
        torch.testing.assert_close(pm(**inputs).logits,
                                   _same_prefix_through_prefix_tuning(tiny_gpt2, flat).base_model(**inputs).logits)
        # Generation with the KV cache (which holds the real tokens only) continues the same computation.
        ids = inputs["input_ids"][1:]
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        step = pm(input_ids=out[:, :-1]).logits[0, -1].argmax()
        assert out.shape == (1, 11) and out[0, -1] == step
    # T5: encoder self-, decoder self- and cross-attention, one prototype for all six.
    pm = get_peft_model(tiny_t5(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    owner = _prefix_owner(pm)
    assert owner.num_layers == 6 and owner.propetl_scores["default"].shape == (6, P, 2 * 4 * 8)
    _, _, flat = _prefix_by_hand(owner)
    inputs = {**model_inputs("t5"), "decoder_input_ids": model_inputs("t5")["input_ids"][:, :3]}
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits,
                                   _same_prefix_through_prefix_tuning(tiny_t5, flat).base_model(**inputs).logits)


def test_prefix_form_refuses_a_second_prefix_method_and_unloads_cleanly():
    from peftlab.methods.additive.prefix_tuning import PrefixTuningConfig

    pm = get_peft_model(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(PeftlabError, match="already carries a prefix-tuning adapter"):
        pm.add_adapter("pro", ProPETLConfig(form="prefix", num_virtual_tokens=P))
    pm = get_peft_model(tiny_bert(), ProPETLConfig(form="prefix", num_virtual_tokens=P))
    with pytest.raises(PeftlabError, match="already carries another prefix method's adapters"):  # the other order
        pm.add_adapter("plain", PrefixTuningConfig(num_virtual_tokens=P))
    assert set(pm.peft_configs) == {"default"}  # nothing half-added
    model = tiny_bert()
    implementation = model.config._attn_implementation
    pm = get_peft_model(model, ProPETLConfig(form="prefix", num_virtual_tokens=P))
    pm.add_adapter("other", ProPETLConfig(form="prefix", num_virtual_tokens=P))
    assert _prefix_owner(pm).propetl_scores["other"].shape == (2, P, 64)
    pm.delete_adapter("other")
    pm.delete_adapter("default")
    assert "propetl_prefix" not in pm.model_adapters and model.config._attn_implementation == implementation


def test_minilm_size_prefix_counts_match_the_paper_accounting():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536,
                                                     max_position_embeddings=16))
    pm = get_peft_model(model, ProPETLConfig(form="prefix"))
    d, p, width, layers = 384, 64, 2 * 384, 6
    trained = p * d + (d * 512 + 512) + (512 * width + width) + layers * p * width  # P', MLP, scores
    assert pm.trainable_parameters_report().trainable == trained == 910_592
    state = pm.adapter_state_dict()
    assert sum(t.numel() * t.element_size() for t in state.values()) == 4 * p * width + layers * p * width // 8 == 233_472
