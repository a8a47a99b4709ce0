"""Parallel adapter: SUB(x) + s * W_up f(W_down x) beside each FFN block (or, with placement="attention",
each attention sublayer), x being the sublayer's input; on post-LN BERT the scaled adapter output enters
through BertOutput's / BertSelfOutput's residual argument."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peftlab import ParallelAdapterConfig, PeftlabError, get_peft_model
from peftlab.methods.additive.parallel_adapter import ParallelAdapterLayer

from ...conftest import MINILM, require_shared
from ._adapters import BUILDERS, D, check_lifecycle, bottleneck_by_hand, perturb, run, site_params, wrapped

EXPECTED_SITES = {
    "bert": [f"bert.encoder.layer.{i}.output" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.mlp" for i in range(2)],
    "llama": [f"model.layers.{i}.mlp" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)]
    + [f"decoder.block.{i}.layer.2.DenseReluDense" for i in range(2)],
}
ATTENTION_SITES = {
    "bert": [f"bert.encoder.layer.{i}.attention.output" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.attn" for i in range(2)],
    "llama": [f"model.layers.{i}.self_attn" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    + [f"decoder.block.{i}.layer.{s}" for i in range(2) for s in ("0.SelfAttention", "1.EncDecAttention")],
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placement_identity_and_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), ParallelAdapterConfig(bottleneck=8))
    assert wrapped(pm, ParallelAdapterLayer) == EXPECTED_SITES[kind]
    layers = [m for m in pm.modules() if isinstance(m, ParallelAdapterLayer)]
    assert {m.input_arg for m in layers} == ({1} if kind == "bert" else {None})
    assert torch.equal(run(pm, kind), base)
    assert pm.trainable_parameters_report().trainable == len(EXPECTED_SITES[kind]) * site_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_attention_placement_identity_and_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), ParallelAdapterConfig(bottleneck=8, placement="attention"))
    assert wrapped(pm, ParallelAdapterLayer) == ATTENTION_SITES[kind]
    layers = [m for m in pm.modules() if isinstance(m, ParallelAdapterLayer)]
    assert {m.input_arg for m in layers} == ({1} if kind == "bert" else {None})
    assert torch.equal(run(pm, kind), base)
    assert pm.trainable_parameters_report().trainable == len(ATTENTION_SITES[kind]) * site_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_gpt2_block_with_attention_adapter_by_hand():
    """He et al.'s parallel adapter at the attention: it reads the attention input ln_1(x) and its scaled
    output joins the attention output before the residual add; the FFN sublayer is unchanged."""
    s = 4.0
    pm = get_peft_model(BUILDERS["gpt2"](), ParallelAdapterConfig(bottleneck=8, placement="attention", scaling=s))
    perturb(pm)
    block = pm.base_model.transformer.h[1]
    attn = block.attn.base_layer
    adapter = block.attn.bottleneck["default"]
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = block.ln_1(x)
        h = x + attn(a)[0] + s * bottleneck_by_hand(a, adapter)
        expected = h + block.mlp(block.ln_2(h))
        assert torch.allclose(block(x), expected, atol=1e-5)
        assert isinstance(block.attn(a), tuple)  # the attention's other outputs are passed on


def test_bert_attention_adapter_enters_through_the_residual_argument():
    s = 2.0
    pm = get_peft_model(BUILDERS["bert"](), ParallelAdapterConfig(bottleneck=8, placement="attention", scaling=s))
    perturb(pm)
    wrapper = pm.base_model.bert.encoder.layer[0].attention.output  # BertSelfOutput: LN(dense(ctx) + x)
    inner, block = wrapper.base_layer, wrapper.bottleneck["default"]
    g = torch.Generator().manual_seed(8)
    ctx, x = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)  # attention context, input
    expected = F.layer_norm(ctx @ inner.dense.weight.T + inner.dense.bias + s * bottleneck_by_hand(x, block) + x, (D,),
                            inner.LayerNorm.weight, inner.LayerNorm.bias, inner.LayerNorm.eps)
    with torch.no_grad():
        assert torch.allclose(wrapper(ctx, x), expected, atol=1e-5)


def test_llama_attention_called_by_keyword():
    pm = get_peft_model(BUILDERS["llama"](), ParallelAdapterConfig(bottleneck=8, placement="attention", scaling=3.0))
    perturb(pm)
    wrapper = pm.base_model.model.layers[0].self_attn
    x = torch.randn(1, 4, D)
    position_embeddings = pm.base_model.model.rotary_emb(x, torch.arange(4).unsqueeze(0))
    with torch.no_grad():
        out = wrapper(hidden_states=x, position_embeddings=position_embeddings, attention_mask=None)
        plain = wrapper.base_layer(hidden_states=x, position_embeddings=position_embeddings, attention_mask=None)
        assert torch.allclose(out[0], plain[0] + 3.0 * bottleneck_by_hand(x, wrapper.bottleneck["default"]), atol=1e-5)


def test_bert_adapter_enters_through_the_residual_argument():
    s = 4.0
    pm = get_peft_model(BUILDERS["bert"](), ParallelAdapterConfig(bottleneck=8, scaling=s))
    perturb(pm)
    out_module = pm.base_model.bert.encoder.layer[0].output  # BertOutput: LN(dense(h) + x)
    inner = out_module.base_layer
    block = out_module.bottleneck["default"]
    g = torch.Generator().manual_seed(5)
    h, x = torch.randn(2, 5, 2 * D, generator=g), torch.randn(2, 5, D, generator=g)  # FFN hidden, FFN input
    ffn = h @ inner.dense.weight.T + inner.dense.bias
    expected = F.layer_norm(ffn + s * bottleneck_by_hand(x, block) + x, (D,), inner.LayerNorm.weight,
                            inner.LayerNorm.bias, inner.LayerNorm.eps)
    with torch.no_grad():
        assert torch.allclose(out_module(h, x), expected, atol=1e-5)
        assert torch.allclose(out_module(h, input_tensor=x), expected, atol=1e-5)  # keyword call
        # Not the adapter reading the FFN hidden state or added after the LayerNorm.
        assert not torch.allclose(out_module(h, x), inner(h, x) + s * bottleneck_by_hand(x, block), atol=1e-3)


@pytest.mark.parametrize("kind,path", [("llama", "model.layers.1.mlp"), ("gpt2", "transformer.h.1.mlp"),
                                       ("t5", "encoder.block.0.layer.1.DenseReluDense")])
def test_ffn_output_plus_scaled_adapter_of_ffn_input(kind, path):
    s = 2.5
    pm = get_peft_model(BUILDERS[kind](), ParallelAdapterConfig(bottleneck=8, scaling=s, activation="gelu"))
    perturb(pm)
    layer = pm.base_model.get_submodule(path)
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        expected = layer.base_layer(x) + s * bottleneck_by_hand(x, layer.bottleneck["default"], F.gelu)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_scaling_is_linear_in_s():
    deltas = []
    for s in (1.0, 4.0):
        pm = get_peft_model(BUILDERS["llama"](), ParallelAdapterConfig(bottleneck=8, scaling=s))
        perturb(pm, seed=7)
        mlp = pm.base_model.model.layers[0].mlp
        x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            deltas.append(mlp(x) - mlp.base_layer(x))
    assert torch.allclose(deltas[1], 4 * deltas[0], atol=1e-5)


def test_named_module_outside_the_ffn_site_reads_its_first_argument():
    # BERT's intermediate (d -> 2d) is not the @ffn site: the adapter reads its input, adds to its output.
    pm = get_peft_model(BUILDERS["bert"](), ParallelAdapterConfig(bottleneck=4, targets=("intermediate",)))
    perturb(pm)
    layer = pm.base_model.bert.encoder.layer[0].intermediate
    assert layer.input_arg is None and (layer.in_features, layer.out_features) == (D, 2 * D)
    assert pm.trainable_parameters_report().trainable == 2 * site_params(D, 4, 2 * D)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x) + 4.0 * bottleneck_by_hand(x, layer.bottleneck["default"]),
                              atol=1e-5)


@pytest.mark.parametrize("kwargs,field", [
    ({"scaling": 0.0}, "scaling"), ({"scaling": -4.0}, "scaling"), ({"scaling": math.nan}, "scaling"),
    ({"scaling": True}, "scaling"), ({"bottleneck": -1}, "bottleneck"), ({"activation": "RELU"}, "activation"),
    ({"bottleneck": 16, "reduction_factor": 4}, "reduction_factor"), ({"placement": "mlp"}, "placement"),
    ({"placement": "attention", "targets": ("@attention",)}, "targets"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=field):
        ParallelAdapterConfig(**kwargs)


def test_module_without_linear_layer_is_refused():
    model = BUILDERS["bert"]()
    with pytest.raises(PeftlabError, match="no linear layer"):
        get_peft_model(model, ParallelAdapterConfig(targets=("@layernorm",)))
    assert not any(isinstance(m, ParallelAdapterLayer) for m in model.modules())


def test_minilm_report():
    require_shared(MINILM)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    pm = get_peft_model(model, ParallelAdapterConfig(modules_to_save=("classifier",)))
    assert pm.trainable_parameters_report().trainable == 6 * site_params(384, 24) + (384 * 2 + 2)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, base)
        perturb(pm, std=0.05)
        assert not torch.allclose(pm(input_ids=ids).logits, base, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_option_saves_loads_disables_and_deletes(kind, tmp_path):
    check_lifecycle(kind, ParallelAdapterConfig(bottleneck=4, placement="attention"), tmp_path)


def _sublayer_trace(kind: str, placement: str) -> list[dict[str, torch.Tensor]]:
    """Per block of a whole-model forward: the block's input, the attention's input and output (first
    element), the hidden state after the attention's residual add, and the adapter's input and scaled output."""
    from peftlab.methods.additive.sequential_adapter import Bottleneck

    model = BUILDERS[kind]()
    blocks = model.transformer.h if kind == "gpt2" else model.model.layers
    attentions = [b.attn if kind == "gpt2" else b.self_attn for b in blocks]  # the modules themselves
    pm = get_peft_model(model, ParallelAdapterConfig(bottleneck=8, placement=placement, scaling=3.0))
    perturb(pm)
    trace = [{} for _ in blocks]
    first = lambda args, kwargs: kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # noqa: E731
    handles = []
    for i, block in enumerate(blocks):
        norm = block.ln_2 if kind == "gpt2" else block.post_attention_layernorm
        handles += [
            block.register_forward_pre_hook(lambda m, a, k, i=i: trace[i].__setitem__("block_in", first(a, k)),
                                            with_kwargs=True),
            attentions[i].register_forward_pre_hook(lambda m, a, k, i=i: trace[i].__setitem__("attn_in", first(a, k)),
                                                    with_kwargs=True),
            attentions[i].register_forward_hook(lambda m, a, o, i=i: trace[i].__setitem__("attn_out", o[0])),
            norm.register_forward_pre_hook(lambda m, a, i=i: trace[i].__setitem__("after_attn", a[0])),
        ]
        adapters = [m for m in block.modules() if isinstance(m, Bottleneck)]
        assert len(adapters) == 1
        handles.append(adapters[0].register_forward_hook(
            lambda m, a, o, i=i: trace[i].update(adapter_in=a[0], adapter_out=o)))
    run(pm, kind)
    for h in handles:
        h.remove()
    return trace


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_attention_placement_reads_the_attention_input_and_adds_to_its_output(kind):
    """In a whole-model forward, placement='attention': the adapter's input is the attention sublayer's
    input (after the pre-LN norm) and its scaled output joins the attention output before the residual add.
    The FFN placement (the default) fails both checks: it reads the FFN input and adds after this point."""
    def holds(t):
        return (t["adapter_in"].shape == t["attn_in"].shape and torch.allclose(t["adapter_in"], t["attn_in"])
                and torch.allclose(t["after_attn"], t["block_in"] + t["attn_out"] + t["adapter_out"], atol=1e-5))

    attention, ffn = _sublayer_trace(kind, "attention"), _sublayer_trace(kind, "ffn")
    assert all(holds(t) for t in attention)
    assert all(t["adapter_out"].abs().max() > 1e-3 for t in attention)  # the adapter contributes
    assert not any(holds(t) for t in ffn)
