"""DyLoRA: each training step uses only the first b components of A and B (b drawn once per step
from [r_min, r_max], reproducible from the seed); afterwards the adapter works at any rank b with
``(alpha / b) B[:, :b] A[:b]``, degrading gracefully where a truncated plain LoRA adapter does not."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.core.registry import get_method
from peftlab.methods.reparameterized.dylora import DyLora, DyLoraConfig, set_rank, training_rank
from peftlab.methods.reparameterized.lora import LoraLayer

from ...conftest import labelled_batches, main_output, model_inputs, tiny_bert

TOLERANCE = get_method("dylora").merge_tolerance


def _tiny(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 5, bias=bias))
    return model.eval()


def _randomize_b(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(pm):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g))


def _lora_layers(pm):
    return [m for m in pm.modules() if isinstance(m, LoraLayer)]


def _by_hand(layer, x, b, alpha):
    a, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    return x @ w0.T + b0 + (alpha / b) * (x @ a[:b].T @ up[:, :b].T)


def _sgd(pm):
    return torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.0)


# -- the update rule ----------------------------------------------------------------------------------

def test_outside_training_the_update_is_alpha_over_b_times_the_first_b_components():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, inference_rank=2, targets=("proj",)))
    layer = pm.base_model.proj
    assert layer.lora_A["default"].weight.shape == (4, 6) and torch.all(layer.lora_B["default"].weight == 0)
    _randomize_b(pm)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(pm(x), _by_hand(layer, x, 2, 6.0), atol=1e-6)
    # rsLoRA's scale, alpha / sqrt(b)
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, rslora=True, inference_rank=3, targets=("proj",)))
    _randomize_b(pm)
    layer = pm.base_model.proj
    a, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + 6 / math.sqrt(3) * (x @ a[:3].T @ up[:, :3].T)
    with torch.no_grad():
        assert torch.allclose(pm(x), expected, atol=1e-6)


def test_a_training_step_uses_only_the_drawn_rank_and_only_its_components_get_gradients():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, targets=("proj",)))
    _randomize_b(pm)
    layer = pm.base_model.proj
    a, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 6)
    pm.train()
    torch.manual_seed(1)
    pm.begin_training([], total_steps=20)
    opt = _sgd(pm)
    seen = set()
    for _ in range(20):
        b = training_rank(pm)
        seen.add(b)
        out = pm(x)
        assert torch.allclose(out, _by_hand(layer, x, b, 6.0), atol=1e-6)
        out.pow(2).sum().backward()
        # components beyond b get exactly zero gradient; the first b do get one
        assert torch.all(a.grad[b:] == 0) and torch.all(up.grad[:, b:] == 0)
        assert torch.all(a.grad[:b].abs().sum(1) > 0) and torch.all(up.grad[:, :b].abs().sum(0) > 0)
        pm.optimizer_step(opt)
        opt.zero_grad()
    assert len(seen) >= 3, f"the training rank did not vary across steps: {seen}"


def test_frozen_mode_trains_only_the_drawn_bth_component():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, frozen=True, targets=("proj",)))
    _randomize_b(pm)
    layer = pm.base_model.proj
    a, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 6)
    pm.train()
    torch.manual_seed(2)
    pm.begin_training([], total_steps=12)
    opt = _sgd(pm)
    seen = set()
    for _ in range(12):
        b = training_rank(pm)
        seen.add(b)
        out = pm(x)
        assert torch.allclose(out, _by_hand(layer, x, b, 6.0), atol=1e-6)  # same forward, fewer gradients
        out.pow(2).sum().backward()
        others = [i for i in range(4) if i != b - 1]
        assert torch.all(a.grad[others] == 0) and torch.all(up.grad[:, others] == 0)
        assert a.grad[b - 1].abs().sum() > 0 and up.grad[:, b - 1].abs().sum() > 0
        pm.optimizer_step(opt)
        opt.zero_grad()
    assert len(seen) >= 3


def test_no_grad_or_eval_forwards_use_the_inference_rank_even_in_training():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, targets=("proj",)))
    _randomize_b(pm)
    pm.train()
    pm.begin_training([], total_steps=1)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(pm(x), _by_hand(pm.base_model.proj, x, 4, 6.0), atol=1e-6)


# -- the draw -------------------------------------------------------------------------------------------

def _ranks(config, torch_seed, steps=80):
    pm = get_peft_model(_tiny(), config)
    pm.train()
    torch.manual_seed(torch_seed)
    pm.begin_training([], total_steps=steps)
    opt = _sgd(pm)
    ranks = []
    for _ in range(steps):
        ranks.append(training_rank(pm))
        pm.optimizer_step(opt)
    return ranks


def test_ranks_are_drawn_uniformly_from_the_range_and_repeat_with_the_runs_seed():
    config = DyLoraConfig(r=8, r_min=3, r_max=6, targets=("proj",))
    ranks = _ranks(config, 0)
    assert set(ranks) == {3, 4, 5, 6}
    assert ranks == _ranks(config, 0), "the same run seed must give the same ranks"
    assert ranks != _ranks(config, 1)
    seeded = config.replace(seed=7)
    assert _ranks(seeded, 0) == _ranks(seeded, 1), "config.seed fixes the draws whatever the torch seed"
    # The draws use their own generator: the global random stream (dropout, data order) is untouched.
    torch.manual_seed(5)
    expected = torch.rand(3)
    pm = get_peft_model(_tiny(), config)
    torch.manual_seed(5)
    pm.begin_training([], total_steps=10)
    opt = _sgd(pm)
    for _ in range(10):
        pm.optimizer_step(opt)
    assert torch.equal(torch.rand(3), expected)


def test_one_rank_per_step_is_shared_by_every_layer():
    pm = get_peft_model(tiny_bert(), DyLoraConfig())
    variants = [m.variants["default"] for m in _lora_layers(pm)]
    assert len(variants) == 4 and all(isinstance(v, DyLora) for v in variants)
    torch.manual_seed(0)
    pm.begin_training([], total_steps=30)
    opt = _sgd(pm)
    seen = set()
    for _ in range(30):
        assert len({v.step_rank for v in variants}) == 1
        seen.add(variants[0].step_rank)
        pm.optimizer_step(opt)
    assert len(seen) > 3 and seen <= set(range(1, 9))


def test_fixed_rank_r_trains_exactly_as_plain_lora():
    """r_min = r_max = r: every step at b = r, scale alpha / r — plain LoRA, step for step."""
    outs = []
    for config in (LoraConfig(r=4, alpha=8), DyLoraConfig(r=4, alpha=8, r_min=4)):
        torch.manual_seed(0)
        pm = get_peft_model(tiny_bert(), config)
        pm.train()  # with BERT's dropout: the draws must not shift the global random stream
        torch.manual_seed(1)
        pm.begin_training([], total_steps=3)
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        for batch in labelled_batches(3):
            pm(**batch).loss.backward()
            pm.optimizer_step(opt)
            opt.zero_grad()
        pm.eval()
        with torch.no_grad():
            outs.append(main_output(pm(**model_inputs("bert"))))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


# -- after training: any rank, exactly ------------------------------------------------------------

def test_each_rank_is_exactly_its_first_b_components_and_merges_exactly():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, alpha=6, targets=("proj",)))
    _randomize_b(pm)
    layer = pm.base_model.proj
    x = torch.randn(3, 6)
    w0 = layer.base_layer.weight.detach().clone()
    for b in range(1, 5):
        set_rank(pm, "default", b)
        assert pm.peft_configs["default"].inference_rank == b
        with torch.no_grad():
            expected = _by_hand(layer, x, b, 6.0)
            assert torch.allclose(pm(x), expected, atol=1e-6)
            pm.merge_adapter()
            a, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert torch.allclose(layer.base_layer.weight, w0 + (6 / b) * up[:, :b] @ a[:b], atol=1e-6)
            assert torch.allclose(pm(x), expected, atol=TOLERANCE)
        with pytest.raises(PeftlabError, match="unmerge"):
            set_rank(pm, "default", 1 if b > 1 else 2)
        assert pm.peft_configs["default"].inference_rank == b, "a refused set_rank changed the config"
        pm.unmerge_adapter()
        assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)


def _train_regression(config, steps=300, lr=2e-2):
    """Fit ``y = dW x`` (16 x 16, singular values 4, 2, 1, ...: rank 8) with an adapter on a zero
    weight; returns the layer."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 16, bias=False))
    nn.init.zeros_(model.proj.weight)
    pm = get_peft_model(model, config)
    pm.train()
    pm.begin_training([], total_steps=steps)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        (pm(x) - x @ _TARGET.T).pow(2).sum(-1).mean().backward()
        pm.optimizer_step(opt)
        opt.zero_grad()
        schedule.step()
    return pm.base_model.proj


def _target() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    s = 4 * 0.5 ** torch.arange(8.0)
    return (u[:, :8] * s) @ v[:, :8].T, s


_TARGET, _SINGULAR = _target()


def test_dylora_degrades_gracefully_with_the_rank_where_truncated_plain_lora_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    try:
        dylora = _train_regression(DyLoraConfig(r=8, alpha=8, targets=("proj",)))
        lora = _train_regression(LoraConfig(r=8, alpha=8, targets=("proj",)))
    finally:
        torch.set_num_threads(threads)
    best = [float(_SINGULAR[b:].pow(2).sum()) for b in range(1, 9)]  # Eckart-Young: the best rank-b error
    dy_err, lora_err = [], []
    with torch.no_grad():
        for b in range(1, 9):
            dylora.variants["default"].rank = b
            dy_err.append(float((dylora.delta_weight("default") - _TARGET).pow(2).sum()))
            a, up = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            # plain LoRA's first b components, at its own scale alpha / r or at DyLoRA's alpha / b: the better
            truncated = up[:, :b] @ a[:b]
            lora_err.append(min(float((s * truncated - _TARGET).pow(2).sum()) for s in (8 / 8, 8 / b)))
    total = float(_TARGET.pow(2).sum())
    assert lora_err[-1] < 1e-3 * total, "plain LoRA at full rank fits the target: the comparison is fair"
    assert dy_err[-1] < 0.05 * total
    # graceful: the error falls with every added component, and rank 1 is near the best rank-1 fit
    assert all(later <= earlier * 1.05 for earlier, later in zip(dy_err, dy_err[1:])), dy_err
    assert dy_err[0] < 1.3 * best[0], (dy_err[0], best[0])
    # truncated plain LoRA is far worse at every reduced rank up to 6
    for b in range(1, 7):
        assert dy_err[b - 1] < 0.5 * lora_err[b - 1], (b, dy_err, lora_err)


# -- saving ---------------------------------------------------------------------------------------------

def test_the_checkpoint_holds_the_full_r_factors_and_loads_at_its_rank(tmp_path):
    pm = get_peft_model(tiny_bert(), DyLoraConfig(r=6, r_max=5))
    _randomize_b(pm)
    set_rank(pm, "default", 3)
    with torch.no_grad():
        at3 = main_output(pm(**model_inputs("bert")))
        set_rank(pm, "default", 5)
        at5 = main_output(pm(**model_inputs("bert")))
        set_rank(pm, "default", 3)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "dylora" and saved["inference_rank"] == 3 and saved["r_max"] == 5
    assert "peft_type" not in saved  # peftlab's own form: HF peft has no DyLoRA
    state = load_file(tmp_path / "adapter_model.safetensors")
    a_shapes = {t.shape for k, t in state.items() if "lora_A" in k}
    assert a_shapes == {torch.Size([6, 32])}, a_shapes  # all r components, whatever the rank in use
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(main_output(loaded(**model_inputs("bert"))), at3, atol=1e-6)
        set_rank(loaded, "default", 5)
        assert torch.allclose(main_output(loaded(**model_inputs("bert"))), at5, atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,named", [
    ({"r_min": 5, "r_max": 3}, "r_min=5"),
    ({"r_max": 9}, "r_max=9"),
    ({"r": 4, "r_max": 6}, "r_max=6"),
    ({"r_min": 0}, "r_min=0"),
    ({"r_min": 9}, "r_min=9"),
    ({"inference_rank": 9}, "inference_rank=9"),
    ({"r_max": 4, "inference_rank": 6}, "inference_rank=6"),
    ({"inference_rank": 0}, "inference_rank=0"),
    ({"use_dora": True}, "use_dora"),
])
def test_bad_configs_are_refused_naming_the_value(fields, named):
    with pytest.raises(PeftlabError, match=named):
        DyLoraConfig(**fields)


def test_set_rank_refuses_bad_ranks_and_other_adapters_and_changes_nothing():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, inference_rank=2, targets=("proj",)))
    pm.add_adapter("plain", LoraConfig(r=2, targets=("proj",)))
    before = pm.peft_configs["default"]
    for bad in (5, 0, 2.0, True):
        with pytest.raises(PeftlabError, match=f"{bad!r}"):
            set_rank(pm, "default", bad)
    assert pm.peft_configs["default"] is before
    assert pm.base_model.proj.variants["default"].rank == 2
    with pytest.raises(PeftlabError, match="'plain' is not a DyLoRA adapter"):
        set_rank(pm, "plain", 1)
    with pytest.raises(PeftlabError, match="'missing'"):
        set_rank(pm, "missing", 1)


def test_embedding_targets_are_refused_before_anything_changes():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.proj = nn.Linear(6, 5)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    model = Model()
    with pytest.raises(PeftlabError, match="Embedding"):
        get_peft_model(model, DyLoraConfig(r=2, targets=("proj", "emb")))
    assert type(model.proj) is nn.Linear and type(model.emb) is nn.Embedding


def test_training_without_begin_training_is_refused():
    pm = get_peft_model(_tiny(), DyLoraConfig(r=4, targets=("proj",)))
    pm.train()
    with pytest.raises(PeftlabError, match="begin_training"):
        pm(torch.randn(2, 6))
