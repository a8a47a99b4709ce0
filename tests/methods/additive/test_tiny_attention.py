"""Tiny-attention adapter: SUB(X) + (1/H) sum_h A_h(X) beside each self-attention sublayer, A_h a one-head
attention of width e (1) over all positions, obeying the sublayer's mask and causality; the heads'
parameters averaged into one for deployment."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import CheckpointError, PeftlabError, PeftModel, get_peft_model
from peftlab.methods.additive.parallel_adapter import ParallelAdapterConfig, ParallelAdapterLayer
from peftlab.methods.additive.tiny_attention import (TinyAttentionConfig, TinyAttentionLayer, TinyHeads,
                                                      allowed_positions, average_heads)

from ...conftest import model_inputs
from ._adapters import BUILDERS, D, check_lifecycle, perturb, run, wrapped

SITES = {
    "bert": [f"bert.encoder.layer.{i}.attention" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.attn" for i in range(2)],
    "llama": [f"model.layers.{i}.self_attn" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    + [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(2)],
}


def head_params(d: int, e: int) -> int:
    """LayerNorm, linear1 (d -> 3e), q/k/v input projections (e -> e), attention output (e -> e), linear2."""
    return 2 * d + 3 * (e * d + e) + 3 * (e * e + e) + (e * e + e) + (d * e + d)


def layers(pm) -> list[TinyAttentionLayer]:
    return [m for m in pm.modules() if isinstance(m, TinyAttentionLayer)]


# -- placement, count, identity --------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_placement_causality_count_and_identity(kind):
    base = run(BUILDERS[kind](), kind)
    pm = get_peft_model(BUILDERS[kind](), TinyAttentionConfig())
    assert wrapped(pm, TinyAttentionLayer) == SITES[kind]
    causal = [m.causal for m in layers(pm)]
    expected = {"bert": [False] * 2, "gpt2": [True] * 2, "llama": [True] * 2, "t5": [False] * 2 + [True] * 2}
    assert causal == expected[kind]
    assert pm.trainable_parameters_report().trainable == len(SITES[kind]) * 4 * head_params(D, 1)
    assert torch.equal(run(pm, kind), base)  # the output projection starts at zero
    perturb(pm)
    assert not torch.allclose(run(pm, kind), base, atol=1e-3)


def test_paper_parameter_count_for_roberta_large():
    # One averaged head at each of RoBERTa-large's 24 layers: the paper's 0.05% of ~355M.
    assert head_params(1024, 1) == 7179
    assert 0.045 < 100 * 24 * head_params(1024, 1) / 355e6 < 0.055


# -- the computation, against the reference module built from torch's own layers ---------------------
def reference_head(heads: TinyHeads, h: int, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The reference code's TinyAttention (LayerNorm, linear1, one-head nn.MultiheadAttention, linear2)
    holding head h's parameters; pad: B x T, True where a key is padding."""
    d, e = x.shape[-1], heads.mix_weight.shape[-1]
    ln, lin1, lin2 = nn.LayerNorm(d), nn.Linear(d, 3 * e), nn.Linear(e, d)
    mha = nn.MultiheadAttention(e, 1, dropout=0.0, batch_first=True)
    with torch.no_grad():
        ln.weight.copy_(heads.norm_weight[h]), ln.bias.copy_(heads.norm_bias[h])
        lin1.weight.copy_(heads.qkv_weight[h]), lin1.bias.copy_(heads.qkv_bias[h])
        mha.in_proj_weight.copy_(heads.proj_weight[h].reshape(3 * e, e))
        mha.in_proj_bias.copy_(heads.proj_bias[h].reshape(3 * e))
        mha.out_proj.weight.copy_(heads.mix_weight[h]), mha.out_proj.bias.copy_(heads.mix_bias[h])
        lin2.weight.copy_(heads.out_weight[h]), lin2.bias.copy_(heads.out_bias[h])
        q, k, v = torch.split(lin1(ln(x)), e, dim=2)
        return lin2(mha(q, k, v, key_padding_mask=pad)[0])


@pytest.mark.parametrize("e", [1, 3])
def test_heads_are_the_reference_tiny_attention_averaged(e):
    torch.manual_seed(0)
    heads = TinyHeads(D, TinyAttentionConfig(num_heads=3, head_dim=e, init_scale=1.0, head_init_noise=0.1))
    with torch.no_grad():
        for p in heads.parameters():  # heads far apart and LayerNorm affine away from (1, 0)
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, -2:] = 0
    with torch.no_grad():
        ours = heads(x, allowed_positions(mask, 2, 6, causal=False, device=x.device))
    expected = sum(reference_head(heads, h, x, mask == 0) for h in range(3)) / 3
    real = mask.bool()  # padded query rows differ (the reference lets them attend; here they see themselves)
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-5, atol=1e-5)


# -- the mechanism: context, padding, causality ------------------------------------------------------
def adapter_delta(layer: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out, ref = layer(x, **kwargs), layer.base_layer(x, **kwargs)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    return out - ref


def reads_other_positions(layer: nn.Module, query: int, changed: int, **kwargs) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, D, generator=g)
    y = x.clone()
    y[0, changed] += torch.randn(D, generator=g)
    return not torch.allclose(adapter_delta(layer, x, **kwargs)[0, query], adapter_delta(layer, y, **kwargs)[0, query],
                              atol=1e-7)


def test_the_change_at_a_position_depends_on_the_other_positions():
    pm = get_peft_model(BUILDERS["bert"](), TinyAttentionConfig())
    perturb(pm)
    layer = layers(pm)[0]
    assert reads_other_positions(layer, query=0, changed=4) and reads_other_positions(layer, query=5, changed=1)
    # The nearest neighbour, a parallel adapter at the same place (GPT-2's attention, reading the same
    # input), is position-wise: the same probe finds no dependence there.
    tiny = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    parallel = get_peft_model(BUILDERS["gpt2"](), ParallelAdapterConfig(bottleneck=8, placement="attention"))
    perturb(tiny), perturb(parallel)
    pl = [m for m in parallel.modules() if isinstance(m, ParallelAdapterLayer)][0]
    assert wrapped(tiny, TinyAttentionLayer) == wrapped(parallel, ParallelAdapterLayer)
    assert reads_other_positions(layers(tiny)[0], query=5, changed=0)
    assert not reads_other_positions(pl, query=5, changed=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_decoder_adapter_is_causal(kind):
    pm = get_peft_model(BUILDERS[kind](), TinyAttentionConfig())
    perturb(pm)
    layer = [m for m in layers(pm) if m.causal][0]
    extra = {}
    if kind == "llama":
        rotary = pm.base_model.model.rotary_emb
        extra["position_embeddings"] = rotary(torch.zeros(1, 6, D), torch.arange(6)[None])
        extra["attention_mask"] = None
    assert reads_other_positions(layer, query=5, changed=0, **extra)  # it looks back
    assert not reads_other_positions(layer, query=2, changed=4, **extra)  # never ahead, with no mask given


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_later_tokens_do_not_change_earlier_logits(kind):
    pm = get_peft_model(BUILDERS[kind](), TinyAttentionConfig())
    perturb(pm, std=0.5)
    ids = model_inputs(kind, batch=1)["input_ids"]
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 7) % 100
    with torch.no_grad():
        a, b = pm(input_ids=ids).logits, pm(input_ids=other).logits
    torch.testing.assert_close(a[0, :-1], b[0, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_padding_does_not_reach_the_real_tokens(kind):
    """The base attention ignores padded keys; with the tiny attention reading them, the real tokens'
    states would change with the padding's content."""
    pm = get_peft_model(BUILDERS[kind](), TinyAttentionConfig())
    perturb(pm, std=0.5)
    inputs = model_inputs(kind)  # example 0: its last two positions are padding
    pad, real = slice(-2, None), slice(None, -2)
    if kind in ("gpt2", "llama"):  # left padding: right padding is behind the real tokens for a causal model
        inputs["attention_mask"] = inputs["attention_mask"].flip(1)
        pad, real = slice(None, 2), slice(2, None)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, pad] = torch.tensor([11, 12])
    if kind == "t5":
        for batch in (inputs, other):
            batch["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        a = pm(**inputs, output_hidden_states=True)
        b = pm(**other, output_hidden_states=True)
    key = "encoder_last_hidden_state" if kind == "t5" else "hidden_states"
    ha, hb = (a[key], b[key]) if kind == "t5" else (a[key][-1], b[key][-1])
    torch.testing.assert_close(ha[0, real], hb[0, real], rtol=0, atol=1e-5)
    if kind == "t5":
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    # Without the mask the same change does reach them (the check above is not vacuous).
    layer = layers(pm)[0]
    x = torch.randn(1, 6, D)
    y = x.clone()
    y[0, -1] += torch.randn(D)  # (a constant shift would vanish in the LayerNorm)
    keep = torch.tensor([[1, 1, 1, 1, 1, 0]])
    full = allowed_positions(None, 1, 6, layer.causal, x.device)
    masked = allowed_positions(keep, 1, 6, layer.causal, x.device)
    heads = layer.tiny_attn["default"]
    with torch.no_grad():
        if not layer.causal:
            assert not torch.allclose(heads(x, full)[0, :5], heads(y, full)[0, :5])
        torch.testing.assert_close(heads(x, masked)[0, :5], heads(y, masked)[0, :5], rtol=0, atol=0)


def test_additive_and_boolean_four_dimensional_masks_read_alike():
    keep = torch.tensor([[1, 1, 1, 0]]).bool()
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    boolean = keep[:, None, None, :].expand(1, 1, 4, 4)
    a = allowed_positions(additive, 1, 4, causal=True, device=torch.device("cpu"))
    b = allowed_positions(boolean, 1, 4, causal=True, device=torch.device("cpu"))
    c = allowed_positions(keep.long(), 1, 4, causal=True, device=torch.device("cpu"))
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()  # row 3 sees itself
    assert torch.equal(a[0], expected) and torch.equal(b[0], expected) and torch.equal(c[0], expected)


# -- parameter averaging of the heads ----------------------------------------------------------------
def spread_heads(heads: TinyHeads, eps: float, seed: int = 0) -> None:
    """Move every head away from the shared starting point by eps times a fixed random direction."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * eps)


def test_averaging_writes_the_mean_and_computes_one_head():
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    perturb(pm)
    before = [{n: p.detach().clone() for n, p in layer.tiny_attn["default"].named_parameters()} for layer in layers(pm)]
    assert average_heads(pm, "default") == 2
    x = torch.randn(2, 5, D)
    allowed = allowed_positions(None, 2, 5, causal=True, device=x.device)
    for layer, old in zip(layers(pm), before):
        heads = layer.tiny_attn["default"]
        for n, p in heads.named_parameters():
            torch.testing.assert_close(p, old[n].mean(0, keepdim=True).expand_as(p), rtol=0, atol=1e-7)
        assert layer.settings["default"]["averaged"]
        one = TinyHeads(D, TinyAttentionConfig(num_heads=1))
        with torch.no_grad():
            for n, p in one.named_parameters():
                p.copy_(old[n].mean(0, keepdim=True))
            torch.testing.assert_close(heads(x, allowed, used=1), one(x, allowed), rtol=0, atol=1e-6)


def test_averaging_is_exact_for_equal_heads_and_second_order_near_a_common_point():
    """The paper's claim for deploying the averaged head: the mixture of H heads and the one head
    with their mean parameters agree — exactly when the heads are equal, and to second order in the
    heads' spread around their shared start (the error shrinks ~100x when the spread shrinks 10x)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    allowed = allowed_positions(None, 2, 7, causal=False, device=x.device)

    def gap(eps: float) -> float:
        torch.manual_seed(1)
        heads = TinyHeads(D, TinyAttentionConfig(num_heads=4, init_scale=1.0, head_init_noise=0.0), dtype=torch.float64)
        spread_heads(heads, 0.5, seed=9)  # a common point away from the init...
        with torch.no_grad():
            for p in heads.parameters():
                p.copy_(p[:1].expand_as(p))
        spread_heads(heads, eps)  # ...and heads spread around it
        with torch.no_grad():
            mixture = heads(x, allowed)
            heads.average()
            averaged = heads(x, allowed, used=1)
        return float((mixture - averaged).abs().max() / mixture.abs().max())

    assert gap(0.0) < 1e-6
    big, small = gap(2e-2), gap(2e-3)
    assert big > 1e-5  # averaging is not the identity on spread heads...
    assert 30 < big / small < 300  # ...but close, to second order


def test_averaged_adapter_saves_and_loads_with_the_same_shapes(tmp_path):
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    perturb(pm)
    shapes = {k: tuple(v.shape) for k, v in pm.adapter_state_dict().items()}
    average_heads(pm)
    expected = run(pm, "gpt2")
    assert {k: tuple(v.shape) for k, v in pm.adapter_state_dict().items()} == shapes
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)
    torch.testing.assert_close(run(loaded, "gpt2"), expected, rtol=0, atol=1e-6)


def test_averaging_an_unknown_adapter_is_refused():
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    with pytest.raises(PeftlabError, match=r"no tiny_attention adapter named 'nope'"):
        average_heads(pm, "nope")


def test_heads_start_from_one_draw_apart_by_the_noise_only():
    torch.manual_seed(0)
    heads = TinyHeads(D, TinyAttentionConfig(num_heads=4, head_init_noise=1e-6, init_scale=0.01))
    for name, p in heads.named_parameters():
        spread = (p - p[:1]).abs().max()
        if name in ("qkv_weight", "qkv_bias"):
            assert 0 < spread < 1e-5
        else:
            assert spread == 0
    assert heads.out_weight.abs().max() <= 0.01 and heads.out_weight.abs().max() > 0
    zero = TinyHeads(D, TinyAttentionConfig())
    assert zero.out_weight.abs().max() == 0 and zero.out_bias.abs().max() == 0


# -- training mode, cache ----------------------------------------------------------------------------
def test_dropout_runs_in_training_only_and_the_wrapper_follows_the_model_mode():
    pm = get_peft_model(BUILDERS["bert"](), TinyAttentionConfig(dropout=0.5))
    perturb(pm)
    assert not any(m.training for m in layers(pm))  # the tiny model was in eval mode
    assert torch.equal(run(pm, "bert"), run(pm, "bert"))
    pm.train()
    torch.manual_seed(0)
    assert not torch.equal(run(pm, "bert"), run(pm, "bert"))


def test_incremental_decoding_with_a_cache_is_refused():
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    ids = model_inputs("gpt2", batch=1)["input_ids"]
    with torch.no_grad():
        first = pm(input_ids=ids[:, :-1], use_cache=True)  # an empty cache is fine
        with pytest.raises(PeftlabError, match="use_cache=False"):
            pm(input_ids=ids[:, -1:], cache=first.past_key_values, use_cache=True)
        pm(input_ids=ids, use_cache=False)


# -- save / load -------------------------------------------------------------------------------------
def test_save_load_strict_keys_shapes_and_outputs(tmp_path):
    config = TinyAttentionConfig(num_heads=2, head_dim=3)
    pm = get_peft_model(BUILDERS["bert"](), config)
    perturb(pm)
    expected = run(pm, "bert")
    state = pm.adapter_state_dict()
    site = "base_model.model.bert.encoder.layer.0.attention.tiny_attn"
    shapes = {"norm_weight": (2, D), "norm_bias": (2, D), "qkv_weight": (2, 9, D), "qkv_bias": (2, 9),
              "proj_weight": (2, 3, 3, 3), "proj_bias": (2, 3, 3), "mix_weight": (2, 3, 3), "mix_bias": (2, 3),
              "out_weight": (2, D, 3), "out_bias": (2, D)}
    assert {k.removeprefix(site + "."): tuple(v.shape) for k, v in state.items() if k.startswith(site)} == shapes
    assert len(state) == 2 * len(shapes)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path)
    torch.testing.assert_close(run(loaded, "bert"), expected, rtol=0, atol=0)
    saved = loaded.peft_configs["default"]
    assert (saved.num_heads, saved.head_dim, saved.dropout) == (2, 3, config.dropout)


@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_damaged_checkpoint_is_refused_and_leaves_the_model_unchanged(tmp_path, damage):
    get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig()).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("h.1.attn.tiny_attn.qkv_weight"))
    if damage == "missing":
        del tensors[key]
    elif damage == "shape":
        tensors[key] = torch.zeros(3, 3, D)
    else:
        key = key.replace("qkv_weight", "gate")
        tensors[key] = torch.zeros(D)
    save_file(tensors, str(weights))
    model = BUILDERS["gpt2"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=key.rsplit(".", 1)[-1]):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, TinyAttentionLayer) for m in model.modules())


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_option_saves_loads_disables_and_deletes(kind, tmp_path):
    check_lifecycle(kind, TinyAttentionConfig(num_heads=2, head_dim=2, init_scale=0.01), tmp_path)


def test_two_adapters_add_their_outputs():
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig())
    pm.add_adapter("other", TinyAttentionConfig(head_dim=2))
    perturb(pm, "default", seed=0)
    perturb(pm, "other", seed=1)
    layer = layers(pm)[0]
    x = torch.randn(1, 5, D)
    allowed = allowed_positions(None, 1, 5, causal=True, device=x.device)
    layer.set_active(["default", "other"])
    with torch.no_grad():
        expected = layer.tiny_attn["default"](x, allowed) + layer.tiny_attn["other"](x, allowed)
    torch.testing.assert_close(adapter_delta(layer, x), expected, rtol=1e-5, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"num_heads": 0}, "num_heads"), ({"num_heads": 2.0}, "num_heads"), ({"num_heads": True}, "num_heads"),
    ({"head_dim": -1}, "head_dim"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"init_scale": -1.0}, "init_scale"), ({"init_scale": float("nan")}, "init_scale"),
    ({"head_init_noise": -1e-6}, "head_init_noise"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=rf"TinyAttentionConfig\.{field}=.*expected"):
        TinyAttentionConfig(**kwargs)


def test_a_module_fed_something_else_than_the_hidden_states_is_refused():
    pm = get_peft_model(BUILDERS["gpt2"](), TinyAttentionConfig(targets=("mlp.c_proj",)))
    with pytest.raises(PeftlabError, match=r"built for hidden size 32 but its input has 128"):
        run(pm, "gpt2")


def test_unknown_mask_shape_is_refused():
    with pytest.raises(PeftlabError, match=r"mask, but got one of shape \(2,\)"):
        allowed_positions(torch.ones(2), 1, 2, causal=False, device=torch.device("cpu"))
