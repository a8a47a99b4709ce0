"""Every registered method, checked for the promises the core makes about all of them.

Each method is used with its config's defaults (targets default to architecture attach points),
on tiny BERT and GPT-2 models (strict) and a tiny Llama and T5 (skipped, with the method's own
error shown, when the method cannot apply to a model without biases). A method that declares
``encoder_only`` is skipped the same way on every model but BERT.
"""
from __future__ import annotations

import torch
import pytest

from peftlab import PeftModel, PeftlabError, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.registry import all_methods

from ..conftest import (TINY_MODELS, apply_method, begin_training, load_method, main_output, model_inputs, perturb,
                        save_method, tiny_t5)

# T5 too: an encoder-decoder model (cross-attention, relative positions, decoder inputs).
MODELS = {**TINY_MODELS, "t5": tiny_t5}

SPECS = all_methods()
CASES = [(spec, kind) for spec in SPECS for kind in MODELS]


def _inputs(kind):
    inputs = model_inputs(kind)
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    return inputs


def _run(model, kind):
    with torch.no_grad():
        return main_output(model(**_inputs(kind)))


def _build(spec, kind, adapter="default", begin=True):
    """The method's default adapter; one with a data pass (which may choose what the adapter holds:
    a sparse mask) is taken through it, as a training run would."""
    try:
        pm, config = apply_method(spec, MODELS[kind](), adapter)
    except PeftlabError as err:
        if kind in ("llama", "t5"):
            pytest.skip(f"{spec.name} does not apply to {kind}: {err}")  # models without biases
        if spec.encoder_only and kind != "bert":
            pytest.skip(f"{spec.name} applies to encoder models only, not {kind}: {err}")
        raise
    if begin and spec.hooks.before_training is not None:
        begin_training(pm, kind)
    return pm, config


def _base(spec, kind):
    """The model a disabled or deleted adapter computes as: the bare model, with its weights
    quantized as the method stores them when it declares that (``spec.quantize_base``)."""
    model = MODELS[kind]()
    if spec.quantize_base is not None:
        spec.quantize_base(model, spec.example()[1] if spec.example else spec.config_cls())
    return model


def _close(a, b, tol):
    return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=0)


def _differs(a, b):
    # Relative: tiny random models have tiny logits (BERT's ~1e-2), so an absolute bar would be arbitrary.
    return a.shape != b.shape or (a - b).abs().max() > 1e-3 * b.abs().max()


@pytest.mark.parametrize("spec,kind", CASES, ids=[f"{s.name}-{k}" for s, k in CASES])
class TestConformance:
    def test_identity_at_init_and_effect(self, spec, kind):
        base = _run(_base(spec, kind), kind)
        pm, _ = _build(spec, kind, begin=False)
        if spec.identity_at_init:
            assert _close(_run(pm, kind), base, 1e-5), "declared identity at init, but the output changed"
        if spec.hooks.before_training is not None:
            begin_training(pm, kind)
        perturb(pm, "default", 0, scale=0.2)
        assert _differs(_run(pm, kind), base), "a perturbed adapter has no effect on the output"

    def test_parameter_partition_and_gradients(self, spec, kind):
        pm, _ = _build(spec, kind)
        declared = {id(p) for p in pm.adapter_parameters("default")}
        trainable = {id(p) for p in pm.parameters() if p.requires_grad}
        assert declared and declared == trainable
        pm.check_parameter_partition()
        pm.train()
        begin_training(pm, kind)
        perturb(pm, "default", 0, scale=0.2)
        out = main_output(pm(**_inputs(kind)))
        out.float().pow(2).mean().backward()
        for name, p in pm.named_parameters():
            if id(p) in declared:
                # (a sparse method's tensor may hold no chosen entry on a tiny model)
                assert p.grad is not None or p.numel() == 0, f"adapter parameter {name} got no gradient"
            else:
                assert p.grad is None, f"frozen parameter {name} got a gradient"
        report = pm.trainable_parameters_report()
        assert report.trainable == sum(p.numel() for p in pm.adapter_parameters("default"))
        assert 0 < report.percent < 100

    def test_changes_sequence_length_is_declared_truly(self, spec, kind):
        pm, _ = _build(spec, kind)
        seen = []

        def hook(module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            seen.append((kwargs["input_ids"] if x is None else x).shape[1])

        handle = pm.base_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            _run(pm, kind)
        finally:
            handle.remove()
        longer = seen[0] != _inputs(kind)["input_ids"].shape[1]
        assert longer == spec.changes_sequence_length, f"the base model saw {seen[0]} tokens"

    def test_config_json_round_trip(self, spec, kind):
        config = spec.config_cls()
        assert config_from_dict(config.to_dict()) == config

    def test_delta_only_state_and_save_load(self, spec, kind, tmp_path):
        pm, config = _build(spec, kind)
        perturb(pm, "default", 0, scale=0.2)
        expected = _run(pm, kind)
        state = pm.adapter_state_dict()
        base_bytes = sum(p.numel() * p.element_size() for p in MODELS[kind]().parameters())
        assert state
        if any(m.sparse_attrs for _, m in pm._delta_modules()):
            # A sparse delta keeps each changed entry once, with its index (the perturbation changed all).
            changed = sum(int((p != 0).sum()) for p in pm.adapter_parameters("default"))
            assert sum(t.numel() for k, t in state.items() if k.endswith(".values") and t.dtype != torch.bool) == changed
        else:
            # Small in what trains or in what is written: frozen state (shared random projections) may
            # outweigh the trained part on tiny models; a mask trains dense scores but writes bits.
            trained = sum(p.numel() * p.element_size() for p in pm.adapter_parameters("default"))
            written = sum(t.numel() * t.element_size() for t in state.values())
            assert min(trained, written) < base_bytes / 2
        base_keys = {f"{root}{n}" for n, _ in MODELS[kind]().named_parameters()
                     for root in ("base_model.model.", "base_model.", "")}
        assert not base_keys & set(state), "the checkpoint holds a base model weight"
        save_method(spec, pm, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["adapter_config.json", "adapter_model.safetensors"]
        loaded = load_method(spec, MODELS[kind](), tmp_path)
        assert _close(_run(loaded, kind), expected, 1e-5)
        assert not any(p.requires_grad for p in loaded.parameters())

    def test_merge(self, spec, kind):
        pm, _ = _build(spec, kind)
        perturb(pm, "default", 0, scale=0.2)
        if not spec.mergeable:
            with pytest.raises(PeftlabError, match="cannot be merged"):
                pm.merge_adapter()
            return
        expected = _run(pm, kind)
        pm.merge_adapter()
        assert _close(_run(pm, kind), expected, spec.merge_tolerance)
        pm.unmerge_adapter()
        assert _close(_run(pm, kind), expected, spec.merge_tolerance)
        plain = pm.merge_and_unload()
        assert not any(isinstance(m, DeltaModule) for m in plain.modules())
        assert _close(_run(plain, kind), expected, spec.merge_tolerance)

    def test_disable_gives_base(self, spec, kind):
        base = _run(_base(spec, kind), kind)
        pm, _ = _build(spec, kind)
        perturb(pm, "default", 0, scale=0.2)
        with pm.disable_adapter():
            assert _close(_run(pm, kind), base, 1e-5)
        assert _differs(_run(pm, kind), base)

    def test_two_adapters_do_not_leak_and_delete_restores(self, spec, kind):
        base_model = _base(spec, kind)
        base = _run(base_model, kind)
        n_base = sum(p.numel() for p in base_model.parameters())
        pm, config = _build(spec, kind)
        perturb(pm, "default", 0, scale=0.2)
        first = _run(pm, kind)
        with pytest.raises(PeftlabError, match="already exists"):
            pm.add_adapter("default", config)
        pm.add_adapter("second", config)
        perturb(pm, "second", 1, scale=0.2)
        assert _close(_run(pm, kind), first, 1e-6), "adding an inactive adapter changed the output"
        pm.set_adapter("second")
        second = _run(pm, kind)
        assert _differs(second, first)
        assert {id(p) for p in pm.parameters() if p.requires_grad} == {id(p) for p in pm.adapter_parameters("second")}
        pm.delete_adapter("second")
        assert pm.active_adapter == next(iter(pm.peft_configs))  # as peft: the first adapter left
        pm.set_adapter("default")
        assert _close(_run(pm, kind), first, 1e-6)
        pm.delete_adapter("default")
        for name in list(pm.peft_configs):  # the adapters a method builds on, if any
            pm.delete_adapter(name)
        assert not any(isinstance(m, DeltaModule) for m in pm.base_model.modules())
        assert sum(p.numel() for p in pm.parameters()) == n_base
        assert _close(_run(pm, kind), base, 1e-6)
