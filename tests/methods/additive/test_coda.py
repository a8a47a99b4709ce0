"""CoDA: the frozen layer runs on the k routed tokens only; the adapter on all; the router trains."""
from __future__ import annotations

import math

import pytest
import torch

from peftlab import PeftlabError, config_from_dict, get_peft_model
from peftlab.methods.additive import coda  # noqa: F401  (registers the method)
from peftlab.methods.additive.coda import CodaConfig, CodaLayer, soft_top_k

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from ._adapters import check_lifecycle, perturb


def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, CodaLayer)]


def _heavy_lengths(pm, inputs):
    """Sequence lengths each wrapped (frozen) layer is called with."""
    seen = []
    handles = [layer.base_layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for layer in _layers(pm)]
    with torch.no_grad():
        pm(**inputs)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("r,k", [(3, 3), (2, 4), (8, 1)])
def test_heavy_layer_sees_only_k_tokens(r, k):
    pm = get_peft_model(tiny_bert(), CodaConfig(reduction_factor=r))
    assert len(_layers(pm)) == 2
    assert _heavy_lengths(pm, model_inputs("bert")) == [k, k]
    # Without padding the model hands its layers no mask at all.
    assert _heavy_lengths(pm, {"input_ids": model_inputs("bert")["input_ids"]}) == [k, k]
    assert k == max(1, math.ceil(8 / r))


def _capture(layer):
    """Record the wrapper's input (hidden states, mask) and output on the next forward."""
    record = {}

    def pre(module, args, kwargs):
        record["x"], record["mask"] = args[0], args[1] if len(args) > 1 else kwargs.get("attention_mask")

    def post(module, args, kwargs, out):
        record["y"] = out

    return record, [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True)]


def test_unselected_tokens_get_only_the_adapter_update_and_selected_the_weighted_layer_update():
    pm = get_peft_model(tiny_bert(), CodaConfig())
    perturb(pm, std=0.3)
    layer = _layers(pm)[1]
    record, handles = _capture(layer)
    with torch.no_grad():
        pm(**model_inputs("bert"))
        for h in handles:
            h.remove()
        x, mask, y = record["x"], record["mask"], record["y"]
        index, lam = layer.route("default", x, mask)
        adapter = layer.coda_adapter["default"](x)
        # The frozen layer on the selected tokens alone, with the mask restricted to them.
        assert mask is not None and mask.dim() == 4  # tiny BERT's inputs carry padding
        sub_mask = torch.stack([mask[b][:, index[b]][:, :, index[b]] for b in range(2)])
        chosen = torch.stack([x[b, index[b]] for b in range(2)])
        heavy = layer.base_layer(chosen, sub_mask)
    selected = torch.zeros(2, 8, dtype=torch.bool)
    selected[torch.arange(2)[:, None], index] = True
    torch.testing.assert_close(y[~selected], (x + adapter)[~selected])
    expected = (x + adapter)[selected] + (lam[..., None] * (heavy - chosen)).reshape(-1, x.shape[-1])
    torch.testing.assert_close(y[selected], expected, atol=1e-5, rtol=1e-5)
    assert (adapter.abs() > 0).any()  # the perturbed adapter changes every token


def test_router_gets_gradients_through_the_soft_top_k():
    pm = get_peft_model(tiny_bert(), CodaConfig())
    pm.train()
    perturb(pm, std=0.3)
    # Every token's final state (a classifier reads [CLS] only, which the top layer may not route).
    pm.base_model.bert(**model_inputs("bert")).last_hidden_state.pow(2).mean().backward()
    for layer in _layers(pm):
        grad = layer.coda_router["default"].weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_soft_top_k_is_a_relaxed_top_k():
    torch.manual_seed(0)
    s = torch.randn(3, 40)
    valid = torch.ones(3, 40, dtype=torch.bool)
    lam = soft_top_k(s, 10, valid, CodaConfig(epsilon=1.0))
    assert ((lam >= 0) & (lam <= 1 + 1e-6)).all()
    torch.testing.assert_close(lam.sum(-1), torch.full((3,), 10.0), atol=1e-3, rtol=0)
    # Monotone in the score: a higher score never gets a smaller weight.
    order = s.argsort(dim=-1)
    assert (lam.gather(1, order).diff(dim=-1) >= -1e-6).all()
    # Small eps: nearly the hard top-k (coordinate descent approaches the k-th token's weight slowly,
    # at rate (k-1)/k per step, so only the top k-1 are checked for a full weight).
    hard = soft_top_k(s, 10, valid, CodaConfig(epsilon=0.02, iterations=100))
    ranked = hard.gather(1, s.argsort(dim=-1, descending=True))
    assert ranked[:, :9].min() > 0.99 and ranked[:, 10:].sum(-1).max() < 0.1


@pytest.mark.parametrize("four_d", [False, True])
def test_padding_is_never_selected_ahead_of_a_real_token(four_d):
    pm = get_peft_model(tiny_bert(), CodaConfig(reduction_factor=2))  # k = 4 of 8
    layer = _layers(pm)[0]
    w = layer.coda_router["default"].weight.detach()
    # Padding states score highest: a plain top-k would pick them.
    x = torch.randn(2, 8, w.numel()) * 0.1
    x[:, 5:] += 10 * w / w.norm()
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[0, 5:] = 0          # 5 real tokens >= k: no padding selected
    padding[1, 2:] = 0          # 2 real tokens < k: both selected in full, padding fills the rest
    mask = padding
    if four_d:  # as the model hands its layers: B x 1 x Q x K, True = attend
        mask = padding[:, None, None, :].bool().expand(2, 1, 8, 8)
    with torch.no_grad():
        index, lam = layer.route("default", x, mask)
    assert (index[0] < 5).all()
    assert {0, 1} <= set(index[1].tolist())
    real = padding.gather(1, index).bool()
    assert torch.equal(lam[1][real[1]], torch.ones(2))
    assert (lam[~real] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_with_every_token_routed_the_untrained_adapter_gives_the_base_model(attn):
    """r = 1 routes all tokens with weight 1: gather, masks and scatter must then give the base output."""
    base = tiny_bert()
    base.config._attn_implementation = attn
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = base.bert(**inputs).last_hidden_state
    model = tiny_bert()
    model.config._attn_implementation = attn
    pm = get_peft_model(model, CodaConfig(reduction_factor=1))
    assert _heavy_lengths(pm, inputs) == [8, 8]
    with torch.no_grad():
        got = pm.base_model.bert(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_routing_changes_the_output_and_eager_attention_runs_on_k_tokens():
    model = tiny_bert()
    model.config._attn_implementation = "eager"
    pm = get_peft_model(model, CodaConfig())
    assert _heavy_lengths(pm, model_inputs("bert")) == [3, 3]
    with torch.no_grad():
        base = main_output(tiny_bert()(**model_inputs("bert")))
        assert not torch.allclose(main_output(pm(**model_inputs("bert"))), base, atol=1e-6)


def test_trainable_parameters_per_layer():
    pm = get_peft_model(tiny_bert(), CodaConfig(bottleneck=4))
    d, m = 32, 4
    assert sum(p.numel() for p in pm.adapter_parameters("default")) == 2 * (d + d * m + m + m * d + d)
    assert sum(p.numel() for p in get_peft_model(tiny_bert(), CodaConfig()).adapter_parameters("default")) == \
        2 * (d + 2 * d * 2 + 2 + d)  # m = d // 16 = 2


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_t5], ids=["gpt2", "llama", "t5"])
def test_decoders_and_encoder_decoders_are_refused(build):
    with pytest.raises(PeftlabError, match="causal decoding"):
        get_peft_model(build(), CodaConfig())


def test_bert_as_a_decoder_is_refused():
    model = tiny_bert()
    model.config.is_decoder = True
    with pytest.raises(PeftlabError, match="as a decoder"):
        get_peft_model(model, CodaConfig())


def test_targets_must_be_encoder_layers():
    pm = get_peft_model(tiny_bert(), CodaConfig(targets=["bert.encoder.layer.1"]))
    assert len(_layers(pm)) == 1
    assert _heavy_lengths(pm, model_inputs("bert")) == [3]
    with pytest.raises(PeftlabError, match="not encoder layers"):
        get_peft_model(tiny_bert(), CodaConfig(targets=["query"]))


def test_two_live_coda_adapters_at_one_layer_are_refused():
    pm = get_peft_model(tiny_bert(), CodaConfig())
    pm.add_adapter("other", CodaConfig())
    pm.set_adapter(["default", "other"])
    with pytest.raises(PeftlabError, match="one coda adapter at a time"):
        pm(**model_inputs("bert"))


@pytest.mark.parametrize("field,value", [("reduction_factor", 0.5), ("bottleneck", 0), ("epsilon", 0.0),
                                         ("epsilon_decay", 1.5), ("iterations", 0), ("activation", "nope"),
                                         ("init_scale", -1.0), ("epsilon_init", math.inf)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(PeftlabError, match=field):
        CodaConfig(**{field: value})


def test_config_round_trip_and_lifecycle(tmp_path):
    config = CodaConfig(reduction_factor=2, bottleneck=4, epsilon=0.5, iterations=10)
    assert config_from_dict(config.to_dict()) == config
    check_lifecycle("bert", config, tmp_path)
