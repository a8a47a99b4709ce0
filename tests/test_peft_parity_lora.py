"""A peftlab LoRA adapter loads in HF peft with the same outputs, and the reverse."""
import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model

from .conftest import MINILM, STORIES, require_shared, tiny_bert

peft = pytest.importorskip("peft", reason="HF peft is a test extra: pip install -e .[test]")


def _minilm():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # same random head in every copy
    return AutoModelForSequenceClassification.from_pretrained(require_shared(MINILM), num_labels=2).eval()


def _llama():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(require_shared(STORIES)).eval()


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("make,config,inputs", [
    (_minilm, LoraConfig(r=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",)),
     {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}),
    (_llama, LoraConfig(r=4, alpha=8, rslora=True, targets=("@query", "@value", "@ffn_out")),
     {"input_ids": torch.tensor([[1, 45, 99, 300, 7]])}),
])
def test_lora_both_ways(tmp_path, make, config, inputs):
    ours = get_peft_model(make(), config)
    _randomize(ours)
    with torch.no_grad():
        expected = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(**inputs).logits, expected, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(make(), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(back(**inputs).logits, expected, atol=1e-5)


def test_peft_trained_adapter_loads_strictly(tmp_path):
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize(model)
    inputs = {"input_ids": torch.tensor([[1, 45, 99]])}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, expected, atol=1e-5)


def test_a_classifier_adapter_saved_without_its_head_loads_in_peft(tmp_path):
    """peft's SEQ_CLS class expects the head in the file; without modules_to_save peftlab writes no
    task_type, so peft loads it with its generic class and keeps the base model's head, as peftlab does."""
    import json

    ours = get_peft_model(tiny_bert(), LoraConfig(r=4))
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.add_(0.2)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    ours.eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
