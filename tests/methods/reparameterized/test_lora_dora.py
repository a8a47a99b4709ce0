"""DoRA, LoRA's weight-decomposed variant (``LoraConfig(use_dora=True)``): magnitude times a
LoRA-updated direction, the norm constant in backward; exact merge; peft's layout both ways."""
from __future__ import annotations

import pytest
import torch

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer

from ...conftest import main_output, model_inputs, perturb, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _layer(pm, suffix="layer.0.attention.self.query"):
    return next(m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer) and n.endswith(suffix))


def test_identity_at_init_and_the_magnitude_starts_at_the_row_norms():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, use_dora=True))
    layer = _layer(pm)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=1))
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(main_output(pm(**inputs)), main_output(tiny_bert()(**inputs)))


def test_layer_output_is_magnitude_times_normalised_direction_by_hand():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, alpha=8, use_dora=True))
    perturb(pm)
    layer = _layer(pm)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    x = torch.randn(3, 5, 32, requires_grad=True)
    direction = w0 + 2.0 * b @ a
    expected_w = m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()
    expected = x @ expected_w.T + bias
    got = layer(x)
    torch.testing.assert_close(got, expected)
    # The norm is a constant in backward (DoRA section 4.3): gradients match the detached formula.
    grads = torch.autograd.grad(got.square().sum(), [m, a, b])
    want = torch.autograd.grad(expected.square().sum(), [m, a, b])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    plain = get_peft_model(tiny_bert(), LoraConfig(r=4, alpha=8))
    plain.load_adapter_state_dict("default", {k: v for k, v in pm.adapter_state_dict().items() if "magnitude" not in k})
    assert not torch.allclose(_layer(plain)(x), got), "DoRA must differ from plain LoRA with the same A and B"


@pytest.mark.parametrize("make,kind", [(tiny_bert, "bert"), (tiny_gpt2, "gpt2"), (tiny_llama, "llama")])
def test_merge_is_exact_and_unmerge_restores_the_weights(make, kind):
    pm = get_peft_model(make(), LoraConfig(r=4, use_dora=True, targets=("@query", "@value", "@ffn_out")))
    perturb(pm)
    inputs = model_inputs(kind)
    weights = {n: p.detach().clone() for n, p in pm.base_model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        expected = main_output(pm(**inputs))
        pm.merge_adapter()
        torch.testing.assert_close(main_output(pm(**inputs)), expected, atol=1e-5, rtol=0)
        pm.unmerge_adapter()
        for n, p in pm.base_model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(main_output(pm.merge_and_unload()(**inputs)), expected, atol=1e-5, rtol=0)


def test_a_dora_and_a_plain_adapter_stack_and_mixed_batches_are_refused():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, use_dora=True), "dora")
    pm.add_adapter("plain", LoraConfig(r=4))
    perturb(pm, "dora", 0)
    perturb(pm, "plain", 1)
    layer = _layer(pm)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        pm.set_adapter("dora")
        after_dora = layer(x)
        a, b = layer.lora_A["plain"].weight, layer.lora_B["plain"].weight
        pm.set_adapter(["dora", "plain"])
        torch.testing.assert_close(layer(x), after_dora + x @ (b @ a).T * 4.0)  # alpha 16 / r 4
    with pytest.raises(PeftlabError, match="does not serve mixed batches"):
        pm(**model_inputs("bert"), adapter_names=["dora", "plain"])


def test_peft_reads_peftlab_dora_and_the_reverse(tmp_path):
    ours = get_peft_model(tiny_bert(), LoraConfig(r=4, use_dora=True, modules_to_save=("classifier",)))
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    inputs = model_inputs("bert")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)
    trained = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                               target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in trained.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "theirs")
    assert loaded.peft_configs["default"].use_dora
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits, atol=1e-5, rtol=0)
