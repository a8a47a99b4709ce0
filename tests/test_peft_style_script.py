"""A training script written the way HF peft's documentation writes one, with ``peft`` replaced by
``peftlab``: the calls and field names peft users know run unchanged."""
from __future__ import annotations

import pytest
import torch

from .conftest import MINILM, require_shared, tiny_bert


def test_peft_documentation_script_runs_on_peftlab(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftlab import (AutoPeftModelForSequenceClassification, LoraConfig, PeftConfig, PeftModel, TaskType,
                         get_peft_model)

    model_name_or_path = str(require_shared(MINILM))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=2)
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1,
                             target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total and model.peft_config["default"].alpha == 32

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        ids = torch.randint(1000, 5000, (4, 12), generator=g)
        outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=(ids[:, 0] % 2))
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "output_dir")

    config = PeftConfig.from_pretrained(tmp_path / "output_dir")
    assert config.base_model_name_or_path == model_name_or_path and config.task_type == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(config.base_model_name_or_path, num_labels=2)
    inference = PeftModel.from_pretrained(base, tmp_path / "output_dir")
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "output_dir", num_labels=2)
    ids = torch.randint(1000, 5000, (2, 9), generator=g)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(inference(input_ids=ids).logits, expected)
        torch.testing.assert_close(auto(input_ids=ids).logits, expected)
    assert inference.get_nb_trainable_parameters()[0] == 0  # is_trainable=False, peft's default


def test_peft_calls_for_adapters_and_state():
    from peftlab import (IA3Config, LoraConfig, PeftlabError, get_peft_model, get_peft_model_state_dict,
                         inject_adapter_in_model, set_peft_model_state_dict)

    pm = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    pm.add_adapter("other", IA3Config(target_modules=["value"], feedforward_modules=[]))
    assert pm.peft_config["other"].targets == ("value",)
    pm.set_adapter(["default", "other"])  # peft's list form: both apply, both train
    assert pm.active_adapters == ["default", "other"]
    assert {p for p in pm.parameters() if p.requires_grad} == set(pm.adapter_parameters("default") + pm.adapter_parameters("other"))
    status = pm.get_model_status()
    assert status["available_adapters"] == ["default", "other"] and status["enabled"]
    assert {row["name"] for row in pm.get_layer_status()} >= {"bert.encoder.layer.0.attention.self.query"}
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.add_(0.3)
        adapted = pm(input_ids=ids).logits
        pm.disable_adapter_layers()
        torch.testing.assert_close(pm(input_ids=ids).logits, tiny_bert()(input_ids=ids).logits)
        pm.enable_adapter_layers()
        torch.testing.assert_close(pm(input_ids=ids).logits, adapted)
    assert pm.get_base_model() is pm.base_model
    state = get_peft_model_state_dict(pm)
    fresh = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    set_peft_model_state_dict(fresh, state)
    assert all(torch.equal(fresh.adapter_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(PeftlabError, match="lora_alpha= .HF peft.s name. and alpha="):
        LoraConfig(alpha=4, lora_alpha=8)

    plain = inject_adapter_in_model(LoraConfig(r=2, target_modules=["query"]), tiny_bert())
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in plain.parameters() if p.requires_grad) == 2 * (2 * 32 + 32 * 2)


def test_an_adapter_loaded_for_inference_stays_frozen_while_new_ones_train(tmp_path):
    from peftlab import LoraConfig, PeftModel, get_peft_model

    get_peft_model(tiny_bert(), LoraConfig(r=2)).save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_bert(), tmp_path)  # is_trainable=False
    pm.add_adapter("new", LoraConfig(r=2))
    pm.set_adapter("new")
    assert pm.get_nb_trainable_parameters()[0] > 0
    pm.set_adapter("default")
    assert pm.get_nb_trainable_parameters()[0] == 0
    pm.load_adapter(tmp_path, "again", is_trainable=True)
    pm.set_adapter("again")
    assert pm.get_nb_trainable_parameters()[0] > 0


def test_a_failed_load_leaves_the_base_model_as_it_was(tmp_path):
    from peftlab import CheckpointError, LoraConfig, PeftModel, PeftlabError, get_peft_model

    get_peft_model(tiny_bert(), LoraConfig(r=4)).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text().replace('"r": 4', '"r": 2'))
    base = tiny_bert()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    modules = [type(m) for m in base.modules()]
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(base, tmp_path)
    assert [type(m) for m in base.modules()] == modules
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in base.named_parameters())
    with pytest.raises(PeftlabError, match="model must be the base nn.Module"):
        PeftModel.from_pretrained(str(tmp_path), tmp_path)
