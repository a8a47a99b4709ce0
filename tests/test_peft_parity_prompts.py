"""Soft prompts against HF peft: the same checkpoint gives the same outputs, loaded either way.

stories260K (a pretrained Llama with grouped-query attention) as a causal LM, and MiniLM (BERT) with
a new classification head. peft is a test-only dependency.
"""
from __future__ import annotations

import json

import pytest
import torch

from peftlab import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from .conftest import MINILM, STORIES, require_shared

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[0, 0, 1, 400, 300, 200], [1, 33, 44, 55, 66, 77]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding


def stories():
    return transformers.AutoModelForCausalLM.from_pretrained(require_shared(STORIES)).eval()


def minilm():
    torch.manual_seed(7)  # the same new head in every copy
    return transformers.AutoModelForSequenceClassification.from_pretrained(require_shared(MINILM), num_labels=2).eval()


def perturb(model, params) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def same_generation(ours, theirs, prompt_tuning: bool) -> None:
    # peft's prompt-tuning generate drops position ids, so left padding shifts its positions, while
    # peftlab keeps generate's padding-aware positions (as the base model has them): compare unpadded.
    ids, mask = (IDS[1:], MASK[1:]) if prompt_tuning else (IDS, MASK)
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(ours.generate(**kw), theirs.generate(**kw))


def test_peft_prompt_tuning_checkpoint_layout_matches_ours(tmp_path):
    theirs = peft.get_peft_model(stories(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    theirs.save_pretrained(tmp_path / "peft")
    ours = get_peft_model(stories(), PromptTuningConfig(num_virtual_tokens=5))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (5, 64)}
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()} == {"prompt_embeddings": (5, 64)}


@pytest.mark.parametrize("make_config", [
    lambda: PromptTuningConfig(num_virtual_tokens=5),
    lambda: PrefixTuningConfig(num_virtual_tokens=5),
    lambda: PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=False),
], ids=["prompt", "prefix-mlp", "prefix-direct"])
def test_peftlab_checkpoint_runs_the_same_in_peft(make_config, tmp_path):
    ours = get_peft_model(stories(), make_config())
    perturb(ours, ours.adapter_parameters("default"))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(stories(), tmp_path).eval()
    with torch.no_grad():
        a = ours(input_ids=IDS, attention_mask=MASK, labels=IDS)
        b = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS)
    # Prompt tuning keeps the p prompt positions in the logits, in both libraries.
    assert a.logits.shape == b.logits.shape
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    same_generation(ours, theirs, isinstance(make_config(), PromptTuningConfig))


@pytest.mark.parametrize("make_config", [
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True),
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
], ids=["prompt", "prefix-mlp", "prefix-direct"])
def test_peft_checkpoint_runs_the_same_in_peftlab(make_config, tmp_path):
    trained = peft.get_peft_model(stories(), make_config())
    perturb(trained, [p for p in trained.parameters() if p.requires_grad])
    trained.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(stories(), tmp_path).eval()
    ours = PeftModel.from_pretrained(stories(), tmp_path)
    with torch.no_grad():
        a = ours(input_ids=IDS, attention_mask=MASK).logits
        b = theirs(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    same_generation(ours, theirs, isinstance(make_config(), peft.PromptTuningConfig))


@pytest.mark.parametrize("make_config", [
    lambda: PromptTuningConfig(num_virtual_tokens=4, modules_to_save=("classifier",)),
    lambda: PrefixTuningConfig(num_virtual_tokens=4, modules_to_save=("classifier",)),
], ids=["prompt", "prefix"])
def test_bert_classifier_checkpoint_layout_and_outputs(make_config, tmp_path):
    ours = get_peft_model(minilm(), make_config())
    perturb(ours, ours.adapter_parameters("default"))
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS"
    state = ours.adapter_state_dict()
    width = 384 if isinstance(make_config(), PromptTuningConfig) else 6 * 2 * 384
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_embeddings": (4, width), "base_model.classifier.weight": (2, 384), "base_model.classifier.bias": (2,)}
    theirs = peft.PeftModel.from_pretrained(minilm(), tmp_path).eval()
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    # Token positions start after the prefix in both (BERT's absolute positions p, p+1, ...).
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
