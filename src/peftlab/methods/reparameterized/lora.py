"""LoRA: Low-Rank Adaptation (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

The frozen weight ``W0`` (out x in) gets a trainable low-rank update::

    h = W0 x + (alpha / r) * B A x          A: r x in (random), B: out x r (zero) -> identity at init

rsLoRA (Kalajdzievski, 2023) scales by ``alpha / sqrt(r)`` instead, which keeps the update's
magnitude stable as ``r`` grows. Dropout, when set, is applied to ``x`` on the low-rank path only.
Supports ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored in x out) and ``nn.Embedding``
(``A``: r x vocab, looked up by token id). Merging adds ``(alpha/r) B A`` into ``W0``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets


@dataclasses.dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """r: rank of the update; alpha: scale numerator; dropout: on the low-rank input;
    rslora: scale by alpha/sqrt(r). targets default to the attention query and value."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        self._require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer rank such as 8")
        self._require(self.alpha > 0, "alpha", "a positive number (often 2*r)")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def peft_fields(self) -> dict[str, Any]:
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "use_rslora": self.rslora, "target_modules": self.targets, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": list(self.modules_to_save) or None}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LoraConfig":
        if data.get("bias", "none") != "none" or data.get("use_dora") or data.get("rank_pattern") or data.get("alpha_pattern"):
            raise ValueError("this peft LoRA checkpoint uses bias/DoRA/rank_pattern/alpha_pattern, which "
                             "peftlab's LoraConfig does not read; re-save it with plain LoRA settings")
        return cls(r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                   rslora=bool(data.get("use_rslora", False)), targets=data["target_modules"],
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


class LoraLayer(DeltaModule):
    """Wraps a Linear, Conv1D or Embedding with any number of named LoRA updates."""

    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        base = base_of(base_layer)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.transposed = not isinstance(base, (nn.Linear, nn.Embedding))  # Conv1D keeps W as in x out
        if self.is_embedding:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        elif self.transposed:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def add(self, name: str, config: LoraConfig) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if self.is_embedding:
            # peft's convention for embeddings: A zero, B random (still identity at init).
            self.lora_embedding_A[name] = nn.Parameter(torch.zeros(config.r, self.in_features, **kw))
            self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, config.r, **kw))
        else:
            self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **kw)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            if config.dropout > 0:
                self.lora_dropout[name] = nn.Dropout(config.dropout)
        self.settings[name] = config.scaling

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(name)
        return {k: v for k, v in state.items() if not k.startswith("lora_dropout")}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``(alpha/r) B A`` laid out like the base weight."""
        if self.is_embedding:
            delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T  # vocab x dim
        else:
            delta = self.lora_B[name].weight @ self.lora_A[name].weight  # out x in
            if self.transposed:
                delta = delta.T
        return delta * self.settings[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            scale = self.settings[name]
            if self.is_embedding:
                low = F.embedding(x, self.lora_embedding_A[name].T)
                out = out + (low @ self.lora_embedding_B[name].T) * scale
                continue
            a = self.lora_A[name].weight
            h = self.lora_dropout[name](x) if name in self.lora_dropout else x
            h = F.linear(h.to(a.dtype), a)
            # Fold the scale into the r x out factor: one small multiply instead of a full-size one.
            out = out + F.linear(h, self.lora_B[name].weight * scale).to(out.dtype)
        return out

    def merge(self, name: str) -> None:
        weight = base_of(self.base_layer).weight
        with torch.no_grad():
            weight.add_(self.delta_weight(name).to(weight.dtype))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        weight = base_of(self.base_layer).weight
        with torch.no_grad():
            weight.sub_(self.delta_weight(name).to(weight.dtype))
        self.merged_adapters.remove(name)


def attach(model: nn.Module, name: str, config: LoraConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES + (nn.Embedding,)):
        wrap(model, path, LoraLayer).add(name, config)


SPEC = register(MethodSpec(
    name="lora", family="reparameterized", subcategory="LoRA", config_cls=LoraConfig,
    trains="low-rank update B A of chosen weight matrices", attach=attach,
    paper="Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models",
    mergeable=True, merge_tolerance=1e-4, peft_type="LORA", default_lr=5e-4,
))
