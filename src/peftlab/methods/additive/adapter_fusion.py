"""AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", EACL): several bottleneck adapters, trained before on other tasks and now frozen, are
combined at every site they share by a trained attention over their outputs. With ``h`` the
sublayer output the adapters read (d wide) and ``z_n = h + A_n(h)`` the output of adapter ``n``::

    s_n = softmax_n( (h W_Q + b_Q) . (z_n W_K + b_K) / T )       W_Q, W_K, W_V: d x d, per site
    o   = sum_n s_n (z_n W_V + b_V)

``o`` takes the place of the adapters' output at that site (before the block's residual add and
LayerNorm, where the adapters sit). Only the fusion trains (stage two of the paper); the fused
adapters stay as they were and are named in the config, so the fusion is saved alone and loads
onto a model that has them (under the same names). ``W_Q`` and ``W_K`` start from N(0, 0.02),
``W_V`` from the identity (plus noise of std 1e-6, as the paper's "identity plus small random
noise"), so at init the fusion averages the adapters' outputs with nearly equal weights.
The paper's regulariser keeps ``W_V`` near the identity: ``lambda * sum ||I - W_V||^2`` is added to
the training loss (``value_reg``; 0.01 as in AdapterHub's implementation of the paper).

Sites: every site of a sequential adapter (or a residual adapter with ``placement="ffn_out"``)
that holds all fused adapters (Pfeiffer et al. fuse adapters after the FFN; fusing adapters of the
Houlsby placement fuses at both of their sites). Residual adapters on the block output (Lin et al.'s
placement) are another module type and are refused by name.
Deviations: the softmax temperature ``T`` is a fixed setting (1.0), not annealed; the query reads
the adapters' input ``h`` (the paper's query is the FFN sublayer output, which is that input).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import delta_modules, wrap
from ...core.layer import DeltaModule
from ...core.registry import MethodSpec, register
from .sequential_adapter import SequentialAdapterLayer, factory_kwargs


@dataclasses.dataclass(frozen=True)
class AdapterFusionConfig(PeftConfig):
    """adapters: names of the trained bottleneck adapters to fuse (at least two); temperature: T of
    the softmax; value_reg: weight of the ``||I - W_V||^2`` regulariser (0 turns it off)."""

    adapters: tuple[str, ...] = ()
    temperature: float = 1.0
    value_reg: float = 0.01

    def validate(self) -> None:
        # () is allowed here (a config before the adapters are chosen); attaching it is refused.
        self._require(isinstance(self.adapters, tuple) and len(self.adapters) != 1
                      and all(isinstance(a, str) and a for a in self.adapters) and len(set(self.adapters)) == len(self.adapters),
                      "adapters", "the names of at least two distinct trained adapters, e.g. ('sst2', 'mnli')")
        self._require(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                      and self.temperature > 0, "temperature", "a positive number such as 1.0")
        self._require(isinstance(self.value_reg, (int, float)) and math.isfinite(self.value_reg)
                      and self.value_reg >= 0, "value_reg", "a number >= 0 such as 0.01")

    def required_adapters(self) -> tuple[str, ...]:
        return self.adapters


class Fusion(nn.Module):
    """The attention over adapter outputs at one site: query, key and value maps, d x d each."""

    def __init__(self, d: int, **kw: Any) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d, d, **kw) for _ in range(3))
        with torch.no_grad():
            for layer in (self.query, self.key):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            self.value.weight.copy_(torch.eye(d, **kw) + torch.randn(d, d, **kw) * 1e-6)
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, outputs: torch.Tensor, temperature: float) -> torch.Tensor:
        """h: (..., d), outputs: (..., n, d) -> (..., d)."""
        scores = torch.einsum("...d,...nd->...n", self.query(h), self.key(outputs)) / temperature
        return torch.einsum("...n,...nd->...d", scores.softmax(-1), self.value(outputs))


class FusionLayer(DeltaModule):
    """Wraps a :class:`SequentialAdapterLayer`; while a fusion adapter is live it runs the wrapped
    module's base once, every fused adapter on its output, and the fusion over them."""

    adapter_attrs = ("fusion",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, SequentialAdapterLayer):
            raise PeftlabError(f"AdapterFusion fuses sequential/residual adapters; found {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fusion = nn.ModuleDict()

    def add(self, name: str, config: AdapterFusionConfig) -> None:
        self.fusion[name] = Fusion(self.base_layer.features, **factory_kwargs(self.base_layer.base_layer))
        self.settings[name] = config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        adapters = self.base_layer
        h = adapters.base_layer(*args, **kwargs)
        for name in live:
            config = self.settings[name]
            outputs = torch.stack([h + adapters.bottleneck[a](h) for a in config.adapters], dim=-2)
            h = self.fusion[name](h, outputs, config.temperature).to(h.dtype)
        return h


def _fusion_sites(model: Any, name: str) -> list[FusionLayer]:
    return [m for _, m in delta_modules(model) if isinstance(m, FusionLayer) and name in m.fusion]


def _value_regulariser(model: Any, name: str) -> torch.Tensor | None:
    weight = model.peft_configs[name].value_reg
    if weight == 0:
        return None
    total = None
    for site in _fusion_sites(model, name):
        value = site.fusion[name].value.weight
        term = (torch.eye(value.shape[0], dtype=value.dtype, device=value.device) - value).pow(2).sum()
        total = term if total is None else total + term
    return None if total is None else weight * total


def attach(model: nn.Module, name: str, config: AdapterFusionConfig, host: Any = None) -> None:
    if not config.adapters:
        raise PeftlabError("AdapterFusionConfig.adapters is empty: name the trained adapters to fuse, "
                           "e.g. AdapterFusionConfig(adapters=('sst2', 'mnli'))")
    modules = list(delta_modules(model))
    fused = {id(m.base_layer): m for _, m in modules if isinstance(m, FusionLayer)}  # sites fused before
    sites = [(path, m) for path, m in modules
             if isinstance(m, SequentialAdapterLayer) and all(a in m.bottleneck for a in config.adapters)]
    if not sites:
        raise PeftlabError(f"AdapterFusion over {list(config.adapters)}: no module holds all of them as sequential "
                           "or residual adapters; fuse bottleneck adapters placed at the same sites")
    for path, adapters in sites:
        site = fused.get(id(adapters)) or wrap(model, path, FusionLayer)
        site.add(name, config)


def _example() -> tuple[dict[str, PeftConfig], AdapterFusionConfig]:
    from .sequential_adapter import SequentialAdapterConfig

    after_ffn = SequentialAdapterConfig(bottleneck=4, targets=("@ffn_out",))  # Pfeiffer et al.'s placement
    return ({"task_a": after_ffn, "task_b": after_ffn},
            AdapterFusionConfig(adapters=("task_a", "task_b")))


SPEC = register(MethodSpec(
    name="adapter_fusion", title="AdapterFusion", family="additive", subcategory="adapter composition", config_cls=AdapterFusionConfig,
    trains="an attention over frozen task adapters' outputs at every site they share", attach=attach,
    paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
    mergeable=False, identity_at_init=False, default_lr=5e-5,
    hooks=TrainingHooks(loss=_value_regulariser), example=_example,
))
