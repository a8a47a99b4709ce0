"""LoRA's fast paths compute the same thing as the plain formula.

The forward adds ``scale * (x A^T) B^T`` into the base output inside one GEMM (in place when the
base layer is a plain Linear/Conv1D/Embedding), and dropout is one boolean mask whose 1/(1-p)
rescale rides on the GEMM's alpha. These tests pin those shortcuts to the update rule.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer

from ...conftest import TINY_MODELS, main_output, model_inputs, perturb


def _perturbed(kind, config):
    pm = get_peft_model(TINY_MODELS[kind](), config)
    perturb(pm)
    return pm


def _output_and_grads(pm, kind):
    out = main_output(pm(**model_inputs(kind)))
    out.pow(2).mean().backward()
    grads = [p.grad.clone() for p in pm.adapter_parameters("default")]
    pm.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_in_place_accumulation_matches_the_out_of_place_path(kind):
    config = LoraConfig(targets=("@query", "@value", "@ffn_out", "@embeddings"))
    pm = _perturbed(kind, config)
    fast, fast_grads = _output_and_grads(pm, kind)
    # A forward hook on the base layer makes LoRA take the out-of-place path (the hook might keep
    # the base output, which must then stay unchanged).
    kept = []
    for module in pm.modules():
        if isinstance(module, LoraLayer):
            module.base_layer.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()) or None)
    slow, slow_grads = _output_and_grads(pm, kind)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # and by hand: the hooked base outputs were not modified in place
        layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
        kept.clear()
        pm(**model_inputs(kind))
        assert len(kept) == len(layers)


def test_in_place_add_keeps_autograd_correct_through_the_base_output():
    # The frozen base output feeds both LoRA's add and the rest of the network; gradients of x
    # must include the base path (W0) and the low-rank path (scale B A).
    torch.manual_seed(0)
    model = nn.Sequential()
    model.proj = nn.Linear(6, 5)
    pm = get_peft_model(model, LoraConfig(r=3, alpha=6, targets=("proj",)))
    layer = pm.base_model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 6, requires_grad=True)
    pm(x).sum().backward()
    w = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(x.grad, torch.ones(4, 5) @ w)


def test_dropout_is_one_binary_mask_rescaled_by_one_over_keep():
    model = nn.Sequential()
    model.proj = nn.Linear(4, 4, bias=False)
    pm = get_peft_model(model, LoraConfig(r=4, alpha=4, dropout=0.25, targets=("proj",)))  # scale 1
    layer = pm.base_model.proj
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(4))
        layer.lora_B["default"].weight.copy_(torch.eye(4))
    pm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        delta = pm(torch.ones(20000, 4))  # = (x * mask) / (1 - p) with x = 1
    values = delta.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert abs((delta == 0).float().mean().item() - 0.25) < 0.01
    assert abs(delta.mean().item() - 1.0) < 0.02  # unbiased
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(torch.ones(3, 4)), torch.ones(3, 4))


def test_no_graph_breaks_under_dynamo():
    dynamo = pytest.importorskip("torch._dynamo")
    model = nn.Sequential()
    model.proj = nn.Linear(8, 8)
    pm = get_peft_model(model, LoraConfig(r=2, dropout=0.1, targets=("proj",)))
    layer = pm.base_model.proj
    for mode, grad in ((layer.train, True), (layer.eval, True), (layer.eval, False)):  # dropout, low-rank, folded
        mode()
        dynamo.reset()
        with torch.set_grad_enabled(grad):
            explanation = dynamo.explain(layer)(torch.randn(2, 3, 8))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_inference_folds_the_update_into_the_weight_and_matches(kind):
    # Without gradients for A and B, a prompt-sized batch runs x (W0 + s B A)^T: one GEMM with a
    # folded weight instead of the low-rank detour. Same numbers, base weights untouched.
    pm = _perturbed(kind, LoraConfig(targets=("@query", "@value", "@ffn_in")))
    pm.eval()
    inputs = model_inputs(kind, batch=4, length=16)  # 64 tokens: above the fold threshold of 32-wide layers
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    weights = [m.base_layer.weight.clone() for m in layers]
    with torch.no_grad():
        x = torch.randn(64, layers[0].in_features)
        assert layers[0]._fold_into_weight(x, ["default"])
        folded = main_output(pm(**inputs))
    low_rank = main_output(pm(**inputs))  # grad enabled and A, B trainable: the low-rank path
    assert not layers[0]._fold_into_weight(x, ["default"])
    torch.testing.assert_close(folded, low_rank.detach(), atol=1e-5, rtol=1e-5)
    for m, w in zip(layers, weights):
        assert torch.equal(m.base_layer.weight, w)
    with torch.no_grad():  # one token: the low-rank path is the cheaper one
        assert not layers[0]._fold_into_weight(torch.randn(1, layers[0].in_features), ["default"])


def test_mixed_batch_path_has_no_graph_breaks():
    dynamo = pytest.importorskip("torch._dynamo")
    model = nn.Sequential()
    model.proj = nn.Linear(8, 8)
    pm = get_peft_model(model, LoraConfig(r=2, targets=("proj",)), "a")
    pm.add_adapter("b", LoraConfig(r=3, targets=("proj",)))
    layer = pm.base_model.proj
    with pm.mixed_batch(["b", "a"]):
        dynamo.reset()
        explanation = dynamo.explain(layer)(torch.randn(2, 3, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_siblings_fed_the_same_input_share_one_low_rank_gemm(kind):
    from peftlab.methods.reparameterized import lora

    config = LoraConfig(targets=("@query", "@key", "@value", "@ffn_in"))
    pm = _perturbed(kind, config)
    pm.train()
    for module in pm.modules():  # the base model's own dropout off, so two runs compare exactly
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    shares = {id(m._share) for m in layers if m._share is not None}
    assert shares, "query/key/value under one parent should form a group"
    calls = []
    original = lora._SharedInput.low

    def counting(self, layer, x, x2):
        low = original(self, layer, x, x2)
        calls.append(low is not None)
        return low

    lora._SharedInput.low = counting
    try:
        shared, shared_grads = _output_and_grads(pm, kind)
    finally:
        lora._SharedInput.low = original
    assert calls and all(calls)
    # no activation kept afterwards
    assert all(m._share is None or getattr(m._share.state, "x", None) is None for m in layers)
    for m in layers:
        m._share = None
    alone, alone_grads = _output_and_grads(pm, kind)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, alone_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_siblings_share_their_input_under_inference_mode(kind):
    # Inference tensors keep no version counter: reading it used to raise in the shared path.
    pm = _perturbed(kind, LoraConfig(targets=("@query", "@key", "@value")))
    pm.eval()
    inputs = model_inputs(kind, batch=1, length=4)  # 4 tokens: the low-rank path, not the folded weight
    with torch.no_grad():
        want = main_output(pm(**inputs))
    with torch.inference_mode():
        got = main_output(pm(**inputs))
    torch.testing.assert_close(got.clone(), want, atol=1e-6, rtol=1e-6)


def test_a_sibling_fed_another_input_computes_its_own():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.q(x) + self.k(y)

    pm = get_peft_model(Block(), LoraConfig(r=2, targets=("q", "k")))
    with torch.no_grad():
        for p in pm.adapter_parameters("default"):
            p.normal_()
    pm.train()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    got = pm(x, y)
    b = pm.base_model
    want = sum(layer.base_layer(inp) + layer.settings["default"] * inp @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
               for layer, inp in ((b.q, x), (b.k, y)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sibling_groups_survive_copy_and_pickle():
    import copy
    import pickle

    pm = _perturbed("bert", LoraConfig(targets=("@query", "@key", "@value"))).eval()  # grads on: shared path
    twin = copy.deepcopy(pm)
    layers = [m for m in twin.modules() if isinstance(m, LoraLayer)]
    assert all(m._share is not None and all(s in layers for s in m._share.members) for m in layers)
    pickle.loads(pickle.dumps(pm))
    torch.testing.assert_close(main_output(twin(**model_inputs("bert"))), main_output(pm(**model_inputs("bert"))))


def test_joint_down_projection_matches_separate_products_and_skips_unused_outputs():
    from peftlab.methods.reparameterized.lora import _JointDown

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    a1, a2 = (torch.randn(r, 5, generator=g, requires_grad=True) for r in (2, 3))
    low1, low2 = _JointDown.apply(x, a1, a2)
    ref1, ref2 = x @ a1.T, x @ a2.T
    torch.testing.assert_close(low1, ref1)
    torch.testing.assert_close(low2, ref2)
    w1, w2 = torch.randn(6, 2, generator=g), torch.randn(6, 3, generator=g)
    got = torch.autograd.grad((low1 * w1).sum() + (low2 * w2).sum(), (x, a1, a2))
    want = torch.autograd.grad((ref1 * w1).sum() + (ref2 * w2).sum(), (x, a1, a2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # only one sibling's output used (the other layer's adapter disabled mid-forward): its A gets no gradient
    low1, _ = _JointDown.apply(x, a1, a2)
    (low1 * w1).sum().backward()
    assert a2.grad is None and a1.grad is not None
    torch.testing.assert_close(x.grad, w1 @ a1.detach())


@pytest.mark.parametrize("targets", [("query", "value"), ("query", "key", "value")], ids=["separate", "shared-input"])
def test_bf16_autocast_trains_with_fp32_adapter_weights(targets):
    """Under CPU bf16 autocast the activations are bf16 and the adapter weights fp32: the fast paths
    compute in the activations' dtype and return fp32 gradients close to an fp32 step's."""
    from ...conftest import training_batch

    torch.manual_seed(0)
    pm = get_peft_model(TINY_MODELS["bert"](), LoraConfig(r=4, targets=targets))
    with torch.no_grad():  # B starts at zero: give it values so every path carries a signal
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = training_batch("bert")
    grads = []
    for autocast in (False, True):
        pm.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pm(**batch).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert torch.allclose(grad, grads[0][name], rtol=0.1, atol=0.1 * grads[0][name].abs().max().item()), name


def test_joint_down_projection_keeps_no_input_when_every_a_is_frozen():
    from peftlab.methods.reparameterized.lora import _JointDown

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    a1, a2 = torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)  # frozen
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        low1, low2 = _JointDown.apply(x, a1, a2)
    assert not any(t is x or t.data_ptr() == x.data_ptr() for t in saved)  # only the A_i are kept
    w1, w2 = torch.randn(6, 2, generator=g), torch.randn(6, 3, generator=g)
    (grad_x,) = torch.autograd.grad((low1 * w1).sum() + (low2 * w2).sum(), (x,))
    torch.testing.assert_close(grad_x, w1 @ a1 + w2 @ a2)
