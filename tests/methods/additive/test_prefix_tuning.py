"""Prefix tuning: p key/value vectors in front of every self-attention layer's keys and values."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peftlab import PeftlabError, PeftModel, PrefixTuningConfig, config_from_dict, get_peft_model
from peftlab.methods.additive import prefix_tuning
from peftlab.methods.additive.prompt_tuning import cache_argument
from peftlab.methods.additive.prefix_tuning import _SITE_ATTR, PAPER_HIDDEN, PrefixKV, _model_configs

from ...conftest import STORIES, check_position_limit, model_inputs, require_shared, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
P = 3


def owner_of(pm) -> PrefixKV:
    return pm.model_adapters["prefix_tuning"]


def direct(kind: str, p: int = P, scale: float = 1.0):
    """A peft model with a direct (folded) prefix of the given scale."""
    torch.manual_seed(1)
    pm = get_peft_model(BUILDERS[kind](), PrefixTuningConfig(num_virtual_tokens=p, prefix_projection=False))
    with torch.no_grad():
        owner_of(pm).prompt_embeddings["default"].mul_(scale)
    return pm


@pytest.mark.parametrize("bad", [
    {"num_virtual_tokens": 0}, {"num_virtual_tokens": True}, {"num_virtual_tokens": 1.5},
    {"encoder_hidden_size": 0}, {"encoder_hidden_size": False}, {"prefix_projection": "yes"}, {"targets": ()},
    {"cross_attention": "yes"},
])
def test_bad_config_is_refused_with_the_field_named(bad):
    with pytest.raises(PeftlabError, match=next(iter(bad))):
        PrefixTuningConfig(**bad)


@pytest.mark.parametrize("kind,width", [("bert", 2 * 2 * 4 * 8), ("gpt2", 2 * 2 * 4 * 8), ("llama", 2 * 2 * 2 * 8)])
def test_checkpoint_is_the_folded_prefix_in_peft_layout(kind, width):
    """(p, L*2*kv_heads*head_dim): tiny models have 2 layers, head size 8; Llama has 2 key/value heads."""
    pm = get_peft_model(BUILDERS[kind](), PrefixTuningConfig(num_virtual_tokens=P))
    state = pm.adapter_state_dict()
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (P, width)
    owner = owner_of(pm)
    mlp_out = owner.prefix_mlp["default"](owner.prefix_embedding["default"])
    torch.testing.assert_close(state["prompt_embeddings"], mlp_out.detach())


def test_attention_of_layer_one_computed_by_hand():
    """softmax(q [P_k; K]^T / sqrt(d) + mask) [P_v; V], with P_k, P_v at rows 2i, 2i+1 of the layout."""
    pm = direct("bert")
    attn = pm.base_model.bert.encoder.layer[1].attention.self
    seen = {}

    def grab(module, args, kwargs, out):
        seen["x"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), out[0]

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    inputs = model_inputs("bert")
    with torch.no_grad():
        pm(**inputs)
    handle.remove()
    x, heads, d = seen["x"], 4, 8
    split = lambda t: t.view(*t.shape[:2], heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = (split(lin(x)) for lin in (attn.query, attn.key, attn.value))
    rows = owner_of(pm).prompt_embeddings["default"].detach().view(P, 2 * 2, heads, d)
    pk, pv = rows[:, 2].permute(1, 0, 2), rows[:, 3].permute(1, 0, 2)  # layer 1: entries 2 and 3
    keys = torch.cat([pk.expand(2, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(2, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(2, P, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    expected = (scores.softmax(-1) @ values).transpose(1, 2).reshape(2, -1, heads * d)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_equals_the_paper_construction_prefix_activations_in_front(kind):
    """Li & Liang: the prefix occupies positions 0..p-1 as past activations. Reference: the base model
    given a KV cache that holds the prefix (how peft runs it), the mask extended by p ones."""
    pm = direct(kind)
    base = BUILDERS[kind]()
    inputs = model_inputs(kind)
    kv = owner_of(pm).prompt_embeddings["default"].detach()
    heads = base.config.num_key_value_heads if kind == "llama" else 4
    kv = kv.view(P, 4, heads, 8).permute(1, 2, 0, 3)
    cache = DynamicCache(config=base.config)
    for layer in range(2):
        cache.update(kv[2 * layer].expand(2, -1, -1, -1), kv[2 * layer + 1].expand(2, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        expected = base(input_ids=inputs["input_ids"], attention_mask=mask, **{cache_argument(base): cache}).logits
        got = pm(**inputs).logits
    assert got.shape == expected.shape  # no extra positions in the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_eager_and_sdpa_give_the_same_output(kind, implementation):
    build = {"bert": tiny_bert, "llama": tiny_llama, "t5": tiny_t5}[kind]
    outs = []
    for impl in ("sdpa", implementation):
        model = build()
        model.set_attn_implementation(impl)
        torch.manual_seed(2)
        pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P))
        assert model.config._attn_implementation == "peftlab_prefix_" + impl
        inputs = model_inputs(kind)
        if kind == "t5":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
        with torch.no_grad():
            outs.append(pm(**inputs).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_uses_the_cache_correctly(kind):
    """Greedy generate (KV cache of real tokens, prefix added every step) equals full recompute."""
    pm = direct(kind, scale=3.0)
    pm.base_model.generation_config.eos_token_id = None
    inputs = model_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].flip(1)  # left padding
    steps = 6
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
        with pm.disable_adapter():
            plain = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                pad_token_id=0)
        seq, m = ids, mask
        for _ in range(steps):
            positions = (m.cumsum(-1) - 1).clamp(min=0)  # generate's rule; the adapter adds p
            logits = pm(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, plain)


def test_generate_on_a_pretrained_llama_gives_text():
    path = require_shared(STORIES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # a direct prefix starts at N(0, 1): large enough to change greedy decoding
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                        PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=False))
    start = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        out = pm.generate(input_ids=start, max_new_tokens=12, do_sample=False)
        with pm.disable_adapter():
            plain = pm.generate(input_ids=start, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > 5 and tokenizer.decode(out[0], skip_special_tokens=True).strip()
    assert tokenizer.decode(plain[0], skip_special_tokens=True).startswith("Once upon a time")
    assert not torch.equal(out, plain)


T5_SELF = ["encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.0.SelfAttention",
           "decoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"]
T5_CROSS = ["decoder.block.0.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention"]


@pytest.mark.parametrize("cross", [True, False])
def test_encoder_decoder_prefixes_encoder_decoder_and_cross_attention(cross):
    """The paper (BART): encoder, decoder self-attention and cross-attention; cross_attention=False
    leaves the cross-attention without a prefix. Layers are numbered in model order."""
    torch.manual_seed(0)
    base = tiny_t5()
    pm = get_peft_model(tiny_t5(), PrefixTuningConfig(num_virtual_tokens=P, cross_attention=cross))
    owner = owner_of(pm)
    expected_sites = sorted(T5_SELF + T5_CROSS if cross else T5_SELF,
                            key=[n for n, _ in base.named_modules()].index)
    assert owner.targets == expected_sites and owner.num_layers == len(expected_sites)
    assert [n for n, m in pm.base_model.named_modules() if _SITE_ATTR in vars(m)] == expected_sites
    assert pm.peft_configs["default"].peft_fields_for(pm.base_model, "default")["num_layers"] == len(expected_sites)
    inputs = model_inputs("t5")
    labels = inputs["input_ids"][:, :4].contiguous()
    out = pm(**inputs, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None for p in pm.adapter_parameters("default"))
    with torch.no_grad():
        ref = base(**inputs, labels=labels)
    assert not torch.allclose(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, atol=1e-4)
    with torch.no_grad():
        generated = pm.generate(**inputs, max_new_tokens=5, do_sample=False)
        decoded = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(5):
            logits = pm(**inputs, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cross_attention_keys_and_values_carry_the_prefix_computed_by_hand(implementation):
    """Decoder block 1's cross-attention (prefix layer 5 of 6): softmax(q [P_k; K_enc]^T + mask) [P_v; V_enc],
    T5 unscaled, P_k, P_v at rows 10 and 11 of the checkpoint layout, the encoder's padding masked."""
    model = tiny_t5()
    model.set_attn_implementation(implementation)
    torch.manual_seed(1)
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=False))
    attn = pm.base_model.decoder.block[1].layer[1].EncDecAttention
    assert owner_of(pm).targets.index("decoder.block.1.layer.1.EncDecAttention") == 5
    seen = {}

    def grab(module, args, kwargs, out):
        seen["x"], seen["enc"], seen["out"] = args[0], kwargs["key_value_states"], out[0]

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    inputs = model_inputs("t5")
    with torch.no_grad():
        pm(**inputs, decoder_input_ids=inputs["input_ids"][:, :4])
    handle.remove()
    heads, d = 4, 8
    split = lambda t: t.view(*t.shape[:2], heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q(seen["x"])), split(attn.k(seen["enc"])), split(attn.v(seen["enc"]))
    rows = owner_of(pm).prompt_embeddings["default"].detach().view(P, 2 * 6, heads, d)
    pk, pv = rows[:, 10].permute(1, 0, 2), rows[:, 11].permute(1, 0, 2)
    keys = torch.cat([pk.expand(2, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(2, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(2, P, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)
    scores = (q @ keys.transpose(-1, -2)).masked_fill(~visible[:, None, None, :], float("-inf"))
    expected = attn.o((scores.softmax(-1) @ values).transpose(1, 2).reshape(2, -1, heads * d))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def test_mlp_runs_once_per_forward_and_fold_keeps_outputs():
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    owner = owner_of(pm)
    calls = []
    owner.prefix_mlp["default"].register_forward_hook(lambda *a: calls.append(1))
    inputs = model_inputs("llama")
    with torch.no_grad():
        before = pm(**inputs).logits
        pm(**inputs)
    assert len(calls) == 2  # once per forward pass, not once per layer
    owner.fold()
    assert "default" not in owner.prefix_mlp and "default" in owner.prompt_embeddings
    assert {id(p) for p in pm.parameters() if p.requires_grad} == {id(owner.prompt_embeddings["default"])}
    pm.check_parameter_partition()
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, before, atol=1e-6, rtol=0)


def test_loading_a_checkpoint_switches_to_direct_mode(tmp_path):
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    owner = owner_of(loaded)
    assert not owner.prefix_mlp and not owner.prefix_embedding and "default" in owner.prompt_embeddings
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_trains_through_the_mlp_and_only_the_adapter_gets_gradients():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    pm.train()
    ids = model_inputs("llama")["input_ids"]
    opt = torch.optim.Adam(pm.adapter_parameters("default"), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for p in pm.base_model.parameters())


def test_release_restores_attention_and_refusals():
    model = tiny_llama()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(PeftlabError, match="another PeftModel"):
        get_peft_model(model, PrefixTuningConfig())
    with pytest.raises(PeftlabError, match="same targets"):
        pm.add_adapter("other", PrefixTuningConfig(targets=("model.layers.0.self_attn",)))
    pm.unload()
    assert all(c._attn_implementation == "sdpa" for c in configs.values())
    assert not any(_SITE_ATTR in vars(m) for m in model.modules())

    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(PeftlabError, match="attention implementations"):
        get_peft_model(model, PrefixTuningConfig())
    assert model.config._attn_implementation == "flex_attention"
    with pytest.raises(PeftlabError, match="not an attention module"):
        get_peft_model(tiny_llama(), PrefixTuningConfig(targets=("q_proj",)))


def test_peft_config_round_trip_and_refusals():
    cfg = PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False, modules_to_save=("classifier",))
    assert config_from_dict(cfg.peft_fields()) == cfg
    custom = PrefixTuningConfig(targets=("model.layers.0.self_attn",), encoder_hidden_size=16, cross_attention=False)
    assert config_from_dict(custom.peft_fields()) == custom
    assert config_from_dict(custom.to_dict()) == custom
    # peft's own width, written in its file, is kept; peft's "no width" means the model's, as here.
    peft_file = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": True}
    assert config_from_dict({**peft_file, "encoder_hidden_size": 768}).encoder_hidden_size == 768
    assert config_from_dict(peft_file).encoder_hidden_size is None
    fields = PrefixTuningConfig().peft_fields_for(tiny_llama(), "default")
    assert fields == {"num_layers": 2, "token_dim": 16, "num_attention_heads": 2}
    with pytest.raises(PeftlabError, match="encoder-decoder"):
        config_from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2})


def test_mlp_width_defaults_to_the_model_width_and_takes_the_papers_512():
    owner = owner_of(get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P)))
    assert owner.prefix_mlp["default"][0].out_features == 32  # tiny Llama's hidden size
    owner = owner_of(get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P,
                                                                      encoder_hidden_size=PAPER_HIDDEN)))
    first, act, second = owner.prefix_mlp["default"]
    widths = (first.in_features, first.out_features, second.in_features, second.out_features)
    assert widths == (32, 512, 512, 2 * 2 * 2 * 8)  # d, h, h, L*2*kv_heads*d_h
    assert isinstance(act, nn.Tanh)


def test_prefix_is_the_tanh_mlp_computed_by_hand(monkeypatch):
    """[P_k^0, P_v^0, ...] = W2 tanh(W1 P' + b1) + b2, as received by the attention function of every
    layer (keys/values before the real tokens'); the same MLP with ReLU gives something else."""
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    owner = owner_of(pm)
    first, second = owner.prefix_mlp["default"][0], owner.prefix_mlp["default"][2]
    embedding = owner.prefix_embedding["default"].detach()

    def by_hand(activation):
        hidden = activation(embedding @ first.weight.detach().T + first.bias.detach())
        flat = hidden @ second.weight.detach().T + second.bias.detach()
        return flat.view(P, 2 * 2, 2, 8)  # (p, L*2, kv_heads, d_h)

    rows = by_hand(torch.tanh)
    assert not torch.allclose(rows, by_hand(torch.relu), atol=1e-3)
    real_sdpa, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((module.__dict__[_SITE_ATTR][1], key, value))
        return real_sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    with torch.no_grad():
        pm(**model_inputs("llama"))
    assert sorted(layer for layer, _, _ in seen) == [0, 1]
    for layer, key, value in seen:
        for got, row in ((key, 2 * layer), (value, 2 * layer + 1)):
            expected = rows[:, row].permute(1, 0, 2).expand(2, -1, -1, -1)  # (batch, kv_heads, p, d_h)
            torch.testing.assert_close(got[:, :, :P], expected, atol=1e-6, rtol=0)


def _state_outside(model):
    """What prefix tuning may touch outside its own modules: each config's attention implementation
    (and the rest of it), and transformers' global attention/mask registries."""
    configs = _model_configs(model)
    return ([c._attn_implementation_internal for c in configs], [c.to_dict() for c in configs],
            sorted(ALL_ATTENTION_FUNCTIONS.keys()), sorted(ALL_MASK_ATTENTION_FUNCTIONS.keys()))


def _outputs(model, kind):
    inputs = model_inputs(kind)
    if kind == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def clean_registries(monkeypatch):
    """transformers' registries without peftlab's names, and no other installed prefix in this
    process (other tests' models may still hold theirs), restored afterwards."""
    gc.collect()
    for cls in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.setattr(cls, "_global_mapping",
                            {k: v for k, v in cls._global_mapping.items() if not k.startswith("peftlab_prefix_")})
    monkeypatch.setattr(prefix_tuning, "_INSTALLED", weakref.WeakSet(), raising=False)


@pytest.mark.parametrize("undo", ["delete_adapter", "unload", "merge_and_unload"])
@pytest.mark.parametrize("kind,implementation", [("llama", "sdpa"), ("t5", "eager")])
def test_removing_the_adapter_leaves_the_base_model_and_transformers_as_before(kind, implementation, undo,
                                                                               clean_registries):
    model = {"llama": tiny_llama, "t5": tiny_t5}[kind]()
    model.set_attn_implementation(implementation)
    before, base_out = _state_outside(model), _outputs(model, kind)
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P))
    assert _state_outside(model) != before  # attached: the configs name peftlab's attention function
    if undo == "delete_adapter":
        pm.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2))
        pm.delete_adapter("default")
        assert _state_outside(model) != before  # "other" still needs the hook
        pm.delete_adapter("other")
    elif undo == "unload":
        assert pm.unload() is model
    else:  # a prefix is not mergeable: refused (the adapter stays), then unloaded
        with pytest.raises(PeftlabError, match="cannot be merged"):
            pm.merge_and_unload()
        pm.unload()
    assert _state_outside(model) == before
    assert not any(_SITE_ATTR in vars(m) for m in model.modules())
    assert torch.equal(_outputs(model, kind), base_out)


def test_a_registered_attention_function_stays_while_another_model_uses_it(clean_registries):
    first, second = tiny_llama(), tiny_llama()
    before = _state_outside(first)
    a = get_peft_model(first, PrefixTuningConfig(num_virtual_tokens=P))
    b = get_peft_model(second, PrefixTuningConfig(num_virtual_tokens=P))
    expected = _outputs(b, "llama")
    a.unload()
    assert _state_outside(first)[:2] == before[:2]  # its configs are restored
    assert "peftlab_prefix_sdpa" in ALL_ATTENTION_FUNCTIONS.keys()
    assert torch.equal(_outputs(b, "llama"), expected)
    b.unload()
    assert _state_outside(second) == before


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_training_step_returns_no_cache_unless_asked(kind):
    # A returned cache would keep each layer's un-prefixed keys and values alive through backward.
    pm = get_peft_model(BUILDERS[kind](), PrefixTuningConfig(num_virtual_tokens=3))
    inputs = model_inputs(kind)
    pm.train()
    assert pm(**inputs).past_key_values is None
    assert pm(**inputs, use_cache=True).past_key_values is not None  # the caller's choice stands
    pm.eval()
    with torch.no_grad():
        assert pm(**inputs).past_key_values is not None  # inference keeps the model's default


def test_a_copy_keeps_working_after_the_original_is_unloaded(clean_registries):
    import copy

    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    expected = _outputs(pm, "llama")
    twin = copy.deepcopy(pm)
    pm.unload()
    torch.testing.assert_close(_outputs(twin, "llama"), expected, atol=0, rtol=0)
    twin.unload()
    assert not any(k.startswith("peftlab_prefix_") for k in ALL_ATTENTION_FUNCTIONS.keys())


@pytest.mark.parametrize("build,config", [
    (tiny_llama, PrefixTuningConfig(num_virtual_tokens=P, targets=("model.layers.0.self_attn",))),
    (tiny_t5, PrefixTuningConfig(num_virtual_tokens=P)),
], ids=["layer-subset", "encoder-decoder"])
def test_a_layout_peft_cannot_run_is_saved_in_peftlabs_form_only(tmp_path, build, config):
    """peft's prefix has a row for every layer (a subset makes it fail with IndexError) and its own
    encoder-decoder layout: such adapters are written without peft's keys, with a warning saying why."""
    import json

    import peft

    torch.manual_seed(0)
    pm = get_peft_model(build(), config)
    with pytest.warns(UserWarning, match="peftlab's form only"):
        pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["method"] == "prefix_tuning" and "peft_type" not in written and "num_layers" not in written
    kind = "t5" if build is tiny_t5 else "llama"
    inputs = model_inputs(kind)
    if kind == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, pm(**inputs).logits)
    with pytest.raises(Exception) as err:  # peft stops at the config, before computing anything
        peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert not isinstance(err.value, IndexError)


def test_a_prefix_on_every_layer_keeps_peft_form(tmp_path):
    import json
    import warnings

    pm = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_an_input_pushed_past_the_position_limit_is_refused_before_the_forward(kind):
    """Real tokens sit after the prefix's p positions: 20 + 45 tokens need 65 of the tiny models' 64."""
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}[kind]()
    check_position_limit(get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=20)), kind)
