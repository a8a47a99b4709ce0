"""A peftlab LoRA adapter loads in HF peft with the same outputs, and the reverse."""
import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model

from .conftest import MINILM, STORIES, require_shared

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
