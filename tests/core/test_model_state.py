import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftModel, PeftlabError, get_peft_model
from peftlab.core import state

from ..conftest import main_output, model_inputs, tiny_bert


def _trained(seed=0):
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, targets=("query", "value"), modules_to_save=("classifier",)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def test_checkpoint_uses_peft_layout(tmp_path):
    pm = _trained()
    pm.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    assert not any(".default" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert "bert.encoder.layer.1.attention.self.value" in config["target_modules"]


def test_strict_load_names_missing_unexpected_and_misshapen_keys(tmp_path):
    pm = _trained()
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    tensors[key] = torch.zeros(3, 32)
    tensors["base_model.model.foreign.weight"] = torch.zeros(1)
    del tensors["base_model.model.classifier.bias"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError) as err:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    text = str(err.value)
    assert f"key {key!r} has shape (3, 32), expected (4, 32)" in text
    assert "unexpected key 'base_model.model.foreign.weight'" in text
    assert "missing key 'base_model.model.classifier.bias'" in text


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(PeftlabError, match="no adapter_config.json"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    pm = _trained(0)
    pm.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state, "save_file", boom)
    with pytest.raises(OSError):
        _trained(1).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either


def test_named_adapters_save_in_subfolders_and_load(tmp_path):
    pm = _trained(0)
    pm.add_adapter("other", LoraConfig(r=2, targets=("key",)))
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    expected = main_output(pm(**model_inputs("bert"))).detach()
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert torch.allclose(main_output(loaded(**model_inputs("bert"))), expected, atol=1e-6)
    with pytest.raises(PeftlabError, match="already exists"):
        loaded.load_adapter(tmp_path / "other", "other")


def test_is_trainable_and_report():
    pm = _trained()
    report = pm.trainable_parameters_report()
    assert report.trainable == sum(p.numel() for p in pm.adapter_parameters("default"))
    assert report.total == report.base + report.trainable
    assert f"{report.percent:.4f}" in str(report)


def test_bad_adapter_names_and_unknown_adapter():
    pm = _trained()
    with pytest.raises(PeftlabError, match="without '.'"):
        pm.add_adapter("a.b", LoraConfig())
    with pytest.raises(PeftlabError, match="no adapter named 'nope'"):
        pm.set_adapter("nope")
    with pytest.raises(PeftlabError, match="peftlab config"):
        pm.add_adapter("x", {"r": 8})


def test_partition_check_catches_hand_unfrozen_base():
    pm = _trained()
    pm.base_model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(PeftlabError, match="word_embeddings"):
        pm.check_parameter_partition()


def test_saved_files_follow_the_umask(tmp_path):
    import os

    from peftlab.assess.store import write_json_atomic

    pm = get_peft_model(tiny_bert(), LoraConfig(r=2))
    old = os.umask(0o022)
    try:
        pm.save_pretrained(tmp_path / "adapter")
        write_json_atomic(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    for file in [*(tmp_path / "adapter").iterdir(), tmp_path / "report.json"]:
        assert file.stat().st_mode & 0o777 == 0o644, file


@pytest.mark.parametrize("first,second", [
    (LoraConfig(r=2, targets=("value",)), "ia3"),
    ("bitfit", LoraConfig(r=2, targets=("query", "value"))),
], ids=["lora-under-ia3", "bitfit-under-lora"])
def test_an_adapter_wrapped_by_another_method_saves_under_the_models_own_names(first, second, tmp_path):
    from peftlab import BitFitConfig, IA3Config

    make = {"ia3": lambda: IA3Config(targets=("value",), feedforward=()), "bitfit": BitFitConfig}
    first = make[first]() if isinstance(first, str) else first
    second = make[second]() if isinstance(second, str) else second
    pm = get_peft_model(tiny_bert(), first, "inner")
    pm.add_adapter("outer", second)  # wraps the inner adapter's wrappers
    pm.set_adapter(["inner", "outer"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.adapter_parameters("inner") + pm.adapter_parameters("outer"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    assert not any("base_layer" in k for n in ("inner", "outer") for k in pm.adapter_state_dict(n))
    pm.save_pretrained(tmp_path)
    for name in ("inner", "outer"):
        written = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert not any("base_layer" in t for t in written.get("target_modules") or [])
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "inner", adapter_name="inner")
    loaded.load_adapter(tmp_path / "outer", "outer")
    loaded.set_adapter(["inner", "outer"])
    inputs = model_inputs("bert")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(pm(**inputs)))
