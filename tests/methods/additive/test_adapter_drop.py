"""AdapterDrop: the sequential adapter in layers n..L-1 only; the lowest n layers are the plain base
layers, so autograd stops at layer n and several tasks share the lower layers' outputs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab import (CheckpointError, LoraConfig, PeftlabError, PeftModel, SequentialAdapterConfig, config_from_dict,
                     get_peft_model)
from peftlab.core.targets import layer_of
from peftlab.methods.additive.adapter_drop import AdapterDropConfig, multi_task_forward
from peftlab.methods.additive.sequential_adapter import LayerNormDelta, SequentialAdapterLayer

from ...conftest import main_output, model_inputs
from ._adapters import BUILDERS, D, check_lifecycle, perturb, run, site_params, wrapped


def bert(layers: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64)).eval()


def stacks(model) -> list:
    """The transformer layers (ModuleList elements) of ``model``, per stack, in model order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "h", "layers", "block") \
                and not any(name.startswith(f"{s}.") for s, _ in found):
            found.append((name, list(module)))
    return found


def layer_outputs(model, kind: str, inputs=None) -> dict[tuple[str, int], torch.Tensor]:
    """The hidden states each layer returns, keyed by (stack, index)."""
    seen, handles = {}, []
    for stack, layers in stacks(model):
        for i, layer in enumerate(layers):
            def hook(module, args, out, key=(stack.removeprefix("base_model."), i)):
                seen[key] = out[0] if isinstance(out, tuple) else out
            handles.append(layer.register_forward_hook(hook))
    try:
        if inputs is None:
            run(model, kind)
        else:
            main_output(model(**inputs))
    finally:
        for h in handles:
            h.remove()
    return seen


# -- mechanism -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,n", [("bert4", 2), ("bert", 1), ("gpt2", 1), ("llama", 1), ("t5", 1)])
def test_lowest_layers_compute_the_plain_base_layer(kind, n):
    """The mechanism: layers < n return exactly the base model's hidden states, layers >= n do not (a
    sequential adapter in every layer, as Houlsby's, changes layer 0 already)."""
    build = (lambda: bert(4)) if kind == "bert4" else BUILDERS[kind]
    kind = "bert" if kind == "bert4" else kind
    base = layer_outputs(build(), kind)
    pm = get_peft_model(build(), AdapterDropConfig(drop_layers=n))
    perturb(pm)
    adapted = layer_outputs(pm, kind)
    assert base.keys() == adapted.keys() and len(base) >= 2
    for (stack, i), expected in base.items():
        if stack.startswith("decoder"):  # T5's decoder reads the (adapted) encoder through cross-attention:
            layer = pm.base_model.get_submodule(stack)[i]  # its lower layers hold no adapter, their input differs
            assert any(isinstance(m, SequentialAdapterLayer) for m in layer.modules()) == (i >= n)
        elif i < n:
            assert torch.equal(adapted[stack, i], expected), (stack, i)
        else:
            assert not torch.allclose(adapted[stack, i], expected, atol=1e-4), (stack, i)
    plain = get_peft_model(build(), SequentialAdapterConfig())
    perturb(plain)
    assert not torch.allclose(layer_outputs(plain, kind)[next(iter(base))], base[next(iter(base))], atol=1e-4)


def test_sites_and_parameter_count():
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=3, adapter=SequentialAdapterConfig(bottleneck=8)))
    assert wrapped(pm, SequentialAdapterLayer) == ["bert.encoder.layer.3.attention.output.dense",
                                                   "bert.encoder.layer.3.output.dense"]
    assert pm.trainable_parameters_report().trainable == 2 * site_params(D, 8)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # layer n's input needs no grad: that is the point
def test_no_backward_below_the_first_adapted_layer():
    """The speed-up: the lowest trainable tensor is in layer n, so the states leaving layers < n do not
    require grad and no backward runs through those layers; layers >= n run backward."""
    n = 2
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=n))
    pm.train()
    layers = pm.base_model.bert.encoder.layer
    requires, backward = {}, {i: 0 for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: requires.__setitem__(i, out[0].requires_grad))
        layer.register_full_backward_hook(lambda m, gi, go, i=i: backward.__setitem__(i, backward[i] + 1))
    main_output(pm(**model_inputs("bert"))).pow(2).mean().backward()
    assert requires == {0: False, 1: False, 2: True, 3: True}
    assert backward == {0: 0, 1: 0, 2: 1, 3: 1}
    assert all(p.grad is None for p in layers[:n].parameters())


def test_several_tasks_share_the_lower_layers():
    """At inference, two tasks' adapters with the same n give identical (base) states below layer n, so
    those layers can be computed once for both tasks; above n the tasks differ."""
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=2))
    pm.add_adapter("other", AdapterDropConfig(drop_layers=2))
    perturb(pm, "default", seed=0)
    perturb(pm, "other", seed=1)
    first = layer_outputs(pm, "bert")
    pm.set_adapter("other")
    second = layer_outputs(pm, "bert")
    for key in first:
        assert torch.equal(first[key], second[key]) == (key[1] < 2), key


@pytest.mark.parametrize("kind,sampling", [("bert4", False), ("bert4", True), ("llama", False)])
def test_multi_task_forward_runs_the_lower_layers_once_and_equals_separate_calls(kind, sampling):
    model = bert(4) if kind == "bert4" else BUILDERS[kind]().eval()
    n = 2 if kind == "bert4" else 1
    pm = get_peft_model(model, AdapterDropConfig(drop_layers=n, drop_sampling=sampling)).eval()
    for name in ["b", "c"]:
        pm.add_adapter(name, AdapterDropConfig(drop_layers=n, drop_sampling=sampling))
    for seed, name in enumerate(["default", "b", "c"]):
        perturb(pm, name, seed=seed)
    pm.set_adapter("c", trainable=[])
    inputs = model_inputs("bert" if kind == "bert4" else kind)
    expected = {}
    with torch.no_grad():
        for name in ["default", "b", "c"]:
            pm.set_adapter(name)
            expected[name] = main_output(pm(**inputs))
        pm.set_adapter("c", trainable=[])
        _, layers = stacks(pm)[0]
        calls = {i: 0 for i in range(len(layers))}
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
        got = multi_task_forward(pm, ["default", "b", "c"], **inputs)
    assert list(got) == ["default", "b", "c"]
    for name in got:
        torch.testing.assert_close(main_output(got[name]), expected[name], atol=1e-6, rtol=0)
    assert len({main_output(o).sum().item() for o in got.values()}) == 3  # the tasks do differ
    assert calls == {i: 1 if i < n else 3 for i in calls}  # the lowest n layers ran once for three tasks
    assert pm.active_adapters == ["c"] and not any(p.requires_grad for p in pm.parameters())  # restored


def test_multi_task_forward_refuses_what_it_cannot_share():
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=2))
    pm.add_adapter("one", AdapterDropConfig(drop_layers=1))
    pm.add_adapter("lora", LoraConfig())
    inputs = model_inputs("bert")
    pm.train()
    with pytest.raises(PeftlabError, match="model.eval"):
        multi_task_forward(pm, ["default"], **inputs)
    pm.eval()
    with pytest.raises(PeftlabError, match=r"'one'\].*n in \[1, 2\]"):
        multi_task_forward(pm, ["default", "one"], **inputs)
    with pytest.raises(PeftlabError, match="'lora' is LoraConfig; expected AdapterDrop"):
        multi_task_forward(pm, ["default", "lora"], **inputs)
    with pytest.raises(PeftlabError, match="distinct"):
        multi_task_forward(pm, ["default", "default"], **inputs)
    assert pm.active_adapters == ["default"]


def test_default_drops_the_papers_share_of_any_depth():
    config = AdapterDropConfig()
    assert [config.dropped(depth) for depth in (1, 2, 6, 12, 24)] == [0, 1, 3, 5, 10]
    assert AdapterDropConfig(drop_fraction=0.9).dropped(2) == 1  # at most L - 1: the top layer keeps its adapter
    pm = get_peft_model(BUILDERS["bert"](), AdapterDropConfig())
    assert all(layer_of(pm.base_model, p)[1] == 1 for p in wrapped(pm, SequentialAdapterLayer))


def test_train_layernorm_stays_above_the_dropped_layers():
    with_norms = SequentialAdapterConfig(train_layernorm=True)
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=2, adapter=with_norms))
    norms = wrapped(pm, LayerNormDelta)
    assert norms == [f"bert.encoder.layer.{i}.{s}.LayerNorm" for i in (2, 3) for s in ("attention.output", "output")]
    perturb(pm)
    base = layer_outputs(bert(4), "bert")
    adapted = layer_outputs(pm, "bert")
    assert all(torch.equal(adapted[k], base[k]) for k in base if k[1] < 2)
    gpt = get_peft_model(BUILDERS["gpt2"](), AdapterDropConfig(drop_layers=1, adapter=with_norms))
    assert wrapped(gpt, LayerNormDelta) == ["transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]


# -- robust AdapterDrop ----------------------------------------------------------------------------------
def test_robust_variant_draws_n_in_training_and_uses_the_configured_n_in_eval():
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=3, drop_sampling=True))
    assert len(wrapped(pm, SequentialAdapterLayer)) == 8  # every layer has its adapter
    perturb(pm)
    calls = {}
    for path, module in pm.base_model.named_modules():
        if isinstance(module, SequentialAdapterLayer):
            index = layer_of(pm.base_model, path)[1]
            module.bottleneck["default"].register_forward_hook(lambda m, a, o, i=index: calls.__setitem__(i, 1))
    pm.train()
    torch.manual_seed(0)
    lowest = set()
    for _ in range(40):
        calls.clear()
        pm(**model_inputs("bert"))
        assert calls and sorted(calls) == list(range(min(calls), 4))  # adapters from some n upwards
        lowest.add(min(calls))
    assert lowest == {0, 1, 2, 3}  # n drawn from {0, ..., L-1}
    pm.eval()
    calls.clear()
    base = layer_outputs(bert(4), "bert")
    adapted = layer_outputs(pm, "bert")
    assert sorted(calls) == [3]
    assert all(torch.equal(adapted[k], base[k]) for k in base if k[1] < 3)
    assert all(m.active_adapters == ["default"] for m in pm.modules() if isinstance(m, SequentialAdapterLayer))


# -- save / load -----------------------------------------------------------------------------------------
def test_save_load_strict(tmp_path):
    pm = get_peft_model(bert(4), AdapterDropConfig(drop_layers=2, adapter=SequentialAdapterConfig(bottleneck=4)))
    perturb(pm)
    expected = run(pm, "bert")
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted({k.split(".layer.")[1].split(".")[0] for k in state}) == ["2", "3"]
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("down.weight")} == {(4, D)}
    loaded = PeftModel.from_pretrained(bert(4), tmp_path)
    assert torch.allclose(run(loaded, "bert"), expected, atol=1e-6)
    saved = loaded.peft_config["default"].replace(task_type=None, base_model_name_or_path=None)
    assert saved == pm.peft_config["default"]
    # An adapter tensor in a dropped layer (as a checkpoint with a smaller n holds) is refused by name.
    key = next(k for k in state if ".layer.2." in k)
    damaged = {**state, key.replace(".layer.2.", ".layer.1."): state[key].clone()}
    save_file(damaged, str(tmp_path / "adapter_model.safetensors"))
    model = bert(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(CheckpointError, match=r"unexpected key .*layer\.1\..*bottleneck"):
        PeftModel.from_pretrained(model, tmp_path)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_json_round_trip():
    config = AdapterDropConfig(adapter=SequentialAdapterConfig(bottleneck=8, targets=("@ffn_out",)), drop_layers=3,
                               drop_sampling=True)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"drop_layers": -1}, "drop_layers"),
    ({"drop_fraction": 1.0}, "drop_fraction"),
    ({"drop_fraction": -0.1}, "drop_fraction"),
    ({"drop_layers": 1.5}, "drop_layers"),
    ({"drop_sampling": 1}, "drop_sampling"),
    ({"adapter": LoraConfig()}, "adapter"),
    ({"targets": ("query",)}, "targets"),
    ({"adapter": SequentialAdapterConfig(modules_to_save=("classifier",))}, "modules_to_save"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(PeftlabError, match=field):
        AdapterDropConfig(**kwargs)


@pytest.mark.parametrize("n", [2, 5])
def test_dropping_every_layer_is_refused_and_leaves_the_model_unchanged(n):
    model = BUILDERS["bert"]()
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(PeftlabError, match=rf"drop_layers={n} but stack 'bert.encoder.layer' has 2 layers"):
        get_peft_model(model, AdapterDropConfig(drop_layers=n))
    assert [name for name, _ in model.named_modules()] == names


def test_target_outside_the_layers_is_refused():
    with pytest.raises(PeftlabError, match="in no layer stack"):
        get_peft_model(BUILDERS["bert"](), AdapterDropConfig(adapter=SequentialAdapterConfig(targets=("classifier",))))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_robust_option_saves_loads_disables_and_deletes(kind, tmp_path):
    config = AdapterDropConfig(drop_layers=1, drop_sampling=True, adapter=SequentialAdapterConfig(bottleneck=4))
    check_lifecycle(kind, config, tmp_path)
