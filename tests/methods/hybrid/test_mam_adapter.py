"""MAM adapter: prefix tuning at attention + a scaled parallel adapter at the FFN, as one adapter."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab import ParallelAdapterConfig, PeftlabError, PeftModel, PrefixTuningConfig, config_from_dict, get_peft_model
from peftlab.methods.hybrid.mam_adapter import MAMAdapterConfig

from ...conftest import main_output, model_inputs, perturb, tiny_bert, tiny_llama


@pytest.mark.parametrize("make, kind", [(tiny_bert, "bert"), (tiny_llama, "llama")])
def test_equals_its_two_parts_applied_together(make, kind):
    config = MAMAdapterConfig(prefix=PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False),
                              adapter=ParallelAdapterConfig(bottleneck=4, scaling=4.0))
    mam = get_peft_model(make(), config)
    perturb(mam.adapter_parameters("default"), scale=0.2)
    # The same tensors as two separate adapters, both active at once (a stack).
    parts = get_peft_model(make(), config.prefix, "prefix")
    parts.add_adapter("adapter", config.adapter)
    parts.set_adapter(["prefix", "adapter"])
    state = mam.adapter_state_dict()
    parts.load_adapter_state_dict("prefix", {k: v for k, v in state.items() if "bottleneck" not in k})
    parts.load_adapter_state_dict("adapter", {k: v for k, v in state.items() if "bottleneck" in k})
    inputs = model_inputs(kind)
    with torch.no_grad():
        together = main_output(mam(**inputs))
        torch.testing.assert_close(together, main_output(parts(**inputs)))
        parts.set_adapter("prefix")  # either part alone is something else
        assert not torch.allclose(together, main_output(parts(**inputs)))
    assert {id(p) for p in mam.parameters() if p.requires_grad} == {id(p) for p in mam.adapter_parameters("default")}


def test_saved_and_loaded_as_one_adapter_with_nested_config(tmp_path):
    config = MAMAdapterConfig(modules_to_save=("classifier",))
    pm = get_peft_model(tiny_bert(), config)
    perturb(pm.adapter_parameters("default"), scale=0.2)
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["method"] == "mam_adapter"
    assert written["prefix"]["method"] == "prefix_tuning" and written["prefix"]["num_virtual_tokens"] == 30
    assert written["adapter"]["method"] == "parallel_adapter" and written["adapter"]["scaling"] == 4.0
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    inputs = model_inputs("bert")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(pm(**inputs)))
    loaded.delete_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(tiny_bert()(**inputs)))


def test_bad_parts_are_named():
    with pytest.raises(PeftlabError, match="MAMAdapterConfig.prefix: unknown method 'prefix_tunin'"):
        config_from_dict({"method": "mam_adapter", "prefix": {"method": "prefix_tunin"}})
    with pytest.raises(PeftlabError, match="prefix"):
        MAMAdapterConfig(prefix=ParallelAdapterConfig())
    with pytest.raises(PeftlabError, match="modules_to_save on the MAMAdapterConfig itself"):
        MAMAdapterConfig(adapter=ParallelAdapterConfig(modules_to_save=("classifier",)))
