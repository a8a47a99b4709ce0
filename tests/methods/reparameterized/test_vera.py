"""VeRA: one frozen random pair (A, B) shared by every layer, two trained vectors per layer;
regenerated from its seed exactly as HF peft draws it; peft's layout both ways."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftlab import PeftModel, get_peft_model
from peftlab.methods.reparameterized.vera import VeraConfig, VeraLayer

from ...conftest import model_inputs, perturb, tiny_bert

peft = pytest.importorskip("peft")


def _layers(pm):
    return [m for m in pm.base_model.modules() if isinstance(m, VeraLayer)]


def test_one_frozen_shared_pair_and_two_trained_vectors_per_layer_by_hand():
    pm = get_peft_model(tiny_bert(), VeraConfig(r=16, targets=("query", "value", "intermediate.dense")))
    layers = _layers(pm)
    assert len(layers) == 6
    shared = layers[0].shared[0]
    assert all(layer.shared[0] is shared for layer in layers)
    assert shared.vera_A["default"].shape == (16, 32) and shared.vera_B["default"].shape == (64, 16)  # largest layer
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(l.out_features + 16 for l in layers)
    assert not any(t.requires_grad for t in (shared.vera_A["default"], shared.vera_B["default"]))
    perturb(trainable)
    layer = layers[0]  # query: 32 -> 32, slices A[:, :32], B[:32]
    x = torch.randn(2, 5, 32)
    a, b = shared.vera_A["default"][:, :32], shared.vera_B["default"][:32]
    lam_b, lam_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    expected = layer.base_layer(x) + lam_b * (((x @ a.T) * lam_d) @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_identity_at_init_with_d_initial():
    pm = get_peft_model(tiny_bert(), VeraConfig(r=8))
    assert all(torch.equal(l.vera_lambda_d["default"], torch.full((8,), 0.1)) for l in _layers(pm))
    with torch.no_grad():
        torch.testing.assert_close(pm(**model_inputs("bert")).logits, tiny_bert()(**model_inputs("bert")).logits)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_reads_peftlab_vera_and_the_reverse(save_projection, tmp_path):
    # The head is saved with the adapter: peft expects it in a SEQ_CLS checkpoint.
    ours = get_peft_model(tiny_bert(), VeraConfig(r=8, targets=("query", "value"), save_projection=save_projection,
                                                  modules_to_save=("classifier",)))
    perturb(ours.adapter_parameters("default"))
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ("base_model.vera_A" in saved) == save_projection  # else regenerated from projection_prng_key
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    inputs = model_inputs("bert")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)
    trained = peft.get_peft_model(tiny_bert(), peft.VeraConfig(r=8, target_modules=["query", "value"],
                                                               save_projection=save_projection, projection_prng_key=7,
                                                               modules_to_save=["classifier"]))
    perturb([p for p in trained.parameters() if p.requires_grad], seed=2)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "theirs")
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits, atol=1e-5, rtol=0)
