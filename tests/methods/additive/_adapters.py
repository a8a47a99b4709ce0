"""Helpers shared by the bottleneck-adapter tests (sequential, residual, parallel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...conftest import main_output, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}
D = 32  # hidden size of every tiny model in conftest


def run(model, kind: str) -> torch.Tensor:
    inputs = model_inputs(kind)
    if kind == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    with torch.no_grad():
        return main_output(model(**inputs))


def wrapped(peft_model, cls) -> list[str]:
    """Names (under the base model) of the modules wrapped by ``cls``, in model order."""
    return [n.removeprefix("base_model.") for n, m in peft_model.named_modules() if isinstance(m, cls)]


def perturb(peft_model, name: str = "default", seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def bottleneck_by_hand(x: torch.Tensor, block, act=F.relu) -> torch.Tensor:
    """W_up f(W_down x + b_down) + b_up with explicit matrix products."""
    hidden = act(x @ block.down.weight.T + block.down.bias)
    return hidden @ block.up.weight.T + block.up.bias


def site_params(d_in: int, m: int, d_out: int | None = None) -> int:
    d_out = d_in if d_out is None else d_out
    return d_in * m + m + m * d_out + d_out


def check_lifecycle(kind: str, config, tmp_path) -> None:
    """What the conformance suite checks on default configs, for a non-default option: trained (perturbed)
    adapter saves and loads to equal outputs, disabling gives the base model, deleting restores it."""
    from peftlab import PeftModel, get_peft_model
    from peftlab.core.layer import DeltaModule

    base_model = BUILDERS[kind]()
    base, n_base = run(base_model, kind), sum(p.numel() for p in base_model.parameters())
    pm = get_peft_model(BUILDERS[kind](), config)
    perturb(pm)
    adapted = run(pm, kind)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with pm.disable_adapter():
        assert torch.allclose(run(pm, kind), base, atol=1e-6)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    assert torch.allclose(run(loaded, kind), adapted, atol=1e-6)
    pm.add_adapter("other", config)
    pm.delete_adapter("default")
    pm.delete_adapter("other")
    assert not any(isinstance(m, DeltaModule) for m in pm.base_model.modules())
    assert sum(p.numel() for p in pm.parameters()) == n_base
    assert torch.allclose(run(pm, kind), base, atol=1e-6)
