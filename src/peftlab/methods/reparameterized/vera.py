"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, "VeRA: Vector-based Random
Matrix Adaptation", ICLR).

One pair of random low-rank matrices, frozen and shared by every adapted layer, and two trained
scaling vectors per layer::

    h = W0 x + Lambda_b B Lambda_d A x        A: r x in_max, B: out_max x r   (frozen, shared, random)
                                              d: r (init d_initial = 0.1), b: out (init 0) -> identity at init

``A`` and ``B`` are sized for the largest adapted layer and sliced per layer (``A[:, :in]``,
``B[:out, :]``); they are frozen adapter state, drawn from ``projection_prng_key`` with the same
Kaiming-uniform draws as HF peft (so an adapter saved without them, ``save_projection=False``,
regenerates the very same matrices in either library), and saved with the adapter by default as
peft does (``base_model.vera_A`` / ``base_model.vera_B``). A layer trains ``out + r`` numbers.
Merging adds ``(b * B) (d * A)`` into ``W0``.

Defaults are peft's: ``r = 256``, ``d_initial = 0.1``, query and value projections (the paper's GLUE
placement). Deviation: VeRA is its own method here, not a LoRA variant: it has none of LoRA's
trained factors, so it shares no state or fast path with the LoRA layer; the frozen shared
projections use the core's frozen-state mechanism instead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, peft_names
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

_KEY = "vera"  # this method's entry in PeftModel.model_adapters
_PROJECTIONS = ("vera_A", "vera_B")


@peft_names(target_modules="targets", vera_dropout="dropout")
@dataclasses.dataclass(frozen=True)
class VeraConfig(PeftConfig):
    """r: rank of the shared random projections; d_initial: start value of the vector d;
    projection_prng_key: seed of A and B; save_projection: keep A and B in the checkpoint (else they
    are regenerated from the seed); dropout: on the input of the update."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        self._require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                      "a positive integer rank such as 256")
        self._require(isinstance(self.d_initial, (int, float)) and math.isfinite(self.d_initial), "d_initial",
                      "a finite number such as 0.1")
        self._require(isinstance(self.projection_prng_key, int), "projection_prng_key", "an integer seed")
        self._require(isinstance(self.save_projection, bool), "save_projection", "True or False")
        self._require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a probability in [0, 1)")

    def peft_fields(self) -> dict[str, Any]:
        return {"peft_type": "VERA", "r": self.r, "target_modules": self.targets, "d_initial": self.d_initial,
                "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
                "vera_dropout": self.dropout, "bias": "none", "fan_in_fan_out": False, "init_weights": True,
                "inference_mode": True, "modules_to_save": list(self.modules_to_save) or None}

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        modules = [base_of(model.get_submodule(p)) for p in resolve_targets(model, self.targets)]
        return {"fan_in_fan_out": any(not isinstance(m, nn.Linear) for m in modules)}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "VeraConfig":
        for field, plain in (("bias", "none"), ("layers_to_transform", None), ("init_weights", True)):
            if data.get(field, plain) != plain:
                raise PeftlabError(f"this peft VeRA checkpoint sets {field}={data[field]!r}, which peftlab's VeraConfig "
                                   f"does not implement (it reads {field}={plain!r})")
        return cls(r=int(data["r"]), targets=data["target_modules"], d_initial=float(data.get("d_initial", 0.1)),
                   projection_prng_key=int(data.get("projection_prng_key", 0)),
                   save_projection=bool(data.get("save_projection", True)),
                   dropout=float(data.get("vera_dropout", 0.0)), modules_to_save=tuple(data.get("modules_to_save") or ()))


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # fan_in is the second dimension of a 2-D tensor; gain sqrt(2): bound = sqrt(6 / fan_in). The
    # draw order (A, then B, from one generator) is peft's, so both libraries regenerate the same.
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(DeltaModule):
    """Model-level: each adapter's shared frozen A and B (saved under peft's top-level keys when
    the adapter's ``save_projection`` is set, else regenerated from its seed)."""

    frozen_attrs = _PROJECTIONS

    def __init__(self) -> None:
        super().__init__()
        self.vera_A, self.vera_B = BufferDict(), BufferDict()

    def add(self, name: str, config: VeraConfig, in_max: int, out_max: int, like: torch.Tensor) -> None:
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        a = _kaiming_uniform((config.r, in_max), generator)
        b = _kaiming_uniform((out_max, config.r), generator)
        self.vera_A[name] = a.to(like.device, like.dtype)
        self.vera_B[name] = b.to(like.device, like.dtype)
        self.settings[name] = config.save_projection

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if not self.settings.get(name):
            return {}
        return {f"base_model.{attr}": getattr(self, attr)[name] for attr in _PROJECTIONS}

    def merge(self, name: str) -> None:  # the layers fold the update; the projections stay as they are
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.merged_adapters.remove(name)

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for attr in _PROJECTIONS:
                key = f"base_model.{attr}"
                if key in tensors:
                    getattr(self, attr)[name].copy_(tensors[key])


class VeraLayer(DeltaModule):
    """Wraps a Linear/Conv1D; adds ``b * (B[:out] (d * (A[:, :in] x)))`` per live adapter."""

    adapter_attrs = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.vera_lambda_b, self.vera_lambda_d = nn.ParameterDict(), nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)
        self.shared: list[VeraProjections] = []  # a list: the model-level module is not our child

    def add(self, name: str, config: VeraConfig, shared: VeraProjections) -> None:
        weight = base_of(self.base_layer).weight
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=weight.device, dtype=weight.dtype))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=weight.device,
                                                           dtype=weight.dtype))
        if config.dropout > 0:
            self.vera_dropout[name] = nn.Dropout(config.dropout)
        self.shared = [shared]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super().adapter_state(name).items() if not k.startswith("vera_dropout")}

    def _projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.shared[0]
        return shared.vera_A[name][:, :self.in_features], shared.vera_B[name][:self.out_features, :]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, b = self._projections(name)
            h = self.vera_dropout[name](x) if name in self.vera_dropout else x
            h = h.to(a.dtype)
            update = self.vera_lambda_b[name] * F.linear(self.vera_lambda_d[name] * F.linear(h, a), b)
            out = out + update.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``(b * B) (d * A)`` laid out like the base weight."""
        a, b = self._projections(name)
        delta = (self.vera_lambda_b[name][:, None] * b) @ (self.vera_lambda_d[name][:, None] * a)
        return delta.T if self.transposed else delta



def attach(model: nn.Module, name: str, config: VeraConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("VeRA keeps model-level shared projections: apply it with get_peft_model")
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    layers = [wrap(model, path, VeraLayer) for path in paths]
    shared = host.model_adapters[_KEY] if _KEY in host.model_adapters else VeraProjections()
    host.model_adapters[_KEY] = shared
    weight = base_of(layers[0].base_layer).weight
    shared.add(name, config, max(layer.in_features for layer in layers), max(layer.out_features for layer in layers),
               weight)
    for layer in layers:
        layer.add(name, config, shared)


SPEC = register(MethodSpec(
    name="vera", title="VeRA", family="reparameterized", subcategory="LoRA derivative",
    config_cls=VeraConfig, trains="two scaling vectors per layer around one frozen shared random low-rank pair",
    attach=attach, paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation",
    mergeable=True, merge_tolerance=1e-4, peft_type="VERA", default_lr=4e-3,
))
