"""Delta-LoRA: after each optimizer step t > K, the pretrained weight moves by λ times that step's
change of s B A. The change is held beside the pretrained weight (frozen adapter state), so disabling
or deleting the adapter gives the pretrained model back, and a checkpoint rebuilds the trained model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core.layer import DeltaModule, base_of
from peftlab.methods.reparameterized.delta_lora import DELTA_LORA, DeltaLoraConfig, DeltaLoraLayer

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2}


def _layers(pm, name="default"):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, DeltaLoraLayer) and name in m.delta_lora_weight}


def _run(model, kind="bert"):
    with torch.no_grad():
        return main_output(model(**model_inputs(kind)))


def _weight_out_in(layer):
    """The layer's pretrained weight, out x in, whatever the layout."""
    weight = base_of(layer.base_layer).weight
    return weight.T if layer.transposed else weight


def _delta_out_in(layer, name="default"):
    delta = layer.delta_lora_weight[name]
    return delta.T if layer.transposed else delta


def _step(pm, optimizer, kind):
    loss = main_output(pm(**model_inputs(kind))).float().pow(2).mean()
    loss.backward()
    pm.optimizer_step(optimizer)
    optimizer.zero_grad()


def _model(kind="bert", config=None, **fields):
    """A Delta-LoRA (or ``config``) model whose factors start away from zero (B != 0), kept in eval
    mode: gradients flow as in training, without dropout, so runs can be compared by hand."""
    pm = get_peft_model(MODELS[kind](), config or DeltaLoraConfig(**fields)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def _optimizer(pm):
    return torch.optim.AdamW(pm.param_groups(1e-2, weight_decay=0.01), lr=1e-2)


def _trained(kind="bert", steps=4, **fields):
    """A Delta-LoRA model trained ``steps`` AdamW steps."""
    pm = _model(kind, **fields)
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=steps)
    for _ in range(steps):
        _step(pm, optimizer, kind)
    return pm


# -- 1. the mechanism: W moves by λ s (B_{t+1} A_{t+1} - B_t A_t) after each step t > K ------------------

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_each_step_moves_the_weight_by_lambda_times_the_change_of_the_scaled_product(kind):
    ratio, start = 0.7, 1
    pm = _model(kind, update_ratio=ratio, start_steps=start, alpha=12, r=4)
    layers = _layers(pm)
    assert layers
    pretrained = {n: _weight_out_in(m).detach().clone() for n, m in layers.items()}
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=5)
    scale = 12 / 4
    for t in range(5):
        before = {n: (m.lora_A["default"].weight.detach().double().clone(),
                      m.lora_B["default"].weight.detach().double().clone(),
                      _delta_out_in(m).detach().double().clone()) for n, m in layers.items()}
        _step(pm, optimizer, kind)
        for n, m in layers.items():
            a0, b0, d0 = before[n]
            a1, b1 = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
            assert not torch.equal(a1, a0) and not torch.equal(b1, b0), "the factors did not train"
            moved = _delta_out_in(m).double() - d0
            if t > start:  # the paper's "if t > K", steps counted from 0
                expected = ratio * scale * (b1 @ a1 - b0 @ a0)
                assert expected.abs().max() > 1e-4
                torch.testing.assert_close(moved, expected, atol=1e-6, rtol=1e-4)
            else:
                assert not moved.any(), f"the weight moved at step {t} <= K={start}"
    # The pretrained weight itself is never written: the change lives in the adapter.
    for n, m in layers.items():
        assert torch.equal(_weight_out_in(m), pretrained[n])
        assert not m.delta_lora_weight["default"].requires_grad


def test_the_forward_computes_with_the_moved_weight():
    """The trained model is the pretrained one with W_0 + D + s B A in every adapted layer (plain LoRA
    would be W_0 + s B A: D, the sum of every step's change, is what makes it Delta-LoRA)."""
    pm = _trained(start_steps=0, steps=4)
    expected = _run(pm)
    by_hand = tiny_bert()
    with torch.no_grad():
        for path, layer in _layers(pm).items():
            a, b, scale = layer._factors("default")
            assert layer.delta_lora_weight["default"].abs().max() > 1e-3
            by_hand.get_submodule(path).weight.add_(
                layer.delta_lora_weight["default"] + scale * b @ a)
    torch.testing.assert_close(_run(by_hand), expected, atol=1e-5, rtol=0)
    # Without D (plain LoRA's forward on the same factors), the output is another one.
    plain = tiny_bert()
    with torch.no_grad():
        for path, layer in _layers(pm).items():
            a, b, scale = layer._factors("default")
            plain.get_submodule(path).weight.add_(scale * b @ a)
    assert (_run(plain) - expected).abs().max() > 1e-3 * expected.abs().max()


def _effective_weight(layer):
    """What the wrapped layer computes with, out x in, read from its outputs (any method, any layout)."""
    with torch.no_grad():
        eye = torch.eye(layer.in_features)
        return (layer(eye) - layer(torch.zeros_like(eye))).T


@pytest.mark.parametrize("method", ["delta_lora", "lora"])
def test_a_step_moves_the_layer_by_one_plus_lambda_times_the_low_rank_change(method):
    """Read from the layer's outputs: under Delta-LoRA a step t > K changes the weight the layer
    computes with by (1 + λ) s Δ(B A) (s Δ(B A) through the factors, λ s Δ(B A) through W); plain
    LoRA, trained the same way, moves it by s Δ(B A) only and fails the Delta-LoRA expectation."""
    ratio = 0.7
    config = DeltaLoraConfig(update_ratio=ratio, start_steps=0) if method == "delta_lora" else LoraConfig()
    pm = _model(config=config)
    layer = next(m for n, m in pm.base_model.named_modules() if n.endswith("layer.0.attention.self.query"))
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=3)
    for _ in range(2):
        _step(pm, optimizer, "bert")  # t = 0 does not move W (t > K = 0 fails); t = 1 does
    a0, b0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    w0 = _effective_weight(layer)
    _step(pm, optimizer, "bert")  # t = 2 > K
    a1, b1 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    low_rank = 2.0 * (b1 @ a1 - b0 @ a0)  # s = alpha / r = 16 / 8
    assert low_rank.abs().max() > 1e-4
    moved = _effective_weight(layer) - w0
    delta_lora_rule = (1 + ratio) * low_rank
    if method == "delta_lora":
        torch.testing.assert_close(moved, delta_lora_rule, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(moved, low_rank, atol=1e-5, rtol=1e-4)
        assert (moved - delta_lora_rule).abs().max() > 100 * 1e-5


@pytest.mark.parametrize("start", [0, 2])
def test_the_start_step_gate(start):
    pm = _model(start_steps=start)
    layer = next(iter(_layers(pm).values()))
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=5)
    moved_at = []
    for t in range(5):
        before = layer.delta_lora_weight["default"].clone()
        _step(pm, optimizer, "bert")
        if not torch.equal(layer.delta_lora_weight["default"], before):
            moved_at.append(t)
    assert moved_at == [t for t in range(5) if t > start]


def test_the_step_count_of_a_resumed_run_is_honoured():
    pm = _model(start_steps=10)
    layer = next(iter(_layers(pm).values()))
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=20)
    pm.training_state.step = 11  # a resumed run (the HF callback sets it from global_step)
    _step(pm, optimizer, "bert")
    assert layer.delta_lora_weight["default"].abs().max() > 0


def test_the_update_after_a_step_needs_the_factors_from_before_it():
    pm = _model(start_steps=0)
    optimizer = _optimizer(pm)
    pm.begin_training(None, total_steps=3)
    pm.training_state.step = 1
    main_output(pm(**model_inputs("bert"))).pow(2).mean().backward()
    optimizer.step()
    layers = list(_layers(pm).values())
    before = [m.delta_lora_weight["default"].clone() for m in layers]
    with pytest.raises(PeftlabError, match="before_optimizer_step"):
        pm.after_optimizer_step()  # before_optimizer_step() was skipped: A_t and B_t are unknown
    assert all(torch.equal(m.delta_lora_weight["default"], d) for m, d in zip(layers, before))


# -- 2. the two forward paths agree ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_folded_forward_equals_the_general_path(kind):
    pm = _trained(kind, start_steps=0, steps=3)
    pm.add_adapter("plain", LoraConfig(targets=DeltaLoraConfig().targets))
    with torch.no_grad():
        for p in pm.adapter_parameters("plain"):
            p.add_(0.1)
    layer = next(iter(_layers(pm).values()))
    x = torch.randn(2, 5, layer.in_features)
    for active in (["default"], ["default", "plain"]):
        layer.set_active(active)
        with torch.no_grad():
            fast = layer(x)
            out = layer.base_layer(x)
            out = DELTA_LORA.forward(layer, "default", x, out)
            if "plain" in active:
                a, b, scale = layer._factors("plain")
                out = out + scale * F.linear(F.linear(x, a), b)
        torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_the_factors_only():
    pm = _trained(start_steps=0, steps=2)
    main_output(pm(**model_inputs("bert"))).pow(2).mean().backward()
    for name, p in pm.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    for layer in _layers(pm).values():
        assert layer.delta_lora_weight["default"].grad is None


# -- 3. the checkpoint rebuilds the trained model on a fresh pretrained one ----------------------------

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_and_load_onto_a_fresh_model_gives_the_trained_outputs_exactly(kind, tmp_path):
    pm = _trained(kind, start_steps=0, steps=4)
    expected = _run(pm, kind)
    state = pm.adapter_state_dict()
    for path, layer in _layers(pm).items():
        key = f"base_model.model.{path}.delta_lora_weight"
        assert state[key].shape == base_of(layer.base_layer).weight.shape  # dense, the size of the weight
        assert state[key].abs().max() > 0
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    assert torch.equal(_run(loaded, kind), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    # Training resumes from the loaded change of the weight.
    resumed = PeftModel.from_pretrained(MODELS[kind](), tmp_path, is_trainable=True)
    for path, layer in _layers(resumed).items():
        assert torch.equal(layer.delta_lora_weight["default"], _layers(pm)[path].delta_lora_weight["default"])


def test_a_checkpoint_without_the_weight_change_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from peftlab import CheckpointError

    pm = _trained(start_steps=0, steps=2)
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.endswith("delta_lora_weight")}
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match="delta_lora_weight"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


# -- 4. disabled or deleted: the pretrained model; merged: the same outputs ---------------------------

def test_disable_and_delete_give_the_pretrained_model_back_after_training():
    base = _run(tiny_bert())
    pm = _trained(start_steps=0, steps=3)
    trained = _run(pm)
    assert (trained - base).abs().max() > 1e-3 * base.abs().max()
    with pm.disable_adapter():
        assert torch.equal(_run(pm), base)
    pm.delete_adapter("default")
    assert not any(isinstance(m, DeltaModule) for m in pm.base_model.modules())
    assert torch.equal(_run(pm), base)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_writes_the_moved_weight_plus_the_low_rank_update(kind):
    pm = _trained(kind, start_steps=0, steps=3)
    expected = _run(pm, kind)
    layers = _layers(pm)
    wanted = {}
    for path, layer in layers.items():
        a, b, scale = layer._factors("default")
        wanted[path] = (_weight_out_in(layer) + _delta_out_in(layer) + scale * b @ a).detach().clone()
    pm.merge_adapter()
    for path, layer in layers.items():
        torch.testing.assert_close(_weight_out_in(layer), wanted[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(pm, kind), expected, atol=1e-4, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(_run(pm, kind), expected, atol=1e-4, rtol=0)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, DeltaModule) for m in plain.modules())
    torch.testing.assert_close(_run(plain, kind), expected, atol=1e-4, rtol=0)


# -- 5. config and placement ------------------------------------------------------------------------

def test_defaults_follow_the_paper():
    config = DeltaLoraConfig()
    assert (config.update_ratio, config.start_steps, config.dropout) == (2.0, 500, 0.0)
    assert config.targets == ("@query", "@value")
    pm = get_peft_model(tiny_bert(), config)
    assert sorted(n.rsplit(".", 1)[-1] for n in _layers(pm)) == ["query"] * 2 + ["value"] * 2
    for layer in _layers(pm).values():
        assert not layer.lora_B["default"].weight.any() and not layer.delta_lora_weight["default"].any()


@pytest.mark.parametrize("field,value,words", [
    ("dropout", 0.1, "removes dropout"), ("update_ratio", 0.0, "positive"), ("update_ratio", -1.0, "positive"),
    ("start_steps", -1, ">= 0"), ("use_dora", True, "plain"), ("r", 0, "positive integer"),
])
def test_bad_config_values_are_refused_by_name(field, value, words):
    with pytest.raises(PeftlabError, match=field) as err:
        DeltaLoraConfig(**{field: value})
    assert words in str(err.value)


def test_peft_forms_are_refused():
    with pytest.raises(PeftlabError, match="no Delta-LoRA"):
        DeltaLoraConfig.from_peft({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query"]})
    assert "peft_type" not in DeltaLoraConfig().to_dict()


def test_embeddings_are_refused_and_the_model_is_left_unchanged():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError):
        get_peft_model(model, DeltaLoraConfig(targets=["query", "word_embeddings"]))
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_quantized_base_is_refused():
    pytest.importorskip("bitsandbytes")
    from peftlab import quantize_model

    model = tiny_bert()
    quantize_model(model, skip=("classifier",))
    with pytest.raises(PeftlabError, match="quantized"):
        get_peft_model(model, DeltaLoraConfig())
    assert not any(isinstance(m, DeltaModule) for m in model.modules())


def test_a_run_resumed_after_a_crash_ends_with_the_uninterrupted_weights_and_d(tmp_path):
    # Delta-LoRA's hooks keep nothing across steps that the adapter (D) and the step count do not hold.
    import dataclasses

    from torch.utils.data import DataLoader

    from peftlab.train.loop import TrainArgs, train

    from ...train import ddp_worker

    class Crash(Exception):
        pass

    def crash(done, loss):
        if done == 4:
            raise Crash

    def model():
        torch.manual_seed(0)
        return get_peft_model(tiny_bert(), DeltaLoraConfig(r=4, start_steps=1, modules_to_save=("classifier",)))

    def data():
        return DataLoader(ddp_worker.rows()[:24], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))

    args = TrainArgs(epochs=2, lr=1e-3, warmup_ratio=0.2, progress=False)
    whole = model()
    train(whole, data(), args)
    saving = dataclasses.replace(args, save_every=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(Crash):
        train(model(), data(), saving, on_step=crash)
    resumed = model()
    train(resumed, data(), dataclasses.replace(saving, resume=True))
    want, got = whole.adapter_state_dict(), resumed.adapter_state_dict()
    assert want.keys() == got.keys() and any("delta_lora" in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)
