"""Residual adapter: one bottleneck adapter after the FFN only (Lin et al., 2020, "Exploring Versatile
Generative Language Model Via Parameter-Efficient Transfer Learning"; the placement Pfeiffer et al.,
2021, "AdapterFusion", found as good as Houlsby's two adapters per layer at half the cost).

With ``h`` the output of the FFN's output projection (before the block's residual add)::

    h <- h + W_up f(W_down h + b_down) + b_up        W_down: m x d, W_up: d x m (zero at init)

The same :class:`~peftlab.methods.additive.sequential_adapter.Bottleneck` layer as the sequential
adapter, at ``@ffn_out`` only, so a site trains ``2 d m + m + d`` parameters and a layer half of
what the sequential adapter trains. The LayerNorm Lin et al. put inside their adapter and the
LayerNorm reuse of Pfeiffer's configuration are not reproduced. Not mergeable.
"""
from __future__ import annotations

import dataclasses

from ...core.config import PeftConfig
from ...core.registry import MethodSpec, register
from .sequential_adapter import attach, validate_bottleneck_fields


@dataclasses.dataclass(frozen=True)
class ResidualAdapterConfig(PeftConfig):
    """Fields as :class:`~peftlab.methods.additive.sequential_adapter.SequentialAdapterConfig`;
    targets default to the FFN output projection only."""

    targets: tuple[str, ...] | str | None = ("@ffn_out",)
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init_scale: float = 1e-2

    def validate(self) -> None:
        validate_bottleneck_fields(self)


SPEC = register(MethodSpec(
    name="residual_adapter", family="additive", subcategory="adapter", config_cls=ResidualAdapterConfig,
    trains="one bottleneck network after each FFN output projection", attach=attach,
    paper="Lin et al. 2020, Exploring Versatile Generative Language Model Via Parameter-Efficient "
          "Transfer Learning; Pfeiffer et al. 2021, AdapterFusion",
    mergeable=False, identity_at_init=True, default_lr=1e-3,
))
