"""CIAT: an embedding adapter e + A(LN(e)) on the encoder's and the decoder's token embeddings, and
parallel layer adapters SUB(u) + A(u) beside every self-attention and FFN sublayer, u the sublayer's
(normed) input; the decoder's cross-attention gets one only with cross_attention=True."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, get_peft_model
from peftlab.core.config import config_from_dict
from peftlab.methods.additive.ciat import CiatBottleneck, CiatConfig, CiatEmbeddingAdapter
from peftlab.methods.additive.parallel_adapter import ParallelAdapterLayer

from ...conftest import MINILM, model_inputs, require_shared
from ._adapters import BUILDERS, D, check_lifecycle, perturb, run, wrapped

EMBEDDINGS = {
    "bert": ["bert.embeddings"],  # the whole embedding (LN of word + position + type): what layer 0 reads
    "gpt2": ["transformer.wte"],
    "llama": ["model.embed_tokens"],
    "t5": ["encoder.embed_tokens", "decoder.embed_tokens"],
}
LAYER_SITES = {
    "bert": [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output", "output")],
    "gpt2": [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn", "mlp")],
    "llama": [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn", "mlp")],
    "t5": [f"encoder.block.{i}.layer.{s}" for i in range(2) for s in ("0.SelfAttention", "1.DenseReluDense")]
    + [f"decoder.block.{i}.layer.{s}" for i in range(2) for s in ("0.SelfAttention", "2.DenseReluDense")],
}
CROSS = [f"decoder.block.{i}.layer.1.EncDecAttention" for i in range(2)]


def layer_params(d: int, m: int) -> int:
    return 2 * d * m + m + d


def embedding_params(d: int, m: int) -> int:
    return layer_params(d, m) + 2 * d  # its own LayerNorm


def by_hand(u: torch.Tensor, net: CiatBottleneck) -> torch.Tensor:
    """W_up relu(W_down N(u) + b_down) + b_up with explicit products (eval: no dropout)."""
    if net.norm is not None:
        u = F.layer_norm(u, (u.shape[-1],), net.norm.weight, net.norm.bias, eps=1e-6)
    return F.relu(u @ net.down.weight.T + net.down.bias) @ net.up.weight.T + net.up.bias


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placement_count_and_init(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), CiatConfig())
    assert wrapped(pm, CiatEmbeddingAdapter) == EMBEDDINGS[kind]
    assert wrapped(pm, ParallelAdapterLayer) == LAYER_SITES[kind]
    m = D // 2  # the paper's width
    expected = len(EMBEDDINGS[kind]) * embedding_params(D, m) + len(LAYER_SITES[kind]) * layer_params(D, m)
    assert pm.trainable_parameters_report().trainable == expected
    # W_up = 0 by default: exactly the identity; the reference code's Glorot W_up (init="glorot") is not.
    assert torch.equal(run(pm, kind), base)
    glorot = get_peft_model(BUILDERS[kind](), CiatConfig(init="glorot"))
    assert not torch.allclose(run(glorot, kind), base, atol=1e-3)


def test_t5_embedding_adapters_are_separate_networks_on_the_tied_table():
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8))
    perturb(pm)
    model = pm.base_model
    enc, dec = model.encoder.embed_tokens, model.decoder.embed_tokens
    assert enc.base_layer.weight is model.shared.weight and dec.base_layer.weight is model.shared.weight
    assert enc.embedding_adapter["default"] is not dec.embedding_adapter["default"]
    ids = model_inputs("t5")["input_ids"]
    with torch.no_grad():
        e = model.shared(ids)  # the lookup both stacks make
        for wrapper in (enc, dec):
            net = wrapper.embedding_adapter["default"]
            assert net.norm is not None  # the embedding adapter normalises its input
            torch.testing.assert_close(wrapper(ids), e + by_hand(e, net), atol=1e-5, rtol=0)
        assert not torch.allclose(enc(ids), dec(ids), atol=1e-3)


@pytest.mark.parametrize("path,attention", [
    ("encoder.block.0.layer.0", "SelfAttention"), ("decoder.block.1.layer.0", "SelfAttention")])
def test_t5_self_attention_adapter_is_parallel(path, attention):
    """x + SA(LN x) + A(LN x): the adapter reads the sublayer's normed input, not its output."""
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8))
    perturb(pm)
    sub = pm.base_model.get_submodule(path)
    wrapper = getattr(sub, attention)
    net = wrapper.bottleneck["default"]
    assert isinstance(net, CiatBottleneck) and net.norm is None
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        u = sub.layer_norm(x)
        expected = x + wrapper.base_layer(u)[0] + by_hand(u, net)
        torch.testing.assert_close(sub(x)[0], expected, atol=1e-5, rtol=0)
        # Not a sequential adapter (reading the sublayer's output).
        sa = wrapper.base_layer(u)[0]
        assert not torch.allclose(sub(x)[0], x + sa + by_hand(sa, net), atol=1e-3)


def test_t5_ffn_adapter_is_parallel():
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8))
    perturb(pm)
    sub = pm.base_model.decoder.block[1].layer[2]  # T5LayerFF: x + DRD(LN x)
    net = sub.DenseReluDense.bottleneck["default"]
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        u = sub.layer_norm(x)
        torch.testing.assert_close(sub(x), x + sub.DenseReluDense.base_layer(u) + by_hand(u, net), atol=1e-5, rtol=0)


def test_t5_cross_attention_only_when_asked():
    plain = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8))
    assert not any(p in wrapped(plain, ParallelAdapterLayer) for p in CROSS)  # the paper's placement
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8, cross_attention=True))
    assert set(wrapped(pm, ParallelAdapterLayer)) == set(LAYER_SITES["t5"] + CROSS)
    assert pm.trainable_parameters_report().trainable == 2 * embedding_params(D, 8) + 10 * layer_params(D, 8)
    perturb(pm)
    sub = pm.base_model.decoder.block[0].layer[1]  # T5LayerCrossAttention
    g = torch.Generator().manual_seed(5)
    x, memory = torch.randn(2, 4, D, generator=g), torch.randn(2, 6, D, generator=g)
    with torch.no_grad():
        u = sub.layer_norm(x)
        attended = sub.EncDecAttention.base_layer(u, key_value_states=memory)[0]
        expected = x + attended + by_hand(u, sub.EncDecAttention.bottleneck["default"])
        torch.testing.assert_close(sub(x, key_value_states=memory)[0], expected, atol=1e-5, rtol=0)


def test_bert_layer_adapter_enters_through_the_residual_argument():
    pm = get_peft_model(BUILDERS["bert"](), CiatConfig(bottleneck=8))
    perturb(pm)
    wrapper = pm.base_model.bert.encoder.layer[0].attention.output  # BertSelfOutput: LN(dense(ctx) + x)
    inner, net = wrapper.base_layer, wrapper.bottleneck["default"]
    g = torch.Generator().manual_seed(8)
    ctx, x = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)
    expected = F.layer_norm(ctx @ inner.dense.weight.T + inner.dense.bias + by_hand(x, net) + x, (D,),
                            inner.LayerNorm.weight, inner.LayerNorm.bias, inner.LayerNorm.eps)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ctx, x), expected, atol=1e-5, rtol=0)


def test_gpt2_block_by_hand():
    pm = get_peft_model(BUILDERS["gpt2"](), CiatConfig(bottleneck=8))
    perturb(pm)
    block = pm.base_model.transformer.h[1]
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = block.ln_1(x)
        h = x + block.attn.base_layer(a)[0] + by_hand(a, block.attn.bottleneck["default"])
        f = block.ln_2(h)
        expected = h + block.mlp.base_layer(f) + by_hand(f, block.mlp.bottleneck["default"])
        torch.testing.assert_close(block(x)[0] if isinstance(block(x), tuple) else block(x), expected,
                                   atol=1e-5, rtol=0)


def test_t5_generate_with_cache_equals_full_recompute():
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8, cross_attention=True))
    perturb(pm)
    pm.base_model.generation_config.eos_token_id = None
    inputs = model_inputs("t5")
    steps = 5
    with torch.no_grad():
        out = pm.generate(**inputs, max_new_tokens=steps, do_sample=False)
        seq = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(steps):
            logits = pm(**inputs, decoder_input_ids=seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq)
        first = pm(**inputs, decoder_input_ids=seq[:, :1]).logits
        with pm.disable_adapter():
            assert not torch.allclose(pm(**inputs, decoder_input_ids=seq[:, :1]).logits, first, atol=1e-3)


def test_language_pairs_are_adapter_names():
    pm = get_peft_model(BUILDERS["t5"](), CiatConfig(bottleneck=8), adapter_name="en-de")
    pm.add_adapter("en-fr", CiatConfig(bottleneck=8))
    perturb(pm, "en-de", seed=1)
    perturb(pm, "en-fr", seed=2)
    outs = {}
    for pair in ("en-de", "en-fr"):
        pm.set_adapter(pair)
        outs[pair] = run(pm, "t5")
    assert not torch.allclose(outs["en-de"], outs["en-fr"], atol=1e-3)
    pm.delete_adapter("en-fr")
    pm.set_adapter("en-de")
    torch.testing.assert_close(run(pm, "t5"), outs["en-de"], atol=1e-6, rtol=0)


def test_dropout_acts_in_training_only():
    pm = get_peft_model(BUILDERS["llama"](), CiatConfig(bottleneck=8, dropout=0.5))
    perturb(pm)  # W_up starts at zero: no dropout could show
    emb = pm.base_model.model.embed_tokens
    ids = model_inputs("llama")["input_ids"]
    with torch.no_grad():
        emb.eval()
        assert torch.equal(emb(ids), emb(ids))
        emb.train()
        torch.manual_seed(0)
        assert not torch.equal(emb(ids), emb(ids))


def test_config_round_trips():
    config = CiatConfig(bottleneck=12, dropout=0.3, init="identity", cross_attention=True)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("kwargs,field", [
    ({"bottleneck": 0}, "bottleneck"), ({"bottleneck": True}, "bottleneck"),
    ({"reduction_factor": 0.5}, "reduction_factor"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"init": "zeros"}, "init"),
    ({"cross_attention": "yes"}, "cross_attention"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=field):
        CiatConfig(**kwargs)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_cross_attention_without_one_is_refused(kind):
    model = BUILDERS[kind]()
    with pytest.raises(PeftlabError, match="cross_attention"):
        get_peft_model(model, CiatConfig(cross_attention=True))


def test_t5_option_saves_loads_disables_and_deletes(tmp_path):
    check_lifecycle("t5", CiatConfig(bottleneck=4, init="identity", cross_attention=True), tmp_path)


def test_minilm_report():
    require_shared(MINILM)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2).eval()
    pm = get_peft_model(model, CiatConfig(modules_to_save=("classifier",)))
    d, m, layers = 384, 192, 6
    expected = embedding_params(d, m) + 2 * layers * layer_params(d, m) + (d * 2 + 2)  # + the classifier head
    assert pm.trainable_parameters_report().trainable == expected == 1_925_954


def test_stacks_with_a_parallel_adapter_in_one_wrapper():
    """CIAT's layer adapters live in the parallel adapter's wrapper: both branches read the same input."""
    from peftlab import ParallelAdapterConfig

    pm = get_peft_model(BUILDERS["llama"](), CiatConfig(bottleneck=8), adapter_name="c")
    pm.add_adapter("p", ParallelAdapterConfig(bottleneck=4, scaling=4.0))
    perturb(pm, "c", seed=1)
    perturb(pm, "p", seed=2)
    pm.set_adapter(["c", "p"])
    mlp = pm.base_model.model.layers[0].mlp
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        p_net = mlp.bottleneck["p"]
        p_out = 4.0 * (F.relu(x @ p_net.down.weight.T + p_net.down.bias) @ p_net.up.weight.T + p_net.up.bias)
        torch.testing.assert_close(mlp(x), mlp.base_layer(x) + by_hand(x, mlp.bottleneck["c"]) + p_out,
                                   atol=1e-5, rtol=0)
