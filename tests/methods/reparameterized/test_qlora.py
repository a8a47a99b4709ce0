"""QLoRA: LoRA over NF4 base weights really stored in 4 bits (bitsandbytes), quantized in place or by
transformers' 4-bit loading, with peft's LoRA layout both ways and an exact merge."""
from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core import quant
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.qlora import QLoraConfig

from ...conftest import MINILM, main_output, model_inputs, perturb, require_shared, tiny_bert, tiny_gpt2

bnb = pytest.importorskip("bitsandbytes")


def _layers(pm):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer)}


def _run(model, kind="bert"):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def test_every_linear_layer_but_the_head_is_4bit_nf4_with_double_quantization():
    pm = get_peft_model(tiny_bert(), QLoraConfig())
    layers = _layers(pm)
    assert len(layers) == 13  # 2 layers x (q, k, v, attn out, ffn in, ffn out) + pooler
    for layer in layers.values():
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit)
        # two 4-bit codes per byte: half a byte per weight, nothing kept in full precision
        assert base.weight.dtype == torch.uint8 and base.weight.numel() == base.in_features * base.out_features // 2
        assert base.weight.quant_state.quant_type == "nf4" and base.weight.quant_state.nested
        assert not base.weight.requires_grad
    assert type(pm.base_model.classifier) is not bnb.nn.Linear4bit


def test_output_is_the_dequantized_base_plus_the_low_rank_update():
    pm = get_peft_model(tiny_bert(), QLoraConfig(r=4, alpha=8))
    perturb(pm)
    layer = _layers(pm)["bert.encoder.layer.0.attention.self.query"]
    w = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32)
    expected = x @ w.T + layer.base_layer.bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # The neighbour, LoRA on the full-precision weights, computes something else.
    fp = tiny_bert().bert.encoder.layer[0].attention.self.query
    assert not torch.allclose(fp(x) + 2.0 * (x @ a.T) @ b.T, expected, atol=1e-4)


def test_only_the_low_rank_factors_get_gradients():
    pm = get_peft_model(tiny_bert(), QLoraConfig())
    pm.train()
    out = main_output(pm(**model_inputs("bert")))
    out.square().mean().backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)


def test_gpt2_conv1d_layers_are_quantized_transposed():
    model = tiny_gpt2()
    reference = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, reference.weight.shape[0])
    expected = reference(x)
    pm = get_peft_model(model, QLoraConfig())
    base = _layers(pm)["transformer.h.0.attn.c_attn"].base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and (base.in_features, base.out_features) == tuple(reference.weight.shape)
    error = (base(x) - expected).norm() / expected.norm()
    assert error < 0.3  # NF4 rounding of a 32-wide layer (a transposed or wrong weight gives ~1.4)


def test_peftlab_quantization_equals_transformers_4bit_loading_and_adapters_move_both_ways(tmp_path):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    path = require_shared(MINILM)

    def loaded_4bit():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, quantization_config=config,
                                                                   device_map="cpu")
        # bitsandbytes would repack the weights for a bfloat16 kernel at the first no-grad eval forward
        # on AVX512-BF16 CPUs (17% off the logits of a strongly perturbed adapter): compare in float32.
        for module in model.modules():
            quant.keep_format(module)
        return model

    def full():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    ours = get_peft_model(full(), QLoraConfig(modules_to_save=["classifier"])).eval()
    theirs = loaded_4bit()
    q_ours = _layers(ours)["bert.encoder.layer.3.intermediate.dense"].base_layer.weight
    q_theirs = theirs.bert.encoder.layer[3].intermediate.dense.weight
    assert torch.equal(q_ours.data, q_theirs.data)  # the very same packed codes

    perturb(ours)
    inputs = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        expected = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["peftlab"]["method"] == "qlora"

    # peftlab -> peft, on the model transformers quantized
    import peft

    in_peft = peft.PeftModel.from_pretrained(loaded_4bit(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    # peftlab -> peftlab on a full-precision model (quantized on load) and on the transformers one
    for base in (full(), loaded_4bit()):
        back = PeftModel.from_pretrained(base, tmp_path / "ours")
        with torch.no_grad():
            torch.testing.assert_close(back(**inputs).logits, expected, atol=1e-5, rtol=1e-5)

    # peft's QLoRA (LoRA on a 4-bit model) -> peftlab
    targets = ["query", "key", "value", "dense"]  # every linear layer but the head, as QLoRA
    theirs_pm = peft.get_peft_model(loaded_4bit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    modules_to_save=["classifier"])).eval()
    _perturb_peft = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs_pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=_perturb_peft) * 0.3)
        want = theirs_pm(**inputs).logits
    theirs_pm.save_pretrained(tmp_path / "theirs")
    mine = PeftModel.from_pretrained(loaded_4bit(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(mine(**inputs).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_is_exact_in_full_precision_and_unmerge_puts_the_4bit_layer_back():
    pm = get_peft_model(tiny_bert(), QLoraConfig())
    perturb(pm)
    expected = _run(pm)
    layer = _layers(pm)["bert.encoder.layer.1.output.dense"]
    four_bit = layer.base_layer
    pm.merge_adapter()
    assert type(layer.base_layer) is nn.Linear
    torch.testing.assert_close(_run(pm), expected, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    assert layer.base_layer is four_bit
    merged = pm.merge_and_unload()
    torch.testing.assert_close(_run(merged), expected, atol=1e-5, rtol=1e-5)
    # Back to 4 bits for deployment: the update is rounded to the NF4 grid (the output moves).
    quant.quantize_model(merged, skip=("classifier",))
    assert not torch.allclose(_run(merged), expected, atol=1e-5)


def test_bad_input_is_refused_with_what_to_do():
    quantized = tiny_bert()
    quant.quantize_model(quantized, skip=("classifier",))
    with pytest.raises(PeftlabError, match="already quantized"):
        quant.quantize_model(quantized)
    with pytest.raises(PeftlabError, match=r"4-bit layers are \['nf4 \(double quantization\)'\].*fp4"):
        get_peft_model(quantized, QLoraConfig(quant_type="fp4"))
    with pytest.raises(PeftlabError, match="quant_type"):
        QLoraConfig(quant_type="int4")
    with pytest.raises(PeftlabError, match="compute_dtype"):
        QLoraConfig(compute_dtype="float64")
    # A bad target changes nothing: the targets are resolved before the model is quantized.
    model = tiny_bert()
    with pytest.raises(PeftlabError):
        get_peft_model(model, QLoraConfig(targets=["no_such_layer"]))
    assert not any(quant.is_quantized(m) for m in model.modules())


def test_a_failed_load_leaves_the_full_precision_model_as_given(tmp_path):
    pm = get_peft_model(tiny_bert(), QLoraConfig())
    pm.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(quant.is_quantized(m) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_without_bitsandbytes_the_error_says_to_install_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    model = tiny_bert()
    with pytest.raises(PeftlabError, match=r"pip install 'peftlab\[quant\]'"):
        get_peft_model(model, QLoraConfig())
    assert not any(quant.is_quantized(m) for m in model.modules())


def test_lora_on_a_transformers_4bit_model_is_plain_lora_over_4bit_layers():
    # peft's way of doing QLoRA (plain LoRA on a model loaded in 4 bits) works here too.
    model = tiny_bert()
    quant.quantize_model(model, skip=("classifier",))
    pm = get_peft_model(model, LoraConfig(targets="all-linear"))
    perturb(pm)
    expected = _run(pm)
    pm.merge_adapter()
    torch.testing.assert_close(_run(pm), expected, atol=1e-5, rtol=1e-5)


def test_dora_over_4bit_weights_reads_the_dequantized_base_and_merges_exactly():
    pm = get_peft_model(tiny_bert(), QLoraConfig(use_dora=True))
    layer = _layers(pm)["bert.encoder.layer.0.attention.self.query"]
    w = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], w.norm(dim=1))  # ||dequant(W0)||, not ||W0||
    perturb(pm)
    expected = _run(pm)
    pm.merge_adapter()
    torch.testing.assert_close(_run(pm), expected, atol=1e-5, rtol=1e-5)


def test_the_parameter_report_counts_the_weights_a_4bit_layer_stands_for():
    full = get_peft_model(tiny_bert(), LoraConfig(targets="all-linear")).trainable_parameters_report()
    four_bit = get_peft_model(tiny_bert(), QLoraConfig()).trainable_parameters_report()
    assert (four_bit.total, four_bit.trainable) == (full.total, full.trainable)  # not the packed half
