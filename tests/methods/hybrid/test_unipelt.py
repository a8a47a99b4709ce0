"""UniPELT: gated LoRA, gated prefix and gated adapter as one adapter; each gate scales its part."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.methods.additive.prefix_tuning import PrefixTuningConfig
from peftlab.methods.additive.sequential_adapter import SequentialAdapterConfig, SequentialAdapterLayer
from peftlab.methods.hybrid.unipelt import GatedBottleneck, LoraGates, PrefixGates, UniPELTConfig
from peftlab.methods.reparameterized.lora import LoraConfig

from ...conftest import main_output, model_inputs, perturb, tiny_bert, tiny_gpt2

SMALL = UniPELTConfig(prefix=PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
                      adapter=SequentialAdapterConfig(targets=("@ffn_out",), bottleneck=4, init_scale=0.02))
INPUTS = model_inputs("bert")  # two examples, the first padded


def _model(attention="sdpa"):
    base = tiny_bert()
    base.set_attn_implementation(attention)
    pm = get_peft_model(base, SMALL)
    perturb(pm, "default", 0, scale=0.2)
    return pm


def _gates(pm, part):
    """The Gate modules of one part, in model order."""
    if part == "adapter":
        return [m.gate for m in pm.modules() if isinstance(m, GatedBottleneck)]
    kind = LoraGates if part == "lora" else PrefixGates
    return [m.unipelt_gate["default"] for m in pm.modules() if isinstance(m, kind)]


@contextlib.contextmanager
def _forced(pm, part, value):
    """Every gate of ``part`` outputs ``value`` for every example."""
    handles = [g.register_forward_hook(lambda m, args, out: torch.full_like(out, value)) for g in _gates(pm, part)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _gates_site(pm, kind):
    """The first (layer 0) wrapper of type ``kind``."""
    return next(m for m in pm.modules() if isinstance(m, kind))


def _run(pm):
    with torch.no_grad():
        return main_output(pm(**INPUTS))


def _captured(module, pm):
    """(args, kwargs, output) of ``module``'s first call in a forward pass of ``pm``."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o)) if not seen else None,
                                          with_kwargs=True)
    try:
        _run(pm)
    finally:
        handle.remove()
    return seen[0]


def test_three_parts_each_with_a_gate_per_layer():
    pm = _model()
    assert len(_gates(pm, "lora")) == 4 and len(_gates(pm, "prefix")) == 2 and len(_gates(pm, "adapter")) == 2
    assert {id(p) for p in pm.parameters() if p.requires_grad} == {id(p) for p in pm.adapter_parameters("default")}
    gate_params = {id(p) for part in ("lora", "prefix", "adapter") for g in _gates(pm, part) for p in g.parameters()}
    assert gate_params <= {id(p) for p in pm.adapter_parameters("default")}


@pytest.mark.parametrize("part", ["lora", "adapter"])
def test_a_zero_gate_removes_lora_and_adapter_exactly(part):
    pm = _model()
    natural = _run(pm)
    with _forced(pm, part, 0.0):
        gated_off = _run(pm)
    assert (gated_off - natural).abs().max() > 1e-3 * natural.abs().max()  # the part mattered
    # The same model with that part's output zeroed (other gates left to compute from the input).
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if (part == "lora" and "lora_B" in name) or (part == "adapter" and ".bottleneck.default.up." in name):
                p.zero_()
    torch.testing.assert_close(gated_off, _run(pm), atol=1e-6, rtol=0)


def test_a_zero_prefix_gate_zeroes_the_prefix_keys_and_values():
    # The paper multiplies P_k and P_v by G_P: at 0 the prefix positions hold zero keys and values.
    pm = _model()
    with _forced(pm, "prefix", 0.0):
        gated_off = _run(pm)
    owner = pm.model_adapters["prefix_tuning"]
    owner.fold()
    with torch.no_grad():
        owner.prompt_embeddings["default"].zero_()
    torch.testing.assert_close(gated_off, _run(pm), atol=1e-6, rtol=0)


def test_lora_gate_scales_the_low_rank_update_by_hand():
    pm = _model()
    site = _gates_site(pm, LoraGates)  # layer 0's query
    lora = site.base_layer
    for c in (0.0, 0.3, 1.0):
        with _forced(pm, "lora", c):
            (x,), _, out = _captured(site, pm)
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        expected = F.linear(x, lora.base_layer.weight, lora.base_layer.bias) + c * (x @ a.T @ b.T)  # alpha/r = 1
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_adapter_gate_scales_the_bottleneck_output_by_hand():
    pm = _model()
    layer = next(m for m in pm.modules() if isinstance(m, GatedBottleneck))
    owner = next(m for m in pm.modules() if isinstance(m, SequentialAdapterLayer) and m.bottleneck["default"] is layer)
    for c in (0.0, 0.3, 1.0):
        with _forced(pm, "adapter", c):
            (x,), _, out = _captured(owner, pm)
        h = F.linear(x, owner.base_layer.weight, owner.base_layer.bias)
        expected = h + c * layer.up(torch.relu(layer.down(h)))
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_gate_scales_the_prefix_keys_and_values_by_hand(attention):
    pm = _model(attention)
    assert pm.base_model.config._attn_implementation == f"peftlab_prefix_unipelt_{attention}"
    site = _gates_site(pm, PrefixGates)  # layer 0's self-attention
    attn = site.base_layer
    prefix = pm.model_adapters["prefix_tuning"]._arranged("default")
    pk, pv = prefix[0], prefix[1]  # layer 0: (heads, p, d_h)
    heads, p, dh = pk.shape
    for c in (0.0, 0.3, 1.0):
        with _forced(pm, "prefix", c):
            args, kwargs, out = _captured(site, pm)
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():  # the projections as the model ran them (LoRA and its gate included)
            q, k, v = (m(x).view(*x.shape[:2], heads, dh).transpose(1, 2) for m in (attn.query, attn.key, attn.value))
        keys = torch.cat([c * pk.expand(x.shape[0], -1, -1, -1), k], dim=2)
        values = torch.cat([c * pv.expand(x.shape[0], -1, -1, -1), v], dim=2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(dh)
        padding = torch.cat([torch.ones(x.shape[0], p), INPUTS["attention_mask"].float()], dim=1) == 0
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ values).transpose(1, 2).reshape(*x.shape[:2], heads * dh)
        torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_gates_are_computed_from_each_examples_hidden_state():
    pm = get_peft_model(tiny_bert(), SMALL)
    values = []
    handles = [g.register_forward_hook(lambda m, a, out: values.append(out))
               for part in ("lora", "prefix", "adapter") for g in _gates(pm, part)]
    _run(pm)
    for h in handles:
        h.remove()
    assert len(values) == 8
    for g in values:
        assert g.shape == (2,) and ((g > 0) & (g < 1)).all()
        assert (g - 0.5).abs().max() < 0.1  # N(0, 0.02^2) weights, zero bias: near 0.5 at init
        assert g[0] != g[1]  # two inputs, two gate values


def test_saved_and_loaded_as_one_adapter_with_nested_config(tmp_path):
    config = UniPELTConfig(modules_to_save=("classifier",))
    written = config.to_dict()
    assert written["lora"]["method"] == "lora" and written["lora"]["r"] == 8 and written["lora"]["alpha"] == 8
    assert written["prefix"]["method"] == "prefix_tuning" and written["prefix"]["num_virtual_tokens"] == 10
    assert written["prefix"]["encoder_hidden_size"] == 512
    assert written["adapter"]["method"] == "sequential_adapter" and written["adapter"]["reduction_factor"] == 16
    assert config_from_dict(json.loads(json.dumps(written))) == config
    pm = get_peft_model(tiny_bert(), SMALL)
    perturb(pm, "default", 0, scale=0.2)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "unipelt"
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(_run(loaded), _run(pm))
    loaded.delete_adapter("default")
    torch.testing.assert_close(_run(loaded), main_output(tiny_bert()(**INPUTS)).detach())


def test_decoders_and_bad_parts_are_refused():
    with pytest.raises(PeftlabError, match="bidirectional encoders"):
        get_peft_model(tiny_gpt2(), UniPELTConfig())
    with pytest.raises(PeftlabError, match="lora"):
        UniPELTConfig(lora=PrefixTuningConfig())
    with pytest.raises(PeftlabError, match="use_dora"):
        UniPELTConfig(lora=LoraConfig(use_dora=True))
    with pytest.raises(PeftlabError, match="train_layernorm"):
        UniPELTConfig(adapter=SequentialAdapterConfig(train_layernorm=True))
    with pytest.raises(PeftlabError, match="cannot be merged"):
        _model().merge_adapter()


def test_stacks_with_a_plain_prefix_adapter_and_leaves_it_ungated():
    pm = _model()
    plain = PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=False)
    pm.add_adapter("plain", plain)
    perturb(pm, "plain", 1, scale=0.2)
    alone = get_peft_model(tiny_bert(), plain, "plain")
    alone.load_adapter_state_dict("plain", pm.adapter_state_dict("plain"))
    pm.set_adapter("plain")  # the UniPELT adapter inactive: the plain prefix as prefix tuning runs it
    torch.testing.assert_close(_run(pm), _run(alone))
    pm.set_adapter(["default", "plain"])
    with _forced(pm, "prefix", 0.0):  # only the UniPELT prefix is gated
        both = _run(pm)
    owner = pm.model_adapters["prefix_tuning"]
    owner.fold("default")
    with torch.no_grad():
        owner.prompt_embeddings["default"].zero_()
    torch.testing.assert_close(both, _run(pm), atol=1e-6, rtol=0)
    pm.delete_adapter("default")
    pm.set_adapter("plain")
    torch.testing.assert_close(_run(pm), _run(alone))
