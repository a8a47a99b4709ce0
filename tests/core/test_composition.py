"""Several adapters at once: stacked in one forward, and in generate every input-level adapter
(soft prompts, prefixes) takes part. Methods are found by what they do, not by name."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, get_peft_model
from peftlab.core.registry import all_methods

from ..conftest import model_inputs, perturb, tiny_llama


def _input_level_specs():
    found = []
    for spec in all_methods():
        if spec.example is not None:
            continue
        try:
            pm = get_peft_model(tiny_llama(), spec.config_cls())
        except PeftlabError:
            continue
        if pm._input_adapters():
            found.append(spec)
    return found


def test_generate_runs_every_input_level_adapter_and_matches_greedy_forward_passes():
    specs = _input_level_specs()
    if len(specs) < 2:
        pytest.skip("fewer than two input-level methods are registered")
    first, second = specs[:2]
    pm = get_peft_model(tiny_llama(), first.config_cls(), "one")
    pm.add_adapter("two", second.config_cls())
    perturb(pm.adapter_parameters("one"), seed=0, scale=0.5)
    perturb(pm.adapter_parameters("two"), seed=1, scale=0.5)
    pm.set_adapter(["one", "two"])
    pm.eval()
    pm.base_model.generation_config.eos_token_id = None
    inputs = model_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"].flip(1)  # left padding
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq, m = ids, mask
        for _ in range(5):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = pm(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
        pm.set_adapter("one")
        alone = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, seq)
    assert not torch.equal(out, alone), "the second input-level adapter took no part in generate"


def test_stacking_order_and_a_trainable_subset():
    specs = [s for s in all_methods() if s.example is None and not s.hooks.has_step_hooks]
    spec = specs[0]
    pm = get_peft_model(tiny_llama(), spec.config_cls(), "a")
    pm.add_adapter("b", spec.config_cls())
    pm.set_adapter(["a", "b"], trainable=["b"])
    assert pm.active_adapters == ["a", "b"] and pm.trainable_adapters() == ["b"]
    assert {id(p) for p in pm.parameters() if p.requires_grad} == {id(p) for p in pm.adapter_parameters("b")}
    with pytest.raises(PeftlabError, match="not active"):
        pm.set_adapter("a", trainable=["b"])
    pm.delete_adapter("a")
    assert pm.active_adapters == ["b"] and pm.trainable_adapters() == ["b"]
