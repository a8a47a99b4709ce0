"""Residual adapter (Lin et al., 2020, "Exploring Versatile Generative Language Model Via Parameter-
Efficient Transfer Learning"): one bottleneck adapter per transformer block, after the block.

``placement="block"`` (default, the paper's Figure 1): the adapter sits on the block's output ``H``
(after the block's last residual add — and, in post-LN BERT, its LayerNorm), with a LayerNorm of its
own in front of the bottleneck and its own residual::

    H <- H + W_up f(W_down LN(H) + b_down) + b_up     LN: d -> d (trained), W_down: m x d, W_up: d x m

``LN`` starts as the identity affine map (weight 1, bias 0); ``W_up`` and ``b_up`` start at zero so
the adapter is the identity at init (Lin et al. do not state their init; zero-up is the choice that
keeps the frozen model's output at the start). A block trains ``2 d m + m + d`` bottleneck
parameters plus ``2 d`` for its LayerNorm. The blocks are the layers of the model's layer list (the
module of each ``@ffn`` path up to its first numeric index: ``bert.encoder.layer.3``,
``transformer.h.3``, ``model.layers.3``, ``encoder.block.3``); with ``targets`` the adapter goes on
the output of the named modules instead (the first element where they return a tuple).

``placement="ffn_out"``: Pfeiffer et al.'s (2021, "AdapterFusion") single adapter per layer — the
sequential adapter's bottleneck after the FFN output projection, before the residual add, without
a LayerNorm (``targets`` default ``@ffn_out``). AdapterFusion fuses adapters of this placement only.

Not mergeable: ``f`` is nonlinear.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .sequential_adapter import (Bottleneck, add_bottlenecks, bottleneck_width, factory_kwargs, linear_features,
                                 validate_bottleneck_fields)

PLACEMENTS = ("block", "ffn_out")


@dataclasses.dataclass(frozen=True)
class ResidualAdapterConfig(PeftConfig):
    """placement: ``"block"`` (Lin et al.: LN + bottleneck on each block's output) or ``"ffn_out"``
    (Pfeiffer et al.: bottleneck after the FFN output projection, no LN); targets: ``None`` for the
    placement's sites, else the modules to put the adapter after; other fields as
    :class:`~peftlab.methods.additive.sequential_adapter.SequentialAdapterConfig` (W_up starts at zero)."""

    targets: tuple[str, ...] | str | None = None
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init_scale: float = 1e-2
    placement: str = "block"

    def validate(self) -> None:
        validate_bottleneck_fields(self)
        self._require(self.placement in PLACEMENTS, "placement",
                      f"one of {PLACEMENTS} ('block': after each transformer block, as Lin et al.; "
                      "'ffn_out': after the FFN output projection, as Pfeiffer et al.)")


class NormedBottleneck(nn.Module):
    """``x (..., d) -> W_up f(W_down LN(x) + b_down) + b_up``; computed in its own dtype."""

    def __init__(self, d: int, width: int, activation: str, init_scale: float, **kw: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-5, **kw)
        self.bottleneck = Bottleneck(d, width, d, activation, init_scale, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.norm(x.to(self.norm.weight.dtype))).to(x.dtype)


class BlockAdapterLayer(DeltaModule):
    """Wraps a transformer block; adds ``A(H)`` to its output ``H`` (the first element of a tuple
    output) for each live adapter, in order."""

    adapter_attrs = ("adapter",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = nn.ModuleDict()
        linears = [m for m in base_of(base_layer).modules() if isinstance(m, LINEAR_TYPES)]
        if not linears:
            raise PeftlabError(f"the residual adapter goes after a transformer block, but "
                               f"{type(base_of(base_layer)).__name__} holds no linear layer; leave targets None "
                               "(every block) or name the blocks")
        # A block registers its FFN output projection last: its width is the block's output width.
        self.features = linear_features(linears[-1])[1]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            # Model code reads attributes of the blocks it loops over (a layer's attention type, say).
            return getattr(self.base_layer, name)

    def add(self, name: str, config: ResidualAdapterConfig) -> None:
        d = self.features
        self.adapter[name] = NormedBottleneck(d, bottleneck_width(config, d), config.activation, config.init_scale,
                                              **factory_kwargs(self.base_layer))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        live = self.live_adapters()
        if not live:
            return out
        h = out[0] if isinstance(out, tuple) else out
        for name in live:
            h = h + self.adapter[name](h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def block_paths(model: nn.Module) -> list[str]:
    """Each transformer block: the ``@ffn`` module's path up to its first numeric index, in model order."""
    blocks: list[str] = []
    for path in resolve_targets(model, ("@ffn",)):
        match = re.match(r"(.*?\.\d+)(\.|$)", path.replace(".base_layer", ""))
        if match is None:
            raise PeftlabError(f"cannot tell the transformer block of {path!r} (no layer index in its path); "
                               "name the blocks in targets")
        if match.group(1) not in blocks:
            blocks.append(match.group(1))
    return blocks


def attach(model: nn.Module, name: str, config: ResidualAdapterConfig, host: Any = None) -> None:
    if config.placement == "ffn_out":
        add_bottlenecks(model, name, config, config.targets if config.targets is not None else ("@ffn_out",))
        return
    paths = block_paths(model) if config.targets is None else resolve_targets(model, config.targets)
    for path in paths:
        wrap(model, path, BlockAdapterLayer).add(name, config)


SPEC = register(MethodSpec(
    name="residual_adapter", title="Residual adapter", family="additive", subcategory="adapter", config_cls=ResidualAdapterConfig,
    trains="one LayerNorm + bottleneck network on each transformer block's output", attach=attach,
    paper="Lin et al. 2020, Exploring Versatile Generative Language Model Via Parameter-Efficient "
          "Transfer Learning; Pfeiffer et al. 2021, AdapterFusion",
    mergeable=False, identity_at_init=True, default_lr=1e-3,
))
