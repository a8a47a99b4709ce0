"""LoRA-FA: LoRA with the projection-down A frozen at its random initialisation (a buffer) and only
B trained, so a layer's training forward keeps x A^T instead of x; exact merge; peft's LoRA layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.lora_fa import FrozenDown, LoraFAConfig

from ...conftest import labelled_batches, main_output, model_inputs, perturb, tiny_bert, tiny_gpt2, tiny_llama


def _layer(pm, suffix="layer.0.attention.self.query"):
    return next(m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer) and n.endswith(suffix))


def _a_tensors(pm, name="default"):
    return {n: m.lora_A[name].weight for n, m in pm.base_model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def _saved_storages(fn, module):
    """{storage pointer: bytes} of the activations autograd saves for backward while ``fn`` runs:
    every saved tensor except ``module``'s own weights and buffers (held anyway)."""
    saved: dict[int, int] = {}
    state = {t.untyped_storage().data_ptr() for t in module.state_dict(keep_vars=True).values()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


# -- 1. A is frozen, B trains ------------------------------------------------------------------------

def test_a_is_lora_init_frozen_buffer_and_b_starts_at_zero():
    torch.manual_seed(0)
    fa = get_peft_model(tiny_bert(), LoraFAConfig(r=4))
    torch.manual_seed(0)
    plain = get_peft_model(tiny_bert(), LoraConfig(r=4))
    layer, ref = _layer(fa), _layer(plain)
    assert isinstance(layer.lora_A["default"], FrozenDown)
    # The very A LoRA draws (Kaiming-uniform), kept as a buffer: not a parameter at all.
    torch.testing.assert_close(layer.lora_A["default"].weight, ref.lora_A["default"].weight, rtol=0, atol=0)
    assert not any(".lora_A." in n for n, _ in fa.named_parameters())
    assert not layer.lora_A["default"].weight.requires_grad
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    trainable = {n for n, p in fa.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    assert fa.trainable_parameters_report().trainable == sum(p.numel() for p in fa.adapter_parameters("default"))
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(main_output(fa(**inputs)), main_output(tiny_bert()(**inputs)))


def test_optimizer_steps_move_b_and_never_a():
    pm = get_peft_model(tiny_bert(), LoraFAConfig(r=4))
    pm.set_adapter("default")  # re-marking the adapter trainable must not reach A
    before_a = {n: a.clone() for n, a in _a_tensors(pm).items()}
    before_b = [p.detach().clone() for p in pm.adapter_parameters("default")]
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for batch in labelled_batches(3):
        optimizer.zero_grad()
        pm(**batch).loss.backward()
        for a in _a_tensors(pm).values():
            assert a.grad is None and not a.requires_grad
        optimizer.step()
    for n, a in _a_tensors(pm).items():
        torch.testing.assert_close(a, before_a[n], rtol=0, atol=0)
    assert all(not torch.equal(p, b) for p, b in zip(pm.adapter_parameters("default"), before_b)), "every B trains"


def test_layer_output_and_gradients_by_hand():
    pm = get_peft_model(tiny_bert(), LoraFAConfig(r=4, alpha=8))
    perturb(pm)
    layer = _layer(pm)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32, requires_grad=True)
    got = layer(x)
    expected = x @ w0.T + bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [x, b])
    want = torch.autograd.grad(expected.square().sum(), [x, b])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# -- 2. the memory claim: x is not kept for the LoRA branch --------------------------------------------

def test_a_layer_saves_x_a_not_x_for_backward():
    torch.manual_seed(0)
    sizes = {}
    for label, config in (("lora", LoraConfig(r=8)), ("lora_fa", LoraFAConfig(r=8))):
        layer = LoraLayer(nn.Linear(384, 384).requires_grad_(False))
        layer.add("default", config)
        layer.set_active(["default"])
        nn.init.normal_(layer.lora_B["default"].weight)
        layer.train()
        x = torch.randn(32, 64, 384, requires_grad=True)  # an input mid-network (needs its gradient)
        saved = _saved_storages(lambda: layer(x).sum(), layer)
        kept_x = x.untyped_storage().data_ptr() in saved
        sizes[label] = (sum(saved.values()), kept_x)
    assert sizes["lora"][1], "plain LoRA keeps x for A's gradient (the control)"
    assert not sizes["lora_fa"][1], "LoRA-FA must not keep x"
    # LoRA-FA keeps only x A^T (tokens x r); LoRA keeps x (tokens x in) too.
    tokens = 32 * 64
    assert sizes["lora_fa"][0] == tokens * 8 * 4
    assert sizes["lora"][0] - sizes["lora_fa"][0] >= tokens * 384 * 4


def test_a_model_saves_less_than_lora_with_sibling_layers_sharing_x():
    # query and value are fed the same x: LoRA computes both x A^T in one GEMM that keeps x.
    saved = {}
    for label, config in (("lora", LoraConfig(r=8)), ("lora_fa", LoraFAConfig(r=8))):
        torch.manual_seed(0)
        pm = get_peft_model(tiny_bert(), config)
        pm.train()
        batch = labelled_batches(1, size=8)[0]
        saved[label] = sum(_saved_storages(lambda: pm(**batch).loss, pm).values())
    # one x (tokens x 32 floats) per block no longer kept, 2 blocks
    assert saved["lora"] - saved["lora_fa"] >= 2 * 8 * 8 * 32 * 4


# -- 3. merge ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,kind", [(tiny_bert, "bert"), (tiny_gpt2, "gpt2"), (tiny_llama, "llama")])
def test_merge_is_exact_and_unmerge_restores_the_weights(make, kind):
    pm = get_peft_model(make(), LoraFAConfig(r=4, targets=("@query", "@value", "@ffn_out")))
    perturb(pm)
    inputs = model_inputs(kind)
    weights = {n: p.detach().clone() for n, p in pm.base_model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        expected = main_output(pm(**inputs))
        pm.merge_adapter()
        torch.testing.assert_close(main_output(pm(**inputs)), expected, atol=1e-5, rtol=0)
        pm.unmerge_adapter()
        for n, p in pm.base_model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(main_output(pm.merge_and_unload()(**inputs)), expected, atol=1e-5, rtol=0)


def test_stacks_with_a_plain_lora_adapter_on_the_same_layers():
    pm = get_peft_model(tiny_bert(), LoraFAConfig(r=4), "fa")
    pm.add_adapter("plain", LoraConfig(r=4))
    perturb(pm, "fa", 0)
    perturb(pm, "plain", 1)
    layer = _layer(pm)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        pm.set_adapter("fa")
        after_fa = layer(x)
        a, b = layer.lora_A["plain"].weight, layer.lora_B["plain"].weight
        pm.set_adapter(["fa", "plain"])
        torch.testing.assert_close(layer(x), after_fa + x @ (b @ a).T * 4.0)  # alpha 16 / r 4
    pm.set_adapter("plain")
    assert all(p.requires_grad for p in _layer(pm).lora_A["plain"].parameters())
    assert not _layer(pm).lora_A["fa"].weight.requires_grad


# -- 4. checkpoints: A saved and loaded strictly, peft's LoRA layout ---------------------------------

def test_save_load_round_trip_restores_a_and_b(tmp_path):
    ours = get_peft_model(tiny_bert(), LoraFAConfig(r=4, modules_to_save=("classifier",)))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["peftlab"] == {"method": "lora_fa"}
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("query.lora_A.weight") for k in state), "A is stored (peft's LoRA key)"
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)  # a fresh model draws another A
    assert isinstance(loaded.peft_configs["default"], LoraFAConfig)
    assert isinstance(_layer(loaded).lora_A["default"], FrozenDown)
    torch.testing.assert_close(_layer(loaded).lora_A["default"].weight, _layer(ours).lora_A["default"].weight)
    ours.eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(ours(**inputs)), atol=1e-6, rtol=0)
    del state[next(k for k in state if k.endswith("query.lora_A.weight"))]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftlabError, match="lora_A"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_peft_reads_lora_fa_as_lora_and_its_lora_fa_optimizer_adapter_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(tiny_bert(), LoraFAConfig(r=4, modules_to_save=("classifier",)))
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    inputs = model_inputs("bert")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)
    # peft's LoRA-FA: a LoRA adapter trained by its optimizer (A frozen); same keys as ours.
    trained = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                               modules_to_save=["classifier"]))
    from peft.optimizers import create_lorafa_optimizer

    optimizer = create_lorafa_optimizer(trained, r=4, lora_alpha=16, lr=1e-2)
    before_a = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_A" in n}
    trained.train()
    for batch in labelled_batches(2):
        optimizer.zero_grad()
        trained(**batch).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, before_a[n]) for n, p in trained.named_parameters() if "lora_A" in n)
    trained.save_pretrained(tmp_path / "theirs")
    state = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    mine = get_peft_model(tiny_bert(), LoraFAConfig(r=4, modules_to_save=("classifier",)))
    assert set(mine.adapter_state_dict()) == set(state)
    mine.load_adapter_state_dict("default", state)
    trained.eval()
    mine.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(**inputs).logits, trained(**inputs).logits, atol=1e-5, rtol=0)
    assert not _layer(mine).lora_A["default"].weight.requires_grad


# -- 5. refusals ------------------------------------------------------------------------------------------

def test_embedding_targets_dora_and_unknown_marker_fields_are_refused():
    model = tiny_bert()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PeftlabError, match="Narrow the targets"):
        get_peft_model(model, LoraFAConfig(targets=("query", "word_embeddings")))
    assert {n: type(m) for n, m in model.named_modules()} == before, "a refused config changes nothing"
    with pytest.raises(PeftlabError, match="use_dora"):
        LoraFAConfig(use_dora=True)
    data = {**LoraFAConfig().peft_fields(), "target_modules": ["query"], "peftlab": {"method": "lora_fa", "seed": 1}}
    with pytest.raises(PeftlabError, match="seed"):
        LoraFAConfig.from_peft(data)
