"""LoftQ: alternating NF4 quantization and rank-r SVD start LoRA over a really 4-bit base; the error
to W falls with T and beats QLoRA's; Q travels packed in the checkpoint and loads back exactly onto a
fresh full-precision model; bad input is refused before anything changes; merging is exact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core import quant
from peftlab.core.layer import DeltaModule
from peftlab.core.registry import get_method
from peftlab.methods.reparameterized.loftq import LoftQConfig, LoftQLayer, dequantize, loftq_init, quantize_base

from ...conftest import MINILM, main_output, model_inputs, perturb, require_shared, tiny_bert, tiny_gpt2, tiny_t5

bnb = pytest.importorskip("bitsandbytes")

QUERY = "bert.encoder.layer.0.attention.self.query"


def _run(model, kind="bert"):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def _layers(pm):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, LoftQLayer)}


def _qlora_error(w):
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return float((w - bnb.functional.dequantize_4bit(q, state)).norm() / w.norm())


def _loftq_error(w, r, t, scale=1.0):
    init = loftq_init(w, r, t, scale)
    approx = dequantize(init.qweight, init.absmax, tuple(w.shape)) + scale * init.lora_B @ init.lora_A
    return float((w - approx).norm() / w.norm())


# -- 1. the error to W ------------------------------------------------------------------------
def test_error_falls_with_iterations_and_is_below_qlora_on_a_minilm_layer():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(require_shared(MINILM)))
    w = model.encoder.layer[0].attention.self.query.weight.detach()
    qlora = _qlora_error(w)
    errors = [_loftq_error(w, 8, t) for t in range(1, 6)]
    print(f"\nMiniLM layer.0 query, r=8: QLoRA {qlora:.5f}; LoftQ T=1..5 " + " ".join(f"{e:.5f}" for e in errors))
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] < qlora


def test_error_falls_with_iterations_on_a_heavy_tailed_matrix():
    g = torch.Generator().manual_seed(0)
    # Low-rank structure plus heavy-tailed noise: what a pretrained weight looks like to NF4.
    w = torch.randn(96, 8, generator=g) @ torch.randn(8, 64, generator=g) * 0.05
    w += torch.distributions.StudentT(3.0).sample((96, 64)) * 0.02
    qlora = _qlora_error(w)
    errors = [_loftq_error(w, 8, t) for t in (1, 2, 5)]
    assert errors[2] <= errors[1] <= errors[0] < qlora and errors[2] < errors[0]


def test_the_factors_are_divided_by_the_lora_scale():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    one, four = loftq_init(w, 4, 3, scale=1.0), loftq_init(w, 4, 3, scale=4.0)
    assert torch.equal(one.qweight, four.qweight) and torch.equal(one.absmax, four.absmax)
    torch.testing.assert_close(4.0 * four.lora_B @ four.lora_A, one.lora_B @ one.lora_A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(four.lora_B * 2.0, one.lora_B)  # split evenly: each factor / sqrt(4)
    # The layer applies its config's scale (alpha / r = 2 by default), and gets the same start.
    pm = get_peft_model(tiny_bert(), LoftQConfig(iterations=2))
    layer = _layers(pm)[QUERY]
    w0 = tiny_bert().get_submodule(QUERY).weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    start = layer.dequantized("default") + layer.settings["default"] * b @ a
    assert layer.settings["default"] == 2.0
    assert (w0 - start).norm() < (w0 - layer.dequantized("default")).norm()
    init = loftq_init(w0, 8, 2, 2.0)
    assert torch.equal(layer.loftq_qweight["default"], init.qweight)
    torch.testing.assert_close(layer.lora_A["default"].weight, init.lora_A)


def test_rank_beyond_the_matrix_is_zero_padded():
    init = loftq_init(torch.randn(6, 64), 8, 1)
    assert init.lora_A.shape == (8, 64) and init.lora_B.shape == (6, 8)
    assert not init.lora_A[6:].any() and not init.lora_B[:, 6:].any()


# -- 2. the base is 4-bit; only A and B train -------------------------------------------------
def test_each_linear_layer_holds_q_packed_and_computes_with_it():
    pm = get_peft_model(tiny_bert(), LoftQConfig(r=4, alpha=8, keep_full_precision=True))
    layers = _layers(pm)
    assert len(layers) == 13  # 2 blocks x (q, k, v, attn out, ffn in, ffn out) + pooler; not the head
    layer = layers[QUERY]
    codes, scales = layer.loftq_qweight["default"], layer.loftq_absmax["default"]
    assert codes.dtype == torch.uint8 and codes.numel() == 32 * 32 // 2  # two 4-bit codes per byte
    assert scales.dtype == torch.float32 and scales.numel() == 32 * 32 // 64
    perturb(pm)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32)
    q = layer.dequantized("default")
    expected = x @ q.T + layer.base_layer.bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # It is Q, not the full-precision weight the layer keeps, that computes.
    w = layer.base_layer.weight
    assert not torch.allclose(x @ w.T + layer.base_layer.bias + 2.0 * (x @ a.T) @ b.T, expected, atol=1e-4)
    # 16 NF4 levels per block, as bitsandbytes' own Linear4bit computes them.
    reference = bnb.nn.Linear4bit(32, 32, bias=False, compress_statistics=False, quant_type="nf4")
    reference.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=bnb.functional.QuantState(
        absmax=scales, shape=torch.Size([32, 32]), code=bnb.functional.get_4bit_type("nf4", device="cpu"), blocksize=64,
        quant_type="nf4", dtype=torch.float32), bnb_quantized=True, module=reference)
    torch.testing.assert_close(reference(x), x @ q.T)
    assert all(len(torch.unique(blk)) <= 16 for blk in (q.reshape(-1, 64) / scales[:, None]))


def test_released_layers_are_bitsandbytes_linear4bit_and_drop_the_full_precision_weight():
    keep = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=True))
    pm = get_peft_model(tiny_bert(), LoftQConfig())  # the default: the layers are replaced
    for name, layer in _layers(pm).items():
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit), name
        assert base.weight.dtype == torch.uint8 and not base.weight.quant_state.nested
        # the Linear4bit holds the very codes the checkpoint saves (no copy)
        assert base.weight.data_ptr() == layer.loftq_qweight["default"].data_ptr()
        assert not any(p.is_floating_point() and p.shape == (layer.out_features, layer.in_features)
                       for p in layer.parameters() if not p.requires_grad), f"{name} kept a full-precision weight"
    # Same Q and factors: the same outputs as with the full-precision layers kept, in less memory.
    perturb(keep), perturb(pm)
    torch.testing.assert_close(_run(pm), _run(keep), atol=1e-6, rtol=0)

    def size(model):
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    assert size(pm) < size(keep) - 0.8 * 13 * 4 * 32 * 32  # most of the 13 layers' fp32 weights are gone


def test_only_the_low_rank_factors_train_and_the_4bit_base_stays():
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    layer = _layers(pm)[QUERY]
    codes, scales = layer.loftq_qweight["default"].clone(), layer.loftq_absmax["default"].clone()
    a = layer.lora_A["default"].weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    pm.train()
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    out = main_output(pm(**model_inputs("bert")))
    out.square().mean().backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and grads == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in grads)
    optimizer.step()
    assert not torch.equal(layer.lora_A["default"].weight, a)
    assert torch.equal(layer.loftq_qweight["default"], codes) and torch.equal(layer.loftq_absmax["default"], scales)
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)


@pytest.mark.parametrize("keep", [True, False])
def test_gpt2_conv1d_layers_read_their_weight_transposed(keep):
    pm = get_peft_model(tiny_gpt2(), LoftQConfig(r=4, alpha=4, keep_full_precision=keep))
    layer = _layers(pm)["transformer.h.0.attn.c_attn"]
    conv = tiny_gpt2().transformer.h[0].attn.c_attn  # Conv1D: weight in x out
    assert (layer.out_features, layer.in_features) == (96, 32)
    assert layer.transposed == keep  # the Linear4bit that replaces it holds out x in
    init = loftq_init(conv.weight.T, 4, 5)
    assert torch.equal(layer.loftq_qweight["default"], init.qweight)
    perturb(pm)
    x = torch.randn(2, 3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ layer.dequantized("default").T + conv.bias + (x @ a.T) @ b.T,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_a_dtype_cast_keeps_the_block_scales_float32(keep):
    pm = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=keep))
    scales = _layers(pm)[QUERY].loftq_absmax["default"].clone()
    pm.to(torch.bfloat16)
    layer = _layers(pm)[QUERY]
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    assert torch.equal(layer.loftq_absmax["default"], scales)
    if not keep:  # the Linear4bit still computes with the adapter's very codes and scales
        assert layer.base_layer.weight.data_ptr() == layer.loftq_qweight["default"].data_ptr()
        assert layer.base_layer.weight.quant_state.absmax is layer.loftq_absmax["default"]
    assert main_output(pm(**model_inputs("bert"))).dtype == torch.bfloat16


def test_t5_keeps_wo_full_precision_as_transformers_4bit_loading_does_and_still_computes_with_q(tmp_path):
    inputs = {**model_inputs("t5"), "decoder_input_ids": torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])}
    pm = get_peft_model(tiny_t5(), LoftQConfig())
    layers = _layers(pm)
    wo = {n: m for n, m in layers.items() if n.endswith(".wo")}
    assert wo and all(not m.released and type(m.base_layer) is torch.nn.Linear for m in wo.values())
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for n, m in layers.items() if n not in wo)
    layer = next(iter(wo.values()))
    x = torch.randn(2, 3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ layer.dequantized("default").T + 2.0 * (x @ a.T) @ b.T,
                               atol=1e-5, rtol=1e-5)
    perturb(pm)
    with torch.no_grad():
        expected = main_output(pm(**inputs))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path)
    with torch.no_grad():
        assert torch.equal(main_output(loaded(**inputs)), expected)


# -- 3. save and load ---------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [True, False])
def test_saved_adapter_loads_onto_a_fresh_full_precision_model_exactly(keep, tmp_path):
    pm = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=keep))
    perturb(pm)
    expected = _run(pm)
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "loftq" and "peft_type" not in config
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = f"base_model.model.{QUERY}."
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {
        "lora_A.weight", "lora_B.weight", "loftq_qweight", "loftq_absmax"}
    assert tensors[prefix + "loftq_qweight"].dtype == torch.uint8
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(_run(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_the_loaded_q_is_the_saved_one_not_a_recomputed_one(tmp_path):
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = f"base_model.model.{QUERY}.loftq_qweight"
    changed = tensors[key].clone()
    changed[:10] ^= 0x11  # other (valid) 4-bit codes
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    save_file({**tensors, key: changed}, str(file), metadata=metadata)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    layer = _layers(loaded)[QUERY]
    assert torch.equal(layer.loftq_qweight["default"], changed) and torch.equal(layer.base_layer.weight, changed)
    assert not torch.equal(_run(loaded), _run(pm))
    # A Q from a checkpoint has no known LoftQ start here: no second LoftQ adapter over it.
    with pytest.raises(PeftlabError, match="made by a checkpoint's Q"):
        loaded.add_adapter("second", LoftQConfig())


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("damage", ["missing codes", "codes as floats", "negative scale"])
def test_a_damaged_q_is_refused_by_key_and_the_model_is_left_as_given(damage, keep, tmp_path):
    pm = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=keep))
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    codes, scales = f"base_model.model.{QUERY}.loftq_qweight", f"base_model.model.{QUERY}.loftq_absmax"
    if damage == "missing codes":
        del tensors[codes]
    elif damage == "codes as floats":
        tensors[codes] = tensors[codes].float()
    else:
        tensors[scales] = -tensors[scales]
    save_file(tensors, str(file), metadata=metadata)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="loftq_qweight" if damage != "negative scale" else "loftq_absmax"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the layers are put back
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# -- 4. bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,why", [(2, "no 2-bit kernel"), (8, "8-bit"), (3, "4-bit")])
def test_widths_other_than_4_bits_are_refused_by_name(bits, why):
    with pytest.raises(PeftlabError, match=rf"bits={bits}.*{why}"):
        LoftQConfig(bits=bits)


@pytest.mark.parametrize("field,value", [("iterations", 0), ("iterations", -2), ("quant_type", "int4"),
                                         ("use_dora", True), ("r", 0)])
def test_bad_values_are_refused_by_field(field, value):
    with pytest.raises(PeftlabError, match=field):
        LoftQConfig(**{field: value})


def test_the_decomposition_refuses_zero_steps():
    with pytest.raises(PeftlabError, match="iterations"):
        loftq_init(torch.randn(8, 64), 2, 0)


def test_an_already_quantized_model_is_refused_before_anything_changes():
    model = tiny_bert()
    quant.quantize_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError, match="already quantized"):
        get_peft_model(model, LoftQConfig())
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_one_quantized_layer_refuses_the_whole_adapter_and_no_other_layer_changes():
    model = tiny_bert()
    value = model.bert.encoder.layer[1].attention.self.value
    model.bert.encoder.layer[1].attention.self.value = quant.quantize_linear(value)
    modules = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PeftlabError, match=r"layer\.1\.attention\.self\.value.*already quantized"):
        get_peft_model(model, LoftQConfig(keep_full_precision=False))
    assert {n: type(m) for n, m in model.named_modules()} == modules  # the 12 others are not quantized either


def test_a_second_loftq_adapter_of_the_same_settings_shares_the_released_q():
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    perturb(pm)
    first = _run(pm)
    pm.add_adapter("second", LoftQConfig())
    assert torch.equal(_run(pm), first), "adding an inactive adapter changed the output"
    layer = _layers(pm)[QUERY]
    assert layer.loftq_qweight["second"].data_ptr() == layer.base_layer.weight.data_ptr()
    # ... and starts where LoftQ starts from the (dropped) full-precision weight
    init = loftq_init(tiny_bert().get_submodule(QUERY).weight, 8, 5, 2.0)
    assert torch.equal(layer.lora_A["second"].weight, init.lora_A)
    assert torch.equal(layer.lora_B["second"].weight, init.lora_B)
    pm.set_adapter("second")
    assert not torch.allclose(_run(pm), first)
    pm.delete_adapter("default")
    pm.add_adapter("third", LoftQConfig())  # the start outlives the adapter that brought it
    assert torch.equal(_layers(pm)[QUERY].lora_A["third"].weight, init.lora_A)


def test_a_released_layer_refuses_what_would_need_its_dropped_weight():
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    with pytest.raises(PeftlabError, match=r"same settings \(got r=4"):
        pm.add_adapter("other rank", LoftQConfig(r=4))
    with pytest.raises(PeftlabError, match="keep_full_precision=True cannot apply"):
        pm.add_adapter("kept", LoftQConfig(keep_full_precision=True))
    assert list(pm.peft_configs) == ["default"]
    lora_first = get_peft_model(tiny_bert(), LoraConfig(targets=("query",)))
    with pytest.raises(PeftlabError, match="wrapped by another adapter"):
        lora_first.add_adapter("loftq", LoftQConfig(targets=("query",)))
    kept = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=True))
    with pytest.raises(PeftlabError, match="keep_full_precision=False would drop"):
        kept.add_adapter("third", LoftQConfig(targets=("query",)))


def test_loading_an_adapter_trained_over_another_q_beside_one_that_shares_it_is_refused(tmp_path):
    trained = get_peft_model(tiny_bert(), LoftQConfig())
    trained.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    key = f"base_model.model.{QUERY}.loftq_qweight"
    tensors[key] = tensors[key] ^ 0x01
    save_file(tensors, str(file), metadata=metadata)
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    before = _run(pm)
    with pytest.raises(CheckpointError, match="trained over another Q"):
        pm.load_adapter(tmp_path, "other")
    assert list(pm.peft_configs) == ["default"] and torch.equal(_run(pm), before)


def test_kept_layers_hold_one_q_per_loftq_adapter_and_run_one_at_a_time():
    base = _run(tiny_bert())
    pm = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=True))
    pm.add_adapter("r4", LoftQConfig(r=4, alpha=4, keep_full_precision=True))
    layer = _layers(pm)[QUERY]
    assert not torch.equal(layer.loftq_qweight["default"], layer.loftq_qweight["r4"])  # Q depends on r
    first = _run(pm)
    pm.set_adapter("r4")
    assert not torch.allclose(_run(pm), first)
    pm.set_adapter(["default", "r4"])
    with pytest.raises(PeftlabError, match="one of them at a time"):
        _run(pm)
    pm.set_adapter("default")
    pm.delete_adapter("r4")
    torch.testing.assert_close(_run(pm), first, atol=0, rtol=0)
    pm.delete_adapter("default")
    torch.testing.assert_close(_run(pm), base, atol=0, rtol=0)


def test_plain_lora_stacks_on_a_released_layer():
    pm = get_peft_model(tiny_bert(), LoftQConfig())
    perturb(pm)
    loftq_only = _run(pm)
    pm.add_adapter("lora", LoraConfig(targets=("query", "value")))
    perturb(pm, "lora", 1)
    pm.set_adapter(["default", "lora"])
    assert not torch.allclose(_run(pm), loftq_only)
    pm.delete_adapter("lora")
    pm.set_adapter("default")
    torch.testing.assert_close(_run(pm), loftq_only, atol=0, rtol=0)


def test_released_adapter_disabled_or_deleted_computes_as_quantize_base():
    config = LoftQConfig()
    bare = tiny_bert()
    quantize_base(bare, config)
    assert isinstance(bare.get_submodule(QUERY), bnb.nn.Linear4bit)
    expected = _run(bare)
    pm = get_peft_model(tiny_bert(), config)
    perturb(pm)
    with pm.disable_adapter():
        torch.testing.assert_close(_run(pm), expected, atol=0, rtol=0)
    pm.delete_adapter("default")
    assert isinstance(pm.base_model.get_submodule(QUERY), bnb.nn.Linear4bit)
    torch.testing.assert_close(_run(pm), expected, atol=0, rtol=0)
    # Kept full-precision layers: the bare model is the base.
    kept = tiny_bert()
    quantize_base(kept, LoftQConfig(keep_full_precision=True))
    torch.testing.assert_close(_run(kept), _run(tiny_bert()), atol=0, rtol=0)


# -- 5. merging -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kind", [(tiny_bert, "bert"), (tiny_gpt2, "gpt2")])
def test_kept_layers_merge_q_plus_the_update_and_unmerge_restores_w(make, kind):
    pm = get_peft_model(make(), LoftQConfig(keep_full_precision=True))
    perturb(pm)
    expected = _run(pm, kind)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in _layers(pm).items()}
    pm.merge_adapter()
    for name, layer in _layers(pm).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        merged = layer.dequantized("default") + 2.0 * b @ a
        torch.testing.assert_close(layer.base_layer.weight, merged.T if layer.transposed else merged)
    merged_out = _run(pm, kind)
    pm.unmerge_adapter()
    assert all(torch.equal(m.base_layer.weight, weights[n]) for n, m in _layers(pm).items())
    assert torch.equal(_run(pm, kind), expected)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, DeltaModule) for m in plain.modules())
    error = (_run(plain, kind) - expected).abs().max().item()
    print(f"\n{kind}: merged vs unmerged output, max abs {error:.2e} (scale {expected.abs().max().item():.2e})")
    assert torch.allclose(merged_out, expected, atol=get_method("loftq").merge_tolerance, rtol=0)
    assert error <= get_method("loftq").merge_tolerance


@pytest.mark.parametrize("make,kind", [(tiny_bert, "bert"), (tiny_gpt2, "gpt2")])
def test_merging_a_released_layer_is_exact_and_unmerges_to_the_4bit_layer(make, kind):
    pm = get_peft_model(make(), LoftQConfig())
    perturb(pm)
    expected = _run(pm, kind)
    codes = {n: m.base_layer.weight.detach().clone() for n, m in _layers(pm).items()}
    pm.merge_adapter()
    for name, layer in _layers(pm).items():  # a full-precision layer holding dequant(Q) + s B A
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert type(layer.base_layer) is torch.nn.Linear
        torch.testing.assert_close(layer.base_layer.weight, layer.dequantized("default") + 2.0 * b @ a)
    error = (_run(pm, kind) - expected).abs().max().item()
    print(f"\n{kind}, released layers: merged vs unmerged output, max abs {error:.2e}")
    assert error <= get_method("loftq").merge_tolerance
    pm.unmerge_adapter()
    for name, layer in _layers(pm).items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and torch.equal(layer.base_layer.weight, codes[name])
    assert torch.equal(_run(pm, kind), expected)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, (DeltaModule, bnb.nn.Linear4bit)) for m in plain.modules())
    assert (_run(plain, kind) - expected).abs().max().item() <= get_method("loftq").merge_tolerance


def test_a_loftq_adapter_merges_first_in_a_kept_layer():
    pm = get_peft_model(tiny_bert(), LoftQConfig(keep_full_precision=True))
    pm.add_adapter("lora", LoraConfig(targets=("query",)))
    pm.set_adapter("lora")
    pm.merge_adapter("lora")
    with pytest.raises(PeftlabError, match="merges first"):
        pm.merge_adapter("default")
    pm.unmerge_adapter()
    pm.merge_adapter("default")
    pm.merge_adapter("lora")  # LoRA merges over LoftQ's Q + s B A
    pm.unmerge_adapter()
    torch.testing.assert_close(_layers(pm)[QUERY].base_layer.weight, tiny_bert().get_submodule(QUERY).weight,
                               atol=0, rtol=0)


def test_peft_names_are_accepted():
    config = LoftQConfig(lora_alpha=32, target_modules=["query"], lora_dropout=0.1)
    assert (config.alpha, config.targets, config.dropout) == (32, ("query",), 0.1)
    assert isinstance(get_peft_model(tiny_bert(), config).base_model.get_submodule(QUERY), LoftQLayer)
