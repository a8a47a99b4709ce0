"""ATTEMPT: each input's prompt is the target prompt plus an attention-weighted mixture of frozen
source prompts and the target's, the attention reading the max-pooled input."""
from __future__ import annotations

import math

import pytest
import torch

from peftlab import LoraConfig, PeftlabError, PeftModel, PromptTuningConfig, get_peft_model
from peftlab.methods.additive.attempt import AttemptConfig, AttemptPrompt

from ...conftest import tiny_bert

SOURCE = PromptTuningConfig(num_virtual_tokens=4, init="random")


def _model(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    pm = get_peft_model(tiny_bert(), SOURCE, "mnli")
    pm.add_adapter("sst2", SOURCE)
    pm.add_adapter("target", AttemptConfig(sources=("mnli", "sst2"), num_virtual_tokens=4, init="random",
                                           modules_to_save=("classifier",)))
    pm.set_adapter("target")
    with torch.no_grad():  # an attention away from its near-uniform start, so the weights differ per input
        for p in pm.model_adapters["attempt"].attention["target"].parameters():
            p.add_(torch.randn(p.shape) * 0.5)
    return pm


def _inputs(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, ids))
    return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}


def _prompts(pm: PeftModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    module = pm.model_adapters["attempt"]
    kwargs = dict(inputs)
    return module.prompt_for(pm.base_model, kwargs)


def test_the_prompt_of_an_input_is_the_mixture_computed_by_hand():
    pm = _model()
    module: AttemptPrompt = pm.model_adapters["attempt"]
    inputs = _inputs([[5, 9, 12, 7], [30, 31]])
    embeds = pm.base_model.get_input_embeddings()(inputs["input_ids"])
    target = module.prompt_embeddings["target"]
    sources = [pm.model_adapters["prompt_tuning"].prompt_embeddings[s] for s in ("mnli", "sst2")]
    prompts = torch.stack([*sources, target])
    attention = module.attention["target"]
    with torch.no_grad():
        for row, length in enumerate((4, 2)):
            pooled = embeds[row, :length].max(dim=0).values  # the real tokens only
            query = attention.norm(attention.up(torch.nn.functional.silu(attention.down(pooled))))
            scores = torch.stack([p.max(dim=0).values @ query for p in prompts]) / (target.shape[1] * math.e)
            want = target + sum(a * p for a, p in zip(scores.softmax(0), prompts))
            torch.testing.assert_close(_prompts(pm, inputs)[row], want, atol=1e-6, rtol=1e-5)


def test_each_input_gets_its_own_prompt_unlike_prompt_tuning():
    pm = _model()
    with torch.no_grad():
        prompts = _prompts(pm, _inputs([[5, 9, 12], [40, 41, 42]]))
    assert prompts.shape == (2, 4, pm.model_adapters["attempt"].prompt_embeddings["target"].shape[1])
    assert not torch.allclose(prompts[0], prompts[1])


def test_padding_does_not_change_an_example():
    pm = _model()
    pm.eval()
    with torch.no_grad():
        alone = pm(**_inputs([[5, 9, 12]])).logits
        padded = pm(**_inputs([[5, 9, 12], [7, 8, 9, 10, 11, 13, 14]])).logits[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_only_the_target_prompt_and_the_attention_train_and_the_sources_stay():
    pm = _model()
    before = {k: v.clone() for k, v in pm.adapter_state_dict("mnli").items()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("attempt" in n or "classifier" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    batch = {**_inputs([[5, 9, 12], [40, 41]]), "labels": torch.tensor([0, 1])}
    target_before = pm.adapter_state_dict("target")["prompt_embeddings"].clone()
    pm(**batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in pm.adapter_state_dict("mnli").items())
    assert not torch.equal(target_before, pm.adapter_state_dict("target")["prompt_embeddings"])
    assert {k.split(".")[0] for k in pm.adapter_state_dict("target")} == {"prompt_embeddings", "attention",
                                                                          "base_model"}


def test_saves_its_own_tensors_and_loads_onto_a_model_with_the_sources(tmp_path):
    pm = _model()
    pm.eval()
    inputs = _inputs([[5, 9, 12], [40, 41]])
    with torch.no_grad():
        want = pm(**inputs).logits
    pm.save_pretrained(tmp_path, adapter_names=["mnli", "sst2", "target"])
    torch.manual_seed(1)
    fresh = PeftModel.from_pretrained(tiny_bert(), tmp_path / "mnli", adapter_name="mnli")
    with pytest.raises(PeftlabError, match=r"builds on adapters \['sst2'\]"):
        fresh.load_adapter(tmp_path / "target", "target")
    fresh.load_adapter(tmp_path / "sst2", "sst2")
    fresh.load_adapter(tmp_path / "target", "target")
    fresh.set_adapter("target")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, want, atol=1e-6, rtol=1e-6)


def test_bad_sources_are_refused_by_name():
    pm = get_peft_model(tiny_bert(), SOURCE, "mnli")
    pm.add_adapter("lora", LoraConfig(r=2))
    with pytest.raises(PeftlabError, match=r"builds on adapters \['rte'\], which this model does not have"):
        pm.add_adapter("t", AttemptConfig(sources=("mnli", "rte"), num_virtual_tokens=4))
    with pytest.raises(PeftlabError, match=r"sources \['lora'\] are not prompt-tuning adapters"):
        pm.add_adapter("t", AttemptConfig(sources=("mnli", "lora"), num_virtual_tokens=4))
    with pytest.raises(PeftlabError, match=r"the sources have \{'mnli': 4\} rows and num_virtual_tokens=20"):
        pm.add_adapter("t", AttemptConfig(sources=("mnli",)))
    with pytest.raises(PeftlabError, match="sources is empty"):
        pm.add_adapter("t", AttemptConfig())
    assert list(pm.peft_config) == ["mnli", "lora"]  # nothing half-added
