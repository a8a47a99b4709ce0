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


def bert_takes_a_cache() -> bool:
    import inspect

    return "past_key_values" in inspect.signature(transformers.BertModel.forward).parameters


def greedy_by_forward(model, steps: int = 8) -> torch.Tensor:
    """Greedy decoding by a full forward pass per new token (no KV cache), positions counted over
    the real tokens as ``generate`` counts them: the reference for ``generate``."""
    seq, mask = IDS, MASK
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq


def generates_greedily(model) -> None:
    # peft's own generate is not the reference: with transformers 5.x it disagrees with peft's own
    # forward for soft prompts (peft 0.21.2). The forward outputs are compared with peft's directly.
    model.base_model.generation_config.eos_token_id = None  # decode every step, like the reference
    with torch.no_grad():
        out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_forward(model))


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
    generates_greedily(ours)


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
    generates_greedily(ours)


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
    if isinstance(make_config(), PrefixTuningConfig) and not bert_takes_a_cache():
        pytest.skip(f"transformers {transformers.__version__}'s BertModel takes no past_key_values, which peft "
                    f"{peft.__version__} needs for prefix tuning on BERT (peftlab does not): only the layout is compared")
    theirs = peft.PeftModel.from_pretrained(minilm(), tmp_path).eval()
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    # Token positions start after the prefix in both (BERT's absolute positions p, p+1, ...).
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_peft_prefix_mlp_width_carries_over_both_ways(tmp_path):
    """A peft adapter trained with the paper's MLP width (512, not peft's default of the model's 64)
    loads in peftlab with that width in its config, and peftlab's re-save loads back in peft: equal
    outputs all the way (the checkpoint holds the MLP's output, so the width only matters for training)."""
    trained = peft.get_peft_model(stories(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=512))
    perturb(trained, [p for p in trained.parameters() if p.requires_grad])
    trained.save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(stories(), tmp_path / "peft").eval()
    ours = PeftModel.from_pretrained(stories(), tmp_path / "peft")
    assert ours.peft_configs["default"].encoder_hidden_size == 512
    ours.save_pretrained(tmp_path / "peftlab")
    assert json.loads((tmp_path / "peftlab" / "adapter_config.json").read_text())["encoder_hidden_size"] == 512
    back = peft.PeftModel.from_pretrained(stories(), tmp_path / "peftlab").eval()
    assert back.peft_config["default"].encoder_hidden_size == 512
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(ours(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5, rtol=0)
