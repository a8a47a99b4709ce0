"""LayerNorm tuning: only the normalisation layers' gain and bias train (HF peft's ``LN_TUNING``;
Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
the paper peft cites; also one of the candidate modules of S3Delta-M, Hu et al., 2022, "LNFit").

Each targeted norm keeps its frozen ``gamma0``/``beta0`` and gets per-adapter deltas (zero at init)::

    h = (gamma0 + dgamma) * norm(x) + (beta0 + dbeta)        norm(x): (x - mean) / sqrt(var + eps), or RMS

so training ``dgamma``/``dbeta`` from zero is training the norm's own weight and bias (the same
gradient); RMSNorm / T5's norm (no bias) train the gain only. Holding deltas instead of peft's full
copy of the norm lets several adapters share one model (their deltas add up when stacked, where peft
refuses more than one active adapter), lets another method's wrapper sit inside or around the norm
(S3Delta stacks BitFit on the same norms), and makes merging ``gamma0 + dgamma`` into the weight exact
to undo.

Checkpoints are written in peft's layout both ways: peft keeps a trained copy of each norm, so the
file holds ``<norm path>.ln_tuning_layers.weight`` = ``gamma0 + dgamma`` (and ``.bias``), and loading
(peft's file or ours) sets ``dgamma = saved - gamma0``. ``gamma0`` is the base model's, so a file
moves between base models only as peft's does (it stores full values).

Default targets ``@layernorm``: every norm of the model (each block's, and the embedding or final
norm), which is peft's per-architecture default for GPT-2, Llama and T5 (peft has none for BERT).
``default_lr`` 1e-3: the rate peftlab's BitFit uses, the other method that trains norm/bias vectors
(the peft method names no rate).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import resolve_targets

PEFT_KEY = "ln_tuning_layers"  # peft's attribute: its trained copy of the norm


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(PeftConfig):
    """targets: the norm modules to tune (names, '@' sites such as ``"@layernorm[0,3]"``, regex);
    every one must be a norm with a ``weight`` (LayerNorm, RMSNorm, T5LayerNorm)."""

    targets: tuple[str, ...] | str | None = ("@layernorm",)

    def peft_fields(self) -> dict[str, Any]:
        # target_modules is rewritten with the resolved module paths when saving.
        targets = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        return {"peft_type": "LN_TUNING", "target_modules": targets, "exclude_modules": None,
                "inference_mode": True, "modules_to_save": list(self.modules_to_save) or None}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LNTuningConfig":
        if data.get("exclude_modules"):
            raise PeftlabError("this peft LN_TUNING config uses exclude_modules, which peftlab's LNTuningConfig does "
                               "not read; list the wanted norms in target_modules instead")
        targets = data.get("target_modules")
        if targets is None:
            targets = cls().targets
        elif isinstance(targets, (list, tuple)):
            targets = tuple(targets)
        return cls(targets=targets, modules_to_save=tuple(data.get("modules_to_save") or ()))


class LNTuningLayer(DeltaModule):
    """Wraps a norm module; adapter ``name`` holds ``ln_tuning_weight[name]`` (d,) and, where the norm
    has a bias, ``ln_tuning_bias[name]`` (d,), both zero at init."""

    adapter_attrs = ("ln_tuning_weight", "ln_tuning_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_weight = nn.ParameterDict()
        self.ln_tuning_bias = nn.ParameterDict()
        norm = _norm_of(base_layer)
        # functional_call names the norm's tensors from this wrapper's base_layer down (another
        # method's wrapper may sit between, e.g. BitFit's on the same norm).
        self.prefix, inner = "", base_layer
        while inner is not norm:
            self.prefix, inner = self.prefix + "base_layer.", inner.base_layer
        # The norm's own tensors while adapters are merged into them (not saved: the base model's).
        self.unmerged: dict[str, torch.Tensor] = {}

    @property
    def norm(self) -> nn.Module:
        # Read through the wrappers each time: registering it here would list the norm twice.
        return base_of(self.base_layer)

    def add(self, name: str, config: Any = None) -> None:
        self.ln_tuning_weight[name] = nn.Parameter(torch.zeros_like(self.norm.weight))
        if _has_bias(self.norm):
            self.ln_tuning_bias[name] = nn.Parameter(torch.zeros_like(self.norm.bias))

    def _tensors(self, names: list[str], start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"weight": gamma0 + sum dgamma, "bias": beta0 + sum dbeta} over ``names``."""
        start = start or {"weight": self.norm.weight, **({"bias": self.norm.bias} if _has_bias(self.norm) else {})}
        out = {"weight": start["weight"] + sum(self.ln_tuning_weight[n] for n in names)}
        if "bias" in start:
            out["bias"] = start["bias"] + sum(self.ln_tuning_bias[n] for n in names)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        tensors = {self.prefix + k: v for k, v in self._tensors(live).items()}
        return torch.func.functional_call(self.base_layer, tensors, args, kwargs)

    # -- peft's layout: the trained norm's full values -------------------------------------------
    def _original(self) -> dict[str, torch.Tensor]:
        if self.unmerged:
            return self.unmerged
        return {"weight": self.norm.weight, **({"bias": self.norm.bias} if _has_bias(self.norm) else {})}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.ln_tuning_weight:
            return {}
        full = self._tensors([name], self._original())
        return {f"{PEFT_KEY}.{k}": v.detach() for k, v in full.items()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        original = self._original()
        with torch.no_grad():
            for key, container in (("weight", self.ln_tuning_weight), ("bias", self.ln_tuning_bias)):
                if name in container:
                    delta = container[name]
                    full = tensors[f"{PEFT_KEY}.{key}"].to(device=delta.device, dtype=original[key].dtype)
                    delta.copy_((full - original[key]).to(delta.dtype))

    # -- merging: gamma0 + dgamma written into the norm, the originals kept for unmerge ---------------
    def merge(self, name: str) -> None:
        with torch.no_grad():
            if not self.unmerged:
                self.unmerged = {k: v.detach().clone() for k, v in self._original().items()}
            for key, value in self._tensors(self.merged_adapters + [name], self.unmerged).items():
                getattr(self.norm, key).copy_(value)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.merged_adapters.remove(name)
        with torch.no_grad():
            for key, value in self._tensors(self.merged_adapters, self.unmerged).items():
                getattr(self.norm, key).copy_(value)
        if not self.merged_adapters:
            self.unmerged = {}


def _has_bias(norm: nn.Module) -> bool:
    return isinstance(getattr(norm, "bias", None), torch.Tensor)


def _norm_of(module: nn.Module) -> nn.Module:
    norm = base_of(module)
    if not isinstance(getattr(norm, "weight", None), nn.Parameter) or norm.weight.dim() != 1:
        raise PeftlabError(f"LN tuning targets normalisation layers with a 1-D weight (LayerNorm, RMSNorm, "
                           f"T5LayerNorm); got {type(norm).__name__}. Narrow LNTuningConfig.targets to norms, "
                           "e.g. '@layernorm'")
    return norm


def attach(model: nn.Module, name: str, config: LNTuningConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets)
    for path in paths:  # check every target before wrapping any: no half-changed model
        _norm_of(model.get_submodule(path))
    for path in paths:
        wrap(model, path, LNTuningLayer).add(name, config)


SPEC = register(MethodSpec(
    name="ln_tuning", title="LN tuning", family="partial", subcategory="layernorm update", config_cls=LNTuningConfig,
    trains="the gain and bias of the targeted normalisation layers (as per-adapter deltas)", attach=attach,
    paper="Zhao et al. 2023, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning "
          "(HF peft's LN_TUNING)",
    mergeable=True, merge_tolerance=1e-6, peft_type="LN_TUNING", default_lr=1e-3,
))
