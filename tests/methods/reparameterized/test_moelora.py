"""MoELoRA: N LoRA experts per layer (rank r split over them) mixed by softmax(W_g E[t]), a gate that
reads the task id only; task ids through model(..., task_ids=...); a task's mixture exported as a
plain rank-r LoRA adapter that computes the same outputs (and saves in HF peft's layout)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.targets import logical_name
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.moelora import (MoELoraConfig, MoELoraGates, MoELoraLayer, export_task_lora,
                                                     gate_weights, use_task_ids)

from ...conftest import (MINILM, labelled_batches, main_output, model_inputs, perturb, require_shared, tiny_bert,
                         tiny_gpt2, tiny_t5)

QUERY = "bert.encoder.layer.0.attention.self.query"


def _layers(pm, name="default"):
    """Model path (whatever wraps it) -> the MoELoRA layer holding adapter ``name``."""
    return {logical_name(n.removeprefix("base_model.")): m for n, m in pm.named_modules()
            if isinstance(m, MoELoraLayer) and name in m.moelora_A}


def _model(seed=0, **config):
    pm = get_peft_model(tiny_bert(), MoELoraConfig(**{"num_tasks": 3, **config}))
    perturb(pm, seed=seed)
    return pm


def _run(pm, inputs=None, **kwargs):
    with torch.no_grad():
        return main_output(pm(**(inputs or model_inputs("bert")), **kwargs))


# -- 1. structure, initialisation, parameter count ----------------------------------------------------

def test_rank_split_init_and_parameter_count():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), MoELoraConfig(r=8, num_experts=4, num_tasks=5, task_embedding_dim=16))
    layers = _layers(pm)
    assert len(layers) == 4  # query and value of 2 layers
    layer = layers[QUERY]
    a, b = layer.moelora_A["default"], layer.moelora_B["default"]
    assert a.shape == (8, 32) and b.shape == (32, 8)  # 4 experts of rank 2, concatenated along the rank
    assert torch.count_nonzero(b) == 0  # B = 0: identity at init
    assert 0.003 < a.std() < 0.03  # the reference's N(0, 0.01^2)
    gates = pm.model_adapters["moelora"]
    assert isinstance(gates, MoELoraGates)  # one gate for the whole model (the paper's)
    assert gates.moelora_task_embedding["default"].shape == (5, 16)
    assert gates.moelora_gate["default"].shape == (4, 16)
    assert not layer.moelora_gate  # no per-layer gate
    lora = get_peft_model(tiny_bert(), LoraConfig(r=8))
    assert lora.get_nb_trainable_parameters()[0] == 4 * 8 * (32 + 32)
    # LoRA's count at the same rank, plus E (num_tasks x d_T) and W_g (N x d_T) once.
    assert pm.get_nb_trainable_parameters()[0] == 4 * 8 * (32 + 32) + 5 * 16 + 4 * 16
    with torch.no_grad():
        torch.testing.assert_close(main_output(pm(**model_inputs("bert"), task_ids=[0, 4])),
                                   main_output(tiny_bert()(**model_inputs("bert"))))
    per_layer = get_peft_model(tiny_bert(), MoELoraConfig(r=8, num_tasks=5, task_embedding_dim=16, gate_per_layer=True))
    assert "moelora" not in per_layer.model_adapters
    assert _layers(per_layer)[QUERY].moelora_gate["default"].shape == (4, 16)
    assert per_layer.get_nb_trainable_parameters()[0] == 4 * (8 * (32 + 32) + 5 * 16 + 4 * 16)


def test_minilm_parameter_count_against_lora():
    from transformers import AutoModelForSequenceClassification

    path = require_shared(MINILM)
    counts = {}
    configs = {"lora": LoraConfig(r=8), "moelora": MoELoraConfig(), "moelora16": MoELoraConfig(num_tasks=16)}
    for key, config in configs.items():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        counts[key] = get_peft_model(model, config).get_nb_trainable_parameters()[0]
    assert counts["lora"] == 12 * 8 * (384 + 384) == 73_728  # 6 layers x (query, value)
    assert counts["moelora"] == 73_728 + 1 * 64 + 4 * 64 == 74_048
    assert counts["moelora16"] == 73_728 + 16 * 64 + 4 * 64 == 75_008


# -- 2. the mechanism: a task-conditioned mixture of rank-r/N experts --------------------------------

def test_layer_output_is_the_gated_mixture_of_experts_written_out():
    pm = _model(alpha=8, num_experts=4, r=8)
    layer = _layers(pm)[QUERY]
    a, b = layer.moelora_A["default"], layer.moelora_B["default"]
    gates = pm.model_adapters["moelora"]
    embedding, gate = gates.moelora_task_embedding["default"], gates.moelora_gate["default"]
    x = torch.randn(3, 5, 32)
    tasks = torch.tensor([2, 0, 2])
    with torch.no_grad(), use_task_ids(pm, tasks):
        out = layer(x)
    with torch.no_grad():
        for row, t in enumerate(tasks.tolist()):
            w = torch.softmax(gate @ embedding[t], dim=0)  # the gate: the task id in, N weights out
            expected = layer.base_layer(x[row])
            for i in range(4):  # expert i: rows/columns 2i, 2i+1 of A and B (r/N = 2)
                a_i, b_i = a[2 * i: 2 * i + 2], b[:, 2 * i: 2 * i + 2]
                expected = expected + (8 / 8) * w[i] * x[row] @ a_i.T @ b_i.T
            torch.testing.assert_close(out[row], expected)


def test_the_same_input_gets_a_different_update_per_task_which_plain_lora_cannot():
    pm = _model()
    inputs = model_inputs("bert")
    outs = [_run(pm, inputs, task_ids=t) for t in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (outs[i] - outs[j]).abs().max() > 1e-4 * outs[i].abs().max()
    # Every task's update is a convex mixture of the same experts: with equal expert weights the
    # layer is plain LoRA (B A / N); the gate is what makes the tasks differ.
    layer = _layers(pm)[QUERY]
    x = torch.randn(2, 32)
    with torch.no_grad():
        a, b = layer.moelora_A["default"], layer.moelora_B["default"]
        uniform = layer.base_layer(x) + layer.settings["default"][0] * (x @ a.T / 4) @ b.T
        pm.model_adapters["moelora"].moelora_gate["default"].zero_()  # softmax(0) = 1/N for every task
        for t in range(3):
            with use_task_ids(pm, t):
                torch.testing.assert_close(layer(x), uniform)


def _fit(config, task_ids, steps=100):
    """Train on the same 16 inputs twice: labelled by a rule for task 0 and by its opposite for task 1."""
    batch = labelled_batches(n=1, size=16)[0]
    ids = torch.cat([batch["input_ids"], batch["input_ids"]])
    labels = torch.cat([batch["labels"], 1 - batch["labels"]])
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), config)
    pm.train()
    optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    with torch.no_grad():
        predicted = pm(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits.argmax(-1)
    return (predicted == labels).float().mean().item()


def test_two_tasks_with_opposite_labels_on_the_same_inputs_are_both_learned():
    # One adapter, one mixed batch: the task-conditioned gate lets the update differ per task.
    tasks = torch.tensor([0] * 16 + [1] * 16)
    assert _fit(MoELoraConfig(num_tasks=2, targets="all-linear"), tasks) >= 0.9
    # Plain LoRA sees the same input twice with opposite labels: exactly half right, whatever it learns.
    assert _fit(LoraConfig(targets="all-linear"), None) == 0.5


def test_the_gate_reads_the_task_id_only(monkeypatch):
    pm = _model()
    seen = []
    original = MoELoraLayer.expert_weights

    def record(self, name, task_ids=None):
        w = original(self, name, task_ids)
        seen.append(w.detach().clone())
        return w

    monkeypatch.setattr(MoELoraLayer, "expert_weights", record)
    first, second = model_inputs("bert", length=8), model_inputs("bert", length=5)
    second["input_ids"] = torch.randint(3, 100, second["input_ids"].shape, generator=torch.Generator().manual_seed(7))
    _run(pm, first, task_ids=[1, 2])
    weights_first = torch.stack(seen)
    seen.clear()
    _run(pm, second, task_ids=torch.tensor([1, 2]))
    weights_second = torch.stack(seen)
    # Other tokens, another length: every layer's expert weights are exactly the same per task.
    assert torch.equal(weights_first, weights_second)
    assert weights_first.shape == (4, 2, 4)  # layers x examples x experts
    torch.testing.assert_close(weights_first.sum(-1), torch.ones(4, 2))
    # One gate for the model: every layer reads the same weights, and they are gate_weights(E, W_g, t).
    gates = pm.model_adapters["moelora"]
    embedding, gate = gates.moelora_task_embedding["default"], gates.moelora_gate["default"]
    expected = gate_weights(embedding, gate, torch.tensor([1, 2]))
    for w in weights_first:
        torch.testing.assert_close(w, expected.detach())
    assert not torch.allclose(weights_first[0, 0], weights_first[0, 1])


def test_per_layer_gates_differ_between_layers_and_still_read_the_task_only():
    pm = _model(gate_per_layer=True)
    layers = list(_layers(pm).values())
    w = [layer.expert_weights("default", torch.tensor([0, 1, 2])) for layer in layers]
    assert not torch.allclose(w[0], w[1])
    for layer, weights in zip(layers, w):
        e, g = layer.gate_params("default")
        torch.testing.assert_close(weights, torch.softmax(e[[0, 1, 2]] @ g.T, dim=-1))


def test_mixed_tasks_in_one_batch_equal_separate_calls():
    pm = _model()
    inputs = model_inputs("bert", batch=3)
    mixed = _run(pm, inputs, task_ids=torch.tensor([2, 0, 1]))
    for row, t in enumerate([2, 0, 1]):
        alone = _run(pm, inputs, task_ids=t)
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_task_rows_used_and_the_gate():
    pm = _model(num_tasks=4)
    pm.train()
    out = main_output(pm(**model_inputs("bert"), task_ids=[0, 2]))
    out.pow(2).sum().backward()
    gates = pm.model_adapters["moelora"]
    grad = gates.moelora_task_embedding["default"].grad
    assert grad[[0, 2]].abs().sum(1).min() > 0 and torch.count_nonzero(grad[[1, 3]]) == 0
    assert gates.moelora_gate["default"].grad.abs().sum() > 0
    assert all(layer.moelora_A["default"].grad is not None for layer in _layers(pm).values())


def test_around_forward_removes_the_ids_afterwards_also_when_the_call_fails():
    pm = _model()
    layers = list(_layers(pm).values())
    _run(pm, task_ids=[1, 2])
    assert all(not layer.task_ids for layer in layers)
    with pytest.raises(PeftlabError, match="task_ids has 3 entries"):
        _run(pm, task_ids=[1, 2, 0])  # batch of 2
    assert all(not layer.task_ids for layer in layers)
    with pytest.raises(PeftlabError, match="num_tasks=3: pass the task"):
        _run(pm)  # several tasks: no silent default


def test_single_task_adapter_needs_no_task_ids():
    pm = get_peft_model(tiny_bert(), MoELoraConfig())  # num_tasks=1
    perturb(pm)
    torch.testing.assert_close(_run(pm), _run(pm, task_ids=0))


def test_generate_and_t5_through_use_task_ids():
    pm = get_peft_model(tiny_gpt2(), MoELoraConfig(num_tasks=2))
    perturb(pm)
    ids = model_inputs("gpt2")["input_ids"]
    with pytest.raises(PeftlabError, match="use_task_ids"):
        pm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with use_task_ids(pm, [1, 0]):
        out = pm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    assert all(not layer.task_ids for layer in _layers(pm).values())
    # An encoder-decoder model: one id per example reaches encoder and decoder layers alike.
    t5 = get_peft_model(tiny_t5(), MoELoraConfig(num_tasks=2))
    perturb(t5)
    inputs = {**model_inputs("t5"), "decoder_input_ids": torch.tensor([[0, 5, 6], [0, 8, 9]])}
    mixed = _run(t5, inputs, task_ids=[1, 0])
    torch.testing.assert_close(mixed[0], _run(t5, inputs, task_ids=1)[0], atol=1e-6, rtol=1e-5)


# -- 3. a task's mixture as a plain LoRA adapter ----------------------------------------------------

@pytest.mark.parametrize("gate_per_layer", [False, True])
def test_exported_task_lora_equals_the_gated_mixture(gate_per_layer, tmp_path):
    pm = _model(gate_per_layer=gate_per_layer)
    inputs = model_inputs("bert")
    for t in range(3):
        expected = _run(pm, inputs, task_ids=t)
        config = export_task_lora(pm, "default", t, f"task{t}")
        assert isinstance(config, LoraConfig) and config.r == 8 and config.scaling == pm.peft_configs["default"].scaling
        pm.set_adapter(f"task{t}")
        torch.testing.assert_close(_run(pm, inputs), expected, atol=1e-6, rtol=1e-5)
        pm.set_adapter("default")
    # Per layer, the export's update (alpha/r) B' A' is the task's (alpha/r) sum_i w_i B_i A_i.
    loras = {n.removeprefix("base_model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    for path, layer in _layers(pm).items():
        torch.testing.assert_close(loras[path].delta_weight("task1"), layer.task_delta_weight("default", 1))
    # Saved in HF peft's LoRA layout, and loaded by peftlab onto a bare model as plain LoRA.
    pm.save_pretrained(tmp_path, adapter_names=["task1"])
    folder = tmp_path / "task1"
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 8 and "method" not in data
    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert f"base_model.model.{QUERY}.lora_A.weight" in keys and all(k.endswith(("lora_A.weight", "lora_B.weight"))
                                                                      for k in keys)
    loaded = PeftModel.from_pretrained(tiny_bert(), folder)
    torch.testing.assert_close(_run(loaded, inputs), _run(pm, inputs, task_ids=1), atol=1e-6, rtol=1e-5)
    # ...and merged into the weights, per task, like any LoRA adapter.
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(main_output(merged(**inputs)).detach(), _run(pm, inputs, task_ids=1),
                               atol=1e-5, rtol=1e-4)


def test_exported_lora_loads_in_hf_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    pm = _model()
    export_task_lora(pm, "default", 2, "task2")
    pm.save_pretrained(tmp_path, adapter_names=["task2"])
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "task2")
    torch.testing.assert_close(_run(theirs), _run(pm, task_ids=2), atol=1e-6, rtol=1e-5)


def test_export_refuses_bad_requests_and_adds_nothing():
    pm = _model()
    with pytest.raises(PeftlabError, match=r"\[3\].*range \[0, 3\)"):
        export_task_lora(pm, "default", 3, "t3")
    with pytest.raises(PeftlabError, match="one int"):
        export_task_lora(pm, "default", [0, 1], "t")
    pm.add_adapter("plain", LoraConfig())
    with pytest.raises(PeftlabError, match="'plain' is not a MoELoRA adapter"):
        export_task_lora(pm, "plain", 0, "t")
    with pytest.raises(PeftlabError, match="already exists"):
        export_task_lora(pm, "default", 0, "plain")
    assert sorted(pm.peft_configs) == ["default", "plain"]


def test_merging_the_moelora_adapter_itself_is_refused():
    pm = _model()
    with pytest.raises(PeftlabError, match="cannot be merged"):
        pm.merge_adapter()


# -- 4. save / load, strict ---------------------------------------------------------------------------

def test_save_load_keys_shapes_and_outputs(tmp_path):
    pm = _model(r=4, num_experts=2, task_embedding_dim=8)
    expected = _run(pm, task_ids=[2, 1])
    state = pm.adapter_state_dict()
    assert state["moelora_task_embedding"].shape == (3, 8) and state["moelora_gate"].shape == (2, 8)
    for path in _layers(pm):
        assert state[f"base_model.model.{path}.moelora_A"].shape == (4, 32)
        assert state[f"base_model.model.{path}.moelora_B"].shape == (32, 4)
    assert len(state) == 2 + 2 * 4
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["method"] == "moelora" and data["num_tasks"] == 3 and "peft_type" not in data
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(_run(loaded, task_ids=[2, 1]), expected)
    # Strict: another expert split of the same rank has other gate shapes.
    other = get_peft_model(tiny_bert(), MoELoraConfig(r=4, num_experts=4, num_tasks=3, task_embedding_dim=8))
    with pytest.raises(CheckpointError, match="moelora_gate"):
        other.load_adapter_state_dict("default", state)


@pytest.mark.parametrize("damage", ["missing gate", "gate of another shape", "missing expert B"])
def test_a_damaged_checkpoint_is_refused_by_key_and_the_model_is_left_as_given(damage, tmp_path):
    pm = _model()
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "moelora_gate" if "gate" in damage else f"base_model.model.{QUERY}.moelora_B"
    if damage.startswith("missing"):
        del tensors[key]
    else:
        tensors[key] = torch.zeros(5, 64)
    save_file(tensors, str(file), metadata={"format": "pt"})
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=key):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_two_adapters_share_the_model_level_module_and_delete_cleanly():
    pm = _model()
    pm.add_adapter("other", MoELoraConfig(num_tasks=2, num_experts=2))
    gates = pm.model_adapters["moelora"]
    assert sorted(gates.moelora_gate) == ["default", "other"]
    pm.delete_adapter("other")
    assert sorted(gates.moelora_gate) == ["default"]
    pm.delete_adapter("default")
    assert "moelora" not in pm.model_adapters
    assert not any(isinstance(m, DeltaModule) for m in pm.base_model.modules())


# -- 5. bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task_ids,match", [
    (3, r"task_ids holds \[3\], outside MoELoRA adapter 'default''s range \[0, 3\)"),
    (-1, r"\[-1\], outside"),
    (torch.tensor([0, 7]), r"\[7\], outside"),
    ([1, 5], r"\[5\], outside"),
    (torch.tensor([0.0, 1.0]), "integer tensor"),
    (1.0, "expected an int"),
    (True, "expected an int"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"),
])
def test_task_ids_outside_the_range_or_of_the_wrong_kind_are_refused_naming_the_value(task_ids, match):
    pm = _model()
    with pytest.raises(PeftlabError, match=match):
        _run(pm, task_ids=task_ids)
    assert all(not layer.task_ids for layer in _layers(pm).values())


def test_task_ids_without_an_active_moelora_adapter_are_refused():
    pm = _model()
    with pm.disable_adapter(), pytest.raises(PeftlabError, match="task_ids"):
        _run(pm, task_ids=0)


@pytest.mark.parametrize("field,value,match", [
    ("r", 6, r"r=6 is not a multiple of num_experts=4"),
    ("num_experts", 0, "num_experts"),
    ("num_tasks", 0, "num_tasks"),
    ("task_embedding_dim", 0, "task_embedding_dim"),
    ("alpha", 0, "alpha"),
    ("dropout", 1.0, "dropout"),
    ("num_tasks", 2.0, "num_tasks"),
])
def test_bad_config_values_are_refused_by_field(field, value, match):
    with pytest.raises(PeftlabError, match=match):
        MoELoraConfig(**{field: value})


def test_reference_field_names_are_accepted():
    config = MoELoraConfig(expert_num=8, task_num=16, r=16, lora_alpha=32, lora_dropout=0.1)
    assert (config.num_experts, config.num_tasks, config.alpha, config.dropout) == (8, 16, 32, 0.1)
