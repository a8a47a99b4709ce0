import json

import pytest

import peftlab
from peftlab import LoraConfig, PeftlabError, config_from_dict
from peftlab.core.config import config_from_options
from peftlab.core.registry import FAMILIES, get_method


def test_list_methods_has_the_eight_core_methods_in_taxonomy_order():
    rows = peftlab.list_methods()
    names = [r[0] for r in rows]
    assert all(len(r) == 3 and r[1] in FAMILIES for r in rows)
    assert [FAMILIES.index(r[1]) for r in rows] == sorted(FAMILIES.index(r[1]) for r in rows)
    assert "lora" in names


def test_unknown_method_lists_known_ones():
    with pytest.raises(PeftlabError) as err:
        get_method("lroa")
    assert "lora" in str(err.value) and "Known methods" in str(err.value)


def test_config_is_frozen_validated_and_round_trips():
    config = LoraConfig(r=4, alpha=8, targets=["query", "value"])
    assert config.targets == ("query", "value")
    with pytest.raises(Exception):
        config.r = 3  # frozen
    with pytest.raises(PeftlabError, match=r"LoraConfig.r=0 is invalid: expected a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(PeftlabError, match="dropout"):
        LoraConfig(dropout=1.5)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "lora" and config_from_dict(data) == config


def test_config_without_method_is_refused():
    with pytest.raises(PeftlabError, match="names no method"):
        config_from_dict({"r": 8})


def test_options_from_the_command_line():
    config = config_from_options("lora", {"r": "4", "targets": "query,value", "rslora": "true"})
    assert config == LoraConfig(r=4, targets=("query", "value"), rslora=True)
    with pytest.raises(PeftlabError, match="has no option"):
        config_from_options("lora", {"rank": "4"})


def test_peft_spellings_of_none_and_one_are_normalised_and_empty_targets_refused():
    import pytest

    from peftlab import IA3Config, LoraConfig, PeftlabError

    assert LoraConfig(modules_to_save="classifier").modules_to_save == ("classifier",)
    assert LoraConfig(modules_to_save=None).modules_to_save == ()
    assert LoraConfig(targets=None).targets == LoraConfig().targets
    assert IA3Config(targets=None).targets == IA3Config().targets
    with pytest.raises(PeftlabError, match="targets=\\[\\]"):
        LoraConfig(targets=[])
    with pytest.raises(PeftlabError, match="modules_to_save"):
        LoraConfig(modules_to_save=[3])


def test_field_types_are_checked_for_every_method():
    import dataclasses
    import math
    import typing

    import pytest

    from peftlab import LoraConfig, PeftlabError
    from peftlab.core.registry import all_methods

    for bad in (dict(alpha="16"), dict(alpha=True), dict(rslora="yes"), dict(alpha=math.inf), dict(r=8.0)):
        with pytest.raises(PeftlabError, match=next(iter(bad))):
            LoraConfig(**bad)
    wrong = {bool: "yes", int: True, float: "1.0", str: 3}
    checked = 0
    for spec in all_methods():
        hints = typing.get_type_hints(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            kind = hints[f.name]
            if kind in wrong:
                with pytest.raises(PeftlabError, match=f.name):
                    spec.config_cls(**{f.name: wrong[kind]})
                checked += 1
    assert checked >= 20
