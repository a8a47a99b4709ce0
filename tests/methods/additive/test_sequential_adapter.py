"""Sequential (Houlsby) adapter: placed after the attention and FFN output projections, before the
residual add; h <- h + W_up f(W_down h), both projections near zero at init (the paper's near-identity),
optionally with per-adapter trained LayerNorms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, SequentialAdapterConfig, get_peft_model
from peftlab.core.registry import get_method
from peftlab.methods.additive.sequential_adapter import Bottleneck, LayerNormDelta, SequentialAdapterLayer

from ...conftest import MINILM, require_shared
from ._adapters import BUILDERS, D, check_lifecycle, bottleneck_by_hand, perturb, run, site_params, wrapped

EXPECTED_SITES = {
    "bert": [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense")],
    "gpt2": [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_proj", "mlp.c_proj")],
    "llama": [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")],
    "t5": [f"encoder.block.{i}.layer.{s}" for i in range(2) for s in ("0.SelfAttention.o", "1.DenseReluDense.wo")]
    + [f"decoder.block.{i}.layer.{s}" for i in range(2)
       for s in ("0.SelfAttention.o", "1.EncDecAttention.o", "2.DenseReluDense.wo")],
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placement_identity_and_parameter_count(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), SequentialAdapterConfig(bottleneck=8, init="identity"))
    assert wrapped(pm, SequentialAdapterLayer) == EXPECTED_SITES[kind]
    # init="identity": W_up and b_up are zero, the output is exactly the base model's.
    assert torch.equal(run(pm, kind), base)
    assert pm.trainable_parameters_report().trainable == len(EXPECTED_SITES[kind]) * site_params(D, 8)
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_bert_adapter_sits_before_residual_and_layernorm():
    pm = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(bottleneck=8, activation="gelu"))
    perturb(pm)
    self_output = pm.base_model.bert.encoder.layer[1].attention.output  # LN(dropout(dense(h)) + input)
    dense = self_output.dense.base_layer
    block = self_output.dense.bottleneck["default"]
    g = torch.Generator().manual_seed(3)
    hidden, residual = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)
    h = hidden @ dense.weight.T + dense.bias
    adapted = h + bottleneck_by_hand(h, block, F.gelu)
    ln = self_output.LayerNorm
    expected = F.layer_norm(adapted + residual, (D,), ln.weight, ln.bias, ln.eps)
    with torch.no_grad():
        assert torch.allclose(self_output(hidden, residual), expected, atol=1e-5)


def test_gpt2_conv1d_site_by_hand():
    pm = get_peft_model(BUILDERS["gpt2"](), SequentialAdapterConfig(bottleneck=4, activation="tanh"))
    perturb(pm)
    layer = pm.base_model.transformer.h[0].mlp.c_proj
    x = torch.randn(2, 3, 4 * D)  # GPT-2's MLP is 4 d wide
    h = x @ layer.base_layer.weight + layer.base_layer.bias  # Conv1D stores its weight in x out
    with torch.no_grad():
        assert torch.allclose(layer(x), h + bottleneck_by_hand(h, layer.bottleneck["default"], torch.tanh), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_default_init_is_the_papers_near_identity(kind):
    """Houlsby et al. 3.6: W_down and W_up ~ N(0, 1e-2) truncated at two std, biases zero: the adapter is
    close to, but not exactly, the identity, so the spec must not promise identity at init."""
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), SequentialAdapterConfig(bottleneck=8))
    blocks = [m.bottleneck["default"] for m in pm.modules() if isinstance(m, SequentialAdapterLayer)]
    for block in blocks:
        for w in (block.down.weight, block.up.weight):
            assert w.any() and w.abs().max() <= 2e-2  # random, and truncated at 2 std
        assert not block.up.bias.any() and not block.down.bias.any()
    out = run(pm, kind)
    assert not torch.equal(out, base)
    assert (out - base).abs().max() <= 1e-2 * base.abs().max()  # near identity
    assert get_method("sequential_adapter").identity_at_init is False


def test_up_init_statistics():
    torch.manual_seed(0)
    pm = get_peft_model(BUILDERS["llama"](), SequentialAdapterConfig(bottleneck=32, init_scale=1e-2))
    ups = torch.cat([m.bottleneck["default"].up.weight.flatten() for m in pm.modules()
                     if isinstance(m, SequentialAdapterLayer)])
    assert 0.007 < ups.std() < 0.0095  # N(0, 0.01) truncated at 2 std has std ~0.0088


def test_only_w_up_learns_first_step_with_identity_init():
    # With W_up = 0 the gradient reaches W_up and b_up, not W_down: the adapter grows from zero.
    pm = get_peft_model(BUILDERS["llama"](), SequentialAdapterConfig(bottleneck=8, init="identity"))
    pm.train()
    out = pm(input_ids=torch.randint(3, 100, (2, 6))).logits
    out.pow(2).mean().backward()
    block = pm.base_model.model.layers[0].mlp.down_proj.bottleneck["default"]
    assert block.up.weight.grad.abs().sum() > 0 and block.up.bias.grad.abs().sum() > 0
    assert block.down.weight.grad.abs().sum() == 0
    # The paper's near-identity init: W_down learns from the first step too.
    pm = get_peft_model(BUILDERS["llama"](), SequentialAdapterConfig(bottleneck=8))
    pm.train()
    pm(input_ids=torch.randint(3, 100, (2, 6))).logits.pow(2).mean().backward()
    assert pm.base_model.model.layers[0].mlp.down_proj.bottleneck["default"].down.weight.grad.abs().sum() > 0


def test_train_layernorm_bert_by_hand():
    """Houlsby et al. train the LayerNorms too: per adapter, LN(x) runs with weight + dw, bias + db."""
    base_model = BUILDERS["bert"]()
    pm = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(bottleneck=8, train_layernorm=True))
    norms = [n for n, m in pm.base_model.named_modules() if isinstance(m, LayerNormDelta)]
    assert norms == ["bert.embeddings.LayerNorm"] + [f"bert.encoder.layer.{i}.{s}.LayerNorm" for i in range(2)
                                                     for s in ("attention.output", "output")]
    ln_params = len(norms) * 2 * D
    assert pm.trainable_parameters_report().trainable == 4 * site_params(D, 8) + ln_params
    perturb(pm)
    wrapper = pm.base_model.bert.encoder.layer[1].output.LayerNorm
    ln = wrapper.base_layer
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = F.layer_norm(x, (D,), ln.weight + wrapper.ln_weight["default"], ln.bias + wrapper.ln_bias["default"],
                                ln.eps)
        assert torch.allclose(wrapper(x), expected, atol=1e-6)
        assert not torch.allclose(wrapper(x), ln(x), atol=1e-3)
    # The base LayerNorm is untouched: disabled, the model is the base model.
    assert torch.equal(ln.weight, base_model.bert.encoder.layer[1].output.LayerNorm.weight)
    with pm.disable_adapter():
        assert torch.allclose(run(pm, "bert"), run(base_model, "bert"), atol=1e-6)


def test_train_layernorm_rmsnorm_has_weight_only_and_adapters_keep_their_own():
    pm = get_peft_model(BUILDERS["llama"](), SequentialAdapterConfig(bottleneck=4, train_layernorm=True), "a")
    pm.add_adapter("b", SequentialAdapterConfig(bottleneck=4, train_layernorm=True))
    perturb(pm, "a", seed=1)
    perturb(pm, "b", seed=2)
    wrapper = pm.base_model.model.layers[0].input_layernorm
    assert isinstance(wrapper, LayerNormDelta) and set(wrapper.ln_bias) == set()
    norm = wrapper.base_layer
    x = torch.randn(2, 3, D)
    for name in ("a", "b"):
        pm.set_adapter(name)
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        with torch.no_grad():
            assert torch.allclose(wrapper(x), (norm.weight + wrapper.ln_weight[name]) * rms, atol=1e-5)
    pm.delete_adapter("a")
    assert "a" not in wrapper.ln_weight and "b" in wrapper.ln_weight


def test_width_from_reduction_factor_and_default():
    pm = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(reduction_factor=4))
    assert pm.base_model.bert.encoder.layer[0].output.dense.bottleneck["default"].down.out_features == D // 4
    pm = get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig())
    assert pm.base_model.bert.encoder.layer[0].output.dense.bottleneck["default"].down.out_features == D // 16


def test_checkpoint_layout_and_dtype():
    pm = get_peft_model(BUILDERS["llama"]().to(torch.bfloat16), SequentialAdapterConfig(bottleneck=8))
    keys = sorted(pm.adapter_state_dict())
    assert len(keys) == 4 * len(EXPECTED_SITES["llama"])
    assert "base_model.model.model.layers.0.mlp.down_proj.bottleneck.down.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.o_proj.bottleneck.up.bias" in keys
    assert all(p.dtype == torch.bfloat16 for p in pm.adapter_parameters("default"))
    perturb(pm)
    assert run(pm, "llama").dtype == torch.bfloat16


def test_down_init_is_small_truncated_normal():
    block = Bottleneck(256, 64, 256, "relu", 1e-2)
    w = block.down.weight
    assert w.abs().max() <= 2e-2 and 0.004 < w.std() < 0.01  # std of N(0, 0.01) truncated at 2 std ~ 0.0088
    assert not block.up.weight.any() and not block.up.bias.any() and not block.down.bias.any()


@pytest.mark.parametrize("kwargs,field", [
    ({"bottleneck": 0}, "bottleneck"), ({"bottleneck": -4}, "bottleneck"), ({"bottleneck": 2.5}, "bottleneck"),
    ({"bottleneck": True}, "bottleneck"), ({"reduction_factor": 0.5}, "reduction_factor"),
    ({"reduction_factor": math.nan}, "reduction_factor"), ({"activation": "softmax"}, "activation"),
    ({"init_scale": 0.0}, "init_scale"), ({"init_scale": math.inf}, "init_scale"),
    ({"bottleneck": 8, "reduction_factor": 16}, "reduction_factor"), ({"init": "zeros"}, "init"),
    ({"train_layernorm": "yes"}, "train_layernorm"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=field):
        SequentialAdapterConfig(**kwargs)


def test_bad_targets_are_refused():
    with pytest.raises(PeftlabError, match="supports Linear"):
        get_peft_model(BUILDERS["bert"](), SequentialAdapterConfig(targets=("@ffn",)))
    model = BUILDERS["bert"]()
    with pytest.raises(PeftlabError, match="matches no module"):
        get_peft_model(model, SequentialAdapterConfig(targets=("no_such_module",)))
    assert not any(isinstance(m, SequentialAdapterLayer) for m in model.modules())


def test_minilm_report():
    require_shared(MINILM)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    pm = get_peft_model(model, SequentialAdapterConfig(init="identity", modules_to_save=("classifier",)))
    report = pm.trainable_parameters_report()
    assert report.trainable == 12 * site_params(384, 384 // 16) + (384 * 2 + 2)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, base)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_option_saves_loads_disables_and_deletes(kind, tmp_path):
    check_lifecycle(kind, SequentialAdapterConfig(bottleneck=4, train_layernorm=True), tmp_path)
