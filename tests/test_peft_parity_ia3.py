"""(IA)^3 checkpoints move between peftlab and HF peft with identical outputs, on the real MiniLM."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from peftlab import IA3Config, PeftModel, get_peft_model

from .conftest import MINILM, require_shared

peft = pytest.importorskip("peft", reason="HF peft is the test-only reference for parity")


def minilm():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head starts the same in every copy
    return AutoModelForSequenceClassification.from_pretrained(require_shared(MINILM), num_labels=2).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_peft_checkpoint_loads_in_peftlab(tmp_path):
    config = peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                            feedforward_modules=["output.dense"])
    theirs = peft.get_peft_model(minilm(), config)
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=0)  # vectors and classifier
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"].shape == (384, 1)
    assert saved["base_model.model.bert.encoder.layer.0.output.dense.ia3_l"].shape == (1, 1536)

    ours = PeftModel.from_pretrained(minilm(), tmp_path)
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(minilm()), expected, atol=1e-3)  # the adapter really does something
    # Both fold the vectors into the weights the same way.
    theirs_merged = logits(theirs.merge_and_unload())
    torch.testing.assert_close(logits(ours.merge_and_unload()), theirs_merged, rtol=0, atol=1e-5)


def test_peftlab_checkpoint_loads_in_peft(tmp_path):
    ours = get_peft_model(minilm(), IA3Config(modules_to_save=("classifier",)))
    perturb(ours.adapter_parameters("default"), seed=1)
    ours.eval()
    expected = logits(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["task_type"] == "SEQ_CLS"
    assert len(saved["target_modules"]) == 18 and len(saved["feedforward_modules"]) == 6

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes the peftlab-only keys it skips
        theirs = peft.PeftModel.from_pretrained(minilm(), tmp_path).eval()
    ia3 = {n: p for n, p in theirs.named_parameters() if ".ia3_l." in n}
    assert len(ia3) == 18
    assert ia3["base_model.model.bert.encoder.layer.2.output.dense.ia3_l.default"].shape == (1, 1536)
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)


def test_gpt2_whole_c_attn_round_trips_and_split_vectors_are_refused_by_peft(tmp_path):
    from .conftest import tiny_gpt2

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = get_peft_model(tiny_gpt2(), IA3Config(split_fused_qkv=False))  # peft's whole-output scaling
    perturb(ours.adapter_parameters("default"), seed=2)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "whole")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "whole")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "back")
    back = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=1e-5)

    get_peft_model(tiny_gpt2(), IA3Config()).save_pretrained(tmp_path / "split")  # k, v blocks only
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "split")
