"""Mixed-adapter batches in LoRA: ``model(..., adapter_names=[...])`` gives every example exactly
what a call with only that example and only its adapter active gives."""
from __future__ import annotations

import pytest
import torch

from peftlab import LoraConfig, PeftlabError, get_peft_model
from peftlab.core.registry import all_methods

from ...conftest import TINY_MODELS, main_output, model_inputs

ADAPTERS = {
    "a": LoraConfig(r=4, alpha=8),
    "b": LoraConfig(r=8, alpha=16, targets=("@query", "@value", "@attn_out")),  # more targets, other rank
    "c": LoraConfig(r=2, alpha=2, rslora=True, dropout=0.3),
}


def _model(kind: str, adapters=ADAPTERS):
    pm = None
    for i, (name, config) in enumerate(adapters.items()):
        if pm is None:
            pm = get_peft_model(TINY_MODELS[kind](), config, name)
        else:
            pm.add_adapter(name, config)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pm.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def _alone(pm, inputs, i, name):
    one = {k: v[i:i + 1] for k, v in inputs.items()}
    with torch.no_grad():
        if name == "__base__":
            with pm.disable_adapter():
                return main_output(pm(**one))[0]
        pm.set_adapter(name)
        return main_output(pm(**one))[0]


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_each_example_matches_running_it_alone(kind):
    pm = _model(kind)
    inputs = model_inputs(kind, batch=6, length=8)
    names = ["b", "a", "__base__", "c", "a", "b"]
    with torch.no_grad():
        mixed = main_output(pm(**inputs, adapter_names=names))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], _alone(pm, inputs, i, name), atol=1e-5, rtol=1e-5)
    # the call changed nothing lasting: the active adapter and the plain forward are as before
    pm.set_adapter("a")
    with torch.no_grad():
        plain = main_output(pm(**inputs))
        again = main_output(pm(**inputs, adapter_names=["a"] * 6))
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)
    assert all(m.mixed_batch is None for _, m in pm._delta_modules())


def test_mixed_batch_differs_per_adapter():
    pm = _model("bert")
    inputs = model_inputs("bert", batch=2, length=8)
    same = {k: v[:1].repeat(2, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    with torch.no_grad():
        out = main_output(pm(**same, adapter_names=["a", "b"]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_embedding_targets_and_heads_in_a_mixed_batch():
    adapters = {
        "e1": LoraConfig(r=4, targets=("@embeddings", "@query"), modules_to_save=("classifier",)),
        "e2": LoraConfig(r=6, targets=("@embeddings",), modules_to_save=("classifier",)),
    }
    pm = _model("bert", adapters)
    inputs = model_inputs("bert", batch=4, length=8)
    names = ["e2", "e1", "__base__", "e2"]
    with torch.no_grad():
        mixed = main_output(pm(**inputs, adapter_names=names))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], _alone(pm, inputs, i, name), atol=1e-5, rtol=1e-5)


def test_gradients_reach_each_adapter_from_its_own_examples_only():
    pm = _model("llama", {"a": LoraConfig(), "b": LoraConfig()})
    pm.train()
    for name in ("a", "b"):  # train both at once: their weights must see gradients
        for p in pm.adapter_parameters(name):
            p.requires_grad_(True)
    inputs = model_inputs("llama", batch=2, length=8)
    main_output(pm(**inputs, adapter_names=["a", "a"])).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.adapter_parameters("a"))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in pm.adapter_parameters("b"))
    # and the mixed gradient equals the sum of the two single-adapter gradients
    ref = {}
    for i, name in enumerate(("a", "b")):
        pm.zero_grad(set_to_none=True)
        pm.set_adapter(name)
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        (main_output(pm(**one)).pow(2).sum() / main_output(pm(**inputs)).numel()).backward()
        ref.update({id(p): p.grad.clone() for p in pm.adapter_parameters(name)})
    for name in ("a", "b"):
        for p in pm.adapter_parameters(name):
            p.requires_grad_(True)
    pm.zero_grad(set_to_none=True)
    main_output(pm(**inputs, adapter_names=["a", "b"])).pow(2).mean().backward()
    for name in ("a", "b"):
        for p in pm.adapter_parameters(name):
            torch.testing.assert_close(p.grad, ref[id(p)], atol=1e-6, rtol=1e-4)


def test_dropout_applies_per_example_in_training():
    from peftlab.methods.reparameterized.lora import LoraLayer

    pm = _model("bert", {"d": LoraConfig(dropout=0.5), "n": LoraConfig()})
    for module in pm.modules():  # LoRA in training mode, the rest (BERT's own dropout) not
        if isinstance(module, LoraLayer):
            module.train()
    inputs = model_inputs("bert", batch=2, length=8)
    with torch.no_grad():
        first = main_output(pm(**inputs, adapter_names=["d", "n"]))
        second = main_output(pm(**inputs, adapter_names=["d", "n"]))
        torch.testing.assert_close(first[1], second[1])  # no dropout on the adapter without it
        assert not torch.allclose(first[0], second[0])  # a fresh mask per call on the one with it
        torch.testing.assert_close(first[1], _alone(pm, inputs, 1, "n"), atol=1e-5, rtol=1e-5)


def test_errors():
    pm = _model("bert")
    inputs = model_inputs("bert", batch=2, length=8)
    with pytest.raises(PeftlabError, match="2 examples"):
        pm(**inputs, adapter_names=["a", "b", "c"])
    with pytest.raises(PeftlabError, match="no adapter named 'zz'"):
        pm(**inputs, adapter_names=["a", "zz"])
    pm.merge_adapter("a")
    with pytest.raises(PeftlabError, match="merged"):
        pm(**inputs, adapter_names=["a", "b"])
    pm.unmerge_adapter("a")
    others = [s for s in all_methods() if not s.supports_mixed_batch]
    if others:
        pm.add_adapter("other", others[0].config_cls())
        with pytest.raises(PeftlabError, match="does not support mixed batches"):
            pm(**inputs, adapter_names=["a", "other"])
    assert all(m.mixed_batch is None for _, m in pm._delta_modules())
