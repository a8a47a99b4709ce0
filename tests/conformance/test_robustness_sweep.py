"""Sweeps over every registered method: damaged checkpoints and ill-typed config values.

Each case must end in the library's own error (``CheckpointError`` for files, ``PeftlabError`` for
configs), never a raw library exception, a silent load or a model left changed. The counts of
cases run are printed with ``-s`` (the issue asked for them in the note).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, PeftlabError
from peftlab.core.registry import all_methods

from ..conftest import apply_method, begin_training, load_method, save_method, tiny_bert

SPECS = list(all_methods())
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _saved(spec, path):
    pm, _ = apply_method(spec, tiny_bert())
    if spec.hooks.before_training is not None:
        begin_training(pm, "bert")
    save_method(spec, pm, path)
    return pm


def _first_float_key(tensors):
    return next((k for k, t in tensors.items() if t.is_floating_point() and t.numel()), None)


def _damages(tensors, config):
    """(case name, new weights bytes or tensors or None, new config dict or text or None)."""
    key = next(iter(tensors))
    first_float = _first_float_key(tensors)
    method_key = "method" if "method" in config else "peft_type"
    yield "empty weights", b"", None
    yield "garbage weights", b"\x00garbage" * 8, None
    yield "truncated weights", "truncate", None
    yield "missing key", {k: v for k, v in tensors.items() if k != key}, None
    yield "unexpected key", {**tensors, "base_model.model.nowhere.weight": torch.zeros(2)}, None
    yield "wrong shape", {**tensors, key: torch.zeros(tensors[key].numel() + 3, dtype=tensors[key].dtype)}, None
    if first_float is not None:
        bad = tensors[first_float].clone()
        bad.view(-1)[0] = math.nan
        yield "NaN value", {**tensors, first_float: bad}, None
    yield "broken JSON", None, "{not json"
    yield "no method", None, {k: v for k, v in config.items() if k != method_key}
    yield "unknown method", None, {**config, method_key: "no_such_method"}
    yield "unknown field", None, {**config, "no_such_field": 1}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_damaged_checkpoint_is_refused_by_name(spec, tmp_path):
    _saved(spec, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS))
    config = json.loads((tmp_path / CONFIG).read_text())
    good_weights, good_config = (tmp_path / WEIGHTS).read_bytes(), (tmp_path / CONFIG).read_text()
    cases = 0
    for case, weights, new_config in _damages(tensors, config):
        (tmp_path / WEIGHTS).write_bytes(good_weights)
        (tmp_path / CONFIG).write_text(good_config)
        if weights == "truncate":
            (tmp_path / WEIGHTS).write_bytes(good_weights[: len(good_weights) // 2])
        elif isinstance(weights, bytes):
            (tmp_path / WEIGHTS).write_bytes(weights)
        elif weights is not None:
            save_file(weights, str(tmp_path / WEIGHTS), metadata=_metadata(tmp_path, good_weights))
        if new_config is not None:
            (tmp_path / CONFIG).write_text(new_config if isinstance(new_config, str) else json.dumps(new_config))
        base = tiny_bert()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(PeftlabError) as err:
            load_method(spec, base, tmp_path)
        assert isinstance(err.value, (CheckpointError, PeftlabError)), case
        assert str(tmp_path.name) in str(err.value) or any(w in str(err.value) for w in (CONFIG, WEIGHTS, "key")), \
            f"{case}: the error names neither the file nor the key: {err.value}"
        after = base.state_dict()
        # (a method built on other adapters has them loaded onto the base before its own file fails)
        assert spec.example is not None or list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items()), \
            f"{case}: a failed load changed the base model"
        cases += 1
    print(f"{spec.name}: {cases} damaged checkpoints refused")


def _metadata(path, good_weights):
    """The safetensors metadata of the good file (base-model shape, config hash), so a damaged
    tensor set is refused for its tensors, not for missing metadata."""
    from safetensors import safe_open

    probe = path / ".probe.safetensors"
    probe.write_bytes(good_weights)
    with safe_open(str(probe), "pt") as handle:
        meta = handle.metadata() or {}
    probe.unlink()
    return meta


def _wrong_values(annotation):
    """Values of the wrong kind for a field annotated ``annotation``."""
    args = set(typing.get_args(annotation)) | {annotation}
    values: list = [object(), {"a": 1}]
    if not args & {str}:
        values.append("16")
    if args & {int, float} and bool not in args:
        values += [True, math.nan, math.inf] if float in args else [True, 1.5]
    if args & {bool}:
        values += ["yes", 2]
    return values


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_ill_typed_config_value_is_refused_by_field(spec):
    hints = typing.get_type_hints(spec.config_cls)
    cases = 0
    for field in dataclasses.fields(spec.config_cls):
        if not field.init:
            continue
        for value in _wrong_values(hints.get(field.name, typing.Any)):
            try:
                config = spec.config_cls(**{field.name: value})
            except PeftlabError as err:
                assert field.name in str(err), f"{field.name}={value!r}: the error does not name the field: {err}"
                cases += 1
                continue
            except Exception as err:  # noqa: BLE001 - the point: nothing but the library's error
                pytest.fail(f"{spec.name}: {field.name}={value!r} raised {type(err).__name__}: {err}")
            pytest.fail(f"{spec.name}: {field.name}={value!r} (of the wrong kind) was accepted as {config!r:.120}")
    print(f"{spec.name}: {cases} ill-typed values refused")
