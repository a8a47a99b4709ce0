"""Damaged, mismatched or unsupported checkpoints are refused with the library's error, naming the
file, field or key; nothing loads silently wrong."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core import state

from ..conftest import tiny_bert


@pytest.fixture
def saved(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(r=2))
    pm.save_pretrained(tmp_path)
    return tmp_path


def _load(path):
    return PeftModel.from_pretrained(tiny_bert(), path)


@pytest.mark.parametrize("content", [b"", b"garbage", None], ids=["empty", "garbage", "truncated"])
def test_damaged_weights_name_the_file(saved, content):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if content is None else content)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is not a readable safetensors file"):
        _load(saved)


def test_broken_json_missing_fields_and_wrong_types_name_the_file_and_field(saved):
    config = saved / "adapter_config.json"
    good = json.loads(config.read_text())
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json is not valid JSON"):
        _load(saved)
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "r"}))
    with pytest.raises(CheckpointError, match="required field 'r' is missing"):
        _load(saved)
    config.write_text(json.dumps({**good, "r": "eight"}))
    with pytest.raises(CheckpointError, match="adapter_config.json.*r='eight'"):
        _load(saved)


def test_new_weights_beside_an_old_config_are_refused(saved):
    # A save interrupted between its two renames: weights of an alpha-8 adapter, config of alpha 16.
    pm = get_peft_model(tiny_bert(), LoraConfig(r=2, alpha=8))
    pm.save_pretrained(saved / "other")
    (saved / "adapter_model.safetensors").write_bytes((saved / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="saved with another adapter_config.json"):
        _load(saved)


def test_stale_temporaries_are_removed_by_the_next_save(saved):
    stale = saved / ".adapter_model.safetensors.abc.tmp"
    stale.write_bytes(b"x" * 1000)
    get_peft_model(tiny_bert(), LoraConfig(r=2)).save_pretrained(saved)
    assert not stale.exists()


def test_nan_or_inf_is_refused_naming_the_key(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)  # no config hash: as a file written by another tool
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds NaN or Inf"):
        _load(saved)


@pytest.mark.parametrize("feature,value", [("alora_invocation_tokens", [5, 6]), ("layers_to_transform", [0]),
                                           ("lora_bias", True), ("exclude_modules", ["x"]),
                                           ("rank_pattern", {"query": 4}), ("bias", "all")])
def test_peft_lora_features_peftlab_lacks_are_refused_by_name(saved, feature, value):
    config = saved / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), feature: value}))
    with pytest.raises(CheckpointError, match=f"sets {feature}="):
        _load(saved)


def test_unknown_fields_of_a_peftlab_config_are_refused(tmp_path):
    from peftlab import config_from_dict

    with pytest.raises(PeftlabError, match="has no field 'bottlenek'"):
        config_from_dict({"method": "sequential_adapter", "bottlenek": 8})


def test_a_single_re_string_target_is_a_regex_and_a_bad_regex_is_named():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=2, targets="re:.*attention\\.self\\.(query|key)"))
    assert len(pm._adapter_paths("default")) == 4
    with pytest.raises(PeftlabError, match="target regex '\\(' is not a valid regular expression"):
        get_peft_model(tiny_bert(), LoraConfig(r=2, targets=("re:(",)))
    assert state.CONFIG_HASH_KEY


def test_an_adapter_for_a_shallower_model_of_the_same_width_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def bert(layers):
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                                        num_attention_heads=4, intermediate_size=64))

    pm = get_peft_model(bert(2), LoraConfig(r=2))
    pm.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="saved for .*num_hidden_layers=2.*this model has num_hidden_layers=3"):
        PeftModel.from_pretrained(bert(3), tmp_path)
    PeftModel.from_pretrained(bert(2), tmp_path)  # its own shape loads
